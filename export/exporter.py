"""One call from a base graph and PEFT adapters to a written merged, dynamic or batched graph.

Order of work, so that bad input leaves no file behind: read the graph and make sure
onnxruntime can read what will be written (IR version, opset); locate every targeted module
(all misses reported together); check every adapter against its sites (layer kind and what
the graph kind expresses: merged graphs take Linear, Embedding, Conv, DoRA and lora_bias;
shapes, ranks); build the graph and the adapter tensors in memory; only then write the graph
(validated by onnx.checker or, for ONNX Runtime's own ops, by ONNX Runtime; atomic) and the
``.onnx_adapter`` files (checked against the graph's LoRA inputs, atomic), all in one
transaction: a failure leaves none of them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lora_ref.adapter import Adapter
from lora_ref.atomic import transaction
from lora_ref.dtypes import resolve_dtype
from lora_ref.kinds import kind_of
from lora_ref.hf_model import CheckpointTensors

from .adapter_files import SUFFIX, adapter_tensors, write_onnx_adapter
from .batched import build_batched
from .dynamic import build_dynamic
from .editing import check_exportable, check_fits
from .errors import ExportConfigError, GraphTargetNotFoundError, UnsupportedGraphError
from .fp16 import to_float16
from .fused import slot_groups, split_fused
from .graphio import (EXTERNAL_DATA_BYTES, check_graph, drop_graph_inputs, legacy_initializer_inputs, load_model, loadable_ir_version,
                      make_loadable, save_model, tensor_bytes)
from .locate import GraphIndex, TargetSite, locate_targets
from .merged import build_merged, carried_sites, check_graph_base_copies
from .names import FUSED, part_modules, read_layouts, strip_prefix
from .quantized import add_constant_branches
from .quantized import requantize as requantize_sites
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
    #: module -> what was done at its sites beyond a plain rewrite (fused slice, quantized base)
    notes: dict[str, str] = field(default_factory=dict)

    def found_by(self) -> dict[str, str]:
        return {module: sites[0].found_by for module, sites in self.sites.items()}


def build_graph(
    model: onnx.ModelProto,
    adapters: Sequence[Adapter],
    mode: str,
    *,
    base_weights: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    max_rank: int | None = None,
    dtype: str = "float32",
    adapter_names: str = "peft",
    requantize: bool = False,
    progress: Progress | None = None,
    notes: dict[str, str] | None = None,
) -> tuple[onnx.ModelProto, dict[str, list[TargetSite]]]:
    """The exported graph in memory and the sites it rewrote; nothing is written.

    ``adapter_names`` names a dynamic graph's LoRA inputs (:mod:`lora_ref.export.names`).
    ``requantize`` (merged only) writes quantized sites as Q(W + Δ) instead of keeping the base
    and the LoRA beside it (:mod:`lora_ref.export.quantized`).
    ``notes``, when given, receives per module what was done at a site that is not a plain
    rewrite (a fused slice, a quantized base kept with the LoRA beside it).
    """
    if mode not in MODES:
        raise ExportConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if not adapters:
        raise ExportConfigError("at least one adapter is needed")
    if max_rank is not None and max_rank < 1:
        raise ExportConfigError(f"--max-rank must be a positive integer, got {max_rank}")
    if requantize and mode != "merged":
        raise ExportConfigError("--requantize applies to merged graphs only (dynamic graphs keep the quantized base)")
    if mode == "merged" and max_rank is not None:
        raise ExportConfigError("--max-rank applies to dynamic and batched graphs, not merged ones")
    target = resolve_dtype(dtype, allow_float64=False)
    if target not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ExportConfigError(f"--dtype must be float32 or float16, got {dtype}")
    loadable_ir_version(model)  # refuse early; the input model is not modified
    if tensor_bytes(model) < EXTERNAL_DATA_BYTES:  # larger in-memory models are checked when read from a path
        check_graph(model, where="input model")
    fitted = fit_fused_adapters(model, adapters, base_weights)
    split_notes(adapters, fitted, notes)
    adapters = fitted
    kinds: dict[str, str] = {}
    widths = {m: int(lora.B.shape[0]) for adapter in adapters for m, lora in adapter.modules.items()}
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
    sites = _locate(model, list(kinds), base_weights, kinds, widths)
    if mode == "batched":
        refuse_flattened_batch(model, sites)
    special = {m: s for m, s in sites.items() if s[0].fused is not None or s[0].quantized}
    unplaceable = sorted({m for m, _, _ in carried.values() if m in special})
    if unplaceable:
        raise ExportConfigError(f"the adapter carries full copies of {unplaceable[:4]}, whose graph weights are fused or "
                                "quantized; such copies cannot replace them")
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
    dynamic_quantized = sorted(m for m, s in sites.items() if s[0].integer is not None)
    if half and dynamic_quantized:
        raise ExportConfigError(f"--dtype float16: {dynamic_quantized[:4]} are dynamically quantized (DynamicQuantizeLinear "
                                "takes float32 activations only); export in float32")
    if mode == "merged":
        plain = {m: s for m, s in sites.items() if not s[0].quantized}
        # dtype=None keeps each weight's stored dtype (a float16 genai model stays float16); --dtype float16 converts
        graph = build_merged(model, plain, adapters, dtype=target if half else None, progress=progress)
        quantized = {m: s for m, s in sites.items() if s[0].quantized}
        if quantized:
            groups = slot_groups(quantized)
            if requantize:
                reports = requantize_sites(graph, groups, adapters)
                done = {stem: (f"requantized merged weight: max error {r['max_error']:.3g} against the adapter's max effect "
                               f"{r['max_effect']:.3g} (rms ratio {r['rms_ratio']:.2f})") for stem, r in reports.items()}
            else:
                ranks = add_constant_branches(graph, groups, adapters)
                done = {stem: f"quantized base kept bit for bit, the LoRA beside it as constants (stacked rank {rank})"
                        for stem, rank in ranks.items()}
            for stem, (layout, _) in groups.items():
                for m in (m for m, _ in layout.parts if m in quantized and notes is not None):
                    notes[m] = done[stem]
        if half:
            to_float16(graph)
    else:
        base = to_float16(copy.deepcopy(model)) if half else model  # deepcopy: protobuf bytes cap at 2 GiB
        if mode == "dynamic":
            biased = {m for adapter in adapters for m, lora in adapter.modules.items() if lora.lora_bias is not None}
            dora = {m for adapter in adapters for m, lora in adapter.modules.items() if lora.magnitude is not None}
            graph = build_dynamic(base, sites, max_rank=max_rank, bias_modules=biased, dora_modules=dora, scheme=adapter_names,
                                  progress=progress)
        else:
            graph = build_batched(base, sites, adapters, max_rank=max_rank, progress=progress)
    if notes is not None:
        for m, module_sites in sites.items():
            first, done = module_sites[0], []
            if first.fused is not None:
                done.append(f"columns {first.columns} of the fused weight {first.weight!r}")
            if first.quantized and mode != "merged":
                done.append("quantized base kept bit for bit, float LoRA branch beside it")
            if done:
                notes.setdefault(m, "; ".join(done))
    drop_graph_inputs(graph, legacy_initializer_inputs(model))  # base weights are not overridable inputs at IR >= 4
    make_loadable(graph)
    return graph, sites


def _locate(model: onnx.ModelProto, modules: Sequence[str], base_weights, kinds: Mapping[str, str] | None,
            widths: Mapping[str, int] | None) -> dict[str, list[TargetSite]]:
    """:func:`locate_targets` with ``base_weights`` a checkpoint path (one .safetensors file, a sharded index or a
    model directory, read lazily), a mapping or None."""
    if isinstance(base_weights, (str, os.PathLike)):
        with CheckpointTensors(base_weights) as tensors:
            return locate_targets(model, modules, base_weights=tensors, kinds=kinds, widths=widths)
    return locate_targets(model, modules, base_weights=base_weights, kinds=kinds, widths=widths)


def fit_fused_adapters(model: onnx.ModelProto, adapters: Sequence[Adapter], base_weights=None) -> list[Adapter]:
    """``adapters`` with each module on a fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) that the
    graph lacks but whose parts it has as separate weights split into those parts
    (:func:`lora_ref.export.fused.split_fused`, widths from the graph); other modules as they are."""
    out = list(adapters)
    for module in sorted({m for a in adapters for m, lora in a.modules.items() if lora.kind == "linear"}):
        leaf = strip_prefix(module).rpartition(".")[2]
        if leaf not in FUSED:
            continue
        try:
            _locate(model, [module], base_weights, None, None)
            continue  # the graph has the fused weight itself
        except (GraphTargetNotFoundError, UnsupportedGraphError):
            pass
        parts = part_modules(strip_prefix(module), leaf)
        try:
            found = _locate(model, list(parts), base_weights, None, None)
        except (GraphTargetNotFoundError, UnsupportedGraphError):
            continue  # reported as not found by the caller's own locate
        if any(found[p][0].fused is not None for p in parts):
            continue
        widths = tuple((p, found[p][0].out_features) for p in parts)
        out = [split_fused(a, module, widths) if module in a.modules else a for a in out]
    return out


def split_notes(before: Sequence[Adapter], after: Sequence[Adapter], notes: dict[str, str] | None) -> None:
    """Note in ``notes`` (part module -> text) each fused module :func:`fit_fused_adapters` split into parts."""
    gone = {m for a in before for m in a.modules} - {m for a in after for m in a.modules}
    for module in sorted(gone) if notes is not None else ():
        parts = part_modules(strip_prefix(module), strip_prefix(module).rpartition(".")[2])
        for part in parts:
            notes[part] = f"rows of the adapter's fused module {module} (the graph has separate {', '.join(parts)})"


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rank, where the graph or ONNX's shape inference knows it (inference failures ignored)."""
    inferred = model
    if tensor_bytes(model) < EXTERNAL_DATA_BYTES:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - ops unknown to onnx (ORT's own) leave their outputs unranked
            inferred = model
    graph = inferred.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.input, *graph.value_info, *graph.output)
             if v.type.tensor_type.HasField("shape")}
    ranks.update({t.name: len(t.dims) for t in graph.initializer})
    return ranks


