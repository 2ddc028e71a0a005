"""Fault injection: a write that fails anywhere leaves only the previous state.

Every byte lora-ref writes goes through :func:`lora_ref.atomic.write_at`. The property: for each
command that writes (merge, exact merge, merge --in-place, fast and exact unmerge, sharded merge
with residuals, combine, export), make the k-th call of that primitive fail with ENOSPC or EIO
(k drawn among the calls a successful run makes, counted first), with or without a previous
output at the target names; then the command exits 2 with one line naming the failure, and the
work folder is byte for byte what it was (previous outputs intact, no temporary, no folder the
command created). Other failure points (creating the temporary, the final rename, a read-only
or unwritable folder) are injected at the system call, since the tests may run as root, for
whom ``chmod`` does not block a write; the real ``chmod`` case runs when not root.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.make_corpus import FIXTURES, HAVE_ONNX, _sharded, scenario_work, write_fixtures
from lora_ref import atomic
from lora_ref.cli import EXIT_OK, EXIT_USER_ERROR, main
from test_corpus import _snapshot

PREVIOUS = b"previous output: must survive a failed write"


def _merge(w: Path) -> tuple[list[str], list[Path]]:
    return ["merge", str(w / "base.safetensors"), str(w / "adapter"), "-o", str(w / "out.safetensors")], \
        [w / "out.safetensors"]


def _merge_exact(w: Path) -> tuple[list[str], list[Path]]:
    argv, outs = _merge(w)
    return argv + ["--residual", str(w / "new" / "res.safetensors")], outs + [w / "new" / "res.safetensors"]


def _merge_in_place(w: Path) -> tuple[list[str], list[Path]]:
    return ["merge", str(w / "base.safetensors"), str(w / "adapter"), "--in-place", "--residual",
            str(w / "r.safetensors")], [w / "r.safetensors"]


def _unmerge(w: Path) -> list[str]:
    return ["unmerge", str(w / "merged.safetensors"), str(w / "adapter"), "-o", str(w / "out.safetensors")]


def _unmerge_fast(w: Path) -> tuple[list[str], list[Path]]:
    return _unmerge(w) + ["--fast"], [w / "out.safetensors"]  # the fixture was merged exactly: --fast says so


def _unmerge_exact(w: Path) -> tuple[list[str], list[Path]]:
    return _unmerge(w) + ["--residual", str(w / "residual.safetensors")], [w / "out.safetensors"]


def _sharded_merge(w: Path) -> tuple[list[str], list[Path]]:
    if not (w / "model").exists():
        _sharded(w)
    return ["merge", str(w / "model" / "model.safetensors.index.json"), str(w / "adapter"), "-o", str(w / "merged"),
            "--residual", str(w / "res")], []


def _combine(w: Path) -> tuple[list[str], list[Path]]:
    return ["combine", str(w / "adapter"), str(w / "adapter"), "--method", "cat", "-o", str(w / "combined")], []


def _export(w: Path) -> tuple[list[str], list[Path]]:
    return ["export", str(w / "graph" / "model.onnx"), str(w / "adapter"), "--mode", "merged", "-o",
            str(w / "out.onnx")], [w / "out.onnx"]


#: The tokenizer file of the genai folder: copied, not exported, so its bytes are told apart in a write.
TOKENIZER = b'{"tokenizer": "copied into the output folder byte for byte"}'


def _genai_folder(w: Path) -> Path:
    """The fixture graph's folder as a genai model folder (a genai_config.json and a tokenizer file beside it)."""
    folder = w / "graph"
    if not (folder / "genai_config.json").exists():
        (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
        (folder / "tokenizer.json").write_bytes(TOKENIZER)
    return folder


def _export_genai(w: Path) -> tuple[list[str], list[Path]]:
    return ["export", str(_genai_folder(w)), str(w / "adapter"), "--mode", "dynamic", "-o", str(w / "genai")], []


COMMANDS: dict[str, Callable[[Path], tuple[list[str], list[Path]]]] = {
    "merge": _merge, "merge_exact": _merge_exact, "merge_in_place": _merge_in_place, "unmerge_fast": _unmerge_fast,
    "unmerge_exact": _unmerge_exact, "sharded_merge": _sharded_merge, "combine": _combine, "export": _export,
    "export_genai": _export_genai,
}
EXPORTS = ("export", "export_genai")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return write_fixtures(root)


class _Fault:
    """Wraps atomic.write_at: counts calls, and raises OSError(code) at call ``at`` (None: never)."""

    def __init__(self, at: int | None, code: int = errno.ENOSPC) -> None:
        self.at, self.code, self.calls = at, code, 0
        self.real = atomic.write_at

    def __call__(self, fd: int, data, offset: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise OSError(self.code, os.strerror(self.code))
        self.real(fd, data, offset)


def _prepare(fixtures: Path, base: Path, command: str, previous: bool) -> tuple[Path, list[str]]:
    work = scenario_work(fixtures, base / "work")
    argv, outputs = COMMANDS[command](work)
    if previous:
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PREVIOUS)
        argv = [*argv, "--overwrite"]  # an existing output is replaced only when asked (cli/paths.py)
    return work, argv


def _count_writes(fixtures: Path, command: str, previous: bool, monkeypatch: pytest.MonkeyPatch) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        _, argv = _prepare(fixtures, Path(scratch), command, previous)
        counter = _Fault(None)
        monkeypatch.setattr(atomic, "write_at", counter)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == EXIT_OK
        monkeypatch.undo()
        return counter.calls


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in EXPORTS or HAVE_ONNX])
@settings(max_examples=12)
@given(data=st.data(), code=st.sampled_from([errno.ENOSPC, errno.EIO]), previous=st.booleans())
def test_failed_write_leaves_previous_state(fixtures: Path, command: str, data, code: int, previous: bool) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        total = _count_writes(fixtures, command, previous, monkeypatch)
    assert total >= 1
    at = data.draw(st.integers(1, total), label="failing write")
    with tempfile.TemporaryDirectory() as scratch, pytest.MonkeyPatch.context() as monkeypatch:
        work, argv = _prepare(fixtures, Path(scratch), command, previous)
        before = _snapshot(Path(scratch))
        monkeypatch.setattr(atomic, "write_at", _Fault(at, code))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == EXIT_USER_ERROR
        err = stderr.getvalue().strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and errno.errorcode[code] in err[0], err
        assert _snapshot(Path(scratch)) == before, f"write {at} of {total} failed and the folder changed"


