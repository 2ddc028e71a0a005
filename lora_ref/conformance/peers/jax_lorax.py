"""jax-lorax (``lorax.LoraWeight`` on qax, JAX on CPU) as a conformance implementation:
``--impl lora_ref.conformance.peers.jax_lorax:factory --layout keras``.

jax-lorax 0.3.1 needs jax < 0.5 (its qax uses ``jax.core.new_main``), so it lives in its own venv
(``scripts/test_lorax.sh`` makes ``.venv-lorax``); run it there, or from any venv through the bridge:
``--cmd ".venv-lorax/bin/python -m lora_ref.conformance.bridge lora_ref.conformance.peers.jax_lorax:factory"``.

Lorax replaces a weight by a ``LoraWeight(w, a, b, alpha)`` and intercepts the primitives that use it under
``lorax.lora(f)``. Its layout is the ``keras`` one: ``w`` is a Flax kernel [in, out] (conv: [*k, C, O],
channels-last; Embedding: [V, D]), ``b`` = ``lora_kernel_a`` [in, r] ([*k, C, r]; Embedding [V, r]) and ``a`` =
``lora_kernel_b`` [r, out] (conv: [1.., r, O]), s = alpha / r. Each case builds the pytree with ``lorax.init_lora``
(which keeps Linear/Embedding factors in float32 and conv factors in the kernel's dtype) and assigns the case
values; forward is the Flax layers' own primitive (``lax.dot_general`` over x's last axis + bias, ``jnp.take``
along axis 0, ``lax.conv_general_dilated`` with explicit padding and rhs dilation) under ``lorax.lora``; backward is
``jax.vjp`` of that function (the gradient of the ``LoraWeight`` holds dW, dA and dB); merge is
``lorax.merge_params`` (``LoraWeight.materialize``).

The bias belongs to the Flax layer, not to lorax: a given bias of another shape than [out] is refused, as Flax's
``Module.param`` refuses a parameter whose shape differs from the one it declares (``ScopeParamShapeError``).

Unsupported (skipped, each lorax's own limit): rsLoRA, lora_bias, dropout masks (lorax has no LoRA dropout), a safe
merge, unmerge, mixed batches, stacks, DoRA and combinations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...dtypes import dtype_name, round_to
from .. import Refusal
from . import ids_out_of_range

Arrays = dict[str, np.ndarray]
_KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d")
_CONV_SPECS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


class LoraxImplementation:
    """The protocol object; ``versions`` names what ran."""

    def __init__(self) -> None:
        from importlib.metadata import version

        import jax
        import jax.numpy as jnp
        import lorax

        self.jax, self.jnp, self.lorax = jax, jnp, lorax
        self.versions = {"jax-lorax": version("jax-lorax"), "qax": version("qax"), "jax": jax.__version__}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        kind, _, action = op.partition(".")
        if kind not in _KINDS:
            raise NotImplementedError(f"lorax has no {op!r} (a LoraWeight in a matmul, gather or conv only)")
        for flag, why in (("use_rslora", "rsLoRA (s = alpha / r only)"), ("safe_merge", "safe merge")):
            if params.get(flag, False):
                raise NotImplementedError(f"lorax has no {why}")
        if "lora_bias" in inputs or "dropout_mask" in inputs:
            raise NotImplementedError("lorax has no lora_bias and no LoRA dropout")
        if action == "unmerge":
            raise NotImplementedError("lorax has no unmerge (merge_params materializes; nothing subtracts)")
        try:
            weight = self._lora_weight(kind, params, inputs)
            if action == "merge":
                merged = self.lorax.merge_params({"w": weight}, destructive=False)["w"]
                return {"W_merged": self._array(merged, self._dtype(inputs))}
            return self._apply(weight, kind, params, inputs, backward=action == "backward")
        except AssertionError as exc:  # LoraWeight.__post_init__ asserts that the factor shapes fit the weight
            raise Refusal(f"lorax's LoraWeight refused the factor shapes {exc}") from exc
        except TypeError as exc:  # jax reports operands of mismatched shapes as TypeError
            if "shape" in str(exc) or "dimension" in str(exc):
                raise Refusal(f"jax refused the shapes: {exc}") from exc
            raise

    # -- conversions --------------------------------------------------------------------------------
    @staticmethod
    def _dtype(inputs: Arrays) -> np.dtype:
        return np.asarray(inputs.get("kernel", inputs.get("embeddings"))).dtype

    def _tensor(self, array: np.ndarray, dtype: Any = None):
        """numpy (a storage dtype, or integer ids) -> a jax array (in ``dtype``, default its own), exactly."""
        jnp, array = self.jnp, np.asarray(array)
        if array.dtype.kind in "iu":
            return jnp.asarray(array.astype(np.int32))
        return jnp.asarray(array.astype(np.float32)).astype(dtype or dtype_name(array.dtype))

    @staticmethod
    def _array(tensor, like: np.dtype) -> np.ndarray:
        """jax -> numpy in dtype ``like`` (one rounding if the array holds more precision)."""
        return round_to(np.asarray(tensor).astype(np.float64), like)

    # -- layers ------------------------------------------------------------------------------------
    def _lora_weight(self, kind: str, params: Mapping[str, Any], inputs: Arrays):
        """``lorax.init_lora`` of the case's weight with rank r and alpha, its factors replaced by the case's."""
        lorax, jax = self.lorax, self.jax
        name = "embeddings" if kind == "embedding" else "kernel"
        prefix = "lora_embeddings" if kind == "embedding" else "lora_kernel"
        weight = self._tensor(inputs[name])
        built = lorax.init_lora({"w": weight}, {"w": int(params["lora_rank"])}, jax.random.PRNGKey(0),
                                alpha=float(params["lora_alpha"]))["w"]
        down, up = inputs[f"{prefix}_a"], inputs[f"{prefix}_b"]  # lorax's b (down) and a (up)
        if kind.startswith("conv"):
            up = up.reshape((1,) * (weight.ndim - 2) + up.shape)  # [r, O] -> [1.., r, O], as init_lora makes it
        return lorax.LoraWeight(w=weight, a=self._tensor(up, built.a.dtype), b=self._tensor(down, built.b.dtype),
                                alpha=float(params["lora_alpha"]))

    def _layer_fn(self, kind: str, params: Mapping[str, Any]):
        """The Flax layer's primitive on (weight, bias, x), wrapped by ``lorax.lora``."""
        jax, jnp = self.jax, self.jnp
        if kind == "embedding":
            return self.lorax.lora(lambda w, bias, ids: jnp.take(w, ids, axis=0))
        if kind == "linear":
            def dense(w, bias, x):
                y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
                return y if bias is None else y + bias
            return self.lorax.lora(dense)
        d = int(kind[4])
        each = {k: tuple(int(v) for v in np.broadcast_to(np.atleast_1d(params.get(k, default)), (d,)))
                for k, default in (("stride", 1), ("padding", 0), ("dilation", 1))}

        def conv(w, bias, x):
            numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, _CONV_SPECS[d])
            y = jax.lax.conv_general_dilated(x, w, each["stride"], [(p, p) for p in each["padding"]],
                                             rhs_dilation=each["dilation"], dimension_numbers=numbers)
            return y if bias is None else y + bias
        return self.lorax.lora(conv)

    def _apply(self, weight, kind, params, inputs, *, backward: bool) -> Arrays:
        """y, or (backward) the gradients of the LoraWeight (dW, dA, dB), the bias and x through jax.vjp."""
        t = self._dtype(inputs)
        x_name = "ids" if kind == "embedding" else "x"
        want_base = bool(params.get("want_base_grads", False))
        if "bias" in inputs:
            out_features = weight.w.shape[-1]
            if np.shape(inputs["bias"]) != (out_features,):  # what a Flax Dense/Conv's param() checks for a given bias
                raise Refusal(f"a bias of shape {list(np.shape(inputs['bias']))} for {out_features} outputs (Flax: ScopeParamShapeError)")
            bias = self._tensor(inputs["bias"])
        else:  # with base gradients, a zero bias gives db, as in the other peers
            bias = self.jnp.zeros(weight.w.shape[-1], weight.w.dtype) if want_base and kind != "embedding" else None
        fn, x = self._layer_fn(kind, params), self._tensor(inputs[x_name])
        if not backward:
            return {"y": self._array(fn(weight, bias, x), t)}
        jax = self.jax
        if x_name == "ids":  # integer ids have no gradient
            y, pullback = jax.vjp(lambda w: fn(w, bias, x), weight)
            (grad,), dbias, dx = pullback(self._tensor(inputs["dy"]).astype(y.dtype)), None, None
        else:
            y, pullback = jax.vjp(fn, weight, bias, x)
            grad, dbias, dx = pullback(self._tensor(inputs["dy"]).astype(y.dtype))
        dB = grad.a.reshape(grad.a.shape[-2:]) if kind.startswith("conv") else grad.a  # lorax's up [1.., r, O] -> [r, O]
        out = {"dA": self._array(grad.b, t), "dB": self._array(dB, t)}
        if dx is not None:
            out["dx"] = self._array(dx, t)
        if want_base:
            out["dW"] = self._array(grad.w, t)
            if dbias is not None:
                out["db"] = self._array(dbias, t)
        return out


