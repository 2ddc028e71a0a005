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
from lora_ref.errors import FileFormatError
from lora_ref.inputs import require_regular_file

from .editing import lora_a_name, lora_b_name, lora_bias_name, lora_bias_term, lora_factors
from .slots import Slot, check_tensors

SUFFIX = ".onnx_adapter"


def adapter_tensors(adapter: Adapter, slots: Mapping[str, Slot]) -> dict[str, np.ndarray]:
    """The graph-layout tensors of ``adapter`` for a dynamic graph with ``slots`` (checked)."""
    tensors: dict[str, np.ndarray] = {}
    for module in adapter.modules:
        slot = slots.get(lora_a_name(module))
        dtype = slot.dtype if slot is not None else np.dtype(np.float32)
        a, b = lora_factors(adapter, module, dtype, pad_to=slot.rank if slot is not None else None)
        tensors[lora_a_name(module)], tensors[lora_b_name(module)] = a, b
        if adapter.modules[module].lora_bias is not None:  # a graph exported without a bias slot refuses it below
            tensors[lora_bias_name(module)] = lora_bias_term(adapter, module, dtype)
    check_tensors({k: (v.shape, v.dtype) for k, v in tensors.items()}, slots, f"adapter {adapter.name!r}")
    return tensors


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
    """An ``.onnx_adapter`` checked against a graph: ORT's LoraAdapter plus its tensors."""

    path: Path
    lora: ort.LoraAdapter
    tensors: dict[str, np.ndarray]


def load_onnx_adapter(path: str | os.PathLike[str], slots: Mapping[str, Slot]) -> LoadedAdapter:
    """Read ``path``, check its names/shapes/dtypes against ``slots``, and load it for ORT."""
    path = Path(path)
    tensors = read_onnx_adapter(path)
    check_tensors({k: (v.shape, v.dtype) for k, v in tensors.items()}, slots, str(path))
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    return LoadedAdapter(path, lora, tensors)
