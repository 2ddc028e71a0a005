"""Write SPEC C.2's coverage table from the catalog: ``python -m lora_ref.conformance.coverage_doc [--check]``.

The table lists every family of :data:`.catalog.COVERAGE` with its dimensions, values and case
count, then the hand-written groups (targeted cases, expected refusals, semantic guards).
``--check`` rewrites nothing and exits 1 when SPEC.md's table differs from the catalog
(``tests/test_conformance_suite.py`` runs the same comparison).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from ..atomic import write_text_atomic
from ..docsplice import splice
from .catalog import COVERAGE, all_cases
from .coverage import BEGIN, END, render_table

SPEC = Path(__file__).resolve().parents[2] / "conformance" / "SPEC.md"


def coverage_table() -> str:
    """The table as SPEC C.2 must hold it."""
    specs = all_cases()
    families = Counter(spec.family for spec in specs if spec.family)
    hand = Counter(f"{spec.group} (hand-written{', expected refusals' if spec.refusal else ''})" for spec in specs if not spec.family)
    total = f"{len(specs)} cases: {sum(families.values())} covering (pairwise), {sum(hand.values())} hand-written"
    return render_table(COVERAGE, families, dict(sorted(hand.items()))).replace("\n\n| family", f"\n\n{total}.\n\n| family", 1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = SPEC.read_text(encoding="utf-8")
    updated = splice(text, BEGIN, END, coverage_table(), document=str(SPEC))
    if "--check" in args:
        if updated != text:
            print(f"{SPEC}: the coverage table differs from the catalog; run python -m lora_ref.conformance.coverage_doc")
            return 1
        print("SPEC C.2's coverage table matches the catalog")
        return 0
    write_text_atomic(SPEC, updated)
    print(f"wrote the coverage table to {SPEC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
