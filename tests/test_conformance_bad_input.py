"""Bad input never stops a run: malformed case directories and misbehaving implementations
(wrong shapes or dtypes, exceptions, crashes, hangs, no output) become per-case errors with a
reason, and the next case still runs (issue 6, "Bad input")."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time

import numpy as np
import pytest

from lora_ref.cli.conformance_cmd import DEFAULT_SUITE
from lora_ref.conformance.casefile import CaseFormatError, read_manifest
from lora_ref.conformance.reference_impl import factory
from lora_ref.conformance.runner import InProcessDriver, Selection, SubprocessDriver, run_suite
from lora_ref.conformance import Refusal
from lora_ref.errors import ConfigError, LoraRefError

#: Per-case timeout of the subprocess tests: long enough for a Python start-up on a loaded shared machine (an
#: import of lora_ref takes 2.6 s there), short enough that the hanging cases end quickly.
HANG = 15
CASES = ["linear/forward-r1-float32", "linear/merge-basic-float16", "linear/forward-basic-bfloat16"]


def copy_suite(tmp_path, case_ids):
    """A copy of some frozen cases with their own manifest."""
    suite = tmp_path / "suite"
    entries = []
    for case_id in case_ids:
        shutil.copytree(DEFAULT_SUITE / "cases" / case_id, suite / "cases" / case_id)
        data = json.loads((suite / "cases" / case_id / "case.json").read_text())
        entries.append({"id": case_id, "operation": data["operation"], "dtype": data["dtype"]})
    (suite / "manifest.json").write_text(json.dumps({"suite_version": "test", "cases": entries}))
    return suite


@pytest.fixture
def small_suite(tmp_path):
    """Three ordinary cases."""
    return copy_suite(tmp_path, CASES)


def _edit(directory, change):
    data = json.loads((directory / "case.json").read_text())
    change(data)
    (directory / "case.json").write_text(json.dumps(data))


def _statuses(result):
    return {r.case_id: (r.status, r.detail) for r in result.results}


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "case.json").unlink(), "case.json: missing"),
    (lambda d: (d / "case.json").write_text("{not json"), "invalid JSON"),
    (lambda d: (d / "case.json").write_text("[]"), "must be a JSON object"),
    (lambda d: (d / "inputs.safetensors").unlink(), "no such file"),
    (lambda d: (d / "expected.safetensors").write_bytes((d / "expected.safetensors").read_bytes()[:40]), "not a valid safetensors"),
    (lambda d: _edit(d, lambda c: c["inputs"]["x"].update(dtype="float16")), "case.json says float16"),
    (lambda d: _edit(d, lambda c: c["outputs"]["y"].update(K=0)), "K must be a positive integer"),
    (lambda d: _edit(d, lambda c: c.pop("operation")), "field 'operation' is missing"),
    (lambda d: (d / "case.json").write_text((d / "case.json").read_text().replace('"dtype": "float32"', '"dtype": "int8"', 1)), "dtype"),
    (lambda d: shutil.rmtree(d), "missing"),
])
def test_malformed_case_directory_is_an_error_and_the_run_continues(small_suite, damage, reason):
    damage(small_suite / "cases" / CASES[0])
    statuses = _statuses(run_suite(small_suite, InProcessDriver(factory())))
    status, detail = statuses[CASES[0]]
    assert status == "error" and reason in detail, detail
    assert statuses[CASES[1]][0] == statuses[CASES[2]][0] == "pass"


def test_malformed_manifest_is_a_user_error(small_suite):
    (small_suite / "manifest.json").write_text('{"cases": [{"id": "../../etc", "operation": "x", "dtype": "float32"}]}')
    with pytest.raises(CaseFormatError, match="must be '<group>/<name>'"):
        read_manifest(small_suite)
    (small_suite / "manifest.json").unlink()
    with pytest.raises(LoraRefError, match="no manifest"):
        run_suite(small_suite, InProcessDriver(factory()))


class Misbehaving:
    """Misbehaves on the first case only; correct afterwards (so 'the run continues' is visible)."""

    def __init__(self, how):
        self.how, self.calls, self.reference = how, 0, factory()

    def run(self, op, params, inputs):
        self.calls += 1
        if self.calls > 1:
            return self.reference.run(op, params, inputs)
        good = self.reference.run(op, params, inputs)
        name = next(iter(good))
        if self.how == "wrong_dtype":
            return {name: good[name].astype(np.float64)}
        if self.how == "wrong_shape":
            return {name: good[name].reshape(-1)}
        if self.how == "missing":
            return {"something_else": good[name]}
        if self.how == "not_a_dict":
            return [good[name]]
        if self.how == "list_output":
            return {name: good[name].tolist()}
        if self.how == "raises":
            raise ZeroDivisionError("oops")
        if self.how == "hangs":
            time.sleep(30)
        raise AssertionError(self.how)


@pytest.mark.parametrize("how, reason", [
    ("wrong_dtype", "has dtype float64, expected float32"),
    ("wrong_shape", "has shape"),
    ("missing", "no output 'y'"),
    ("not_a_dict", "expected a dict"),
    ("list_output", "not a numpy array"),
    ("raises", "raised ZeroDivisionError: oops"),
    ("hangs", "timed out after 0.5 s"),
])
def test_misbehaving_in_process_implementation(small_suite, how, reason):
    started = time.monotonic()
    statuses = _statuses(run_suite(small_suite, InProcessDriver(Misbehaving(how)), timeout=0.5))
    status, detail = statuses[CASES[0]]
    assert status == ("timeout" if how == "hangs" else "error") and reason in detail, detail
    assert statuses[CASES[1]][0] == statuses[CASES[2]][0] == "pass"
    assert time.monotonic() - started < 20  # the hang was cut short, not waited out


def test_not_implemented_is_skipped(small_suite):
    class MergeOnly:
        def run(self, op, params, inputs):
            if op != "linear.merge":
                raise NotImplementedError(f"{op} not supported")
            return factory().run(op, params, inputs)

    result = run_suite(small_suite, InProcessDriver(MergeOnly()))
    assert result.counts() == {"pass": 1, "fail": 0, "skip": 2, "error": 0, "timeout": 0} and result.ok


def _script(tmp_path, body):
    """A subprocess implementation: misbehaves on its first case (marker file), then runs the reference."""
    path = tmp_path / "impl.py"
    path.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from lora_ref.conformance.bridge import main
        marker = Path({str(tmp_path / 'marker')!r})
        first = not marker.exists()
        marker.touch()
        if first and sys.argv[1] == "run":
        {textwrap.indent(textwrap.dedent(body), '    ')}
        sys.exit(main(["lora_ref.conformance.reference_impl:factory", *sys.argv[1:]]))
    """))
    return [sys.executable, str(path)]


