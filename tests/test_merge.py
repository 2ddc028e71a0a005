"""Merge numerics (SPEC section 3): the delta's fixed evaluation order, merged forward vs LoRA
forward, the fast round-trip bound, the exact round trip bit for bit with special values,
residual checksums, block-size independence, and the row-blocked merge's memory."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_ref.config import lora_scale
from lora_ref.dtypes import BITS_VIEW, SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bits_of, float64, resolve_dtype, round_to
from lora_ref.errors import LoraRefError, NonFiniteError, ResidualMismatchError, ShapeError
from lora_ref.linear import LinearDelta
from lora_ref.merge import fast_roundtrip_bound, merge, unmerge
from lora_ref.numerics import exact, gamma, to_float

from helpers import error_log, exact_case, finite_max, linear_cases, oracle_of

pytestmark = pytest.mark.usefixtures("kernel_path")  # on the NumPy and the numba evaluation (conftest.py)

STORAGE = ["float32", "float16", "bfloat16"]
U64 = UNIT_ROUNDOFF[float64]
LOG, _print_errors = error_log("Merge numerics")


@st.composite
def weight_and_delta(draw: st.DrawFn, dtypes=STORAGE, special: bool = False, max_dim: int = 6):
    """W (any bit pattern when ``special``: NaN payloads, ±inf, -0, subnormals) and a LinearDelta.

    The delta's magnitude relative to W ranges over 2^-12 .. 2^12; with ``special`` some
    elements of W sit at the largest finite value with a large positive delta, so they
    overflow to +inf when merged.
    """
    dtype = resolve_dtype(draw(st.sampled_from(dtypes)))
    out_f, in_f, r = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)), draw(st.integers(1, 4))
    fan_in_fan_out = draw(st.booleans())
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w_scale = 2.0 ** draw(st.integers(-20, 4))
    d_scale = w_scale * 2.0 ** draw(st.integers(-12, 12))
    if special:
        width = BITS_VIEW[dtype].itemsize * 8
        raw = draw(st.lists(st.integers(0, 2**width - 1), min_size=out_f * in_f, max_size=out_f * in_f))
        W = np.array(raw, dtype=BITS_VIEW[dtype]).view(dtype).reshape(shape)
        if draw(st.booleans()):  # values where W + Δ overflows to +inf
            W.reshape(-1)[:: max(1, W.size // 3)] = finite_max(dtype)
            d_scale = max(d_scale, finite_max(dtype) / 4)
    else:
        W = round_to(rng.normal(0, w_scale, shape), dtype)
    A = round_to(rng.normal(0, 1, (r, in_f)), dtype)
    B = round_to(np.abs(rng.normal(0, 1, (out_f, r))) if special else rng.normal(0, 1, (out_f, r)), dtype)
    s = lora_scale(r, draw(st.integers(1, 64)), draw(st.booleans())) * d_scale
    if special and d_scale > 1:
        A = np.abs(A)  # Δ >= 0, so the max-valued elements really overflow
    return W, LinearDelta(A, B, s, fan_in_fan_out=fan_in_fan_out, module="layer.q_proj")


# -- the delta's fixed order -------------------------------------------------------------------------


@given(data=weight_and_delta(dtypes=STORAGE + ["float64"]))
def test_delta_is_the_documented_python_loop_bit_for_bit(data) -> None:
    # SPEC 3.2 fixed-order/1: Σ_k B[:, k] ⊗ A[k, :] accumulated in increasing k, one multiply and one add per
    # term, then times s. Python floats are IEEE binary64 without fused multiply-add.
    _, delta = data
    A, B = delta.A.astype(float64).tolist(), delta.B.astype(float64).tolist()
    out_f, in_f, r = len(B), len(A[0]), len(A)
    loop = [[0.0] * in_f for _ in range(out_f)]
    for k in range(r):
        for i in range(out_f):
            for j in range(in_f):
                loop[i][j] = loop[i][j] + B[i][k] * A[k][j]
    want = np.array([[v * delta.scale for v in row] for row in loop])
    if delta.fan_in_fan_out:
        want = want.T
    assert np.array_equal(bits_of(delta.full()), bits_of(want))


@given(data=weight_and_delta(special=True), cuts=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       block_bytes=st.sampled_from([1, 8, 24, 100, 10**7]))
def test_delta_and_merge_do_not_depend_on_blocks(data, cuts, block_bytes) -> None:
    W, delta = data
    pieces, start = [], 0
    for step in cuts * W.shape[0]:
        if start >= W.shape[0]:
            break
        pieces.append(delta.block(slice(start, min(start + step, W.shape[0]))))
        start += step
    if start < W.shape[0]:
        pieces.append(delta.block(slice(start, W.shape[0])))
    assert np.array_equal(bits_of(np.concatenate(pieces)), bits_of(delta.full()))
    one = merge(W, delta, exact=True, allow_nonfinite=True)
    blocked = merge(W, delta, exact=True, allow_nonfinite=True, block_bytes=block_bytes)
    assert np.array_equal(bits_of(one.weight), bits_of(blocked.weight))
    assert np.array_equal(one.residual.indices, blocked.residual.indices)
    assert np.array_equal(bits_of(one.residual.values), bits_of(blocked.residual.values))
    assert one.residual.merged_digest == blocked.residual.merged_digest


# -- merged forward == LoRA forward ------------------------------------------------------------------


@given(case=linear_cases(dtypes=STORAGE))
def test_merged_forward_equals_lora_forward_within_bound(case: dict) -> None:
    """y_merged = x W'^T with W' = round_t(W + Δ); y = x (W + s B A)^T exactly (no dropout).

    Elementwise |W' − (W + sBA)| ≤ u_t |W + sBA| + (1 + u_t) γ_{r+2}(u64) (|W| + |s||B||A|) + η_t/2:
    Δ is r products and r sums then one multiply by s, the add W + Δ one more float64 rounding,
    then one rounding to t. So |y_merged − y| ≤ Σ_i |x_i| · that bound_ji (exact sums here).
    """
    case = {**case, "mask": None, "bias": None, "lora_bias": None}
    dtype, W, A, B, s = case["dtype"], case["W"], case["A"], case["B"], case["s"]
    delta = LinearDelta(A, B, s, fan_in_fan_out=case["fan_in_fan_out"])
    merged = merge(W, delta).weight
    assert merged.dtype == dtype
    e = exact_case(case)
    want = oracle_of(e)  # exact LoRA forward
    W_oi = lambda m: m.T if case["fan_in_fan_out"] else m  # noqa: E731
    got = e["x"] @ W_oi(exact(merged)).T  # exact merged forward
    r = A.shape[0]
    exact_sum = W_oi(e["W"]) + (e["B"] @ e["A"]) * e["s"]
    magnitude = np.abs(W_oi(e["W"])) + (np.abs(e["B"]) @ np.abs(e["A"])) * abs(e["s"])
    u_t, eta = Fraction(UNIT_ROUNDOFF[dtype]), Fraction(SMALLEST_SUBNORMAL[dtype])
    g = Fraction(gamma(r + 2, U64))
    assume(np.all(to_float(magnitude) < finite_max(dtype) / 2))
    element_bound = np.abs(exact_sum) * u_t + magnitude * ((1 + u_t) * g) + eta / 2
    bound = np.abs(e["x"]) @ element_bound.T
    LOG.check(f"merged forward vs LoRA forward {dtype_label(dtype)}", to_float(got), to_float(want),
              to_float(bound) * (1 + 4 * U64))  # to_float rounds each side once


def dtype_label(dtype: np.dtype) -> str:
    from lora_ref.dtypes import dtype_name

    return dtype_name(dtype)


# -- fast round trip ------------------------------------------------------------------------------------


@given(data=weight_and_delta())
def test_fast_round_trip_within_derived_bound(data) -> None:
    """Re-derived here. Let d be the float64 Δ merge and unmerge both use, ũ = u_t + u_64(1 + u_t).
    One float64 add/subtract then one rounding to t is z(1 + ε) + e, |ε| ≤ ũ, |e| ≤ η_t/2
    (ε from the normal range, e the subnormal floor). So W' = (W + d)(1 + ε₁) + e₁ and
    V = (W' − d)(1 + ε₂) + e₂ = W + (W + d)ε₁ + e₁ + (W + (W + d)ε₁ + e₁)ε₂ + e₂, hence

        |V − W| ≤ ũ(1 + ũ)|W + d| + ũ|W| + (1 + ũ/2)·η_t      (no overflow of W + d).

    merge.fast_roundtrip_bound states (1 + ũ)·η_t for the last term: at least ours."""
    W, delta = data
    dtype = W.dtype
    d = delta.full()
    assume(np.all(np.abs(W.astype(float64)) + np.abs(d) < finite_max(dtype) / 2))
    restored = unmerge(merge(W, delta).weight, delta)
    u = UNIT_ROUNDOFF[dtype] + U64 * (1 + UNIT_ROUNDOFF[dtype])
    W64 = W.astype(float64)
    ours = u * (1 + u) * np.abs(W64 + d) + u * np.abs(W64) + (1 + u / 2) * SMALLEST_SUBNORMAL[dtype]
    ours *= 1 + 4 * U64  # evaluating the bound itself in float64
    assert np.all(fast_roundtrip_bound(W, d) >= ours * (1 - 8 * U64))
    LOG.check(f"fast round trip {dtype_label(dtype)}", restored, W64, ours)


# -- exact round trip ---------------------------------------------------------------------------------


@given(data=weight_and_delta(special=True))
def test_exact_round_trip_is_bitwise_with_special_values(data) -> None:
    W, delta = data
    before = W.copy()
    result = merge(W, delta, exact=True, allow_nonfinite=True)
    assert np.array_equal(bits_of(W), bits_of(before))  # the input is not modified
    restored = unmerge(result.weight, delta, residual=result.residual)
    assert restored.dtype == W.dtype and np.array_equal(bits_of(restored), bits_of(W))
    # the residual holds exactly the elements a fast unmerge gets wrong (bitwise), with W's bits
    fast = unmerge(result.weight, delta)
    wrong = np.flatnonzero(bits_of(fast).reshape(-1) != bits_of(W).reshape(-1))
    assert np.array_equal(result.residual.indices, wrong)
    assert np.array_equal(bits_of(result.residual.values), bits_of(W).reshape(-1)[wrong])


@pytest.mark.parametrize("dtype", STORAGE)
def test_exact_round_trip_named_special_values(dtype: str) -> None:
    t = resolve_dtype(dtype)
    width = BITS_VIEW[t].itemsize * 8
    sign = 1 << (width - 1)
    exp_mask = {32: 0x7F800000, 16: 0x7C00 if t == np.float16 else 0x7F80}[width]
    special_bits = [
        exp_mask | 1, exp_mask | 0x15, sign | exp_mask | 3,  # NaNs with payloads, a negative NaN
        exp_mask, sign | exp_mask,  # ±inf
        0, sign,  # ±0
        1, sign | 2, 0x3F,  # subnormals
        exp_mask - 1,  # the largest finite: overflows with a positive Δ
        sign | (exp_mask - 1),
    ]
    W = np.array(special_bits * 2, dtype=BITS_VIEW[t]).view(t).reshape(4, 6)
    A = np.ones((1, 6), t)
    B = np.array([[0.5], [0.5], [-1e-3], [0.0]]).astype(t)
    delta = LinearDelta(A, B, finite_max(t) / 2)  # huge: overflows and swamps small elements
    result = merge(W, delta, exact=True)
    with np.errstate(invalid="ignore"):  # widening signalling NaNs
        overflowed = np.isinf(result.weight.astype(float64)) & np.isfinite(W.astype(float64))
    assert overflowed[:2].any()  # the largest finite value plus Δ > 0 overflowed to +inf
    restored = unmerge(result.weight, delta, residual=result.residual)
    assert np.array_equal(bits_of(restored), bits_of(W))
    assert result.residual.count > 0


# -- residual checks ----------------------------------------------------------------------------------


def _small_case(dtype: str = "bfloat16"):
    rng = np.random.default_rng(3)
    t = resolve_dtype(dtype)
    W = round_to(rng.normal(size=(8, 6)), t)
    delta = LinearDelta(round_to(rng.normal(size=(2, 6)), t), round_to(rng.normal(size=(8, 2)), t), 4.0, module="m.q")
    return W, delta


def test_residual_refuses_another_adapter() -> None:
    W, delta = _small_case()
    result = merge(W, delta, exact=True)
    other_B = delta.B.copy()
    other_B[0, 0] = round_to(np.array(other_B[0, 0].astype(float64) + 1.0), other_B.dtype)
    for other in (LinearDelta(delta.A, other_B, delta.scale, module="m.q"),
                  LinearDelta(delta.A, delta.B, delta.scale * 2, module="m.q")):
        with pytest.raises(ResidualMismatchError, match="another adapter"):
            unmerge(result.weight, other, residual=result.residual)


def test_residual_refuses_another_weight() -> None:
    W, delta = _small_case()
    result = merge(W, delta, exact=True)
    tampered = result.weight.copy()
    tampered.view(np.uint16)[0, 0] ^= 1
    with pytest.raises(ResidualMismatchError, match="another merged weight"):
        unmerge(tampered, delta, residual=result.residual)
    W16, delta16 = _small_case("float16")
    with pytest.raises(ResidualMismatchError):  # same shape, other dtype
        unmerge(merge(W16, delta16).weight, delta16, residual=result.residual)


def test_nonfinite_adapter_refused_unless_allowed() -> None:
    W, delta = _small_case("float32")
    for bad in (np.nan, np.inf):
        B = delta.B.copy()
        B[1, 1] = bad
        broken = LinearDelta(delta.A, B, 1.0, module="m.q")
        with pytest.raises(NonFiniteError, match="m.q"):
            merge(W, broken)
        result = merge(W, broken, exact=True, allow_nonfinite=True)
        assert np.array_equal(bits_of(unmerge(result.weight, broken, residual=result.residual)), bits_of(W))


def test_shape_and_dtype_mismatch() -> None:
    W, delta = _small_case()
    with pytest.raises(ShapeError, match="m.q"):
        merge(W[:, :5], delta)
    with pytest.raises(LoraRefError):
        merge(W.astype(np.int32), delta)


def test_merge_in_place_reads_before_writing() -> None:
    W, delta = _small_case("float16")
    copy = W.copy()
    expected = merge(copy, delta, exact=True)
    result = merge(W, delta, exact=True, out=W, block_bytes=16)
    assert result.weight is W and np.array_equal(bits_of(W), bits_of(expected.weight))
    assert np.array_equal(expected.residual.indices, result.residual.indices)
    unmerge(W, delta, residual=result.residual, out=W, block_bytes=16)
    assert np.array_equal(bits_of(W), bits_of(copy))


# -- memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact_mode", [False, True], ids=["fast", "exact"])
def test_row_blocked_merge_peak_memory(exact_mode: bool) -> None:
    """A 4096 x 1024 bfloat16 weight (8 MiB; a float64 copy is 32 MiB) merged in place with
    1 MiB float64 blocks. The extra memory is at most 8 block-sized temporaries (W's block copy,
    its float64 widening, Δ's accumulator and one outer product, s·Δ, the sum, rounding
    scratch; in exact mode the widened merged block and the difference replace freed ones),
    so the peak must stay under 8 MiB: a quarter of one float64 copy of the matrix."""
    rng = np.random.default_rng(0)
    t = resolve_dtype("bfloat16")
    W = round_to(rng.normal(size=(4096, 1024)), t)
    delta = LinearDelta(round_to(rng.normal(size=(16, 1024)), t), round_to(rng.normal(size=(4096, 16)), t), 0.01)
    float64_copy = W.size * 8
    tracemalloc.start()
    try:
        merge(W, delta, exact=exact_mode, out=W, block_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    LOG.worst[f"merge peak / float64 copy ({'exact' if exact_mode else 'fast'})"] = peak / float64_copy
    assert peak < float64_copy / 4, f"peak {peak / 2**20:.1f} MiB vs float64 copy {float64_copy / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", STORAGE)
def test_threads_do_not_change_bits(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Blocks run in threads (merge.MAX_THREADS); each block's arithmetic is fixed, so the merged
    weight, the residual and the unmerged weight are bitwise the same for 1, 3 or 8 threads."""
    import importlib

    merge_module = importlib.import_module("lora_ref.merge")  # the attribute lora_ref.merge is the function

    t = resolve_dtype(dtype)
    rng = np.random.default_rng(6)
    W = round_to(rng.normal(size=(96, 40)), t)
    delta = LinearDelta(round_to(rng.normal(size=(5, 40)), t), round_to(rng.normal(size=(96, 5)), t), 0.75)
    results = []
    for threads in (1, 3, 8):
        monkeypatch.setattr(merge_module, "MAX_THREADS", threads)
        merged = merge(W, delta, exact=True, block_bytes=8 * 40 * 4)  # 4-row budget: many blocks
        restored = unmerge(merged.weight, delta, residual=merged.residual, block_bytes=8 * 40 * 4)
        results.append((bits_of(merged.weight), merged.residual.indices, bits_of(merged.residual.values)))
        assert np.array_equal(bits_of(restored), bits_of(W))
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
