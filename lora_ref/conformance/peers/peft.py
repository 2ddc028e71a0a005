"""PEFT (on torch) as a conformance implementation: ``--impl lora_ref.conformance.peers.peft:factory``.

Builds a one-layer torch module per case (nn.Linear, transformers' Conv1D for
``fan_in_fan_out``, nn.Embedding, nn.Conv1d/2d/3d), wraps it the way users do
(``peft.get_peft_model`` with its defaults, so fp16/bf16 adapter weights are kept in float32),
copies the case tensors in, and calls PEFT's own forward / backward / merge / unmerge. Torch
and PEFT are imported lazily, so lora_ref never depends on them. Failures against the SPEC are
listed and explained in SPEC.md's "PEFT deviations"; they are not hidden here.

Takes the ``peft`` layout (PEFT derives s from lora_alpha, r and use_rslora itself).
Unsupported (skipped): exact unmerge (PEFT has none) and mixed-batch backward of every kind (PEFT
refuses ``adapter_names`` in training mode). Where PEFT crashes on a documented deviation (conv
dilation, P-C4; the Conv3d 1x1x1 merge, P-C5) the crash is reported as that case's error,
prefixed with the deviation's id (:func:`known_crash`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...dtypes import float64, round_to
from .. import Refusal

Arrays = dict[str, np.ndarray]


class PeftImplementation:
    """The protocol object; ``versions`` names what ran."""

    def __init__(self) -> None:
        import peft
        import torch

        self.torch, self.peft = torch, peft
        self.versions = {"peft": peft.__version__, "torch": torch.__version__}
        self.torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    # -- conversions --------------------------------------------------------------------------------
    def tensor(self, array: np.ndarray, *, requires_grad: bool = False):
        """numpy (any storage dtype, or int64) -> torch, exactly (bfloat16 goes through float32)."""
        torch = self.torch
        array = np.asarray(array)
        if array.dtype.kind in "iu":
            return torch.from_numpy(array.astype(np.int64))
        dtype = self.torch_dtypes[_name(array.dtype)]
        out = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32))).to(dtype)
        return out.requires_grad_(requires_grad)

    def array(self, tensor, like: np.dtype) -> np.ndarray:
        """torch -> numpy in dtype ``like`` (one rounding if torch holds more precision)."""
        value = tensor.detach().to(self.torch.float64).cpu().numpy()
        return round_to(value.astype(float64), like)

    def config(self, params: Mapping[str, Any], targets: list[str], **extra: Any):
        return self.peft.LoraConfig(r=int(params["r"]), lora_alpha=params["lora_alpha"], use_rslora=bool(params.get("use_rslora", False)),
                                    fan_in_fan_out=bool(params.get("fan_in_fan_out", False)), target_modules=targets,
                                    lora_dropout=float(params.get("lora_dropout", 0.0)), init_lora_weights=False,
                                    use_dora=bool(params.get("use_dora", False)), **extra)

    def wrap(self, base, params: Mapping[str, Any], dtype: str, **extra: Any):
        """get_peft_model around a module holding ``base`` as ``layer``; returns (model, lora layer)."""
        torch = self.torch
        holder = torch.nn.Module()
        holder.layer = base
        holder.to(self.torch_dtypes[dtype])
        model = self.peft.get_peft_model(holder, self.config(params, ["layer"], **extra))
        return model, model.base_model.model.layer

    def set_(self, parameter, array: np.ndarray) -> None:
        """Copy a case tensor into a PEFT parameter; a shape that differs other than by size-1 axes is refused,
        as PEFT's own loader refuses it ("size mismatch"), instead of being reshaped into place."""
        if [d for d in np.shape(array) if d != 1] != [d for d in parameter.shape if d != 1]:
            raise Refusal(f"size mismatch: a tensor of shape {list(np.shape(array))} for a parameter of shape {list(parameter.shape)}")
        with self.torch.no_grad():
            parameter.copy_(self.tensor(array).reshape(parameter.shape).to(parameter.dtype))

    # -- protocol --------------------------------------------------------------------------------
    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        kind, _, action = op.partition(".")
        if kind in ("conv1d", "conv2d", "conv3d"):  # one torch path for every conv rank
            op = f"conv.{action}"
        elif kind.startswith("mixed_") and kind != "mixed_batch":  # mixed_linear, _embedding, _conv{d}d: the generic mixed path
            if any(name.startswith("magnitude.") for name in inputs) and action == "forward":
                raise NotImplementedError("PEFT's adapter_names refuses DoRA adapters")
            op = f"mixed_batch.{action}"
        elif kind.startswith("dora_conv"):
            op = f"dora_conv.{action}"
        elif kind.startswith("stack_"):
            op = f"stack.{action}"
        handler = getattr(self, op.replace(".", "_"), None)
        if handler is None:
            raise NotImplementedError(f"the PEFT peer does not map {op!r}")
        try:
            return handler(params, inputs)
        except RuntimeError as exc:  # name the documented deviation behind a PEFT crash, keep the crash
            deviation = known_crash(kind, action, params, inputs)
            if deviation is not None:
                raise RuntimeError(f"{deviation}: {exc}") from exc
            if any(text in str(exc) for text in _TORCH_SHAPE_ERRORS):  # torch reports shape mismatches as RuntimeError
                raise Refusal(f"torch refused the shapes: {exc}") from exc
            raise

    # -- Linear ----------------------------------------------------------------------------------
    def _linear(self, params, inputs, dtype):
        torch = self.torch
        W = inputs["W"]
        fan_in_fan_out = bool(params.get("fan_in_fan_out", False))
        has_bias = "b" in inputs or "lora_bias" in inputs
        if fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(W.shape[1], W.shape[0])  # weight [in, out]
        else:
            base = torch.nn.Linear(W.shape[1], W.shape[0], bias=has_bias)
        model, layer = self.wrap(base, params, dtype, lora_bias="lora_bias" in inputs)
        self.set_(layer.base_layer.weight, W)
        if layer.base_layer.bias is not None:
            self.set_(layer.base_layer.bias, inputs.get("b", np.zeros(layer.base_layer.bias.shape, dtype=W.dtype)))
        self.set_(layer.lora_A["default"].weight, inputs["A"])
        self.set_(layer.lora_B["default"].weight, inputs["B"])
        if "lora_bias" in inputs:
            self.set_(layer.lora_B["default"].bias, inputs["lora_bias"])
        return model, layer

    def _masked(self, layer, inputs, training: bool) -> None:
        """Replace PEFT's random dropout by the case's mask (a fixed realisation of it), or switch to eval."""
        torch = self.torch
        if "dropout_mask" in inputs:
            mask = self.tensor(inputs["dropout_mask"]).to(layer.lora_A["default"].weight.dtype)

            class FixedMask(torch.nn.Module):
                def forward(self, x):
                    return x * mask.to(x.dtype)

            layer.lora_dropout["default"] = FixedMask()
        layer.train(training or "dropout_mask" in inputs)

    def linear_forward(self, params, inputs):
        dtype = _name(inputs["x"].dtype)
        model, layer = self._linear(params, inputs, dtype)
        self._masked(layer, inputs, training=False)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["x"]))
        return {"y": self.array(y, inputs["x"].dtype)}

    def linear_backward(self, params, inputs):
        dtype = _name(inputs["x"].dtype)
        model, layer = self._linear(params, inputs, dtype)
        self._masked(layer, inputs, training=True)
        want_base = bool(params.get("want_base_grads", False))
        if want_base:
            layer.base_layer.weight.requires_grad_(True)
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
        x = self.tensor(inputs["x"], requires_grad=True)
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["x"].dtype
        out = {"dx": self.array(x.grad, t), "dA": self.array(layer.lora_A["default"].weight.grad, t),
               "dB": self.array(layer.lora_B["default"].weight.grad, t)}
        if want_base:
            out["dW"] = self.array(layer.base_layer.weight.grad, t)
            bias_grad = layer.base_layer.bias.grad if layer.base_layer.bias is not None else None
            out["db"] = self.array(bias_grad, t) if bias_grad is not None else round_to(
                self.array(self.tensor(inputs["dy"]).to(self.torch.float64).reshape(-1, inputs["dy"].shape[-1]).sum(0), np.float64), t)
            if "lora_bias" in inputs:
                out["dlora_bias"] = self.array(layer.lora_B["default"].bias.grad, t)
        return out

    @staticmethod
    def _train(layer, params) -> bool:
        """Training mode; the base weight (and bias, if any) take gradients only when the case asks."""
        layer.train()
        want_base = bool(params.get("want_base_grads", False))
        layer.base_layer.weight.requires_grad_(want_base)
        if getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(want_base)
        return want_base

    def _merge(self, layer, dtype: np.dtype, params: Mapping[str, Any]) -> Arrays:
        """PEFT's merge() of a built layer; the merged base weight."""
        layer.merge(safe_merge=bool(params.get("safe_merge", False)))
        return {"W_merged": self.array(layer.base_layer.weight, dtype)}

    def _unmerge(self, build, params, inputs) -> Arrays:
        """PEFT's unmerge() of a layer built around the merged weight (marked as merged first)."""
        merged = inputs["W_merged"]
        layer = build(params, {**inputs, "W": merged})
        layer.merged_adapters.append("default")  # the weight it holds is merged
        layer.unmerge()
        return {"W": self.array(layer.base_layer.weight, merged.dtype)}

    def _linear_layer(self, params, inputs):
        return self._linear(params, inputs, _name(inputs["W"].dtype))[1]

    def linear_merge(self, params, inputs):
        return self._merge(self._linear_layer(params, inputs), inputs["W"].dtype, params)

    def linear_unmerge(self, params, inputs):
        if params.get("exact", False):
            raise NotImplementedError("PEFT has no exact (residual) unmerge")
        return self._unmerge(self._linear_layer, params, inputs)

    # -- Embedding -----------------------------------------------------------------------------------
    def _embedding(self, params, inputs):
        W = inputs["W"]
        _, layer = self.wrap(self.torch.nn.Embedding(*W.shape), params, _name(W.dtype))
        self.set_(layer.base_layer.weight, W)
        self.set_(layer.lora_embedding_A["default"], inputs["A"])
        self.set_(layer.lora_embedding_B["default"], inputs["B"])
        layer.eval()
        return layer

    def embedding_forward(self, params, inputs):
        layer = self._embedding(params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["ids"]))
        return {"y": self.array(y, inputs["W"].dtype)}

    def embedding_merge(self, params, inputs):
        return self._merge(self._embedding(params, inputs), inputs["W"].dtype, params)

    def embedding_unmerge(self, params, inputs):
        return self._unmerge(self._embedding, params, inputs)

    def embedding_backward(self, params, inputs):
        layer = self._embedding(params, inputs)
        want_base = self._train(layer, params)
        y = layer(self.tensor(inputs["ids"]))
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["W"].dtype
        out = {"dA": self.array(layer.lora_embedding_A["default"].grad, t), "dB": self.array(layer.lora_embedding_B["default"].grad, t)}
        if want_base:
            out["dW"] = self.array(layer.base_layer.weight.grad, t)
        return out

    # -- Conv1d / Conv2d / Conv3d ------------------------------------------------------------------
    def _conv(self, params, inputs):
        W = inputs["W"]
        kind = {3: self.torch.nn.Conv1d, 4: self.torch.nn.Conv2d, 5: self.torch.nn.Conv3d}[W.ndim]
        base = kind(W.shape[1], W.shape[0], W.shape[2:], stride=_axes(params, "stride", 1), padding=_axes(params, "padding", 0),
                    dilation=_axes(params, "dilation", 1), bias="b" in inputs)
        _, layer = self.wrap(base, params, _name(W.dtype))
        self.set_(layer.base_layer.weight, W)
        if "b" in inputs:
            self.set_(layer.base_layer.bias, inputs["b"])
        self.set_(layer.lora_A["default"].weight, inputs["A"])
        self.set_(layer.lora_B["default"].weight, inputs["B"])
        layer.eval()
        return layer

    def conv_forward(self, params, inputs):
        layer = self._conv(params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["x"]))
        return {"y": self.array(y, inputs["x"].dtype)}

    def conv_merge(self, params, inputs):
        return self._merge(self._conv(params, inputs), inputs["W"].dtype, params)

    def conv_unmerge(self, params, inputs):
        return self._unmerge(self._conv, params, inputs)

    def conv_backward(self, params, inputs):
        layer = self._conv(params, inputs)
        want_base = self._train(layer, params)
        x = self.tensor(inputs["x"], requires_grad=True)
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["x"].dtype
        out = {"dx": self.array(x.grad, t), "dA": self.array(layer.lora_A["default"].weight.grad, t),
               "dB": self.array(layer.lora_B["default"].weight.grad, t)}
        if want_base:
            out["dW"] = self.array(layer.base_layer.weight.grad, t)
            out["db"] = self.array(layer.base_layer.bias.grad, t)
        return out

    # -- mixed batch ----------------------------------------------------------------------------------
    def mixed_batch_backward(self, params, inputs):
        raise NotImplementedError("PEFT refuses adapter_names (mixed batches) in training mode")

    def _mixed_base(self, params, inputs):
        """The bare base module of a mixed batch: Linear, Embedding (ids) or Conv{d}d (the case's geometry)."""
        torch, W = self.torch, inputs["W"]
        if "ids" in inputs:
            return torch.nn.Embedding(*W.shape)
        if W.ndim > 2:
            conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[W.ndim]
            return conv(W.shape[1], W.shape[0], W.shape[2:], stride=_axes(params, "stride", 1), padding=_axes(params, "padding", 0),
                        dilation=_axes(params, "dilation", 1), bias="b" in inputs)
        return torch.nn.Linear(W.shape[1], W.shape[0], bias="b" in inputs)

    def _multi(self, params, inputs):
        """(model, layer): the case's base layer with adapters a0, a1, ... (lora_bias.i where given), in eval mode."""
        torch = self.torch
        W = inputs["W"]
        holder = torch.nn.Module()
        holder.layer = self._mixed_base(params, inputs)
        holder.to(self.torch_dtypes[_name(W.dtype)])
        adapters = params["adapters"]

        def config(i):
            return self.config(adapters[i], ["layer"], lora_bias=f"lora_bias.{i}" in inputs)

        model = self.peft.get_peft_model(holder, config(0), adapter_name="a0")
        for i in range(1, len(adapters)):
            model.add_adapter(f"a{i}", config(i))
        layer = model.base_model.model.layer
        self.set_(layer.base_layer.weight, W)
        if "b" in inputs:
            self.set_(layer.base_layer.bias, inputs["b"])
        for i in range(len(adapters)):
            if f"lora_bias.{i}" in inputs:
                self.set_(layer.lora_B[f"a{i}"].bias, inputs[f"lora_bias.{i}"])
            if "ids" in inputs:
                self.set_(layer.lora_embedding_A[f"a{i}"], inputs[f"A.{i}"])
                self.set_(layer.lora_embedding_B[f"a{i}"], inputs[f"B.{i}"])
            else:
                self.set_(layer.lora_A[f"a{i}"].weight, inputs[f"A.{i}"])
                self.set_(layer.lora_B[f"a{i}"].weight, inputs[f"B.{i}"])
        model.eval()
        return model, layer

    def mixed_batch_forward(self, params, inputs):
        """PEFT's adapter_names routing for Linear, Embedding and Conv layers (one adapter per batch row)."""
        if "dropout_mask" in inputs:  # a mask means training
            raise NotImplementedError("PEFT refuses adapter_names (mixed batches) in training mode")
        torch = self.torch
        model, layer = self._multi(params, inputs)
        names = ["__base__" if int(i) == -1 else f"a{int(i)}" for i in inputs["index"]]
        # through PEFT's model-level hooks, as model(x, adapter_names=...) runs: they refuse unknown adapter names
        # (the layer alone skips them silently) before the layer checks the batch length
        with torch.no_grad(), model.base_model._enable_peft_forward_hooks(adapter_names=names):
            y = layer(self.tensor(inputs["ids" if "ids" in inputs else "x"]))
        return {"y": self.array(y, inputs["W"].dtype if "ids" in inputs else inputs["x"].dtype)}

    def stack_forward(self, params, inputs):
        """Every adapter active at once: the layer's set_adapter with the list of all of them."""
        _, layer = self._multi(params, inputs)
        layer.set_adapter([f"a{i}" for i in range(len(params["adapters"]))])
        x = inputs["ids" if "ids" in inputs else "x"]
        with self.torch.no_grad():
            y = layer(self.tensor(x))
        return {"y": self.array(y, inputs["W"].dtype if "ids" in inputs else x.dtype)}

    # -- DoRA ------------------------------------------------------------------------------------------
    def _dora(self, params, inputs):
        W = inputs["W"]
        _, layer = self.wrap(self.torch.nn.Linear(W.shape[1], W.shape[0], bias="b" in inputs), {**params, "use_dora": True}, _name(W.dtype))
        self.set_(layer.base_layer.weight, W)
        if "b" in inputs:
            self.set_(layer.base_layer.bias, inputs["b"])
        self.set_(layer.lora_A["default"].weight, inputs["A"])
        self.set_(layer.lora_B["default"].weight, inputs["B"])
        self.set_(layer.lora_magnitude_vector["default"].weight, inputs["magnitude"])
        self._masked(layer, inputs, training=False)  # a dropout mask: PEFT's training formula with that mask
        return layer

    def dora_forward(self, params, inputs):
        layer = self._dora(params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["x"]))
        return {"y": self.array(y, inputs["x"].dtype)}

    def dora_backward(self, params, inputs):
        layer = self._dora(params, inputs)
        self._masked(layer, inputs, training=True)
        layer.base_layer.bias.requires_grad_(True)
        x = self.tensor(inputs["x"], requires_grad=True)
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["x"].dtype
        return {"dx": self.array(x.grad, t), "dA": self.array(layer.lora_A["default"].weight.grad, t),
                "dB": self.array(layer.lora_B["default"].weight.grad, t),
                "dmagnitude": self.array(layer.lora_magnitude_vector["default"].weight.grad, t),
                "db": self.array(layer.base_layer.bias.grad, t)}

    def dora_unmerge(self, params, inputs, build=None):
        """Fast DoRA unmerge through PEFT's own: W_merged as the base weight, the given norm as the norm PEFT caches at
        merge (``<adapter>-weight_norm``), then ``unmerge()`` (peft/tuners/lora/variants.py:222-226)."""
        if params.get("exact", False):
            raise NotImplementedError("PEFT has no exact (residual) unmerge")
        weights = {**inputs, "W": inputs["W_merged"]}
        layer = self._dora(params, weights) if build is None else self._dora_layer(build, params, weights)
        m = layer.lora_magnitude_vector["default"].weight
        layer._cache_store("default-weight_norm", self.tensor(inputs["norm"]).to(m.dtype).reshape(m.shape))
        layer.merged_adapters.append("default")
        with self.torch.no_grad():
            layer.unmerge()
        return {"W": self.array(layer.base_layer.weight, inputs["W_merged"].dtype)}

    def _dora_layer(self, build, params, inputs):
        """An Embedding or Conv layer built by ``build`` with use_dora, its magnitude set (a dropout mask: PEFT's training formula)."""
        layer = build({**params, "use_dora": True}, inputs)
        self.set_(layer.lora_magnitude_vector["default"].weight, inputs["magnitude"])
        if "dropout_mask" in inputs:
            self._masked(layer, inputs, training=False)
        return layer

    def dora_embedding_forward(self, params, inputs):
        layer = self._dora_layer(self._embedding, params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["ids"]))
        return {"y": self.array(y, inputs["W"].dtype)}

    def dora_embedding_merge(self, params, inputs):
        return self._merge(self._dora_layer(self._embedding, params, inputs), inputs["W"].dtype, params)

    def dora_conv_forward(self, params, inputs):
        layer = self._dora_layer(self._conv, params, inputs)
        with self.torch.no_grad():
            y = layer(self.tensor(inputs["x"]))
        return {"y": self.array(y, inputs["x"].dtype)}

    def dora_conv_merge(self, params, inputs):
        return self._merge(self._dora_layer(self._conv, params, inputs), inputs["W"].dtype, params)

    def _dora_kind_backward(self, build, params, inputs, x_name):
        """DoRA backward of an Embedding (ids: no dx) or Conv layer in training mode (PEFT detaches the norm)."""
        layer = self._dora_layer(build, params, inputs)
        layer.train()
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            bias.requires_grad_(True)
        x = self.tensor(inputs[x_name], requires_grad=x_name == "x")
        y = layer(x)
        y.backward(self.tensor(inputs["dy"]).to(y.dtype))
        t = inputs["W"].dtype
        A, B = (layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]) if x_name == "ids" else \
            (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        out = {"dA": self.array(A.grad, t), "dB": self.array(B.grad, t),
               "dmagnitude": self.array(layer.lora_magnitude_vector["default"].weight.grad.reshape(inputs["magnitude"].shape), t)}
        if x_name == "x":
            out["dx"] = self.array(x.grad, t)
        if bias is not None:
            out["db"] = self.array(bias.grad, t)
        return out

    def dora_embedding_backward(self, params, inputs):
        return self._dora_kind_backward(self._embedding, params, inputs, "ids")

    def dora_conv_backward(self, params, inputs):
        return self._dora_kind_backward(self._conv, params, inputs, "x")

    def dora_embedding_unmerge(self, params, inputs):
        return self.dora_unmerge(params, inputs, self._embedding)

    def dora_conv_unmerge(self, params, inputs):
        return self.dora_unmerge(params, inputs, self._conv)

    def dora_merge(self, params, inputs):
        return self._merge(self._dora(params, inputs), inputs["W"].dtype, params)


    # -- weighted combination ------------------------------------------------------------------------
    def _combine(self, method, params, inputs, **extra):
        """``add_weighted_adapter`` over one Linear layer holding the case's adapters; the combined factors,
        with the combined adapter's own scale folded into A (so B A is the delta PEFT would apply)."""
        torch = self.torch
        A0, adapters, kind = inputs["A.0"], params["adapters"], params.get("kind", "linear")
        if any(name.startswith("lora_bias.") for name in inputs):
            raise NotImplementedError("PEFT's add_weighted_adapter combines lora_A/lora_B weights only, no lora_bias")
        holder = torch.nn.Module()
        out_f = inputs["B.0"].shape[0]
        if kind == "embedding":
            holder.layer = torch.nn.Embedding(A0.shape[1], out_f)
        elif kind == "conv":
            conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[A0.ndim]
            holder.layer = conv(A0.shape[1], out_f, A0.shape[2:], bias=False)
        else:
            holder.layer = torch.nn.Linear(A0.shape[1], out_f, bias=False)
        holder.to(self.torch_dtypes[_name(A0.dtype)])
        model = self.peft.get_peft_model(holder, self.config(adapters[0], ["layer"]), adapter_name="a0")
        for i, adapter in enumerate(adapters[1:], start=1):
            model.add_adapter(f"a{i}", self.config(adapter, ["layer"]))
        layer = model.base_model.model.layer
        for i in range(len(adapters)):
            if kind == "embedding":
                self.set_(layer.lora_embedding_A[f"a{i}"], inputs[f"A.{i}"])
                self.set_(layer.lora_embedding_B[f"a{i}"], inputs[f"B.{i}"])
            else:
                self.set_(layer.lora_A[f"a{i}"].weight, inputs[f"A.{i}"])
                self.set_(layer.lora_B[f"a{i}"].weight, inputs[f"B.{i}"])
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], [float(w) for w in params["weights"]], "combined",
                                   combination_type=method, **extra)
        scale = float(layer.scaling["combined"])
        A, B = (layer.lora_embedding_A["combined"], layer.lora_embedding_B["combined"]) if kind == "embedding" else \
            (layer.lora_A["combined"].weight, layer.lora_B["combined"].weight)
        return {"A": self.array(A.detach().to(torch.float64) * scale, A0.dtype), "B": self.array(B, A0.dtype)}

    def combine_cat(self, params, inputs):
        return self._combine("cat", params, inputs)

    def combine_svd(self, params, inputs):
        return self._combine("svd", params, inputs, svd_rank=int(params["rank"]))


