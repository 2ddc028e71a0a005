"""The tolerances are neither loose nor brittle (issue 6, item 6).

``Alt`` is a second, independent LoRA implementation written here in NumPy: it computes in a
chosen precision (float32 by default: the SPEC minimum) with BLAS in whatever order BLAS
picks, and optionally in a different association (the merged weight x (W + s B A)^T) or with
its contractions reversed. Correct variants must pass every case. Each mutation reproduces
one real bug seen in public LoRA implementations and must fail at least two cases in its profile
(float32 unless named) and layout (:data:`MUTATION_LAYOUT`):

  scale_base_too          base output scaled with the LoRA term (issue 6 text)
  ignore_rslora           s = alpha / r under use_rslora (NVIDIA/TensorRT-LLM#1668, vllm-project/vllm#6909)
  raw_alpha               s = alpha, rank forgotten (Blaizzy/mlx-vlm#845, rasbt/LLMs-from-scratch#821)
  mlx_scale_over_r        mlx layout: bare scale divided by r again (transposed A/B, wrong scale)
  dropout_at_inference    dropout left on in eval (karpathy/nanoGPT#240, microsoft/LoRA#62)
  ignore_dropout_mask     training mask never applied (meta-pytorch/torchtune#996)
  low_precision_merge     delta cast to the weight dtype before the add (unslothai/unsloth#3091, huggingface/peft#1388)
  low_precision_unmerge   unfuse not computed in full precision (huggingface/diffusers#4473)
  forget_fan_in_fan_out   Conv1D layout ignored in merge/forward (predibase/lorax#106, axolotl-ai-cloud/axolotl#3095)
  backward_no_scale       LoRA gradients without s
  lora_bias_unscaled      lora_bias added without s (PEFT scales it)
  exact_no_residual       "exact" unmerge that is only W' - delta (drift: huggingface/trl#6688, KohakuBlueleaf/LyCORIS#264)
  low_precision_lora_path x A^T rounded to the storage dtype before B
  embedding_reshape       embedding delta (B A) reshaped instead of transposed
  conv_channels_last      conv lora_A read as [r, kh, kw, C] (NHWC/NCHW confusion)
  conv_dilation_ignored   conv lora_A built without the base's dilation (PEFT 0.21, huggingface/peft#3697)
  mixed_index_wraps       index -1 wraps to the last adapter (Python negative indexing)
  dora_bias_scaled        DoRA gain applied to the bias too (PEFT does not scale it)
  dora_norm_without_delta DoRA norm of W alone instead of W + s B A (huggingface/peft#1588 class)
  dora_norm_not_detached  DoRA backward through the norm (the DoRA paper, section 4.3, and PEFT detach it)
  dora_conv_norm_dim1     DoRA on a conv kernel with Linear's norm over dim 1 only (one norm per output channel and tap)
  combine_weight_on_both  weighted combination applying c_i = w_i s_i to A_i and to B_i (c_i² in the delta)
  svd_scale_twice         SVD combination with each scale in the weighting and again in the delta (huggingface/peft#3111)
  combined_rslora_scale   combined adapter inherits use_rslora with alpha = r: scaled √r (huggingface/peft#3449, #3761)
  mixed_batch_no_scale    multi-LoRA batch without the adapters' scales (PrimeIntellect-ai/prime-rl#1282)
  mixed_batch_shared_scale every row of a mixed batch scaled like the first adapter (Georgefwt/AquaLoRA#16)
  mixed_index_length_unchecked fewer adapter indices than rows accepted, the rest run the base
                          (the length check PEFT has: modelscope/ms-swift#5285)
  dora_scale_outside_norm DoRA merge W + s (m (W + BA)/‖W + BA‖ − W) instead of m (W + sBA)/‖W + sBA‖
                          (AUTOMATIC1111/stable-diffusion-webui#16151, KohakuBlueleaf/LyCORIS#196)
  dora_kind_norm_without_delta DoRA on Conv2d/Embedding normalised by ‖W‖ not ‖W + ΔW‖ (Comfy-Org/ComfyUI#15458)
  dora_norm_storage_precision DoRA weight norm computed in the weight's fp16/bf16 (huggingface/peft#3237,
                          xmarre/ComfyUI-DoRA-Dynamic-LoRA-Loader#16); a float32-profile (precision) failure
  dora_backward_plain_lora DoRA backward through plain LoRA's gradients, without the gain (ooples/AiDotNet#256)
  flush_subnormals        results below the smallest normal flushed to ±0 (JuliaMath/BFloat16s.jl#125, r-xla/anvl#540)
  exact_restore_quiets_snan exact restore passes kept values through a float conversion that quiets signaling NaNs
                          (uxlfoundation/oneDNN#649)
  dropout_on_base_too     the training mask applied to the base path's input too (placement: paiml/aprender#2170,
                          huggingface/peft#2153)
  unmerge_adds_delta      unmerge that does not mirror merge: adds the delta again (huggingface/peft#3166 class)
  embedding_unscaled      Embedding adapter contribution without its scale (huggingface/peft#2825, #2839 class)
  ignore_rslora_merge     rsLoRA honoured in forward but not when merging (NVIDIA/TensorRT-LLM#1669's lora_manager,
                          sgl-project/sglang#40835)
  safe_merge_unchecked    "safe" merge that merges NaN/inf factors (huggingface/peft#3611)
  ids_clamped             out-of-range token ids clamped into [0, V) (vllm-project/vllm#35937, gittensor-ai-lab/sparkinfer#154)
  ids_wrap_negative       negative token ids wrap to the last rows (BlinkDL/ChatRWKV#217)
  lora_grads_severed      the LoRA branch cut off the autograd graph: dA = dB = 0 (paiml/aprender#2232)
  mixed_grads_all_rows    a mixed batch's adapter gradients accumulated over every row, not only the adapter's own
                          (a gather/scatter that drops the routing mask in the backward pass)
  mixed_lora_bias_every_row a mixed batch adding each adapter's lora_bias to every row (bias applied after the gather)
  stack_last_adapter_only an active stack that applies only the last adapter (set_adapter replacing, not adding)
  combine_bias_unweighted combination storing lora_bias = Σ b_i, without the weights c_i = w_i s_i
  dora_dm_unnormalised    DoRA's magnitude gradient Σ dY ∘ z without the division by the (detached) norm n
  dora_dropout_eval_formula DoRA in training with the eval formula on the dropped input, g ∘ (base(x̃) + lora(x̃)) + b,
                          instead of PEFT's base(x) + (g − 1) base(x̃) + g lora(x̃) (peft 0.21.2 tuners/lora/variants.py:242-256,
                          DoraLinearVariant.forward: x = dropout(x), base_result = None; dora.py:153-165 then takes
                          F.linear(x̃, W) and returns (g − 1) base + g lora scaling, added to the base result on x)
  mixed_mask_unrouted     a mixed batch's dropout mask indexed in gathered (per-adapter group) order, not by batch row
                          (a gather of x by adapter that forgets to gather the mask with it)
  tree_unmerge_fifo       switching between tree nodes (or unmerging a merged stack) in merge order, oldest first,
                          instead of last-in first-out (each step's residual then meets a weight it was not made for)
  dora_stack_norm_from_base a merged stack whose DoRA steps take the norm of the original base W + ΔW_j instead of
                          the weight as merged so far (a norm cached per base weight)
  dora_unmerge_norm_recomputed fast DoRA unmerge dividing by g = m / ‖W_merged‖ recomputed from the merged weight
                          (‖W'_c‖ = m_c, so g ≈ 1) instead of the merge-time norm (SPEC 4.3: the merged weight does not
                          determine n)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lora_ref.conformance.casefile import case_dir, load_case
from lora_ref.conformance.runner import InProcessDriver, run_suite
from lora_ref.dtypes import bits_of, round_to
from lora_ref.cli.conformance_cmd import DEFAULT_SUITE

MUTATIONS = [
    "scale_base_too", "ignore_rslora", "raw_alpha", "mlx_scale_over_r", "dropout_at_inference", "ignore_dropout_mask",
    "low_precision_merge", "low_precision_unmerge", "forget_fan_in_fan_out", "backward_no_scale", "lora_bias_unscaled",
    "exact_no_residual", "low_precision_lora_path", "embedding_reshape", "conv_channels_last", "conv_dilation_ignored", "mixed_index_wraps",
    "dora_bias_scaled", "dora_norm_without_delta", "dora_norm_not_detached",
    "dora_conv_norm_dim1", "combine_weight_on_both",
    "svd_scale_twice", "combined_rslora_scale", "mixed_batch_no_scale", "mixed_batch_shared_scale", "mixed_index_length_unchecked",
    "dora_scale_outside_norm", "dora_kind_norm_without_delta", "dora_norm_storage_precision", "dora_backward_plain_lora",
    "flush_subnormals", "exact_restore_quiets_snan", "dropout_on_base_too", "unmerge_adds_delta", "embedding_unscaled",
    "ignore_rslora_merge", "safe_merge_unchecked", "ids_clamped", "ids_wrap_negative", "lora_grads_severed",
    "mixed_grads_all_rows", "dora_dm_unnormalised", "mixed_lora_bias_every_row", "combine_bias_unweighted", "stack_last_adapter_only",
    "dora_dropout_eval_formula", "mixed_mask_unrouted", "dora_unmerge_norm_recomputed", "tree_unmerge_fifo",
    "dora_stack_norm_from_base",
]
#: The layout each mutation is run in (the convention whose bug it reproduces).
MUTATION_LAYOUT = {"ignore_rslora": "peft", "raw_alpha": "peft", "mlx_scale_over_r": "mlx", "ignore_rslora_merge": "peft"}


class Alt:
    """An independent implementation: compute dtype ``c``, BLAS order, optional reassociation."""

    def __init__(self, compute=np.float32, *, bug: str | None = None, merged_forward: bool = False, reverse: bool = False) -> None:
        self.c = np.dtype(compute)
        self.bug = bug
        self.merged_forward = merged_forward
        self.reverse = reverse

    # -- helpers ---------------------------------------------------------------------------------
    def w(self, a):
        return np.asarray(a).astype(self.c)

    def mm(self, a, b):
        """a @ b in the compute dtype; with ``reverse`` the contraction runs in reversed order."""
        if self.reverse:
            return np.flip(a, axis=-1) @ np.flip(b, axis=0)
        return a @ b

    def scale(self, params, r=None):
        if "scale" in params:  # canonical / mlx: bare scale
            s = float(params["scale"])
            return s / params["r"] if self.bug == "mlx_scale_over_r" else s
        r, alpha = params["r"], params["lora_alpha"]
        if self.bug == "raw_alpha":
            return alpha
        rs = params.get("use_rslora", False) and self.bug != "ignore_rslora"
        return self.c.type(alpha) / (np.sqrt(self.c.type(r)) if rs else self.c.type(r))

    def factors(self, inputs, suffix=""):
        """A [r, in] and B [out, r] in the compute dtype, whatever layout the inputs came in."""
        if f"lora_a{suffix}" in inputs:
            return self.w(inputs[f"lora_a{suffix}"]).T, self.w(inputs[f"lora_b{suffix}"]).T
        return self.w(inputs[f"A{suffix}"]), self.w(inputs[f"B{suffix}"])

    def out(self, y, dtype):
        result = round_to(np.asarray(y, dtype=np.float64), dtype)
        if self.bug == "flush_subnormals":  # results below the smallest normal become ±0 (FTZ)
            wide = result.astype(np.float64)
            tiny = float(ml_dtypes.finfo(result.dtype).smallest_normal)
            result = np.where((wide != 0) & (np.abs(wide) < tiny), round_to(np.copysign(0.0, wide), result.dtype), result)
        return result

    def restore(self, restored, W):
        """This implementation's residual: put back W's bits where the round trip did not bring them back."""
        if self.bug == "exact_no_residual":
            return restored
        differs = bits_of(restored) != bits_of(W)
        kept = W[differs]
        if self.bug == "exact_restore_quiets_snan":  # the kept values pass through a float conversion, quieting sNaNs
            with np.errstate(invalid="ignore"):
                kept = round_to(kept.astype(np.float64), W.dtype)
        restored[differs] = kept
        return restored

    def weight(self, W, params):
        fifo = params.get("fan_in_fan_out", False) and self.bug != "forget_fan_in_fan_out"
        return self.w(W).T if fifo else self.w(W)

    # -- protocol ---------------------------------------------------------------------------------
    def validate(self, op, params, inputs):
        """Refuse what the suite's refusal cases hold (ValueError): what NumPy would otherwise wrap or broadcast."""
        if "ids" in inputs and self.bug != "ids_clamped":
            low = -inputs["W"].shape[0] if self.bug == "ids_wrap_negative" else 0  # Python indexing wraps negatives
            if ((inputs["ids"] < low) | (inputs["ids"] >= inputs["W"].shape[0])).any():
                raise ValueError("token id outside [0, V)")
        if "index" in inputs:
            index, n = inputs["index"], len(params["adapters"])
            if (index.shape != inputs["x" if "x" in inputs else "ids"].shape[:1] and self.bug != "mixed_index_length_unchecked") or ((index < -1) | (index >= n)).any():
                raise ValueError("adapter index out of range or of the wrong length")
        if "b" in inputs and "W" in inputs:
            W = inputs["W"]
            out_features = W.shape[1] if params.get("fan_in_fan_out") and W.ndim == 2 else W.shape[0]
            if inputs["b"].shape != (out_features,):
                raise ValueError("bias length")
        if op.endswith(".merge") and ("A" in inputs or "lora_a" in inputs):
            A, B = self.factors(inputs)
            if params.get("safe_merge") and self.bug != "safe_merge_unchecked" and not (np.isfinite(A).all() and np.isfinite(B).all()):
                raise ValueError("non-finite factor at a safe merge")
            W = inputs["W"]
            transposed = op.startswith(("embedding.", "dora_embedding.")) or (params.get("fan_in_fan_out") and W.ndim == 2)
            rows = W.shape[1] if transposed else W.shape[0]
            if B.shape[0] != rows:
                raise ValueError("B does not fit W's output rows")

    def run(self, op, params, inputs):
        self.validate(op, params, inputs)
        kind, _, action = op.partition(".")
        if kind in ("conv1d", "conv2d", "conv3d"):
            op = f"conv.{action}"
        elif kind.startswith("stack_conv"):
            op = f"stack_conv.{action}"
        elif kind.startswith("mixed_conv"):
            op = f"mixed_conv.{action}"
        elif kind.startswith("dora_conv"):
            op = f"dora_conv2d.{action}"
        elif kind.startswith("tree_"):
            return self.tree_switch(kind[len("tree_"):].rstrip("123d") if kind.startswith("tree_conv") else kind[len("tree_"):],
                                    params, inputs)
        return getattr(self, op.replace(".", "_"))(params, inputs)

    def linear_forward(self, params, inputs):
        t = inputs["x"].dtype
        s = self.scale(params)
        x, W = self.w(inputs["x"]), self.weight(inputs["W"], params)
        A, B = self.factors(inputs)
        mask = inputs.get("dropout_mask")
        if self.bug == "dropout_at_inference" and mask is None and params.get("lora_dropout", 0) > 0:
            p = params["lora_dropout"]
            mask = (np.random.default_rng(0).random(x.shape) >= p) / (1 - p)
        if self.bug == "ignore_dropout_mask":
            mask = None
        xm = x if mask is None else x * self.w(mask)
        if self.merged_forward and mask is None:
            y = self.mm(x, (W + s * self.mm(B, A)).T)
        else:
            h = self.mm(xm, A.T)
            if self.bug == "low_precision_lora_path":
                h = self.w(round_to(h.astype(np.float64), t))
            y = self.mm(xm if self.bug == "dropout_on_base_too" else x, W.T) + s * self.mm(h, B.T)
        if "b" in inputs:
            y = y + self.w(inputs["b"])
        if self.bug == "scale_base_too":
            y = s * y + (s - s * s) * self.mm(self.mm(xm, A.T), B.T)  # s (base + b) + s lora
        if "lora_bias" in inputs:
            y = y + (1 if self.bug == "lora_bias_unscaled" else s) * self.w(inputs["lora_bias"])
        return {"y": self.out(y, t)}

    def linear_backward(self, params, inputs):
        t = inputs["x"].dtype
        s = 1.0 if self.bug == "backward_no_scale" else self.scale(params)
        x, dy, W = self.w(inputs["x"]), self.w(inputs["dy"]), self.weight(inputs["W"], params)
        A, B = self.factors(inputs)
        X, dY = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        mask = inputs.get("dropout_mask")
        m = None if mask is None or self.bug == "ignore_dropout_mask" else self.w(mask).reshape(X.shape)
        Xm = X if m is None else X * m
        dYB = self.mm(dY, B)
        lora_dx = s * self.mm(dYB, A)
        if m is not None:
            lora_dx = lora_dx * m
        keep = 0.0 if self.bug == "lora_grads_severed" else 1.0  # the LoRA branch cut off the autograd graph
        out = {"dx": self.out((self.mm(dY, W) + lora_dx).reshape(x.shape), t),
               "dA": self.out(keep * s * self.mm(dYB.T, Xm), t), "dB": self.out(keep * s * self.mm(dY.T, self.mm(Xm, A.T)), t)}
        if "lora_a" in inputs:  # mlx layout: gradients of lora_a = A^T, lora_b = B^T
            out["dA"], out["dB"] = out["dA"].T.copy(), out["dB"].T.copy()
        if params.get("want_base_grads", False):
            dW = self.mm(dY.T, X)
            fifo = params.get("fan_in_fan_out", False) and self.bug != "forget_fan_in_fan_out"
            out["dW"] = self.out(dW.T if fifo else dW, t)
            out["db"] = self.out(dY.sum(axis=0), t)
            if "lora_bias" in inputs:
                out["dlora_bias"] = self.out((1 if self.bug == "lora_bias_unscaled" else s) * dY.sum(axis=0), t)
        return out

    def delta(self, params, inputs, shape):
        A, B = self.factors(inputs)
        if self.bug == "ignore_rslora_merge":  # the forward honours use_rslora; the merge path (weight conversion) does not
            params = {**params, "use_rslora": False}
        d = self.scale(params) * self.mm(B, A)
        fifo = params.get("fan_in_fan_out", False) and self.bug != "forget_fan_in_fan_out"
        d = d.T if fifo else d
        return d.reshape(shape)

    def _merge(self, W, d, sign):
        t = W.dtype
        if self.bug in ("low_precision_merge", "low_precision_unmerge") and (self.bug == "low_precision_merge") == (sign > 0):
            d = self.w(round_to(d.astype(np.float64), t))  # delta cast to the weight dtype first
        if self.bug == "unmerge_adds_delta":
            sign = 1
        with np.errstate(over="ignore", invalid="ignore"):
            return self.out(self.w(W) + sign * d, t)

    def linear_merge(self, params, inputs):
        W = inputs["W"]
        return {"W_merged": self._merge(W, self.delta(params, inputs, W.shape), +1)}

    def linear_unmerge(self, params, inputs):
        if not params.get("exact", False):
            W = inputs["W_merged"]
            return {"W": self._merge(W, self.delta(params, inputs, W.shape), -1)}
        W = inputs["W"]
        d = self.delta(params, inputs, W.shape)
        merged = self._merge(W, d, +1)
        return {"W_merged": merged, "W_restored": self.restore(self._merge(merged, d, -1), W)}

    def ids(self, inputs):
        """Token ids; with ``ids_clamped`` out-of-range ids are clamped into [0, V) instead of refused."""
        ids = inputs["ids"]
        return np.clip(ids, 0, inputs["W"].shape[0] - 1) if self.bug == "ids_clamped" else ids

    def embedding_scale(self, params):
        return 1.0 if self.bug == "embedding_unscaled" else self.scale(params)

    def embedding_forward(self, params, inputs):
        ids, W = self.ids(inputs), self.w(inputs["W"])  # mlx-lm's LoRAEmbedding: lora_a [V, r], lora_b [r, D]
        A, B = self.factors(inputs)
        y = W[ids] + self.embedding_scale(params) * self.mm(A.T[ids], B.T)
        return {"y": self.out(y, inputs["W"].dtype)}

    def embedding_merge(self, params, inputs):
        W = inputs["W"]
        A, B = self.factors(inputs)
        BA = self.mm(B, A)
        d = self.embedding_scale(params) * (BA.reshape(W.shape) if self.bug == "embedding_reshape" else BA.T)
        return {"W_merged": self._merge(W, d, +1)}

    def embedding_unmerge(self, params, inputs):
        W = inputs["W_merged"]
        A, B = self.factors(inputs)
        return {"W": self._merge(W, self.embedding_scale(params) * self.mm(B, A).T, -1)}

    def embedding_backward(self, params, inputs):
        ids = self.ids(inputs).reshape(-1)
        A, B = self.factors(inputs)
        dY = self.w(inputs["dy"]).reshape(ids.size, -1)
        s = self.embedding_scale(params)
        G = np.zeros((A.shape[1], dY.shape[1]), self.c)
        np.add.at(G, ids, dY)
        t = inputs["W"].dtype
        out = {"dA": self.out(s * self.mm(G, B).T, t), "dB": self.out(s * self.mm(dY.T, A.T[ids]), t)}
        if "lora_a" in inputs:
            out["dA"], out["dB"] = out["dA"].T.copy(), out["dB"].T.copy()
        if params.get("want_base_grads", False):
            out["dW"] = self.out(G, t)
        return out

    def _conv_cols(self, x, kernel, params, *, lora=False):
        """im2col [N·∏out, C·∏k] of x [N, C, *S] with the case's stride, zero padding and dilation (per axis)."""
        d = len(kernel)

        def each(key, default):
            value = params.get(key, default)
            return tuple(value) if isinstance(value, list) else (int(value),) * d

        stride, padding, dilation = each("stride", 1), each("padding", 0), each("dilation", 1)
        if lora and self.bug == "conv_dilation_ignored":  # PEFT 0.21's lora_A: the base's kernel, stride, padding, not dilation
            dilation = (1,) * d
        xp = np.pad(x, ((0, 0), (0, 0)) + tuple((p, p) for p in padding))
        span = tuple(dl * (k - 1) + 1 for dl, k in zip(dilation, kernel))
        win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + d)))
        win = win[(slice(None),) * 2 + tuple(slice(None, None, st) for st in stride) + tuple(slice(None, None, dl) for dl in dilation)]
        out = win.shape[2 : 2 + d]
        cols = win.transpose((0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d)))
        return cols.reshape(x.shape[0] * int(np.prod(out)), -1), out, (stride, padding, dilation)

    def _conv_A(self, A):
        if self.bug == "conv_channels_last" and A.ndim == 4:  # read [r, C, kh, kw] memory as [r, kh, kw, C]
            r, c, kh, kw = A.shape
            return A.reshape(r, kh, kw, c).transpose(0, 3, 1, 2)
        return A

    @staticmethod
    def _channels_first(t, n, out):
        d = len(out)
        return t.reshape((n,) + tuple(out) + (-1,)).transpose((0, d + 1) + tuple(range(1, d + 1)))

    def _conv_mask(self, inputs):
        """The training mask in the compute dtype (None at inference, or under ignore_dropout_mask)."""
        mask = inputs.get("dropout_mask")
        return None if mask is None or self.bug == "ignore_dropout_mask" else self.w(mask)

    def _conv_value(self, params, inputs, W=None):
        """conv(x, W) + b + s conv1x1(conv(x̃, A), B) in the compute dtype (x̃ = x ∘ mask with a mask); with ``W`` given,
        conv(x, W) + b only."""
        x = self.w(inputs["x"])
        mask = self._conv_mask(inputs)
        xm = x if mask is None else x * mask
        merged = W is not None
        W = self.w(inputs["W"]) if W is None else W
        cols, out, _ = self._conv_cols(xm if self.bug == "dropout_on_base_too" else x, W.shape[2:], params)
        o = W.shape[0]
        y = self.mm(cols, W.reshape(o, -1).T)
        if not merged:
            A, B = self._conv_A(self.w(inputs["A"])), self.w(inputs["B"])
            r = A.shape[0]
            lora_cols, _, _ = self._conv_cols(xm, W.shape[2:], params, lora=True)
            y = y + self.scale(params) * self.mm(self.mm(lora_cols, A.reshape(r, -1).T), B.reshape(o, r).T)
        if "b" in inputs:
            y = y + self.w(inputs["b"])
        return self._channels_first(y, x.shape[0], out)

    def conv_forward(self, params, inputs):
        return {"y": self.out(self._conv_value(params, inputs), inputs["x"].dtype)}

    def _col2im(self, dcols, x_shape, kernel, out, geometry):
        stride, padding, dilation = geometry
        d = len(kernel)
        n, c = x_shape[:2]
        patches = dcols.reshape((n,) + tuple(out) + (c,) + tuple(kernel))
        dx = np.zeros((n, c) + tuple(s + 2 * p for s, p in zip(x_shape[2:], padding)), self.c)
        for tap in np.ndindex(*kernel):
            where = tuple(slice(t * dl, t * dl + st * (o - 1) + 1, st) for t, o, st, dl in zip(tap, out, stride, dilation))
            dx[(slice(None),) * 2 + where] += patches[(Ellipsis,) + tap].transpose((0, d + 1) + tuple(range(1, d + 1)))
        return dx[(slice(None),) * 2 + tuple(slice(p, p + s) for s, p in zip(x_shape[2:], padding))]

    def conv_backward(self, params, inputs, gain=None):
        """dx = col2im(dY W) + mask ∘ col2im(s dY B A), dA, dB on x̃ = x ∘ mask (x without a mask). ``gain`` (DoRA in
        training, g per output channel): the LoRA path takes g ∘ dY and the masked part adds col2im(((g − 1) ∘ dY) W)."""
        x, W, dy = self.w(inputs["x"]), self.w(inputs["W"]), self.w(inputs["dy"])
        A, B = self._conv_A(self.w(inputs["A"])), self.w(inputs["B"])
        o, r, kernel = W.shape[0], A.shape[0], W.shape[2:]
        mask = self._conv_mask(inputs)
        xm = x if mask is None else x * mask
        cols, out, geometry = self._conv_cols(x, kernel, params)
        lora_cols, _, lora_geometry = self._conv_cols(xm, kernel, params, lora=True)
        d = len(kernel)
        dY = dy.transpose((0,) + tuple(range(2, 2 + d)) + (1,)).reshape(-1, o)
        s = self.scale(params)
        dH = s * self.mm(dY if gain is None else dY * gain, B.reshape(o, r))
        dx = self._col2im(self.mm(dY, W.reshape(o, -1)), x.shape, kernel, out, geometry)
        masked = self._col2im(self.mm(dH, A.reshape(r, -1)), x.shape, kernel, out, lora_geometry)
        if gain is not None:
            masked = masked + self._col2im(self.mm(dY * (gain - 1), W.reshape(o, -1)), x.shape, kernel, out, geometry)
        dx = dx + (masked if mask is None else mask * masked)
        t = inputs["x"].dtype
        out_grads = {"dx": self.out(dx, t), "dA": self.out(self.mm(dH.T, lora_cols).reshape(A.shape), t),
                     "dB": self.out(s * self.mm(dY.T, self.mm(lora_cols, A.reshape(r, -1).T)).reshape(B.shape), t)}
        if params.get("want_base_grads", False):
            out_grads["dW"] = self.out(self.mm(dY.T, cols).reshape(W.shape), t)
            out_grads["db"] = self.out(dY.sum(axis=0), t)
        return out_grads

    def _conv_delta(self, params, inputs, shape):
        A, B = self._conv_A(self.w(inputs["A"])), self.w(inputs["B"])
        r = A.shape[0]
        return self.scale(params) * self.mm(B.reshape(B.shape[0], r), A.reshape(r, -1)).reshape(shape)

    def conv_unmerge(self, params, inputs):
        W = inputs["W_merged"]
        return {"W": self._merge(W, self._conv_delta(params, inputs, W.shape), -1)}

    def conv_merge(self, params, inputs):
        W = inputs["W"]
        return {"W_merged": self._merge(W, self._conv_delta(params, inputs, W.shape), +1)}

    def mixed_scale(self, adapters, i):
        """Adapter i's scale; the bugs: no scale at all, or every row with the first adapter's scale."""
        if self.bug == "mixed_batch_no_scale":
            return 1.0
        return self.scale(adapters[0 if self.bug == "mixed_batch_shared_scale" else i])

    def mixed_batch_forward(self, params, inputs):
        x, W = self.w(inputs["x"]), self.w(inputs["W"])  # x [batch, in] or [batch, seq, in]: row b is x[b]
        y = self.mm(x, W.T)
        if "b" in inputs:
            y = y + self.w(inputs["b"])
        adapters = params["adapters"]
        for row, i in enumerate(inputs["index"]):
            if i < 0 and self.bug == "mixed_index_wraps":
                i = len(adapters) + i
            if i < 0:
                continue
            A, B = self.factors(inputs, f".{i}")
            y[row] += self.mixed_scale(adapters, i) * self.mm(self.mm(x[row], A.T), B.T)
        return {"y": self.out(y, inputs["x"].dtype)}

    def mixed_batch_backward(self, params, inputs):
        x, W, dy = self.w(inputs["x"]), self.w(inputs["W"]), self.w(inputs["dy"])
        index = inputs["index"]
        dx = self.mm(dy, W)
        t = inputs["x"].dtype
        out = {}
        for i, adapter in enumerate(params["adapters"]):
            A, B = self.factors(inputs, f".{i}")
            s = self.mixed_scale(params["adapters"], i)
            rows = index == i
            dx[rows] += s * self.mm(self.mm(dy[rows], B), A)
            grad_rows = slice(None) if self.bug == "mixed_grads_all_rows" else rows
            dYi, Xi = dy[grad_rows].reshape(-1, dy.shape[-1]), x[grad_rows].reshape(-1, x.shape[-1])
            dA = self.out(s * self.mm(self.mm(dYi, B).T, Xi), t)
            dB = self.out(s * self.mm(dYi.T, self.mm(Xi, A.T)), t)
            out[f"dA.{i}"], out[f"dB.{i}"] = (dA.T.copy(), dB.T.copy()) if f"lora_a.{i}" in inputs else (dA, dB)
        out["dx"] = self.out(dx, t)
        return out

    # -- mixed batches of Embedding and Conv layers: each row through its adapter's single-adapter layer ------
    def _route(self, params, inputs):
        """[(adapter i or None for the base, its batch rows)], with the index bugs."""
        index = np.array(inputs["index"])
        if self.bug == "mixed_index_wraps":
            index = np.where(index < 0, index + len(params["adapters"]), index)
        return [(None if i < 0 else int(i), index == i) for i in sorted(set(index.tolist()))]

    def _adapter(self, params, inputs, i, rows=None):
        """Single-adapter (params, inputs) of adapter i (None: the base, B = 0), batch ``rows`` only if given."""
        j = 0 if i is None else i
        shared = {k: v for k, v in params.items() if k != "adapters"}
        sub = {**params["adapters"][j], **shared, "scale": self.mixed_scale(params["adapters"], j)}
        arrays = {k: v for k, v in inputs.items() if "." not in k and k != "index"}
        for name, value in inputs.items():
            head, _, tail = name.partition(".")
            if tail == str(j) and (i is not None or head in ("A", "B", "lora_a", "lora_b")):  # the base: no lora_bias, magnitude
                arrays[head] = np.zeros_like(value) if i is None and head in ("B", "lora_b") else value
        if self.bug == "mixed_mask_unrouted" and "dropout_mask" in arrays and i is not None:
            own = np.asarray(inputs["index"]) == i  # the bug: adapter i's rows read the mask's first rows (group order)
            mask = arrays["dropout_mask"].copy()
            mask[own] = arrays["dropout_mask"][: int(own.sum())]
            arrays["dropout_mask"] = mask
        if rows is not None:
            for name in ("x", "ids", "dy", "dropout_mask"):
                if name in arrays:
                    arrays[name] = arrays[name][rows]
        return sub, arrays

    def _mixed_kind(self, params, inputs, method, names):
        """Outputs ``names`` of ``method`` assembled row by row."""
        out = {}
        for i, rows in self._route(params, inputs):
            part = method(*self._adapter(params, inputs, i))
            for name in names:
                out.setdefault(name, np.zeros_like(part[name]))[rows] = part[name][rows]
        return out

    def _mixed_factor_grads(self, params, inputs, method):
        index = np.asarray(inputs["index"])
        out = {}
        for i, _ in enumerate(params["adapters"]):
            rows = slice(None) if self.bug == "mixed_grads_all_rows" else index == i
            grads = method(*self._adapter(params, inputs, i, rows))
            out[f"dA.{i}"], out[f"dB.{i}"] = grads["dA"], grads["dB"]
        return out

    def mixed_linear_forward(self, params, inputs):
        out = self._mixed_kind(params, inputs, lambda p, a: (self.dora_forward if "magnitude" in a else self.linear_forward)(p, a), ("y",))
        if self.bug == "mixed_lora_bias_every_row":  # each lora_bias added outside the routing, to every row
            y = self.w(out["y"])
            for i, adapter in enumerate(params["adapters"]):
                if f"lora_bias.{i}" in inputs:
                    rows = np.asarray(inputs["index"]) != i
                    y[rows] += self.mixed_scale(params["adapters"], i) * self.w(inputs[f"lora_bias.{i}"])
            out["y"] = self.out(y, inputs["x"].dtype)
        return out

    def mixed_linear_backward(self, params, inputs):
        def grads(p, a):
            return (self.dora_backward if "magnitude" in a else self.linear_backward)({**p, "want_base_grads": True}, {**a, "b": a["dy"][0]})
        out = self._mixed_kind(params, inputs, grads, ("dx",))
        index = np.asarray(inputs["index"])
        for i, _ in enumerate(params["adapters"]):
            rows = slice(None) if self.bug == "mixed_grads_all_rows" else index == i
            part = grads(*self._adapter(params, inputs, i, rows))
            for name in ("A", "B", "lora_bias", "magnitude"):
                if f"{name}.{i}" in inputs or f"lora_{name[0].lower()}.{i}" in inputs and name in ("A", "B"):
                    out[f"d{name}.{i}"] = part[f"d{name}"]
        return out

    # -- active stacks: merged-weight association W' = W + Σ_j ΔW_j (an association the bound covers) ---------------
    def _stack_weight(self, params, inputs, kind):
        W = self.w(inputs["W"])
        js = range(len(params["adapters"]))
        for j in js[-1:] if self.bug == "stack_last_adapter_only" else js:  # the bug: set_adapter keeps only the last one
            p, a = self._adapter(params, inputs, j)
            A, B = self.factors(a)
            if kind == "conv":
                W = W + self._conv_delta(p, a, W.shape)
            else:
                delta = self.scale(p) * self.mm(B, A)
                W = W + (delta.T if kind == "embedding" else delta)
        return W

    def stack_linear_forward(self, params, inputs):
        W = self._stack_weight(params, inputs, "linear")
        y = self.mm(self.w(inputs["x"]), W.T) + self.w(inputs["b"])
        for j, adapter in enumerate(params["adapters"]):
            if f"lora_bias.{j}" in inputs:
                y = y + self.scale(self._adapter(params, inputs, j)[0]) * self.w(inputs[f"lora_bias.{j}"])
        return {"y": self.out(y, inputs["x"].dtype)}

    def stack_embedding_forward(self, params, inputs):
        return {"y": self.out(self._stack_weight(params, inputs, "embedding")[inputs["ids"]], inputs["W"].dtype)}

    def stack_conv_forward(self, params, inputs):
        W = self._stack_weight(params, inputs, "conv")
        return {"y": self.out(self._conv_value(params, inputs, W=W), inputs["x"].dtype)}

    def mixed_embedding_forward(self, params, inputs):
        return self._mixed_kind(params, inputs, self.embedding_forward, ("y",))

    def mixed_embedding_backward(self, params, inputs):
        return self._mixed_factor_grads(params, inputs, self.embedding_backward)

    def mixed_conv_forward(self, params, inputs):
        return self._mixed_kind(params, inputs, self.conv_forward, ("y",))

    def mixed_conv_backward(self, params, inputs):
        return {**self._mixed_kind(params, inputs, self.conv_backward, ("dx",)), **self._mixed_factor_grads(params, inputs, self.conv_backward)}

    def _gain(self, params, inputs):
        W = self.w(inputs["W"])
        A, B = self.factors(inputs)
        V = W if self.bug == "dora_norm_without_delta" else W + self.scale(params) * self.mm(B, A)
        return self.w(inputs["magnitude"]) / self.norm(V, inputs["W"].dtype, axis=1)

    def norm(self, V, storage, axis, keepdims=False):
        """‖V‖ along ``axis``; with ``dora_norm_storage_precision`` V, its squares and the sum are rounded to t."""
        if self.bug != "dora_norm_storage_precision":
            return np.sqrt((V * V).sum(axis=axis, keepdims=keepdims))
        Vt = self.w(round_to(V.astype(np.float64), storage))
        squares = self.w(round_to((Vt * Vt).astype(np.float64), storage))
        return self.w(round_to(np.sqrt(squares.sum(axis=axis, keepdims=keepdims)).astype(np.float64), storage))

    def _dropped(self, inputs, x):
        """x ∘ mask (x without a mask) and whether PEFT's training formula applies."""
        if "dropout_mask" not in inputs:
            return x, False
        return x * self.w(inputs["dropout_mask"]), self.bug != "dora_dropout_eval_formula"

    def dora_forward(self, params, inputs):
        """eval: g ∘ z(x) + b; training: base(x) + b + (g − 1) ∘ base(x̃) + g ∘ lora(x̃) (PEFT's formula)."""
        x, W = self.w(inputs["x"]), self.w(inputs["W"])
        A, B = self.factors(inputs)
        g = self._gain(params, inputs)
        xd, training = self._dropped(inputs, x)
        lora = self.scale(params) * self.mm(self.mm(xd, A.T), B.T)
        b = self.w(inputs["b"])
        if training:
            return {"y": self.out(self.mm(x, W.T) + b + (g - 1) * self.mm(xd, W.T) + g * lora, inputs["x"].dtype)}
        z = self.mm(xd, W.T) + lora
        y = g * (z + b) if self.bug == "dora_bias_scaled" else g * z + b
        return {"y": self.out(y, inputs["x"].dtype)}

    def dora_backward(self, params, inputs):
        x, W, dy = self.w(inputs["x"]), self.w(inputs["W"]), self.w(inputs["dy"])
        A, B = self.factors(inputs)
        s = self.scale(params)
        V = W + s * self.mm(B, A)
        n = np.sqrt((V * V).sum(axis=1))
        g = self.w(inputs["magnitude"]) / n
        G = dy * g
        xd, training = self._dropped(inputs, x)
        z = self.mm(xd, W.T) + s * self.mm(self.mm(xd, A.T), B.T)
        GL = dy if self.bug == "dora_backward_plain_lora" else G  # plain LoRA's backward, without the DoRA gain
        dA, dB = s * self.mm(self.mm(GL, B).T, xd), s * self.mm(GL.T, self.mm(xd, A.T))
        if self.bug == "dora_norm_not_detached":  # also differentiate through n = ||W + s B A||
            GV = (-(self.w(inputs["magnitude"]) / n**3) * (dy * z).sum(axis=0))[:, None] * V
            dA, dB = dA + s * self.mm(B.T, GV), dB + s * self.mm(GV, A.T)
        t = inputs["x"].dtype
        dx = self.mm(G, W) + s * self.mm(self.mm(G, B), A)
        if "dropout_mask" in inputs:  # x̃ = x ∘ mask: the x̃ paths' gradient is masked; training adds dY W on x itself
            mask = self.w(inputs["dropout_mask"])
            dx = (self.mm(dy, W) + mask * (self.mm(dy * (g - 1), W) + s * self.mm(self.mm(G, B), A)) if training else dx * mask)
        out = {"dx": self.out(dx, t), "dA": self.out(dA, t), "dB": self.out(dB, t),
               "dmagnitude": self.out((dy * z).sum(axis=0) / (1 if self.bug == "dora_dm_unnormalised" else n), t),
               "db": self.out(dy.sum(axis=0), t)}
        if "lora_a" in inputs:
            out["dA"], out["dB"] = out["dA"].T.copy(), out["dB"].T.copy()
        return out

    def _dora_fast_unmerge(self, inputs, delta, axis):
        """W_merged / g − ΔW, g = m / n with the merge-time norm n given (the bug: n recomputed from W_merged)."""
        Wm = self.w(inputs["W_merged"])
        n = self.w(inputs["norm"])
        if self.bug == "dora_unmerge_norm_recomputed":
            n = np.sqrt((np.moveaxis(Wm, axis, 0).reshape(Wm.shape[axis], -1) ** 2).sum(axis=1))
        shape = [1] * Wm.ndim
        shape[axis] = -1
        return {"W": self.out(Wm / (self.w(inputs["magnitude"]) / n).reshape(shape) - delta, inputs["W_merged"].dtype)}

    def dora_unmerge(self, params, inputs):
        """Exact round trip: merge, W'/g − s B A with g from this merge, then this implementation's residual."""
        if not params.get("exact", False):
            A, B = self.factors(inputs)
            return self._dora_fast_unmerge(inputs, self.scale(params) * self.mm(B, A), 0)
        W = inputs["W"]
        A, B = self.factors(inputs)
        g = self._gain(params, inputs)[:, None]
        d = self.scale(params) * self.mm(B, A)
        merged = self.dora_merge(params, inputs)["W_merged"]
        return {"W_merged": merged, "W_restored": self.restore(self.out(self.w(merged) / g - d, W.dtype), W)}

    def dora_merge(self, params, inputs):
        W = self.w(inputs["W"])
        A, B = self.factors(inputs)
        g = self._gain(params, inputs)
        V = W + self.scale(params) * self.mm(B, A)
        if self.bug == "dora_scale_outside_norm":  # W + s (m (W + B A) / ‖W + B A‖ − W): the scale outside the decomposition
            U = W + self.mm(B, A)
            return {"W_merged": self.out(W + self.scale(params) * (self.w(inputs["magnitude"])[:, None] * U
                                                                   / self.norm(U, inputs["W"].dtype, axis=1, keepdims=True) - W),
                                         inputs["W"].dtype)}
        return {"W_merged": self.out(g[:, None] * V, inputs["W"].dtype)}


    # -- DoRA on Embedding and Conv2d: g along W's output-channel axis, broadcastable to W ------------
    def _dora_parts(self, kind, params, inputs):
        """(g shaped to broadcast over W, ΔW, V = W + ΔW) in the compute dtype."""
        W = self.w(inputs["W"])
        if kind == "embedding":
            A, B = self.factors(inputs)
            delta = self.scale(params) * self.mm(B, A).T  # [V, D]
            V = W + delta
            N = W if self.bug == "dora_kind_norm_without_delta" else V
            return (self.w(inputs["magnitude"]) / self.norm(N, inputs["W"].dtype, axis=0))[None, :], delta, V
        delta = self._conv_delta(params, inputs, W.shape)
        V = W + delta
        m = self.w(inputs["magnitude"]).reshape((-1,) + (1,) * (W.ndim - 1))
        if self.bug == "dora_conv_norm_dim1":  # Linear's norm over dim 1 applied to a conv kernel: one norm per (o, tap)
            return m / np.sqrt((V * V).sum(axis=1, keepdims=True)), delta, V
        N = W if self.bug == "dora_kind_norm_without_delta" else V
        return m / self.norm(N.reshape(W.shape[0], -1), inputs["W"].dtype, axis=1).reshape(m.shape), delta, V

    def dora_embedding_forward(self, params, inputs):
        ids, W = inputs["ids"], self.w(inputs["W"])
        A, B = self.factors(inputs)
        g, _, _ = self._dora_parts("embedding", params, inputs)
        z = W[ids] + self.scale(params) * self.mm(A.T[ids], B.T)
        return {"y": self.out(g[0] * z, inputs["W"].dtype)}

    def dora_conv2d_forward(self, params, inputs):
        """The merged-weight association conv(x, g ∘ (W + ΔW)) + b: equal to g ∘ (base + lora) + b. Training (a mask):
        conv(x, W) + b + conv(x̃, (g − 1) ∘ W) + g ∘ lora(x̃), x̃ = x ∘ mask (the eval formula on x̃ under the bug)."""
        g, _, V = self._dora_parts("conv", params, inputs)
        t = inputs["x"].dtype
        xd, training = self._dropped(inputs, self.w(inputs["x"]))
        dropped = {**{k: v for k, v in inputs.items() if k != "dropout_mask"}, "x": xd}
        if not training:
            return {"y": self.out(self._conv_value(params, dropped, W=g * V), t)}
        unbiased = {k: v for k, v in dropped.items() if k != "b"}
        lora = self._conv_value(params, {**unbiased, "W": np.zeros_like(inputs["W"])})  # the LoRA path alone (zero base)
        y = self._conv_value(params, inputs, W=self.w(inputs["W"])) + self._conv_value(params, unbiased, W=(g - 1) * self.w(inputs["W"]))
        gain = g.reshape(g.shape[0], -1)[:, 0]  # per output channel (dora_conv_norm_dim1: tap 0's, as its backward)
        return {"y": self.out(y + gain.reshape((1, -1) + (1,) * (y.ndim - 2)) * lora, t)}

    def _dora_kind_backward(self, kind, params, inputs, plain):
        """G = g ∘ dY through the plain kind's backward (n detached); dm = Σ dY ∘ z / n; db = Σ dY."""
        g, _, _ = self._dora_parts(kind, params, inputs)
        axis = -1 if kind == "embedding" else 1
        # per output channel (under dora_conv_norm_dim1 g has one entry per (o, tap): the backward takes tap 0's)
        gain = g.reshape(-1) if kind == "embedding" else g.reshape(g.shape[0], -1)[:, 0]
        shape = [1] * inputs["dy"].ndim
        shape[axis] = -1
        dy = self.w(inputs["dy"])
        G = dy if self.bug == "dora_backward_plain_lora" else dy * gain.reshape(shape)
        plain_params = {k: v for k, v in params.items() if k != "want_base_grads"}
        out = plain(plain_params, {**inputs, "dy": G})  # with a mask: dA, dB on x̃ = x ∘ mask
        if "dropout_mask" in inputs:  # Conv in training (SPEC 4.3); the mask leaves dm's z on x̃ below
            xd, training = self._dropped(inputs, self.w(inputs["x"]))
            unmasked = {k: v for k, v in inputs.items() if k != "dropout_mask"}
            if training:  # dx = base_vjp(dY) + mask ∘ (base_vjp((g − 1) ∘ dY) + lora_vjp(G))
                out["dx"] = self.conv_backward(plain_params, inputs, gain=np.ones_like(gain) if self.bug == "dora_backward_plain_lora" else gain)["dx"]
            else:  # dora_dropout_eval_formula: the eval formula on x̃, its whole dx masked
                out["dx"] = self.out(self.w(plain(plain_params, {**unmasked, "dy": G})["dx"]) * self.w(inputs["dropout_mask"]), inputs["x"].dtype)
            inputs = {**unmasked, "x": xd}
        unbiased = {k: v for k, v in inputs.items() if k != "b"}
        if kind == "embedding":
            z = self.w(inputs["W"])[inputs["ids"]] + self.scale(params) * self.mm(self.factors(inputs)[0].T[inputs["ids"]], self.factors(inputs)[1].T)
        else:
            z = self._conv_value(params, unbiased)
        n = self.w(inputs["magnitude"]).reshape(-1) / gain
        axes = tuple(a for a in range(dy.ndim) if a != dy.ndim + axis and a != axis)
        dm = (dy * z).sum(axis=axes)
        t = inputs["dy"].dtype
        out["dmagnitude"] = self.out(dm if self.bug == "dora_dm_unnormalised" else dm / n, t)
        if "b" in inputs:
            out["db"] = self.out(dy.sum(axis=axes), t)
        return out

    def dora_embedding_backward(self, params, inputs):
        return self._dora_kind_backward("embedding", params, inputs, self.embedding_backward)

    def dora_conv2d_backward(self, params, inputs):
        return self._dora_kind_backward("conv", params, inputs, self.conv_backward)

    def _dora_kind_merge(self, kind, params, inputs):
        g, _, V = self._dora_parts(kind, params, inputs)
        return {"W_merged": self.out(g * V, inputs["W"].dtype)}

    def _dora_kind_unmerge(self, kind, params, inputs):
        if not params.get("exact", False):
            if kind == "embedding":
                A, B = self.factors(inputs)
                return self._dora_fast_unmerge(inputs, self.scale(params) * self.mm(B, A).T, 1)
            return self._dora_fast_unmerge(inputs, self._conv_delta(params, inputs, inputs["W_merged"].shape), 0)
        W = inputs["W"]
        g, delta, _ = self._dora_parts(kind, params, inputs)
        merged = self._dora_kind_merge(kind, params, inputs)["W_merged"]
        return {"W_merged": merged, "W_restored": self.restore(self.out(self.w(merged) / g - delta, W.dtype), W)}

    def dora_embedding_merge(self, params, inputs):
        return self._dora_kind_merge("embedding", params, inputs)

    def dora_embedding_unmerge(self, params, inputs):
        return self._dora_kind_unmerge("embedding", params, inputs)

    def dora_conv2d_merge(self, params, inputs):
        return self._dora_kind_merge("conv", params, inputs)

    def dora_conv2d_unmerge(self, params, inputs):
        return self._dora_kind_unmerge("conv", params, inputs)

    # -- adapter trees and merged stacks (SPEC M.2, M.4): a ledger with per-step residuals made at merge time ----
    def _tree_delta(self, kind, params, inputs, i, shape):
        A, B = self.factors(inputs, f".{i}")
        if kind == "conv":
            return self._conv_delta(params, {"A": inputs[f"A.{i}"], "B": inputs[f"B.{i}"]}, shape)
        d = self.scale(params) * self.mm(B, A)
        return d.T if kind == "embedding" else d

    def _channel_norm(self, V, axis, storage):
        shape = [1] * V.ndim
        shape[axis] = -1
        return self.norm(np.moveaxis(V, axis, 0).reshape(V.shape[axis], -1), storage, axis=1).reshape(shape)

    def tree_switch(self, kind, params, inputs):
        """Switch to each visit: unmerge the stack down to the common ancestor (LIFO), merge down the target's path."""
        W0 = inputs["W"]
        t, axis = W0.dtype, 1 if kind == "embedding" else 0
        parents = params["parents"]
        state, stack, out = W0.copy(), [], {}  # stack: (node, gain or None, delta, residual positions, residual values)
        for k, node in enumerate(params["visits"]):
            path = []
            while node is not None and node >= 0:
                path.append(node)
                node = parents[node]
            path = path[::-1]
            common = 0
            while common < min(len(path), len(stack)) and stack[common][0] == path[common]:
                common += 1
            undo = stack[common:][::-1] if self.bug != "tree_unmerge_fifo" else stack[common:]
            for _, g, delta, where, kept in undo:
                restored = self.out(self.w(state) / g - delta, t) if g is not None else self._merge(state, delta, -1)
                restored[where] = kept
                state = restored
            del stack[common:]
            for i in path[common:]:
                delta = self._tree_delta(kind, params["adapters"][i], inputs, i, W0.shape)
                g = None
                if f"magnitude.{i}" in inputs:
                    base = self.w(W0) if self.bug == "dora_stack_norm_from_base" else self.w(state)
                    m = self.w(inputs[f"magnitude.{i}"]).reshape([-1 if a == axis else 1 for a in range(W0.ndim)])
                    g = m / self._channel_norm(base + delta, axis, t)
                    merged = self.out(g * (self.w(state) + delta), t)
                    back = self.out(self.w(merged) / g - delta, t)
                else:
                    merged = self._merge(state, delta, +1)
                    back = self._merge(merged, delta, -1)
                where = bits_of(back) != bits_of(state)  # this step's residual, made when it is merged
                stack.append((i, g, delta, where, state[where]))
                state = merged
            out[f"W.{k}"] = state.copy()
        return out

    # -- weighted combination (SPEC M.3) ----------------------------------------------------------
    def _combine_terms(self, params, inputs, svd=False):
        """[(c_i, A_i, B_i)] in the compute dtype, c_i = w_i s_i."""
        terms = []
        for i, (w, adapter) in enumerate(zip(params["weights"], params["adapters"])):
            A, B = self.factors(inputs, f".{i}")
            c = self.c.type(w) * self.c.type(self.scale(adapter))
            if svd and self.bug == "svd_scale_twice":  # the scale in the weighting and again in the delta
                c = c * self.c.type(self.scale(adapter))
            terms.append((c, A, c * B if self.bug == "combine_weight_on_both" else B))
        return terms

    def _combined(self, params, inputs, A, B):
        t = inputs["A.0"].dtype if "A.0" in inputs else inputs["lora_a.0"].dtype
        if self.bug == "combined_rslora_scale" and params["adapters"][0].get("use_rslora", False):
            A = A * np.sqrt(self.c.type(A.shape[0]))  # the combined adapter inherits use_rslora with alpha = r: scale √r
        A, B = self.out(A, t), self.out(B, t)
        out = {"lora_a": A.T.copy(), "lora_b": B.T.copy()} if "lora_a.0" in inputs else {"A": A, "B": B}
        biases = [(c, self.w(inputs[f"lora_bias.{i}"])) for i, (c, _, _) in enumerate(self._combine_terms(params, inputs))
                  if f"lora_bias.{i}" in inputs]
        if biases:  # Σ c_i b_i (the bug: the weights and scales forgotten, Σ b_i)
            out["lora_bias"] = self.out(sum((1 if self.bug == "combine_bias_unweighted" else c) * b for c, b in biases), t)
        return out

    def combine_cat(self, params, inputs):
        terms = self._combine_terms(params, inputs)
        return self._combined(params, inputs, np.concatenate([c * A for c, A, _ in terms]), np.concatenate([B for _, _, B in terms], axis=1))

    def combine_svd(self, params, inputs):
        """Rank-k factors of Δ = B_cat A_cat via QR of both factors and an SVD of the small core, in the compute dtype;
        any kind's factors as matrices (Conv: A [r, C·∏k], B [O, r]), reshaped back at the end."""
        terms = self._combine_terms(params, inputs, svd=True)
        A_tail, B_tail = terms[0][1].shape[1:], terms[0][2].shape[2:]
        B_cat = np.concatenate([B.reshape(B.shape[0], B.shape[1]) for _, _, B in terms], axis=1)
        A_cat = np.concatenate([c * A.reshape(A.shape[0], -1) for c, A, _ in terms])
        q1, r1 = np.linalg.qr(B_cat)
        q2, r2 = np.linalg.qr(A_cat.T)
        u, sigma, vt = np.linalg.svd(self.mm(r1, r2.T))
        k = int(params["rank"])
        root = np.zeros(k, self.c)
        root[: min(k, sigma.size)] = np.sqrt(sigma[:k])
        U = np.zeros((B_cat.shape[0], k), self.c)
        Vt = np.zeros((k, A_cat.shape[1]), self.c)
        kept = min(k, sigma.size)  # Σ r_i may exceed a dimension: vt is then wider than sigma
        U[:, :kept], Vt[:kept] = self.mm(q1, u[:, :kept]), self.mm(vt[:kept], q2.T)
        return self._combined(params, inputs, (root[:, None] * Vt).reshape((k,) + A_tail), (U * root).reshape((U.shape[0], k) + B_tail))


