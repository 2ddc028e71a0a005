"""`lora-ref inspect / merge / unmerge` on conv, embedding and DoRA adapters (SPEC 4.5).

Exact mode must give the base checkpoint back byte for byte; a DoRA checkpoint cannot be
unmerged without the residual file (it holds the weight norms), which is a one-line user error
(exit 2) and leaves no output file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.cli import main
from lora_ref.config import LoraConfig
from lora_ref.dtypes import bfloat16, round_to
from lora_ref.safetensors_io import load_file, save_file


def _adapter(rng, use_dora: bool) -> Adapter:
    def t(*shape):
        return rng.normal(0, 0.5, shape).astype(np.float32)

    modules = {
        "embed": LoraModule("embed", t(2, 10), t(6, 2), kind="embedding", magnitude=np.abs(t(6)) + 1 if use_dora else None),
        "conv1": LoraModule("conv1", t(2, 3, 3), t(4, 2, 1), kind="conv", magnitude=np.abs(t(1, 4, 1)) + 1 if use_dora else None),
        "conv2": LoraModule("conv2", t(2, 3, 3, 3), t(4, 2, 1, 1), kind="conv", magnitude=np.abs(t(4)) + 1 if use_dora else None),
        "conv3": LoraModule("conv3", t(2, 2, 1, 1, 1), t(3, 2, 1, 1, 1), kind="conv", magnitude=np.abs(t(3)) + 1 if use_dora else None),
        "proj": LoraModule("proj", t(2, 5), t(4, 2), magnitude=np.abs(t(4)) + 1 if use_dora else None),
    }
    config = LoraConfig(r=2, lora_alpha=3, target_modules=list(modules), use_dora=use_dora)
    return Adapter(config, modules)


@pytest.fixture(params=[("float32", False), ("bfloat16", False), ("float32", True), ("float16", True), ("bfloat16", True)],
                ids=lambda p: f"{p[0]}-{'dora' if p[1] else 'lora'}")
def files(request, tmp_path):
    dtype, use_dora = request.param
    rng = np.random.default_rng(7)
    target = bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    base = {"embed.weight": (10, 6), "conv1.weight": (4, 3, 3), "conv2.weight": (4, 3, 3, 3), "conv3.weight": (3, 2, 1, 1, 1),
            "proj.weight": (4, 5), "proj.bias": (4,)}
    save_file(tmp_path / "base.safetensors", {k: round_to(rng.normal(0, 1, s), target) for k, s in base.items()})
    save_adapter(_adapter(rng, use_dora), tmp_path / "adapter")
    return tmp_path, use_dora


def test_inspect_reports_every_kind(files, capsys) -> None:
    path, use_dora = files
    assert main(["inspect", str(path / "adapter"), "--json", "--base", str(path / "base.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    kinds = {row["module"]: row["kind"] for row in report["modules"]}
    assert kinds == {"embed": "embedding", "conv1": "conv", "conv2": "conv", "conv3": "conv", "proj": "linear"}
    assert report["use_dora"] is use_dora
    shapes = {row["module"]: row["shapes"] for row in report["modules"]}
    assert ("magnitude" in shapes["conv1"]) is use_dora


def test_exact_merge_unmerge_restores_the_checkpoint_bytes(files, capsys) -> None:
    path, _ = files
    merged, residual, back = path / "merged.safetensors", path / "res.safetensors", path / "back.safetensors"
    assert main(["merge", str(path / "base.safetensors"), str(path / "adapter"), "-o", str(merged), "--residual", str(residual)]) == 0
    assert "merged 5 tensors" in capsys.readouterr().out
    base, out = load_file(path / "base.safetensors"), load_file(merged)
    assert not np.array_equal(base["conv2.weight"], out["conv2.weight"])  # something was merged
    assert main(["unmerge", str(merged), str(path / "adapter"), "-o", str(back), "--residual", str(residual)]) == 0
    assert (path / "base.safetensors").read_bytes() == back.read_bytes()


def test_fast_unmerge_of_dora_is_a_one_line_user_error(files, capsys) -> None:
    path, use_dora = files
    merged, back = path / "merged.safetensors", path / "back.safetensors"
    assert main(["merge", str(path / "base.safetensors"), str(path / "adapter"), "-o", str(merged)]) == 0
    capsys.readouterr()
    code = main(["unmerge", str(merged), str(path / "adapter"), "-o", str(back)])
    if use_dora:
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "DoRA" in err and "residual" in err
        assert not back.exists()
    else:
        assert code == 0 and back.exists()
