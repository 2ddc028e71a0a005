"""Oracles for Conv1d, Conv2d and Conv3d LoRA (SPEC 4.2): ``conv{d}d.forward|backward|merge|unmerge``.

Same rules as ``operations.py``: exact dyadic arithmetic, one rounding to float64, a magnitude
M and a depth K per output (bounds.py). Shapes: x [N, C, *S], W [O, C, *k], A [r, C, *k],
B [O, r, 1, ..., 1] with d = 1, 2, 3 spatial axes; params ``stride``, ``padding`` (zeros) and
``dilation``, each an int (every spatial axis) or a list with one entry per axis, used by *both* convs with a kernel (the base
and lora_A: SPEC 4.2 gives lora_A the base's whole geometry). With cols = im2col(x)
[P, C·∏k] (P = N·∏out positions), dY [P, O] and dH = s dY B:

    forward   y = cols Wᵀ + b + s (cols̃ Aᵀ) Bᵀ                 K = C·∏k + r + 6
    merge     W + s (B A) reshaped to the kernel (unmerge: −)    K = r + 6
    backward  dx = col2im(dY W + dH A)       K = O + r + ∏k + 6  (col2im adds ≤ ∏k overlapping taps)
              dA = dHᵀ cols  K = P + O + 6;  dB = s dYᵀ (cols Aᵀ)  K = P + C·∏k + 6
              dW = dYᵀ cols  K = P + 2;      db = Σ dY           K = P + 1

With a ``dropout_mask`` input (training, shaped like x) cols̃ = im2col(x ∘ mask) feeds the LoRA path
only (PEFT's ``lora_A(dropout(x))``): dA, dB take cols̃ and dx's LoRA part is col2im(dH A) ∘ mask;
the base path, dW and db keep x. Without a mask cols̃ = cols. The mask is one more multiplication
on the LoRA path (K + 1; exact in t for entries 0 and 1/(1 − p) = 2, but bounded as a rounding).

Dilation only spaces the taps of a window apart, so it changes which input elements enter a
product, never the number of terms: every K is the same with and without it.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .exact import Dyadic
from .operations import Expected, Inputs, Params, bounded, exact_input, merge_expected, register, scale_term


Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def per_axis(value: int | list[int], d: int) -> tuple[int, ...]:
    """A geometry parameter as one int per spatial axis (an int applies to every axis)."""
    values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * d
    if len(values) != d:
        raise ValueError(f"conv parameter {value!r} does not have {d} entries")
    return values


def _geometry(params: Params, d: int) -> Geometry:
    """(stride, padding, dilation) of a case, per spatial axis."""
    return tuple(per_axis(params.get(k, v), d) for k, v in (("stride", 1), ("padding", 0), ("dilation", 1)))  # type: ignore[return-value]


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    """Python int zeros (np.pad would insert numpy int64 zeros, which overflow in products)."""
    out = np.empty(shape, dtype=object)
    out[...] = 0
    return out


def _im2col(x: Dyadic, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
            dilation: tuple[int, ...]) -> tuple[Dyadic, tuple[int, ...]]:
    """Patches [N·∏out, C·∏k] of x [N, C, *S] (zero padding; taps ``dilation`` apart, per axis), and the output size."""
    d = len(kernel)
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    ints = _zeros((n, c) + tuple(s + 2 * p for s, p in zip(spatial, padding)))
    ints[(slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in zip(spatial, padding))] = x.ints
    span = tuple(dl * (k - 1) + 1 for dl, k in zip(dilation, kernel))
    windows = sliding_window_view(ints, span, axis=tuple(range(2, 2 + d)))
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in stride)
                      + tuple(slice(None, None, dl) for dl in dilation)]
    out = windows.shape[2 : 2 + d]  # windows: [N, C, *out, *k]
    order = (0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d))
    cols = windows.transpose(order).reshape(n * int(np.prod(out)), c * int(np.prod(kernel)))
    return Dyadic(np.array(cols, dtype=object), x.exp), tuple(out)


def _col2im(dcols: Dyadic, x_shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
            padding: tuple[int, ...], dilation: tuple[int, ...], out: tuple[int, ...]) -> Dyadic:
    """The adjoint of :func:`_im2col`: scatter-add patch gradients [N·∏out, C·∏k] back onto x's shape."""
    d = len(kernel)
    n, c, spatial = x_shape[0], x_shape[1], x_shape[2:]
    patches = dcols.ints.reshape((n,) + out + (c,) + kernel)
    padded = _zeros((n, c) + tuple(s + 2 * p for s, p in zip(spatial, padding)))
    to_nc = (0, d + 1) + tuple(range(1, d + 1))  # [N, *out, C] -> [N, C, *out]
    for tap in np.ndindex(*kernel):
        where = tuple(slice(t * dl, t * dl + st * (o - 1) + 1, st) for t, o, st, dl in zip(tap, out, stride, dilation))
        padded[(slice(None), slice(None)) + where] += patches[(Ellipsis,) + tap].transpose(to_nc)
    inner = padded[(slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in zip(spatial, padding))]
    return Dyadic(np.ascontiguousarray(inner), dcols.exp)


