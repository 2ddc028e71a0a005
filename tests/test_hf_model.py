"""Hugging Face model directories as merge/unmerge bases (lora_ref.hf_model, issue 15 part 3).

Oracles: the layout and bytes of the input directory itself (every non-weight file must come out
byte for byte, every weight file of the unmerge must equal the input's byte for byte), and the
merge of the bare ``model.safetensors`` file, whose numerics other tests check against exact
arithmetic and PEFT: the directory path must give the same tensors bit for bit.
Peer test against transformers + PEFT: tests/test_peers_hf_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_ref import save_adapter
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.demo import build_demo_model
from lora_ref.errors import FileFormatError, UnsafeFileError
from lora_ref.hf_model import INDEX_FILE, WEIGHTS_FILE, model_dir
from lora_ref.safetensors_io import load_file, save_file

#: files a save_pretrained folder holds besides its weights (contents arbitrary: they are copied, never parsed)
CARRIED = {"config.json": b'{"model_type": "llama"}\n', "generation_config.json": b'{"bos_token_id": 1}\n',
           "tokenizer.json": bytes(range(256)) * 9, "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}",
           "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}\u00e9{% endfor %}".encode()}
#: files that must not be carried, and why the note says so
NOT_CARRIED = {"pytorch_model.bin": "pickle", "training_args.bin": "pickle", "consolidated.safetensors": "other weights",
               ".gitattributes": "hidden"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=120)


def _model(folder: Path, weights: dict[str, np.ndarray], *, sharded: bool) -> Path:
    folder.mkdir()
    if sharded:  # one tensor per shard, as save_pretrained(max_shard_size=...) splits them
        names = sorted(weights)
        shard = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
        for name in names:
            save_file(folder / shard[name], {name: weights[name]}, metadata={"format": "pt"})
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
                                                    "weight_map": shard}, indent=2, sort_keys=True) + "\n")
    else:
        save_file(folder / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    for name, data in {**CARRIED, **{n: b"\x80never opened" for n in NOT_CARRIED}}.items():
        (folder / name).write_bytes(data)
    (folder / "original").mkdir()  # e.g. Llama repos' original/consolidated.00.pth
    return folder


@pytest.fixture()
def world(tmp_path: Path):
    weights, adapter = build_demo_model(np.dtype(np.float32))
    save_adapter(adapter, tmp_path / "ad")
    save_file(tmp_path / "flat.safetensors", weights, metadata={"format": "pt"})
    merge_checkpoint(tmp_path / "flat.safetensors", adapter, tmp_path / "flat_merged.safetensors")
    return tmp_path, weights


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    if (folder / INDEX_FILE).exists():
        index = json.loads((folder / INDEX_FILE).read_text())
        return {k: v for shard in set(index["weight_map"].values()) for k, v in load_file(folder / shard).items()}
    return load_file(folder / WEIGHTS_FILE)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_model_directory_merges_into_a_loadable_directory_and_unmerges_to_the_original(world, sharded: bool) -> None:
    tmp, weights = world
    base = _model(tmp / "base", weights, sharded=sharded)
    residual = tmp / ("res" if sharded else "res.safetensors")  # one residual per shard, in a folder, when sharded
    done = cli("merge", str(base), str(tmp / "ad"), "-o", str(tmp / "merged"), "--residual", str(residual),
               "--json", str(tmp / "merge.json"))
    assert done.returncode == 0, done.stderr
    for name, why in NOT_CARRIED.items():
        assert f"{name} ({why}" in done.stderr
    assert "original (a folder)" in done.stderr
    report = json.loads((tmp / "merge.json").read_text())
    assert report["copied"] == sorted(CARRIED) and len(report["not_copied"]) == len(NOT_CARRIED) + 1
    out = tmp / "merged"
    weight_files = sorted(p.name for p in base.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
    weight_files.remove("consolidated.safetensors")
    assert sorted(p.name for p in out.iterdir()) == sorted([*weight_files, *CARRIED])
    for name, data in CARRIED.items():
        assert (out / name).read_bytes() == data
    oracle = load_file(tmp / "flat_merged.safetensors")
    got = _tensors(out)
    assert sorted(got) == sorted(oracle) and all(got[k].tobytes() == oracle[k].tobytes() for k in oracle)
    if sharded:
        index = json.loads((out / INDEX_FILE).read_text())
        assert index["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in oracle.values())

    done = cli("unmerge", str(out), str(tmp / "ad"), "-o", str(tmp / "back"), "--residual", str(residual))
    assert done.returncode == 0 and "exactly" in done.stdout, done.stderr
    back = tmp / "back"
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in out.iterdir())
    for item in back.iterdir():  # weights, index and carried files: the input's bytes
        assert item.read_bytes() == (base / item.name).read_bytes(), item.name


def test_pickle_only_model_directory_is_refused_naming_the_conversion(world) -> None:
    tmp, _ = world
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80never opened")
    done = cli("merge", str(folder), str(tmp / "ad"), "-o", str(tmp / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pytorch_model.bin" in done.stderr and "save_pretrained" in done.stderr and "safe_serialization=True" in done.stderr
    assert not (tmp / "out").exists()
    with pytest.raises(UnsafeFileError):
        model_dir(folder)


@pytest.mark.parametrize("contents, says", [
    ({}, f"not a model directory: missing {WEIGHTS_FILE} (or a sharded {INDEX_FILE})"),
    ({"adapter_config.json": b"{}", "adapter_model.safetensors": b""}, "is an adapter directory"),
    ({WEIGHTS_FILE: None, INDEX_FILE: b"{}"}, "ambiguous"),
])
def test_a_folder_that_is_not_a_model_directory_says_what_is_missing(world, contents: dict, says: str) -> None:
    tmp, weights = world
    folder = tmp / "folder"
    folder.mkdir()
    for name, data in contents.items():
        if data is None:
            save_file(folder / name, weights)
        else:
            (folder / name).write_bytes(data)
    with pytest.raises(FileFormatError, match=says.replace("(", r"\(").replace(")", r"\)")):
        model_dir(folder)
    done = cli("merge", str(folder), str(tmp / "ad"), "-o", str(tmp / "out"))
    assert done.returncode == 2 and says in done.stderr and not (tmp / "out").exists(), done.stderr


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_a_failed_copy_leaves_nothing(world, sharded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails after the weights are done (the last carried file) leaves no folder, shard or residual."""
    import lora_ref.atomic as atomic
    from lora_ref.cli import main

    tmp, weights = world
    base = _model(tmp / "base", weights, sharded=sharded)
    real = atomic.copy_file_atomic

    def failing(source, target):
        if Path(source).name == sorted(CARRIED)[-1]:
            raise atomic.write_failed(target, OSError(28, "No space left on device"))
        return real(source, target)

    monkeypatch.setattr("lora_ref.hf_model.copy_file_atomic", failing)
    monkeypatch.setattr("lora_ref.sharded.copy_file_atomic", failing)
    before = sorted(p.name for p in tmp.iterdir())
    residual = tmp / ("res" if sharded else "res.safetensors")
    assert main(["merge", str(base), str(tmp / "ad"), "-o", str(tmp / "merged"), "--residual", str(residual)]) == 2
    assert sorted(p.name for p in tmp.iterdir()) == before  # no output folder, no residual, no temporaries


