"""Build the frozen cases from the catalog and the exact oracle, and write the suite (SPEC C.2).

Deterministic end to end: inputs from SplitMix64, expected values from exact arithmetic
rounded once, JSON with sorted keys, safetensors without metadata. Regenerating reproduces
every committed file bit for bit; ``tests/test_conformance_frozen.py`` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import dtype_name
from . import SUITE_VERSION
from .casefile import MANIFEST, case_dir, write_case, write_json
from .catalog import CaseSpec, all_cases
from .operations import OPERATIONS

#: The compute dtype the SPEC requires at least (u_c = 2^-24); recorded in every case.
DEFAULT_COMPUTE_DTYPE = "float32"
BOUND_FORMULA = "tol = E + 0.5*ulp_t(|y| + E), E = gamma_K(u_c)*M + K*eta_c, gamma_K(u) = K*u/(1 - K*u)"


def build_case(spec: CaseSpec) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(case.json content, inputs, expected tensors) for one catalog entry."""
    operation = OPERATIONS[spec.operation]
    inputs = spec.make_inputs()
    results = {} if spec.refusal else operation.oracle(inputs, spec.params)
    outputs: dict[str, Any] = {}
    expected: dict[str, np.ndarray] = {}
    for name, result in results.items():
        entry = {"dtype": spec.dtype, "shape": list(result.value.shape), "check": result.check}
        if result.check in ("bound", "product"):
            entry["K"] = result.depth
            entry["magnitude"] = f"{name}.magnitude"
            expected[name] = result.value
            expected[f"{name}.magnitude"] = result.magnitude
        if result.check == "bound" and result.slack is not None:  # an absolute per-element addition to the tolerance
            entry["slack"] = f"{name}.slack"
            expected[f"{name}.slack"] = result.slack
        elif result.check == "equals":  # bitwise another of the implementation's outputs
            entry["output"] = result.same_as
        if result.check == "product":  # formed by the runner in float64 from two returned factors
            entry.update(dtype="float64", factors=list(result.factors), slack=f"{name}.slack")
            expected[f"{name}.slack"] = result.slack
        elif result.check == "bitwise":
            expected[name] = result.value
        outputs[name] = entry
    case_json = {
        "id": spec.case_id,
        "suite_version": SUITE_VERSION,
        "operation": spec.operation,
        "spec": operation.spec,
        "description": spec.description,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "params": spec.params,
        "inputs": {name: {"dtype": dtype_name(a.dtype), "shape": list(a.shape)} for name, a in inputs.items()},
        "outputs": outputs,
        "bound": {"compute_dtype": DEFAULT_COMPUTE_DTYPE, "formula": BOUND_FORMULA, "spec": "SPEC C.3"},
    }
    if spec.refusal:
        case_json["refusal"] = spec.refusal
    return case_json, inputs, expected


def generate(suite: str | Path, specs: Iterable[CaseSpec] | None = None) -> list[str]:
    """Write ``<suite>/cases/...`` and ``<suite>/manifest.json``; return the case ids written."""
    suite = Path(suite)
    specs = list(all_cases() if specs is None else specs)
    entries = []
    for spec in specs:
        case_json, inputs, expected = build_case(spec)
        write_case(case_dir(suite, spec.case_id), case_json, inputs, expected)
        entries.append({"id": spec.case_id, "operation": spec.operation, "dtype": spec.dtype})
    write_json(suite / MANIFEST, {"suite_version": SUITE_VERSION, "cases": entries})
    return [entry["id"] for entry in entries]


def compare_suites(frozen: str | Path, fresh: str | Path) -> list[str]:
    """Every file that differs (bytes), is missing, or is extra between two suite directories."""
    frozen, fresh = Path(frozen), Path(fresh)

    def files(root: Path) -> set[str]:
        found = {str(p.relative_to(root)) for p in (root / "cases").rglob("*") if p.is_file()} if (root / "cases").is_dir() else set()
        return found | ({MANIFEST} if (root / MANIFEST).is_file() else set())

    old, new = files(frozen), files(fresh)
    problems = [f"missing from {frozen}: {name}" for name in sorted(new - old)]
    problems += [f"not produced by the generator: {frozen / name}" for name in sorted(old - new)]
    problems += [f"differs: {frozen / name}" for name in sorted(old & new) if (frozen / name).read_bytes() != (fresh / name).read_bytes()]
    return problems
