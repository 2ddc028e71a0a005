"""The numerics every layer kind shares, each in one place (SPEC 2.3, 2.4, 3.1).

* widening: :func:`wide` (any supported float dtype -> float64, exact), :func:`wide_vector`;
* per-channel broadcasting: :func:`along_axis`;
* dropout masks: :func:`check_mask` (the mask's shape must be the input's);
* the rank-one sum Σ_k left[:, k] ⊗ right[k, :] in a fixed order: :func:`rank_one_sum`;
* the LoRA vector-Jacobian product of y = s ((x ∘ mask) Aᵀ) Bᵀ: :func:`lora_vjp`;
* forward error analysis: γ_k = k u / (1 − k u) (:func:`gamma`);
* the exact rational oracle the tests compare against: :func:`exact` and :func:`to_float`.

The conformance oracles (:mod:`lora_ref.conformance`) do not use this module on purpose: they
are an independent implementation, with their own γ (``conformance/bounds.py``) and exact
arithmetic (``conformance/exact.py``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from .dtypes import check_float_array, float64
from .errors import ShapeError


def wide(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as a float64 copy (exact: every supported float dtype widens without rounding).

    DTypeError names ``what`` when the array is not of a supported float dtype.
    """
    check_float_array(array, what)
    return np.asarray(array).astype(float64)


def wide_vector(v: np.ndarray, length: int, what: str) -> np.ndarray:
    """``v`` widened to float64 with shape (length,) (a bias or lora_bias), else ShapeError."""
    v64 = wide(v, what)
    if v64.shape != (length,):
        raise ShapeError(f"{what} has shape {v64.shape}, expected ({length},)")
    return v64


def along_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-channel vector ``v`` [C] shaped to broadcast along ``axis`` of an ``ndim``-axis array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A dropout mask (values 0 or 1/(1−p), see :mod:`lora_ref.dropout`) as float64 of the input's ``shape``.

    None stays None (no dropout); any other shape is a ShapeError.
    """
    if mask is None:
        return None
    mask64 = np.asarray(mask, dtype=float64)
    if mask64.shape != tuple(shape):
        raise ShapeError(f"dropout mask has shape {mask64.shape}, expected {tuple(shape)}")
    return mask64


#: Elements of one accumulator tile in :func:`rank_one_sum` (256 KiB of float64: stays in cache
#: while the r rank-one terms are added to it).
TILE_ELEMENTS = 32 * 1024


def rank_one_sum(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Σ_k left[:, k] ⊗ right[k, :] in float64, accumulated in increasing k (no BLAS).

    Every element is 0 + p_0 + p_1 + ... + p_{r-1} with p_k = left[i, k] · right[k, j], one
    float64 multiply and one float64 add per term, in this order. The rows are processed in
    tiles small enough to stay in cache while all r terms are added; the tiling changes no
    element's sequence of operations, so the result is bitwise the same for any tile size.
    """
    left = np.asarray(left, dtype=float64)
    right = np.asarray(right, dtype=float64)
    n_rows, n_cols = left.shape[0], right.shape[1]
    acc = np.zeros((n_rows, n_cols), dtype=float64)
    step = max(1, TILE_ELEMENTS // max(n_cols, 1))
    term = np.empty((min(step, n_rows), n_cols), dtype=float64)
    for start in range(0, n_rows, step):
        tile = acc[start : start + step]
        scratch = term[: tile.shape[0]]
        for k in range(left.shape[1]):
            np.multiply(left[start : start + step, k, None], right[k], out=scratch)
            tile += scratch
    return acc


def lora_vjp(X: np.ndarray, dY: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float,
             mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dX, dA, dB) of Σ dY ∘ s ((X ∘ mask) Aᵀ) Bᵀ, all float64 (SPEC 2.4).

    X, mask [rows, in], dY [rows, out], A [r, in], B [out, r]:

        dX = s ((dY B) A) ∘ mask      dA = s (dY B)ᵀ (X ∘ mask)      dB = s dYᵀ ((X ∘ mask) Aᵀ)

    The LoRA part of dx only (the base part dY W is the caller's). Each product is one BLAS
    call on float64 operands, evaluated in this association.
    """
    Xm = X if mask is None else X * mask
    dYB = dY @ B  # [rows, r]
    dX = (dYB @ A) * scale
    if mask is not None:
        dX = dX * mask
    return dX, scale * (dYB.T @ Xm), scale * (dY.T @ (Xm @ A.T))


def gamma(k: int, u: float) -> float:
    """γ_k(u) = k·u / (1 − k·u): the relative error bound of k roundings with unit roundoff u.

    Raises ValueError when k·u ≥ 1 (the bound says nothing there).
    """
    if k * u >= 1:
        raise ValueError(f"gamma_{k} undefined for u={u}: k*u >= 1")
    return k * u / (1 - k * u)


def exact(array: np.ndarray | float | None) -> np.ndarray | None:
    """An object array of Fractions holding the exact values of ``array`` (any float dtype).

    Widening to float64 is exact for every supported dtype, and Fraction(float) is exact, so
    arithmetic on the result is exact rational arithmetic: the oracle the tests compare to.
    """
    if array is None:
        return None
    a = np.asarray(array)
    flat = [Fraction(float(v)) for v in a.astype(float64).reshape(-1)]
    return np.array(flat + [None], dtype=object)[:-1].reshape(a.shape)


def to_float(array: np.ndarray) -> np.ndarray:
    """Fractions -> float64, each correctly rounded (Fraction.__float__ rounds to nearest)."""
    return np.array([float(v) for v in np.asarray(array).reshape(-1)], dtype=float64).reshape(np.shape(array))
