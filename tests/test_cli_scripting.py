"""Issue 15 part 3: a CLI scripts can rely on (one-line refusals, --json reports, --overwrite, examples, progress)."""

from __future__ import annotations

import subprocess
import sys

import pytest

REFERENCE = "lora_ref.conformance.reference_impl:factory"


def lora_ref_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("how", [["--impl", REFERENCE], ["--cmd", "true"]])
def test_conformance_filters_matching_nothing_exit_2_with_one_line(how: list[str]) -> None:
    done = lora_ref_cli("conformance", "run", *how, "-k", "no-such-case-id-anywhere")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no case matches" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("program", ["lora-ref-no-such-program-xyz", "./not-here.sh"])
def test_conformance_cmd_naming_no_program_exits_2_with_one_line(program: str, tmp_path) -> None:
    done = lora_ref_cli("conformance", "run", "--cmd", f"{program} --flag", "--op", "linear.forward", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and program in done.stderr and "ERROR" not in done.stdout + done.stderr
