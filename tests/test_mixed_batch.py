"""Mixed-batch LoRA (SPEC M.1): routed forward/backward against per-adapter runs, the stacked bank,
finite differences, independence of adapters, and bad routing input.

Tolerances. Every compared quantity is a sum of products evaluated in float64 by two different
routes (grouped vs per-adapter vs stacked bank: different BLAS blockings). Each route is within
γ_n · P of the exact value, where P is the same expression evaluated on absolute values and n
the longest chain of roundings (inner length + rank + the few additions), γ_n = n·u/(1 − n·u),
u = 2^-53. Two routes therefore differ by at most 2·γ_n·P elementwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import Adapter, LoraModule
from lora_ref.config import LoraConfig
from lora_ref.dropout import dropout_mask
from lora_ref.errors import ConfigError, LoraRefError, ShapeError
from lora_ref.linear import backward, forward
from lora_ref.mixed_batch import (
    LoraFactors,
    RoutingError,
    StackedBank,
    active_forward,
    check_index,
    factors_for,
    mixed_backward,
    mixed_forward,
)
from lora_ref.numerics import gamma

U64 = 2.0**-53


def make_case(seed: int, n_adapters: int, batch: int, seq: int, d_in: int, d_out: int, dtype=np.float32):
    """Random W, bias, x [batch, seq, d_in], N adapters of ranks 1..4 (some absent) and an index."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d_out, d_in)).astype(dtype)
    bias = rng.normal(size=d_out).astype(dtype)
    x = rng.normal(size=(batch, seq, d_in)).astype(dtype)
    factors: list[LoraFactors | None] = []
    for i in range(n_adapters):
        if i > 0 and rng.random() < 0.2:
            factors.append(None)  # adapter that does not target this layer
            continue
        r = int(rng.integers(1, 5))
        factors.append(LoraFactors(rng.normal(size=(r, d_in)).astype(dtype), rng.normal(size=(d_out, r)).astype(dtype),
                                   float(rng.uniform(-3, 3))))
    index = rng.integers(-1, n_adapters, size=batch)
    return W, bias, x, factors, index


case_params = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 9), st.integers(1, 3), st.integers(1, 7), st.integers(1, 6)
)


def abs_forward(x, W, bias, factors, index):
    """P: the forward evaluated on absolute values (the error bound's magnitude term)."""
    absf = [None if f is None else LoraFactors(np.abs(f.A), np.abs(f.B), abs(f.scale)) for f in factors]
    return mixed_forward(np.abs(x).astype(np.float64), np.abs(W), absf, index, bias=np.abs(bias), out_dtype=np.float64)


def r_max(factors) -> int:
    return max((f.A.shape[0] for f in factors if f is not None), default=0)


@given(case_params, st.booleans(), st.sampled_from([0.0, 0.25, 0.5]))
def test_mixed_forward_equals_per_adapter_runs(params, fan_in_fan_out, p):
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out)
    W_stored = W.T.copy() if fan_in_fan_out else W  # GPT-2 Conv1D layout [in, out]
    mask = dropout_mask(x.shape, p, seed)
    y = mixed_forward(x, W_stored, factors, index, bias=bias, dropout_mask=mask, fan_in_fan_out=fan_in_fan_out,
                      out_dtype=np.float64)
    expected = np.empty_like(y)
    for b in range(batch):  # oracle: the single-adapter forward of lora_ref.linear, row by row
        f = factors[index[b]] if index[b] >= 0 else None
        if f is None:
            expected[b] = x[b].astype(np.float64) @ W.astype(np.float64).T + bias
        else:
            expected[b] = forward(x[b], W_stored, f.A, f.B, f.scale, bias=bias, dropout_mask=mask[b],
                                  fan_in_fan_out=fan_in_fan_out, out_dtype=np.float64)
    bound = 2 * gamma(d_in + r_max(factors) + 3, U64) * abs_forward(x * mask.max(initial=1.0), W, bias, factors, index)
    assert np.all(np.abs(y - expected) <= bound)


