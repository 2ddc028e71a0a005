"""Linear LoRA forward and backward against an exact rational oracle, within derived bounds.

Oracle: every input (a float of any storage dtype) is converted exactly to a Fraction and the
SPEC 2.3 formula is evaluated in exact arithmetic (NumPy object arrays of Fractions):

    y = x W^T + b + s ((x ∘ m) A^T) B^T + s·lora_bias

Bound (the reference widens inputs exactly to float64, evaluates there, rounds once to t):
float64 evaluation of a sum of products in which every term passes through at most K
roundings has |ŷ64 − y| ≤ γ_K(u64)·M, with γ_K(u) = K·u / (1 − K·u) and M the same
expression with every input replaced by its absolute value (computed exactly by the oracle
on |inputs|); rounding once to t adds u_t·|ŷ64| plus half the smallest subnormal η_t/2. So

    |ŷ − y| ≤ u_t·|y| + (1 + u_t)·γ_K(u64)·M + η_t/2.

Backward: L = Σ dy ∘ y is affine in each single input coordinate (y is linear in x, W, A, B,
b and lora_bias separately), so the central difference (L(v + e) − L(v − e)) / 2 with a
unit step is exactly ∂L/∂v; evaluated with the rational oracle it is the exact gradient. The
reference's gradients are held to the same kind of bound, with M from the oracle on |inputs|.

Observed errors are recorded in units of the bound and printed at the end of the module.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_ref.config import lora_scale
from lora_ref.dropout import dropout_mask
from lora_ref.dtypes import bits_of, float64, resolve_dtype
from lora_ref.errors import ConfigError, DTypeError, LoraRefError, ShapeError
from lora_ref.linear import LinearDelta, backward, forward
from lora_ref.numerics import exact, rank_one_sum, to_float

from helpers import absolute, error_log, exact_case, linear_cases, oracle_of, rounding_bound

LOG, _print_errors = error_log("Linear forward/backward vs exact oracle")


# -- the exact oracle ----------------------------------------------------------------------------


def run_forward(case: dict, **overrides) -> np.ndarray:
    c = {**case, **overrides}
    return forward(c["x"], c["W"], c["A"], c["B"], c["s"], bias=c["bias"], lora_bias=c["lora_bias"],
                   dropout_mask=c["mask"], fan_in_fan_out=c["fan_in_fan_out"], out_dtype=c.get("out_dtype"))


def forward_depth(case: dict) -> int:
    """Roundings a term of y sees in float64: n (dot over in) + 1 (mask) + r (dot over r) + 1 (s) + 3 adds."""
    return case["A"].shape[1] + case["A"].shape[0] + 5


# -- forward ---------------------------------------------------------------------------------------


@given(case=linear_cases())
def test_forward_matches_exact_oracle(case: dict) -> None:
    e = exact_case(case)
    want = to_float(oracle_of(e))
    magnitude = to_float(oracle_of(absolute(e)))
    _assume_no_overflow(want, magnitude, case["dtype"])
    got = run_forward(case)
    assert got.dtype == case["dtype"] and got.shape == want.shape
    LOG.check(_label("forward", case["dtype"]), got, want, rounding_bound(want, magnitude, forward_depth(case), case["dtype"]))
    # out_dtype=float64: the unrounded float64 evaluation, within γ_K(u64)·M
    got64 = run_forward(case, out_dtype="float64")
    LOG.check("forward out_dtype=float64", got64, want, rounding_bound(want, magnitude, forward_depth(case), float64))


def _label(what: str, dtype: np.dtype) -> str:
    from lora_ref.dtypes import dtype_name

    return f"{what} {dtype_name(dtype)}"


@given(case=linear_cases(), pad=st.integers(1, 4))
def test_zero_padding_the_rank_changes_nothing(case: dict, pad: int) -> None:
    """Zero rows in A and zero columns in B: the exact result is unchanged, so the padded
    reference must meet the unpadded oracle's bound; the delta (fixed order, SPEC 3.1) adds
    exact zeros and is bitwise unchanged; the padding's own gradients are exactly zero.

    (The forward is not compared bit for bit: it uses BLAS, whose float64 summation order may
    change with the rank, and SPEC 2.3 only asks for the bound.)"""
    A, B = case["A"], case["B"]
    r = A.shape[0]
    A_pad = np.concatenate([A, np.zeros((pad, A.shape[1]), A.dtype)])
    B_pad = np.concatenate([B, np.zeros((B.shape[0], pad), B.dtype)], axis=1)
    e = exact_case(case)
    want, magnitude = to_float(oracle_of(e)), to_float(oracle_of(absolute(e)))
    _assume_no_overflow(want, magnitude, case["dtype"])
    bound = rounding_bound(want, magnitude, forward_depth(case) + pad, case["dtype"])
    LOG.check(_label("forward zero-padded rank", case["dtype"]), run_forward(case, A=A_pad, B=B_pad), want, bound)
    d = LinearDelta(A, B, case["s"], fan_in_fan_out=case["fan_in_fan_out"]).full()
    d_pad = LinearDelta(A_pad, B_pad, case["s"], fan_in_fan_out=case["fan_in_fan_out"]).full()
    assert np.array_equal(bits_of(d), bits_of(d_pad))
    g_pad = backward(case["x"], case["dy"], case["W"], A_pad, B_pad, case["s"], dropout_mask=case["mask"],
                     fan_in_fan_out=case["fan_in_fan_out"])
    # dA's padding rows are s (dY B_pad)^T X over zero columns of B; dB's padding columns are
    # s dY^T (X A_pad^T) over zero rows of A: sums of exact zeros
    assert not np.any(g_pad.dA[r:].astype(float64)) and not np.any(g_pad.dB[:, r:].astype(float64))


def _assume_no_overflow(want: np.ndarray, magnitude: np.ndarray, dtype: np.dtype) -> None:
    """The bounds hold without overflow; cases whose result could reach the dtype's range are dropped."""
    finite_max = float(np.finfo(dtype).max) if dtype != resolve_dtype("bfloat16") else 3.3895313892515355e38
    assume(np.all(magnitude < finite_max / 2))


