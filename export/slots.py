"""The LoRA inputs a dynamic graph declares, and checks that a set of adapter tensors fits them.

A slot is one graph input ``<module>.lora_A.weight`` ([in, r]; a Conv's [r, C, *k]),
``<module>.lora_B.weight`` ([r, out]; a Conv's [O, r, 1...]), ``<module>.lora_B.bias``
([out], s·lora_bias, only in graphs exported for an adapter with lora_bias) or
``<module>.lora_magnitude_vector`` ([out], DoRA's m, only for a DoRA module; default zeros =
no DoRA scaling); r is symbolic (a
string) or, in a fixed-max-rank graph, a number. The rank axis is 1 of A and 0 of B for 2-D
slots (Linear, Embedding), 0 of A and 1 of B for 3-5-D ones (Conv, PEFT's conv layouts).
Tensors fit when every name is a slot, each static axis matches, the dtype matches, for each
module the A and B tensors given agree on r, and a bias or magnitude comes with its module's A and B. ORT itself would run the base model for a misspelt name in
some paths and fail with a bare "Invalid input name" in others; these checks name the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import AdapterNameError
from .names import MAGNITUDE_SUFFIX, all_suffixes

A_SUFFIX, B_SUFFIX, BIAS_SUFFIX = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"
#: every scheme's suffixes (:mod:`lora_ref.export.names`; genai's ``.lora_A.MatMul.weight`` ...), longest first
SUFFIXES = all_suffixes()
A_SUFFIXES = tuple(s for s in SUFFIXES if ".lora_A." in s)
BIAS_SUFFIXES = tuple(s for s in SUFFIXES if s.endswith(".bias"))


@dataclass(frozen=True)
class Slot:
    """One LoRA graph input: its name, its axes (int = static, str/None = symbolic) and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def module(self) -> str:
        return next(self.name[: -len(suffix)] for suffix in SUFFIXES if self.name.endswith(suffix))

    @property
    def is_a(self) -> bool:
        return self.name.endswith(A_SUFFIXES)

    @property
    def is_bias(self) -> bool:
        return self.name.endswith(BIAS_SUFFIXES)

    @property
    def is_magnitude(self) -> bool:
        """DoRA's ``lora_magnitude_vector`` [out] (default zeros: no DoRA scaling)."""
        return self.name.endswith(MAGNITUDE_SUFFIX)

    @property
    def is_vector(self) -> bool:
        """A per-channel vector [out] (a bias or a magnitude): no rank axis, default zeros."""
        return self.is_bias or self.is_magnitude

    @property
    def rank_axis(self) -> int:
        """The axis holding r (see module docstring); meaningless for a bias."""
        return rank_axis(self.is_a, len(self.shape))

    @property
    def rank(self) -> int | None:
        """The static rank, or None when the rank axis is symbolic (or the slot is a vector)."""
        if self.is_vector:
            return None
        axis = self.shape[self.rank_axis]
        return axis if isinstance(axis, int) else None

    def default(self) -> np.ndarray:
        """What the graph's default initializer holds: zeros at the static rank, or rank 0 (a vector: zeros [out])."""
        if self.is_vector:
            return np.zeros(self.shape, self.dtype)
        shape = list(self.shape)
        shape[self.rank_axis] = self.rank or 0
        return np.zeros(shape, self.dtype)


def rank_axis(is_a: bool, ndim: int) -> int:
    """The rank axis of a LoRA A (``is_a``) or B tensor with ``ndim`` axes: 2-D [in, r] / [r, out]; conv [r, C, *k] / [O, r, 1...]."""
    if ndim == 2:
        return 1 if is_a else 0
    return 0 if is_a else 1


def _is_lora(name: str) -> bool:
    return name.endswith(SUFFIXES)


def slots_from_model(model: onnx.ModelProto) -> dict[str, Slot]:
    """The LoRA slots of a dynamic graph (from its declared inputs)."""
    slots = {}
    for info in model.graph.input:
        if _is_lora(info.name):
            tensor = info.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
            slots[info.name] = Slot(info.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return slots


_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16), "tensor(double)": np.dtype(np.float64)}


def slots_from_session(session) -> dict[str, Slot]:
    """The LoRA slots of an onnxruntime.InferenceSession (inputs and overridable initializers)."""
    slots = {}
    for arg in (*session.get_inputs(), *session.get_overridable_initializers()):
        if _is_lora(arg.name) and arg.type in _ORT_TYPES:
            slots[arg.name] = Slot(arg.name, tuple(arg.shape), _ORT_TYPES[arg.type])
    return slots


def check_tensors(tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]], slots: Mapping[str, Slot], where: str) -> None:
    """Raise AdapterNameError unless ``tensors`` (name -> (shape, dtype)) fit ``slots`` (see module doc)."""
    if not tensors:
        raise AdapterNameError(f"{where}: holds no tensors")
    unknown = sorted(set(tensors) - set(slots))
    if unknown:
        hint = f"; the graph's LoRA inputs are e.g. {sorted(slots)[:4]}" if slots else "; the graph has no LoRA inputs (not a dynamic graph?)"
        raise AdapterNameError(f"{where}: {len(unknown)} name(s) are not LoRA inputs of the graph: {unknown[:6]}{hint}")
    ranks: dict[str, set[int]] = {}
    for name, (shape, dtype) in tensors.items():
        slot = slots[name]
        if len(shape) != len(slot.shape) or any(isinstance(s, int) and s != d for s, d in zip(slot.shape, shape)):
            raise AdapterNameError(f"{where}: {name} has shape {tuple(shape)}, the graph expects {slot.shape}")
        if np.dtype(dtype) != slot.dtype:
            raise AdapterNameError(f"{where}: {name} is {np.dtype(dtype)}, the graph expects {slot.dtype}")
        if not slot.is_vector:
            ranks.setdefault(slot.module, set()).add(shape[slot.rank_axis])
    mismatched = sorted(module for module, rs in ranks.items() if len(rs) > 1)
    if mismatched:
        raise AdapterNameError(f"{where}: lora_A and lora_B disagree on the rank of {mismatched}")
    halves: dict[str, set[bool]] = {}
    for name in tensors:
        if not slots[name].is_vector:
            halves.setdefault(slots[name].module, set()).add(slots[name].is_a)
    lonely = sorted(m for m, kinds in halves.items() if len(kinds) != 2)
    if lonely:
        raise AdapterNameError(f"{where}: {lonely} have lora_A without lora_B or the reverse")
    biased = sorted(slots[name].module for name in tensors if slots[name].is_vector)
    orphans = [m for m in biased if m not in ranks]
    if orphans:
        raise AdapterNameError(f"{where}: {orphans} have lora_B.bias or lora_magnitude_vector without lora_A and lora_B")
