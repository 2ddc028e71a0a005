"""The ``lora-ref`` command line: a thin shell over the library.

Each command group lives in its own module with ``register(subparsers)``; add new modules to
``COMMAND_MODULES``. Exit codes: 0 ok, 1 a check failed (conformance), 2 user error
(a LoraRefError, printed on one line), 3 internal error (``--verbose`` shows the traceback),
130 interrupted (Ctrl-C; 128 + SIGINT, the shell convention). Messages are always one line:
a newline inside one (from a file name, say) is printed as ``\n``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ..errors import LoraRefError

COMMAND_MODULES = ["inspect_cmd", "merge_cmd", "demo_cmd", "combine_cmd", "export_cmd", "conformance_cmd"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def one_line(message: object) -> str:
    """``str(message)`` with line breaks escaped, so every error stays on one line."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2 with usage; keep it one line
        self.exit(EXIT_USER_ERROR, f"lora-ref: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-ref", description="Reference LoRA: inspect, merge, unmerge, export, conformance.")
    parser.add_argument("--verbose", action="store_true", help="print a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        return EXIT_OK if code is None else int(code)
    except LoraRefError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"lora-ref: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lora-ref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so plainly
        if args.verbose:
            traceback.print_exc()
        print(f"lora-ref: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --verbose for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
