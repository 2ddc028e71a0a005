"""Embedding LoRA (SPEC 4.1) against an exact rational oracle, within derived bounds.

Oracle, per position with id v:  y = W[v] + s Σ_j A[j, v] B[:, j]  (Fractions, explicit loops).
Forward bound as test_linear: u_t|y| + (1+u_t)·γ_K(u64)·M + η_t/2 with K = r + 3 (r products
summed, the scale, one add) and M the oracle on |inputs|.

Backward: L = Σ dy ∘ y is linear in A and in B separately; for a direction V the exact
L(θ + V) − L(θ) is ⟨∂L/∂θ, V⟩ exactly, where repeated ids must accumulate (scatter-add) and
padding_idx must receive nothing. Gradient components sum at most G = (#positions)·(D + r)
products, so each is within γ_G(u64)·M_i, and the dot with V adds γ_{|V|+1}.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.dtypes import UNIT_ROUNDOFF, bits_of, float64, resolve_dtype, round_to
from lora_ref.embedding import EmbeddingDelta, EmbeddingIndexError, backward, forward
from lora_ref.errors import DTypeError, ShapeError
from lora_ref.merge import fast_roundtrip_bound, merge, unmerge
from lora_ref.numerics import exact, gamma, to_float

from helpers import error_log, rounding_bound

STORAGE = ["float32", "float16", "bfloat16"]
U64 = UNIT_ROUNDOFF[float64]
LOG, _print_errors = error_log("Embedding LoRA vs exact oracle")


def oracle_forward(ids, W, A, B, s):
    """Exact y[pos] = W[id] + s Σ_j A[j, id] B[:, j] on Fraction arrays."""
    out = np.empty(ids.shape + (W.shape[1],), dtype=object)
    for pos in np.ndindex(*ids.shape):
        v = ids[pos]
        out[pos] = W[v] + sum((B[:, j] * A[j, v] for j in range(A.shape[0])), start=np.zeros(W.shape[1], dtype=object) + Fraction(0)) * s
    return out


@st.composite
def embedding_cases(draw: st.DrawFn, dtypes=STORAGE + ["float64"]) -> dict:
    dtype = resolve_dtype(draw(st.sampled_from(dtypes)))
    V, D, r = draw(st.integers(1, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 2.0 ** draw(st.integers(-6, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    ids = rng.integers(0, V, shape)  # small V: repeated ids are common

    def sample(s_):
        return round_to(rng.normal(0, scale, s_), dtype)

    return {"dtype": dtype, "ids": ids, "W": sample((V, D)), "A": sample((r, V)), "B": sample((D, r)),
            "s": draw(st.sampled_from([0.25, 1.0, 8 / 3])), "dy": sample(shape + (D,)),
            "padding_idx": draw(st.one_of(st.none(), st.integers(0, V - 1)))}


def _exact(case: dict) -> tuple:
    return exact(case["W"]), exact(case["A"]), exact(case["B"]), Fraction(case["s"])


@given(case=embedding_cases())
def test_forward_matches_exact_oracle(case: dict) -> None:
    W, A, B, s = _exact(case)
    want = to_float(oracle_forward(case["ids"], W, A, B, s))
    magnitude = to_float(oracle_forward(case["ids"], np.abs(W), np.abs(A), np.abs(B), s))
    got = forward(case["ids"], case["W"], case["A"], case["B"], case["s"])
    assert got.dtype == case["dtype"] and got.shape == case["ids"].shape + (case["W"].shape[1],)
    LOG.check(f"forward {case['dtype']}", got, want, rounding_bound(want, magnitude, case["A"].shape[0] + 3, case["dtype"]))


@given(case=embedding_cases(dtypes=["float64"]), which=st.sampled_from(["A", "B", "W"]))
def test_backward_is_the_exact_directional_derivative(case: dict, which: str) -> None:
    """Scatter-add over repeated ids and a silent padding_idx (module doc)."""
    V = np.random.default_rng(1).normal(0, 1, case[which].shape)
    pad = case["padding_idx"]
    if pad is not None and which != "B":  # padding_idx's column of A / row of W gets no gradient
        V_eff = V.copy()
        if which == "A":
            V_eff[:, pad] = 0.0
        else:
            V_eff[pad] = 0.0
    else:
        V_eff = V
    W, A, B, s = _exact(case)
    dy = exact(case["dy"])

    def loss(W, A, B):
        return (oracle_forward(case["ids"], W, A, B, s) * dy).sum()

    def moved(step):
        args = {"W": W, "A": A, "B": B}
        args[which] = args[which] + exact(step)
        return args

    want = float(loss(**moved(V_eff)) - loss(W, A, B))
    absargs = {"W": np.abs(W), "A": np.abs(A), "B": np.abs(B)}
    absargs_moved = dict(absargs)
    absargs_moved[which] = absargs[which] + exact(np.abs(V))
    abs_dy = np.abs(dy)
    magnitude = float((oracle_forward(case["ids"], **absargs_moved, s=s) * abs_dy).sum()
                      - (oracle_forward(case["ids"], **absargs, s=s) * abs_dy).sum())
    g = backward(case["ids"], case["dy"], case["W"], case["A"], case["B"], case["s"], padding_idx=pad, want_base_grads=True)
    got = float(np.sum({"A": g.dA, "B": g.dB, "W": g.dW}[which] * V))
    G = case["ids"].size * (case["W"].shape[1] + case["A"].shape[0]) + 2
    bound = (gamma(G, U64) + gamma(V.size + 1, U64) * (1 + gamma(G, U64))) * magnitude
    LOG.check(f"backward d{which} (directional)", np.array(got), np.array(want), np.array(bound))
    if pad is not None:
        assert not np.any(g.dA[:, pad]) and not np.any(g.dW[pad])


def test_repeated_ids_accumulate() -> None:
    """Small integers: every value exact. ids [1, 1, 1] with dy = 1 gives dA[:, 1] = 3 s (dy B)."""
    W, A, B = np.zeros((3, 2)), np.ones((1, 3)), np.array([[1.0], [2.0]])
    g = backward(np.array([1, 1, 1]), np.ones((3, 2)), W, A, B, 2.0)
    assert g.dA.tolist() == [[0.0, 3 * 2.0 * 3.0, 0.0]]  # 3 positions × s=2 × (1·1 + 1·2)
    assert g.dB.tolist() == [[3 * 2.0], [3 * 2.0]]


@given(case=embedding_cases())
def test_merged_lookup_equals_lora_lookup(case: dict) -> None:
    """round_t(W + ΔW)[ids] vs the float64 LoRA forward: one rounding of W', plus γ_{r+3}(u64)."""
    delta = EmbeddingDelta(case["A"], case["B"], case["s"])
    merged = merge(case["W"], delta).weight
    got = merged[case["ids"]].astype(float64)
    want = forward(case["ids"], case["W"], case["A"], case["B"], case["s"], out_dtype="float64")
    exact_v = np.abs(case["W"].astype(float64) + delta.full())[case["ids"]]
    magnitude = np.abs(case["W"].astype(float64))[case["ids"]] + case["s"] * (np.abs(case["A"].astype(float64)).T[case["ids"]] @ np.abs(case["B"].astype(float64)).T)
    u_t = 0.0 if case["dtype"] == float64 else UNIT_ROUNDOFF[case["dtype"]]
    from lora_ref.dtypes import SMALLEST_SUBNORMAL

    LOG.check(f"merged vs unmerged lookup {case['dtype']}", got, want,
              u_t * exact_v + SMALLEST_SUBNORMAL[case["dtype"]] / 2 + 2 * gamma(case["A"].shape[0] + 4, U64) * magnitude)


