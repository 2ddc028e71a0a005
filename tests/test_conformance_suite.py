"""The conformance suite itself: frozen cases reproduce, the reference passes through both
protocols, the bound is sound for correct rounding and tight against one wrong ulp, and the CLI."""

from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.cli import main
from lora_ref.cli.conformance_cmd import DEFAULT_SUITE
from lora_ref.conformance import SUITE_VERSION
from lora_ref.conformance.bounds import check_bounded, tolerance, ulp_at
from lora_ref.conformance.casefile import read_manifest
from lora_ref.conformance.catalog import all_cases
from lora_ref.conformance.exact import Dyadic, sqrt_fraction, to_float64
from lora_ref.conformance.generator import compare_suites, generate
from lora_ref.conformance.layouts import Layout
from lora_ref.conformance.operations import OPERATIONS
from lora_ref.conformance.reference_impl import OPERATIONS as REFERENCE_OPERATIONS
from lora_ref.conformance.reference_impl import factory
from lora_ref.conformance.runner import InProcessDriver, Selection, SubprocessDriver, run_suite
from lora_ref.dtypes import STORAGE_DTYPES, round_to

BRIDGE = [sys.executable, "-m", "lora_ref.conformance.bridge", "lora_ref.conformance.reference_impl:factory"]


def _not_passed(result):
    return [(r.case_id, r.status, r.detail) for r in result.results if r.status != "pass"]


# -- frozen cases ---------------------------------------------------------------------------------
def test_regenerating_reproduces_every_frozen_file_bit_for_bit(tmp_path):
    generate(tmp_path)
    assert compare_suites(DEFAULT_SUITE, tmp_path) == []


def test_compare_sees_a_moved_vector_and_a_missing_case(tmp_path):
    frozen = tmp_path / "frozen"
    shutil.copytree(DEFAULT_SUITE / "cases", frozen / "cases")
    shutil.copy(DEFAULT_SUITE / "manifest.json", frozen / "manifest.json")
    expected = frozen / "cases" / "linear" / "merge-basic-float32" / "expected.safetensors"
    data = bytearray(expected.read_bytes())
    data[-1] ^= 1  # one bit of one float64 oracle value
    expected.write_bytes(bytes(data))
    shutil.rmtree(frozen / "cases" / "linear" / "forward-r1-float32")
    problems = compare_suites(frozen, DEFAULT_SUITE)
    assert any("differs" in p and "merge-basic-float32" in p for p in problems)
    assert any("missing" in p and "forward-r1-float32" in p for p in problems)


def test_suite_is_small_and_covers_every_operation_and_dtype():
    version, entries = read_manifest(DEFAULT_SUITE)
    assert version == SUITE_VERSION
    assert {e.operation for e in entries} == set(OPERATIONS) == set(REFERENCE_OPERATIONS)
    assert {e.dtype for e in entries} == set(STORAGE_DTYPES)
    for operation in OPERATIONS:  # every operation in more than one dtype
        assert len({e.dtype for e in entries if e.operation == operation}) >= 2, operation
    size = sum(p.stat().st_size for p in (DEFAULT_SUITE / "cases").rglob("*") if p.is_file())
    assert size < 5_000_000
    specs = {s.case_id: s for s in all_cases()}
    assert any(s.params.get("use_rslora") for s in specs.values())
    assert any(s.params.get("fan_in_fan_out") for s in specs.values())
    assert any(s.params.get("lora_alpha") != s.params.get("r") for s in specs.values() if "r" in s.params)
    assert any(s.inputs.get("x", ((1,),))[0][0] == 0 for s in specs.values())  # empty batch
    assert any(s.params.get("r") == 1 for s in specs.values())


def test_covering_cases_hold_every_valid_pair_of_every_family():
    """Independent of the greedy construction: enumerate every valid pair and find it in the built cases."""
    from itertools import combinations

    from lora_ref.conformance.catalog import COVERAGE
    from lora_ref.conformance.coverage import covered_pairs

    for family in COVERAGE:
        rows = family.rows()
        assert all(family.valid(row) for row in rows), family.name
        wanted = {((a.name, va), (b.name, vb)) for a, b in combinations(family.dimensions, 2) for va in a.values for vb in b.values
                  if family.valid({a.name: va, b.name: vb})}
        assert wanted <= covered_pairs(rows, family.dimensions), (family.name, sorted(wanted - covered_pairs(rows, family.dimensions)))
        built = [spec for spec in all_cases() if spec.family == family.name]
        assert len(built) == len(rows) and all(spec.operation in family.operations for spec in built), family.name


