"""A Triton Inference Server model repository for a batched graph (SPEC E.6, docs/triton.md).

Layout written by :func:`write_repository` (Triton's ONNX Runtime backend, ``platform: "onnxruntime_onnx"``):

    DIR/NAME/config.pbtxt          the model configuration (below)
    DIR/NAME/<v>/model.onnx        the batched graph of version v (+ model.onnx.data with external data)
    DIR/NAME/<v>/adapters.json     {"adapters": {name: index}, "padding": "right" | "none", ...} of version v

``config.pbtxt`` declares every graph input that is not a bank (banks are initializers: they
stay inside the model) with Triton's batch axis left out of ``dims``. ``adapter_index`` is one
integer per request: ``dims: [1]`` with ``reshape: { shape: [] }``, so a request sends [1, 1]
and the batcher hands the graph the [batch] vector it takes. Then ``dynamic_batching`` (queue
delay, preferred batch sizes), ``instance_group``, optional ``gpu_execution_accelerator``
(``tensorrt``; CUDA is the ORT backend's default on a ``KIND_GPU`` instance), the ORT
backend's thread counts, a ``model_warmup`` request, and the adapter maps of every version as
JSON in ``parameters["lora_ref.adapters"]`` ({version: {name: index}}) so that a remote client
asks by name (:mod:`lora_ref.export.triton_client`) without reading files.

Versions. Each call writes the next version v = 1 + the largest one present: the version
folder is staged under a dot-name beside it and renamed into place in one ``os.replace``, then
config.pbtxt (with v's map added) is replaced atomically. A server polling the repository
(``--model-control-mode=poll``) or told to load the model (``explicit`` mode) never sees a
half-written version; it loads v while serving v-1 and retires v-1 once v is ready. Removing an
adapter is a new version without it; clients pin the version whose map they used.

Ragged batches. Triton's dynamic batcher only joins requests whose tensors have equal shapes,
so requests of different lengths are right-padded by the client to a shared length (the next
multiple of ``pad_multiple``) and the logits sliced back. Right-padding is exact for the LoRA
terms (per token: a padded position never enters a real one) but not for every base model
(bidirectional attention without a mask mixes positions), so :func:`padding_mode` probes the
graph: a row padded with other tokens (and, where the graph has an ``attention_mask`` input,
zeros there) must give the same values at its real positions, bit for bit. A graph that fails
the probe is written with ``padding: "none"``: the client then sends exact lengths and only
equal lengths batch together. Triton's ragged batching (``allow_ragged_batch`` + batch_input)
would need the graph to unpack one flat token list, which the base graphs we rewrite do not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from lora_ref.atomic import staged_folder, transaction, write_text_atomic

from .batched import INDEX_INPUT
from .errors import ExportConfigError, UnsupportedGraphError
from .graphio import save_model

CONFIG = "config.pbtxt"
ADAPTERS_FILE = "adapters.json"
ADAPTERS_PARAMETER = "lora_ref.adapters"
PADDING_PARAMETER = "lora_ref.padding"
PAD_MULTIPLE_PARAMETER = "lora_ref.pad_multiple"
MASK_INPUT = "attention_mask"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

#: ONNX element type -> Triton data type (model_config.proto DataType).
TRITON_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.BFLOAT16: "TYPE_BF16", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonOptions:
    """What config.pbtxt says beyond the graph's own inputs and outputs.

    ``accelerator``: None (CPU instances), ``"cuda"`` (``KIND_GPU`` instances: the ORT backend
    runs CUDA there) or ``"tensorrt"`` (``KIND_GPU`` + ORT's TensorRT provider, ``precision``
    FP32 or FP16). Thread counts are the ORT backend's ``intra_op_thread_count`` /
    ``inter_op_thread_count``; ``pad_multiple`` the client's padding granule (module docstring).
    """

    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    queue_delay_us: int = 2000
    instances: int = 1
    accelerator: str | None = None
    precision: str = "FP32"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    warmup: bool = True
    pad_multiple: int = 16

    def check(self) -> None:
        if self.max_batch_size < 1:
            raise ExportConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise ExportConfigError(f"preferred batch sizes {self.preferred_batch_sizes} must lie in [1, {self.max_batch_size}]")
        if self.accelerator not in (None, "cuda", "tensorrt"):
            raise ExportConfigError(f"accelerator must be None, 'cuda' or 'tensorrt', got {self.accelerator!r}")
        if self.precision not in ("FP32", "FP16"):
            raise ExportConfigError(f"TensorRT precision must be FP32 or FP16, got {self.precision!r}")
        for name in ("queue_delay_us", "intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise ExportConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.instances < 1 or self.pad_multiple < 1:
            raise ExportConfigError("instances and pad_multiple must be >= 1")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton sees it: ``dims`` without the batch axis, -1 where variable."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _spec(info: onnx.ValueInfoProto) -> TensorSpec:
    tensor = info.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise UnsupportedGraphError(f"{info.name}: element type {TensorProto.DataType.Name(tensor.elem_type)} has no Triton type")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] not in (-1,):
        raise UnsupportedGraphError(f"{info.name}: Triton's batcher needs a variable leading batch axis, the graph has {dims}")
    return TensorSpec(info.name, TRITON_TYPES[tensor.elem_type], tuple(dims[1:]))


def graph_specs(graph: onnx.ModelProto, *, batched: bool = True) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The request inputs (graph inputs that are not initializers: not the banks) and the outputs.

    ``batched=False`` also takes a graph without ``adapter_index`` (e.g. a merged one, for comparisons).
    """
    initializers = {t.name for t in graph.graph.initializer}
    inputs = [_spec(i) for i in graph.graph.input if i.name not in initializers]
    if batched and INDEX_INPUT not in {s.name for s in inputs}:
        raise ExportConfigError(f"a Triton repository takes a batched graph (with an {INDEX_INPUT!r} input)")
    return inputs, [_spec(o) for o in graph.graph.output]


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string literal (UTF-8 kept) is a valid protobuf text-format string


