"""ONNX Runtime's ``.onnx_adapter`` files for dynamic graphs, written and read with checks.

Writing: a PEFT adapter becomes, per module, ``<m>.lora_A.weight`` = A^T [in, r] and
``<m>.lora_B.weight`` = s·B^T [r, out] (a Conv module: A [r, C, *k] and s·B [O, r, 1...];
:func:`lora_ref.export.editing.lora_factors`), and
``<m>.lora_B.bias`` = s·lora_bias [out] for a module with lora_bias,
zero-padded to the graph's static rank if it has one, checked against the graph's LoRA inputs
(:mod:`lora_ref.export.slots`) and written atomically through ``onnxruntime.AdapterFormat``.
Reading: ``AdapterFormat.read_adapter`` (ORT's own reader) gives the tensors, which are
checked against the graph before ``onnxruntime.LoraAdapter`` memory-maps the file for
``RunOptions.add_active_adapter``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_ref.adapter import Adapter
from lora_ref.atomic import WriteFailedError, atomic_path
from lora_ref.dtypes import round_to
from lora_ref.errors import FileFormatError
from lora_ref.inputs import require_regular_file

from .editing import lora_bias_term
from .errors import AdapterNameError
from .fused import layout_of, split_fused, stacked_factors
from .names import FUSED, SlotLayout, magnitude_name, part_modules, strip_prefix
from .slots import Slot, check_tensors

SUFFIX = ".onnx_adapter"


def adapter_tensors(adapter: Adapter, slots: Mapping[str, Slot], layouts: Mapping[str, SlotLayout] | None = None,
                    graph_scales: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """The graph-layout tensors of ``adapter`` for a dynamic graph with ``slots`` (checked).

    ``layouts`` (stem -> :class:`SlotLayout`, from :func:`lora_ref.export.names.read_layouts`)
    says which modules fill each slot (fused slots stack several, :mod:`lora_ref.export.fused`);
    without it every slot is the module of its own name (lora-ref's ``peft`` names).
    A module with no slot is an AdapterNameError. ``graph_scales`` (stem -> s_g) for a graph that
    multiplies a slot's branch by a constant itself (Olive's ExtractAdapters graphs): B_g = (s / s_g)·B^T.
    """
    names: dict[str, dict[str, str]] = {}
    for name, slot in slots.items():
        role = "bias" if slot.is_bias else "magnitude" if slot.is_magnitude else "A" if slot.is_a else "B"
        names.setdefault(slot.module, {})[role] = name
    if layouts is None:
        layouts = {stem: SlotLayout(stem, ((strip_prefix(stem), -1),)) for stem in names}
    tensors: dict[str, np.ndarray] = {}
    adapter = _split_for(adapter, layouts, names, slots)
    unplaced = [m for m in adapter.modules if layout_of(m, layouts) is None]
    if unplaced:
        raise AdapterNameError(f"adapter {adapter.name!r}: {len(unplaced)} module(s) have no LoRA input in the graph: "
                               f"{sorted(unplaced)[:6]}; the graph's LoRA inputs are e.g. {sorted(slots)[:4]}")
    for stem, layout in layouts.items():
        if stem not in names or "A" not in names[stem]:
            continue
        slot = slots[names[stem]["A"]]
        plain = SlotLayout(stem, tuple((_module_key(adapter, m), w) for m, w in layout.parts))
        factors = stacked_factors(adapter, plain, slot.dtype, pad_to=slot.rank, graph_scale=(graph_scales or {}).get(stem, 1.0))
        if factors is None:
            continue
        tensors[names[stem]["A"]], tensors[names[stem].get("B", stem + ".lora_B")] = factors
        module = plain.parts[0][0]
        if not layout.fused and adapter.modules[module].lora_bias is not None:  # a graph without a bias slot refuses it below
            tensors[names[stem].get("bias", stem + ".lora_B.bias")] = lora_bias_term(adapter, module, slot.dtype)
        dora = [m for m, _ in plain.parts if m in adapter.modules and adapter.modules[m].magnitude is not None]
        if dora and layout.fused:
            raise AdapterNameError(f"adapter {adapter.name!r}: DoRA on {dora[:3]}, parts of the fused projection {stem!r}, "
                                   "has no magnitude input (each part would need its own norm); export --mode merged")
        if dora:  # m itself, rounded once (a graph without the slot refuses it below); the graph computes the norm
            magnitude = np.asarray(adapter.modules[module].magnitude, np.float64).reshape(-1)
            tensors[names[stem].get("magnitude", magnitude_name(stem))] = round_to(magnitude, slot.dtype)
    check_tensors({k: (v.shape, v.dtype) for k, v in tensors.items()}, slots, f"adapter {adapter.name!r}")
    return tensors


def _split_for(adapter: Adapter, layouts: Mapping[str, SlotLayout], names: Mapping[str, Mapping[str, str]],
               slots: Mapping[str, Slot]) -> Adapter:
    """``adapter`` with a fused module (``qkv_proj``) that has no slot split into its parts when each part has
    one of its own (:func:`lora_ref.export.fused.split_fused`); widths from the layouts or the B slots' out axis."""
    for module in list(adapter.modules):
        leaf = strip_prefix(module).rpartition(".")[2]
        if leaf not in FUSED or layout_of(module, layouts) is not None:
            continue
        parts = part_modules(strip_prefix(module), leaf)
        found = [layout_of(p, layouts) for p in parts]
        if any(layout is None or layout.fused for layout in found):
            continue
        widths = []
        for part, layout in zip(parts, found):
            width = layout.parts[0][1]
            b = names.get(layout.stem, {}).get("B")
            if width < 0 and b is not None and isinstance(slots[b].shape[-1], int):
                width = slots[b].shape[-1]
            widths.append((part, width))
        if all(w > 0 for _, w in widths):
            adapter = split_fused(adapter, module, widths)
    return adapter


