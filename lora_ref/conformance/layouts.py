"""Layout adapters: present a case in an implementation's own convention, and map results back.

Cases are stored in one canonical layout (PEFT tensors: W [out, in] or [in, out] with
``fan_in_fan_out``, A [r, in], B [out, r]; params r, lora_alpha, use_rslora, fan_in_fan_out,
plus the derived ``scale``). An adapter rewrites (params, inputs) before the implementation
runs and rewrites its outputs back before they are checked:

``canonical``  as stored (the implementation may use ``scale`` or derive it).
``peft``       PEFT's convention: ``scale`` removed, so the implementation must compute
               s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, itself.
``mlx``        mlx-lm's convention: ``lora_a`` = A^T [in, r], ``lora_b`` = B^T [r, out] (mixed
               batch: ``lora_a.i``, ``lora_b.i``), a bare ``scale`` (lora_alpha and use_rslora
               removed, here and in each of a mixed batch's ``adapters``; conv factors, which mlx-lm
               has no convention for, keep their names and shapes); W always [out, in] (a
               fan_in_fan_out case is transposed in and its weight outputs transposed back);
               gradients ``dA``/``dB`` are returned in the lora_a/lora_b layout, and combined
               factors (``combine.*``) as ``lora_a`` [in, r], ``lora_b`` [r, out].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

Arrays = dict[str, np.ndarray]
_WEIGHT_OUTPUTS = ("W", "W_merged", "W_restored", "dW")


@dataclass(frozen=True)
class Layout:
    """A named convention with its two mappings (identity by default)."""

    name: str
    description: str

    def to_impl(self, operation: str, params: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], Arrays]:
        return dict(params), dict(inputs)

    def from_impl(self, operation: str, params: Mapping[str, Any], outputs: Mapping[str, np.ndarray]) -> Arrays:
        """``params`` are the canonical (stored) parameters of the case."""
        return dict(outputs)


def _without(params: Mapping[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """``params`` minus ``drop``, also inside a mixed batch's per-adapter ``adapters`` list."""
    out = {k: v for k, v in params.items() if k not in drop}
    if isinstance(out.get("adapters"), list):
        out["adapters"] = [_without(a, drop) if isinstance(a, Mapping) else a for a in out["adapters"]]
    return out


def _factor_name(name: str) -> str | None:
    """'A' -> 'lora_a', 'B.1' -> 'lora_b.1'; None for anything else."""
    head, dot, tail = name.partition(".")
    if head in ("A", "B") and (not dot or tail.isdigit()):
        return f"lora_{head.lower()}{dot}{tail}"
    return None


class _Peft(Layout):
    def to_impl(self, operation, params, inputs):
        return _without(params, ("scale",)), dict(inputs)


class _Mlx(Layout):
    def to_impl(self, operation, params, inputs):
        out_params = _without(params, ("lora_alpha", "use_rslora", "fan_in_fan_out"))
        out_params["fan_in_fan_out"] = False
        arrays = {}
        for name, array in inputs.items():
            renamed = _factor_name(name)
            if renamed is not None and array.ndim == 2:
                arrays[renamed] = np.ascontiguousarray(array.T)
            elif name in _WEIGHT_OUTPUTS and params.get("fan_in_fan_out", False):
                arrays[name] = np.ascontiguousarray(array.T)
            else:
                arrays[name] = array
        return out_params, arrays

    def from_impl(self, operation, params, outputs):
        result = {}
        for name, array in outputs.items():
            array = np.asarray(array)
            if name in ("lora_a", "lora_b") and array.ndim == 2:  # combined factors, back to A [r, in], B [out, r]
                name, array = name[-1].upper(), np.ascontiguousarray(array.T)
            elif name.startswith("d") and _factor_name(name[1:]) is not None and array.ndim == 2:  # dA, dB.1, ...
                array = np.ascontiguousarray(array.T)
            elif name in _WEIGHT_OUTPUTS and params.get("fan_in_fan_out", False) and array.ndim == 2:
                array = np.ascontiguousarray(array.T)
            result[name] = array
        return result


LAYOUTS: dict[str, Layout] = {
    "canonical": Layout("canonical", "as stored: PEFT tensors, params with r, lora_alpha, use_rslora and scale"),
    "peft": _Peft("peft", "PEFT: A [r, in], B [out, r]; s derived by the implementation from lora_alpha, r, use_rslora"),
    "mlx": _Mlx("mlx", "mlx-lm: lora_a [in, r], lora_b [r, out], bare scale, W [out, in]"),
}


def get_layout(name: str) -> Layout:
    """The layout called ``name``; ConfigError for an unknown one."""
    if name not in LAYOUTS:
        raise ConfigError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]
