"""Never silently wrong (docs/integrity.md): merge records, verified exactness, carried tensors.

Refusals run real CLI processes (exit 2, one line on stderr, nothing written). Oracles are
independent of the code under test: the base file's own bytes (an exact unmerge must give
them back), hand-computed replacements (a modules_to_save copy rounded to the base dtype, rows
replaced by index), and a residual file written by lora-ref 0.1.0 (main at d4d7a26) before
residuals had checksums (tests/data/residual_v1/, made by its make.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_ref.adapter import PREFIX, Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.checkpoint import RESIDUAL_META_KEY, merge_checkpoint, unmerge_checkpoint
from lora_ref.cli import main
from lora_ref.config import LoraConfig
from lora_ref.dtypes import bfloat16, bits_of
from lora_ref.errors import CarriedTensorError, ExactnessError
from lora_ref.merge import digest_arrays
from lora_ref.provenance import read_stack
from lora_ref.safetensors_io import SafetensorsFile, load_file, save_file

V1 = Path(__file__).parent / "data" / "residual_v1"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _refused(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("lora-ref: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _ok(*args: object) -> subprocess.CompletedProcess:
    """A command that must succeed, run in-process (faster; the refusals above run real processes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _adapter(seed: int, dtype=np.float32, **config) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {name: LoraModule(name, A=rng.standard_normal((2, 8)).astype(dtype), B=rng.standard_normal((8, 2)).astype(dtype))
               for name in ("layer.q", "layer.v")}
    return Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], **config), modules)


def _base(seed: int = 9) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.q.weight": rng.standard_normal((8, 8)).astype(bfloat16),
            "layer.v.weight": rng.standard_normal((8, 8)).astype(bfloat16),
            "head.weight": rng.standard_normal((3, 8)).astype(bfloat16),
            "head.bias": rng.standard_normal(3).astype(bfloat16),
            "embed.weight": rng.standard_normal((10, 8)).astype(bfloat16),
            "steps": np.arange(3, dtype=np.int64)}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    save_file(tmp_path / "base.safetensors", _base())
    save_adapter(_adapter(1), tmp_path / "a")
    save_adapter(_adapter(2), tmp_path / "b")
    return tmp_path


# -- provenance -------------------------------------------------------------------------------------
def test_merge_record_stack_and_refusals(work: Path) -> None:
    base, a, b = work / "base.safetensors", work / "a", work / "b"
    _ok("merge", base, a, "-o", work / "m1.safetensors", "--residual", work / "r1.safetensors")
    with SafetensorsFile(work / "m1.safetensors") as handle:
        stack = read_stack(handle.metadata, "m1")
    assert [r["mode"] for r in stack] == ["exact"]
    assert stack[0]["base_digest"] and stack[0]["adapter"] and stack[0]["version"]
    # double merge: refused, nothing written; --force overrides
    _refused(_run("merge", work / "m1.safetensors", a, "-o", work / "m2.safetensors"), "already merged", "--force")
    assert not (work / "m2.safetensors").exists()
    _ok("merge", work / "m1.safetensors", b, "-o", work / "m2.safetensors")  # another adapter: fine
    with SafetensorsFile(work / "m2.safetensors") as handle:
        assert [r["mode"] for r in read_stack(handle.metadata, "m2")] == ["exact", "fast"]
    # LIFO: a is under b
    _refused(_run("unmerge", work / "m2.safetensors", a, "-o", work / "u.safetensors", "--residual", work / "r1.safetensors"),
             "later merge", "--force")
    # not merged at all: a third adapter
    save_adapter(_adapter(3), work / "c")
    _refused(_run("unmerge", work / "m1.safetensors", work / "c", "-o", work / "u.safetensors", "--fast"),
             "does not hold this adapter", "--force")
    # an exact merge unmerged without its residual: needs --fast
    _refused(_run("unmerge", work / "m1.safetensors", a, "-o", work / "u.safetensors"), "--fast", "--residual")
    assert not (work / "u.safetensors").exists()
    _ok("unmerge", work / "m1.safetensors", a, "-o", work / "u.safetensors", "--fast")
    # the residual of another merge of the same adapter (into another base) is refused
    save_file(work / "base2.safetensors", _base(seed=10))
    _ok("merge", work / "base2.safetensors", a, "-o", work / "n1.safetensors", "--residual", work / "s1.safetensors")
    _refused(_run("unmerge", work / "m1.safetensors", a, "-o", work / "v.safetensors", "--residual", work / "s1.safetensors"),
             "another merge")
    # the whole exact round trip gives the base's bytes back, header included, and says "exactly"
    done = _ok("unmerge", work / "m1.safetensors", a, "-o", work / "w.safetensors", "--residual", work / "r1.safetensors")
    assert "exactly" in done.stdout and (work / "w.safetensors").read_bytes() == base.read_bytes()