def test_spec_coverage_table_is_generated_from_the_catalog():
    from lora_ref.conformance.coverage_doc import main as coverage_doc

    assert coverage_doc(["--check"]) == 0, "run: python -m lora_ref.conformance.coverage_doc"


def test_case_seeds_depend_on_the_case_id_only():
    """A case's vectors do not move when cases are added or reordered: its seed is a hash of its id."""
    import dataclasses
    import hashlib

    specs = all_cases()
    for spec in specs[:: max(1, len(specs) // 25)]:
        case = json.loads((DEFAULT_SUITE / "cases" / spec.case_id / "case.json").read_text())
        assert case["seed"] == int.from_bytes(hashlib.blake2b(spec.case_id.encode(), digest_size=8).digest(), "little")
    moved = dataclasses.replace(specs[0], description="another position, another description")
    assert all(np.array_equal(a, b) for a, b in zip(moved.make_inputs().values(), specs[0].make_inputs().values()))


def test_rank_past_and_non_exact_scales_are_what_the_table_says():
    from fractions import Fraction

    from lora_ref.conformance.catalog import rank_past, scale_params

    for limit in range(1, 40):
        r = rank_past(limit)
        assert r > limit and r & (r - 1) and int(r**0.5) ** 2 != r
        alpha, _ = scale_params("non_dyadic", r)
        s = Fraction(alpha) / r
        assert s.denominator & (s.denominator - 1)  # not a power of two: s is not dyadic


# -- the exact oracle -----------------------------------------------------------------------------
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8))
def test_dyadic_dot_is_exact(values):
    a = np.array(values, dtype=np.float32)
    exact = sum((Fraction(float(v)) * Fraction(float(v)) for v in a), Fraction(0))
    got = (Dyadic.of(a.reshape(1, -1)) @ Dyadic.of(a.reshape(-1, 1))).fractions()[0, 0]
    assert got == exact
    assert to_float64(np.array([got], dtype=object))[0] == float(exact)


@given(st.fractions(min_value=0, max_value=10**6))
def test_sqrt_fraction_is_accurate(value):
    root = sqrt_fraction(value)
    # isqrt truncates the root carrying >= SQRT_BITS = 200 bits: relative error <= 2^-198 in the root, so
    # <= 2^-196 in its square; 2^-190 leaves margin, 2^-400 covers value = 0 exactly (root 0)
    assert abs(root * root - value) <= value * Fraction(1, 2**190) + Fraction(1, 2**400)


# -- the bound --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_ulp_at_matches_spacing(name):
    dtype = STORAGE_DTYPES[name]
    values = round_to(np.array([1.0, 1.5, 3.0, 1e-3, 6e-5, 1e-8, 100.0]), dtype).astype(np.float64)
    reference = np.array([float(round_to(np.array([np.nextafter(v, np.inf)]), np.float64)[0]) for v in values])
    nxt = np.array([float(np.nextafter(np.array(v, dtype=dtype if name != "bfloat16" else np.float32), np.inf)) for v in values])
    if name != "bfloat16":
        assert np.array_equal(ulp_at(values, dtype), nxt - values)
    assert np.all(ulp_at(values, dtype) > reference - values)


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
@given(y=st.floats(-1e4, 1e4, allow_nan=False))
def test_correct_rounding_always_passes_and_the_wrong_neighbour_fails(name, y):
    """tol >= |round_t(y) - y| for every y (even with M = 0), and one ulp further never passes
    when y is exactly representable (the exact-merge-of-a-zero-delta situation)."""
    t = STORAGE_DTYPES[name]
    expected = np.array([y])
    tol = tolerance(expected, np.zeros(1), 1, t, np.dtype(np.float32))
    assert check_bounded("y", round_to(expected, t), expected, tol, t).ok
    representable = round_to(expected, t).astype(np.float64)
    if abs(representable[0]) < 2.0**-100:  # below that the bound's subnormal floor K·η_c may admit one subnormal step
        return
    tol = tolerance(representable, np.zeros(1), 1, t, np.dtype(np.float32))
    neighbour = representable + ulp_at(np.abs(representable), t) * (1 if y >= 0 else -1)
    assert not check_bounded("y", round_to(neighbour, t), representable, tol, t).ok


