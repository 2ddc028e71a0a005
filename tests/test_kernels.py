"""The numba kernels (lora_ref/kernels.py) give bitwise what the NumPy reference path of lora_ref.merge gives.

- the bracket alone: :func:`lora_ref.merge._bracket` with LORA_REF_KERNELS=numpy against =numba on the
  same inputs, adversarial ones (weights from raw bit patterns: ±0, subnormals, ±inf, NaN payloads,
  the largest finite values; products that put y on or next to midpoints of t's grid, onto 0, past
  t's range; zero and huge norms): the undecided masks, and the rounded low ends where decided;
- the kernel that computes the product itself (merge's block, fast and exact): its masks for soundness
  only (its product is not BLAS's, so other rare elements may stay undecided), against the exact
  rational oracle of test_merge_semantics.py: decided elements hold the correctly rounded values and
  the missed positions are exact;
- merge, unmerge, switch and merge_many through the public functions on both paths: merged bits,
  residual indices and values (bitwise, whatever either path left undecided), with exact ties (factors
  of powers of two), special weights, thread counts 1, 2, 8 and several block sizes (and the exact
  round trip on each path); merges past t's range; every kind of ``out`` (written in place or copied);
- the kernels' float16 bit moves against NumPy's for every one of the 2^16 patterns;
- the dispatch: unknown LORA_REF_KERNELS values and =numba without numba are refused; a numba cache
  directory that cannot be written still gives the same bits.
The NumPy path itself is checked against an exact rational oracle in test_merge_semantics.py (which,
like test_merge.py, test_merge_many.py and test_ledger.py, runs on both paths: conftest.kernel_path).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_peer
from test_merge_semantics import oracle_merge
from lora_ref.dtypes import BITS_VIEW, SMALLEST_SUBNORMAL, bits_of, float64, resolve_dtype, round_to, store_exact
from lora_ref.errors import ConfigError
from lora_ref.linear import LinearDelta

merge_module = importlib.import_module("lora_ref.merge")  # the attribute lora_ref.merge is the function
STORAGE = ["float32", "float16", "bfloat16"]
#: (2 − 2^-p)·2^e_max: the midpoint between t's largest finite value and 2^(e_max+1), from which RN_t gives ±inf.
OVERFLOW = {"float32": 2.0**127 * (2 - 2.0**-24), "float16": 2.0**15 * (2 - 2.0**-11), "bfloat16": 2.0**127 * (2 - 2.0**-8)}
#: (2 − 2^(1-p))·2^e_max: t's largest finite value.
LARGEST = {"float32": 2.0**127 * (2 - 2.0**-23), "float16": 2.0**15 * (2 - 2.0**-10), "bfloat16": 2.0**127 * (2 - 2.0**-7)}


@pytest.fixture(scope="module", autouse=True)
def _numba():
    require_peer("numba")


@contextlib.contextmanager
def path(name: str, threads: int | None = None):
    """LORA_REF_KERNELS=name (and merge's MAX_THREADS=threads) inside the block."""
    saved_env, saved_threads = os.environ.get("LORA_REF_KERNELS"), merge_module.MAX_THREADS
    os.environ["LORA_REF_KERNELS"] = name
    if threads is not None:
        merge_module.MAX_THREADS = threads
    try:
        yield
    finally:
        merge_module.MAX_THREADS = saved_threads
        if saved_env is None:
            del os.environ["LORA_REF_KERNELS"]
        else:
            os.environ["LORA_REF_KERNELS"] = saved_env


def special_bits(dtype: np.dtype) -> np.ndarray:
    """Bit patterns at the edges of ``dtype``: ±0, smallest/largest subnormal and normal, largest finite,
    1 and its neighbours, ±inf, quiet and signalling NaNs with payloads."""
    width = dtype.itemsize * 8
    fraction = {4: 23, 2: 10 if dtype == np.float16 else 7}[dtype.itemsize]
    exponent_ones = ((1 << (width - 1 - fraction)) - 1) << fraction
    one = round_to(np.array([1.0]), dtype).view(BITS_VIEW[dtype])[0]
    sign = 1 << (width - 1)
    patterns = [0, 1, (1 << fraction) - 1, 1 << fraction, exponent_ones - 1, int(one) - 1, int(one), int(one) + 1,
                exponent_ones, exponent_ones | 1, exponent_ones | (1 << (fraction - 1)), exponent_ones | ((1 << fraction) - 1)]
    patterns += [p | sign for p in patterns]
    return np.array(patterns, dtype=np.uint64).astype(BITS_VIEW[dtype])


def adversarial_weight(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """A weight of ``dtype``: a mix of ordinary values, raw random bit patterns and :func:`special_bits`."""
    size = int(np.prod(shape))
    ordinary = round_to(rng.normal(0, 1, size) * 2.0 ** rng.integers(-20, 10, size), dtype)
    raw = rng.integers(0, 2 ** (8 * dtype.itemsize), size, dtype=np.uint64).astype(BITS_VIEW[dtype]).view(dtype)
    special = rng.choice(special_bits(dtype), size).view(dtype)
    choice = rng.integers(0, 10, size)
    return np.where(choice < 6, ordinary, np.where(choice < 8, raw, special)).reshape(shape)


def neighbours(values: np.ndarray) -> np.ndarray:
    """The next value of the same dtype away from zero (by bits: ±inf and NaN pass to NaN/other patterns)."""
    bits = bits_of(values).copy()
    bits += np.ones_like(bits)
    return bits.view(values.dtype)


def adversarial_product(rng: np.random.Generator, W: np.ndarray, sign: float) -> np.ndarray:
    """float64 p with y = fl(W ± p) on a midpoint of t's grid (a tie), one float64 step off it, exactly 0,
    at t's overflow threshold, in t's subnormals, or just ordinary."""
    dtype = W.dtype
    with np.errstate(invalid="ignore", over="ignore"):
        w = W.astype(float64)
        midpoint = (w + neighbours(W).astype(float64)) / 2
        step = np.where(rng.integers(0, 2, w.shape) == 1, np.nextafter(midpoint, np.inf), np.nextafter(midpoint, -np.inf))
        overflow = OVERFLOW[dtype.name]
        targets = [midpoint, step, np.zeros_like(w), np.full_like(w, overflow) * np.sign(rng.normal(size=w.shape)),
                   rng.integers(-5, 6, w.shape) * SMALLEST_SUBNORMAL[dtype] / 2, w + rng.normal(0, 1, w.shape) * np.abs(w) * 2.0**-rng.integers(1, 40, w.shape)]
        pick = rng.choice(len(targets), w.shape, p=[0.1, 0.1, 0.05, 0.05, 0.1, 0.6])  # ordinary ones decide
        target = np.choose(pick, targets)
        p = (target - w) * sign
        p = np.where(np.isfinite(p), p, rng.normal(0, 1, w.shape))
    return p


def norms(rng: np.random.Generator, size: int) -> np.ndarray:
    """Nonnegative bound factors from 0 to large (the bracket takes any)."""
    values = np.abs(rng.normal(0, 1, size)) * 2.0 ** np.where(rng.integers(0, 8, size) == 0, rng.integers(-12, 2, size),
                                                              rng.integers(-600, -25, size))
    return np.where(rng.integers(0, 6, size) == 0, 0.0, values)


@pytest.mark.parametrize("dtype", STORAGE)
@given(seed=st.integers(0, 2**32 - 1), sign=st.sampled_from([1.0, -1.0]), stacked=st.booleans())
def test_bracket_matches_the_numpy_path(dtype: str, seed: int, sign: float, stacked: bool) -> None:
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    k, n, c = (3 if stacked else 1), int(rng.integers(1, 9)), int(rng.integers(1, 40))
    W = adversarial_weight(rng, t, (k * n, c)).reshape(k, n, c)
    product = adversarial_product(rng, W, sign)
    left, right = norms(rng, k * n).reshape(k, n), norms(rng, k * c).reshape(k, c)
    if not stacked:
        W, product, left, right = W[0], product[0], left[0], right[0]
    spread = 4 * 2.0**-53
    results = {}
    for name in ("numpy", "numba"):
        with path(name):
            out = np.empty_like(W)
            undecided = merge_module._bracket(W, product.copy(), left, right, spread, sign, merge_module._Workspace(), out,
                                              keep=False).copy()
        results[name] = out, undecided
    (want, want_undecided), (got, got_undecided) = results["numpy"], results["numba"]
    assert np.array_equal(got_undecided, want_undecided)
    assert np.array_equal(bits_of(got)[~want_undecided], bits_of(want)[~want_undecided])
    assert want_undecided.any() or not np.isnan(W.astype(float64)).any()  # NaN is undecided: the values reach it


def tie_case(rng: np.random.Generator, dtype: np.dtype, rows: int, cols: int, rank: int,
             narrow: bool) -> tuple[np.ndarray, LinearDelta]:
    """W adversarial, A and B of powers of two and ordinary values: many elements of W + s·B·A are exact
    ties or exactly representable (the exact resolver runs), others ordinary."""
    W = adversarial_weight(rng, dtype, (rows, cols))
    W = np.where(rng.integers(0, 3, W.shape) == 0, round_to(np.ones(W.shape), dtype), W)
    factor_dtype = dtype if narrow else float64

    def factor(shape):
        powers = 2.0 ** rng.integers(-12, 2, shape) * rng.choice([-1.0, 1.0], shape)
        return round_to(np.where(rng.integers(0, 2, shape) == 0, powers, rng.normal(0, 0.3, shape)), factor_dtype)

    scale = float(rng.choice([1.0, 0.5, 2.0, 0.37]))
    return W, LinearDelta(factor((rank, cols)), factor((rows, rank)), scale, module="tie")


def subnormal_case(rng: np.random.Generator, dtype: np.dtype, rows: int, cols: int, rank: int) -> tuple[np.ndarray, LinearDelta]:
    """W and W + s·L R among t's subnormals and smallest normals: W a multiple of t's subnormal spacing h within
    ±2^(p+1)·h (a quarter of them 0), float32 factors that are powers of two times 2^(e//2) and 2^(e − e//2)
    (h = 2^e), some times 1 ± 2^-18, or ordinary values of that size: products from h·2^-6 to h·2^4, exact
    ties and values 2^-19·h·2^k past a midpoint (below float32's spacing where t is bfloat16: the float32
    bracket's floor must cover its rounding of the product), results of either sign rounding to ±0, and
    the boundary at the smallest normal."""
    spacing = SMALLEST_SUBNORMAL[dtype]
    digits = {np.dtype(np.float32): 24, np.dtype(np.float16): 11}.get(np.dtype(dtype), 8)
    W = rng.integers(-(2**(digits + 1)), 2**(digits + 1), (rows, cols)) * spacing
    W = round_to(np.where(rng.integers(0, 4, W.shape) == 0, 0.0, W), dtype)
    exponent = int(math.log2(spacing))

    def factor(shape, magnitude):
        nudged = np.where(rng.integers(0, 4, shape) == 0, 1 + 2.0**-18 * rng.choice([-1.0, 1.0], shape), 1.0)
        powers = 2.0 ** rng.integers(-3, 3, shape) * rng.choice([-1.0, 1.0], shape) * nudged
        return round_to(np.where(rng.integers(0, 3, shape) == 0, rng.normal(0, 4, shape), powers) * magnitude, np.float32)

    left, right = factor((rows, rank), 2.0 ** (exponent // 2)), factor((rank, cols), 2.0 ** (exponent - exponent // 2))
    left[rng.integers(0, 2, rows) == 0, 1:] = 0  # half the rows one term: a product exactly on or just past a midpoint
    return W, LinearDelta(right, left, float(rng.choice([1.0, 0.5, 0.37])), module="tiny")


def cancelling_case(rng: np.random.Generator, dtype: np.dtype, rows: int, cols: int) -> tuple[np.ndarray, LinearDelta]:
    """W ordinary, float64 factors whose rank terms cancel: L = [g, E, 2^20·a, −2^20·a], R = [h; F; 2^20·b; 2^20·b +
    2^-20·c] (g, h, a, b, c ordinary; E, F 0 to 17 further ordinary terms, which move the cancelling pair across
    the kernel's chunks of eight terms), so X ≈ W + s·(g h + E F − a c) while the sequential float64 sum rounds
    at the scale of 2^40·a b: errors of about 2^-13·|X|, far beyond t's spacing, which only the bound's
    κ·‖L_i‖‖R_j‖ term covers."""
    W = round_to(rng.normal(0, 1, (rows, cols)), dtype)
    extra = int(rng.integers(0, 18))
    g, a = rng.normal(0, 1, (rows, 1 + extra)), rng.normal(0, 1, rows)
    h, b, c = rng.normal(0, 1, (1 + extra, cols)), rng.normal(0, 1, cols), rng.normal(0, 1, cols)
    left = np.concatenate([g, np.stack([2.0**20 * a, -(2.0**20) * a], axis=1)], axis=1)
    right = np.concatenate([h, np.stack([2.0**20 * b, 2.0**20 * b + 2.0**-20 * c])])
    return W, LinearDelta(right, left, float(rng.choice([1.0, 0.37])), module="cancel")


@pytest.mark.parametrize("dtype", STORAGE)
@given(seed=st.integers(0, 2**32 - 1), case=st.sampled_from(["narrow ties", "float64 ties", "cancelling", "subnormal"]),
       exact=st.booleans(), sign=st.sampled_from([1.0, -1.0]), index=st.sampled_from([np.int32, np.int64]))
def test_merge_rows_decides_only_correctly_rounded_values(dtype: str, seed: int, case: str, exact: bool,
                                                         sign: float, index: type) -> None:
    """The kernel that computes the product itself (lora_ref.kernels._merge_rows: a sequential float64 sum, not
    BLAS's; float16 and bfloat16 bracketed in float32 first) may leave other elements undecided than the NumPy path, so its masks are checked for soundness
    against the exact rational oracle of test_merge_semantics.py, not for equality: every element its merge
    bracket decides holds RN_t(W ± s·L R); with ``exact``, every element whose unmerge bracket also decides
    is listed as missed exactly where RN_t(merged ∓ s·L R) differs from W's bits; the coded positions are
    distinct elements of the block, and decided ones are never listed as undecided."""
    from lora_ref import kernels

    t = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    # ranks to 20 and rows to 9: the kernel's product runs four rows and eight terms at a time, with tails of both
    rows, cols, rank = int(rng.integers(1, 10)), int(rng.integers(1, 20)), int(rng.integers(1, 21))
    if case == "cancelling":
        W, delta = cancelling_case(rng, t, rows, cols)
    elif case == "subnormal":
        W, delta = subnormal_case(rng, t, rows, cols, rank)
    else:
        W, delta = tie_case(rng, t, rows, cols, rank, case == "narrow ties")
    plan = merge_module._product(delta, t, merge_module.CORRECTLY_ROUNDED)
    out = np.empty_like(W)
    positions = np.full(W.size, -1, index)  # int32 positions where a block has fewer than 2^30 elements
    missed, unsure = kernels.MERGE_ROWS[t, exact](bits_of(W), plan.left, plan.right, plan.scale, plan.left_norms,
                                                  plan.right_norms, plan.left_norms32, plan.right_norms32, plan.spread,
                                                  sign, out.view(BITS_VIEW[t]), positions)
    coded = positions[W.size - unsure:]
    assert missed + unsure <= W.size and (exact or missed == 0)
    assert np.unique(coded >> 1).size == unsure and ((coded >> 1) < W.size).all() and (coded >= 0).all()
    merge_undecided = np.zeros(W.size, bool)
    merge_undecided[coded[(coded & 1) == 1] >> 1] = True
    assert exact or merge_undecided.sum() == unsure  # fast: every code is the merge's
    want = oracle_merge(W, plan.left, plan.right, plan.scale, int(sign)).reshape(-1)
    decided = ~merge_undecided
    assert np.array_equal(bits_of(out).reshape(-1)[decided], bits_of(want)[decided])
    if exact:
        back_decided = decided.copy()
        back_decided[coded >> 1] = False  # either bracket undecided: the caller resolves them
        back = oracle_merge(out, plan.left, plan.right, plan.scale, -int(sign)).reshape(-1)
        want_missed = np.flatnonzero(back_decided & (bits_of(back) != bits_of(W).reshape(-1)))
        assert np.array_equal(positions[:missed], want_missed)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits_of(a), bits_of(b))


def residuals_equal(a, b) -> bool:
    return a.indices.dtype == b.indices.dtype and np.array_equal(a.indices, b.indices) and bits_equal(a.values, b.values)


@pytest.mark.parametrize("dtype", STORAGE)
@given(seed=st.integers(0, 2**32 - 1), narrow=st.booleans(), threads=st.sampled_from([1, 2, 8]),
       block_bytes=st.sampled_from([64, 1024, 8 * 1024, merge_module.BLOCK_BYTES]))
def test_merge_unmerge_switch_match_the_numpy_path(dtype: str, seed: int, narrow: bool, threads: int,
                                                   block_bytes: int) -> None:
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    rows, cols, rank = int(rng.integers(1, 40)), int(rng.integers(1, 24)), int(rng.integers(1, 21))
    W, old = tie_case(rng, t, rows, cols, rank, narrow)
    new = tie_case(rng, t, rows, cols, rank, narrow)[1]
    runs = {}
    for name in ("numpy", "numba"):
        with path(name, threads):
            fast = merge_module.merge(W, old, block_bytes=block_bytes, allow_nonfinite=True).weight
            exact = merge_module.merge(W, old, exact=True, block_bytes=block_bytes)
            back = merge_module.unmerge(exact.weight, old, residual=exact.residual, block_bytes=block_bytes)
            plain = merge_module.unmerge(exact.weight, old, block_bytes=block_bytes)
            switched = exact.weight.copy()
            (made,) = merge_module.switch(switched, [(old, exact.residual)], [new], block_bytes=block_bytes)
        assert bits_equal(back, W)  # the exact round trip, on each path
        runs[name] = fast, exact, plain, switched, made
    (fast, exact, plain, switched, made), (fast_k, exact_k, plain_k, switched_k, made_k) = runs["numpy"], runs["numba"]
    assert bits_equal(fast_k, fast) and bits_equal(exact_k.weight, exact.weight) and bits_equal(plain_k, plain)
    assert bits_equal(exact_k.weight, fast)  # exact mode merges to the fast mode's bits
    assert residuals_equal(exact_k.residual, exact.residual) and exact_k.residual.merged_digest == exact.residual.merged_digest
    assert bits_equal(switched_k, switched) and residuals_equal(made_k, made)


@pytest.mark.parametrize("dtype", STORAGE)
@given(seed=st.integers(0, 2**32 - 1), narrow=st.booleans(), exact=st.booleans())
def test_merge_many_matches_the_numpy_path(dtype: str, seed: int, narrow: bool, exact: bool) -> None:
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    k, rows, cols, rank = int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(1, 7)), 2
    cases = [tie_case(rng, t, rows, cols, rank, narrow) for _ in range(k)]
    W = np.stack([w for w, _ in cases])
    if rng.integers(0, 2):  # ordinary weights: the stacked evaluation decides them (no fallback to merge)
        W = round_to(rng.normal(0, 1, W.shape), t)
    runs = {}
    for name in ("numpy", "numba"):
        with path(name):
            runs[name] = merge_module.merge_many(W, [d for _, d in cases], exact=exact)
    (merged, residuals), (merged_k, residuals_k) = runs["numpy"], runs["numba"]
    assert bits_equal(merged_k, merged)
    for a, b in zip(residuals_k, residuals):
        assert (a is None) == (b is None) and (a is None or residuals_equal(a, b))


@pytest.mark.parametrize("dtype", STORAGE)
def test_merges_past_the_range_match_the_numpy_path(dtype: str) -> None:
    """W at t's largest finite values (both signs) and deltas around the overflow threshold, so that many
    merged elements round to ±inf: the exact merge's residual must record them (the unmerge of ±inf is
    ±inf, not W), on the kernel path as on the NumPy path, and the round trip restores W."""
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(7)
    largest = LARGEST[dtype]
    rows, cols = 64, 96  # a block of 6144 elements: the kernels run under auto too
    signs = np.where(rng.integers(0, 2, (rows, cols)) == 0, 1.0, -1.0)
    W = round_to(signs * largest * (1 - rng.integers(0, 3, (rows, cols)) * 2.0**-6), t)  # the top three binade steps
    gap = OVERFLOW[dtype] - largest  # half t's top spacing
    A = round_to((rng.uniform(0.25, 3.0, (1, cols)) * gap / 2.0**10), t)
    B = round_to(np.where(rng.integers(0, 2, (rows, 1)) == 0, 2.0**10, -(2.0**10)), t)
    delta = LinearDelta(A, B, 1.0, module="edge")
    runs = {}
    for name in ("numpy", "numba"):
        with path(name):
            exact = merge_module.merge(W, delta, exact=True)
            back = merge_module.unmerge(exact.weight, delta, residual=exact.residual)
        assert bits_equal(back, W)
        runs[name] = exact
    assert np.isinf(runs["numpy"].weight.astype(float64)).sum() > rows * cols // 10  # the case does overflow
    assert bits_equal(runs["numba"].weight, runs["numpy"].weight)
    assert residuals_equal(runs["numba"].residual, runs["numpy"].residual)


@pytest.mark.parametrize("name", ["numpy", "numba"])
@pytest.mark.parametrize("exact", [False, True])
def test_merge_and_unmerge_into_every_kind_of_out(name: str, exact: bool) -> None:
    """merge writes a fresh C-contiguous ``out`` in place of a workspace block (lora_ref.merge.merge's
    ``direct``), and copies into the others: W itself, a strided view, a Fortran-ordered array. Every one
    gets the bits of merge without ``out``, and unmerge into each restores W."""
    rng = np.random.default_rng(3)
    W, delta = tie_case(rng, resolve_dtype("bfloat16"), 96, 80, 3, True)
    with path(name):
        want = merge_module.merge(W, delta, exact=exact)
        host = np.empty((96, 160), W.dtype)
        outs = {"fresh": np.empty_like(W), "strided": host[:, ::2], "fortran": np.asfortranarray(np.empty_like(W)),
                "in place": W.copy()}
        for label, out in outs.items():
            source = out if label == "in place" else W
            if label == "in place":
                out[...] = W
            got = merge_module.merge(source, delta, exact=exact, out=out)
            assert got.weight is out and bits_equal(np.ascontiguousarray(out), want.weight), label
            if exact:
                back = np.empty_like(W) if label != "strided" else np.empty((96, 160), W.dtype)[:, 1::2]
                merge_module.unmerge(np.ascontiguousarray(out), delta, residual=got.residual, out=back)
                assert bits_equal(np.ascontiguousarray(back), W), label


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_an_out_overlapping_the_weight_shifted_is_refused(name: str) -> None:
    """out sharing W's memory without being W (one row down: each block would read rows an earlier block
    overwrote) is a ConfigError, for merge and unmerge; a disjoint view of the same buffer is taken."""
    rng = np.random.default_rng(5)
    W, delta = tie_case(rng, resolve_dtype("float32"), 97, 80, 3, True)
    buffer = np.concatenate([W, W[:1]])
    with path(name):
        want = merge_module.merge(W, delta).weight
        for call in (merge_module.merge, merge_module.unmerge):
            with pytest.raises(ConfigError, match="overlaps"):
                call(buffer[:-1], delta, out=buffer[1:])
        host = np.empty((2 * 97, 80), W.dtype)
        host[:97] = W
        merge_module.merge(host[:97], delta, out=host[97:])
        assert bits_equal(host[97:], want)


def test_float16_widening_matches_numpy_for_every_pattern() -> None:
    from lora_ref import kernels

    patterns = np.arange(2**16, dtype=np.uint16)
    want = patterns.view(np.float16).astype(float64)
    got = np.array([kernels._widen(int(p), 1) for p in patterns.tolist()])
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint64), want[~nan].view(np.uint64))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_matches_store_exact(dtype: str) -> None:
    """Every finite value of t, values past its range, ±inf and NaN: the kernels' bits are store_exact's."""
    from lora_ref import kernels

    t = resolve_dtype(dtype)
    with np.errstate(invalid="ignore"):
        values = np.arange(2**16, dtype=np.uint16).view(t).astype(float64)
    values = np.concatenate([values, [2.0**16, -2.0**16, 2.0**20, 2.0**128, -2.0**200, 1e300, np.inf, -np.inf, np.nan]])
    want = np.empty(values.shape, t)
    store_exact(values, want, np.empty_like(values))
    got = np.array([kernels._store(v, 1 if dtype == "float16" else 2) for v in values.tolist()], dtype=np.uint32)
    assert np.array_equal(got.astype(np.uint16), bits_of(want))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float32_widening_and_store_match_numpy_for_every_pattern(dtype: str) -> None:
    """The float32 bracket's bit moves (kernels._widen32, _store32): every pattern of t widens to NumPy's
    float32 value (NaN to a NaN), and every finite value of t stores back to its own bits (signed zeros and
    subnormals included)."""
    from lora_ref import kernels

    t, kind = resolve_dtype(dtype), 1 if dtype == "float16" else 2
    patterns = np.arange(2**16, dtype=np.uint16)
    want = patterns.view(t).astype(np.float32)
    got = np.array([kernels._widen32(p, kind) for p in patterns.tolist()], dtype=np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    finite = np.isfinite(want)
    stored = np.array([kernels._store32(v, kind) for v in want[finite]], dtype=np.uint32)
    assert np.array_equal(stored, patterns[finite].astype(np.uint32))


def test_dispatch_refuses_unknown_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_REF_KERNELS", "fortran")
    with pytest.raises(ConfigError, match="auto, numpy or numba"):
        merge_module.kernels_module()
    monkeypatch.setenv("LORA_REF_KERNELS", "numba")
    monkeypatch.setattr(merge_module, "_KERNELS", [False, "ImportError: No module named 'numba'"])
    with pytest.raises(ConfigError, match="lora-ref\\[fast\\]"):
        merge_module.kernels_module()
    monkeypatch.setenv("LORA_REF_KERNELS", "auto")
    assert merge_module.kernels_module() is None  # auto falls back to the NumPy path
    monkeypatch.setattr(merge_module, "_KERNELS", [None, None])
    assert merge_module.kernels_module() is not None
    assert merge_module.kernels_module(merge_module.AUTO_KERNEL_ELEMENTS - 1) is None  # small blocks: NumPy's passes


_CACHE_SCRIPT = """
import numpy as np, sys
sys.path.insert(0, {tests!r})
from test_kernels import tie_case
from lora_ref.dtypes import bits_of
from lora_ref.merge import kernels_module, merge
assert kernels_module() is not None
W, delta = tie_case(np.random.default_rng(0), np.dtype(np.float32), 64, 48, 3, True)
result = merge(W, delta, exact=True)
print(bits_of(result.weight).tobytes().hex()[:64], result.residual.count, bits_of(result.weight).sum())
"""


def test_an_unwritable_numba_cache_still_merges(tmp_path: Path) -> None:
    """NUMBA_CACHE_DIR below a regular file (no one, root included, can create it: as for an install numba
    cannot cache into): the kernels still run, and give the NumPy path's bits."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    script = _CACHE_SCRIPT.format(tests=str(Path(__file__).parent))
    outputs = []
    for choice, check in (("numba", "is not None"), ("numpy", "is None")):
        env = {**os.environ, "LORA_REF_KERNELS": choice, "NUMBA_CACHE_DIR": str(blocker / "cache")}
        run = subprocess.run([sys.executable, "-c", script.replace("is not None", check)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]


def test_without_numba_the_numpy_path_merges(tmp_path: Path) -> None:
    """numba hidden (``import numba`` raises): auto merges on the NumPy path with the same bits, numba is refused."""
    script = _CACHE_SCRIPT.format(tests=str(Path(__file__).parent)).replace("is not None", "is None")
    hidden = "import sys\nsys.modules['numba'] = None\n"
    outputs = []
    for choice in ("auto", "numba"):
        env = {**os.environ, "LORA_REF_KERNELS": choice}
        run = subprocess.run([sys.executable, "-c", hidden + script], env=env, capture_output=True, text=True, timeout=600)
        outputs.append(run)
    assert outputs[0].returncode == 0, outputs[0].stderr[-2000:]
    assert outputs[1].returncode != 0 and "ConfigError" in outputs[1].stderr and "lora-ref[fast]" in outputs[1].stderr
    env = {**os.environ, "LORA_REF_KERNELS": "numba"}
    with_numba = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT.format(tests=str(Path(__file__).parent))], env=env,
                                capture_output=True, text=True, timeout=600)
    assert with_numba.returncode == 0, with_numba.stderr[-2000:]
    assert with_numba.stdout.strip().splitlines()[-1] == outputs[0].stdout.strip().splitlines()[-1]
