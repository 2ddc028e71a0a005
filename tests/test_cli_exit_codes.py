"""The CLI's exit codes and messages (docs/hardening.md; lora_ref/cli/__init__.py).

0 ok; 1 a check failed (conformance); 2 user error: a LoraRefError or bad arguments, one line on
stderr starting ``lora-ref: error:``; 3 internal error (a bug): one line naming the exception and
``--verbose``. ``--verbose`` adds the traceback; 130 interrupted (Ctrl-C). Real processes are run for each code, so the
console entry point's propagation of the code is tested too; message details are checked
in-process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corpus.make_corpus import write_fixtures
from lora_ref.cli import EXIT_CHECK_FAILED, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, main, merge_cmd


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("cli"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=300)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_process_exit_codes(fx: Path, tmp_path: Path) -> None:
    ok = _run("inspect", str(fx / "adapter"))
    assert ok.returncode == EXIT_OK and "layer.q" in ok.stdout, ok.stderr
    assert _run("--help").returncode == EXIT_OK

    # 1: an implementation that fails every case ('false' exits 1 without writing outputs)
    failed = _run("conformance", "run", "--cmd", "false", "-k", "linear/forward-basic-float32", "--quiet")
    assert failed.returncode == EXIT_CHECK_FAILED, failed.stdout + failed.stderr

    user = _run("merge", str(tmp_path / "missing.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors"))
    assert user.returncode == EXIT_USER_ERROR
    assert _one_line(user.stderr).startswith("lora-ref: error: ") and "missing.safetensors" in user.stderr
    assert not (tmp_path / "m.safetensors").exists()

    # 3: provoke a bug in a real process by breaking a library function the command calls
    crash = subprocess.run([sys.executable, "-c",
                            "import sys; from lora_ref.cli import main, merge_cmd\n"
                            "def broken(*a, **k): raise IndexError('simulated bug')\n"
                            "merge_cmd.merge_checkpoint = broken\n"
                            "sys.exit(main(sys.argv[1:]))",
                            "merge", str(fx / "base.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors")],
                           capture_output=True, text=True, timeout=300)
    assert crash.returncode == EXIT_INTERNAL_ERROR
    line = _one_line(crash.stderr)
    assert "internal error: IndexError: simulated bug" in line and "--verbose" in line


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["merge"], ["merge", "a", "b"],
                                  ["merge", "a", "b", "-o", "x", "--in-place"], ["unmerge", "a", "b", "--dtype", "x"],
                                  ["merge", "a", "b", "-o", "x", "--dtype", "float128"]])
def test_bad_arguments_exit_2_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USER_ERROR
    assert _one_line(capsys.readouterr().err).startswith("lora-ref: error: ")


def test_user_error_verbose_adds_traceback(fx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["merge", str(tmp_path / "missing.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors")]
    assert main(args) == EXIT_USER_ERROR
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet
    assert main(["--verbose", *args]) == EXIT_USER_ERROR
    verbose = capsys.readouterr().err
    assert "Traceback" in verbose and "FileFormatError" in verbose
    assert verbose.strip().splitlines()[-1] == quiet.strip()  # the same one-line message ends it


def test_internal_error_exit_3(fx: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(merge_cmd, "merge_checkpoint", broken)
    args = ["merge", str(fx / "base.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors")]
    assert main(args) == EXIT_INTERNAL_ERROR
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("lora-ref: internal error: ZeroDivisionError: simulated bug") and "--verbose" in line
    assert main(["--verbose", *args]) == EXIT_INTERNAL_ERROR
    assert "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_interrupt_is_reported_on_one_line(fx: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_cmd, "merge_checkpoint", interrupted)
    code = main(["merge", str(fx / "base.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors")])
    assert code == EXIT_INTERRUPTED == 128 + signal.SIGINT
    assert _one_line(capsys.readouterr().err) == "lora-ref: interrupted"


def test_a_newline_in_a_path_keeps_the_message_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    odd = tmp_path / "two\nlines"
    odd.mkdir()
    assert main(["inspect", str(odd)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert _one_line(err).startswith("lora-ref: error: ") and "two\\nlines" in err


def test_success_prints_one_summary_line(fx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["merge", str(fx / "base.safetensors"), str(fx / "adapter"), "-o", str(tmp_path / "m.safetensors"),
                 "--residual", str(tmp_path / "r.safetensors")]) == EXIT_OK
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1 and out.out.startswith("merged 2 tensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (fx / "merged.safetensors").read_bytes()
