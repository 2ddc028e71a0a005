"""Hypothesis-driven fuzzing of every loader that reads files from strangers.

Property (one for each loader): on any input the loader either succeeds or raises a
:class:`lora_ref.errors.LoraRefError`; any other exception (IndexError, RecursionError,
OverflowError, UnicodeError, a NumPy ValueError, ...) is a bug and fails the test.

Inputs come three ways: structured (a header or config assembled from the format's own fields,
each drawn from valid values, boundary values and wrong types), mutated (a valid file from the
corpus fixture with bytes flipped, cut or inserted), and raw bytes. CI runs a few seconds per
loader; ``LORA_REF_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`` runs longer. Loaders covered:
safetensors (headers, data), adapter_config.json, adapter directories, residual files,
conformance case.json (with its tensor files), ONNX Runtime .onnx_adapter files and sharded
checkpoint indexes (model.safetensors.index.json) and adapter trees (tree.json).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_peer
from corpus.make_corpus import fixture_adapter, write_fixtures
from lora_ref.adapter import WEIGHTS_NAME, load_adapter
from lora_ref.checkpoint import RESIDUAL_META_KEY, load_residuals, unmerge_checkpoint
from lora_ref.config import CONFIG_NAME, LoraConfig
from lora_ref.errors import LoraRefError
from lora_ref.safetensors_io import CODE_TO_DTYPE, SafetensorsFile, load_file, read_metadata, save_file

EXAMPLES = int(os.environ.get("LORA_REF_FUZZ_EXAMPLES", "150"))
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_fixtures(root)
    return root


def typed_or_ok(call, *args, **kwargs) -> None:
    """Run ``call``; a LoraRefError is a correct refusal, anything else propagates as a failure."""
    try:
        call(*args, **kwargs)
    except LoraRefError as exc:
        assert str(exc), "a refusal must carry a message"


# -- JSON values: the building blocks of hostile headers and configs -----------------------------
BOUNDARY_INTS = st.sampled_from([0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), BOUNDARY_INTS,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


# -- safetensors ----------------------------------------------------------------------------------
def read_everything(path: Path) -> None:
    """Open, validate and touch every tensor (the work a merge does on its input)."""
    with SafetensorsFile(path) as handle:
        for name in handle.keys():
            array = handle.get(name)
            assert array.nbytes == handle.tensors[name].nbytes
            assert array.shape == handle.tensors[name].shape
            array.sum() if array.dtype.kind in "fiub" else None


DTYPE_CODES = st.one_of(st.sampled_from(sorted(CODE_TO_DTYPE)), st.sampled_from(["F8_E4M3", "f32", "", "C64"]), JSON)
SHAPES = st.one_of(st.lists(st.integers(0, 5), max_size=4), st.lists(st.one_of(BOUNDARY_INTS, st.integers(-3, 3)),
                                                                      max_size=70), JSON)


@st.composite
def header_entries(draw) -> tuple[bytes, bytes]:
    """A header of a few entries whose fields are often right and sometimes hostile, plus data."""
    data_len = draw(st.integers(0, 256))
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), JSON))
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        code = draw(DTYPE_CODES)
        shape = draw(SHAPES)
        if draw(st.booleans()) and isinstance(code, str) and code in CODE_TO_DTYPE and isinstance(shape, list) \
                and all(type(d) is int and 0 <= d < 8 for d in shape):
            nbytes = int(np.prod(shape)) * CODE_TO_DTYPE[code].itemsize
            offsets: object = [offset, offset + nbytes]  # consistent (it may still run past the data)
            offset += nbytes
        else:
            offsets = draw(st.one_of(st.lists(st.one_of(st.integers(-4, 300), BOUNDARY_INTS), max_size=3), JSON))
        header[draw(st.text(max_size=6)) + str(i)] = {"dtype": code, "shape": shape, "data_offsets": offsets}
    raw = json.dumps(header).encode("utf-8")
    return raw, draw(st.binary(min_size=data_len, max_size=data_len))


@fuzz_settings
@given(parts=header_entries(), lie=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.integers(0, 400)))
def test_fuzz_safetensors_structured(work: Path, parts: tuple[bytes, bytes], lie: int | None) -> None:
    raw, data = parts
    path = work / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if lie is None else lie) + raw + data)
    typed_or_ok(read_everything, path)


@fuzz_settings
@given(data=st.data())
def test_fuzz_safetensors_mutated(work: Path, data: st.DataObject) -> None:
    blob = bytearray((work / "_fixtures" / "base.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[pos:pos + data.draw(st.integers(1, 64))]
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    path = work / "mutated.safetensors"
    path.write_bytes(bytes(blob))
    typed_or_ok(read_everything, path)


@fuzz_settings
@given(blob=st.binary(max_size=512))
def test_fuzz_safetensors_raw_bytes(work: Path, blob: bytes) -> None:
    path = work / "raw.safetensors"
    path.write_bytes(blob)
    typed_or_ok(read_everything, path)


# -- adapter_config.json --------------------------------------------------------------------------
CONFIG_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
                 "use_rslora", "use_dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
                 "init_lora_weights", "peft_type", "task_type", "inference_mode"]
REGEXES = st.one_of(st.text(alphabet="ab.*+?()[]{}|\\^$0-9", max_size=12), st.sampled_from(["q", "v", ".*", "layer\\.q"]))
CONFIG_VALUES = st.one_of(JSON, REGEXES, st.lists(REGEXES, max_size=3),
                          st.dictionaries(REGEXES, st.one_of(st.integers(-2, 9), st.floats()), max_size=3))


@fuzz_settings
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), CONFIG_VALUES, max_size=4),
       module=st.sampled_from(["layer.q", "layer.v", "model.layers.0.self_attn.q_proj", "x"]))
def test_fuzz_adapter_config(work: Path, changes: dict, module: str) -> None:
    """LoraConfig.load on a mutated config, then every per-module query the merge makes."""
    data = {**fixture_adapter().config.to_dict(), **changes}
    directory = work / "config"
    directory.mkdir(exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(data))

    def load_and_query() -> None:
        config = LoraConfig.load(directory)
        config.targets(module)
        config.scale_for(module)

    typed_or_ok(load_and_query)


@fuzz_settings
@given(text=st.one_of(st.text(max_size=64), st.binary(max_size=64).map(lambda b: b.decode("latin-1"))))
def test_fuzz_adapter_config_text(work: Path, text: str) -> None:
    directory = work / "config_text"
    directory.mkdir(exist_ok=True)
    (directory / CONFIG_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
    typed_or_ok(LoraConfig.load, directory)


@fuzz_settings
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), CONFIG_VALUES, max_size=3),
       drop=st.sets(st.sampled_from(["q.A", "q.B", "v.A", "v.B"]), max_size=2),
       reshape=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 7))),
       dtype=st.sampled_from(["float32", "float16", "float64", "int32", "bool"]))
def test_fuzz_adapter_directory(work: Path, changes: dict, drop: set, reshape, dtype: str) -> None:
    """load_adapter on a fixture adapter with a mutated config and dropped/reshaped/retyped tensors."""
    directory = work / "adapter"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(work / "_fixtures" / "adapter", directory)
    config = {**json.loads((directory / CONFIG_NAME).read_text()), **changes}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    tensors = load_file(directory / WEIGHTS_NAME)
    keys = sorted(tensors)
    for label in drop:
        module, part = label.split(".")
        tensors.pop(f"base_model.model.layer.{module}.lora_{part}.weight", None)
    if reshape is not None and keys:
        key = keys[0]
        tensors[key] = np.zeros(reshape, dtype=dtype)
    save_file(directory / WEIGHTS_NAME, tensors)
    typed_or_ok(load_adapter, directory)


# -- residual files -------------------------------------------------------------------------------
@fuzz_settings
@given(meta=st.one_of(JSON, st.fixed_dictionaries({"format": st.just("lora-ref-residual/1"), "tensors": JSON})),
       entry=st.one_of(st.none(), st.dictionaries(st.sampled_from(["shape", "dtype", "merged_digest", "delta_digest"]),
                                                  JSON, max_size=4)),
       indices=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
       value_dtype=st.sampled_from(["float32", "float16", "int64"]))
def test_fuzz_residual(work: Path, meta, entry, indices: list[int], value_dtype: str) -> None:
    """load_residuals + exact unmerge of the fixture with a hostile residual file."""
    fx = work / "_fixtures"
    good_meta = json.loads(read_metadata(fx / "residual.safetensors")[RESIDUAL_META_KEY])
    tensors = load_file(fx / "residual.safetensors")
    if entry is not None:  # keep the valid format but corrupt one tensor's entry and its arrays
        good_meta["tensors"]["layer.q.weight"] = {**good_meta["tensors"].get("layer.q.weight", {}), **entry}
        tensors["layer.q.weight::indices"] = np.array(indices, dtype=np.int64)
        tensors["layer.q.weight::values"] = np.zeros(len(indices), dtype=value_dtype)
        meta = good_meta
    path = work / "residual.safetensors"
    save_file(path, tensors, metadata={RESIDUAL_META_KEY: json.dumps(meta)})
    typed_or_ok(load_residuals, path)
    out = work / "unmerged.safetensors"
    out.unlink(missing_ok=True)
    typed_or_ok(unmerge_checkpoint, fx / "merged.safetensors", fixture_adapter(), out, residual_path=path)


# -- conformance case.json --------------------------------------------------------------------------
CASE_FIELDS = ["id", "operation", "dtype", "params", "inputs", "outputs", "bound", "spec", "description"]
TENSOR_SPECS = st.dictionaries(st.sampled_from(["A", "B", "W", "x", "y", "b"]),
                               st.one_of(JSON, st.fixed_dictionaries(
                                   {"dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "float8"]),
                                    "shape": st.one_of(st.lists(st.integers(-2, 30), max_size=3), JSON),
                                    "check": st.sampled_from(["bound", "bitwise", "approx"]),
                                    "K": st.one_of(st.integers(-2, 50), JSON)})), max_size=3)


@fuzz_settings
@given(changes=st.dictionaries(st.sampled_from(CASE_FIELDS), st.one_of(JSON, TENSOR_SPECS), max_size=3),
       cut=st.one_of(st.none(), st.integers(1, 200)))
def test_fuzz_case_json(work: Path, changes: dict, cut: int | None) -> None:
    """load_case + load_inputs + load_expected on the fixture case with mutated fields or a cut inputs file."""
    from lora_ref.conformance.casefile import load_case

    directory = work / "case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(work / "_fixtures" / "case", directory)
    data = {**json.loads((directory / "case.json").read_text()), **changes}
    (directory / "case.json").write_text(json.dumps(data))
    if cut is not None:
        blob = (directory / "inputs.safetensors").read_bytes()
        (directory / "inputs.safetensors").write_bytes(blob[:-cut])

    def load_all() -> None:
        case = load_case(directory)
        case.load_inputs()
        case.load_expected()

    typed_or_ok(load_all)


# -- .onnx_adapter against a dynamic graph ------------------------------------------------------------
@fuzz_settings
@given(data=st.data())
def test_fuzz_onnx_adapter(work: Path, data: st.DataObject) -> None:
    """ONNX Runtime's reader behind load_onnx_adapter, on mutated copies of a valid file."""
    require_peer("onnxruntime")
    from lora_ref.export.adapter_files import load_onnx_adapter
    from lora_ref.export.graphio import load_model
    from lora_ref.export.slots import slots_from_model

    blob = bytearray((work / "_fixtures" / "default.onnx_adapter").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(blob) - 1))
        if op == "flip":
            blob[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[pos:pos + data.draw(st.integers(1, 32))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    path = work / "mutated.onnx_adapter"
    path.write_bytes(bytes(blob))
    typed_or_ok(load_onnx_adapter, path, slots_from_model(load_model(work / "_fixtures" / "dynamic.onnx")))


# -- sharded checkpoint index ---------------------------------------------------------------------------
SHARD_NAMES = st.one_of(st.sampled_from(["base.safetensors", "../base.safetensors", "/tmp/x.safetensors", "..", "",
                                         "sub/base.safetensors", "merged.safetensors", "missing.safetensors"]), JSON)


@fuzz_settings
@given(weight_map=st.one_of(JSON, st.dictionaries(st.sampled_from(["layer.q.weight", "layer.q.bias", "layer.v.weight",
                                                                   "layer.position_ids", "other"]),
                                                  SHARD_NAMES, max_size=5)),
       metadata=st.one_of(st.none(), JSON))
def test_fuzz_sharded_index(work: Path, weight_map, metadata) -> None:
    """read_index on an index beside the fixture's base/merged files (which it may or may not describe)."""
    from lora_ref.sharded import read_index

    index = work / "_fixtures" / "model.safetensors.index.json"
    data = {"weight_map": weight_map} if metadata is None else {"metadata": metadata, "weight_map": weight_map}
    index.write_text(json.dumps(data))
    typed_or_ok(read_index, index)


# -- adapter trees (tree.json) ------------------------------------------------------------------------
NODE_TEXT = st.one_of(st.sampled_from(["a", "b", "c", "..", "../a", "/tmp", "", "a/../b", "link"]),
                      st.text(max_size=6).filter(lambda t: "\x00" not in t))  # NUL: known bug, corpus tree_nul_in_path


@fuzz_settings
@given(nodes=st.one_of(JSON.filter(lambda v: "\\u0000" not in json.dumps(v)),
                       st.lists(st.fixed_dictionaries({"name": st.one_of(NODE_TEXT, JSON), "parent": st.one_of(st.none(), NODE_TEXT),
                                                       "adapter": NODE_TEXT}), max_size=4)),
       fmt=st.sampled_from(["lora-ref-tree/1", "lora-ref-tree/2"]))
def test_fuzz_tree(work: Path, nodes, fmt: str) -> None:
    """AdapterTree.load on the fixture tree's folder with a hostile tree.json."""
    from lora_ref.tree import AdapterTree

    (work / "_fixtures" / "tree" / "tree.json").write_text(json.dumps({"format": fmt, "nodes": nodes}))
    typed_or_ok(AdapterTree.load, work / "_fixtures" / "tree")
