"""mlx-lm's LoRA and DoRA layers (``mlx_lm.tuner.lora`` / ``mlx_lm.tuner.dora``, the mlx CPU build) as a
conformance implementation: ``--impl lora_ref.conformance.peers.mlx:factory --layout mlx``.

Builds one ``LoRALinear`` / ``LoRAEmbedding`` / ``DoRALinear`` per case the way mlx-lm's
``linear_to_lora_layers`` does (``from_base`` of an ``nn.Linear`` / ``nn.Embedding`` holding the case's base
weight in the storage dtype; the LoRA factors are created in float32, as ``from_base`` creates them, and hold
the case's values exactly), with the ``mlx`` layout's bare ``scale`` (so rsLoRA is only another scale) and the
case's factors (``lora_a`` [in, r], ``lora_b`` [r, out]; Embedding ``lora_a`` [V, r], ``lora_b`` [r, D]).
A DoRA layer's magnitude ``m`` is the case's, in float32 as ``DoRALinear.set_linear`` computes it.
Forward is the layer's ``__call__`` (dropout 0: eval), backward ``mx.vjp`` of it (gradients of x, of the factors,
of ``m`` and, when asked, of the base weight and bias), merge is the layer's ``fuse()``.
Each output comes back in the dtype mlx computed it in; gradients of the float32 factors and magnitude are
rounded once to the storage dtype (a user's optimizer keeps them in float32; the suite asks for t).

Unsupported (skipped, each mlx-lm's own limit): lora_bias, given dropout masks (its dropout is an
``nn.Dropout``), a safe merge, unmerge (mlx-lm fuses and never unfuses), convolutions, mixed batches,
stacks, combinations, DoRA on convolutions, and DoRA on Embedding, whose ``DoRAEmbedding`` is another layer
(a magnitude per vocabulary row [V], normalising each looked-up row, where the suite's, PEFT's, is one per
embedding dimension [D] normalised over the vocabulary): no case maps onto it.

Run this peer through the bridge (``--cmd "python -m lora_ref.conformance.bridge lora_ref.conformance.peers.mlx:factory"
--persistent``): mlx reads an out-of-range token id without a check (memory past the table, or a wrapped row),
and an empty-batch backward can hang inside mlx (M-5); the bridge's process is killed on a timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...dtypes import STORAGE_DTYPES, dtype_name, round_to
from .. import Refusal
from . import ids_out_of_range

Arrays = dict[str, np.ndarray]
_KINDS = ("linear", "embedding", "dora")


class MlxImplementation:
    """The protocol object; ``versions`` names what ran."""

    def __init__(self) -> None:
        from importlib.metadata import version

        import mlx.core as mx
        import mlx.nn as nn
        from mlx_lm.tuner import dora, lora

        self.mx, self.nn, self.lora, self.dora = mx, nn, lora, dora
        self.versions = {"mlx": mx.__version__, "mlx-lm": version("mlx-lm")}
        self.dtypes = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        kind, _, action = op.partition(".")
        if kind == "dora_embedding":
            raise NotImplementedError("mlx-lm's DoRAEmbedding has a magnitude per vocabulary row, not per embedding dimension")
        if kind not in _KINDS:
            raise NotImplementedError(f"mlx-lm has no {op!r} (LoRA/DoRA Linear and LoRA Embedding only)")
        if action == "unmerge":
            raise NotImplementedError("mlx-lm has no unmerge (fuse() returns a new layer; nothing unfuses)")
        if params.get("safe_merge", False):
            raise NotImplementedError("mlx-lm's fuse() has no safe merge")
        if "lora_bias" in inputs or "dropout_mask" in inputs:
            raise NotImplementedError("mlx-lm's LoRA layers have no lora_bias, and their dropout is an nn.Dropout (no given mask)")
        try:
            layer, x_name = self._layer(kind, params, inputs)
            if action == "merge":
                return {"W_merged": self._array(layer.fuse().weight)}
            if action == "forward":
                y = layer(self._tensor(inputs[x_name]))
                return {"y": self._array(y)}
            return self._backward(layer, kind, params, inputs, x_name)
        except ValueError as exc:  # mlx reports operands of mismatched shapes as ValueError: a refusal
            raise Refusal(f"mlx refused the shapes: {exc}") from exc

    # -- conversions --------------------------------------------------------------------------------
    def _tensor(self, array: np.ndarray, dtype: str | None = None):
        """numpy (a storage dtype, or integer ids) -> an mlx array in ``dtype`` (default: its own), exactly."""
        array = np.asarray(array)
        if array.dtype.kind in "iu":
            return self.mx.array(array.astype(np.int64))
        return self.mx.array(array.astype(np.float32)).astype(self.dtypes[dtype or dtype_name(array.dtype)])

    def _array(self, tensor, like: np.dtype | None = None) -> np.ndarray:
        """mlx -> numpy, in the mlx array's own dtype, or rounded once to ``like``."""
        names = {self.mx.float32: "float32", self.mx.float16: "float16", self.mx.bfloat16: "bfloat16"}
        if tensor.dtype not in names:
            raise RuntimeError(f"mlx returned an array of dtype {tensor.dtype}")
        value = np.array(tensor.astype(self.mx.float32)).astype(np.float64)
        return round_to(value, np.dtype(like) if like is not None else _storage(names[tensor.dtype]))

    # -- layers ------------------------------------------------------------------------------------
    def _layer(self, kind: str, params: Mapping[str, Any], inputs: Arrays):
        """The mlx-lm layer built by ``from_base``, every case tensor loaded by ``load_weights`` (which refuses a
        shape that differs from the layer's, as it does for a user's file); the name of its input."""
        nn, W = self.nn, inputs["W"]
        # with base gradients, a zero bias gives db, as in the other peers
        want_db = params.get("want_base_grads", False) and kind != "embedding"
        bias = inputs.get("b", np.zeros(W.shape[0], dtype=W.dtype) if want_db else None)
        if kind == "embedding":
            base = nn.Embedding(*W.shape)
            x_name, cls, prefix = "ids", self.lora.LoRAEmbedding, "embedding"
        else:
            base = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
            x_name, cls, prefix = "x", self.dora.DoRALinear if kind == "dora" else self.lora.LoRALinear, "linear"
        base.weight = self._tensor(W)  # from_base reads the base's shape (and DoRA its norm) from this weight
        layer = cls.from_base(base, r=int(params["r"]), dropout=0.0, scale=float(params["scale"]))
        weights = [(f"{prefix}.weight", base.weight), ("lora_a", self._tensor(inputs["lora_a"], "float32")),
                   ("lora_b", self._tensor(inputs["lora_b"], "float32"))]  # from_base creates the factors in float32
        if bias is not None:
            weights.append((f"{prefix}.bias", self._tensor(bias)))
        if kind == "dora":
            weights.append(("m", self._tensor(inputs["magnitude"], "float32")))  # set_linear computes m in float32
        layer.load_weights(weights, strict=True)
        layer.eval()
        return layer, x_name

    def _backward(self, layer, kind: str, params: Mapping[str, Any], inputs: Arrays, x_name: str) -> Arrays:
        """``mx.vjp`` of the layer's call with respect to its factors (and magnitude, base weight, bias) and x."""
        mx, t = self.mx, inputs["W"].dtype
        base = layer.embedding if kind == "embedding" else layer.linear
        names = ["lora_a", "lora_b"] + (["m"] if kind == "dora" else [])
        if kind == "dora":  # the DoRA cases ask for db (the bias is outside the magnitude), never dW
            base_names = ["bias"] if "bias" in base else []
        else:
            base_names = (["weight"] + (["bias"] if "bias" in base else [])) if params.get("want_base_grads", False) else []
        x = self._tensor(inputs[x_name])
        with_x = x_name == "x"

        def apply(*values):
            for name, value in zip(names, values):
                setattr(layer, name, value)
            for name, value in zip(base_names, values[len(names):]):
                setattr(base, name, value)
            return layer(values[-1] if with_x else x)

        primals = [getattr(layer, n) for n in names] + [getattr(base, n) for n in base_names] + ([x] if with_x else [])
        (y,), grads = mx.vjp(apply, primals, [self._tensor(inputs["dy"]).astype(layer(x).dtype)])
        mx.eval(grads)
        out = {"dA": self._array(grads[0], t), "dB": self._array(grads[1], t)}
        if kind == "dora":
            out["dmagnitude"] = self._array(grads[2], t)
        for name, grad in zip(base_names, grads[len(names):]):
            out["dW" if name == "weight" else "db"] = self._array(grad, t)
        if with_x:
            out["dx"] = self._array(grads[-1], t)
        return out


