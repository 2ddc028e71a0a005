"""Reports of a conformance run: a terminal table, JSON and JUnit XML (SPEC C.5).

Per case: status, the largest error as a fraction of its bound (``err/bound``; <= 1 passes)
and the largest distance in ulps of the storage dtype from the correctly rounded result.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from typing import Any

from .runner import SuiteResult


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def table(result: SuiteResult, *, verbose: bool = False) -> str:
    """A plain-text table, failures' reasons below it, and a summary line."""
    header = ("case", "op", "dtype", "status", "err/bound", "ulps", "ms")
    rows = [(r.case_id, r.operation, r.dtype, r.status.upper(), _ratio(r.ratio), "-" if r.ulps is None else str(r.ulps),
             f"{r.seconds * 1000:.1f}") for r in result.results if verbose or r.status != "pass" or len(result.results) <= 200]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    reasons = [f"  {r.status.upper()} {r.case_id}: {r.detail}" for r in result.results if r.status != "pass" and r.detail]
    if reasons:
        lines += ["", *reasons]
    counts = result.counts()
    worst = max((r.ratio for r in result.results if r.ratio is not None and r.status == "pass"), default=None)
    lines += ["", (f"{result.implementation} [layout {result.layout}, compute {result.compute}, suite {result.suite_version}]: "
                   f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, {counts['error']} errors"
                   + (f"; worst passing err/bound {_ratio(worst)}" if worst is not None else ""))]
    return "\n".join(lines)


def _finite(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else "inf"


def to_json(result: SuiteResult) -> dict[str, Any]:
    """A JSON-ready dict of the whole run."""
    return {
        "suite_version": result.suite_version,
        "implementation": result.implementation,
        "layout": result.layout,
        "compute": result.compute,
        "counts": result.counts(),
        "cases": [
            {"id": r.case_id, "operation": r.operation, "dtype": r.dtype, "status": r.status, "seconds": round(r.seconds, 6),
             "error_over_bound": _finite(r.ratio), "ulps": r.ulps, "detail": r.detail,
             "outputs": [{"name": c.name, "ok": c.ok, "error_over_bound": _finite(c.ratio), "ulps": c.ulps, "detail": c.detail}
                         for c in r.outputs]}
            for r in result.results
        ],
    }


def to_json_text(result: SuiteResult) -> str:
    return json.dumps(to_json(result), indent=1) + "\n"


def to_junit(result: SuiteResult) -> str:
    """JUnit XML: one testsuite, one testcase per case (failure, error or skipped elements)."""
    counts = result.counts()
    suite = ET.Element("testsuite", name=f"lora-ref conformance ({result.implementation})", tests=str(len(result.results)),
                       failures=str(counts["fail"]), errors=str(counts["error"]), skipped=str(counts["skip"]),
                       time=f"{sum(r.seconds for r in result.results):.6f}")
    for r in result.results:
        group, _, name = r.case_id.partition("/")
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{group}", name=name, time=f"{r.seconds:.6f}")
        ET.SubElement(case, "properties")
        for key, value in (("operation", r.operation), ("dtype", r.dtype), ("error_over_bound", _ratio(r.ratio)),
                           ("ulps", "-" if r.ulps is None else str(r.ulps))):
            ET.SubElement(case.find("properties"), "property", name=key, value=value)
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.detail[:500]).text = r.detail
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.detail[:500]).text = r.detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.detail[:500])
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"
