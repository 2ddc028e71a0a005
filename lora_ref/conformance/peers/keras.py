"""Keras 3's built-in LoRA (``layer.enable_lora(rank, lora_alpha=...)``) on the JAX backend (CPU) as a conformance
implementation: ``--impl lora_ref.conformance.peers.keras:factory --layout keras``.

Builds one ``keras.layers.Dense`` / ``Embedding`` / ``Conv1D``/``Conv2D``/``Conv3D`` (channels-last) per case
with the case's storage dtype as its dtype policy, calls ``enable_lora(lora_rank, lora_alpha)`` (Keras keeps
the LoRA factors in float32, s = lora_alpha / lora_rank) and assigns the case tensors (the ``keras`` layout:
kernel [in, out] or [*k, C, O], lora_kernel_a [in, r] or [*k, C, r], lora_kernel_b [r, out]). Forward is the
layer's ``call``, which recomputes the merged weight ``cast(kernel + s·a@b, compute dtype)`` and applies it;
merge is that same ``kernel`` / ``embeddings`` property (what Keras saves); backward is ``jax.vjp`` of the
layer's ``stateless_call`` (gradients of every variable and of x). A numeric conv padding is a
``keras.ops.pad`` of zeros before a ``"valid"`` conv, as a ZeroPadding layer in front would be.

``KERAS_BACKEND`` must be ``jax`` (it is set to ``jax`` if unset, before Keras is first imported).
Unsupported (skipped, each Keras's own limit): rsLoRA, lora_bias, given dropout masks (no LoRA dropout),
a safe merge, unmerge (fast or exact), strides > 1 with dilation > 1, mixed batches, DoRA and combinations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...dtypes import dtype_name, round_to
from .. import Refusal
from . import ids_out_of_range

Arrays = dict[str, np.ndarray]


class KerasImplementation:
    """The protocol object; ``versions`` names what ran."""

    def __init__(self) -> None:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import jax
        import keras

        if keras.backend.backend() != "jax":
            raise RuntimeError(f"the Keras peer needs KERAS_BACKEND=jax (Keras was loaded with {keras.backend.backend()!r})")
        self.keras, self.jax = keras, jax
        self.versions = {"keras": keras.__version__, "jax": jax.__version__}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        kind, _, action = op.partition(".")
        if kind not in ("linear", "embedding", "conv1d", "conv2d", "conv3d"):
            raise NotImplementedError(f"Keras has no {op!r} (no mixed batch, DoRA or combination)")
        for flag, why in (("use_rslora", "rsLoRA"), ("safe_merge", "safe merge")):
            if params.get(flag, False):
                raise NotImplementedError(f"Keras's LoRA has no {why}")
        if "lora_bias" in inputs or "dropout_mask" in inputs:
            raise NotImplementedError("Keras's LoRA has no lora_bias and no LoRA dropout")
        if action == "unmerge":
            raise NotImplementedError("Keras has no unmerge (the merged kernel is only computed, never stored back)")
        try:
            layer, x_name = self._layer(kind, params, inputs)
            if action == "merge":
                weight = layer.embeddings if kind == "embedding" else layer.kernel
                return {"W_merged": self._array(weight, self._dtype(inputs))}
            return self._forward(layer, kind, params, inputs, x_name, backward=action == "backward")
        except TypeError as exc:  # jax reports operands of mismatched shapes as TypeError
            if "dimensions" in str(exc) or "shape" in str(exc):
                raise Refusal(f"jax refused the shapes: {exc}") from exc
            raise

    # -- conversions --------------------------------------------------------------------------------
    @staticmethod
    def _dtype(inputs: Arrays) -> np.dtype:
        weight = inputs.get("kernel", inputs.get("embeddings"))
        return np.asarray(weight).dtype

    def _tensor(self, array: np.ndarray):
        """numpy (a storage dtype, or integer ids) -> a backend tensor, exactly (bfloat16 through float32)."""
        array = np.asarray(array)
        if array.dtype.kind in "iu":
            return self.keras.ops.convert_to_tensor(array.astype(np.int64))
        return self.keras.ops.cast(self.keras.ops.convert_to_tensor(array.astype(np.float32)), dtype_name(array.dtype))

    @staticmethod
    def _array(tensor, like: np.dtype) -> np.ndarray:
        """backend tensor -> numpy in dtype ``like`` (one rounding if the tensor holds more precision)."""
        return round_to(np.asarray(tensor).astype(np.float64), like)

    # -- layers ------------------------------------------------------------------------------------
    def _layer(self, kind: str, params: Mapping[str, Any], inputs: Arrays):
        """The built layer with LoRA enabled and every case tensor assigned; the name of its input."""
        layers, dtype = self.keras.layers, dtype_name(self._dtype(inputs))
        rank, alpha = int(params["lora_rank"]), params["lora_alpha"]
        with_bias = "bias" in inputs or bool(params.get("want_base_grads", False)) and kind != "embedding"
        if kind == "embedding":
            V, D = inputs["embeddings"].shape
            layer, x_name, weight = layers.Embedding(V, D, embeddings_initializer="zeros", dtype=dtype), "ids", "_embeddings"
            layer.build((None,))
        elif kind == "linear":
            n_in, n_out = inputs["kernel"].shape
            layer, x_name, weight = layers.Dense(n_out, use_bias=with_bias, kernel_initializer="zeros", dtype=dtype), "x", "_kernel"
            layer.build((None, n_in))
        else:
            K = inputs["kernel"]
            d = K.ndim - 2
            strides, dilation = (tuple(int(v) for v in np.broadcast_to(np.atleast_1d(params.get(k, 1)), (d,)))
                                 for k in ("stride", "dilation"))
            if max(strides) > 1 and max(dilation) > 1:
                raise NotImplementedError("Keras refuses strides > 1 with dilation_rate > 1 in one conv")
            conv = {1: layers.Conv1D, 2: layers.Conv2D, 3: layers.Conv3D}[d]
            layer = conv(K.shape[-1], K.shape[:d], strides=strides, dilation_rate=dilation, padding="valid", use_bias=with_bias,
                         kernel_initializer="zeros", dtype=dtype)
            layer.build((None,) * (d + 1) + (K.shape[-2],))
            x_name, weight = "x", "_kernel"
        layer.enable_lora(rank, lora_alpha=alpha, a_initializer="zeros")  # every value is assigned below: no random init
        prefix = "lora_embeddings" if kind == "embedding" else "lora_kernel"
        self._assign(getattr(layer, weight), inputs["embeddings" if kind == "embedding" else "kernel"])
        self._assign(getattr(layer, f"{prefix}_a"), inputs[f"{prefix}_a"])
        self._assign(getattr(layer, f"{prefix}_b"), inputs[f"{prefix}_b"])
        if with_bias:
            self._assign(layer.bias, inputs.get("bias", np.zeros(layer.bias.shape, dtype=self._dtype(inputs))))
        return layer, x_name

    def _assign(self, variable, array: np.ndarray) -> None:
        if tuple(variable.shape) != np.shape(array):
            raise Refusal(f"shape mismatch: a tensor of shape {list(np.shape(array))} for a variable of shape {list(variable.shape)}")
        variable.assign(self.keras.ops.cast(self._tensor(array), variable.dtype))

    def _pad(self, kind: str, params: Mapping[str, Any], x):
        """Zero padding in front of a "valid" conv (channels-last x [N, *S, C])."""
        if not kind.startswith("conv"):
            return x
        d = int(kind[4])
        pads = np.broadcast_to(np.atleast_1d(params.get("padding", 0)), (d,))
        return self.keras.ops.pad(x, [(0, 0), *((int(p), int(p)) for p in pads), (0, 0)])

    def _forward(self, layer, kind, params, inputs, x_name: str, *, backward: bool) -> Arrays:
        """y (forward), or the gradients of every variable and of x through jax.vjp of the layer (backward)."""
        jax, t = self.jax, np.asarray(inputs[x_name]).dtype if x_name == "x" else self._dtype(inputs)
        x = self._tensor(inputs[x_name])
        variables = list(layer.trainable_variables) + list(layer.non_trainable_variables)
        n_train = len(layer.trainable_variables)

        def apply(values, x):
            y, _ = layer.stateless_call(values[:n_train], values[n_train:], self._pad(kind, params, x))
            return y

        if not backward:
            return {"y": self._array(apply([v.value for v in variables], x), t)}
        if x_name == "ids":  # integer ids have no gradient
            y, pullback = jax.vjp(lambda values: apply(values, x), [v.value for v in variables])
            (grads,) = pullback(self._tensor(inputs["dy"]).astype(y.dtype))
            dx = None
        else:
            y, pullback = jax.vjp(apply, [v.value for v in variables], x)
            grads, dx = pullback(self._tensor(inputs["dy"]).astype(y.dtype))
        by_name = {v.name: g for v, g in zip(variables, grads)}
        prefix = "lora_embeddings" if kind == "embedding" else "lora_kernel"
        out = {"dA": self._array(by_name[f"{prefix}_a"], t), "dB": self._array(by_name[f"{prefix}_b"], t)}
        if dx is not None:
            out["dx"] = self._array(dx, t)
        if params.get("want_base_grads", False):
            out["dW"] = self._array(by_name["embeddings" if kind == "embedding" else "kernel"], t)
            if "bias" in by_name:
                out["db"] = self._array(by_name["bias"], t)
        return out


#: Deviation id -> (what Keras 3 does, its source line in keras 3.15.1's keras/src/...).
DEVIATIONS: dict[str, tuple[str, str]] = {
    "K-1": ("forward and backward apply the merged weight cast to the compute dtype (fp16/bf16): it is rounded "
            "before the product, and every intermediate too (precision)",
            "keras/src/layers/core/dense.py:210 `kernel = ops.cast(ops.add(kernel, (self.lora_alpha / self.lora_rank) * "
            "ops.matmul(self.lora_kernel_a, self.lora_kernel_b)), dtype=self.compute_dtype)` (Embedding: embedding.py:181; "
            "Conv: convolutional/base_conv.py:235)"),
    "K-2": ("a merged weight that is a bfloat16 subnormal comes back as zero: XLA:CPU flushes subnormals (precision)",
            "keras/src/layers/core/dense.py:210 (the merge's add and cast run on XLA:CPU, which flushes denormals to zero)"),
    "K-3": ("out-of-range token ids are not refused: jnp.take clamps or fills an id >= V and wraps a negative id "
            "(forward and backward)",
            "keras/src/layers/core/embedding.py:196 `outputs = ops.take(self.embeddings, inputs, axis=0)` "
            "(keras/src/backend/jax/numpy.py:1384 `return jnp.take(x, indices, axis=axis)`)"),
    "S-K1": ("no rsLoRA, lora_bias, LoRA dropout, safe merge, unmerge, stride > 1 with dilation > 1, mixed batch, DoRA "
             "or combination (skipped)",
             "keras/src/layers/core/dense.py:234 `def enable_lora(self, rank, lora_alpha=None, ...)` (rank and alpha "
             "only); convolutional/base_conv.py:169 `if max(self.strides) > 1 and max(self.dilation_rate) > 1:`"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation (a :data:`DEVIATIONS` id) behind a result that is not a float32-tier pass."""
    kind, _, action = case.operation.partition(".")
    if result.status == "skip":
        return "S-K1"
    if result.status != "fail":
        return None
    if result.refusal:
        return "K-3" if ids_out_of_range(case.operation, inputs) else None
    if result.verdict != "storage" or case.dtype not in ("float16", "bfloat16"):
        return None
    if action in ("forward", "backward"):
        return "K-1"
    return "K-2" if action == "merge" and case.dtype == "bfloat16" and _has_subnormals(inputs["W"]) else None


def _has_subnormals(array: np.ndarray) -> bool:
    """Whether ``array`` holds a nonzero value below its dtype's smallest normal."""
    from ...dtypes import float64

    with np.errstate(invalid="ignore"):
        magnitude = np.abs(np.asarray(array).astype(float64))
    return bool(((magnitude > 0) & (magnitude < float(np.finfo(np.asarray(array).dtype).tiny))).any())


def factory() -> KerasImplementation:
    return KerasImplementation()