def test_unrecorded_file_still_works_with_note(work: Path) -> None:
    """A merged file from another tool (no record): unmerge works and says it could not check."""
    done = _ok("unmerge", work / "base.safetensors", work / "a", "-o", work / "u.safetensors")
    assert "no lora-ref merge record" in done.stderr and done.stdout.startswith("unmerged")


def test_sharded_records_per_shard(work: Path) -> None:
    tensors = load_file(work / "base.safetensors")
    shards = {"s1.safetensors": ["layer.q.weight", "steps"], "s2.safetensors": ["layer.v.weight", "head.weight",
                                                                                 "head.bias", "embed.weight"]}
    (work / "in").mkdir()
    for name, keys in shards.items():
        save_file(work / "in" / name, {k: tensors[k] for k in keys})
    index = work / "in" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    _ok("merge", index, work / "a", "-o", work / "out", "--residual", work / "res")
    for name in shards:
        with SafetensorsFile(work / "out" / name) as handle:
            assert len(read_stack(handle.metadata, name)) == 1
    _refused(_run("merge", work / "out" / index.name, work / "a", "-o", work / "out2"), "already merged")
    _refused(_run("unmerge", work / "out" / index.name, work / "a", "-o", work / "back"), "--fast")
    done = _ok("unmerge", work / "out" / index.name, work / "a", "-o", work / "back", "--residual", work / "res")
    assert "exactly" in done.stdout
    for name in shards:
        assert (work / "back" / name).read_bytes() == (work / "in" / name).read_bytes()


# -- verified exactness -----------------------------------------------------------------------------
def _tampered(src: Path, dst: Path, edit) -> None:
    """Rewrite residual ``src`` to ``dst`` with ``edit(tensors, meta)`` applied (metadata kept otherwise)."""
    with SafetensorsFile(src) as handle:
        metadata = dict(handle.metadata)
    tensors = {k: np.array(v) for k, v in load_file(src).items()}
    meta = json.loads(metadata[RESIDUAL_META_KEY])
    edit(tensors, meta)
    metadata[RESIDUAL_META_KEY] = json.dumps(meta, sort_keys=True)
    save_file(dst, tensors, metadata)


def _flip(tensors: dict, name: str) -> None:
    raw = tensors[name].reshape(-1).view(np.uint8)
    raw[0] ^= 1


def _drop(tensors: dict, meta: dict, key: str, keep_listed: bool) -> None:
    del tensors[f"{key}::indices"], tensors[f"{key}::values"]
    del meta["tensors"][key]
    if not keep_listed:
        meta["targets"].remove(key)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda t, m: _flip(t, "layer.q.weight::values"), id="bit-in-values"),
    pytest.param(lambda t, m: _flip(t, "layer.v.weight::indices"), id="bit-in-indices"),
    pytest.param(lambda t, m: _drop(t, m, "layer.q.weight", keep_listed=True), id="entry-removed"),
    pytest.param(lambda t, m: _drop(t, m, "layer.q.weight", keep_listed=False), id="entry-and-listing-removed"),
])
def test_tampered_residual_refused_before_writing(work: Path, edit) -> None:
    _ok("merge", work / "base.safetensors", work / "a", "-o", work / "m.safetensors", "--residual", work / "r.safetensors")
    _tampered(work / "r.safetensors", work / "bad.safetensors", edit)
    _refused(_run("unmerge", work / "m.safetensors", work / "a", "-o", work / "u.safetensors", "--residual", work / "bad.safetensors"))
    assert sorted(p.name for p in work.iterdir()) == ["a", "b", "bad.safetensors", "base.safetensors", "m.safetensors",
                                                       "r.safetensors"]


def test_restore_checked_against_base_digest(work: Path) -> None:
    """A residual whose payload checksum was recomputed after an edit still fails the base-digest check."""
    adapter = load_adapter(work / "a")
    merge_checkpoint(work / "base.safetensors", adapter, work / "m.safetensors", residual_path=work / "r.safetensors")

    def edit(tensors: dict, meta: dict) -> None:
        key = "layer.q.weight"
        _flip(tensors, f"{key}::values")
        meta["tensors"][key]["payload_digest"] = digest_arrays(tensors[f"{key}::indices"], tensors[f"{key}::values"])

    _tampered(work / "r.safetensors", work / "bad.safetensors", edit)
    with pytest.raises(ExactnessError, match="base digest"):
        unmerge_checkpoint(work / "m.safetensors", adapter, work / "u.safetensors", residual_path=work / "bad.safetensors")
    assert not (work / "u.safetensors").exists()


