"""Sharded checkpoints (model.safetensors.index.json): merge/unmerge shard by shard, hostile indexes.

Oracle for the merge: the same checkpoint unsharded, merged by merge_checkpoint; every tensor of
the sharded output must be bit-identical to it (sharding changes where tensors live, never their
values). Exact unmerge with the per-shard residuals must give back every shard byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corpus.make_corpus import fixture_adapter, fixture_base
from lora_ref.adapter import LoraModule
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.errors import FileFormatError, TargetNotFoundError
from lora_ref.safetensors_io import load_file, save_file
from lora_ref.sharded import ShardedOutputError, merge_sharded, read_index, unmerge_sharded

INDEX = "model.safetensors.index.json"
#: tensor -> shard: layer.q.weight and layer.v.weight in different shards, one shard with no target
LAYOUT = {"layer.q.weight": "model-00001-of-00003.safetensors", "layer.q.bias": "model-00001-of-00003.safetensors",
          "layer.position_ids": "model-00002-of-00003.safetensors", "layer.v.weight": "model-00003-of-00003.safetensors"}


def write_sharded(directory: Path, tensors: dict[str, np.ndarray], layout: dict[str, str] = LAYOUT) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in dict.fromkeys(layout.values()):
        save_file(directory / shard, {k: v for k, v in tensors.items() if layout[k] == shard}, metadata={"format": "pt"})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": layout}))
    return directory / INDEX


@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    return write_sharded(tmp_path / "model", fixture_base())


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_sharded_merge_equals_unsharded_and_exact_unmerge_restores(sharded: Path, tmp_path: Path, dtype) -> None:
    adapter = fixture_adapter()
    report = merge_sharded(sharded, adapter, tmp_path / "merged", residual_dir=tmp_path / "res", dtype=dtype)
    assert sorted(report.merged) == ["layer.q.weight", "layer.v.weight"] and report.tensors_written == 4

    save_file(tmp_path / "flat.safetensors", fixture_base())
    merge_checkpoint(tmp_path / "flat.safetensors", adapter, tmp_path / "flat_merged.safetensors", dtype=dtype)
    oracle = load_file(tmp_path / "flat_merged.safetensors")
    index = read_index(tmp_path / "merged" / INDEX)
    assert index.weight_map == LAYOUT
    assert index.metadata["total_size"] == sum(a.nbytes for a in oracle.values())
    for shard in index.shards:
        for name, array in load_file(tmp_path / "merged" / shard).items():
            assert array.dtype == oracle[name].dtype and array.tobytes() == oracle[name].tobytes()

    unmerge_sharded(tmp_path / "merged" / INDEX, adapter, tmp_path / "restored", residual_dir=tmp_path / "res")
    if dtype is None:
        for shard in index.shards:
            assert (tmp_path / "restored" / shard).read_bytes() == (sharded.parent / shard).read_bytes()


def test_missing_target_in_every_shard(sharded: Path, tmp_path: Path) -> None:
    adapter = fixture_adapter()
    adapter.modules["layer.k"] = LoraModule("layer.k", adapter.modules["layer.q"].A, adapter.modules["layer.q"].B)
    with pytest.raises(TargetNotFoundError, match="layer.k.weight"):
        merge_sharded(sharded, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_never_overwrite(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardedOutputError):
        merge_sharded(sharded, fixture_adapter(), sharded.parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / LAYOUT["layer.v.weight"]).write_bytes(b"someone's file")
    with pytest.raises(ShardedOutputError):
        merge_sharded(sharded, fixture_adapter(), tmp_path / "busy")
    assert (tmp_path / "busy" / LAYOUT["layer.v.weight"]).read_bytes() == b"someone's file"
    with pytest.raises(ShardedOutputError):
        merge_sharded(sharded, fixture_adapter(), tmp_path / "out", residual_dir=tmp_path / "out")


HOSTILE_INDEXES = {
    "parent_dir": {"weight_map": {"layer.q.weight": "../outside.safetensors"}},
    "absolute": {"weight_map": {"layer.q.weight": "/etc/passwd.safetensors"}},
    "subfolder": {"weight_map": {"layer.q.weight": "sub/model.safetensors"}},
    "not_safetensors": {"weight_map": {"layer.q.weight": "model.bin"}},
    "dotdot": {"weight_map": {"layer.q.weight": ".."}},
    "shard_not_string": {"weight_map": {"layer.q.weight": 3}},
    "empty_map": {"weight_map": {}},
    "map_is_list": {"weight_map": ["model-00001-of-00003.safetensors"]},
    "metadata_list": {"metadata": [], "weight_map": LAYOUT},
    "missing_shard": {"weight_map": {**LAYOUT, "extra.weight": "model-00009-of-00009.safetensors"}},
    "wrong_shard": {"weight_map": {**LAYOUT, "layer.q.bias": "model-00002-of-00003.safetensors"}},
    "unlisted_tensor": {"weight_map": {k: v for k, v in LAYOUT.items() if k != "layer.q.bias"}},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_INDEXES))
def test_hostile_index_refused_before_any_output(sharded: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes((sharded.parent / LAYOUT["layer.q.weight"]).read_bytes())
    sharded.write_text(json.dumps(HOSTILE_INDEXES[name]))
    with pytest.raises(FileFormatError):
        merge_sharded(sharded, fixture_adapter(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["", "{", "[" * 50_000 + "]" * 50_000, '{"weight_map": ' + "9" * 5000 + "}",
                                  "\udcff"])
def test_index_not_json(sharded: Path, text: str) -> None:
    sharded.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FileFormatError):
        read_index(sharded)


def test_cli_sharded_round_trip(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from corpus.make_corpus import write_fixtures
    from lora_ref.cli import EXIT_OK, EXIT_USER_ERROR, main

    adapter_dir = write_fixtures(tmp_path / "fx") / "adapter"
    assert main(["merge", str(sharded), str(adapter_dir), "-o", str(tmp_path / "m"), "--residual", str(tmp_path / "r")]) == EXIT_OK
    assert main(["unmerge", str(tmp_path / "m" / INDEX), str(adapter_dir), "-o", str(tmp_path / "u"),
                 "--residual", str(tmp_path / "r")]) == EXIT_OK
    for shard in dict.fromkeys(LAYOUT.values()):
        assert (tmp_path / "u" / shard).read_bytes() == (sharded.parent / shard).read_bytes()
    assert main(["merge", str(sharded), str(adapter_dir), "--in-place", "--residual", str(tmp_path / "r2")]) == EXIT_USER_ERROR
    assert "--in-place is not offered" in capsys.readouterr().err