def test_forward_examples_alpha_not_r_and_rslora() -> None:
    # small integers: every intermediate is exact, so the result is exact in every dtype
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    A = np.array([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])  # r = 4
    B = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    s = lora_scale(4, 8)  # alpha / r = 2
    assert s == 2.0 and lora_scale(4, 8, use_rslora=True) == 4.0
    for name in ("float32", "float16", "bfloat16"):
        dtype = resolve_dtype(name)
        y = forward(x.astype(dtype), W.astype(dtype), A.astype(dtype), B.astype(dtype), s)
        # x W^T = [1, 2, 3]; x A^T = [3, 4, 1, 0]; B picks [3, 4, 1]; times s = 2 -> [6, 8, 2]
        assert y.dtype == dtype and y.astype(float64).tolist() == [[7.0, 10.0, 5.0]]


def test_dropout_mask_is_reproducible_and_inverted() -> None:
    m1, m2 = dropout_mask((4, 64), 0.25, 7), dropout_mask((4, 64), 0.25, np.random.default_rng(7))
    assert np.array_equal(m1, m2)
    assert set(np.unique(m1)) <= {0.0, 1 / (1 - 0.25)} and 0 < np.count_nonzero(m1 == 0) < m1.size
    assert np.array_equal(dropout_mask((2, 3), 0.0, 1), np.ones((2, 3)))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError):
            dropout_mask((2,), p, 0)