def test_format1_residual_from_previous_release_still_unmerges(tmp_path: Path) -> None:
    """Files written by lora-ref 0.1.0 (no record, no checksums): exact restore, but not claimed verified."""
    shutil.copytree(V1, tmp_path / "v1")
    fx = tmp_path / "v1"
    done = _run("unmerge", fx / "merged.safetensors", fx / "adapter", "-o", fx / "u.safetensors",
                "--residual", fx / "residual.safetensors")  # a real process, as a user of the old release runs it
    assert done.returncode == 0, done.stderr
    assert (fx / "u.safetensors").read_bytes() == (fx / "base.safetensors").read_bytes()
    assert "exactly" not in done.stdout and "unverified" in done.stdout
    assert "could not be verified" in done.stderr and "no lora-ref merge record" in done.stderr
    # a removed entry is refused even in format 1 (it used to fall back to a silent fast unmerge)
    _tampered(fx / "residual.safetensors", fx / "bad.safetensors",
              lambda t, m: (t.pop("layer.q.weight::indices"), t.pop("layer.q.weight::values"), m["tensors"].pop("layer.q.weight")))
    _refused(_run("unmerge", fx / "merged.safetensors", fx / "adapter", "-o", fx / "x.safetensors",
                  "--residual", fx / "bad.safetensors"), "no entry")


# -- carried tensors --------------------------------------------------------------------------------
def _carrying(work: Path) -> Path:
    """Adapter ``a`` plus a modules_to_save head (float32 copy), a trainable bias and two trainable token rows."""
    rng = np.random.default_rng(5)
    adapter = _adapter(1)
    adapter.config.extra.update({"modules_to_save": ["head"], "trainable_token_indices": [7, 2]})
    adapter.extra_tensors = {f"{PREFIX}head.weight": rng.standard_normal((3, 8)).astype(np.float32),
                             f"{PREFIX}head.bias": rng.standard_normal(3).astype(np.float32),
                             f"{PREFIX}embed.token_adapter.trainable_tokens_delta": rng.standard_normal((2, 8)).astype(np.float32)}
    save_adapter(adapter, work / "carry")
    return work / "carry"


def test_carried_tensors_replace_and_exact_unmerge_restores(work: Path) -> None:
    carry = _carrying(work)
    base = load_file(work / "base.safetensors")
    file = load_file(carry / "adapter_model.safetensors")
    _ok("merge", work / "base.safetensors", carry, "-o", work / "m.safetensors", "--residual", work / "r.safetensors")
    merged = load_file(work / "m.safetensors")
    for key in ("head.weight", "head.bias"):  # the copy, rounded once to the base dtype
        want = np.asarray(file[PREFIX + key], dtype=np.float64).astype(bfloat16)
        assert np.array_equal(bits_of(merged[key]), bits_of(want)), key
    want = np.array(base["embed.weight"])
    want[[7, 2]] = np.asarray(file[f"{PREFIX}embed.token_adapter.trainable_tokens_delta"], dtype=np.float64).astype(bfloat16)
    assert np.array_equal(bits_of(merged["embed.weight"]), bits_of(want))
    # fast unmerge cannot restore replaced tensors: refused even with --fast
    _refused(_run("unmerge", work / "m.safetensors", carry, "-o", work / "u.safetensors", "--fast"), "--residual")
    done = _ok("unmerge", work / "m.safetensors", carry, "-o", work / "u.safetensors", "--residual", work / "r.safetensors")
    assert "exactly" in done.stdout
    assert (work / "u.safetensors").read_bytes() == (work / "base.safetensors").read_bytes()
    listing = json.loads(_ok("inspect", carry, "--json").stdout)
    kinds = {row["target"]: row["kind"] for row in listing["carried"]}
    assert kinds == {"head.weight": "modules_to_save", "head.bias": "modules_to_save", "embed.weight": "trainable_tokens"}
    assert "modules_to_save" in _ok("inspect", carry).stdout


def test_unknown_tensor_refused_by_name(work: Path) -> None:
    adapter = _adapter(1)
    adapter.extra_tensors = {f"{PREFIX}head.modules_to_save.default.weight": np.ones((3, 8), np.float32)}
    save_adapter(adapter, work / "odd")
    for argv in (("inspect", work / "odd"), ("merge", work / "base.safetensors", work / "odd", "-o", work / "m.safetensors")):
        _refused(_run(*argv), "head.modules_to_save.default.weight", "refusing")
    assert not (work / "m.safetensors").exists()


def test_carried_shape_mismatch_and_ledger_refuse(work: Path) -> None:
    carry = _carrying(work)
    adapter = load_adapter(carry)
    tensors = load_file(work / "base.safetensors")
    tensors["head.weight"] = np.zeros((4, 8), bfloat16)
    save_file(work / "other.safetensors", tensors)
    _refused(_run("merge", work / "other.safetensors", carry, "-o", work / "m.safetensors"), "head.weight")
    from lora_ref.ledger import MergeLedger

    with pytest.raises(CarriedTensorError):
        MergeLedger({k: np.array(v) for k, v in tensors.items()}).merge(adapter)


def test_combine_refuses_carried(work: Path) -> None:
    from lora_ref.combine import combine

    with pytest.raises(CarriedTensorError):
        combine([load_adapter(_carrying(work)), load_adapter(work / "a")], [0.5, 0.5], "cat")
