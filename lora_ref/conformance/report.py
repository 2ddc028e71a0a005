"""Reports of a conformance run: a terminal table, JSON and JUnit XML (SPEC C.5).

Per case: status under the chosen profile, the largest error as a fraction of its bound
(``err/bound``; <= 1 passes), the largest distance in ulps of the storage dtype from the
correctly rounded result, and both tiers' err/bound (``f32``: the float32-compute bound,
``storage``: the storage-compute bound), so a precision failure (outside the float32 bound,
inside the storage one) reads differently from a semantic one (outside both). The summary gives
the implementation's class (:meth:`.runner.SuiteResult.conformance`) and the cases of each tier.
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


def _tier(r, tier: str) -> str:
    if tier not in r.tiers:
        return "-"
    ok, ratio = r.tiers[tier]
    return f"{_ratio(ratio)}{'' if ok else '!'}"


def summary_lines(result: SuiteResult) -> list[str]:
    """The two-tier summary: counts under the chosen profile, the class, and each tier's cases."""
    counts = result.counts()
    worst = max((r.ratio for r in result.results if r.ratio is not None and r.status == "pass"), default=None)
    lines = [(f"{result.implementation} [layout {result.layout}, compute {result.compute}, suite {result.suite_version}]: "
              f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, {counts['error']} errors"
              + (f", {counts['timeout']} timed out" if counts["timeout"] else "")
              + (f"; worst passing err/bound {_ratio(worst)}" if worst is not None else ""))]
    storage, semantic = result.tier_cases("storage"), result.tier_cases("semantic")
    judged = sum(1 for r in result.results if r.verdict is not None)
    lines.append(f"two tiers: {judged - len(storage) - len(semantic)} within the float32 bound, {len(storage)} only within "
                 f"the storage bound (precision), {len(semantic)} outside both (semantic) -> {result.conformance().upper()}")
    if storage:
        lines.append("  precision only (float32 profile rejects, storage accepts): " + ", ".join(storage))
    if semantic:
        lines.append("  semantic (both profiles reject): " + ", ".join(semantic))
    return lines


def table(result: SuiteResult, *, verbose: bool = False) -> str:
    """A plain-text table (both tiers' err/bound; ``!`` marks a tier's failure), reasons, and the two-tier summary."""
    header = ("case", "op", "dtype", "status", "err/bound", "ulps", "f32", "storage", "ms")
    rows = [(r.case_id, r.operation, r.dtype, r.status.upper(), _ratio(r.ratio), "-" if r.ulps is None else str(r.ulps),
             _tier(r, "float32"), _tier(r, "storage"), f"{r.seconds * 1000:9.1f}")  # fixed width: the layout never depends on timing
            for r in result.results if verbose or r.status != "pass" or len(result.results) <= 200]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    reasons = [f"  {r.status.upper()} {r.case_id}: {r.detail}" for r in result.results if r.status != "pass" and r.detail]
    if reasons:
        lines += ["", *reasons]
    lines += ["", *summary_lines(result)]
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
        "conformance": result.conformance(),
        "tiers": {"storage_only": result.tier_cases("storage"), "semantic": result.tier_cases("semantic")},
        "cases": [
            {"id": r.case_id, "operation": r.operation, "dtype": r.dtype, "status": r.status, "seconds": round(r.seconds, 6),
             "error_over_bound": _finite(r.ratio), "ulps": r.ulps, "detail": r.detail, "verdict": r.verdict,
             "expected_refusal": r.refusal,
             "tiers": {tier: {"ok": ok, "error_over_bound": _finite(ratio)} for tier, (ok, ratio) in r.tiers.items()},
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
                       failures=str(counts["fail"]), errors=str(counts["error"] + counts["timeout"]), skipped=str(counts["skip"]),
                       time=f"{sum(r.seconds for r in result.results):.6f}")
    properties = ET.SubElement(suite, "properties")
    for key, value in (("compute", result.compute), ("layout", result.layout), ("conformance", result.conformance()),
                       ("storage_only", " ".join(result.tier_cases("storage"))), ("semantic", " ".join(result.tier_cases("semantic")))):
        ET.SubElement(properties, "property", name=key, value=value)
    for r in result.results:
        group, _, name = r.case_id.partition("/")
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{group}", name=name, time=f"{r.seconds:.6f}")
        ET.SubElement(case, "properties")
        for key, value in (("operation", r.operation), ("dtype", r.dtype), ("error_over_bound", _ratio(r.ratio)),
                           ("ulps", "-" if r.ulps is None else str(r.ulps)), ("verdict", r.verdict or "-"),
                           ("float32_tier", _tier(r, "float32")), ("storage_tier", _tier(r, "storage"))):
            ET.SubElement(case.find("properties"), "property", name=key, value=value)
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.detail[:500]).text = r.detail
        elif r.status in ("error", "timeout"):
            ET.SubElement(case, "error", message=r.detail[:500]).text = r.detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.detail[:500])
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"