def known_crash(kind: str, action: str, params: Mapping[str, Any], inputs: Arrays) -> str | None:
    """The SPEC deviation that makes PEFT 0.21.2 raise on this case, if it is one of the known ones."""
    if kind in ("conv1d", "conv2d", "conv3d") or kind.startswith(("dora_conv", "mixed_conv")):
        if any(d > 1 for d in np.atleast_1d(params.get("dilation", 1))) and action in ("forward", "backward") and _lora_size_differs(params, inputs):
            return "P-C4 (PEFT builds lora_A without the base conv's dilation: the LoRA path's output has another size)"
        weight = inputs.get("W", inputs.get("W_merged"))
        if kind == "conv3d" and weight is not None and tuple(weight.shape[2:4]) == (1, 1) and action in ("merge", "unmerge"):
            return "P-C5 (PEFT's 1x1 conv delta path tests weight.size()[2:4] == (1, 1) and fails on a 1x1xk Conv3d kernel)"
        if _dora_conv_dropout_low(kind, inputs):
            return "P-C8 (DoRA Conv in training: x is cast to the float32 adapter dtype, the base conv on x̃ keeps the fp16/bf16 weight)"
    if kind == "combine" and _conv_not_2d(inputs):
        return "P-C9 (svd combination flattens and reshapes Conv2d deltas only: a Conv3d delta reaches torch.linalg.svd 5-D)"
    return None


