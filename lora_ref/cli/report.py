"""One convention for what a command prints: a human summary, or a JSON report for scripts.

Every command that does work takes ``--json [PATH]``: the report of what was done (paths,
per-tensor or per-module counts, modes, residual sizes) as one JSON object. ``--json -`` (or a
bare ``--json``) writes it to stdout, and then nothing else goes to stdout; ``--json PATH`` writes
it atomically to PATH (checked by the path guard like any output) and the human summary still
goes to stdout. ``--quiet`` prints no summary at all (errors and warnings still go to stderr).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

from ..atomic import write_text_atomic
from .paths import PathGuard

STDOUT = "-"


def add_json_option(parser: argparse.ArgumentParser, what: str = "what was done") -> None:
    """``--json [PATH]``: the report of ``what`` as JSON to PATH, or to stdout for '-' or no PATH."""
    parser.add_argument("--json", nargs="?", const=STDOUT, metavar="PATH",
                        help=f"write a JSON report of {what} to PATH ('-' or no PATH: stdout, and nothing else on stdout)")


def json_file(args: argparse.Namespace) -> str | None:
    """The file ``--json`` writes, or None (no report, or stdout): list it as an output of the path guard."""
    target = getattr(args, "json", None)
    return None if target in (None, STDOUT) else target


def guard_report(guard: PathGuard, args: argparse.Namespace) -> PathGuard:
    """Add the ``--json`` report file, if any, to ``guard``'s outputs."""
    return guard.write("JSON report", json_file(args))


def to_json_text(report: object) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"


def unmerge_mode(residual: bool, verified: bool) -> tuple[str, str]:
    """(the ``mode`` of an unmerge report: fast, exact or residual-unverified; the summary's words for it)."""
    if not residual:
        return "fast", "fast (no residual: within the SPEC 3.3 bound)"
    if verified:
        return "exact", "exactly (residual applied; every restored tensor matches the base digest recorded at merge)"
    return "residual-unverified", "with the residual applied, unverified (the residual records no base digests)"


def emit_report(args: argparse.Namespace, report: dict, human: str | Iterable[str], *, quiet: bool | None = None) -> None:
    """Print ``human`` (a line or lines) unless quiet or ``--json -``; write ``report`` where ``--json`` says.

    ``quiet`` is ``args.quiet`` unless given (``conformance run --quiet`` still prints its failures and summary).
    """
    target = getattr(args, "json", None)
    if target == STDOUT:
        print(to_json_text(report), end="")
        return
    if target is not None:
        write_text_atomic(target, to_json_text(report))
    if not (getattr(args, "quiet", False) if quiet is None else quiet):
        print(human if isinstance(human, str) else "\n".join(human))

