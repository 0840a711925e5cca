"""sketchtune's one command line: sketch | info | pretrain | search | retrain | analyze | export.

Each subcommand lives in its own module, imported only when it runs (``info`` never
pays for importing Ray). A :class:`sketch_core.errors.UserError` anywhere ends the
program with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sketch_core.errors import UserError

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "sketch": ("search.cli.train_runs", "sketch a pretrained model and fine-tune it (the original's single shot)"),
    "info": ("sketch_core.cli.info", "unit count, FLOPs (MACs) and params of a model or rate vector"),
    "pretrain": ("search.cli.train_runs", "train an unpruned baseline"),
    "search": ("search.cli.search", "search per-layer sketch rates on Ray Tune + Optuna"),
    "retrain": ("search.cli.search", "fully retrain a configuration picked from a search"),
    "analyze": ("search.cli.analyze", "results of one or more searches: dataframe, Pareto front, plots"),
    "export": ("sketch_core.cli.export", "a sketchtune checkpoint to ONNX or a torch.export program (.pt2)"),
}


def _module(command: str):
    return importlib.import_module(COMMANDS[command][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            getattr(_module(name), "add_arguments")(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None:
        build_parser().print_help() if not argv or argv[0] in ("-h", "--help") else None
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        args = build_parser(command).parse_args(argv)
        return int(getattr(_module(command), "run")(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