# -- the reference through both protocols -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["canonical", "peft"])
def test_reference_passes_everything_in_process(layout):
    result = run_suite(DEFAULT_SUITE, InProcessDriver(factory()), layout=layout, timeout=0)
    assert _not_passed(result) == [] and len(result.results) == len(read_manifest(DEFAULT_SUITE)[1])


def test_reference_passes_everything_through_persistent_subprocess():
    result = run_suite(DEFAULT_SUITE, SubprocessDriver(BRIDGE, persistent=True), layout="peft", timeout=60)
    assert _not_passed(result) == [] and len(result.results) == len(read_manifest(DEFAULT_SUITE)[1])


def test_reference_passes_through_one_process_per_case():
    selection = Selection(groups=("linear",), dtypes=("bfloat16",))  # one process per case: a subset keeps it quick
    result = run_suite(DEFAULT_SUITE, SubprocessDriver(BRIDGE), layout="canonical", selection=selection, timeout=60)
    assert _not_passed(result) == [] and len(result.results) >= 10


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_run_list_generate_and_reports(tmp_path, capsys):
    json_path, junit_path = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["conformance", "run", "--impl", "lora_ref.conformance.reference_impl:factory", "--group", "embedding",
                 "--json", str(json_path), "--junit", str(junit_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "embedding/merge-bfloat16" in out and "0 failed" in out
    report = json.loads(json_path.read_text())
    assert report["counts"]["pass"] == len(report["cases"]) > 0
    assert all(c["error_over_bound"] <= 1 and c["ulps"] == 0 for c in report["cases"])
    suite = ET.parse(junit_path).getroot()
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == len(report["cases"])
    assert main(["conformance", "list", "--dtype", "float16", "-k", "merge"]) == 0
    listed = capsys.readouterr().out
    assert "linear/merge-basic-float16" in listed and "bfloat16" not in listed.replace("float16 ", "")
    assert main(["conformance", "generate", "--check"]) == 0


def test_cli_exit_codes_for_failure_and_user_error(tmp_path, capsys):
    module = tmp_path / "broken_impl.py"
    module.write_text("class Impl:\n    def run(self, op, params, inputs):\n        raise RuntimeError('boom')\n\ndef make():\n    return Impl()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["conformance", "run", "--impl", "broken_impl:make", "-k", "forward-r1"]) == 1
    finally:
        sys.path.remove(str(tmp_path))
    assert "raised RuntimeError: boom" in capsys.readouterr().out
    assert main(["conformance", "run", "--impl", "no_such_module_xyz:make"]) == 2
    assert main(["conformance", "run", "--impl", "lora_ref.conformance.reference_impl:factory", "--suite", str(tmp_path)]) == 2
    assert main(["conformance", "run", "--cmd", "true", "--timeout", "0"]) == 2


# -- the suite ships with the package -----------------------------------------------------------------
def test_default_suite_resolves_and_lists_every_case(capsys):
    """Without --suite, ``conformance list`` finds the shipped suite and lists every catalog case."""
    ids = [spec.case_id for spec in all_cases()]
    assert [e.case_id for e in read_manifest(DEFAULT_SUITE)[1]] == ids
    assert main(["conformance", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{len(ids)} cases" in listed and all(case_id in listed for case_id in ids)


def test_default_suite_prefers_the_copy_inside_an_installed_package(tmp_path):
    from lora_ref.conformance.casefile import default_suite

    assert default_suite(tmp_path) == DEFAULT_SUITE  # no suite/ there: the source tree's conformance/
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "manifest.json").write_text("{}")
    assert default_suite(tmp_path) == tmp_path / "suite"  # the wheel's layout: lora_ref/conformance/suite


def test_package_data_globs_cover_every_frozen_file():
    """pyproject's package-data for lora_ref.conformance.suite (mapped onto conformance/) matches every file
    the suite needs, so a wheel carries the cases without a second copy in git."""
    import fnmatch
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "lora_ref.conformance.suite" in config["packages"]
    assert (Path(__file__).resolve().parents[1] / config["package-dir"]["lora_ref.conformance.suite"]).resolve() == DEFAULT_SUITE.resolve()
    patterns = config["package-data"]["lora_ref.conformance.suite"]
    files = [p.relative_to(DEFAULT_SUITE).as_posix() for p in DEFAULT_SUITE.rglob("*") if p.is_file()]
    needed = [f for f in files if f == "manifest.json" or f.startswith("cases/")]
    assert len(needed) == 1 + 3 * len(all_cases())
    # setuptools' '*' does not cross '/', unlike fnmatch's: compare segment counts too
    unmatched = [f for f in needed if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert unmatched == []


class KerasReference:
    """The reference behind the Keras layout: maps Keras tensors back to PEFT's with its own transposes (written
    here from Keras 3's conventions, not with the layout's helpers), runs the reference, maps the outputs to Keras."""

    def run(self, op, params, inputs):
        kind = op.split(".")[0]
        if "lora_rank" not in params:  # not a Keras-mapped kind: passed as canonical
            return factory().run(op, params, inputs)
        p = {**params, "r": params["lora_rank"]}
        d = int(kind[4]) if kind.startswith("conv") else 0
        canon = {}
        for name, a in inputs.items():
            if name in ("kernel", "kernel_merged"):
                target = "W" if name == "kernel" else "W_merged"
                canon[target] = a.T.copy() if kind == "linear" else np.moveaxis(np.moveaxis(a, -1, 0), -1, 1).copy() if d else a
            elif name in ("embeddings", "embeddings_merged"):
                canon["W" if name == "embeddings" else "W_merged"] = a
            elif name.endswith("_a"):
                canon["A"] = np.moveaxis(np.moveaxis(a, -1, 0), -1, 1).copy() if d else a.T.copy()
            elif name.endswith("_b"):
                canon["B"] = a.T.reshape(a.shape[::-1] + (1,) * d).copy() if d else a.T.copy()
            elif name == "bias":
                canon["b"] = a
            elif d and name in ("x", "dy"):
                canon[name] = np.moveaxis(a, -1, 1).copy()
            else:
                canon[name] = a
        out = factory().run(op, p, canon)
        keras = {}
        for name, a in out.items():
            if name in ("W", "W_merged", "W_restored", "dW") and kind == "linear":
                a = a.T.copy()
            elif name in ("W", "W_merged", "W_restored", "dW", "dA") and d:
                a = np.moveaxis(np.moveaxis(a, 0, -1), 0, -2).copy()  # [O, C, *k] -> [*k, C, O]
            elif name == "dB" and d:
                a = a.reshape(a.shape[:2]).T.copy()
            elif name in ("dA", "dB"):
                a = a.T.copy()
            elif name in ("y", "dx") and d:
                a = np.moveaxis(a, 1, -1).copy()
            keras[name] = a
        return keras


def test_keras_layout_round_trips_through_an_independent_mapping():
    """Every case through the Keras layout (channels-last convolutions included) with the reference behind an
    independent Keras -> PEFT mapping: everything passes, so the layout maps each tensor where Keras keeps it."""
    result = run_suite(DEFAULT_SUITE, InProcessDriver(KerasReference()), layout="keras", timeout=0)
    assert [(r.case_id, r.status, r.detail) for r in result.results if r.status != "pass"] == []


class _Transposed(Layout):
    """A user's own mapping: an implementation whose Linear factors are stored transposed (as mlx does)."""

    def to_impl(self, operation, params, inputs):
        return dict(params), {k: (v.T.copy() if k in ("A", "B") and operation.startswith("linear") else v) for k, v in inputs.items()}

    def from_impl(self, operation, params, outputs):
        return {k: (v.T.copy() if k in ("dA", "dB") and operation.startswith("linear") else v) for k, v in outputs.items()}


MY_LAYOUT = _Transposed("transposed", "Linear A, B transposed")


def test_own_layout_hook_module_attribute():
    from lora_ref.conformance.layouts import get_layout
    from lora_ref.errors import ConfigError

    assert get_layout("test_conformance_suite:MY_LAYOUT").name == "transposed"

    class Transposing:
        def run(self, op, params, inputs):
            if op.startswith("linear"):
                inputs = {k: (v.T.copy() if k in ("A", "B") else v) for k, v in inputs.items()}
                out = factory().run(op, params, inputs)
                return {k: (v.T.copy() if k in ("dA", "dB") else v) for k, v in out.items()}
            return factory().run(op, params, inputs)

    result = run_suite(DEFAULT_SUITE, InProcessDriver(Transposing()), layout="test_conformance_suite:MY_LAYOUT",
                       selection=Selection(groups=("linear",)), timeout=0)
    assert result.ok and len(result.results) > 50
    with pytest.raises(ConfigError, match="cannot load layout"):
        get_layout("no_such_module_xyz:LAYOUT")