def _fail_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, code: int) -> None:
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(owner, name, fail)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EEXIST])
@pytest.mark.parametrize("point", ["create temporary", "rename into place", "create folder"])
def test_failure_outside_the_write_primitive(fixtures: Path, tmp_path: Path, point: str, code: int,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """EROFS/EACCES/ENOSPC/EEXIST when the temporary is made, when it is renamed, or when a folder is made."""
    work, argv = _prepare(fixtures, tmp_path, "merge_exact", previous=point != "create folder")
    before = _snapshot(tmp_path)
    if point == "create temporary":
        _fail_call(monkeypatch, atomic.tempfile, "mkstemp", code)
    elif point == "rename into place":
        _fail_call(monkeypatch, atomic.os, "replace", code)
    else:
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.name == "new":
                raise OSError(code, os.strerror(code))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and errno.errorcode[code] in err[0], err
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0500: injected above instead")
def test_read_only_folder_refused_before_work(fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work, argv = _prepare(fixtures, tmp_path, "merge", previous=False)
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv[-1] = str(locked / "out.safetensors")
        assert main(argv) == EXIT_USER_ERROR
        assert "EACCES" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_stale_temporaries_of_a_killed_run_are_cleaned(fixtures: Path, tmp_path: Path) -> None:
    """A temporary named for a process that is not alive is removed by the next write; a live one is kept."""
    work, argv = _prepare(fixtures, tmp_path, "merge", previous=False)
    dead = work / f".out.safetensors.lora-ref-999999999.abc.partial"
    dead.write_bytes(b"half a file")
    dead_folder = work / f".out.safetensors.staged.lora-ref-999999999.def.partial"
    dead_folder.mkdir()
    alive = work / f".out.safetensors.lora-ref-{os.getpid()}.ghi.partial"
    alive.write_bytes(b"another run's")
    unrelated = work / ".out.safetensors.abc.partial"  # not our pattern: never touched
    unrelated.write_bytes(b"?")
    assert main(argv) == EXIT_OK
    assert not dead.exists() and not dead_folder.exists()
    assert alive.exists() and unrelated.exists()


def test_sharded_output_appears_whole_in_an_existing_folder(fixtures: Path, tmp_path: Path) -> None:
    """Into an existing (unrelated) folder the shards and index are moved at the end; others stay."""
    work, argv = _prepare(fixtures, tmp_path, "sharded_merge", previous=False)
    (work / "merged").mkdir()
    (work / "merged" / "notes.txt").write_text("mine")
    assert main(argv) == EXIT_OK
    assert sorted(p.name for p in (work / "merged").iterdir()) == \
        ["a.safetensors", "b.safetensors", "model.safetensors.index.json", "notes.txt"]
    shutil.rmtree(work / "merged")


@pytest.mark.skipif(not HAVE_ONNX, reason="no onnx")
def test_library_export_writes_graph_and_adapter_files_or_nothing(fixtures: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_ref.export.export: an .onnx_adapter that cannot be written takes the written graph back out."""
    from lora_ref.adapter import load_adapter
    from lora_ref.export import exporter

    def fail(path, *args, **kwargs):
        raise atomic.write_failed(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(exporter, "write_onnx_adapter", fail)
    with pytest.raises(atomic.WriteFailedError, match="ENOSPC"):
        exporter.export(fixtures / "graph" / "model.onnx", [load_adapter(fixtures / "adapter")], "dynamic",
                        tmp_path / "out" / "dyn.onnx", adapter_out=tmp_path / "out" / "adapters")
    assert list(tmp_path.iterdir()) == []


class _FailOn(_Fault):
    """Wraps atomic.write_at: raises ``error`` at the first write of bytes that start with ``prefix``."""

    def __init__(self, prefix: bytes, error: BaseException) -> None:
        super().__init__(None)
        self.prefix, self.error = prefix, error

    def __call__(self, fd: int, data, offset: int) -> None:
        if bytes(memoryview(data).cast("B")[:len(self.prefix)]) == self.prefix:
            raise self.error
        self.real(fd, data, offset)


@pytest.mark.skipif(not HAVE_ONNX, reason="no onnx")
def test_genai_folder_copies_go_through_the_write_primitive(fixtures: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The files copied into a genai output folder are written like every other byte: a full disk while the
    tokenizer file is copied is exit 2 naming that file, and neither the folder nor a temporary is left."""
    work, argv = _prepare(fixtures, tmp_path, "export_genai", previous=False)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(atomic, "write_at", _FailOn(TOKENIZER, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.json" in err[0] and "ENOSPC" in err[0], err
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(not HAVE_ONNX, reason="no onnx")
def test_interrupted_genai_export_leaves_nothing(fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the copy (the library call, no CLI around it): no output folder, no temporary."""
    from lora_ref.adapter import load_adapter
    from lora_ref.export.genai import export_genai

    work, _ = _prepare(fixtures, tmp_path, "export_genai", previous=False)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(atomic, "write_at", _FailOn(TOKENIZER, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_genai(work / "graph", [load_adapter(work / "adapter")], "dynamic", work / "genai")
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(not HAVE_ONNX, reason="no onnx")
def test_genai_output_folder_has_the_usual_mode_and_the_bytes(fixtures: Path, tmp_path: Path) -> None:
    """The staged folder is renamed into place with 0777 & ~umask (a mkdtemp folder is 0700: unreadable to others)."""
    work, argv = _prepare(fixtures, tmp_path, "export_genai", previous=False)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == EXIT_OK
    umask = os.umask(0)
    os.umask(umask)
    assert (work / "genai").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (work / "genai" / "tokenizer.json").read_bytes() == TOKENIZER
    assert not [p for p in work.iterdir() if p.name.endswith(".partial")]
