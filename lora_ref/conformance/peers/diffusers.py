"""diffusers' own LoRA layers (``diffusers.models.lora``, deprecated but shipped) as a conformance implementation:
``--impl lora_ref.conformance.peers.diffusers:factory --layout peft``.

The base layer is a ``LoRACompatibleLinear`` (an ``nn.Linear``) or ``LoRACompatibleConv`` (an
``nn.Conv2d`` with the case's stride, padding and dilation) holding a ``LoRALinearLayer`` /
``LoRAConv2dLayer`` whose ``down`` is A [r, in] (conv: [r, C, *k], built with the base's kernel,
stride and padding) and ``up`` is B [out, r] ([O, r, 1, 1]); ``network_alpha = lora_alpha`` gives
s = lora_alpha / r. The adapter lives in the storage dtype, as diffusers' loaders create it.
Forward and backward are the layers' own (torch autograd), merge is ``_fuse_lora`` (float32, one
rounding), ``safe_merge`` is ``_fuse_lora(safe_fusing=True)`` (its ValueError on NaN is the
refusal), and a fast unmerge is ``_unfuse_lora`` of a layer whose weight is the case's merged one
(``_fuse_lora`` runs first only to store the factors it subtracts, as after a real fuse).
A safe fuse refuses NaN but merges an infinite factor (deviation D-3).

Unsupported (skipped, each the library's own limit): rsLoRA, fan_in_fan_out, lora_bias, given
dropout masks (the layers have no dropout), exact unmerge, Embedding, Conv1d/Conv3d, mixed batches,
DoRA and combinations. The known bug is reported, not hidden: ``LoRAConv2dLayer`` builds its
``down`` conv without the base's dilation (deviation D-2), so a dilated Conv2d case either crashes
(the LoRA path has another output size) or, where the sizes agree, computes another function.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import Refusal
from .peft import _TORCH_SHAPE_ERRORS, PeftImplementation, _axes, _lora_size_differs, _name

Arrays = dict[str, np.ndarray]


class DiffusersImplementation(PeftImplementation):
    """Reuses the PEFT peer's exact numpy <-> torch conversions; builds diffusers' LoRA layers instead."""

    def __init__(self) -> None:  # no PEFT needed
        import diffusers.models.lora as lora
        import torch

        self.torch, self.lora = torch, lora
        self.versions = {"diffusers": __import__("diffusers").__version__, "torch": torch.__version__}
        self.torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        kind, _, action = op.partition(".")
        if kind not in ("linear", "conv2d"):
            raise NotImplementedError(f"diffusers.models.lora has no {op!r} (Linear and Conv2d only)")
        self._supported(params, inputs)
        try:
            with warnings.catch_warnings():  # every layer warns that it is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                return getattr(self, f"_{action}")(kind, params, inputs)
        except RuntimeError as exc:
            if kind == "conv2d" and _dilated(params) and action in ("forward", "backward") and _lora_size_differs(params, inputs):
                raise RuntimeError(f"D-2 (LoRAConv2dLayer's down conv has no dilation: the LoRA path has another size): {exc}") from exc
            if any(text in str(exc) for text in _TORCH_SHAPE_ERRORS):
                raise Refusal(f"torch refused the shapes: {exc}") from exc
            raise

    @staticmethod
    def _supported(params: Mapping[str, Any], inputs: Arrays) -> None:
        for flag, why in (("use_rslora", "rsLoRA"), ("fan_in_fan_out", "fan_in_fan_out"), ("exact", "exact unmerge")):
            if params.get(flag, False):
                raise NotImplementedError(f"diffusers' LoRA layers have no {why}")
        if "lora_bias" in inputs:
            raise NotImplementedError("diffusers' LoRA layers have no lora_bias")
        if "dropout_mask" in inputs:
            raise NotImplementedError("diffusers' LoRA layers have no dropout")

    # -- layers ------------------------------------------------------------------------------------
    def _layer(self, kind: str, params: Mapping[str, Any], inputs: Arrays):
        """The LoRACompatible base holding its LoRA layer, every tensor copied in, in the storage dtype."""
        W = inputs.get("W", inputs.get("W_merged"))
        r, alpha, bias = int(params["r"]), params["lora_alpha"], "b" in inputs
        if kind == "linear":
            base = self.lora.LoRACompatibleLinear(W.shape[1], W.shape[0], bias=bias)
            adapter = self.lora.LoRALinearLayer(W.shape[1], W.shape[0], rank=r, network_alpha=alpha)
        else:
            if W.ndim != 4:
                raise Refusal(f"a Conv2d weight has 4 axes, not {W.ndim}")
            geometry = {k: _axes(params, k, v) for k, v in (("stride", 1), ("padding", 0))}
            base = self.lora.LoRACompatibleConv(W.shape[1], W.shape[0], tuple(W.shape[2:]), dilation=_axes(params, "dilation", 1),
                                                bias=bias, **geometry)
            adapter = self.lora.LoRAConv2dLayer(W.shape[1], W.shape[0], rank=r, kernel_size=tuple(W.shape[2:]), network_alpha=alpha,
                                                **geometry)
        base.set_lora_layer(adapter)
        base.to(self.torch_dtypes[_name(W.dtype)])
        self.set_(base.weight, W)
        if bias:
            self.set_(base.bias, inputs["b"])
        self.set_(adapter.down.weight, inputs["A"])
        self.set_(adapter.up.weight, inputs["B"])
        return base

    def _forward(self, kind, params, inputs) -> Arrays:
        layer = self._layer(kind, params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["x"]))
        return {"y": self.array(y, inputs["x"].dtype)}

    def _backward(self, kind, params, inputs) -> Arrays:
        want_base = bool(params.get("want_base_grads", False))
        extra = {"b": np.zeros(inputs["B"].shape[0], dtype=inputs["W"].dtype)} if want_base and "b" not in inputs else {}
        layer = self._layer(kind, params, {**inputs, **extra})  # with base gradients, a zero bias gives db
        layer.weight.requires_grad_(want_base)
        if layer.bias is not None:
            layer.bias.requires_grad_(want_base)
        x = self.tensor(inputs["x"], requires_grad=True)
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["x"].dtype
        adapter = layer.lora_layer
        out = {"dx": self.array(x.grad, t), "dA": self.array(adapter.down.weight.grad, t), "dB": self.array(adapter.up.weight.grad, t)}
        if want_base:
            out["dW"] = self.array(layer.weight.grad, t)
            out["db"] = self.array(layer.bias.grad, t)
        return out

    def _merge(self, kind, params, inputs) -> Arrays:
        layer = self._layer(kind, params, inputs)
        layer._fuse_lora(lora_scale=1.0, safe_fusing=bool(params.get("safe_merge", False)))
        return {"W_merged": self.array(layer.weight, inputs["W"].dtype)}

    def _unmerge(self, kind, params, inputs) -> Arrays:
        merged = inputs["W_merged"]
        layer = self._layer(kind, params, inputs)
        layer._fuse_lora(lora_scale=1.0)  # stores w_up (with network_alpha / rank), w_down and the scale it subtracts
        self.set_(layer.weight, merged)  # the weight it holds is the case's merged one
        layer._unfuse_lora()
        return {"W": self.array(layer.weight, merged.dtype)}


def _dilated(params: Mapping[str, Any]) -> bool:
    return any(d > 1 for d in np.atleast_1d(params.get("dilation", 1)))


#: Deviation id -> (what diffusers' LoRA layers do, the source line in diffusers 0.42.1's diffusers/models/lora.py).
DEVIATIONS: dict[str, tuple[str, str]] = {
    "D-1": ("the adapter runs in the storage dtype, the scale applied after up() in that dtype, and its output added "
            "to the base's rounded output: forward and backward round intermediates to fp16/bf16 (precision)",
            "diffusers/models/lora.py:292 `up_hidden_states *= self.network_alpha / self.rank` (Linear: :228; the sum: "
            ":381 `return original_outputs + (scale * self.lora_layer(hidden_states))`)"),
    "D-2": ("LoRAConv2dLayer's down conv is built without the base conv's dilation: another output size (crash) or, "
            "where the sizes agree, another function",
            "diffusers/models/lora.py:271 `self.down = nn.Conv2d(in_features, rank, kernel_size=kernel_size, stride=stride, "
            "padding=padding, bias=False)`"),
    "D-3": ("a safe fuse checks the fused weight for NaN only: an infinite factor is merged into the weight, not refused",
            "diffusers/models/lora.py:416 `if safe_fusing and torch.isnan(fused_weight).any().item():` (Conv: :332)"),
    "S-D1": ("no rsLoRA, fan_in_fan_out, lora_bias, dropout, exact unmerge, Embedding, Conv1d/Conv3d, mixed batch, DoRA "
             "or combination (skipped)",
             "diffusers/models/lora.py:173 `class LoRALinearLayer` / :233 `class LoRAConv2dLayer` (rank and network_alpha only)"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation (a :data:`DEVIATIONS` id) behind a result that is not a float32-tier pass."""
    kind, _, action = case.operation.partition(".")
    dilated = kind == "conv2d" and action in ("forward", "backward") and _dilated(case.params)
    if result.status == "skip":
        return "S-D1"
    if result.status in ("error", "timeout"):
        return "D-2" if dilated and _lora_size_differs(case.params, inputs) else None
    if result.refusal and result.status == "fail" and case.params.get("safe_merge") and any(
            np.isinf(inputs[name]).any() for name in ("A", "B")):
        return "D-3"
    if result.verdict == "semantic":
        return "D-2" if dilated else None
    if result.verdict == "storage" and case.dtype in ("float16", "bfloat16") and action in ("forward", "backward"):
        return "D-1"
    return None


def factory() -> DiffusersImplementation:
    return DiffusersImplementation()