@given(case_params, st.integers(0, 3))
def test_stacked_bank_equals_grouped_and_padding_is_invisible(params, extra):
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out)
    grouped = mixed_forward(x, W, factors, index, bias=bias, out_dtype=np.float64)
    bound = 2 * gamma(d_in + r_max(factors) + extra + 3, U64) * abs_forward(x, W, bias, factors, index)
    tight = StackedBank.from_factors(factors, d_out, d_in)
    padded = StackedBank.from_factors(factors, d_out, d_in, r_max=r_max(factors) + extra)
    assert padded.A.shape[1] == r_max(factors) + extra
    for bank in (tight, padded):
        y = bank.forward(x, W, index, bias=bias, out_dtype=np.float64)
        assert np.all(np.abs(y - grouped) <= bound)


@given(case_params)
def test_output_dtype_is_one_rounding_of_the_float64_result(params):
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out)
    y32 = mixed_forward(x, W, factors, index, bias=bias)
    y64 = mixed_forward(x, W, factors, index, bias=bias, out_dtype=np.float64)
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(y32, y64.astype(np.float32))


def abs_grads(x, dy, W, factors, index):
    absf = [None if f is None else LoraFactors(np.abs(f.A), np.abs(f.B), abs(f.scale)) for f in factors]
    return mixed_backward(np.abs(x).astype(np.float64), np.abs(dy), np.abs(W).astype(np.float64), absf, index)


@given(case_params)
def test_mixed_backward_equals_per_adapter_backward_on_own_rows(params):
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out, dtype=np.float64)
    dy = np.random.default_rng(seed + 1).normal(size=(batch, seq, d_out))
    g = mixed_backward(x, dy, W, factors, index)
    P = abs_grads(x, dy, W, factors, index)
    n_chain = batch * seq + d_in + d_out + r_max(factors) + 3
    for i, f in enumerate(factors):
        if f is None:
            assert g.dA[i] is None and g.dB[i] is None
            continue
        rows = np.flatnonzero(index == i)
        if rows.size == 0:  # an adapter with no rows gets exactly zero gradients
            assert not g.dA[i].any() and not g.dB[i].any()
            continue
        ref = backward(x[rows], dy[rows], W, f.A, f.B, f.scale)
        assert np.all(np.abs(g.dA[i] - ref.dA) <= 2 * gamma(n_chain, U64) * P.dA[i])
        assert np.all(np.abs(g.dB[i] - ref.dB) <= 2 * gamma(n_chain, U64) * P.dB[i])
        assert np.all(np.abs(g.dx[rows] - ref.dx) <= 2 * gamma(n_chain, U64) * P.dx[rows])


@given(case_params)
def test_gradients_come_only_from_own_rows(params):
    """Changing x and dy on every row *not* routed to adapter i leaves dA_i, dB_i bit-identical."""
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out, dtype=np.float64)
    rng = np.random.default_rng(seed + 2)
    dy = rng.normal(size=(batch, seq, d_out))
    g = mixed_backward(x, dy, W, factors, index)
    for i, f in enumerate(factors):
        if f is None:
            continue
        others = index != i
        x2, dy2 = x.copy(), dy.copy()
        x2[others] = rng.normal(size=x2[others].shape)
        dy2[others] = rng.normal(size=dy2[others].shape)
        g2 = mixed_backward(x2, dy2, W, factors, index)
        np.testing.assert_array_equal(g2.dA[i], g.dA[i])
        np.testing.assert_array_equal(g2.dB[i], g.dB[i])


@given(case_params)
def test_routed_gradients_match_finite_differences(params):
    """L = <dy, y> is affine in each A_i (and each B_i), so the central difference with step 1 has no
    truncation error: |FD − <dA_i, E>| is bounded by the float64 evaluation errors of the two L values
    (γ_n each, times L on absolute values) plus that of the inner product with dA_i."""
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, index = make_case(seed, n, batch, seq, d_in, d_out, dtype=np.float64)
    rng = np.random.default_rng(seed + 3)
    dy = rng.normal(size=(batch, seq, d_out))
    g = mixed_backward(x, dy, W, factors, index)
    n_chain = d_in + d_out + r_max(factors) + batch * seq * d_out + 3

    def loss_and_abs(fs):
        y = mixed_forward(x, W, fs, index, bias=bias, out_dtype=np.float64)
        return float(np.sum(dy * y)), float(np.sum(np.abs(dy) * abs_forward(x, W, bias, fs, index)))

    for i, f in enumerate(factors):
        if f is None:
            continue
        for field, grad in (("A", g.dA[i]), ("B", g.dB[i])):
            E = rng.normal(size=grad.shape)
            plus, minus = list(factors), list(factors)
            base = getattr(f, field)
            plus[i] = LoraFactors(**{**f.__dict__, field: base + E})
            minus[i] = LoraFactors(**{**f.__dict__, field: base - E})
            (lp, ap), (lm, am) = loss_and_abs(plus), loss_and_abs(minus)
            fd = (lp - lm) / 2
            directional = float(np.sum(grad * E))
            tol = gamma(n_chain, U64) * (ap + am) + 2 * gamma(n_chain, U64) * float(np.sum(np.abs(grad) * np.abs(E)))
            assert abs(fd - directional) <= tol


