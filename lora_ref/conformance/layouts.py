"""Layout adapters: present a case in an implementation's own convention, and map results back.

Cases are stored in one canonical layout (PEFT tensors: W [out, in] or [in, out] with
``fan_in_fan_out``, A [r, in], B [out, r]; params r, lora_alpha, use_rslora, fan_in_fan_out,
plus the derived ``scale``). An adapter rewrites (params, inputs) before the implementation
runs and rewrites its outputs back before they are checked:

``canonical``  as stored (the implementation may use ``scale`` or derive it).
``peft``       PEFT's convention: ``scale`` removed, so the implementation must compute
               s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, itself.
``mlx``        mlx-lm's convention: ``lora_a`` = A^T [in, r], ``lora_b`` = B^T [r, out] (mixed
               batch: ``lora_a.i``, ``lora_b.i``), the bare ``scale`` is authoritative (``r``,
               ``lora_alpha`` and ``use_rslora`` are kept, for mlx code that needs them; conv
               factors, which mlx-lm has no convention for, keep their names and shapes); W always
               [out, in] (a fan_in_fan_out case is transposed in and its weight outputs transposed
               back); gradients ``dA``/``dB`` are returned in the lora_a/lora_b layout, and combined
               factors (``combine.*``) as ``lora_a`` [in, r], ``lora_b`` [r, out].
``keras``      Keras 3's convention (``keras.layers.Dense.enable_lora``, ``Embedding``): Dense
               ``kernel`` = W^T [in, out], ``lora_kernel_a`` = A^T [in, r], ``lora_kernel_b`` =
               B^T [r, out], ``bias``; Embedding ``embeddings`` [V, D], ``lora_embeddings_a`` =
               A^T [V, r], ``lora_embeddings_b`` = B^T [r, D]; convolutions channels-last: x
               [N, *S, C], ``kernel`` [*k, C, O], ``lora_kernel_a`` [*k, C, r], ``lora_kernel_b``
               [r, O], y [N, *S_out, O]; a fast unmerge's input is ``kernel_merged`` /
               ``embeddings_merged``. Params ``lora_rank`` and ``lora_alpha`` (and use_rslora),
               no ``scale``: the implementation derives s. Outputs keep their names (y, W_merged,
               dA, ...) in the Keras layout (weights as ``kernel``, gradients like their parameter).
               Operations without a Keras counterpart (mixed batch, combine, DoRA) are passed as
               canonical.

Your own mapping: ``--layout MODULE:ATTRIBUTE`` names a :class:`Layout` instance (or a
zero-argument callable returning one) whose ``to_impl``/``from_impl`` map a case to your
convention and back (see :func:`get_layout`; ``tests/test_conformance_suite.py`` has an example).
"""

from __future__ import annotations

import importlib
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
        out_params = _without(params, ("fan_in_fan_out",))
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


def _channels_last(array: np.ndarray) -> np.ndarray:
    """[N, C, *S] -> [N, *S, C] (also [O, C, *k] -> [*k, C, O] via :func:`_kernel_last`)."""
    return np.ascontiguousarray(np.moveaxis(array, 1, -1))


def _kernel_last(W: np.ndarray) -> np.ndarray:
    """A conv kernel [O, C, *k] as Keras stores it: [*k, C, O]."""
    d = W.ndim - 2
    return np.ascontiguousarray(W.transpose(tuple(range(2, 2 + d)) + (1, 0)))


def _kernel_first(K: np.ndarray) -> np.ndarray:
    """Keras's [*k, C, O] back to [O, C, *k]."""
    d = K.ndim - 2
    return np.ascontiguousarray(K.transpose((d + 1, d) + tuple(range(d))))


