"""Generate the hostile-input corpus: malformed files lora-ref must refuse with a typed error.

Run ``python tests/corpus/make_corpus.py [OUT_DIR]`` (default ``tests/corpus/generated/``,
gitignored); ``tests/test_corpus.py`` calls :func:`build_corpus` on a temporary directory. Nothing
here is a hand-made binary: every file is derived from a small valid fixture (a base checkpoint,
an adapter, a merged checkpoint and its exact residual, all written by lora-ref itself) and then
broken in one documented way.

Each case is a directory ``<root>/<name>/`` holding only the inputs it replaces; the others come
from ``<root>/_fixtures/``. ``<root>/manifest.json`` lists, per case: the operation that consumes
it (``merge``: base + adapter -> merged, or ``unmerge``: merged + adapter + residual -> base), its
input paths, the documented error class (a name in :mod:`lora_ref.errors`) and a one-line reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_ref.adapter import PREFIX, WEIGHTS_NAME, Adapter, LoraModule, save_adapter
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.config import CONFIG_NAME, LoraConfig
from lora_ref.safetensors_io import MAX_HEADER_BYTES, load_file, read_metadata, save_file

FIXTURES = "_fixtures"
MANIFEST = "manifest.json"
#: The file a pickle case's payload would create if anything ever unpickled it.
PICKLE_MARKER = "PICKLE_WAS_LOADED"


# -- the valid fixture everything is derived from ---------------------------------------------------
def fixture_adapter(seed: int = 0, r: int = 2) -> Adapter:
    """A linear adapter on ``layer.q`` and ``layer.v`` (W [6, 5], A [r, 5], B [6, r])."""
    rng = np.random.default_rng(seed)
    config = LoraConfig(r=r, lora_alpha=4, target_modules=["q", "v"])
    modules = {
        name: LoraModule(name=name, A=rng.standard_normal((r, 5)).astype(np.float32),
                         B=rng.standard_normal((6, r)).astype(np.float32))
        for name in ("layer.q", "layer.v")
    }
    return Adapter(config=config, modules=modules)


def fixture_base(seed: int = 1) -> dict[str, np.ndarray]:
    """Two targeted weights, an untargeted bias and an integer buffer (not merged, copied)."""
    rng = np.random.default_rng(seed)
    return {
        "layer.q.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "layer.q.bias": rng.standard_normal(6).astype(np.float32),
        "layer.v.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "layer.position_ids": np.arange(4, dtype=np.int64),
    }


def write_fixtures(root: Path) -> Path:
    """Write ``_fixtures/``: base, adapter/, merged + exact residual, and another base's residual."""
    fx = root / FIXTURES
    save_file(fx / "base.safetensors", fixture_base())
    adapter = fixture_adapter()
    save_adapter(adapter, fx / "adapter")
    merge_checkpoint(fx / "base.safetensors", adapter, fx / "merged.safetensors",
                     residual_path=fx / "residual.safetensors")
    shutil.copytree(SUITE / "cases" / FIXTURE_CASE, fx / "case")
    _write_tree(fx / "tree")
    if HAVE_ONNX:
        from lora_ref.export import export

        (fx / "graph").mkdir()
        _save_onnx(fixture_graph(), fx / "graph" / "model.onnx")
        export(fixture_graph(), [adapter], "dynamic", fx / "dynamic.onnx", adapter_out=fx)  # -> default.onnx_adapter
    return fx


#: The frozen conformance suite in the source tree, and the case the case.json inputs derive from.
SUITE = Path(__file__).resolve().parents[2] / "conformance"
FIXTURE_CASE = "linear/forward-basic-float32"


def fixture_graph(extra_nodes: tuple = ()):
    """An ONNX graph computing x W^T (+ b) for the fixture's layer.q and layer.v (Gemm, transB=1)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = fixture_base()
    nodes = [helper.make_node("Gemm", ["x", "layer.q.weight", "layer.q.bias"], ["q"], name="layer.q", transB=1),
             helper.make_node("Gemm", ["x", "layer.v.weight"], ["v"], name="layer.v", transB=1), *extra_nodes]
    graph = helper.make_graph(
        nodes, "fixture", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 6]) for n in ("q", "v")],
        [numpy_helper.from_array(weights[k], k) for k in ("layer.q.weight", "layer.q.bias", "layer.v.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _save_onnx(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


# -- raw builders ---------------------------------------------------------------------------------
def raw_safetensors(header: dict | bytes, data: bytes = b"", *, declared: int | None = None) -> bytes:
    """8-byte length + header + data; ``declared`` overrides the length field (to lie about it)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


class _OpenOnLoad:
    """Pickles to ``open(marker, "w")``: unpickling it creates the marker file (a live payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def marker_pickle(marker: Path) -> bytes:
    """Pickle bytes whose *loading* creates ``marker`` (used to prove lora-ref never unpickles)."""
    return pickle.dumps({PREFIX + "layer.q.lora_A.weight": _OpenOnLoad(marker)})


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One malformed input: where it goes, which operation reads it, what must be raised."""

    name: str
    operation: str  # "merge" or "unmerge"
    role: str  # "base", "adapter", "merged" or "residual": the input this case replaces
    error: str  # class name of the documented error (lora_ref.errors or a module's own subclass)
    reason: str
    build: Callable[[Path, Path], None]  # (case_dir, fixtures_dir) -> writes the input


CASES: list[Case] = []
_ROLE_PATH = {"base": "base.safetensors", "adapter": "adapter", "merged": "merged.safetensors",
              "residual": "residual.safetensors", "model": "graph/model.onnx", "graph": "dynamic.onnx",
              "onnx_adapter": "default.onnx_adapter", "case": "case", "tree": "tree"}
#: The inputs each operation reads, in order.
OPERATION_ROLES = {"merge": ("base", "adapter"), "unmerge": ("merged", "adapter", "residual"),
                   "export": ("model", "adapter"), "load_onnx_adapter": ("graph", "onnx_adapter"),
                   "load_case": ("case",), "load_tree": ("tree",)}
