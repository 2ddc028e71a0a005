"""The ``lora-ref`` command line: a thin shell over the library.

Each command group lives in its own module with ``register(subparsers)``; add new modules to
``COMMAND_MODULES``. Exit codes: 0 ok, 1 a check failed (conformance), 2 user error
(a LoraRefError, printed on one line), 3 internal error (``--verbose`` shows the traceback),
130 interrupted (Ctrl-C; 128 + SIGINT, the shell convention). Messages are always one line and
safe for a terminal (:func:`printable`: escapes, long names shortened). Every command runs in one
:func:`lora_ref.atomic.transaction`, so a refused or failed command leaves no file or folder changed.

The global options ``--verbose`` and ``--quiet`` may stand before or after the subcommand
(``lora-ref --quiet merge ...`` and ``lora-ref merge ... --quiet`` mean the same).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import re
import sys
import traceback

from .. import __version__
from ..atomic import transaction
from ..errors import LoraRefError

COMMAND_MODULES = ["inspect_cmd", "merge_cmd", "demo_cmd", "combine_cmd", "export_cmd", "conformance_cmd", "gguf_cmd", "convert_cmd"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
GLOBAL_FLAGS = {"--verbose": "verbose", "--quiet": "quiet"}
# optional dependencies -> the extra that installs them (a missing one is a set-up mistake, not a bug)
OPTIONAL_EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "peers", "torch": "peers", "peft": "peers"}


#: A run of non-space characters longer than this (a hostile module name) is shortened.
MAX_WORD = 512
#: A whole message longer than this is cut (the start says what failed).
MAX_MESSAGE = 2000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _shorten(match: re.Match[str]) -> str:
    word = match.group()
    return f"{word[:200]}...[{len(word)} chars]...{word[-60:]}"


def printable(text: object, *, limit: int = MAX_MESSAGE) -> str:
    """``str(text)`` safe to print on one terminal line: the one place untrusted strings are made safe.

    Control characters (C0, DEL, C1: terminal escape sequences start with ESC or CSI) and
    invisible or direction-changing format characters are escaped (``\\x1b``, ``\\u202e``; line
    breaks as ``\\n``), a run of more than :data:`MAX_WORD` non-space characters (a megabyte
    module name) keeps its start and end with its length shown, and the result is cut at ``limit``.
    """
    safe = _LONG_WORD.sub(_shorten, _CONTROL.sub(_escape, str(text)))
    return safe if len(safe) <= limit else f"{safe[:limit]}...[{len(safe)} chars in all]"


def one_line(message: object) -> str:
    """An error message on one safe line (:func:`printable`)."""
    return printable(message)


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default (unless it is unset or its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, and every option's default shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse would exit 2 with usage; keep it one line
        self.exit(EXIT_USER_ERROR, f"lora-ref: error: {printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-ref", description="Reference LoRA: inspect, merge, unmerge, export, conformance.")
    parser.add_argument("--version", action="version", version=f"lora-ref {__version__}")
    parser.add_argument("--verbose", action="store_true", help="print a traceback on errors (before or after the subcommand)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and results a script needs (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def split_global_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """``argv`` without the global flags (anywhere before a ``--``), and the flags' names found."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = {GLOBAL_FLAGS[token] for token in argv[:end] if token in GLOBAL_FLAGS}
    return [token for token in argv[:end] if token not in GLOBAL_FLAGS] + argv[end:], found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, flags = split_global_flags(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    for flag in flags:
        setattr(args, flag, True)
    try:
        with transaction(), _collector_for_batch():  # all or nothing: a failed command leaves every file as it was
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
    except BrokenPipeError:  # the reader went away (`lora-ref inspect --json | head -1`): not a bug
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        print("lora-ref: error: output pipe closed before the output was written", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in OPTIONAL_EXTRAS:
            return _internal_error(exc, args.verbose)
        if args.verbose:
            traceback.print_exc()
        print(f"lora-ref: error: this command needs the optional package {top!r}: "
              f"pip install 'lora-ref[{OPTIONAL_EXTRAS[top]}]'", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: say so plainly
        return _internal_error(exc, args.verbose)


@contextlib.contextmanager
def _collector_for_batch():
    """Rarer cyclic garbage collections while a command runs (restored after it): a command on an
    adapter of 100,000 modules keeps about a million small objects alive, and the default
    thresholds rescan them all again and again (a quarter of a merge's time); cycles are still
    collected, only less often."""
    previous = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _internal_error(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    print(f"lora-ref: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --verbose for a traceback)",
          file=sys.stderr)
    return EXIT_INTERNAL_ERROR
