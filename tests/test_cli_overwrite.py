"""No command overwrites its own input: merge, combine and export refuse, exit 2, input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lora_ref import save_adapter
from lora_ref.cli import main
from lora_ref.cli.paths import refuse_overwrites, same_file
from lora_ref.demo import build_demo_model
from lora_ref.errors import OverwriteRefusedError
from lora_ref.safetensors_io import save_file


def _digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    weights, adapter = build_demo_model(np.dtype(np.float32))
    save_file(tmp_path / "base.safetensors", weights)
    save_adapter(adapter, tmp_path / "ad")
    return tmp_path


@pytest.mark.parametrize(
    "argv, victim",
    [
        (["merge", "{d}/base.safetensors", "{d}/ad", "-o", "{d}/base.safetensors"], "base.safetensors"),
        (["merge", "{d}/base.safetensors", "{d}/ad", "-o", "{d}/ad/adapter_model.safetensors"], "ad"),
        (["combine", "{d}/ad", "{d}/ad", "--method", "cat", "-o", "{d}/ad"], "ad"),
        (["combine", "{d}/ad", "{d}/ad/../ad", "--method", "cat", "-o", "{d}/./ad"], "ad"),
    ],
)
def test_output_naming_an_input_is_refused(workdir: Path, argv: list[str], victim: str, capsys) -> None:
    before = _digest(workdir / victim)
    code = main([a.format(d=workdir) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert "would overwrite" in err and err.count("\n") == 1
    assert _digest(workdir / victim) == before


def test_export_output_naming_its_model_is_refused(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the guard runs before any input is parsed")
    code = main(["export", str(model), str(tmp_path / "ad"), "--mode", "merged", "-o", str(model)])
    assert code == 2 and "would overwrite the model" in capsys.readouterr().err
    assert model.read_bytes().startswith(b"not read")


def test_guard_checks_every_pair_of_outputs(tmp_path: Path) -> None:
    a = tmp_path / "x"
    assert same_file(a, tmp_path / "." / "x")
    with pytest.raises(OverwriteRefusedError, match="are the same file"):
        refuse_overwrites({"first": a, "second": tmp_path / "y", "third": tmp_path / "sub" / ".." / "x"}, {})
    refuse_overwrites({"first": a, "second": None}, {"input": tmp_path / "z", "absent": None})
