"""``lora-ref conformance run|list|generate``: test an implementation against the frozen cases.

Exit codes: 0 every selected case passed or was skipped under the chosen ``--compute`` profile
(the other tier is printed as information), 1 a case failed, errored or timed out under it (or
``generate --check`` found a moved vector), 2 user error (bad flags, no suite, bad --impl).
Progress goes to stderr, one line per case as it finishes (``--no-progress`` turns it off).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..atomic import write_text_atomic
from .paths import PathGuard, add_overwrite_option
from .report import add_json_option, emit_report, json_file
from ..errors import ConfigError
from ..conformance.bridge import load_factory
from ..conformance.casefile import default_suite
from ..conformance.generator import compare_suites, generate
from ..conformance.layouts import LAYOUTS
from ..conformance.report import table, to_json, to_junit
from ..conformance.runner import COMPUTE_PROFILES, CaseResult, InProcessDriver, Selection, SubprocessDriver, run_suite, select_cases

#: The shipped suite: inside the installed package, or conformance/ in a source checkout.
DEFAULT_SUITE = default_suite()


def _suite(args: argparse.Namespace) -> Path:
    suite = Path(args.suite) if args.suite else DEFAULT_SUITE
    if not (suite / "manifest.json").is_file() and args.command_name != "generate":
        raise ConfigError(f"{suite} is not a conformance suite (no manifest.json); pass --suite DIR")
    return suite


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", help=f"suite directory with manifest.json and cases/ (default: {DEFAULT_SUITE})")
    parser.add_argument("-k", dest="keywords", action="append", default=[], help="keep cases whose id contains this (repeatable: all must match)")
    parser.add_argument("--group", action="append", default=[], help="keep this group (linear, embedding, ...); repeatable")
    parser.add_argument("--dtype", action="append", default=[], choices=["float32", "float16", "bfloat16"], help="keep this dtype; repeatable")
    parser.add_argument("--op", action="append", default=[], help="keep this operation (e.g. linear.merge); repeatable")


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(tuple(args.keywords), tuple(args.group), tuple(args.dtype), tuple(args.op))


def register(sub: argparse._SubParsersAction) -> None:
    conformance = sub.add_parser("conformance", epilog="example:\n  lora-ref conformance run --impl lora_ref.conformance.reference_impl:factory --group linear", help="run the LoRA conformance suite against an implementation")
    commands = conformance.add_subparsers(dest="conformance_command", required=True, parser_class=type(conformance))

    run = commands.add_parser("run", epilog="examples:\n  lora-ref conformance run --impl lora_ref.conformance.reference_impl:factory --json report.json\n  lora-ref conformance run --cmd ./my_impl --layout peft -k embedding --quiet", help="run an implementation through the cases")
    how = run.add_mutually_exclusive_group(required=True)
    how.add_argument("--impl", help="in-process Python implementation, MODULE:FACTORY")
    how.add_argument("--cmd", help='any-language implementation, run as: CMD run <case_dir> <out_dir>')
    run.add_argument("--persistent", action="store_true", help="with --cmd: start 'CMD serve' once, one request per line")
    run.add_argument("--layout", default="canonical", choices=sorted(LAYOUTS), help="tensor/scale convention of the implementation")
    run.add_argument("--compute", default="float32", choices=list(COMPUTE_PROFILES),
                     help="what the bounds allow (SPEC C.3): " + "; ".join(f"{k}: {p.summary}" for k, p in COMPUTE_PROFILES.items()))
    run.add_argument("--timeout", type=float, default=60.0, help="seconds per case (default 60)")
    add_json_option(run, "every case's result")
    add_overwrite_option(run)
    run.add_argument("--junit", help="write a JUnit XML report here")
    run.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no per-case progress lines on stderr")
    _filters(run)
    run.set_defaults(func=run_command, command_name="run")

    listing = commands.add_parser("list", epilog="example:\n  lora-ref conformance list --group linear --dtype bfloat16 --json -", help="list the cases")
    _filters(listing)
    add_json_option(listing, "the selected cases")
    add_overwrite_option(listing)
    listing.set_defaults(func=list_command, command_name="list")

    gen = commands.add_parser("generate", epilog="example:\n  lora-ref conformance generate --check", help="regenerate the frozen cases from the catalog")
    gen.add_argument("--suite", help=f"where to write (default: {DEFAULT_SUITE})")
    gen.add_argument("--check", action="store_true", help="do not write: regenerate elsewhere and fail if any file differs")
    gen.set_defaults(func=generate_command, command_name="generate")


def run_command(args: argparse.Namespace) -> int:
    suite = _suite(args)
    if args.persistent and not args.cmd:
        raise ConfigError("--persistent needs --cmd")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    guard = PathGuard(hint="write the report elsewhere", overwrite=args.overwrite)
    for path in sorted(suite.rglob("*")):
        guard.read("suite file", path)
    guard.write("JSON report", json_file(args)).write("JUnit report", args.junit).check()
    if not select_cases(suite, _selection(args))[1]:
        raise ConfigError("no case matches the filters (-k/--group/--dtype/--op); see `lora-ref conformance list` with the same filters")
    if args.impl:
        driver = InProcessDriver(load_factory(args.impl), name=args.impl)
    else:
        driver = SubprocessDriver(args.cmd, persistent=args.persistent)
    result = run_suite(suite, driver, layout=args.layout, profile=args.compute, selection=_selection(args), timeout=args.timeout,
                       progress=_progress if args.progress else None)
    text = table(result)
    if args.quiet:
        text = "\n".join(line for line in text.splitlines() if "PASS" not in line.split())
    emit_report(args, to_json(result), text, quiet=False)
    if args.junit:
        write_text_atomic(args.junit, to_junit(result))
    return 0 if result.ok else 1


def _progress(position: int, total: int, result: CaseResult) -> None:
    """One stderr line per finished case: position, id, status, both tiers' verdict, time."""
    tier = f" [{result.verdict}]" if result.verdict not in (None, "float32") else ""
    print(f"[{position}/{total}] {result.case_id} {result.status.upper()}{tier} {result.seconds * 1000:.1f} ms", file=sys.stderr, flush=True)


def list_command(args: argparse.Namespace) -> int:
    suite = _suite(args)
    PathGuard(hint="write the report elsewhere", overwrite=args.overwrite).read("suite manifest", suite / "manifest.json").write("JSON report", json_file(args)).check()
    version, cases = select_cases(suite, _selection(args))
    report = {"suite": str(suite), "suite_version": version, "count": len(cases),
              "cases": [{"id": case_id, "operation": operation, "dtype": dtype} for case_id, operation, dtype in cases]}
    emit_report(args, report, [*(f"{case_id:45s} {operation:20s} {dtype}" for case_id, operation, dtype in cases),
                               f"{len(cases)} cases (suite {version})"])
    return 0


def generate_command(args: argparse.Namespace) -> int:
    suite = _suite(args)
    if not args.check:
        ids = generate(suite)
        print(f"wrote {len(ids)} cases and manifest.json to {suite}")
        return 0
    with tempfile.TemporaryDirectory(prefix="lora-ref-regen-") as fresh:
        generate(fresh)
        problems = compare_suites(suite, fresh)
    for problem in problems:
        print(problem)
    print("frozen cases reproduce bit for bit" if not problems else f"{len(problems)} files moved or differ")
    return 0 if not problems else 1