def _run(impl, layout="canonical", profile="float32"):
    return run_suite(DEFAULT_SUITE, InProcessDriver(impl), layout=layout, profile=profile, timeout=0)


CORRECT = {
    "float32": (lambda: Alt(np.float32), "canonical"),
    "float32 peft layout (s derived in float32)": (lambda: Alt(np.float32), "peft"),
    "float32 mlx layout": (lambda: Alt(np.float32), "mlx"),
    "float32 merged-weight association, reversed sums": (lambda: Alt(np.float32, merged_forward=True, reverse=True), "canonical"),
    "float64 reversed sums": (lambda: Alt(np.float64, reverse=True), "peft"),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_variants_pass_everything(name):
    make, layout = CORRECT[name]
    result = _run(make(), layout)
    bad = [(r.case_id, r.status, r.detail) for r in result.results if r.status != "pass"]
    assert not bad, bad
    ratios = [r.ratio for r in result.results]
    print(f"{name}: worst err/bound {max(ratios):.3f}")


def _params(case_id):
    return load_case(case_dir(DEFAULT_SUITE, case_id)).params


def _dilated(params):
    return any(v != 1 for v in np.atleast_1d(params.get("dilation", 1)))


#: Mutations whose bug makes shapes incompatible on some cases (they crash there, as the real bug does).
CRASH_WHERE = {"forget_fan_in_fan_out": lambda p: p.get("fan_in_fan_out", False), "conv_dilation_ignored": _dilated}


@pytest.mark.parametrize("bug", MUTATIONS)
def test_each_mutation_fails_at_least_two_cases(bug):
    result = _run(Alt(np.float32, bug=bug), MUTATION_LAYOUT.get(bug, "canonical"))
    failed = [r.case_id for r in result.results if r.status == "fail"]
    assert len(failed) >= 2, f"mutation {bug!r} fails {failed}: the suite cannot see it"
    # no crash either, except where the bug makes shapes incompatible (non-square [in, out] weights)
    errors = [(r.case_id, r.detail) for r in result.results if r.status == "error"]
    allowed = CRASH_WHERE.get(bug, lambda p: False)
    assert all(allowed(_params(case_id)) for case_id, _ in errors), errors
    print(f"{bug}: {len(failed)} of {len(result.results)} cases fail, e.g. {failed[:3]}")


def test_mutation_list_is_at_least_forty_and_distinct():
    assert len(MUTATIONS) >= 40 and len(set(MUTATIONS)) == len(MUTATIONS)


def test_storage_precision_profile_accepts_low_precision_compute_but_float32_profile_does_not():
    """Rounding the LoRA intermediate to fp16/bf16 is a conforming *storage-precision* implementation,
    and the float32 (SPEC minimum) profile rejects it: the profile is what decides, not luck."""
    impl = Alt(np.float32, bug="low_precision_lora_path")
    assert not _run(impl, profile="float32").ok
    storage = _run(impl, profile="storage")
    assert storage.ok, [(r.case_id, r.detail) for r in storage.results if r.status != "pass"]


def test_semantic_bugs_fail_even_the_storage_tier():
    """The storage profile still sees semantics: a bfloat16 rsLoRA forward with s = alpha / r (off by √r = 2 at
    r = 4) used to pass ``--compute storage`` at 0.70 of the bound; the semantic guard cases (positive inputs, a
    dominant LoRA term) put it far outside both tiers."""
    result = _run(Alt(np.float32, bug="ignore_rslora"), "peft", profile="storage")
    guard = [r for r in result.results if r.case_id == "semantic/linear-forward-rslora-bfloat16"][0]
    assert guard.status == "fail" and guard.verdict == "semantic" and guard.tiers["storage"][1] > 2, guard
    assert result.conformance() == "nonconformant"
    assert {r.case_id for r in result.results if r.verdict == "semantic"} >= {
        "semantic/linear-merge-rslora-bfloat16", "semantic/linear-backward-rslora-bfloat16", "semantic/embedding-forward-rslora-bfloat16",
        "semantic/mixed-forward-rslora-bfloat16"}  # (DoRA's normalisation absorbs most of a scale error: its guard is for the bias)


def test_precision_only_implementation_is_conformant_at_storage_precision_with_its_cases_listed():
    """One run, two verdicts: the float32 profile rejects the storage-precision implementation (exit 1), the storage
    tier accepts every case, and the summary names the precision-only cases."""
    result = _run(Alt(np.float32, bug="low_precision_lora_path"), profile="float32")
    assert not result.ok and result.conformance() == "conformant at storage precision"
    precision = result.tier_cases("storage")
    assert precision and set(precision) == {r.case_id for r in result.results if r.status == "fail"}
    assert not result.tier_cases("semantic")


#: Semantic mutations and a guard case each must fail in the storage tier too (outside both bounds).
STORAGE_TIER_CATCHES = {
    "forget_fan_in_fan_out": "semantic/linear-forward-fan_in_fan_out_square-bfloat16",
    "conv_dilation_ignored": "semantic/conv2d-forward-dilation2_stride3-bfloat16",
    "mixed_index_wraps": "semantic/mixed-forward-rslora-bfloat16",
    "embedding_reshape": "semantic/embedding-merge-rslora-bfloat16",
    "lora_bias_unscaled": "semantic/linear-backward-rslora-bfloat16",
    "scale_base_too": "semantic/linear-forward-fan_in_fan_out_square-bfloat16",
    "dora_bias_scaled": "semantic/dora-forward-bias-bfloat16",
    "dora_norm_without_delta": "semantic/dora-forward-rslora-bfloat16",
}


@pytest.mark.parametrize("bug", sorted(STORAGE_TIER_CATCHES))
def test_semantic_guards_catch_semantic_mutations_in_the_storage_tier(bug):
    result = _run(Alt(np.float32, bug=bug), MUTATION_LAYOUT.get(bug, "canonical"), profile="storage")
    guard = [r for r in result.results if r.case_id == STORAGE_TIER_CATCHES[bug]][0]
    assert guard.status == "fail" and guard.verdict == "semantic", (bug, guard.tiers)


#: Issue 14's cells: each new formula's mutation must fail at least two cases of every group it names.
CELL_CATCHES = {
    "mixed_batch_shared_scale": ("mixed_embedding/", "mixed_conv1d/", "mixed_conv2d/", "mixed_conv3d/"),
    "mixed_index_wraps": ("mixed_embedding/", "mixed_conv1d/", "mixed_conv2d/", "mixed_conv3d/"),
    "stack_last_adapter_only": ("stack_linear/", "stack_embedding/", "stack_conv1d/", "stack_conv2d/", "stack_conv3d/"),
    "combine_bias_unweighted": ("combine/cat-lora_bias", "combine/svd-lora_bias"),
    "combine_weight_on_both": ("combine/cat-embedding", "combine/cat-conv2d", "combine/svd-conv2d"),
    "svd_scale_twice": ("combine/svd-embedding", "combine/svd-conv2d"),
    "mixed_lora_bias_every_row": ("mixed_linear/forward-lora_bias", "mixed_linear/forward-dora_lora_bias"),
    "dora_norm_without_delta": ("mixed_linear/forward-dora",),
    "mixed_grads_all_rows": ("mixed_linear/backward", "mixed_embedding/backward", "mixed_conv1d/backward", "mixed_conv2d/backward", "mixed_conv3d/backward"),
    "dora_backward_plain_lora": ("mixed_linear/backward-dora", "dora_embedding/backward", "dora_conv1d/backward", "dora_conv2d/backward", "dora_conv3d/backward"),
    "dora_dm_unnormalised": ("mixed_linear/backward-dora", "dora_embedding/backward", "dora_conv1d/backward", "dora_conv2d/backward", "dora_conv3d/backward"),
    "dora_kind_norm_without_delta": ("dora_conv1d/", "dora_conv3d/"),
    "dora_conv_norm_dim1": ("dora_conv1d/", "dora_conv3d/"),
    "dora_dropout_eval_formula": ("dora/pw-forward_dropout", "dora/pw-backward_dropout", "mixed_linear/forward-mask-dora",
                                  "mixed_linear/backward-mask-dora", "dora_conv1d/forward-dropout", "dora_conv2d/forward-dropout",
                                  "dora_conv3d/forward-dropout", "dora_conv1d/backward-dropout", "dora_conv2d/backward-dropout",
                                  "dora_conv3d/backward-dropout"),
    "mixed_mask_unrouted": ("mixed_linear/forward-mask-", "mixed_linear/backward-mask-", "mixed_conv1d/forward-mask-",
                            "mixed_conv1d/backward-mask-", "mixed_conv2d/forward-mask-", "mixed_conv2d/backward-mask-",
                            "mixed_conv3d/forward-mask-", "mixed_conv3d/backward-mask-"),
    "ignore_dropout_mask": ("mixed_conv1d/forward-mask-", "mixed_conv2d/backward-mask-", "mixed_conv3d/backward-mask-",
                            "dora_conv1d/backward-dropout", "dora_conv3d/backward-dropout"),
    "dropout_on_base_too": ("mixed_conv1d/forward-mask-", "mixed_conv2d/forward-mask-", "mixed_conv3d/forward-mask-"),
    "tree_unmerge_fifo": ("tree_linear/", "tree_embedding/", "tree_conv1d/", "tree_conv2d/", "tree_conv3d/"),
    "dora_stack_norm_from_base": ("tree_linear/", "tree_conv2d/"),
    "dora_unmerge_norm_recomputed": ("dora/pw-unmerge_fast", "dora_embedding/pw-unmerge_fast", "dora_conv1d/pw-unmerge_fast",
                                     "dora_conv2d/pw-unmerge_fast", "dora_conv3d/pw-unmerge_fast"),
}


@pytest.mark.parametrize("bug", sorted(CELL_CATCHES))
def test_new_cells_catch_their_mutations(bug):
    failed = [r.case_id for r in _run(Alt(np.float32, bug=bug)).results if r.status == "fail"]
    for prefix in CELL_CATCHES[bug]:
        assert sum(case_id.startswith(prefix) for case_id in failed) >= 2, (bug, prefix, failed)