def test_an_output_folder_holding_a_carried_name_is_refused_before_any_work(world) -> None:
    tmp, weights = world
    base = _model(tmp / "base", weights, sharded=False)
    out = tmp / "taken"
    out.mkdir()
    (out / "config.json").write_text("mine")
    done = cli("merge", str(base), str(tmp / "ad"), "-o", str(out))
    assert done.returncode == 2 and "config.json" in done.stderr, done.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "mine"
    done = cli("merge", str(base), str(tmp / "ad"), "--in-place", "--residual", str(tmp / "r.safetensors"))
    assert done.returncode == 2 and "--in-place is not offered for model directories" in done.stderr
    done = cli("merge", str(base), str(tmp / "ad"), "-o", str(tmp / "merged.safetensors"))
    assert done.returncode == 2 and "-o is a folder" in done.stderr and not (tmp / "merged.safetensors").exists()


@pytest.mark.parametrize("layout", ["single", "sharded", "sharded index"])
def test_inspect_base_accepts_a_model_directory_and_a_sharded_index(world, layout: str) -> None:
    tmp, weights = world
    base = _model(tmp / "base", weights, sharded=layout != "single")
    given = base / INDEX_FILE if layout == "sharded index" else base
    reports = [json.loads(cli("inspect", str(tmp / "ad"), "--base", str(b), "--json", "-").stdout)
               for b in (tmp / "flat.safetensors", given)]
    targeted = json.loads((tmp / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert reports[1]["targeted_base_bytes"] == reports[0]["targeted_base_bytes"] > 0 and targeted
    assert reports[1]["targeted_base_bytes"] == sum(weights[f"{m['module']}.weight"].nbytes for m in reports[1]["modules"])


@pytest.mark.parametrize("command, missing", [  # each command, each lack twice
    ("merge", "adapter_config.json"), ("unmerge", "adapter_model.safetensors"), ("export", "both"),
    ("convert-adapters", "adapter_config.json"), ("combine", "adapter_model.safetensors"), ("inspect", "both")])
def test_every_command_says_what_an_adapter_directory_lacks(world, command: str, missing: str) -> None:
    tmp, _ = world
    folder = tmp / "half"
    folder.mkdir()
    for name in {"adapter_config.json", "adapter_model.safetensors"} - ({"adapter_config.json", "adapter_model.safetensors"}
                                                                       if missing == "both" else {missing}):
        (folder / name).write_bytes((tmp / "ad" / name).read_bytes())
    base, ad, out, graph = str(tmp / "flat.safetensors"), str(folder), str(tmp / "out"), str(tmp / "g.onnx")
    if command in ("export", "convert-adapters"):
        from lora_ref.export.models import mlp

        (tmp / "g.onnx").write_bytes(mlp().onnx.SerializeToString())
    args = {"merge": ["merge", base, ad, "-o", out], "unmerge": ["unmerge", base, ad, "-o", out],
            "export": ["export", graph, ad, "--mode", "merged", "-o", out],
            "convert-adapters": ["convert-adapters", ad, "--graph", graph, "-o", out],
            "combine": ["combine", ad, str(tmp / "ad"), "--method", "cat", "-o", out], "inspect": ["inspect", ad]}[command]
    done = cli(*args)
    says = "adapter_config.json and adapter_model.safetensors" if missing == "both" else missing
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{folder}: not an adapter directory: missing {says};" in done.stderr and not (tmp / "out").exists()
