"""Case directories on disk: write them, find them, read and validate them (SPEC C.2).

    <suite>/manifest.json                      {"suite_version", "cases": [{"id", "operation", "dtype"}, ...]}
    <suite>/cases/<group>/<name>/case.json     operation, params, dtype, inputs/outputs (dtype, shape, check, K);
                                               ``refusal`` (why) when the expected outcome is a typed refusal
    <suite>/cases/<group>/<name>/inputs.safetensors     inputs in the case dtype, PEFT layout
    <suite>/cases/<group>/<name>/expected.safetensors   bound outputs: <out> (float64 exact) and
                                                        <out>.magnitude (float64 M); bitwise outputs: <out> in t

Everything malformed raises :class:`CaseFormatError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_text_atomic
from ..dtypes import STORAGE_DTYPES, dtype_name
from ..errors import FileFormatError
from ..jsonfile import read_json
from ..safetensors_io import load_file, save_file

CASE_JSON, INPUTS, EXPECTED, OUTPUTS, MANIFEST = "case.json", "inputs.safetensors", "expected.safetensors", "outputs.safetensors", "manifest.json"
CHECKS = ("bound", "bitwise", "factor", "product", "equals")
#: Outputs the implementation returns (a "product" output is formed by the runner from two "factor" outputs).
RETURNED_CHECKS = ("bound", "bitwise", "factor", "equals")


class CaseFormatError(FileFormatError):
    """A case directory or manifest is missing files or holds malformed ones."""


@dataclass(frozen=True)
class Case:
    """A validated case.json; tensors are read on demand."""

    path: Path
    case_id: str
    operation: str
    dtype: str
    params: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    spec: str
    description: str
    #: None: the outputs are checked; a reason: the expected outcome is a typed refusal (SPEC C.4).
    refusal: str | None = None

    def load_inputs(self) -> dict[str, np.ndarray]:
        """inputs.safetensors, checked against the names, dtypes and shapes in case.json."""
        arrays = _load(self.path / INPUTS)
        _check_tensors(self.path / INPUTS, arrays, {name: (spec["dtype"], spec["shape"]) for name, spec in self.inputs.items()})
        return arrays

    def load_expected(self) -> dict[str, np.ndarray]:
        """expected.safetensors, checked against the outputs in case.json."""
        arrays = _load(self.path / EXPECTED)
        wanted = {}
        for name, spec in self.outputs.items():
            if spec["check"] in ("bound", "product"):
                wanted[name] = ("float64", spec["shape"])
                wanted[f"{name}.magnitude"] = ("float64", spec["shape"])
                if spec["check"] == "product" or "slack" in spec:
                    wanted[f"{name}.slack"] = ("float64", spec["shape"])
            elif spec["check"] == "bitwise":
                wanted[name] = (spec["dtype"], spec["shape"])
        _check_tensors(self.path / EXPECTED, arrays, wanted)
        return arrays


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except FileFormatError as exc:
        raise CaseFormatError(str(exc)) from None


def _check_tensors(path: Path, arrays: dict[str, np.ndarray], wanted: dict[str, tuple[str, list[int]]]) -> None:
    missing = sorted(set(wanted) - set(arrays))
    if missing:
        raise CaseFormatError(f"{path}: missing tensors {missing}")
    for name, (dtype, shape) in wanted.items():
        array = arrays[name]
        if dtype_name(array.dtype) != dtype or list(array.shape) != list(shape):
            raise CaseFormatError(f"{path}: tensor {name!r} is {dtype_name(array.dtype)} {list(array.shape)}, case.json says {dtype} {list(shape)}")


def _require(path: Path, data: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data or not isinstance(data[key], kind):
        raise CaseFormatError(f"{path}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return data[key]


def _tensor_specs(path: Path, entries: Any, what: str, *, outputs: bool, refusal: bool = False) -> dict[str, dict[str, Any]]:
    if not isinstance(entries, dict) or not entries and outputs and not refusal:
        raise CaseFormatError(f"{path}: {what!r} must be a non-empty object")
    allowed = set(STORAGE_DTYPES) | (set() if outputs else {"int64"})  # int64: token ids, adapter indices
    for name, spec in entries.items():
        product = outputs and isinstance(spec, dict) and spec.get("check") == "product"
        dtypes = {"float64"} if product else allowed  # a product is formed in float64 by the runner
        if not isinstance(spec, dict) or spec.get("dtype") not in dtypes or not isinstance(spec.get("shape"), list) or not all(
            type(d) is int and d >= 0 for d in spec["shape"]
        ):
            raise CaseFormatError(f"{path}: {what}[{name!r}] needs a dtype in {sorted(dtypes)} and a shape list, got {spec!r}")
        if outputs:
            if spec.get("check") not in CHECKS:
                raise CaseFormatError(f"{path}: outputs[{name!r}].check must be one of {CHECKS}")
            if spec["check"] in ("bound", "product") and not (type(spec.get("K")) is int and spec["K"] > 0):
                raise CaseFormatError(f"{path}: outputs[{name!r}].K must be a positive integer")
            factors = spec.get("factors")
            if product and not (isinstance(factors, list) and len(factors) == 2
                                and all(isinstance(f, str) and entries.get(f, {}).get("check") == "factor" for f in factors)):
                raise CaseFormatError(f"{path}: outputs[{name!r}].factors must name two outputs whose check is 'factor'")
            if spec["check"] == "equals" and not (isinstance(spec.get("output"), str) and spec["output"] != name
                                                  and entries.get(spec["output"], {}).get("check") in ("bound", "bitwise")):
                raise CaseFormatError(f"{path}: outputs[{name!r}].output must name another returned output (bound or bitwise)")
    return entries


def load_case(path: str | Path) -> Case:
    """Read and validate ``<path>/case.json`` (tensor files are checked when loaded)."""
    path = Path(path)
    json_path = path / CASE_JSON
    data = read_json(json_path, error=CaseFormatError, what="case description")
    if not isinstance(data, dict):
        raise CaseFormatError(f"{json_path}: must be a JSON object")
    dtype = _require(json_path, data, "dtype", str)
    if dtype not in STORAGE_DTYPES:
        raise CaseFormatError(f"{json_path}: dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    _require(json_path, data, "bound", dict)
    refusal = data.get("refusal")
    if refusal is not None and not (isinstance(refusal, str) and refusal):
        raise CaseFormatError(f"{json_path}: field 'refusal' must be a non-empty string (why the inputs must be refused)")
    return Case(
        path=path,
        case_id=_require(json_path, data, "id", str),
        operation=_require(json_path, data, "operation", str),
        dtype=dtype,
        params=_require(json_path, data, "params", dict),
        inputs=_tensor_specs(json_path, data.get("inputs"), "inputs", outputs=False),
        outputs=_tensor_specs(json_path, data.get("outputs"), "outputs", outputs=True, refusal=refusal is not None),
        spec=str(data.get("spec", "")),
        description=str(data.get("description", "")),
        refusal=refusal,
    )


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, one space indent, trailing newline), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_case(directory: Path, case_json: dict[str, Any], inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Write one case directory (each file atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(directory / INPUTS, inputs)
    save_file(directory / EXPECTED, expected)
    write_json(directory / CASE_JSON, case_json)


@dataclass(frozen=True)
class ManifestEntry:
    case_id: str
    operation: str
    dtype: str


def read_manifest(suite: str | Path) -> tuple[str, list[ManifestEntry]]:
    """(suite_version, entries) from ``<suite>/manifest.json``."""
    path = Path(suite) / MANIFEST
    if not path.exists():
        raise CaseFormatError(f"{path}: no manifest (is {suite} a conformance suite directory?)")
    data = read_json(path, error=CaseFormatError, what="suite manifest")
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise CaseFormatError(f"{path}: must be an object with a 'cases' list")
    entries = []
    for entry in data["cases"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("id", "operation", "dtype")):
            raise CaseFormatError(f"{path}: malformed entry {entry!r}")
        _check_case_id(path, entry["id"])
        entries.append(ManifestEntry(entry["id"], entry["operation"], entry["dtype"]))
    return str(data.get("suite_version", "")), entries


def default_suite(package_dir: str | Path | None = None) -> Path:
    """Where the frozen suite is: ``suite/`` inside this package in an installed wheel (pyproject maps
    ``lora_ref.conformance.suite`` onto ``conformance/``), else ``conformance/`` of the source tree."""
    packaged = Path(package_dir if package_dir is not None else Path(__file__).resolve().parent) / "suite"
    if (packaged / MANIFEST).is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "conformance"


def _check_case_id(where: object, case_id: str) -> None:
    """A case id is a relative '<group>/<name>' of two plain names (no absolute path, '..', '\\', NUL)."""
    parts = case_id.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts) or case_id.startswith("/"):
        raise CaseFormatError(f"{where}: case id {case_id[:120]!r} must be '<group>/<name>' (two plain names, "
                              "relative to the suite's cases/)")


def case_dir(suite: str | Path, case_id: str) -> Path:
    """Where case ``<group>/<name>`` lives in a suite; one outside ``<suite>/cases`` (a symlink out) is refused."""
    _check_case_id(suite, case_id)
    cases = Path(suite) / "cases"
    directory = cases / case_id
    root = os.path.realpath(cases)
    if not os.path.realpath(directory).startswith(root.rstrip(os.sep) + os.sep):
        raise CaseFormatError(f"{directory}: case {case_id[:120]!r} resolves outside the suite ({os.path.realpath(directory)})")
    return directory