def test_adapters_of_different_ranks_and_scales_from_adapter_objects():
    rng = np.random.default_rng(0)
    d_in, d_out = 5, 3

    def adapter(r, alpha, rs):
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=["q"])
        return Adapter(cfg, {"q": LoraModule("q", rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)))})

    a, b = adapter(2, 4, False), adapter(3, 3, True)
    fs = factors_for([a, b], "q")
    assert fs[0].scale == 2.0 and fs[1].scale == 3 / np.sqrt(3)
    assert factors_for([a], "k") == [None]
    with_bias = Adapter(a.config, {"q": LoraModule("q", a.modules["q"].A, a.modules["q"].B, lora_bias=np.ones(d_out))})
    assert np.array_equal(factors_for([with_bias], "q")[0].lora_bias, np.ones(d_out))  # carried, not refused
    emb = Adapter(a.config, {"q": LoraModule("q", rng.normal(size=(2, 7)), rng.normal(size=(4, 2)), kind="embedding")})
    with pytest.raises(ConfigError, match="disagree on the layer kind"):
        factors_for([a, emb], "q")


@pytest.mark.parametrize("index", [[0, 2], [0, -2], [0], [0, 1, 1], [[0, 1]], [0.0, 1.0]])
def test_bad_index_is_a_routing_error(index):
    W, bias, x, factors, _ = make_case(0, 2, 2, 1, 3, 2)
    with pytest.raises(RoutingError) as err:
        mixed_forward(x, W, factors, np.asarray(index))
    assert isinstance(err.value, ShapeError) and isinstance(err.value, LoraRefError)
    with pytest.raises(RoutingError):
        StackedBank.from_factors(factors, 2, 3).forward(x, W, np.asarray(index))


def test_bad_shapes_are_typed_errors():
    W, bias, x, factors, index = make_case(0, 2, 3, 1, 4, 2)
    with pytest.raises(ShapeError):
        mixed_forward(x[..., :3], W, factors, index)
    with pytest.raises(ShapeError):
        mixed_backward(x, np.zeros((3, 1, 5)), W, factors, index)
    with pytest.raises(ShapeError):
        StackedBank.from_factors(factors, 2, 4, r_max=0)
    bad = [LoraFactors(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32), 1.0)]
    with pytest.raises(ShapeError):
        mixed_forward(x, W, bad, np.zeros(3, int))
    assert check_index(np.array([], np.int64), 0, 0).shape == (0,)


@given(case_params)
def test_active_stack_equals_forward_through_the_merged_stack(params):
    """y = x W^T + b + Σ_j s_j (x A_j^T) B_j^T against x (W + Σ_j s_j B_j A_j)^T + b, both in float64:
    each within γ_n·P of exact with n = in + Σ r_j + N + 3, so they differ by at most 2·γ_n·P."""
    seed, n, batch, seq, d_in, d_out = params
    W, bias, x, factors, _ = make_case(seed, n, batch, seq, d_in, d_out, dtype=np.float64)
    stack = [f for f in factors if f is not None]
    y = active_forward(x, W, stack, bias=bias)
    merged = W + sum(f.scale * (f.B @ f.A) for f in stack)
    expected = x @ merged.T + bias
    P_W = np.abs(W) + sum(abs(f.scale) * (np.abs(f.B) @ np.abs(f.A)) for f in stack)
    P = np.abs(x) @ P_W.T + np.abs(bias)
    n_chain = d_in + sum(f.A.shape[0] for f in stack) + len(stack) + 3
    assert np.all(np.abs(y - expected) <= 2 * gamma(n_chain, U64) * P)