class _Keras(Layout):
    """Keras 3 (see the module docstring); the kind comes from the operation name."""

    @staticmethod
    def _kind(operation: str) -> str:
        kind = operation.split(".", 1)[0]
        return kind if kind in ("linear", "embedding", "conv1d", "conv2d", "conv3d") else ""

    def to_impl(self, operation, params, inputs):
        kind = self._kind(operation)
        if not kind:
            return dict(params), dict(inputs)
        out_params = _without(params, ("scale", "r", "fan_in_fan_out"))
        out_params["lora_rank"] = params["r"]
        arrays: Arrays = {}
        fifo = params.get("fan_in_fan_out", False)
        for name, array in inputs.items():
            if kind == "linear" and name in ("W", "W_merged"):
                arrays["kernel" if name == "W" else "kernel_merged"] = np.ascontiguousarray(array if fifo else array.T)
            elif kind == "embedding" and name in ("W", "W_merged"):
                arrays["embeddings" if name == "W" else "embeddings_merged"] = array
            elif kind.startswith("conv") and name in ("W", "W_merged"):
                arrays["kernel" if name == "W" else "kernel_merged"] = _kernel_last(array)
            elif name in ("A", "B"):
                prefix = "lora_embeddings" if kind == "embedding" else "lora_kernel"
                suffix = "a" if name == "A" else "b"
                if kind.startswith("conv"):  # A [r, C, *k] -> [*k, C, r]; B [O, r, 1..] -> [r, O]
                    value = _kernel_last(array) if name == "A" else np.ascontiguousarray(array.reshape(array.shape[:2]).T)
                else:
                    value = np.ascontiguousarray(array.T)
                arrays[f"{prefix}_{suffix}"] = value
            elif name == "b":
                arrays["bias"] = array
            elif kind.startswith("conv") and name in ("x", "dy"):
                arrays[name] = _channels_last(array)
            else:
                arrays[name] = array
        return out_params, arrays

    def from_impl(self, operation, params, outputs):
        kind = self._kind(operation)
        if not kind:
            return dict(outputs)
        fifo = params.get("fan_in_fan_out", False)
        result = {}
        for name, array in outputs.items():
            array = np.asarray(array)
            if name in _WEIGHT_OUTPUTS and kind == "linear" and array.ndim == 2 and not fifo:
                array = np.ascontiguousarray(array.T)  # kernel [in, out] -> W [out, in]
            elif name in _WEIGHT_OUTPUTS and kind.startswith("conv"):
                array = _kernel_first(array)
            elif name == "dA" and kind.startswith("conv"):
                array = _kernel_first(array)  # [*k, C, r] -> [r, C, *k]
            elif name == "dB" and kind.startswith("conv"):
                array = np.ascontiguousarray(array.T.reshape(array.shape[::-1] + (1,) * int(kind[4])))  # [r, O] -> [O, r, 1, ...]
            elif name in ("dA", "dB") and array.ndim == 2:
                array = np.ascontiguousarray(array.T)
            elif name in ("y", "dx") and kind.startswith("conv"):
                array = np.ascontiguousarray(np.moveaxis(array, -1, 1))
            result[name] = array
        return result


LAYOUTS: dict[str, Layout] = {
    "canonical": Layout("canonical", "as stored: PEFT tensors, params with r, lora_alpha, use_rslora and scale"),
    "peft": _Peft("peft", "PEFT: A [r, in], B [out, r]; s derived by the implementation from lora_alpha, r, use_rslora"),
    "mlx": _Mlx("mlx", "mlx-lm: lora_a [in, r], lora_b [r, out], bare scale (with r, lora_alpha), W [out, in]"),
    "keras": _Keras("keras", "Keras 3: kernel [in, out], lora_kernel_a [in, r], lora_kernel_b [r, out], lora_rank and lora_alpha; "
                             "channels-last convolutions"),
}


def get_layout(name: str) -> Layout:
    """The layout called ``name``, or ``MODULE:ATTRIBUTE`` naming your own :class:`Layout` (or a callable
    returning one); ConfigError for an unknown or unloadable one."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    if ":" not in name:
        raise ConfigError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)} or give MODULE:ATTRIBUTE")
    module_name, _, attribute = name.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load layout {name!r}: {exc}") from None
    layout = value() if callable(value) and not isinstance(value, Layout) else value
    if not (callable(getattr(layout, "to_impl", None)) and callable(getattr(layout, "from_impl", None))):
        raise ConfigError(f"layout {name!r} has no to_impl/from_impl methods")
    return layout