def model_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], maps: Mapping[int, Mapping[str, int]],
                 options: TritonOptions, padding: str) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``inference.ModelConfig``; module docstring)."""
    options.check()
    lines = [f"name: {_quote(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {options.max_batch_size}",
             "version_policy: { latest: { num_versions: 1 } }"]

    def tensor(kind: str, spec: TensorSpec) -> None:
        reshape = " reshape: { shape: [ ] }" if spec.name == INDEX_INPUT else ""
        dims = "1" if spec.name == INDEX_INPUT else ", ".join(str(d) for d in spec.dims)
        lines.append(f"{kind} {{ name: {_quote(spec.name)} data_type: {spec.data_type} dims: [ {dims} ]{reshape} }}")

    for spec in inputs:
        tensor("input", spec)
    for spec in outputs:
        tensor("output", spec)
    preferred = ", ".join(str(b) for b in options.preferred_batch_sizes)
    lines.append(f"dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: {options.queue_delay_us} }}")
    kind = "KIND_CPU" if options.accelerator is None else "KIND_GPU"
    lines.append(f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]")
    if options.accelerator == "tensorrt":
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     f'parameters {{ key: "precision_mode" value: "{options.precision}" }} }} ] }} }}')
    parameters = {"intra_op_thread_count": str(options.intra_op_threads), "inter_op_thread_count": str(options.inter_op_threads),
                  ADAPTERS_PARAMETER: json.dumps({str(v): dict(m) for v, m in sorted(maps.items())}, sort_keys=True),
                  PADDING_PARAMETER: padding, PAD_MULTIPLE_PARAMETER: str(options.pad_multiple)}
    for key, value in parameters.items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    if options.warmup:
        warm = []
        for spec in inputs:
            dims = "1" if spec.name == INDEX_INPUT else ", ".join(str(max(d, 1)) for d in spec.dims)
            warm.append(f"inputs {{ key: {_quote(spec.name)} value: {{ data_type: {spec.data_type} dims: [ {dims} ] zero_data: true }} }}")
        lines.append(f'model_warmup [ {{ name: "one row, adapter 0" batch_size: 1 {" ".join(warm)} }} ]')
    return "\n".join(lines) + "\n"


def padding_mode(graph: onnx.ModelProto, ids_input: str, *, length: int = 5, pad: int = 3, seed: int = 0) -> str:
    """``"right"`` when right-padding a row leaves its real positions bit for bit unchanged, else ``"none"``.

    Probe: one row of ``length`` random ids (valid for every Embedding LoRA site) with adapter 0,
    then the same row followed by ``pad`` other ids (and zeros in ``attention_mask`` if the graph
    has one); every output's first ``length`` positions must be equal bit for bit.
    """
    from .runtime import open_session

    session = open_session(graph)
    names = {i.name for i in session.session.get_inputs()}
    vocab = min(session.token_ids.values(), default=None) or _vocab_bound(graph, ids_input)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (1, length + pad), dtype=np.int64)
    other = ids.copy()
    other[:, length:] = rng.integers(0, vocab, (1, pad), dtype=np.int64)

    def run(row: np.ndarray, real: int) -> list[np.ndarray]:
        feeds = {ids_input: row}
        if MASK_INPUT in names:
            feeds[MASK_INPUT] = (np.arange(row.shape[1]) < real).astype(np.int64)[None, :]
        return session.run_batched(feeds, [0])

    alone = run(ids[:, :length], length)
    padded = run(other, length)
    same = all(a.shape[:2] == (1, length) and np.array_equal(a, p[:, :length]) for a, p in zip(alone, padded))
    return "right" if same else "none"


def _vocab_bound(graph: onnx.ModelProto, ids_input: str) -> int:
    """The smallest row count of an initializer Gathered by ``ids_input``-derived ids (the embedding's V), else 2."""
    sizes = {t.name: t.dims[0] for t in graph.graph.initializer if t.dims}
    rows = [sizes[n.input[0]] for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in sizes and n.input[1] == ids_input]
    return int(min(rows, default=2))


def ids_input(inputs: Sequence[TensorSpec]) -> str | None:
    """The token-ids input of a language model: the one integer input that is neither adapter_index nor the mask."""
    found = [s.name for s in inputs if s.data_type in ("TYPE_INT64", "TYPE_INT32") and s.name not in (INDEX_INPUT, MASK_INPUT)]
    return found[0] if len(found) == 1 else None


def versions(model_dir: Path) -> list[int]:
    """The version folders present (numeric names), sorted."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []


def read_maps(model_dir: Path) -> dict[int, dict[str, int]]:
    """{version: {adapter name: index}} of the versions present."""
    maps = {}
    for v in versions(model_dir):
        path = model_dir / str(v) / ADAPTERS_FILE
        if path.is_file():
            maps[v] = json.loads(path.read_text("utf-8"))["adapters"]
    return maps


def write_repository(graph: onnx.ModelProto, repo: str | os.PathLike[str], adapter_names: Sequence[str], *, name: str = "lora",
                     options: TritonOptions = TritonOptions(), keep_versions: int | None = None,
                     external_data: bool | None = None) -> Path:
    """Write ``graph`` (a batched graph) as the next version of model ``name`` in ``repo``; return the version folder.

    ``adapter_names[i]`` is bank row i. ``keep_versions`` deletes all but the newest that many
    version folders after the config is updated (None keeps them all).
    """
    options.check()
    if not _NAME.match(name):
        raise ExportConfigError(f"Triton model name {name!r}: use letters, digits, '_', '.', '-'")
    if len(set(adapter_names)) != len(adapter_names):
        raise ExportConfigError(f"adapter names must be distinct (clients ask by name), got {list(adapter_names)}")
    inputs, outputs = graph_specs(graph)
    ids = ids_input(inputs)
    padding = padding_mode(graph, ids) if ids is not None else "none"
    model_dir = Path(repo) / name
    present = versions(model_dir)
    version = (present[-1] + 1) if present else 1
    maps = read_maps(model_dir)
    maps[version] = {adapter: i for i, adapter in enumerate(adapter_names)}
    text = model_config(name, inputs, outputs, maps, options, padding)
    with transaction():  # the version folder and the config naming it, or neither
        with staged_folder(model_dir / str(version)) as staging:  # appears whole, or not at all
            save_model(graph, staging / "model.onnx", external_data=external_data)
            record = {"adapters": maps[version], "padding": padding, "ids_input": ids, "version": version}
            write_text_atomic(staging / ADAPTERS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        if keep_versions is not None:
            maps = {v: m for v, m in maps.items() if v in versions(model_dir)[-keep_versions:]}
            text = model_config(name, inputs, outputs, maps, options, padding)
        write_text_atomic(model_dir / CONFIG, text)
    if keep_versions is not None:
        for old in versions(model_dir)[:-keep_versions]:
            shutil.rmtree(model_dir / str(old))
    return model_dir / str(version)