def _dora_conv_dropout_low(kind: str, inputs: Arrays) -> bool:
    """A DoRA Conv case in training (a mask) with a float16 / bfloat16 weight (P-C8)."""
    return kind.startswith("dora_conv") and "dropout_mask" in inputs and _name(inputs["W"].dtype) in _LOW


def _conv_not_2d(inputs: Arrays) -> bool:
    """Conv1d or Conv3d factors (A.0 [r, C, k] or [r, C, kd, kh, kw]) in a combination (P-C9)."""
    return "A.0" in inputs and inputs["A.0"].ndim in (3, 5)


#: Texts of torch's RuntimeErrors for shapes that do not fit (the peer reports them as refusals).
_TORCH_SHAPE_ERRORS = ("shapes cannot be multiplied", "size mismatch", "must match the size", "Expected weight to be",
                       "expected input", "to have 3 channels", "channels, but got")


def _axes(params: Mapping[str, Any], key: str, default: int) -> int | tuple[int, ...]:
    """A conv geometry parameter as torch takes it: an int, or a tuple with one entry per spatial axis."""
    value = params.get(key, default)
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


def _lora_size_differs(params: Mapping[str, Any], inputs: Arrays) -> bool:
    """Whether PEFT's lora_A (the base's kernel, stride, padding, but no dilation) has another output size than the base."""
    x, W = inputs["x"], inputs["W"]
    d = W.ndim - 2
    each = {k: np.broadcast_to(np.atleast_1d(params.get(k, v)), (d,)) for k, v in (("stride", 1), ("padding", 0), ("dilation", 1))}
    sizes = [[(n + 2 * p - dl * (k - 1) - 1) // s + 1 for n, k, s, p, dl in zip(x.shape[2:], W.shape[2:], each["stride"], each["padding"], dils)]
             for dils in (each["dilation"], np.ones(d, dtype=int))]
    return sizes[0] != sizes[1]


#: Deviation id -> (what PEFT 0.21.2 does, the source line that does it). SPEC "PEFT 0.21.2 deviations" explains each.
DEVIATIONS: dict[str, tuple[str, str]] = {
    "P-C1": ("the base layer runs in fp16/bf16: its output is rounded before the LoRA term is added (precision)",
             "peft/tuners/lora/layer.py:1086 `result = self.base_layer(x, *args, **kwargs)`"),
    "P-C2": ("unmerge subtracts the delta cast to the weight dtype: a double rounding (precision)",
             "peft/tuners/lora/layer.py:1036 `weight.data -= delta_weight.to(orig_dtype)` (Embedding: :1389)"),
    "P-C3": ("Embedding merge adds the delta cast to the weight dtype (precision)",
             "peft/tuners/lora/layer.py:1359 `orig_weight += self.get_delta_weight(active_adapter).to(orig_dtype)`"),
    "P-C4": ("conv lora_A without the base's dilation: another output size (crash) or, where the sizes agree, another function",
             "peft/tuners/lora/layer.py:1625 `self.lora_A[adapter_name] = conv_layer(self.in_features, r, kernel_size, stride, padding, bias=False)`"),
    "P-C5": ("Conv3d kernels with size 1 in their first two spatial axes take the 1x1 path and crash",
             "peft/tuners/lora/layer.py:1779 `if self.get_base_layer().weight.size()[2:4] == (1, 1):`"),
    "P-C6": ("add_weighted_adapter copies use_rslora from the first adapter with lora_alpha = r: the combination is scaled √r",
             "peft/tuners/lora/model.py:863 `self.peft_config[adapter_name] = replace(` (huggingface/peft#3449)"),
    "P-C7": ("svd combination past min(out, in) returns factors of rank min(out, in)",
             "peft/tuners/lora/model.py:991 `U = U[:, :new_rank]`"),
    "P-C8": ("DoRA Conv in training (dropout) with a float16/bfloat16 base crashes: the input is cast to the float32 adapter "
             "dtype and the base convolution on the dropped input runs against the unconverted weight (Linear converts it)",
             "peft/tuners/lora/dora.py:230 `weight = base_layer.weight` then :248 `self.conv_fn(x, weight, ...)` "
             "(DoraLinearLayer: dora.py:142 `weight = weight.to(x.dtype)`)"),
    "P-C9": ("svd combination of Conv1d / Conv3d adapters: only Conv2d deltas are flattened and the factors reshaped, so Conv1d "
             "gets 2-D factors (lora_B [O, k] for [O, k, 1]) and Conv3d crashes in the SVD of the 5-D delta",
             "peft/tuners/lora/model.py:979 `conv2d = isinstance(target, Conv2d)` and :1001-1003 (reshape only `if conv2d`)"),
    "S-1": ("no exact unmerge (skipped)", "peft/tuners/lora/layer.py:1036 (unmerge subtracts; no residual)"),
    "S-2": ("mixed batches are refused in training mode (backward, and forward with a dropout mask, skipped)", "peft/tuners/lora/model.py:634 "
            "`raise ValueError(\"Cannot pass `adapter_names` when the model is in training mode.\")`"),
    "S-4": ("add_weighted_adapter drops lora_bias: only the lora_A / lora_B weights are combined (skipped)",
            "peft/tuners/lora/model.py:894 `current_adapter_lora_A = target.lora_A[adapter].weight` (no bias read)"),
    "S-3": ("mixed batches refuse DoRA adapters (forward skipped)",
            "peft/tuners/lora/layer.py:850 `msg = \"Cannot pass `adapter_names` when DoRA is enabled.\"`"),
}
#: P-C1..P-C3: the (operation, storage dtype) pairs each precision deviation may move out of the float32 tier.
_LOW = ("float16", "bfloat16")
PRECISION_PAIRS: dict[str, set[tuple[str, str]]] = {
    "P-C1": {(op, t) for op in ("linear.forward", "linear.backward", "embedding.backward", "mixed_batch.forward", "dora.forward",
                                "dora.backward", "dora_embedding.backward",
                                *(f"{k}{d}d.{a}" for k in ("conv", "dora_conv") for d in (1, 2, 3) for a in ("forward", "backward")),
                                "mixed_linear.forward", "stack_linear.forward",
                                *(f"{k}{d}d.forward" for k in ("mixed_conv", "stack_conv") for d in (1, 2, 3)))
             for t in _LOW},
    "P-C2": {(op, t) for op in ("linear.unmerge", "embedding.unmerge", "conv1d.unmerge", "conv2d.unmerge", "conv3d.unmerge") for t in _LOW},
    "P-C3": {("embedding.merge", t) for t in _LOW},
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation (a :data:`DEVIATIONS` id) behind a case result that is not a float32-tier pass.

    ``case`` is the loaded :class:`..casefile.Case`, ``inputs`` its canonical inputs, ``result`` the runner's
    :class:`..runner.CaseResult`. None for a pass, or for an unexplained result (a new bug to report).
    """
    kind, _, action = case.operation.partition(".")
    params = case.params
    dilated = kind.startswith(("conv", "mixed_conv", "dora_conv")) and action in ("forward", "backward") and any(d > 1 for d in np.atleast_1d(params.get("dilation", 1)))
    rslora_first = kind == "combine" and params["adapters"][0].get("use_rslora", False)
    if result.status == "skip":
        if params.get("exact"):
            return "S-1"
        if kind == "combine" and any(name.startswith("lora_bias.") for name in inputs):
            return "S-4"
        if kind.startswith("mixed_"):
            if action == "forward" and any(name.startswith("magnitude.") for name in inputs):
                return "S-3"
            return "S-2" if action == "backward" or "dropout_mask" in inputs else None
        return None
    if result.status in ("error", "timeout"):
        if dilated and _lora_size_differs(params, inputs):
            return "P-C4"
        weight = inputs.get("W", inputs.get("W_merged"))
        if kind == "conv3d" and action in ("merge", "unmerge") and tuple(weight.shape[2:4]) == (1, 1):
            return "P-C5"
        if _dora_conv_dropout_low(kind, inputs):
            return "P-C8"
        if case.operation == "combine.svd" and _conv_not_2d(inputs):
            return "P-C9"
        if case.operation == "combine.svd" and params["rank"] > min(inputs["A.0"].shape[1], inputs["B.0"].shape[0]):
            return "P-C7"
        return None
    if result.verdict == "semantic":
        return "P-C4" if dilated else "P-C6" if rslora_first else None
    if result.verdict == "storage":
        if rslora_first:
            return "P-C6"
        return next((d for d, pairs in PRECISION_PAIRS.items() if (case.operation, case.dtype) in pairs), None)
    return None


def _name(dtype: np.dtype) -> str:
    from ...dtypes import dtype_name

    return dtype_name(np.dtype(dtype))


def factory() -> PeftImplementation:
    return PeftImplementation()