def refuse_flattened_batch(model: onnx.ModelProto, sites: Mapping[str, Sequence[TargetSite]]) -> None:
    """ExportConfigError when a Linear site's input is a 2-D Reshape/Flatten of a tensor of rank >= 3.

    GPT-2's Conv1D (and ``x.view(-1, in)`` generally) runs its MatMul on batch×sequence rows, so a
    batched graph's per-row adapter (batch = leading axis, SPEC E.2) would be applied to the wrong
    rows, and fail for batch > 1 and sequence > 1.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    ranks = None
    for module, module_sites in sites.items():
        for site in module_sites:
            node = producer.get(site.x)
            if not kind_of(site.kind).export.transposable or node is None or node.op_type not in ("Reshape", "Flatten"):
                continue
            ranks = ranks if ranks is not None else _ranks(model)
            if ranks.get(site.x) == 2 and ranks.get(node.input[0], 0) >= 3:
                raise ExportConfigError(
                    f"{module}: its input {site.x!r} is {node.op_type} of the rank-{ranks[node.input[0]]} tensor "
                    f"{node.input[0]!r} into 2-D rows (batch×sequence flattened, as GPT-2's Conv1D), so a batched graph "
                    "cannot give each batch row its own adapter; export --mode dynamic or merged")


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
    adapter_names: str = "peft",
    requantize: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Build the ``mode`` graph of ``model`` with ``adapters`` and write it (module docstring)."""
    if adapter_out is not None and mode != "dynamic":
        raise ExportConfigError("--adapter-out writes .onnx_adapter files for dynamic graphs only")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    fitted = fit_fused_adapters(proto, adapters, base_weights)  # the adapter files then name the parts
    notes: dict[str, str] = {}
    split_notes(adapters, fitted, notes)
    adapters = fitted
    graph, sites = build_graph(proto, adapters, mode, base_weights=base_weights, max_rank=max_rank, dtype=dtype,
                               adapter_names=adapter_names, requantize=requantize, progress=progress, notes=notes)
    files: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}
    if adapter_out is not None:
        slots = slots_from_model(graph)
        layouts, _ = read_layouts(graph, {slot.module for slot in slots.values()})
        names = [adapter.name for adapter in adapters]
        if len(set(names)) != len(names):
            raise ExportConfigError(f"adapter names must be distinct to name their files, got {names}")
        for adapter in adapters:
            files[adapter.name] = (Path(adapter_out) / f"{adapter.name}{SUFFIX}", adapter_tensors(adapter, slots, layouts))
    with transaction():  # the graph and its adapter files, or none of them
        written = save_model(graph, output, external_data=external_data)
        report = ExportReport(mode, written, sites, model=graph, notes=notes)
        for name, (path, tensors) in files.items():
            report.adapter_files[name] = write_onnx_adapter(path, tensors, slots)
    return report
