"""Nothing lost: atomic outputs, SIGKILL mid-write, and ``--in-place`` as the only way to overwrite.

The interruption tests run ``lora-ref`` in a subprocess whose SafetensorsWriter pauses after its
k-th tensor (the temporary file half written; writes are unbuffered) or just after an in-place verification;
the test then kills it with SIGKILL, the one signal no cleanup handler can catch, and checks
that the file at the target name is byte-identical to what was there before, and that whatever
was left behind is a hidden ``.partial`` temporary, never a file at the target name.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_peer
from corpus.make_corpus import FIXTURES, write_fixtures
from lora_ref.cli import EXIT_OK, EXIT_USER_ERROR, main
from lora_ref.cli import merge_cmd
from lora_ref.safetensors_io import load_file

#: Run the CLI, pausing (so the parent can SIGKILL it) after the k-th tensor any writer writes (a run
#: of small tensors written at once counts each),
#: or after a successful in-place verification when k is "verified".
HOOKED_CLI = r"""
import filecmp, sys, time
from pathlib import Path
import lora_ref.safetensors_io as sio
kill_at, ready = sys.argv[1], Path(sys.argv[2])
calls = [0]

def pause():
    ready.write_text("paused")
    time.sleep(300)

def hooked(method, tensors=lambda args: 1):
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        before, calls[0] = calls[0], calls[0] + tensors(args)
        if kill_at.isdigit() and before < int(kill_at) <= calls[0]:
            pause()
        return result
    return wrapper

sio.SafetensorsWriter.write = hooked(sio.SafetensorsWriter.write)
sio.SafetensorsWriter.reserve = hooked(sio.SafetensorsWriter.reserve)
sio.SafetensorsWriter.write_run = hooked(sio.SafetensorsWriter.write_run, lambda args: len(args[0]))  # a run of tensors
compare = filecmp.cmp
def compare_then_pause(*args, **kwargs):
    same = compare(*args, **kwargs)
    if same and kill_at == "verified":
        pause()
    return same
filecmp.cmp = compare_then_pause
from lora_ref.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    write_fixtures(tmp_path)
    shutil.copy(tmp_path / FIXTURES / "base.safetensors", tmp_path / "base.safetensors")
    return tmp_path


def _kill_midway(cwd: Path, kill_at: str, args: list[str]) -> None:
    """Start the hooked CLI, wait until it pauses at ``kill_at``, SIGKILL it."""
    ready = cwd / "paused.flag"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_CLI, kill_at, str(ready), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the command finished before pause point {kill_at}: rc={proc.returncode} {err.decode()}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ready.unlink(missing_ok=True)


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("kill_at", ["1", "2", "4"])
def test_killed_merge_keeps_old_output(work: Path, kill_at: str) -> None:
    """SIGKILL while the merged file is half written: the previous output survives byte for byte."""
    old = b"previous merged model, must survive"
    (work / "merged.safetensors").write_bytes(old)
    _kill_midway(work, kill_at, ["merge", "base.safetensors", f"{FIXTURES}/adapter", "-o", "merged.safetensors", "--overwrite"])
    assert (work / "merged.safetensors").read_bytes() == old
    left = _leftovers(work, {FIXTURES, "base.safetensors", "merged.safetensors"})
    assert left and all(n.startswith(".merged.safetensors.") and n.endswith(".partial") for n in left), left
    assert sum((work / n).stat().st_size for n in left) > 0  # it really was killed mid-write
    # and a rerun completes despite the stale temporary
    assert main(["merge", str(work / "base.safetensors"), str(work / FIXTURES / "adapter"),
                 "-o", str(work / "merged.safetensors"), "--overwrite"]) == EXIT_OK
    # the same tensors as the fixture's (exact) merge; the headers differ in the merge record's mode
    got, want = load_file(work / "merged.safetensors"), load_file(work / FIXTURES / "merged.safetensors")
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in got)


# writer calls of merge --in-place on the fixture: 1-4 merged tensors, 5-8 residual arrays,
# 9-12 the verification unmerge; "verified": after the check, before the rename
@pytest.mark.parametrize("kill_at", ["1", "3", "6", "10", "verified"])
def test_killed_in_place_merge_keeps_base(work: Path, kill_at: str) -> None:
    original = (work / "base.safetensors").read_bytes()
    _kill_midway(work, kill_at, ["merge", "base.safetensors", f"{FIXTURES}/adapter", "--in-place",
                                 "--residual", "residual.safetensors", "--overwrite"])
    assert (work / "base.safetensors").read_bytes() == original
    left = _leftovers(work, {FIXTURES, "base.safetensors", "residual.safetensors"})
    assert all(n.startswith(".") and n.endswith(".partial") for n in left), left
    # rerunning finishes the job, and the residual then restores the original exactly
    assert main(["merge", str(work / "base.safetensors"), str(work / FIXTURES / "adapter"), "--in-place",
                 "--residual", str(work / "residual.safetensors"), "--overwrite"]) == EXIT_OK
    assert (work / "base.safetensors").read_bytes() != original
    assert main(["unmerge", str(work / "base.safetensors"), str(work / FIXTURES / "adapter"),
                 "-o", str(work / "restored.safetensors"), "--residual", str(work / "residual.safetensors")]) == EXIT_OK
    assert (work / "restored.safetensors").read_bytes() == original