@pytest.mark.parametrize("body, status, reason", [
    ("sys.exit(3)", "error", "refused a case that has a result: exit status 3"),
    ("sys.exit(4)", "error", "exit status 4"),
    ("os.abort()", "error", "exit status -6"),
    ("time.sleep(60)", "timeout", "timed out after 15 s (process killed)"),
    ("sys.exit(0)", "error", "wrote no outputs.safetensors"),
    ("Path(sys.argv[3], 'outputs.safetensors').write_bytes(b'garbage'); sys.exit(0)", "error", "malformed outputs"),
    ("print('no such op', file=sys.stderr); sys.exit(77)", "skip", "no such op"),
])
def test_misbehaving_subprocess_implementation(small_suite, tmp_path, body, status, reason):
    statuses = _statuses(run_suite(small_suite, SubprocessDriver(_script(tmp_path, body)), timeout=HANG))
    got_status, detail = statuses[CASES[0]]
    assert got_status == status and reason in detail, detail
    assert statuses[CASES[1]][0] == statuses[CASES[2]][0] == "pass"


def test_missing_command_is_refused_once_before_any_case():
    with pytest.raises(ConfigError, match="not an executable program"):
        SubprocessDriver(["/nonexistent/impl"])


def _server(tmp_path, first_reply):
    path = tmp_path / "server.py"
    path.write_text(textwrap.dedent(f"""
        import sys, time
        from lora_ref.conformance.bridge import run_case_dir
        from lora_ref.conformance.reference_impl import factory
        from pathlib import Path
        impl, first = factory(), True
        marker = Path({str(tmp_path / 'marker')!r})
        for line in sys.stdin:
            _, case_dir, out_dir = line.split()
            if not marker.exists():
                marker.touch()
                {first_reply}
            run_case_dir(impl, Path(case_dir), Path(out_dir))
            print("ok", flush=True)
    """))
    return [sys.executable, str(path)]


@pytest.mark.parametrize("first_reply, status, reason", [
    ("sys.exit(5)", "error", "exited (status 5)"),
    ("time.sleep(60)", "timeout", "timed out after 15 s"),
    ("print('unsupported dtype', flush=True); continue", "skip", "dtype"),
    ("print('error bad input', flush=True); continue", "error", "bad input"),
    ("print('hello', flush=True); continue", "error", "unexpected reply"),
])
def test_misbehaving_persistent_server_is_restarted(small_suite, tmp_path, first_reply, status, reason):
    driver = SubprocessDriver(_server(tmp_path, first_reply), persistent=True)
    statuses = _statuses(run_suite(small_suite, driver, timeout=HANG, selection=Selection()))
    got_status, detail = statuses[CASES[0]]
    assert got_status == status and reason in detail, detail
    assert statuses[CASES[1]][0] == statuses[CASES[2]][0] == "pass"


# -- product outputs (combine.svd): the runner forms B̂Â from the returned factors --------------------
SVD_CASE = "combine/svd-truncated-float32"


@pytest.fixture
def svd_suite(tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE / "cases" / SVD_CASE, suite / "cases" / SVD_CASE)
    (suite / "manifest.json").write_text(json.dumps({"suite_version": "test", "cases": [
        {"id": SVD_CASE, "operation": "combine.svd", "dtype": "float32"}]}))
    return suite


