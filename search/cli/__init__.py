"""The ``launch.py`` subcommands of the search side: argv in, search calls out."""