@pytest.mark.parametrize("kill_at", ["2", "verified"])
def test_killed_in_place_unmerge_keeps_merged(work: Path, kill_at: str) -> None:
    shutil.copy(work / FIXTURES / "merged.safetensors", work / "merged.safetensors")
    merged = (work / "merged.safetensors").read_bytes()
    _kill_midway(work, kill_at, ["unmerge", "merged.safetensors", f"{FIXTURES}/adapter", "--in-place",
                                 "--residual", f"{FIXTURES}/residual.safetensors"])
    assert (work / "merged.safetensors").read_bytes() == merged


def test_in_place_round_trip_exact_and_mode_kept(work: Path) -> None:
    base = work / "base.safetensors"
    original = base.read_bytes()
    os.chmod(base, 0o640)
    args = [str(base), str(work / FIXTURES / "adapter")]
    assert main(["merge", *args, "--in-place", "--residual", str(work / "r.safetensors")]) == EXIT_OK
    assert base.read_bytes() == (work / FIXTURES / "merged.safetensors").read_bytes()
    assert main(["unmerge", *args, "--in-place", "--residual", str(work / "r.safetensors")]) == EXIT_OK
    assert base.read_bytes() == original
    assert stat.S_IMODE(base.stat().st_mode) == 0o640
    assert _leftovers(work, {FIXTURES, "base.safetensors", "r.safetensors"}) == []


def _refused(argv: list[str], capsys: pytest.CaptureFixture, protected: list[Path]) -> str:
    before = [p.read_bytes() for p in protected]
    assert main(argv) == EXIT_USER_ERROR
    assert [p.read_bytes() for p in protected] == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-ref: error: ")
    return err[0]


def test_outputs_never_overwrite_inputs_without_in_place(work: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = work / "base.safetensors", work / FIXTURES / "adapter"
    weights = adapter / "adapter_model.safetensors"
    os.link(base, work / "hardlink.safetensors")  # the same file under another name
    for output in (base, work / "hardlink.safetensors", weights, adapter / "adapter_config.json"):
        assert "would overwrite" in _refused(["merge", str(base), str(adapter), "-o", str(output)], capsys, [base, weights])
    assert "would overwrite" in _refused(["merge", str(base), str(adapter), "-o", str(work / "m.safetensors"),
                                          "--residual", str(base)], capsys, [base])
    assert "same file" in _refused(["merge", str(base), str(adapter), "-o", str(work / "m.safetensors"),
                                    "--residual", str(work / "m.safetensors")], capsys, [base])
    assert "needs --residual" in _refused(["merge", str(base), str(adapter), "--in-place"], capsys, [base])
    assert "--dtype" in _refused(["merge", str(base), str(adapter), "--in-place", "--residual", str(work / "r"),
                                  "--dtype", "bfloat16"], capsys, [base])
    merged, residual = work / FIXTURES / "merged.safetensors", work / FIXTURES / "residual.safetensors"
    for output in (merged, residual):
        _refused(["unmerge", str(merged), str(adapter), "-o", str(output), "--residual", str(residual)],
                 capsys, [merged, residual])
    assert not (work / "m.safetensors").exists()


def test_in_place_refuses_when_not_verifiable(work: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = work / "base.safetensors", work / FIXTURES / "adapter"
    # a fast unmerge of something never merged does not round-trip bit for bit: refused
    assert "left unchanged" in _refused(["unmerge", str(base), str(adapter), "--in-place"], capsys, [base])
    # a residual that fails to restore (simulated by a corrupting unmerge) stops merge --in-place
    real_unmerge = merge_cmd.unmerge_checkpoint

    def corrupting_unmerge(merged, adapter_, out, **kwargs):
        real_unmerge(merged, adapter_, out, **kwargs)
        data = bytearray(Path(out).read_bytes())
        data[-1] ^= 1
        Path(out).write_bytes(bytes(data))

    monkeypatch.setattr(merge_cmd, "unmerge_checkpoint", corrupting_unmerge)
    assert "does not restore" in _refused(["merge", str(base), str(adapter), "--in-place",
                                           "--residual", str(work / "r.safetensors")], capsys, [base])
    assert _leftovers(work, {FIXTURES, "base.safetensors", "r.safetensors"}) == []


@pytest.mark.parametrize("command", ["combine", "export"])
def test_other_commands_never_overwrite_inputs(work: Path, command: str) -> None:
    """The same rule for every command that writes: -o may not name one of its inputs."""
    adapter = work / FIXTURES / "adapter"
    if command == "combine":
        target, argv = adapter / "adapter_model.safetensors", ["combine", str(adapter), str(adapter), "--method", "cat",
                                                               "-o", str(adapter)]
    else:
        require_peer("onnx")
        from corpus.make_corpus import fixture_graph

        target = work / "model.onnx"
        target.write_bytes(fixture_graph().SerializeToString())
        argv = ["export", str(target), str(adapter), "--mode", "merged", "-o", str(target)]
    before = target.read_bytes()
    main(argv)
    assert target.read_bytes() == before