#: Deviation id -> (what jax-lorax does, its source line in jax-lorax 0.3.1's lorax/...).
DEVIATIONS: dict[str, tuple[str, str]] = {
    "X-1": ("Linear and Embedding: the base product (or gathered row) is rounded to fp16/bf16 before the float32 LoRA "
            "term is added, and the sum rounded again; backward's base gradients accumulate in fp16/bf16 (precision)",
            "lorax/transform.py:88 `orig = op(lhs, lora.w, dimension_numbers=dimension_numbers)` and :95 `return (orig + "
            "lora_product).astype(orig.dtype)` (lhs: :68/:75; gather: :138/:145)"),
    "X-2": ("convolutions: init_lora keeps a conv's factors in the kernel's dtype, so both LoRA convs (and the merge's "
            "b @ a) run in fp16/bf16 (precision)",
            "lorax/helpers.py:203 `a = jnp.zeros((..., spec_val, out_channels), dtype=param.dtype)` and :208 (b); "
            "transform.py:114 `lora_product = op(inp, lora.b)`, :118-124"),
    "X-3": ("a merged weight that is a bfloat16 subnormal comes back as zero: XLA:CPU flushes subnormals (precision)",
            "lorax/transform.py:35 `return (self.w + self.get_scale() * self.b @ self.a).astype(self.w.dtype)` (run on "
            "XLA:CPU, which flushes denormals to zero)"),
    "X-4": ("out-of-range token ids are not refused: the gathers keep jnp.take's mode, which fills an id >= V with NaN "
            "and wraps a negative id (forward and backward)",
            "lorax/transform.py:138 `orig = jax.lax.gather(lora.w, indices, slice_sizes=slice_sizes, **params)` and :142 "
            "(params carry jnp.take's mode=fill; jax/_src/numpy/lax_numpy.py take normalises negative indices)"),
    "X-5": ("a conv merge whose factor kernel differs from the weight's (lora_A 1x1 for a 3x3 kernel) is broadcast "
            "over the kernel instead of refused: LoraWeight checks only the last two axes",
            "lorax/transform.py:30-32 `assert self.a.shape[-2] == self.b.shape[-1]` ... `assert self.w.shape[-1] == "
            "self.a.shape[-1]` and :35 `self.w + self.get_scale() * self.b @ self.a` (a broadcasting matmul)"),
    "S-X1": ("no rsLoRA, lora_bias, LoRA dropout, safe merge, unmerge, mixed batch, stack, DoRA or combination (skipped)",
             "lorax/transform.py:37 `def get_scale(self): return self.alpha / self.b.shape[-1]` (alpha / r only); "
             "helpers.py:234 `def merge_params(...)` (materialize; no unmerge)"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation (a :data:`DEVIATIONS` id) behind a result that is not a float32-tier pass."""
    from .keras import _has_subnormals

    kind, _, action = case.operation.partition(".")
    if result.status == "skip":
        return "S-X1"
    if result.status != "fail":
        return None
    if result.refusal:
        if ids_out_of_range(case.operation, inputs):
            return "X-4"
        A, W = inputs.get("A"), inputs.get("W")
        differs = kind.startswith("conv") and A is not None and W is not None and A.shape[2:] != W.shape[2:]
        return "X-5" if differs and action == "merge" else None
    if result.verdict != "storage" or case.dtype not in ("float16", "bfloat16"):
        return None
    if kind.startswith("conv"):
        return "X-2"
    if action == "merge":
        return "X-3" if case.dtype == "bfloat16" and _has_subnormals(inputs["W"]) else None
    return "X-1"


def factory() -> LoraxImplementation:
    return LoraxImplementation()