class _Factors:
    """Returns the reference's factors, transformed by ``change``."""

    def __init__(self, change):
        self.change, self.reference = change, factory()

    def run(self, op, params, inputs):
        return self.change(self.reference.run(op, params, inputs))


@pytest.mark.parametrize("change, status, reason", [
    (lambda o: {"A": -o["A"], "B": -o["B"]}, "pass", ""),  # a sign flip per component leaves B A unchanged
    (lambda o: {"A": o["A"][:2], "B": o["B"][:, :2]}, "error", "output 'A' has shape"),
    (lambda o: {"A": o["A"], "B": o["B"][:, ::-1].copy()}, "fail", "BA["),  # components paired wrongly
    (lambda o: {"A": o["A"]}, "error", "no output 'B'"),
])
def test_product_output_is_formed_from_the_factors(svd_suite, change, status, reason):
    result = run_suite(svd_suite, InProcessDriver(_Factors(change)), timeout=0)
    got_status, detail = _statuses(result)[SVD_CASE]
    assert got_status == status and reason in detail, (got_status, detail)


def test_product_naming_a_non_factor_output_is_a_case_format_error(svd_suite):
    _edit(svd_suite / "cases" / SVD_CASE, lambda c: c["outputs"]["BA"].update(factors=["B", "BA"]))
    status, detail = _statuses(run_suite(svd_suite, InProcessDriver(factory()), timeout=0))[SVD_CASE]
    assert status == "error" and "factors must name two outputs" in detail


REFUSAL_CASES = ["refusal/embedding-id_negative-float32", "refusal/merge-nan_factor-float32", "linear/forward-r1-float32"]


@pytest.fixture
def refusal_suite(tmp_path):
    """Two expected-refusal cases and one ordinary case."""
    return copy_suite(tmp_path, REFUSAL_CASES)


class Wrapping:
    """Computes without checking: NumPy wraps id -1 to the last row and merges a NaN factor."""

    def run(self, op, params, inputs):
        s = params["scale"]
        if op == "embedding.forward":
            W, A, B = (inputs[k].astype(np.float64) for k in ("W", "A", "B"))
            return {"y": (W[inputs["ids"]] + s * A.T[inputs["ids"]] @ B.T).astype(inputs["W"].dtype)}
        if op == "linear.merge":
            W, A, B = (inputs[k].astype(np.float64) for k in ("W", "A", "B"))
            return {"W_merged": (W + s * B @ A).astype(inputs["W"].dtype)}
        return factory().run(op, params, inputs)


class RefusesEverything:
    def __init__(self, error):
        self.error = error

    def run(self, op, params, inputs):
        raise self.error


@pytest.mark.parametrize("impl, expected", [
    (Wrapping(), {"refusal/embedding-id_negative-float32": "fail", "refusal/merge-nan_factor-float32": "fail",
                  "linear/forward-r1-float32": "pass"}),
    (factory(), dict.fromkeys(REFUSAL_CASES, "pass")),
    (RefusesEverything(Refusal("no")), {**dict.fromkeys(REFUSAL_CASES[:2], "pass"), REFUSAL_CASES[2]: "error"}),
    (RefusesEverything(IndexError("index 9 is out of bounds")), {**dict.fromkeys(REFUSAL_CASES[:2], "pass"), REFUSAL_CASES[2]: "error"}),
    (RefusesEverything(RuntimeError("crash")), dict.fromkeys(REFUSAL_CASES, "error")),  # a crash is not a typed refusal
])
def test_expected_refusals_in_process(refusal_suite, impl, expected):
    result = run_suite(refusal_suite, InProcessDriver(impl), timeout=0)
    assert {r.case_id: r.status for r in result.results} == expected, [(r.case_id, r.detail) for r in result.results]
    for r in result.results:
        if r.status == "fail":
            assert "where a refusal was expected" in r.detail and r.verdict == "semantic"
        if r.case_id == REFUSAL_CASES[2] and r.status == "error":
            assert "refused a case that has a result" in r.detail or "crash" in r.detail


def test_expected_refusals_through_the_subprocess_protocols(refusal_suite):
    """The bridge maps a refusal to exit status 3 (one process per case) and to a ``refused`` line (persistent)."""
    command = [sys.executable, "-m", "lora_ref.conformance.bridge", "lora_ref.conformance.reference_impl:factory"]
    for persistent in (False, True):
        result = run_suite(refusal_suite, SubprocessDriver(command, persistent=persistent), timeout=60)
        assert [r.status for r in result.results] == ["pass"] * 3, [(r.case_id, r.detail) for r in result.results]
        assert all(("exit status 3" if not persistent else "EmbeddingIndexError") in r.detail
                   for r in result.results[:1]), result.results[0].detail


def test_cli_prints_progress_per_case_and_both_tiers(refusal_suite, capsys):
    from lora_ref.cli import main

    assert main(["conformance", "run", "--impl", "lora_ref.conformance.reference_impl:factory", "--suite", str(refusal_suite)]) == 0
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.err.splitlines() if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "two tiers: 3 within the float32 bound" in captured.out and "CONFORMANT" in captured.out
