"""An implementation outside Python: examples/c_impl/lora_impl.c, built with the system C
compiler, passes every Linear forward/merge/unmerge case through the subprocess protocol
(one process per case, and persistent), and skips what it does not implement."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lora_ref.cli.conformance_cmd import DEFAULT_SUITE
from lora_ref.conformance.runner import Selection, SubprocessDriver, run_suite

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "c_impl" / "lora_impl.c"
SUPPORTED = ("linear.forward", "linear.merge", "linear.unmerge")


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    out = tmp_path_factory.mktemp("c_impl") / "lora_impl"
    build = subprocess.run([compiler, "-O2", "-std=c99", "-Wall", "-Wextra", "-o", str(out), str(SOURCE), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    return str(out)


def test_c_program_passes_linear_cases_one_process_per_case(binary):
    result = run_suite(DEFAULT_SUITE, SubprocessDriver([binary]), selection=Selection(operations=SUPPORTED), timeout=30)
    assert len(result.results) >= 40
    assert [(r.case_id, r.status, r.detail) for r in result.results if r.status != "pass"] == []


def test_c_program_persistent_mode_passes_supported_and_skips_the_rest(binary):
    result = run_suite(DEFAULT_SUITE, SubprocessDriver([binary], persistent=True), timeout=30)
    for r in result.results:
        if r.operation in SUPPORTED:
            assert r.status == "pass", (r.case_id, r.detail)
        else:
            assert r.status == "skip" and "unsupported operation" in r.detail, (r.case_id, r.status, r.detail)
    assert result.ok