def test_dropout_only_on_the_lora_path() -> None:
    rng = np.random.default_rng(0)
    x, W, A, B = rng.normal(size=(2, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
    zero = np.zeros_like(x)
    # an all-zero mask removes the LoRA path and leaves the base path
    assert np.allclose(forward(x, W, A, B, 3.0, dropout_mask=zero), x @ W.T, rtol=0, atol=1e-14)


# -- backward --------------------------------------------------------------------------------------

GRAD_INPUTS = {"dx": "x", "dA": "A", "dB": "B", "dW": "W", "db": "bias", "dlora_bias": "lora_bias"}


def exact_gradient(e: dict, dy, name: str) -> np.ndarray:
    """∂(Σ dy ∘ y)/∂(e[name]) by central differences with a unit step, in exact arithmetic."""
    v = e[name]
    grad = np.empty(v.shape, dtype=object)
    for index in np.ndindex(v.shape):
        values = []
        for step in (1, -1):
            moved = v.copy()
            moved[index] = moved[index] + step
            values.append(np.sum(dy * oracle_of({**e, name: moved})))
        grad[index] = (values[0] - values[1]) / 2
    return grad


@given(case=linear_cases(max_dim=4))
def test_backward_matches_exact_central_differences(case: dict) -> None:
    # give every case both biases, so db and dlora_bias are checked too (their gradient does not
    # depend on their value)
    n_out = case["B"].shape[0]
    case = {**case, "bias": case["bias"] if case["bias"] is not None else np.zeros(n_out, case["dtype"]),
            "lora_bias": case["lora_bias"] if case["lora_bias"] is not None else np.ones(n_out, case["dtype"])}
    grads = backward(case["x"], case["dy"], case["W"], case["A"], case["B"], case["s"], dropout_mask=case["mask"],
                     fan_in_fan_out=case["fan_in_fan_out"], want_base_grads=True)
    e, dy = exact_case(case), exact(case["dy"])
    abs_e, abs_dy = absolute(e), np.abs(dy)
    rows = int(np.prod(case["x"].shape[:-1]))
    r, n_in = case["A"].shape
    # roundings along any term of any gradient: rows + in + out (dot products) + r + 4 products/adds
    depth = rows + n_in + n_out + r + 4
    for grad_name, input_name in GRAD_INPUTS.items():
        got = getattr(grads, grad_name)
        want = to_float(exact_gradient(e, dy, input_name))
        magnitude = to_float(exact_gradient(abs_e, abs_dy, input_name))
        _assume_no_overflow(want, magnitude, case["dtype"])
        assert got.shape == case[input_name].shape and got.dtype == case[input_name].dtype
        LOG.check(_label(grad_name, case["dtype"]), got, want, rounding_bound(want, magnitude, depth, case["dtype"]))


def test_backward_base_grads_only_on_request_and_their_dtypes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3)).astype(np.float16)
    W, A, B = (rng.normal(size=s).astype(np.float32) for s in ((4, 3), (2, 3), (4, 2)))
    g = backward(x, rng.normal(size=(2, 4)).astype(np.float16), W, A, B, 0.5)
    assert g.dW is None and g.db is None and g.dlora_bias is None
    assert g.dx.dtype == np.float16 and g.dA.dtype == np.float32
    g = backward(x, np.ones((2, 4), np.float16), W, A, B, 0.5, want_base_grads=True, bias_dtype="bfloat16")
    assert g.dW.dtype == np.float32 and g.db.dtype == resolve_dtype("bfloat16")


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"A": np.zeros((2, 4))},  # A's in_features != W's
        {"B": np.zeros((5, 2))},  # B's out_features != W's
        {"B": np.zeros((4, 3))},  # rank mismatch between A and B
        {"x": np.zeros((2, 4))},
        {"W": np.zeros((4, 3, 1))},
        {"A": np.zeros(3)},
        {"bias": np.zeros(5)},
        {"lora_bias": np.zeros((4, 1))},
        {"dropout_mask": np.ones((2, 2))},
    ],
    ids=["A-in", "B-out", "rank", "x", "W-3d", "A-1d", "bias", "lora_bias", "mask"],
)
def test_shape_errors(change: dict) -> None:
    args = {"x": np.zeros((2, 3)), "W": np.zeros((4, 3)), "A": np.zeros((2, 3)), "B": np.zeros((4, 2))}
    kwargs = {k: change.pop(k) for k in ("bias", "lora_bias", "dropout_mask") if k in change}
    args.update(change)
    with pytest.raises(ShapeError) as info:
        forward(args["x"], args["W"], args["A"], args["B"], 1.0, **kwargs)
    assert isinstance(info.value, LoraRefError)


def test_rank_mismatch_message_names_module() -> None:
    with pytest.raises(ShapeError, match="q_proj.*rank mismatch"):
        LinearDelta(np.zeros((2, 3)), np.zeros((4, 3)), 1.0, module="q_proj")


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.float128 if hasattr(np, "float128") else np.int8])
def test_unsupported_dtypes(dtype) -> None:
    with pytest.raises(DTypeError):
        forward(np.zeros((1, 3), dtype), np.zeros((4, 3)), np.zeros((2, 3)), np.zeros((4, 2)), 1.0)
    with pytest.raises(DTypeError):
        LinearDelta(np.zeros((2, 3), dtype), np.zeros((4, 2)), 1.0)


def test_rank_one_sum_fixed_order() -> None:
    # Σ_k left[:, k] ⊗ right[k, :] accumulated in increasing k: check against the explicit loop,
    # with values whose sum depends on the order (1e16 + 1 - 1e16 = 0 but 1e16 - 1e16 + 1 = 1)
    left = np.array([[1e16, 1.0, -1e16]])
    right = np.ones((3, 1))
    assert rank_one_sum(left, right)[0, 0] == ((0.0 + 1e16) + 1.0) + -1e16
