"""One call from a base graph and PEFT adapters to a written merged, dynamic or batched graph.

Order of work, so that bad input leaves no file behind: read the graph and make sure
onnxruntime can read what will be written (IR version, opset); locate every targeted module
(all misses reported together); check every adapter against its sites (layer kind and what
the graph kind expresses: merged graphs take Linear, Embedding, Conv, DoRA and lora_bias;
shapes, ranks); build the graph and the adapter tensors in memory; only then write the graph
(checked by onnx.checker, atomic) and the ``.onnx_adapter`` files (checked against the graph's
LoRA inputs, atomic), all in one transaction: a failure leaves none of them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lora_ref.adapter import Adapter
from lora_ref.atomic import transaction
from lora_ref.dtypes import resolve_dtype
from lora_ref.safetensors_io import SafetensorsFile

from .adapter_files import SUFFIX, adapter_tensors, write_onnx_adapter
from .batched import build_batched
from .dynamic import build_dynamic
from .editing import check_exportable, check_fits
from .errors import ExportConfigError
from .fp16 import to_float16
from .graphio import EXTERNAL_DATA_BYTES, check_graph, load_model, loadable_ir_version, make_loadable, save_model, tensor_bytes
from .locate import GraphIndex, TargetSite, locate_targets
from .merged import build_merged, carried_sites, check_graph_base_copies
from .slots import slots_from_model

MODES = ("merged", "dynamic", "batched")
Progress = Callable[[int, int, str], None]


@dataclass
class ExportReport:
    """What an export wrote and how each module was found."""

    mode: str
    output: Path | None
    sites: dict[str, list[TargetSite]]
    adapter_files: dict[str, Path] = field(default_factory=dict)
    model: onnx.ModelProto | None = None

    def found_by(self) -> dict[str, str]:
        return {module: sites[0].found_by for module, sites in self.sites.items()}


class _LazyTensors(Mapping):
    """A read-only mapping over a safetensors file that reads a tensor only when asked."""

    def __init__(self, handle: SafetensorsFile) -> None:
        self.handle = handle

    def __getitem__(self, key: str) -> np.ndarray:
        return self.handle.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.handle

    def __iter__(self) -> Iterator[str]:
        return iter(self.handle.keys())

    def __len__(self) -> int:
        return len(self.handle.keys())


def build_graph(
    model: onnx.ModelProto,
    adapters: Sequence[Adapter],
    mode: str,
    *,
    base_weights: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    max_rank: int | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, dict[str, list[TargetSite]]]:
    """The exported graph in memory and the sites it rewrote; nothing is written."""
    if mode not in MODES:
        raise ExportConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if not adapters:
        raise ExportConfigError("at least one adapter is needed")
    if max_rank is not None and max_rank < 1:
        raise ExportConfigError(f"--max-rank must be a positive integer, got {max_rank}")
    if mode == "merged" and max_rank is not None:
        raise ExportConfigError("--max-rank applies to dynamic and batched graphs, not merged ones")
    target = resolve_dtype(dtype, allow_float64=False)
    if target not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ExportConfigError(f"--dtype must be float32 or float16, got {dtype}")
    loadable_ir_version(model)  # refuse early; the input model is not modified
    if tensor_bytes(model) < EXTERNAL_DATA_BYTES:  # larger in-memory models are checked when read from a path
        check_graph(model, where="input model")
    kinds: dict[str, str] = {}
    for adapter in adapters:
        for module, lora in adapter.modules.items():
            check_exportable(adapter, module, mode)
            if kinds.setdefault(module, lora.kind) != lora.kind:
                raise ExportConfigError(f"module {module}: the adapters disagree on its layer kind ({kinds[module]} vs {lora.kind})")
    carried = carried_sites(adapters)
    if carried and mode != "merged":
        names = sorted({c.module for _, _, c in carried.values()})
        raise ExportConfigError(
            f"the adapter carries full trained copies ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: "
            f"modules_to_save / trainable tokens / biases) that replace base tensors; {mode} graphs switch adapters as "
            "low-rank inputs and cannot switch full copies; export --mode merged")
    for module, kind, _ in carried.values():
        if kinds.setdefault(module, kind) != kind:
            raise ExportConfigError(f"module {module}: a carried tensor needs it as a {kind} layer, the LoRA layer is {kinds[module]}")
    if isinstance(base_weights, (str, os.PathLike)):
        with SafetensorsFile(base_weights) as handle:
            sites = locate_targets(model, list(kinds), base_weights=_LazyTensors(handle), kinds=kinds)
    else:
        sites = locate_targets(model, list(kinds), base_weights=base_weights, kinds=kinds)
    for adapter in adapters:
        for module in adapter.modules:
            for site in sites[module]:
                check_fits(adapter, module, site, mode)
            if max_rank is not None and adapter.modules[module].rank > max_rank:
                raise ExportConfigError(
                    f"adapter {adapter.name!r}, module {module}: rank {adapter.modules[module].rank} exceeds --max-rank {max_rank}"
                )
    check_graph_base_copies(GraphIndex(model.graph), sites, adapters)
    half = target == np.dtype(np.float16)
    if mode == "merged":
        graph = build_merged(model, sites, adapters, dtype=target, progress=progress)
        if half:
            to_float16(graph)
    else:
        base = to_float16(copy.deepcopy(model)) if half else model  # deepcopy: protobuf bytes cap at 2 GiB
        if mode == "dynamic":
            biased = {m for adapter in adapters for m, lora in adapter.modules.items() if lora.lora_bias is not None}
            graph = build_dynamic(base, sites, max_rank=max_rank, bias_modules=biased, progress=progress)
        else:
            graph = build_batched(base, sites, adapters, max_rank=max_rank, progress=progress)
    make_loadable(graph)
    return graph, sites


def export(
    model: str | os.PathLike[str] | onnx.ModelProto,
    adapters: Sequence[Adapter],
    mode: str,
    output: str | os.PathLike[str],
    *,
    base_weights: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    adapter_out: str | os.PathLike[str] | None = None,
    max_rank: int | None = None,
    dtype: str = "float32",
    external_data: bool | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Build the ``mode`` graph of ``model`` with ``adapters`` and write it (module docstring)."""
    if adapter_out is not None and mode != "dynamic":
        raise ExportConfigError("--adapter-out writes .onnx_adapter files for dynamic graphs only")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    graph, sites = build_graph(proto, adapters, mode, base_weights=base_weights, max_rank=max_rank, dtype=dtype, progress=progress)
    files: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}
    if adapter_out is not None:
        slots = slots_from_model(graph)
        names = [adapter.name for adapter in adapters]
        if len(set(names)) != len(names):
            raise ExportConfigError(f"adapter names must be distinct to name their files, got {names}")
        for adapter in adapters:
            files[adapter.name] = (Path(adapter_out) / f"{adapter.name}{SUFFIX}", adapter_tensors(adapter, slots))
    with transaction():  # the graph and its adapter files, or none of them
        written = save_model(graph, output, external_data=external_data)
        report = ExportReport(mode, written, sites, model=graph)
        for name, (path, tensors) in files.items():
            report.adapter_files[name] = write_onnx_adapter(path, tensors, slots)
    return report