def _module_key(adapter: Adapter, module: str) -> str:
    """The adapter's own spelling of ``module`` (with or without PEFT's ``base_model.model.`` prefix)."""
    plain = strip_prefix(module)
    return next((m for m in adapter.modules if strip_prefix(m) == plain), module)


def write_onnx_adapter(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    slots: Mapping[str, Slot],
    *,
    adapter_version: int = 1,
    model_version: int = 1,
) -> Path:
    """Check ``tensors`` against ``slots`` and write them as an ``.onnx_adapter`` file atomically."""
    path = Path(path)
    check_tensors({k: (np.shape(v), np.asarray(v).dtype) for k, v in tensors.items()}, slots, str(path))
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # kept alive while ORT reads them
    writer = ort.AdapterFormat()
    writer.set_adapter_version(adapter_version)
    writer.set_model_version(model_version)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with atomic_path(path) as tmp:
        try:
            writer.export_adapter(str(tmp))
        except Exception as exc:  # noqa: BLE001 - ORT writes the file itself and raises untyped errors
            raise WriteFailedError(f"{path}: cannot write the .onnx_adapter file ({str(exc)[:200]})") from None
    return path


def read_onnx_adapter(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file, read by ONNX Runtime's own reader (copies)."""
    path = Path(path)
    require_regular_file(path, ".onnx_adapter file")
    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors for malformed files
        raise FileFormatError(f"{path}: not a readable .onnx_adapter file ({exc})") from None
    return {name: np.array(value.numpy()) for name, value in reader.get_parameters().items()}


@dataclass
class LoadedAdapter:
    """An ``.onnx_adapter`` checked against a graph: ORT's LoraAdapter plus its tensors.

    ``renamed`` is the temporary copy ORT loaded when the file's names needed PEFT's
    ``base_model.model.`` prefix removed (kept alive with the object, removed with it).
    """

    path: Path
    lora: ort.LoraAdapter
    tensors: dict[str, np.ndarray]
    renamed: object | None = None


def fit_names(tensors: Mapping[str, np.ndarray], slots: Mapping[str, Slot]) -> dict[str, np.ndarray]:
    """``tensors`` with PEFT's ``base_model.model.`` prefix dropped from names that are slots only without it.

    ``olive convert-adapters`` keeps that prefix for architectures other than Llama's; a graph
    whose inputs lack it accepts such a file. Names that fit as they are stay as they are.
    """
    renamed = {}
    for name, value in tensors.items():
        plain = strip_prefix(name)
        renamed[name if name in slots or plain not in slots else plain] = value
    return renamed


def load_onnx_adapter(path: str | os.PathLike[str], slots: Mapping[str, Slot]) -> LoadedAdapter:
    """Read ``path``, check its names/shapes/dtypes against ``slots``, and load it for ORT.

    A file whose names carry PEFT's ``base_model.model.`` prefix where the graph's do not
    (:func:`fit_names`) is loaded through a renamed temporary copy; the user's file is not changed.
    """
    path = Path(path)
    original = read_onnx_adapter(path)
    tensors = fit_names(original, slots)
    check_tensors({k: (v.shape, v.dtype) for k, v in tensors.items()}, slots, str(path))
    lora = ort.LoraAdapter()
    renamed = None
    if set(tensors) != set(original):
        import tempfile

        renamed = tempfile.TemporaryDirectory(prefix="lora-ref-renamed-")
        copy = write_onnx_adapter(Path(renamed.name) / path.name, tensors, slots)
        lora.Load(str(copy))
    else:
        lora.Load(str(path))
    return LoadedAdapter(path, lora, tensors, renamed)