def _channels_first(t: Dyadic, n: int, out: tuple[int, ...], channels: int) -> Dyadic:
    """[N·∏out, K] -> [N, K, *out]."""
    d = len(out)
    return Dyadic(t.ints.reshape((n,) + out + (channels,)).transpose((0, d + 1) + tuple(range(1, d + 1))), t.exp)


def _positions(dy: Dyadic, channels: int) -> Dyadic:
    """[N, K, *out] -> [N·∏out, K]."""
    d = dy.ints.ndim - 2
    order = (0,) + tuple(range(2, 2 + d)) + (1,)
    return Dyadic(np.ascontiguousarray(dy.ints.transpose(order)).reshape(-1, channels), dy.exp)


def _mask(inputs: Inputs, absolute: bool) -> Dyadic | None:
    """The training mask (shaped like x) as an exact Dyadic, None at inference."""
    return exact_input(inputs, "dropout_mask", absolute) if "dropout_mask" in inputs else None


def _mask_depth(inputs: Inputs) -> int:
    """One more rounding on the LoRA path with a mask (module docstring)."""
    return 1 if "dropout_mask" in inputs else 0


def _forward(inputs: Inputs, params: Params, absolute: bool) -> tuple[list, tuple[int, ...]]:
    x, W, A, B = (exact_input(inputs, n, absolute) for n in ("x", "W", "A", "B"))
    out_ch, r = W.shape[0], A.shape[0]
    geometry = _geometry(params, len(W.shape) - 2)
    cols, out = _im2col(x, tuple(W.shape[2:]), *geometry)
    mask = _mask(inputs, absolute)
    lora_cols = cols if mask is None else _im2col(x * mask, tuple(W.shape[2:]), *geometry)[0]
    n = x.shape[0]
    base = cols @ W.reshape(out_ch, -1).T  # [P, O]
    if "b" in inputs:
        base = base + exact_input(inputs, "b", absolute).reshape(1, -1)
    lora = (lora_cols @ A.reshape(r, -1).T) @ B.reshape(out_ch, r).T
    terms = [(Fraction(1), _channels_first(base, n, out, out_ch)), (scale_term(params, absolute), _channels_first(lora, n, out, out_ch))]
    return terms, (n, out_ch) + out


def conv_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """y = conv(x, W) + b + s conv1x1(conv(x̃, A), B), both kernel convs with the case's stride, padding, dilation
    (x̃ = x ∘ mask with a ``dropout_mask``, else x)."""
    terms, shape = _forward(inputs, params, False)
    abs_terms, _ = _forward(inputs, params, True)
    depth = int(np.prod(inputs["W"].shape[1:])) + inputs["A"].shape[0] + 6 + _mask_depth(inputs)
    return {"y": bounded(terms, abs_terms, shape, depth)}