#: Deviation id -> (what mlx-lm does, its source line in mlx-lm 0.32.2's mlx_lm/... or mlx 0.32.4's mlx/...).
DEVIATIONS: dict[str, tuple[str, str]] = {
    "M-1": ("the base layer runs in fp16/bf16 and the float32 LoRA term is cast to the input dtype before it is added "
            "(three roundings); DoRA's g = m / ||W'|| is cast too: forward and backward round intermediates (precision)",
            "mlx_lm/tuner/lora.py:98 `return y + (self.scale * z).astype(x.dtype)` (Embedding: :279; DoRA: "
            "tuner/dora.py:117 and :124 `out = (self.m / denom).astype(x.dtype) * out`)"),
    "M-2": ("fuse() rounds the delta to the weight dtype before adding it: a double rounding (precision)",
            "mlx_lm/tuner/lora.py:52 `delta = ((self.scale * self.lora_b.T) @ self.lora_a.T).astype(weight.dtype)` "
            "(Embedding: :238)"),
    "M-3": ("DoRALinear.fuse() of a float16/bfloat16 layer returns a float32 weight: the float32 magnitude promotes it "
            "(the case's dtype check reports it as an error)",
            "mlx_lm/tuner/dora.py:44 `fused_linear.weight = norm_scale[:, None] * weight` with :43 `norm_scale = self.m / "
            "mx.linalg.norm(weight, axis=1)` and :90 `self.m = mx.linalg.norm(...astype(mx.float32), axis=1)`"),
    "M-4": ("out-of-range token ids are not refused: an id >= V reads memory past the table, a negative id wraps "
            "(forward and backward)",
            "mlx/nn/layers/embedding.py:32 `return self.weight[x]` and mlx_lm/tuner/lora.py:278 `self.lora_a[x]` (mlx "
            "indexing does not check bounds)"),
    "M-5": ("a Linear backward with an empty batch (x [0, in]) sometimes never returns: every time on a thread other "
            "than the main one (the in-process watchdog marks it timeout), now and then on the main thread (the bridge's "
            "server is killed after the timeout and restarted)",
            "mx.eval of mx.vjp of mlx_lm/tuner/lora.py:95 `LoRALinear.__call__` (a hang in mlx 0.32.4's C++ CPU "
            "evaluation, not in mlx-lm's Python; tests/test_conformance_peers.py reproduces it)"),
    "S-M1": ("no lora_bias, given dropout masks, safe merge, unmerge, convolutions, mixed batch, stack, combination or "
             "DoRA on convolutions (skipped)",
             "mlx_lm/tuner/lora.py:11 `class LoRALinear` / :198 `class LoRAEmbedding`, tuner/dora.py:9 `class DoRALinear` "
             "(r, dropout, scale only; fuse() and no unfuse)"),
    "S-M2": ("DoRAEmbedding is another layer: one magnitude per vocabulary row [V], each looked-up row normalised, "
             "where PEFT's (the suite's) has one per embedding dimension [D], normalised over the vocabulary (skipped)",
             "mlx_lm/tuner/dora.py:196 `self.m = mx.linalg.norm(embedding.weight, axis=1)` and :205 `denom = "
             "mx.stop_gradient(mx.linalg.norm(adapted, axis=-1))`"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation (a :data:`DEVIATIONS` id) behind a result that is not a float32-tier pass."""
    kind, _, action = case.operation.partition(".")
    if result.status == "skip":
        return "S-M2" if kind == "dora_embedding" else "S-M1"
    low_precision = case.dtype in ("float16", "bfloat16")
    if result.status == "error":
        return "M-3" if kind == "dora" and action == "merge" and low_precision and "dtype float32" in result.detail else None
    if result.status == "timeout":
        empty = "x" in inputs and np.asarray(inputs["x"]).shape[0] == 0
        return "M-5" if kind == "linear" and action == "backward" and empty else None
    if result.refusal:
        return "M-4" if result.status == "fail" and ids_out_of_range(case.operation, inputs) else None
    if result.verdict != "storage" or not low_precision:
        return None
    return "M-2" if action == "merge" else "M-1"


def _storage(name: str) -> np.dtype:
    return np.dtype(STORAGE_DTYPES[name])


def factory() -> MlxImplementation:
    return MlxImplementation()
