"""The ``launch.py`` subcommands that belong to one model: argv in, engine calls out."""