def conv_delta(inputs: Inputs, params: Params, shape: tuple[int, ...]):
    """ΔW = s (B A) reshaped to the kernel shape, as ``merge_expected`` wants it (value or |value|)."""

    def delta(absolute: bool):
        A, B = exact_input(inputs, "A", absolute), exact_input(inputs, "B", absolute)
        r = A.shape[0]
        return scale_term(params, absolute), (B.reshape(B.shape[0], r) @ A.reshape(r, -1)).reshape(*shape)

    return delta


def conv_merge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """W_merged = round_t(W + s (B A) reshaped to [O, C, *k])."""
    W = inputs["W"]
    return {"W_merged": merge_expected(W, conv_delta(inputs, params, W.shape), +1, inputs["A"].shape[0] + 6)}


def conv_unmerge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """W = round_t(W_merged − s (B A) reshaped to the kernel) (fast mode)."""
    W = inputs["W_merged"]
    return {"W": merge_expected(W, conv_delta(inputs, params, W.shape), -1, inputs["A"].shape[0] + 6)}


def _backward(inputs: Inputs, params: Params, absolute: bool) -> dict[str, list]:
    x, W, A, B = (exact_input(inputs, n, absolute) for n in ("x", "W", "A", "B"))
    out_ch, r = W.shape[0], A.shape[0]
    kernel = tuple(W.shape[2:])
    geometry = _geometry(params, len(kernel))
    cols, out = _im2col(x, kernel, *geometry)
    mask = _mask(inputs, absolute)
    lora_cols = cols if mask is None else _im2col(x * mask, kernel, *geometry)[0]
    dY = _positions(exact_input(inputs, "dy", absolute), out_ch)  # [P, O]
    s = scale_term(params, absolute)
    W_flat, A_flat, B_flat = W.reshape(out_ch, -1), A.reshape(r, -1), B.reshape(out_ch, r)
    dYB = dY @ B_flat  # dH / s, [P, r]
    x_shape = tuple(inputs["x"].shape)
    lora_dx = _col2im(dYB @ A_flat, x_shape, kernel, *geometry, out)
    terms = {
        "dx": [(Fraction(1), _col2im(dY @ W_flat, x_shape, kernel, *geometry, out)), (s, lora_dx if mask is None else lora_dx * mask)],
        "dA": [(s, (dYB.T @ lora_cols).reshape(*A.shape))],
        "dB": [(s, (dY.T @ (lora_cols @ A_flat.T)).reshape(*B.shape))],
    }
    if params.get("want_base_grads", False):
        terms["dW"] = [(Fraction(1), (dY.T @ cols).reshape(*W.shape))]
        terms["db"] = [(Fraction(1), dY.sum(axis=0))]
    return terms


def conv_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Gradients of the conv forward given dy [N, O, *out]: dx, dA, dB (+ dW, db with want_base_grads); with a
    ``dropout_mask`` the LoRA path's on x ∘ mask (module docstring)."""
    terms, abs_terms = _backward(inputs, params, False), _backward(inputs, params, True)
    W, r, m = inputs["W"], inputs["A"].shape[0], _mask_depth(inputs)
    P = int(np.prod(inputs["dy"].shape)) // W.shape[0]
    taps = int(np.prod(W.shape[2:]))
    shapes = {"dx": inputs["x"].shape, "dA": inputs["A"].shape, "dB": inputs["B"].shape, "dW": W.shape, "db": (W.shape[0],)}
    depth = {"dx": W.shape[0] + r + taps + 6 + m, "dA": P + W.shape[0] + 6 + m, "dB": P + int(np.prod(W.shape[1:])) + 6 + m,
             "dW": P + 2, "db": P + 1}
    return {n: bounded(terms[n], abs_terms[n], tuple(shapes[n]), depth[n]) for n in terms}


for _d in (1, 2, 3):
    register(f"conv{_d}d.forward", "SPEC 4.2, C.3")(conv_forward)
    register(f"conv{_d}d.merge", "SPEC 4.2, C.3")(conv_merge)
    register(f"conv{_d}d.unmerge", "SPEC 4.2, C.3")(conv_unmerge)
    register(f"conv{_d}d.backward", "SPEC 4.2, C.3")(conv_backward)
