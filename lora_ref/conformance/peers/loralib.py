"""loralib (microsoft/LoRA, the paper's reference code) as a conformance implementation:
``--impl lora_ref.conformance.peers.loralib:factory --layout peft``.

loralib's ``Linear`` and ``Embedding`` keep PEFT's factor layout (lora_A [r, in], lora_B [out, r];
Embedding lora_A [r, V], lora_B [D, r]) and s = lora_alpha / r; merging is a side effect of
``eval()`` (``merge_weights=True``) and unmerging of ``train()``. The whole layer, adapter
included, lives in the storage dtype. Unsupported (skipped, each the library's own limit):
rsLoRA, lora_bias, given dropout masks (loralib's dropout is an ``nn.Dropout``), a safe merge,
exact unmerge, convolutions (loralib's conv factors are [r·k, C·k] x [O·k, r·k], which no PEFT
adapter maps onto; its Conv1d/Conv3d do not run at all, microsoft/LoRA#115/#157), mixed
batches, DoRA and combinations. Torch's shape errors are reported as refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import Refusal
from .peft import _TORCH_SHAPE_ERRORS, PeftImplementation

Arrays = dict[str, np.ndarray]


class LoralibImplementation(PeftImplementation):
    """Reuses the PEFT peer's exact numpy <-> torch conversions; builds loralib layers instead."""

    def __init__(self) -> None:  # no PEFT needed
        import loralib
        import torch

        self.torch, self.loralib = torch, loralib
        from importlib.metadata import version

        self.versions = {"loralib": version("loralib"), "torch": torch.__version__}
        self.torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        self._supported(op, params, inputs)
        kind, _, action = op.partition(".")
        layers = {"linear": (self._linear_layer, "x"), "embedding": (self._embedding_layer, "ids")}
        if kind not in layers:
            raise NotImplementedError(f"loralib has no {op!r} (its conv factors have no PEFT layout; no mixed batch, DoRA, combine)")
        build, x_name = layers[kind]
        try:
            if action == "forward":
                return self._forward(build, params, inputs, x_name)
            if action == "merge":
                return self._merge(build, params, inputs)
            if action == "unmerge":
                return self._unmerge(build, params, inputs)
            return getattr(self, f"_{kind}_backward")(params, inputs)
        except RuntimeError as exc:
            if any(text in str(exc) for text in _TORCH_SHAPE_ERRORS):
                raise Refusal(f"torch refused the shapes: {exc}") from exc
            raise

    @staticmethod
    def _supported(op: str, params: Mapping[str, Any], inputs: Arrays) -> None:
        for flag, why in (("use_rslora", "rsLoRA"), ("safe_merge", "a safe merge"), ("exact", "exact unmerge")):
            if params.get(flag, False):
                raise NotImplementedError(f"loralib has no {why}")
        if "lora_bias" in inputs:
            raise NotImplementedError("loralib has no lora_bias")
        if "dropout_mask" in inputs:
            raise NotImplementedError("loralib's dropout is an nn.Dropout: a given mask cannot be applied")

    # -- layers ------------------------------------------------------------------------------------
    def _linear_layer(self, params: Mapping[str, Any], inputs: Arrays, *, merge_weights: bool):
        W = inputs.get("W", inputs.get("W_merged"))
        fifo = bool(params.get("fan_in_fan_out", False))
        out_f, in_f = (W.shape[1], W.shape[0]) if fifo else W.shape
        layer = self.loralib.Linear(in_f, out_f, r=int(params["r"]), lora_alpha=params["lora_alpha"], fan_in_fan_out=fifo,
                                    merge_weights=merge_weights, bias="b" in inputs)
        layer.to(self.torch_dtypes[_dtype(W)])
        self.set_(layer.weight, W)  # loralib stores a fan_in_fan_out weight [in, out], as the case does
        if "b" in inputs:
            self.set_(layer.bias, inputs["b"])
        self.set_(layer.lora_A, inputs["A"])
        self.set_(layer.lora_B, inputs["B"])
        return layer

    def _embedding_layer(self, params: Mapping[str, Any], inputs: Arrays, *, merge_weights: bool):
        W = inputs.get("W", inputs.get("W_merged"))
        layer = self.loralib.Embedding(W.shape[0], W.shape[1], r=int(params["r"]), lora_alpha=params["lora_alpha"],
                                       merge_weights=merge_weights)
        layer.to(self.torch_dtypes[_dtype(W)])
        self.set_(layer.weight, W)
        self.set_(layer.lora_A, inputs["A"])
        self.set_(layer.lora_B, inputs["B"])
        return layer

    def _forward(self, build, params, inputs, x_name: str) -> Arrays:
        layer = build(params, inputs, merge_weights=False)
        layer.eval()  # dropout off; merge_weights=False keeps the LoRA path unmerged
        with self.torch.no_grad():
            y = layer(self.tensor(inputs[x_name]))
        return {"y": self.array(y, inputs["W"].dtype)}

    def _merge(self, build, params, inputs) -> Arrays:
        layer = build(params, inputs, merge_weights=True)
        layer.train()
        layer.eval()  # loralib merges on eval() when merge_weights
        return {"W_merged": self.array(layer.weight, inputs["W"].dtype)}

    def _unmerge(self, build, params, inputs) -> Arrays:
        layer = build(params, inputs, merge_weights=True)
        layer.merged = True  # the weight it holds is merged
        layer.train()  # loralib unmerges on train()
        return {"W": self.array(layer.weight, inputs["W_merged"].dtype)}

    # -- backward -------------------------------------------------------------------------------------
    def _linear_backward(self, params, inputs):
        want_base = bool(params.get("want_base_grads", False))
        out_features = inputs["B"].shape[0]
        # with base gradients, a zero bias gives db from the layer itself
        extra = {"b": np.zeros(out_features, dtype=inputs["W"].dtype)} if want_base and "b" not in inputs else {}
        layer = self._linear_layer(params, {**inputs, **extra}, merge_weights=False)
        layer.weight.requires_grad_(want_base)
        layer.train()
        x = self.tensor(inputs["x"], requires_grad=True)
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["x"].dtype
        out = {"dx": self.array(x.grad, t), "dA": self.array(layer.lora_A.grad, t), "dB": self.array(layer.lora_B.grad, t)}
        if want_base:
            out["dW"] = self.array(layer.weight.grad, t)
            out["db"] = self.array(layer.bias.grad, t)
        return out

    def _embedding_backward(self, params, inputs):
        layer = self._embedding_layer(params, inputs, merge_weights=False)
        want_base = bool(params.get("want_base_grads", False))
        layer.weight.requires_grad_(want_base)
        layer.train()
        y = layer(self.tensor(inputs["ids"]))
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["W"].dtype
        out = {"dA": self.array(layer.lora_A.grad, t), "dB": self.array(layer.lora_B.grad, t)}
        if want_base:
            out["dW"] = self.array(layer.weight.grad, t)
        return out


def _dtype(array: np.ndarray) -> str:
    from ...dtypes import dtype_name

    return dtype_name(np.asarray(array).dtype)


#: Deviation id -> (what loralib does, its source line in loralib 0.1.2's loralib/layers.py).
DEVIATIONS: dict[str, tuple[str, str]] = {
    "L-1": ("the adapter lives in the storage dtype: forward, backward and merge round intermediates to fp16/bf16 "
            "(precision)", "loralib/layers.py: Linear.forward `result += (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) "
            "@ self.lora_B.transpose(0, 1)) * self.scaling`"),
    "S-L1": ("no rsLoRA, lora_bias, given dropout masks, safe or exact merge, usable conv factors, mixed batch, DoRA or "
             "combination (skipped)", "loralib/layers.py: LoRALayer.__init__ (r, lora_alpha, lora_dropout, merge_weights only)"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation behind a result that is not a float32-tier pass (see :data:`DEVIATIONS`)."""
    if result.status == "skip":
        return "S-L1"
    if result.verdict == "storage" and case.dtype in ("float16", "bfloat16"):
        return "L-1"
    return None


def factory() -> LoralibImplementation:
    return LoralibImplementation()
