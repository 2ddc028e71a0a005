"""PEFT adapters to ``.onnx_adapter`` files for an existing dynamic graph (``lora-ref convert-adapters``).

The graph is any dynamic LoRA graph: lora-ref's (its slot layout is recorded in the metadata,
fused slots included), one from genai's builder with its LoRA tensors made inputs, or Olive's
(ExtractAdapters). Its LoRA inputs give the names, the naming scheme (:func:`lora_ref.export.names.detect_scheme`),
the static axes (in, out, a fixed rank) and the dtype; every adapter is converted to exactly
those (:func:`lora_ref.export.adapter_files.adapter_tensors`: A_g = A^T, B_g = s·B^T, each rounded
once) and checked, and a module with no input in the graph is an error. All files are written
into a staging folder renamed to the output folder only when every adapter converted, so a
refusal leaves nothing behind. Only the graph's header is read (no external data).
A graph from Olive's ExtractAdapters on a torch-exported PEFT model keeps the scale in the graph,
y += s_g·((x·A_g)·B_g) with s_g a constant (:func:`graph_scales`), so its files get (s / s_g)·B^T.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from lora_ref.adapter import Adapter
from lora_ref.atomic import staged_folder

from .adapter_files import SUFFIX, adapter_tensors, write_onnx_adapter
from .errors import AdapterNameError, ExportConfigError
from .names import EXTRACT, read_layouts
from .runtime import header_only
from .slots import slots_from_model


def convert_adapters(adapters: Sequence[Adapter], graph: str | os.PathLike[str], output: str | os.PathLike[str], *,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Write ``<output>/<adapter name>.onnx_adapter`` for each adapter; return a JSON-ready report.

    ``progress(name)`` is called as each adapter's file starts (the CLI's :class:`lora_ref.cli.progress.Progress`).
    """
    output = Path(output)
    if output.exists():
        raise ExportConfigError(f"{output}: already exists; the output folder must be new")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ExportConfigError(f"adapter names must be distinct to name their files, got {names}")
    model = header_only(Path(graph))
    slots = slots_from_model(model)
    if not slots:
        raise AdapterNameError(f"{graph}: the graph has no LoRA inputs (export it with --mode dynamic first)")
    layouts, scheme = read_layouts(model, {slot.module for slot in slots.values()})
    scales = graph_scales(model, slots) if scheme == EXTRACT else None
    converted = {adapter.name: adapter_tensors(adapter, slots, layouts, scales) for adapter in adapters}
    report = {"graph": str(graph), "scheme": scheme, "adapters": {}}
    with staged_folder(output) as staging:
        for name, tensors in converted.items():
            if progress is not None:
                progress(name)
            write_onnx_adapter(staging / f"{name}{SUFFIX}", tensors, slots)
            report["adapters"][name] = {"file": str(output / f"{name}{SUFFIX}"), "scheme": scheme, "tensors": len(tensors),
                                        "modules": sorted(next(a for a in adapters if a.name == name).modules)}
    return report


def graph_scales(model, slots) -> dict[str, float]:
    """stem -> the constant s_g a graph multiplies each LoRA branch by: the scalar of the ``Mul`` that is the
    only reader of ``MatMul(t, B_g)`` (PEFT's ``lora_B(lora_A(x)) * scaling`` as torch's exporter writes it).

    AdapterNameError when a B slot has no such Mul: the files' scale could not be made right.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims or int(np.prod(t.dims)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.ByteSize():
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1:
                constants[node.output[0]] = value
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    scales = {}
    for name, slot in slots.items():
        if slot.is_a or slot.is_vector:
            continue
        found = None
        for matmul in readers.get(name, []):
            after = readers.get(matmul.output[0], []) if matmul.op_type == "MatMul" else []
            if len(after) == 1 and after[0].op_type == "Mul":
                other = [n for n in after[0].input if n != matmul.output[0]]
                if len(other) == 1 and other[0] in constants:
                    found = float(np.asarray(constants[other[0]]).reshape(()))
        if found is None:
            raise AdapterNameError(f"{name}: the graph keeps the LoRA scale outside B (Olive ExtractAdapters names), but no "
                                   "Mul by a constant follows its MatMul; cannot write B scaled for it")
        scales[slot.module] = found
    return scales
