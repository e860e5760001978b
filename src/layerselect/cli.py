"""The ``layerselect`` command line: one subcommand per pipeline step.

Each subcommand lives in :mod:`layerselect.commands` as a module with a
``register(subparsers)`` function, so a step's CLI sits next to nothing but
itself. Errors the library raises on purpose print as one line and exit 2; its
warnings (e.g. texts cut to the model's context) print as one line too.

Output: a command's result goes to stdout; our progress bars go to stderr (plain
lines when stderr is not a terminal). The bars and info logs of transformers,
datasets and huggingface_hub are off unless ``--verbose`` is given (before or after
the command name).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ._progress import quiet_libraries
from ._version import __version__
from .errors import LayerSelectError

#: Pipeline order; modules that are not installed are skipped.
COMMANDS = ("demo", "analyze", "select", "plot", "train", "merge", "export-lora", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerselect",
        description="Selective language alignment: analyse, select, train and evaluate FFN layers.",
    )
    parser.add_argument("--version", action="version", version=f"layerselect {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own progress bars and info logs (transformers, datasets)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            modname = name.replace("-", "_")
            module = importlib.import_module(f"layerselect.commands.{modname}")
        except ModuleNotFoundError as exc:
            if exc.name == f"layerselect.commands.{modname}":
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():  # `layerselect demo --verbose` works as well
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="also show the libraries' own progress bars and info logs")
    return parser


def _warning_printer(command: str, original: Any) -> Any:
    """``warnings.showwarning`` printing layerselect's own warnings as one line, like its errors."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if os.path.abspath(filename).startswith(package):
            print(f"layerselect {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_libraries(quiet=not args.verbose), warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except LayerSelectError as exc:
        from .commands._common import flag_wording

        print(f"layerselect {args.command}: error: {flag_wording(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, permissions, a path that vanished: the environment or the input, not a bug.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"layerselect {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
