"""PEFT init methods (SPEC 4.4): properties that hold whatever the draws, plus typed errors.

PiSSA: W = V S Uᴴ, so s·B·A is the best rank-r approximation W_r and the new base is W − W_r
(up to rounding A, B and the base). In float64, a backward-stable SVD and the products add at
most c·u64·‖W‖₂ with c = 10·(out + in); rounding A and B to float32 moves s·B·A by at most
2·u32·s·|B||A| (+ u32² terms), and the base's own rounding u_t|W_new|. OLoRA: B has orthonormal
columns and A is upper triangular with a non-negative diagonal (the spec's sign convention).
Both: new_base + s·B̂·Â reproduces W up to the base's one rounding u32·|W − s·B̂·Â| plus the
float64 product and subtraction, (r + 3)·u64·(|W| + s·|B̂||Â|).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.config import lora_scale
from lora_ref.dtypes import UNIT_ROUNDOFF, float32, float64, resolve_dtype, round_to
from lora_ref.errors import ConfigError, ShapeError
from lora_ref.init import init_lora, init_magnitude, kaiming_uniform_bound
from lora_ref.linear import LinearDelta

from helpers import error_log

U64, U32 = UNIT_ROUNDOFF[float64], UNIT_ROUNDOFF[float32]
LOG, _print_errors = error_log("Init methods")


@given(kind=st.sampled_from(["linear", "conv"]), r=st.integers(1, 4), n_in=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_default_is_kaiming_uniform_with_zero_B(kind: str, r: int, n_in: int, seed: int) -> None:
    weight = np.zeros((5, n_in) if kind == "linear" else (5, n_in, 3, 2))
    fan_in = n_in if kind == "linear" else n_in * 6
    got = init_lora(kind, weight, r, 8, rng=seed)
    bound = kaiming_uniform_bound(fan_in)
    assert abs(bound - 1 / np.sqrt(fan_in)) <= 4 * U64 / np.sqrt(fan_in)  # √3·√(1/3) = 1 up to float64 steps
    assert got.A.dtype == float32 and got.A.shape == ((r, n_in) if kind == "linear" else (r, n_in, 3, 2))
    assert np.all(np.abs(got.A.astype(float64)) <= float(round_to(np.float64(bound), float32)))
    assert not np.any(got.B) and got.B.shape == ((5, r) if kind == "linear" else (5, r, 1, 1))
    # the same draws give the same adapter; U = 0 maps to −b_t exactly
    again = init_lora(kind, weight, r, 8, rng=seed)
    assert np.array_equal(got.A, again.A)
    zero = init_lora(kind, weight, r, 8, draws=np.zeros(got.A.shape))
    assert np.all(zero.A == -round_to(np.float64(bound), float32))


@given(r=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_gaussian_and_embedding(r: int, seed: int, dtype: str) -> None:
    N = np.random.default_rng(seed).standard_normal((r, 7))
    got = init_lora("linear", np.zeros((3, 7)), r, 1, method="gaussian", draws=N, dtype=dtype)
    sigma = round_to(np.float64(1 / r), resolve_dtype(dtype)).astype(float64)
    assert np.array_equal(got.A, round_to(N * sigma, resolve_dtype(dtype))) and not np.any(got.B)
    # Embedding: PEFT's reversed init, whatever the method string (default or gaussian)
    NB = np.random.default_rng(seed).standard_normal((4, r))
    for method in ("default", "gaussian"):
        emb = init_lora("embedding", np.zeros((9, 4)), r, 1, method=method, draws=NB, dtype=dtype)
        assert emb.A.shape == (r, 9) and not np.any(emb.A)
        assert np.array_equal(emb.B, round_to(NB, resolve_dtype(dtype)))


@st.composite
def linear_weights(draw: st.DrawFn):
    out_f, in_f = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    r = draw(st.integers(1, min(out_f, in_f)))
    W = round_to(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(0, 1, (out_f, in_f)), float32)
    return W, r, draw(st.booleans()), draw(st.sampled_from([1.0, 2.0, 16.0])), draw(st.booleans())


@given(case=linear_weights())
def test_pissa_splits_w_into_its_top_r_part(case) -> None:
    W, r, rslora, alpha, ffo = case
    stored = W.T.copy() if ffo else W
    got = init_lora("linear", stored, r, alpha, method="pissa", use_rslora=rslora, fan_in_fan_out=ffo)
    s = lora_scale(r, alpha, rslora)
    W64 = W.astype(float64)
    V, S, Uh = np.linalg.svd(W64)
    W_r = (V[:, :r] * S[:r]) @ Uh[:r]
    A64, B64 = got.A.astype(float64), got.B.astype(float64)
    c = 10 * sum(W.shape) * U64 * S[0]
    rounding = 2 * U32 * s * (np.abs(B64) @ np.abs(A64)) * (1 + U32)
    gap = S[r - 1] - S[r] if r < min(W.shape) else S[r - 1]
    if gap > 1e-3 * S[0]:  # W_r is well defined: s·B·A is it
        LOG.check("pissa s·B·A = W_r", s * B64 @ A64, W_r, c * (1 + 2 * S[0] / gap) + rounding)
    new_base = got.base.T if ffo else got.base
    assert got.base.dtype == W.dtype and got.base.shape == stored.shape
    # the adapted model reproduces W: new_base + s·B̂·Â = W up to the base's one rounding
    LOG.check("pissa new base + s·B·A = W", new_base.astype(float64) + s * B64 @ A64, W64,
              U32 * np.abs(W64 - s * B64 @ A64) + (r + 3) * U64 * (np.abs(W64) + s * np.abs(B64) @ np.abs(A64)))
    # sign convention: the largest |entry| of each row of A (∝ Uᴴ_r) is positive
    lead = np.argmax(np.abs(A64), axis=1)
    assert np.all(A64[np.arange(r), lead] > 0)


@given(case=linear_weights())
def test_olora_is_a_thin_qr(case) -> None:
    W, r, rslora, alpha, ffo = case
    got = init_lora("linear", W, r, alpha, method="olora", use_rslora=rslora)
    A64, B64 = got.A.astype(float64), got.B.astype(float64)
    # float32 B: orthonormal to within the rounding of its entries (|B| ≤ 1: each off by ≤ u32)
    LOG.check("olora BᵀB = I", B64.T @ B64, np.eye(r), np.full((r, r), 2 * W.shape[0] * U32 + 10 * W.shape[0] * U64))
    assert np.all(np.tril(A64, -1)[:, :r] == 0) and np.all(np.diag(A64[:, :r]) >= 0)
    s = lora_scale(r, alpha, rslora)
    W64 = W.astype(float64)
    LOG.check("olora new base + s·B·A = W", got.base.astype(float64) + s * B64 @ A64, W64,
              U32 * np.abs(W64 - s * B64 @ A64) + (r + 3) * U64 * (np.abs(W64) + s * np.abs(B64) @ np.abs(A64)))


def test_dora_initial_magnitude_is_the_weight_norm() -> None:
    W = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)
    A, B = np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32)
    assert init_magnitude(W, LinearDelta(A, B, 1.0), 0).tolist() == [5.0, 1.0]  # ‖(3, 4)‖ = 5 exactly
    assert init_magnitude(W, LinearDelta(A, B, 1.0), 1).tolist() == [3.0, np.sqrt(np.float32(17))]


def test_bad_requests_are_typed_errors() -> None:
    W = np.ones((4, 3), np.float32)
    with pytest.raises(ConfigError):
        init_lora("linear", W, 2, 1, method="loftq")
    with pytest.raises(ConfigError):
        init_lora("conv", np.ones((4, 3, 3, 3)), 2, 1, method="pissa")
    with pytest.raises(ConfigError):
        init_lora("embedding", W, 2, 1, method="olora")
    with pytest.raises(ConfigError):
        init_lora("linear", W, 4, 1, method="pissa")  # r > min(out, in)
    with pytest.raises(ConfigError):
        init_lora("linear", np.array([[np.nan, 1.0]]), 1, 1, method="olora")
    with pytest.raises(ConfigError):
        init_lora("attention", W, 2, 1)
    with pytest.raises(ShapeError):
        init_lora("linear", W, 2, 1, draws=np.zeros((3, 3)))