@st.composite
def weight_and_delta(draw: st.DrawFn, special: bool):
    dtype = resolve_dtype(draw(st.sampled_from(STORAGE)))
    V, D, r = draw(st.integers(1, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w_scale = 2.0 ** draw(st.integers(-20, 4))
    d_scale = w_scale * 2.0 ** draw(st.integers(-12, 12))
    W = round_to(rng.normal(0, w_scale, (V, D)), dtype)
    if special:
        bits = bits_of(W).reshape(-1).copy()
        raw = rng.integers(0, 2 ** (8 * bits.itemsize), bits.size, dtype=np.uint64).astype(bits.dtype)
        pick = rng.random(bits.size) < 0.5
        bits[pick] = raw[pick]
        W = bits.view(dtype).reshape(V, D)
    A = rng.normal(0, np.sqrt(d_scale), (r, V)).astype(np.float32)
    B = rng.normal(0, np.sqrt(d_scale), (D, r)).astype(np.float32)
    return W, EmbeddingDelta(A, B, 2.0, module="embed_tokens")


@given(wd=weight_and_delta(special=False))
def test_fast_round_trip_within_bound(wd) -> None:
    W, delta = wd
    merged = merge(W, delta).weight
    if not np.all(np.isfinite(merged.astype(float64))):
        return  # the bound assumes no overflow (SPEC 3.3)
    LOG.check(f"fast round trip {W.dtype}", unmerge(merged, delta), W.astype(float64), fast_roundtrip_bound(W, delta.full()))


@given(wd=weight_and_delta(special=True))
def test_exact_round_trip_is_bitwise(wd) -> None:
    W, delta = wd
    result = merge(W, delta, exact=True)
    assert np.array_equal(bits_of(unmerge(result.weight, delta, residual=result.residual)), bits_of(W))


def test_bad_ids_and_shapes_are_refused_naming_the_module() -> None:
    W, A, B = np.zeros((5, 3)), np.zeros((2, 5)), np.zeros((3, 2))
    for ids in (np.array([0, 5]), np.array([[-1, 2]])):
        with pytest.raises(EmbeddingIndexError, match="model.embed_tokens"):
            forward(ids, W, A, B, 1.0, module="model.embed_tokens")
        with pytest.raises(EmbeddingIndexError, match="model.embed_tokens"):
            backward(ids, np.zeros(ids.shape + (3,)), W, A, B, 1.0, module="model.embed_tokens")
    with pytest.raises(DTypeError, match="model.embed_tokens"):
        forward(np.array([0.0, 1.0]), W, A, B, 1.0, module="model.embed_tokens")
    for bad_A, bad_B in [(np.zeros((2, 4)), B), (A, np.zeros((4, 2))), (A, np.zeros((3, 3)))]:
        with pytest.raises(ShapeError, match="model.embed_tokens"):
            forward(np.array([0]), W, bad_A, bad_B, 1.0, module="model.embed_tokens")
    with pytest.raises(ShapeError, match="model.embed_tokens"):
        EmbeddingDelta(np.zeros((2, 5)), np.zeros((3, 4)), 1.0, module="model.embed_tokens")