#: Optional parts: generated only when their packages are installed (the exporter's extras).
HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def case(name: str, role: str, error: str, reason: str, operation: str = "merge"):
    """Register a builder writing ``<case_dir>/<role path>``."""
    def register(build: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        CASES.append(Case(name, operation, role, error, reason, build))
        return build
    return register


def st_case(name: str, reason: str, content: Callable[[Path], bytes], error: str = "FileFormatError") -> None:
    """A malformed base checkpoint whose bytes are ``content(fixtures_dir)``."""
    def build(case_dir: Path, fx: Path) -> None:
        (case_dir / "base.safetensors").write_bytes(content(fx))
    CASES.append(Case(name, "merge", "base", error, reason, build))


def _good(fx: Path) -> bytes:
    return (fx / "base.safetensors").read_bytes()


def _header_len(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


F32_4 = b"\x00" * 16  # data for one F32 tensor of 4 elements

st_case("st_empty", "zero-byte file", lambda fx: b"")
st_case("st_short_length", "5 bytes: shorter than the 8-byte header length", lambda fx: _good(fx)[:5])
st_case("st_truncated_header", "cut inside the JSON header", lambda fx: _good(fx)[: 8 + _header_len(_good(fx)) // 2])
st_case("st_truncated_data", "cut inside the tensor data (offsets now past the end)", lambda fx: _good(fx)[:-7])
st_case("st_header_len_past_end", "header length 4 KiB in a 100-byte file",
        lambda fx: raw_safetensors(b"{}" + b" " * 90, declared=4096))
st_case("st_header_len_2_63", "header length 2^63: refused before any allocation",
        lambda fx: raw_safetensors(b"{}", declared=2**63))
st_case("st_header_over_limit", f"header length {MAX_HEADER_BYTES + 8} exceeds the 100 MB header limit",
        lambda fx: raw_safetensors(b"{}", declared=MAX_HEADER_BYTES + 8))
st_case("st_header_not_utf8", "header bytes are not UTF-8", lambda fx: raw_safetensors(b'{"\xff\xfe": 1}'))
st_case("st_header_not_json", "header is not JSON", lambda fx: raw_safetensors(b"{dtype: F32,"))
st_case("st_header_is_list", "header is a JSON array, not an object", lambda fx: raw_safetensors(b"[]"))
st_case("st_header_deep_nesting", "100k nested arrays (RecursionError in a naive parser)",
        lambda fx: raw_safetensors(b"[" * 100_000 + b"]" * 100_000))
st_case("st_header_huge_int", "an integer with 5000 digits (ValueError in Python's int parser)",
        lambda fx: raw_safetensors(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'))
st_case("st_duplicate_key", "the same tensor name twice (a parser would silently keep the last)",
        lambda fx: raw_safetensors(
            b'{"layer.q.weight":' + json.dumps(entry("F32", [4], 0, 16)).encode()
            + b',"layer.q.weight":' + json.dumps(entry("F32", [4], 16, 32)).encode() + b"}", F32_4 * 2))
st_case("st_overlapping_offsets", "two tensors share bytes",
        lambda fx: raw_safetensors({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, F32_4 * 2))
st_case("st_offsets_past_data", "data_offsets end past the data section",
        lambda fx: raw_safetensors({"a": entry("F32", [4], 0, 16)}, b"\x00" * 8))
st_case("st_offsets_reversed", "begin > end", lambda fx: raw_safetensors({"a": entry("F32", [0], 16, 0)}, F32_4))
st_case("st_offsets_negative", "negative begin", lambda fx: raw_safetensors({"a": entry("F32", [4], -16, 0)}, F32_4))
st_case("st_offsets_three", "data_offsets with three numbers",
        lambda fx: raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, F32_4))
st_case("st_bytes_vs_shape", "shape [2, 4] F32 needs 32 bytes, offsets give 16",
        lambda fx: raw_safetensors({"a": entry("F32", [2, 4], 0, 16)}, F32_4))
st_case("st_dtype_vs_bytes", "F64 [4] needs 32 bytes, offsets give 16",
        lambda fx: raw_safetensors({"a": entry("F64", [4], 0, 16)}, F32_4))
st_case("st_unknown_dtype", "dtype F8_E9 does not exist",
        lambda fx: raw_safetensors({"a": entry("F8_E9", [16], 0, 16)}, F32_4))
st_case("st_dtype_not_string", "dtype is a list (unhashable: a TypeError in a naive lookup)",
        lambda fx: raw_safetensors({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, F32_4))
st_case("st_shape_negative", "negative axis", lambda fx: raw_safetensors({"a": entry("F32", [-4], 0, 16)}, F32_4))
st_case("st_shape_float", "non-integer axis", lambda fx: raw_safetensors({"a": entry("F32", [4.0], 0, 16)}, F32_4))
st_case("st_shape_70_axes", "70 axes (NumPy cannot represent them)",
        lambda fx: raw_safetensors({"a": entry("F32", [1] * 70, 0, 4)}, b"\x00" * 4))
st_case("st_shape_absurd_empty", "an empty tensor of nominal shape [0, 2^40, 2^40]",
        lambda fx: raw_safetensors({"a": entry("F32", [0, 2**40, 2**40], 0, 0)}))
st_case("st_metadata_not_strings", "__metadata__ values are numbers",
        lambda fx: raw_safetensors({"__metadata__": {"format": 1}, "a": entry("F32", [4], 0, 16)}, F32_4))
st_case("st_metadata_list", "__metadata__ is an empty list",
        lambda fx: raw_safetensors({"__metadata__": [], "a": entry("F32", [4], 0, 16)}, F32_4))
st_case("st_lone_surrogate_name", "a tensor name holding an unpaired UTF-16 surrogate",
        lambda fx: raw_safetensors(b'{"\\ud800":' + json.dumps(entry("F32", [4], 0, 16)).encode() + b"}", F32_4))
st_case("st_entry_not_object", "a tensor entry that is a string", lambda fx: raw_safetensors({"a": "F32"}))
st_case("st_pickle_disguised", "a pickle renamed to .safetensors (read as a length, never unpickled)",
        lambda fx: marker_pickle(fx.parent / "st_pickle_disguised" / PICKLE_MARKER))
st_case("st_missing_target_key", "a valid checkpoint lacking layer.v.weight, which the adapter targets",
        lambda fx: _without(fx / "base.safetensors", "layer.v.weight"), error="TargetNotFoundError")
st_case("st_target_wrong_shape", "layer.q.weight is [5, 6] where the adapter needs [6, 5]",
        lambda fx: _replaced(fx / "base.safetensors", "layer.q.weight", np.zeros((5, 6), np.float32)),
        error="ShapeError")
st_case("st_target_int_dtype", "layer.q.weight is int32: not a float weight",
        lambda fx: _replaced(fx / "base.safetensors", "layer.q.weight", np.zeros((6, 5), np.int32)),
        error="DTypeError")


def _without(path: Path, key: str) -> bytes:
    return _bytes_of({k: v for k, v in load_file(path).items() if k != key})


def _replaced(path: Path, key: str, array: np.ndarray) -> bytes:
    return _bytes_of({k: (array if k == key else v) for k, v in load_file(path).items()})


def _bytes_of(tensors: dict[str, np.ndarray]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(Path(tmp) / "t.safetensors", tensors)
        return (Path(tmp) / "t.safetensors").read_bytes()


# -- adapters -------------------------------------------------------------------------------------
def adapter_case(name: str, error: str, reason: str, *, config: dict | None = None,
                 config_text: str | None = None, tensors: Callable[[dict], dict] | None = None,
                 weights_bytes: Callable[[bytes], bytes] | None = None) -> None:
    """An adapter directory copied from the fixture, then broken in its config or its weights."""
    def build(case_dir: Path, fx: Path) -> None:
        target = case_dir / "adapter"
        shutil.copytree(fx / "adapter", target)
        if config is not None or config_text is not None:
            text = config_text
            if text is None:
                data = json.loads((target / CONFIG_NAME).read_text())
                data.update(config)
                text = json.dumps(data)  # allow_nan: NaN is written as the (non-standard) literal
            (target / CONFIG_NAME).write_text(text)
        if tensors is not None:
            (target / WEIGHTS_NAME).write_bytes(_bytes_of(tensors(load_file(target / WEIGHTS_NAME))))
        if weights_bytes is not None:
            (target / WEIGHTS_NAME).write_bytes(weights_bytes((target / WEIGHTS_NAME).read_bytes()))
    CASES.append(Case(name, "merge", "adapter", error, reason, build))


QA = PREFIX + "layer.q.lora_A.weight"
QB = PREFIX + "layer.q.lora_B.weight"

adapter_case("cfg_r_string", "ConfigError", 'r is the string "8"', config={"r": "8"})
adapter_case("cfg_r_zero", "ConfigError", "r = 0", config={"r": 0})
adapter_case("cfg_r_negative", "ConfigError", "r = -2", config={"r": -2})
adapter_case("cfg_r_float", "ConfigError", "r = 2.0", config={"r": 2.0})
adapter_case("cfg_alpha_nan", "ConfigError", "lora_alpha = NaN (JSON literal)", config={"lora_alpha": float("nan")})
adapter_case("cfg_alpha_huge_int", "ConfigError", "lora_alpha = 10^400 (beyond float range)",
             config_text=json.dumps({"r": 2, "lora_alpha": 10**400, "target_modules": ["q", "v"], "peft_type": "LORA"}))
adapter_case("cfg_alpha_string", "ConfigError", 'lora_alpha = "16"', config={"lora_alpha": "16"})
adapter_case("cfg_unknown_peft_type", "ConfigError", 'peft_type = "IA3"', config={"peft_type": "IA3"})
adapter_case("cfg_targets_nothing", "ConfigError", "target_modules match none of the adapter's modules",
             config={"target_modules": ["k_proj", "o_proj"]})
adapter_case("cfg_targets_wrong_type", "ConfigError", "target_modules = 7", config={"target_modules": 7})
adapter_case("cfg_targets_bad_regex", "ConfigError", "target_modules regex nested 2000 deep",
             config={"target_modules": "(" * 2000 + ")" * 2000})
adapter_case("cfg_dropout_range", "ConfigError", "lora_dropout = 1.5", config={"lora_dropout": 1.5})
adapter_case("cfg_bool_string", "ConfigError", 'use_rslora = "yes"', config={"use_rslora": "yes"})
adapter_case("cfg_rank_pattern_zero", "ConfigError", "rank_pattern gives a module r = 0",
             config={"rank_pattern": {"q": 0}})
adapter_case("cfg_alpha_pattern_repeat_overflow", "ConfigError", "alpha_pattern key a{99999999999}",
             config={"alpha_pattern": {"a{99999999999}": 2}})
adapter_case("cfg_not_json", "FileFormatError", "adapter_config.json is not JSON", config_text="{r: 8,")
adapter_case("cfg_deep_json", "FileFormatError", "adapter_config.json nested 100k deep",
             config_text="[" * 100_000 + "]" * 100_000)
adapter_case("cfg_is_list", "ConfigError", "adapter_config.json is a JSON array", config_text="[]")
adapter_case("cfg_rank_disagrees", "ConfigError", "config r = 4 but lora_A has rank 2", config={"r": 4})
adapter_case("ad_missing_lora_B", "FileFormatError", "layer.q has lora_A but no lora_B",
             tensors=lambda t: {k: v for k, v in t.items() if k != QB})
adapter_case("ad_rank_mismatch", "ShapeError", "lora_A rank 2, lora_B rank 3",
             tensors=lambda t: {**t, QB: np.zeros((6, 3), np.float32)})
adapter_case("ad_int_dtype", "DTypeError", "lora_A is int32", tensors=lambda t: {**t, QA: np.zeros((2, 5), np.int32)})
adapter_case("ad_nan_weights", "NonFiniteError", "lora_B holds NaN (refused at merge)",
             tensors=lambda t: {**t, QB: np.full((6, 2), np.nan, np.float32)})
adapter_case("ad_wrong_in_features", "ShapeError", "lora_A [2, 7] against a base weight with 5 inputs",
             tensors=lambda t: {**t, QA: np.zeros((2, 7), np.float32)})
adapter_case("ad_weights_truncated", "FileFormatError", "adapter_model.safetensors cut short",
             weights_bytes=lambda b: b[: len(b) // 2])
adapter_case("ad_no_lora_tensors", "FileFormatError", "weights hold no lora_A/lora_B keys",
             tensors=lambda t: {"something.else": np.zeros(3, np.float32)})


@case("ad_targets_missing_module", "adapter", "TargetNotFoundError", "the adapter targets layer.k, which the base lacks")
def _targets_missing(case_dir: Path, fx: Path) -> None:
    adapter = fixture_adapter()
    adapter.config.target_modules = ["q", "v", "k"]
    q = adapter.modules["layer.q"]
    adapter.modules["layer.k"] = LoraModule("layer.k", q.A.copy(), q.B.copy())
    save_adapter(adapter, case_dir / "adapter")


def _pickle_dir(case_dir: Path, file_name: str, with_config: bool = True) -> None:
    target = case_dir / "adapter"
    target.mkdir(parents=True)
    if with_config:
        fixture_adapter().config.save(target)
    (target / file_name).write_bytes(marker_pickle(case_dir / PICKLE_MARKER))


@case("pickle_adapter_model_bin", "adapter", "UnsafeFileError",
      "adapter_model.bin: a pickle whose loading would create a marker file; refused, never loaded")
def _pickle_bin(case_dir: Path, fx: Path) -> None:
    _pickle_dir(case_dir, "adapter_model.bin")


@case("pickle_adapter_model_pt", "adapter", "UnsafeFileError", "adapter_model.pt (pickle), no config either")
def _pickle_pt(case_dir: Path, fx: Path) -> None:
    _pickle_dir(case_dir, "adapter_model.pt", with_config=False)


@case("ad_not_a_directory", "adapter", "FileFormatError", "the adapter path is a file")
def _not_dir(case_dir: Path, fx: Path) -> None:
    (case_dir / "adapter").write_bytes(b"not a directory")


@case("cfg_is_directory", "adapter", "FileFormatError", "adapter_config.json is a directory")
def _config_dir(case_dir: Path, fx: Path) -> None:
    shutil.copytree(fx / "adapter", case_dir / "adapter")
    (case_dir / "adapter" / CONFIG_NAME).unlink()
    (case_dir / "adapter" / CONFIG_NAME).mkdir()


# -- residuals (exact unmerge of the fixture's merged checkpoint) ----------------------------------
def residual_case(name: str, error: str, reason: str):
    def register(make: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        CASES.append(Case(name, "unmerge", "residual", error, reason,
                          lambda case_dir, fx: make(case_dir / "residual.safetensors", fx)))
        return make
    return register


@residual_case("res_other_weight", "ResidualMismatchError", "residual of another base's merge (merged checksum differs)")
def _res_other_weight(out: Path, fx: Path) -> None:
    other = out.parent / "_other"
    save_file(other / "base.safetensors", fixture_base(seed=7))
    merge_checkpoint(other / "base.safetensors", fixture_adapter(), other / "merged.safetensors", residual_path=out)
    shutil.rmtree(other)


@residual_case("res_other_adapter", "ResidualMismatchError", "residual made with another adapter (delta checksum differs)")
def _res_other_adapter(out: Path, fx: Path) -> None:
    other = out.parent / "_other"
    merge_checkpoint(fx / "base.safetensors", fixture_adapter(seed=5), other / "merged.safetensors", residual_path=out)
    shutil.rmtree(other)


@residual_case("res_no_metadata", "FileFormatError", "a plain safetensors file, no lora_ref.residual metadata")
def _res_plain(out: Path, fx: Path) -> None:
    save_file(out, {"x": np.zeros(2, np.float32)})


@residual_case("res_metadata_not_json", "FileFormatError", "lora_ref.residual metadata is not JSON")
def _res_bad_meta(out: Path, fx: Path) -> None:
    tensors = load_file(fx / "residual.safetensors")
    save_file(out, tensors, metadata={"lora_ref.residual": "{format: 1"})


@residual_case("res_metadata_deep", "FileFormatError", "lora_ref.residual metadata nested 100k deep")
def _res_deep_meta(out: Path, fx: Path) -> None:
    save_file(out, {"x": np.zeros(1, np.float32)}, metadata={"lora_ref.residual": "[" * 100_000 + "]" * 100_000})


@residual_case("res_untargeted_key", "FileFormatError", "residual for layer.q.bias, which the adapter does not target")
def _res_untargeted(out: Path, fx: Path) -> None:
    tensors = load_file(fx / "residual.safetensors")
    meta = json.loads(_meta(fx / "residual.safetensors"))
    meta["tensors"]["layer.q.bias"] = {"shape": [6], "dtype": "float32", "merged_digest": "0", "delta_digest": "0"}
    tensors["layer.q.bias::indices"] = np.zeros(0, np.int64)
    tensors["layer.q.bias::values"] = np.zeros(0, np.float32)
    save_file(out, tensors, metadata={"lora_ref.residual": json.dumps(meta)})


@residual_case("res_indices_wrong_dtype", "FileFormatError", "residual indices stored as float32")
def _res_index_dtype(out: Path, fx: Path) -> None:
    tensors = load_file(fx / "residual.safetensors")
    key = next(k for k in tensors if k.endswith("::indices"))
    tensors[key] = tensors[key].astype(np.float32)
    save_file(out, tensors, metadata={"lora_ref.residual": _meta(fx / "residual.safetensors")})


@residual_case("res_missing_entry", "FileFormatError", "metadata lists a tensor whose ::values are missing")
def _res_missing(out: Path, fx: Path) -> None:
    tensors = load_file(fx / "residual.safetensors")
    key = next(k for k in tensors if k.endswith("::values"))
    del tensors[key]
    save_file(out, tensors, metadata={"lora_ref.residual": _meta(fx / "residual.safetensors")})


def _meta(path: Path) -> str:
    return read_metadata(path)["lora_ref.residual"]


# -- integrity (docs/integrity.md): carried tensors applied or refused, verified residuals ---------
def _integrity_cases() -> None:
    """Adapters carrying tensors that cannot be applied, and residuals edited after the merge."""
    head = {"modules_to_save": ["q"]}
    adapter_case("ad_unknown_tensor", "CarriedTensorError", "a key that is no LoRA factor nor a declared carried tensor "
                 "(PEFT's unstripped modules_to_save.default form)",
                 tensors=lambda t: {**t, PREFIX + "layer.q.modules_to_save.default.weight": np.zeros((6, 5), np.float32)})
    adapter_case("ad_tokens_without_indices", "CarriedTensorError", "a trainable_tokens_delta with no trainable_token_indices",
                 tensors=lambda t: {**t, PREFIX + "layer.token_adapter.trainable_tokens_delta": np.zeros((2, 5), np.float32)})
    adapter_case("ad_tokens_count_mismatch", "CarriedTensorError", "3 trainable token ids for a delta of 2 rows",
                 config={"trainable_token_indices": [0, 1, 2]},
                 tensors=lambda t: {**t, PREFIX + "layer.token_adapter.trainable_tokens_delta": np.zeros((2, 5), np.float32)})
    adapter_case("ad_saved_copy_wrong_shape", "ShapeError", "a modules_to_save copy of layer.q.bias with 4 entries, base has 6",
                 config=head, tensors=lambda t: {**t, PREFIX + "layer.q.bias": np.zeros(4, np.float32)})
    adapter_case("ad_saved_copy_and_lora", "CarriedTensorError", "a modules_to_save copy of layer.q.weight, which LoRA also merges",
                 config=head, tensors=lambda t: {**t, PREFIX + "layer.q.weight": np.zeros((6, 5), np.float32)})

    def flipped(suffix: str) -> Callable[[Path, Path], None]:
        def make(out: Path, fx: Path) -> None:
            tensors = {k: np.array(v) for k, v in load_file(fx / "residual.safetensors").items()}
            key = next(k for k in tensors if k.endswith(suffix) and tensors[k].size)
            tensors[key].reshape(-1).view(np.uint8)[0] ^= 1
            save_file(out, tensors, metadata=read_metadata(fx / "residual.safetensors"))
        return make

    residual_case("res_bit_flipped_in_values", "ExactnessError", "one bit of a residual value flipped (checksum)")(flipped("::values"))
    residual_case("res_bit_flipped_in_indices", "ExactnessError", "one bit of a residual index flipped (checksum)")(flipped("::indices"))

    @residual_case("res_entry_removed", "ExactnessError", "a target's entry removed from tensors and metadata, still listed")
    def _res_entry_removed(out: Path, fx: Path) -> None:
        tensors = load_file(fx / "residual.safetensors")
        meta = json.loads(_meta(fx / "residual.safetensors"))
        key = sorted(meta["tensors"])[0]
        del meta["tensors"][key]
        kept = {k: v for k, v in tensors.items() if not k.startswith(key + "::")}
        save_file(out, kept, metadata={**read_metadata(fx / "residual.safetensors"), "lora_ref.residual": json.dumps(meta)})


_integrity_cases()


# -- ONNX graphs (export) and .onnx_adapter files (the exporter's loaders) --------------------------
def _external_case(name: str, reason: str, location: Callable[[Path], str], link: bool = False) -> None:
    """A graph whose external data points outside its folder (at a real file holding valid data)."""
    def build(case_dir: Path, fx: Path) -> None:
        import onnx

        source = case_dir / "data_source" / "model.onnx"
        source.parent.mkdir()
        onnx.save_model(fixture_graph(), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        secret = case_dir / "outside.bin"  # beside graph/, not inside it
        shutil.move(source.parent / "weights.bin", secret)
        refs = onnx.load(str(source), load_external_data=False)
        shutil.rmtree(source.parent)
        for tensor in refs.graph.initializer:
            for item in tensor.external_data:
                if item.key == "location":
                    item.value = location(case_dir)
        (case_dir / "graph").mkdir()
        if link:
            (case_dir / "graph" / "weights.bin").symlink_to(secret)
        onnx.save_model(refs, str(case_dir / "graph" / "model.onnx"))
    CASES.append(Case(name, "export", "model", "FileFormatError", reason, build))


def _graph_case(name: str, reason: str, write: Callable[[Path], None], error: str = "FileFormatError") -> None:
    def build(case_dir: Path, fx: Path) -> None:
        (case_dir / "graph").mkdir()
        write(case_dir / "graph" / "model.onnx")
    CASES.append(Case(name, "export", "model", error, reason, build))


def _onnx_adapter_case(name: str, reason: str, tensors: Callable[[], dict] | None = None,
                       raw: Callable[[Path, Path], bytes] | None = None, error: str = "AdapterNameError") -> None:
    def build(case_dir: Path, fx: Path) -> None:
        target = case_dir / "default.onnx_adapter"
        if raw is not None:
            target.write_bytes(raw(case_dir, fx))
            return
        import onnxruntime as ort

        arrays = {k: np.ascontiguousarray(v) for k, v in tensors().items()}
        writer = ort.AdapterFormat()
        writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
        writer.export_adapter(str(target))
    CASES.append(Case(name, "load_onnx_adapter", "onnx_adapter", error, reason, build))


if HAVE_ONNX:
    _external_case("onnx_external_parent", "external data location '../outside.bin' (outside the graph's folder)",
                   lambda case_dir: "../outside.bin")
    _external_case("onnx_external_absolute", "external data location is an absolute path",
                   lambda case_dir: str((case_dir / "outside.bin").resolve()))
    _external_case("onnx_external_symlink", "external data is a symlink inside the folder to a file outside it",
                   lambda case_dir: "weights.bin", link=True)
    _graph_case("onnx_not_protobuf", "model.onnx is not a protobuf", lambda path: path.write_bytes(b"\x08\x07junk" * 8))
    _graph_case("onnx_pickle", "a pickle named model.onnx (never unpickled)",
                lambda path: path.write_bytes(marker_pickle(path.parent.parent / PICKLE_MARKER)))
    _graph_case("onnx_unknown_op", "a node of op type NoSuchOp",
                write=lambda path: _save_onnx(fixture_graph((_node("NoSuchOp", ["q"], ["z"]),)), path))
    _graph_case("onnx_undefined_input", "a node reading a tensor nothing produces",
                write=lambda path: _save_onnx(fixture_graph((_node("Relu", ["nowhere"], ["z"]),)), path))
    _onnx_adapter_case("onnx_adapter_foreign_names", "tensors named for another model's modules",
                       lambda: {"model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((5, 2), np.float32),
                                "model.layers.0.mlp.up_proj.lora_B.weight": np.zeros((2, 6), np.float32)})
    _onnx_adapter_case("onnx_adapter_wrong_shape", "layer.q's A is [7, 2] where the graph's input is [5, r]",
                       lambda: {"layer.q.lora_A.weight": np.zeros((7, 2), np.float32),
                                "layer.q.lora_B.weight": np.zeros((2, 6), np.float32)})
    _onnx_adapter_case("onnx_adapter_truncated", "the fixture's .onnx_adapter cut in half", error="FileFormatError",
                       raw=lambda case_dir, fx: (fx / "default.onnx_adapter").read_bytes()[:-40])
    _onnx_adapter_case("onnx_adapter_pickle", "a pickle named default.onnx_adapter (never unpickled)",
                       error="FileFormatError", raw=lambda case_dir, fx: marker_pickle(case_dir / PICKLE_MARKER))


def _node(op: str, inputs: list[str], outputs: list[str]):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name="hostile")


# -- conformance case.json (the conformance runner's loader) ---------------------------------------
def case_json_case(name: str, reason: str, edit: Callable[[dict], object] | None = None, text: str | None = None,
                   files: Callable[[Path], None] | None = None) -> None:
    """The fixture case directory with its case.json edited (``edit`` returns the new JSON) or replaced."""
    def build(case_dir: Path, fx: Path) -> None:
        target = case_dir / "case"
        shutil.copytree(fx / "case", target)
        if edit is not None:
            data = json.loads((target / "case.json").read_text())
            (target / "case.json").write_text(json.dumps(edit(data)))
        if text is not None:
            (target / "case.json").write_text(text)
        if files is not None:
            files(target)
    CASES.append(Case(name, "load_case", "case", "CaseFormatError", reason, build))




# -- adapter trees (tree.json + one adapter directory per node) --------------------------------------
def _tree_json(*nodes: tuple[object, object, object]) -> str:
    return json.dumps({"format": "lora-ref-tree/1",
                       "nodes": [{"name": n, "parent": p, "adapter": a} for n, p, a in nodes]})


def _write_tree(directory: Path) -> None:
    """A two-node tree: ``a`` on the base, ``b`` below ``a`` (adapters of the fixture's shapes)."""
    save_adapter(fixture_adapter(seed=0), directory / "a")
    save_adapter(fixture_adapter(seed=5), directory / "b")
    (directory / "tree.json").write_text(_tree_json(("a", None, "a"), ("b", "a", "b")))


def tree_case(name: str, reason: str, text: str | Callable[[Path], str] | None = None,
              files: Callable[[Path], None] | None = None, error: str = "TreeFormatError") -> None:
    """The fixture tree with its tree.json replaced by ``text`` and/or its files changed by ``files``."""
    def build(case_dir: Path, fx: Path) -> None:
        target = case_dir / "tree"
        shutil.copytree(fx / "tree", target)
        if files is not None:
            files(target)
        if text is not None:
            (target / "tree.json").write_text(text if isinstance(text, str) else text(target))
    CASES.append(Case(name, "load_tree", "tree", error, reason, build))


def _outside_adapter(tree: Path) -> None:
    shutil.copytree(tree / "a", tree.parent / "outside_adapter")


tree_case("tree_not_json", "tree.json is not JSON", text="{nodes: [")
tree_case("tree_wrong_format", "format lora-ref-tree/9", text=json.dumps({"format": "lora-ref-tree/9", "nodes": []}))
tree_case("tree_adapter_parent", "a node's adapter is '../outside_adapter' (a real adapter outside the tree)",
          files=_outside_adapter, text=_tree_json(("a", None, "../outside_adapter")))
tree_case("tree_adapter_absolute", "a node's adapter is an absolute path to a real adapter",
          files=_outside_adapter, text=lambda tree: _tree_json(("a", None, str((tree.parent / "outside_adapter").resolve()))))
tree_case("tree_adapter_symlink", "a node's adapter is a symlink inside the tree to an adapter outside it",
          files=lambda tree: (_outside_adapter(tree), (tree / "link").symlink_to(tree.parent / "outside_adapter")),
          text=_tree_json(("a", None, "link")))
tree_case("tree_cycle", "a -> b -> a", text=_tree_json(("a", "b", "a"), ("b", "a", "b")))
tree_case("tree_unknown_parent", "b's parent z does not exist", text=_tree_json(("a", None, "a"), ("b", "z", "b")))
tree_case("tree_duplicate_name", "two nodes named a", text=_tree_json(("a", None, "a"), ("a", None, "b")))
tree_case("tree_bad_name", "a node named '../a'", text=_tree_json(("../a", None, "a")))
tree_case("tree_name_not_string", "a node named 7", text=_tree_json((7, None, "a")))
tree_case("tree_pickle_node", "node b's directory holds only adapter_model.bin (a pickle)", error="UnsafeFileError",
          files=lambda tree: ((tree / "b" / WEIGHTS_NAME).unlink(),
                              (tree / "b" / "adapter_model.bin").write_bytes(marker_pickle(tree.parent / PICKLE_MARKER))))
tree_case("tree_nul_in_path", "a node's adapter path holds a NUL byte", text=_tree_json(("a", None, "a\u0000b")))
tree_case("tree_deep_json", "tree.json nested 100k deep", text="[" * 100_000 + "]" * 100_000)
tree_case("tree_huge_int", "an integer of 5000 digits", text='{"format": ' + "9" * 5000 + "}")


# -- hostile command lines (issue 10: paths, writes, matching, inputs, messages, manifests) ----------
@dataclass
class Scenario:
    """A command line lora-ref must refuse: built in a work folder holding copies of the fixtures.

    ``build(work)`` sets the trap and returns the CLI arguments. Asserted by tests/test_corpus.py:
    the documented error class, exit 2, one safe line (holding ``expect``), and the work folder
    unchanged afterwards, byte for byte (no output, no temporary, no folder left behind).
    """

    name: str
    error: str
    reason: str
    build: Callable[[Path], list[str]]
    expect: str = ""
    needs_onnx: bool = False


SCENARIOS: list[Scenario] = []
WORK_FILES = ("base.safetensors", "adapter", "merged.safetensors", "residual.safetensors", "graph")
#: A process id above Linux's largest (pid_max <= 2^22): a temporary marked with it is always stale.
DEAD_PID = 999_999_999


def scenario(name: str, error: str, reason: str, expect: str = "", needs_onnx: bool = False):
    def register(build: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        SCENARIOS.append(Scenario(name, error, reason, build, expect, needs_onnx))
        return build
    return register


def scenario_work(fx: Path, work: Path) -> Path:
    """Copy the fixtures a scenario starts from into ``work``."""
    work.mkdir(parents=True)
    for name in WORK_FILES:
        source = fx / name
        if source.is_dir():
            shutil.copytree(source, work / name)
        elif source.exists():
            shutil.copy(source, work / name)
    return work


def _merge(w: Path, out: str = "out.safetensors", residual: str | None = None, base: str = "base.safetensors",
           adapter: str = "adapter") -> list[str]:
    argv = ["merge", str(w / base), str(w / adapter), "-o", str(w / out)]
    return argv + (["--residual", str(w / residual)] if residual else [])


def _export(w: Path, out: str, model: str = "graph/model.onnx", *extra: str) -> list[str]:
    return ["export", str(w / model), str(w / "adapter"), "--mode", "merged", "-o", str(w / out), *extra]


def _sharded(w: Path, layout: dict[str, str] | None = None, dtypes: dict[str, object] | None = None) -> Path:
    """The fixture base as a two-shard checkpoint in ``w/model`` (optionally some tensors re-typed)."""
    tensors = {k: v.astype(dtypes[k]) if dtypes and k in dtypes else v for k, v in fixture_base().items()}
    layout = layout or {"layer.q.weight": "a.safetensors", "layer.q.bias": "a.safetensors",
                        "layer.v.weight": "b.safetensors", "layer.position_ids": "b.safetensors"}
    folder = w / "model"
    folder.mkdir()
    for shard in dict.fromkeys(layout.values()):
        save_file(folder / shard, {k: v for k, v in tensors.items() if layout[k] == shard})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": layout}))
    return index


def _edit_config(w: Path, **fields: object) -> None:
    path = w / "adapter" / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def _external_model(w: Path, location: str) -> Path:
    """The fixture graph saved in ``w/ext`` with its tensors in the external-data file ``location``."""
    import onnx

    (w / "ext").mkdir()
    path = w / "ext" / "model.onnx"
    onnx.save_model(fixture_graph(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _renamed_adapter(w: Path, old: str, new: str) -> None:
    """The fixture adapter with module ``old`` renamed ``new`` (targeted by name)."""
    weights = w / "adapter" / WEIGHTS_NAME
    tensors = {k.replace(f".{old}.", f".{new}."): v for k, v in load_file(weights).items()}
    save_file(weights, tensors)
    _edit_config(w, target_modules=["layer.v", new])


# one path guard
@scenario("guard_out_symlink_to_adapter_weights", "OverwriteRefusedError", "-o is a symlink to the adapter's weights",
          "adapter file")
def _(w):
    (w / "link.safetensors").symlink_to(w / "adapter" / WEIGHTS_NAME)
    return _merge(w, out="link.safetensors")


@scenario("guard_out_hardlink_of_base", "OverwriteRefusedError", "-o is a hard link of the base (same inode)", "base")
def _(w):
    os.link(w / "base.safetensors", w / "copy.safetensors")
    return _merge(w, out="copy.safetensors")


@scenario("guard_residual_via_symlinked_folder", "OverwriteRefusedError",
          "--residual names the base through a symlinked folder", "residual")
def _(w):
    (w / "alias").symlink_to(w)
    return _merge(w, residual="alias/base.safetensors")


@scenario("guard_unmerge_out_hardlink_of_residual", "OverwriteRefusedError",
          "unmerge -o is a hard link of the residual it reads", "residual")
def _(w):
    os.link(w / "residual.safetensors", w / "r2.safetensors")
    return ["unmerge", str(w / "merged.safetensors"), str(w / "adapter"), "-o", str(w / "r2.safetensors"),
            "--residual", str(w / "residual.safetensors")]


@scenario("guard_sharded_out_is_input_folder_alias", "OverwriteRefusedError",
          "sharded merge -o is the input folder through a symlink", "input shard")
def _(w):
    index = _sharded(w)
    (w / "alias").symlink_to(w / "model")
    return ["merge", str(index), str(w / "adapter"), "-o", str(w / "alias")]


@scenario("guard_input_named_like_stale_temporary", "OverwriteRefusedError",
          "the base is named like a stale temporary of the output (it would be cleaned up)", "stale")
def _(w):
    stale = f".out.safetensors.lora-ref-{DEAD_PID}.x.partial"
    os.rename(w / "base.safetensors", w / stale)
    return _merge(w, base=stale)


@scenario("guard_export_out_is_adapter_weights", "OverwriteRefusedError",
          "export -o names the adapter's own adapter_model.safetensors", "adapter file", needs_onnx=True)
def _(w):
    return _export(w, f"adapter/{WEIGHTS_NAME}")


@scenario("guard_export_out_is_input_external_data", "OverwriteRefusedError",
          "export -o names the input graph's external-data file", "external-data", needs_onnx=True)
def _(w):
    _external_model(w, "weights.bin")
    return _export(w, "ext/weights.bin", "ext/model.onnx")


@scenario("guard_export_new_external_data_collides", "OverwriteRefusedError",
          "the new graph's OUT.onnx.data would replace the input graph's external data", "external-data",
          needs_onnx=True)
def _(w):
    _external_model(w, "out.onnx.data")
    return _export(w, "ext/out.onnx", "ext/model.onnx")


@scenario("guard_export_adapter_out_file_is_base", "OverwriteRefusedError",
          "an .onnx_adapter export would write onto a hard link of the base weights", "base weights", needs_onnx=True)
def _(w):
    (w / "onnx_adapters").mkdir()
    os.link(w / "base.safetensors", w / "onnx_adapters" / "adapter.onnx_adapter")
    return ["export", str(w / "graph" / "model.onnx"), str(w / "adapter"), "--mode", "dynamic", "-o",
            str(w / "dyn.onnx"), "--base-weights", str(w / "base.safetensors"), "--adapter-out", str(w / "onnx_adapters")]


# failure-safe writes: what can be seen before the work is refused before it
@scenario("write_out_is_directory", "WriteFailedError", "-o names an existing directory", "EISDIR")
def _(w):
    (w / "folder").mkdir()
    return _merge(w, out="folder")


@scenario("write_out_parent_is_file", "WriteFailedError", "-o's parent is a regular file", "ENOTDIR")
def _(w):
    (w / "note.txt").write_text("not a folder")
    return _merge(w, out="note.txt/out.safetensors")


@scenario("write_residual_parent_is_file", "WriteFailedError", "--residual's parent is a regular file", "ENOTDIR")
def _(w):
    (w / "note.txt").write_text("not a folder")
    return _merge(w, residual="note.txt/deep/residual.safetensors")


@scenario("write_combine_out_is_file", "WriteFailedError", "combine -o names a regular file", "ENOTDIR")
def _(w):
    (w / "note.txt").write_text("not a folder")
    return ["combine", str(w / "adapter"), "--method", "cat", "-o", str(w / "note.txt")]


@scenario("write_sharded_out_is_file", "WriteFailedError", "sharded merge -o names a regular file", "ENOTDIR")
def _(w):
    index = _sharded(w)
    (w / "note.txt").write_text("not a folder")
    return ["merge", str(index), str(w / "adapter"), "-o", str(w / "note.txt")]


@scenario("write_export_out_is_directory", "WriteFailedError", "export -o names a directory", "EISDIR", needs_onnx=True)
def _(w):
    (w / "folder.onnx").mkdir()
    return _export(w, "folder.onnx")


# sharded outputs are all or nothing
@scenario("sharded_refused_at_second_shard", "DTypeError",
          "the second shard's target weight is int32: no output or residual folder may be left", "unsupported dtype")
def _(w):
    index = _sharded(w, dtypes={"layer.v.weight": np.int32})
    return ["merge", str(index), str(w / "adapter"), "-o", str(w / "out" / "merged"), "--residual",
            str(w / "res" / "residuals")]


# bounded matching: constructs without a linear-time meaning are refused, not run
@scenario("regex_backreference_target", "ConfigError", "target_modules uses a backreference", "backreferences")
def _(w):
    _edit_config(w, target_modules=r"(layer)\.\1|layer\.(q|v)")
    return _merge(w)


@scenario("regex_lookahead_rank_pattern", "ConfigError", "a rank_pattern key uses a lookahead", "lookahead")
def _(w):
    _edit_config(w, rank_pattern={"(?=layer).*q": 2})
    return _merge(w)


@scenario("regex_repeat_blowup", "ConfigError", "a target regex whose automaton would have 10^6 states", "states")
def _(w):
    _edit_config(w, target_modules="((layer.(q|v)){1000}){1000}|layer.(q|v)")
    return _merge(w)


# inputs must be regular files
@scenario("input_base_fifo", "NotRegularFileError", "the base is a FIFO (would block forever)", "FIFO")
def _(w):
    os.mkfifo(w / "fifo.safetensors")
    return _merge(w, base="fifo.safetensors")


@scenario("input_adapter_weights_fifo", "NotRegularFileError", "adapter_model.safetensors is a FIFO", "FIFO")
def _(w):
    (w / "adapter" / WEIGHTS_NAME).unlink()
    os.mkfifo(w / "adapter" / WEIGHTS_NAME)
    return _merge(w)


@scenario("input_adapter_config_fifo", "NotRegularFileError", "adapter_config.json is a FIFO", "FIFO")
def _(w):
    (w / "adapter" / CONFIG_NAME).unlink()
    os.mkfifo(w / "adapter" / CONFIG_NAME)
    return _merge(w)


@scenario("input_residual_device", "NotRegularFileError", "the residual is a character device", "device")
def _(w):
    return ["unmerge", str(w / "merged.safetensors"), str(w / "adapter"), "-o", str(w / "out.safetensors"),
            "--residual", os.devnull]


@scenario("input_sharded_index_fifo", "NotRegularFileError", "the sharded index is a FIFO", "FIFO")
def _(w):
    os.mkfifo(w / "model.safetensors.index.json")
    return ["merge", str(w / "model.safetensors.index.json"), str(w / "adapter"), "-o", str(w / "merged")]


@scenario("input_model_fifo", "NotRegularFileError", "the ONNX model is a FIFO", "FIFO", needs_onnx=True)
def _(w):
    os.mkfifo(w / "fifo.onnx")
    return _export(w, "out.onnx", "fifo.onnx")


@scenario("input_model_external_data_fifo", "NotRegularFileError", "the ONNX model's external-data file is a FIFO",
          "FIFO", needs_onnx=True)
def _(w):
    _external_model(w, "weights.bin")
    (w / "ext" / "weights.bin").unlink()
    os.mkfifo(w / "ext" / "weights.bin")
    return _export(w, "out.onnx", "ext/model.onnx")


# messages: untrusted names are escaped and shortened
@scenario("message_terminal_escape_in_module", "TargetNotFoundError",
          "a module name holds terminal escape sequences (OSC title, colour)", "\\x1b")
def _(w):
    _renamed_adapter(w, "q", "layer.\x1b]0;pwned\x07\x1b[31mq")
    return _merge(w)


@scenario("message_megabyte_module_name", "TargetNotFoundError", "a module name one megabyte long", "chars]")
def _(w):
    _renamed_adapter(w, "q", "layer." + "q" * 1_000_000)
    return _merge(w)


# conformance manifests: case ids stay inside the suite
def _suite_with(w: Path, case_id: str) -> Path:
    suite = w / "suite"
    (suite / "cases" / "linear").mkdir(parents=True)
    shutil.copytree(SUITE / "cases" / FIXTURE_CASE, suite / "cases" / FIXTURE_CASE)
    case = json.loads((SUITE / "cases" / FIXTURE_CASE / "case.json").read_text())
    (suite / "manifest.json").write_text(json.dumps({"suite_version": "test", "cases": [
        {"id": case_id, "operation": case["operation"], "dtype": case.get("dtype", "float32")}]}))
    return suite


def _run_suite(suite: Path) -> list[str]:
    return ["conformance", "run", "--suite", str(suite), "--impl", "lora_ref.conformance.reference_impl:factory"]


@scenario("manifest_absolute_case_id", "CaseFormatError", "a manifest case id is an absolute path", "case id")
def _(w):
    return _run_suite(_suite_with(w, str(w / "suite" / "cases" / FIXTURE_CASE)))


@scenario("manifest_symlink_escape", "CaseFormatError", "a case folder is a symlink out of the suite", "outside")
def _(w):
    suite = _suite_with(w, "linear/escape")
    shutil.copytree(SUITE / "cases" / FIXTURE_CASE, w / "elsewhere")
    (suite / "cases" / "linear" / "escape").symlink_to(w / "elsewhere")
    return _run_suite(suite)


# -- driver ---------------------------------------------------------------------------------------
def inputs_for(root: Path, case_: Case) -> dict[str, Path]:
    """The operation's input paths: the case's own file for its role, fixtures for the rest."""
    return {role: (root / case_.name if role == case_.role else root / FIXTURES) / _ROLE_PATH[role]
            for role in OPERATION_ROLES[case_.operation]}


def build_corpus(root: str | Path) -> list[Case]:
    """Write the fixtures, every case and ``manifest.json`` under ``root``; return the cases."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    fx = write_fixtures(root)
    manifest = []
    for case_ in CASES:
        case_dir = root / case_.name
        case_dir.mkdir()
        case_.build(case_dir, fx)
        manifest.append({"name": case_.name, "operation": case_.operation, "role": case_.role,
                         "error": case_.error, "reason": case_.reason,
                         "inputs": {k: str(v.relative_to(root)) for k, v in inputs_for(root, case_).items()}})
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return list(CASES)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "generated"
    cases = build_corpus(out)
    print(f"wrote {len(cases)} malformed inputs to {out}")
