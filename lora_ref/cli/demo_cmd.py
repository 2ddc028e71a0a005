"""``lora-ref demo``."""

from __future__ import annotations

import argparse

from ..demo import print_demo, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", epilog="example:\n  lora-ref demo", help="build a small model and adapter, merge, unmerge exactly, report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = run_demo()
    print_demo(rows)
    return 0 if all(row["exact_identical"] for row in rows) else 1
