"""The frozen case set: every case's operation, dtype, parameters, input shapes and seed.

Inputs come from :class:`Stream`, a SplitMix64 generator written out here (not NumPy's,
whose streams may change between releases), as multiples of 2^-23 in [-1, 1) times a
power-of-two spread, then rounded once to the case dtype: the inputs, like the exact
oracle, are bit-for-bit reproducible anywhere.

Two kinds of cases: *covering* cases, generated from :data:`COVERAGE` (one table listing each
operation family's independent dimensions; :mod:`.coverage` builds rows in which every pair
of two dimensions' values occurs, and SPEC C.2's coverage table is rendered from it), and
*targeted* cases written by hand below (special values, regressions of real bugs, semantic
guards, expected refusals). Each case's seed is a hash of its id, so adding or reordering
cases never moves another case's vectors.

To add a dimension or a value, edit :data:`COVERAGE` (and the family's row builder); to add
hand-written cases, append :class:`CaseSpec` entries in a ``_<kind>_cases`` function and list it
in :data:`BUILDERS`; then ``lora-ref conformance generate`` and ``python -m
lora_ref.conformance.coverage_doc`` (rewrites SPEC C.2's table).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from ..config import lora_scale
from ..dtypes import STORAGE_DTYPES, round_to
from .coverage import Dimension, Family, Row

_MASK64 = (1 << 64) - 1
ALL_DTYPES = ("float32", "float16", "bfloat16")
#: Integer inputs and their lowest value (token ids from 0; adapter indices from -1 = base only).
INDEX_INPUTS = {"ids": 0, "index": -1}


class Stream:
    """SplitMix64 (Steele, Lea, Flood 2014): a tiny, fully specified pseudo-random stream."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self, shape: tuple[int, ...], spread: float = 1.0) -> np.ndarray:
        """float64 values k/2^23 − 1 (k uniform in [0, 2^24)) times ``spread``: exact dyadics in [-spread, spread)."""
        count = int(np.prod(shape, dtype=np.int64))
        ints = np.array([self.next() >> 40 for _ in range(count)], dtype=np.float64)
        return (ints / 2.0**23 - 1.0).reshape(shape) * spread


@dataclass(frozen=True)
class CaseSpec:
    """One frozen case: ``inputs`` maps input names to (shape, spread); ``special`` edits them."""

    group: str
    name: str
    operation: str
    dtype: str
    params: dict[str, Any]
    inputs: dict[str, tuple[tuple[int, ...], float]]
    description: str
    special: Callable[[dict[str, np.ndarray], np.dtype], None] | None = field(default=None, compare=False)
    #: Expected outcome: None = outputs within their bounds; a string = a typed refusal, and why (SPEC C.4).
    refusal: str | None = None
    #: The coverage family that generated this case ("" for a hand-written one).
    family: str = ""

    @property
    def case_id(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def seed(self) -> int:
        """The input stream's seed: the first 8 bytes of BLAKE2b(case id), so stable per case name, not position."""
        return int.from_bytes(hashlib.blake2b(self.case_id.encode(), digest_size=8).digest(), "little")

    def make_inputs(self) -> dict[str, np.ndarray]:
        """The case inputs in the case dtype (masks: exact 0 or 1/(1-p) = 2 for p = 1/2)."""
        dtype = STORAGE_DTYPES[self.dtype]
        stream = Stream(self.seed)
        arrays: dict[str, np.ndarray] = {}
        for name, (shape, spread) in self.inputs.items():
            if name in INDEX_INPUTS:  # integers: ids in [0, spread), adapter indices in [-1, spread)
                low = INDEX_INPUTS[name]
                count = int(np.prod(shape, dtype=np.int64))
                arrays[name] = np.array([low + stream.next() % (int(spread) - low) for _ in range(count)], dtype=np.int64).reshape(shape)
                continue
            values = stream.uniform(shape, spread)
            if name == "dropout_mask":  # p = 1/2: keep with probability 1/2, kept values scaled by 2
                values = np.where(values >= 0, 2.0, 0.0)
            if name in ("magnitude", "norm"):  # DoRA magnitudes (and merge-time norms) are positive
                values = np.abs(values) + spread / 2
            arrays[name] = round_to(values, dtype)
        if self.special is not None:
            self.special(arrays, dtype)
        return arrays


def linear_params(r: int, alpha: float, *, rslora: bool = False, fan_in_fan_out: bool = False, **extra: Any) -> dict[str, Any]:
    """PEFT-style parameters plus the derived ``scale`` (for bare-scale layouts)."""
    params = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": fan_in_fan_out,
              "scale": lora_scale(r, alpha, rslora)}
    params.update(extra)
    return params


def _linear_inputs(rows: tuple[int, ...], n_in: int, n_out: int, r: int, *, fan_in_fan_out: bool = False,
                   names: tuple[str, ...] = ("x", "W", "A", "B")) -> dict[str, tuple[tuple[int, ...], float]]:
    shapes = {"x": (rows + (n_in,), 2.0), "dy": (rows + (n_out,), 1.0),
              "W": ((n_in, n_out) if fan_in_fan_out else (n_out, n_in), 1.0),
              "A": ((r, n_in), 1.0), "B": ((n_out, r), 1.0), "b": ((n_out,), 1.0), "lora_bias": ((n_out,), 0.5),
              "dropout_mask": (rows + (n_in,), 1.0), "W_merged": ((n_in, n_out) if fan_in_fan_out else (n_out, n_in), 4.0)}
    return {name: shapes[name] for name in names}


def _special_weight(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """Put NaN (quiet and signaling, with payloads), ±inf, ±0, subnormals and an overflowing element into W
    (or W_merged, for a fast unmerge).

    Row 0: A >= 0 with A[:, 0] = 1 and B[0] = ulp(max finite), so Δ[0, 0] = s·r·ulp(max) >
    ulp(max)/2 and W[0, 0] = max finite overflows to inf. Row 1: B[1] = 0, so Δ[1, :] = 0
    exactly and W's specials there meet a zero delta.
    """
    W, A, B = arrays["W"] if "W" in arrays else arrays["W_merged"], arrays["A"], arrays["B"]
    info = ml_dtypes.finfo(dtype)
    big_ulp = 2.0 ** (int(info.maxexp) - int(info.nmant) - 1)
    A[...] = np.abs(A)
    A[:, 0] = 1
    B[0] = big_ulp
    B[1] = 0
    width = {2: np.uint16, 4: np.uint32}[dtype.itemsize]
    quiet_nan_payload = {2: 0x7E01 if dtype == np.float16 else 0x7FC1, 4: 0x7FC00001}[dtype.itemsize]
    sign_bit = 1 << (8 * dtype.itemsize - 1)
    tiny = float(info.smallest_subnormal)
    specials = [float(info.max), -float(info.max), np.inf, -np.inf, -0.0, 0.0, tiny, -tiny, 3 * tiny]
    for j, value in enumerate(specials):
        W[0, j + 1 if j else 0] = value
        W[1, j] = value
    signaling_nan_payload = {2: 0x7C05 if dtype == np.float16 else 0x7F85, 4: 0x7F800005}[dtype.itemsize]
    nans = np.array([quiet_nan_payload, quiet_nan_payload | sign_bit, signaling_nan_payload, signaling_nan_payload | sign_bit],
                    dtype=width).view(dtype)
    W[2, 1:5] = nans
    W[3, 0] = nans[0]
    W[3, 1] = nans[2]


def _linear_cases() -> Iterator[CaseSpec]:
    common = dict(rows=(3,), n_in=24, n_out=16, r=4)

    def case(name: str, operation: str, dtype: str, params: dict, inputs: dict, description: str, special=None) -> CaseSpec:
        return CaseSpec("linear", f"{name}-{dtype}", operation, dtype, params, inputs, description, special)

    fwd = ("x", "W", "b", "A", "B")
    for dtype in ALL_DTYPES:
        yield case("forward-basic", "linear.forward", dtype, linear_params(4, 8, lora_dropout=0.1),
                   _linear_inputs(**common, names=fwd), "alpha != r, bias; lora_dropout > 0 must be off at inference")
        yield case("forward-rslora", "linear.forward", dtype, linear_params(4, 6, rslora=True),
                   _linear_inputs((2, 3), 24, 16, 4, names=fwd), "rsLoRA: s = alpha/sqrt(r); 3-D input")
        yield case("forward-fan_in_fan_out", "linear.forward", dtype, linear_params(4, 16, fan_in_fan_out=True),
                   _linear_inputs((3,), 24, 16, 4, fan_in_fan_out=True, names=fwd), "W stored [in, out] (GPT-2 Conv1D)")
    yield case("forward-fan_in_fan_out_square", "linear.forward", "float32", linear_params(4, 16, fan_in_fan_out=True),
               _linear_inputs((3,), 16, 16, 4, fan_in_fan_out=True, names=fwd), "square W [in, out]: a missing transpose is silent")
    for dtype in ("float32", "bfloat16"):
        yield case("forward-lora_bias", "linear.forward", dtype, linear_params(8, 16),
                   _linear_inputs((4,), 20, 12, 8, names=fwd + ("lora_bias",)), "lora_bias, scaled by s as PEFT does")
    yield case("forward-r1", "linear.forward", "float32", linear_params(1, 2),
               _linear_inputs((3,), 24, 16, 1), "rank 1, no bias")
    yield case("forward-r_gt_dims", "linear.forward", "float16", linear_params(32, 16),
               _linear_inputs((2,), 12, 8, 32, names=fwd), "r = 32 larger than in = 12 and out = 8")
    yield case("forward-batch1", "linear.forward", "bfloat16", linear_params(4, 8),
               _linear_inputs((1,), 24, 16, 4, names=fwd), "batch of one row")
    yield case("forward-empty_batch", "linear.forward", "float32", linear_params(4, 8),
               _linear_inputs((0,), 24, 16, 4, names=fwd), "empty batch: y has shape [0, out]")
    for dtype in ("float32", "float16"):
        yield case("forward-dropout_mask", "linear.forward", dtype, linear_params(4, 8, lora_dropout=0.5),
                   _linear_inputs((3,), 24, 16, 4, names=fwd + ("dropout_mask",)),
                   "training: the given inverted-dropout mask (0 or 2) multiplies the LoRA input only")

    bwd = ("x", "dy", "W", "A", "B")
    for dtype in ALL_DTYPES:
        yield case("backward-basic", "linear.backward", dtype, linear_params(4, 8, want_base_grads=True),
                   _linear_inputs((3,), 24, 16, 4, names=bwd), "dx, dA, dB and the base gradients dW, db")
    yield case("backward-lora_bias", "linear.backward", "bfloat16", linear_params(8, 16, want_base_grads=True),
               _linear_inputs((4,), 20, 12, 8, names=bwd + ("lora_bias",)), "dlora_bias = s * sum(dy), with dW and db")
    yield case("backward-rslora", "linear.backward", "float32", linear_params(4, 6, rslora=True),
               _linear_inputs((2, 3), 24, 16, 4, names=bwd), "rsLoRA scale in every LoRA gradient")
    for dtype in ("float32", "bfloat16"):
        yield case("backward-fan_in_fan_out", "linear.backward", dtype, linear_params(4, 16, fan_in_fan_out=True, want_base_grads=True),
                   _linear_inputs((3,), 24, 16, 4, fan_in_fan_out=True, names=bwd), "dW in the stored [in, out] layout")
    for dtype in ("float32", "float16"):
        yield case("backward-dropout_mask", "linear.backward", dtype, linear_params(4, 8, lora_dropout=0.5),
                   _linear_inputs((3,), 24, 16, 4, names=bwd + ("dropout_mask",)), "the mask enters dx's LoRA part, dA and dB")
    yield case("backward-r_gt_dims", "linear.backward", "float32", linear_params(32, 16),
               _linear_inputs((2,), 12, 8, 32, names=bwd), "r larger than both dimensions")
    yield case("backward-empty_batch", "linear.backward", "float32", linear_params(4, 8, want_base_grads=True),
               _linear_inputs((0,), 24, 16, 4, names=bwd), "empty batch: all parameter gradients are zero")

    mrg = ("W", "A", "B")
    for dtype in ALL_DTYPES:
        yield case("merge-basic", "linear.merge", dtype, linear_params(4, 8),
                   _linear_inputs((), 48, 32, 4, names=mrg), "W + s B A rounded once")
        yield case("merge-rslora", "linear.merge", dtype, linear_params(9, 6, rslora=True),
                   _linear_inputs((), 32, 24, 9, names=mrg), "rsLoRA merge, r = 9 (s = alpha/3)")
        yield case("merge-special", "linear.merge", dtype, linear_params(4, 8),
                   _linear_inputs((), 16, 8, 4, names=mrg), "NaN payloads, +-inf, +-0, subnormals, overflow to inf",
                   _special_weight)
    for dtype in ("float32", "bfloat16"):
        yield case("merge-fan_in_fan_out", "linear.merge", dtype, linear_params(4, 16, fan_in_fan_out=True),
                   _linear_inputs((), 32, 24, 4, fan_in_fan_out=True, names=mrg), "delta transposed to [in, out]")
    yield case("merge-fan_in_fan_out_square", "linear.merge", "bfloat16", linear_params(4, 16, fan_in_fan_out=True),
               _linear_inputs((), 16, 16, 4, fan_in_fan_out=True, names=mrg), "square W [in, out]: a missing transpose is silent")
    yield case("merge-r1", "linear.merge", "float16", linear_params(1, 1), _linear_inputs((), 32, 24, 1, names=mrg), "rank 1")
    yield case("merge-r_gt_dims", "linear.merge", "bfloat16", linear_params(16, 32),
               _linear_inputs((), 12, 8, 16, names=mrg), "r = 16 larger than both dimensions")

    for dtype in ALL_DTYPES:
        yield case("unmerge-fast", "linear.unmerge", dtype, linear_params(4, 8, exact=False),
                   _linear_inputs((), 48, 32, 4, names=("W_merged", "A", "B")), "W_merged - s B A rounded once")
        yield case("unmerge-exact", "linear.unmerge", dtype, linear_params(4, 8, exact=True),
                   _linear_inputs((), 48, 32, 4, names=mrg), "exact round trip: merge, then unmerge with the residual -> W's bits")
        yield case("unmerge-exact_special", "linear.unmerge", dtype, linear_params(4, 8, exact=True),
                   _linear_inputs((), 16, 8, 4, names=mrg), "exact round trip through NaN payloads, inf, -0, subnormals, overflow",
                   _special_weight)
    yield case("unmerge-fan_in_fan_out", "linear.unmerge", "float16", linear_params(4, 16, fan_in_fan_out=True, exact=True),
               _linear_inputs((), 32, 24, 4, fan_in_fan_out=True, names=mrg), "exact round trip, W stored [in, out]")


def _every_route(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """A fixed routing that uses every adapter and the base (-1) at least twice."""
    arrays["index"][...] = np.array([0, 1, -1, 1, 0, -1], dtype=np.int64)


def _repeat_ids(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """Make id 7 occur three times, so the embedding gradients must scatter-add."""
    ids = arrays["ids"].reshape(-1)  # a view: writes reach the array
    ids[0] = ids[ids.size // 2] = ids[-1] = 7


def _layer_cases() -> Iterator[CaseSpec]:
    """Embedding, Conv2d, mixed batch and DoRA (Linear) cases."""

    def case(group: str, name: str, operation: str, dtype: str, params: dict, inputs: dict, description: str, special=None) -> CaseSpec:
        return CaseSpec(group, f"{name}-{dtype}", operation, dtype, params, inputs, description, special)

    V, D, r = 20, 12, 4
    emb = {"ids": ((2, 5), V), "W": ((V, D), 1.0), "A": ((r, V), 1.0), "B": ((D, r), 1.0)}
    for dtype in ("float32", "bfloat16"):
        yield case("embedding", "forward", "embedding.forward", dtype, linear_params(r, 8), emb,
                   "y = W[ids] + s A^T[ids] B^T; A [r, V], B [D, r] (PEFT lora_embedding_A/B)")
    yield case("embedding", "forward-rslora", "embedding.forward", "float16", linear_params(r, 6, rslora=True), emb, "rsLoRA")
    for dtype in ALL_DTYPES:
        yield case("embedding", "merge", "embedding.merge", dtype, linear_params(r, 8),
                   {"W": ((V, D), 1.0), "A": ((r, V), 1.0), "B": ((D, r), 1.0)}, "W + s A^T B^T, [V, D]")
    for dtype in ("float32", "bfloat16"):
        yield case("embedding", "unmerge", "embedding.unmerge", dtype, linear_params(r, 8),
                   {"W_merged": ((V, D), 4.0), "A": ((r, V), 1.0), "B": ((D, r), 1.0)}, "W_merged - s A^T B^T (fast)")
        yield case("embedding", "backward", "embedding.backward", dtype, linear_params(r, 8, want_base_grads=True),
                   {**emb, "dy": ((2, 5, D), 1.0)}, "dA (scatter-add over repeated ids), dB, dW", _repeat_ids)

    def conv_inputs(n: int, c: int, hw: int, o: int, k: int, rank: int, names=("x", "W", "b", "A", "B")) -> dict:
        shapes = {"x": ((n, c, hw, hw), 2.0), "W": ((o, c, k, k), 1.0), "b": ((o,), 1.0),
                  "A": ((rank, c, k, k), 1.0), "B": ((o, rank, 1, 1), 1.0)}
        return {name: shapes[name] for name in names}

    yield case("conv2d", "forward-3x3", "conv2d.forward", "float32", linear_params(2, 4, stride=1, padding=1),
               conv_inputs(2, 3, 6, 4, 3, 2), "3x3 kernel, stride 1, zero padding 1, bias")
    yield case("conv2d", "forward-stride2", "conv2d.forward", "bfloat16", linear_params(3, 6, stride=2, padding=0),
               conv_inputs(1, 3, 7, 5, 3, 3), "3x3 kernel, stride 2, no padding")
    yield case("conv2d", "forward-1x1", "conv2d.forward", "float16", linear_params(2, 8, stride=1, padding=0),
               conv_inputs(2, 6, 4, 5, 1, 2), "1x1 kernel")
    yield case("conv2d", "merge-3x3", "conv2d.merge", "float32", linear_params(2, 4), conv_inputs(1, 6, 1, 8, 3, 2, ("W", "A", "B")),
               "delta s B A reshaped to [O, C, 3, 3]")
    yield case("conv2d", "merge-3x3", "conv2d.merge", "bfloat16", linear_params(4, 8, rslora=True),
               conv_inputs(1, 6, 1, 8, 3, 4, ("W", "A", "B")), "rsLoRA, kernel-shaped delta")
    yield case("conv2d", "merge-1x1", "conv2d.merge", "float16", linear_params(2, 4), conv_inputs(1, 16, 1, 12, 1, 2, ("W", "A", "B")),
               "1x1 kernel")

    yield case("conv2d", "unmerge-3x3", "conv2d.unmerge", "float32", linear_params(2, 4),
               {"W_merged": ((8, 6, 3, 3), 4.0), "A": ((2, 6, 3, 3), 1.0), "B": ((8, 2, 1, 1), 1.0)}, "W_merged - s (B A) (fast)")
    yield case("conv2d", "unmerge-1x1", "conv2d.unmerge", "bfloat16", linear_params(2, 4),
               {"W_merged": ((12, 16, 1, 1), 4.0), "A": ((2, 16, 1, 1), 1.0), "B": ((12, 2, 1, 1), 1.0)}, "1x1 kernel (fast)")

    def conv_grad_inputs(n: int, c: int, hw: int, o: int, k: int, rank: int, out_hw: int) -> dict:
        return {**conv_inputs(n, c, hw, o, k, rank), "dy": ((n, o, out_hw, out_hw), 1.0)}

    yield case("conv2d", "backward-3x3", "conv2d.backward", "float32", linear_params(2, 4, stride=1, padding=1, want_base_grads=True),
               conv_grad_inputs(2, 3, 5, 4, 3, 2, 5), "dx (col2im of overlapping windows), dA, dB, dW, db")
    yield case("conv2d", "backward-stride2", "conv2d.backward", "bfloat16", linear_params(3, 6, stride=2, padding=0),
               conv_grad_inputs(1, 3, 7, 5, 3, 3, 3), "stride 2, no padding")
    yield case("conv2d", "backward-1x1", "conv2d.backward", "float16", linear_params(2, 8, stride=1, padding=0),
               conv_grad_inputs(2, 6, 4, 5, 1, 2, 4), "1x1 kernel")

    # Conv2d with dilation where a lora_A built without it (diffusers' LoRAConv2dLayer, PEFT 0.21) still has the
    # base's output size: H = 8, W = 11, k = 3, stride 3, no padding -> out 2x3 with dilation 2 and without it
    dilated = {"x": ((2, 3, 8, 11), 2.0), "W": ((4, 3, 3, 3), 1.0), "b": ((4,), 1.0), "A": ((2, 3, 3, 3), 1.0), "B": ((4, 2, 1, 1), 1.0)}
    for dtype in ("float32", "bfloat16"):
        yield case("conv2d", "forward-dilation2_stride3", "conv2d.forward", dtype, linear_params(2, 5, stride=3, padding=0, dilation=2),
                   dilated, "dilation 2, stride 3: a lora_A without the base's dilation has the same output size, silently wrong")
    yield case("conv2d", "forward-dilation_axis_stride3", "conv2d.forward", "float16",
               linear_params(2, 5, stride=[1, 3], padding=[1, 0], dilation=[1, 2]), dilated,
               "per-axis geometry (stride 1x3, padding 1x0, dilation 1x2): the dilated axis keeps its size without dilation")
    yield case("conv2d", "backward-dilation2_stride3", "conv2d.backward", "float32",
               linear_params(2, 5, stride=3, padding=0, dilation=2, want_base_grads=True), {**dilated, "dy": ((2, 4, 2, 3), 1.0)},
               "dx, dA, dB, dW, db with dilation 2, stride 3 (sizes agree with and without dilation)")

    adapters = [linear_params(2, 4), linear_params(5, 10, rslora=True)]
    mixed = {"x": ((6, 16), 2.0), "W": ((12, 16), 1.0), "b": ((12,), 1.0), "index": ((6,), 2),
             "A.0": ((2, 16), 1.0), "B.0": ((12, 2), 1.0), "A.1": ((5, 16), 1.0), "B.1": ((12, 5), 1.0)}
    for dtype in ALL_DTYPES:
        yield case("mixed_batch", "forward", "mixed_batch.forward", dtype, {"adapters": adapters}, mixed,
                   "per-row adapters (index -1 = base only), ranks 2 and 5, the second rsLoRA", _every_route)

    for dtype in ("float32", "bfloat16"):
        yield case("mixed_batch", "backward", "mixed_batch.backward", dtype, {"adapters": adapters},
                   {**{k: v for k, v in mixed.items() if k != "b"}, "dy": ((6, 12), 1.0)},
                   "dx per row; dA.i, dB.i from adapter i's rows only", _every_route)

    dora_in = {"x": ((3, 16), 2.0), "W": ((12, 16), 1.0), "b": ((12,), 1.0), "A": ((4, 16), 1.0), "B": ((12, 4), 1.0),
               "magnitude": ((12,), 4.0)}
    for dtype in ("float32", "bfloat16"):
        yield case("dora", "forward", "dora.forward", dtype, linear_params(4, 8), dora_in,
                   "DoRA eval: g (x W^T + s (x A^T) B^T) + b, g = m / ||W + s B A|| per output row (bias not scaled)")
    for dtype in ALL_DTYPES:
        yield case("dora", "merge", "dora.merge", dtype, linear_params(4, 8),
                   {k: v for k, v in dora_in.items() if k in ("W", "A", "B", "magnitude")}, "W' = g (W + s B A)")
    for dtype in ("float32", "float16"):
        yield case("dora", "backward", "dora.backward", dtype, linear_params(4, 8), {**dora_in, "dy": ((3, 12), 1.0)},
                   "dx, dA, dB with G = g dY (the norm is a constant), dmagnitude, db")
    for dtype in ("float32", "bfloat16"):
        yield case("dora", "unmerge-exact", "dora.unmerge", dtype, linear_params(4, 8, exact=True),
                   {k: v for k, v in dora_in.items() if k in ("W", "A", "B", "magnitude")},
                   "exact round trip: merge, then unmerge (W'/g - s B A) with the residual -> W's bits")


def _conv_nd_cases() -> Iterator[CaseSpec]:
    """Conv1d and Conv3d (Conv2d is in :func:`_layer_cases`): dilation, stride, 1-wide and 1x1x1 kernels."""

    def case(d: int, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        return CaseSpec(f"conv{d}d", f"{name}-{dtype}", f"conv{d}d.{operation}", dtype, params, shapes, description)

    def shapes(d: int, n: int, c: int, size: int, o: int, k: int, rank: int, out: int | None = None,
               names: tuple[str, ...] = ("x", "W", "b", "A", "B")) -> dict:
        every = {"x": ((n, c) + (size,) * d, 2.0), "W": ((o, c) + (k,) * d, 1.0), "b": ((o,), 1.0),
                 "A": ((rank, c) + (k,) * d, 1.0), "B": ((o, rank) + (1,) * d, 1.0),
                 "W_merged": ((o, c) + (k,) * d, 4.0), "dy": ((n, o) + (out or 0,) * d, 1.0)}
        return {name: every[name] for name in names}

    grads = ("x", "dy", "W", "b", "A", "B")
    # Conv1d: [N, C, L]; dilation 2 with padding 2 keeps L (a lora_A without dilation would not)
    yield case(1, "forward-dilation2", "forward", "float32", linear_params(3, 6, stride=1, padding=2, dilation=2),
               shapes(1, 2, 3, 9, 4, 3, 3), "k = 3, dilation 2, padding 2: lora_A must use the base's dilation")
    yield case(1, "forward-dilation2", "forward", "bfloat16", linear_params(2, 4, stride=2, padding=1, dilation=2),
               shapes(1, 2, 4, 10, 5, 3, 2), "dilation 2 with stride 2")
    yield case(1, "forward-dilation2_stride3", "forward", "float32", linear_params(2, 4, stride=3, padding=1, dilation=2),
               shapes(1, 2, 3, 9, 4, 3, 2), "dilation 2, stride 3: a lora_A without dilation has the same output size here, silently wrong")
    yield case(1, "forward-stride2", "forward", "float16", linear_params(4, 8, rslora=True, stride=2, padding=1),
               shapes(1, 2, 3, 11, 6, 5, 4), "k = 5, stride 2, padding 1, rsLoRA")
    yield case(1, "backward-dilation2", "backward", "float32", linear_params(2, 4, stride=1, padding=2, dilation=2, want_base_grads=True),
               shapes(1, 2, 3, 8, 4, 3, 2, 8, grads), "dx scatters taps two apart; dA, dB, dW, db")
    yield case(1, "backward-stride2", "backward", "bfloat16", linear_params(3, 6, stride=2, padding=0),
               shapes(1, 2, 3, 9, 4, 3, 3, 4, grads), "stride 2, no padding")
    for dtype in ("float32", "float16"):
        yield case(1, "merge", "merge", dtype, linear_params(3, 6), shapes(1, 1, 6, 1, 8, 3, 3, names=("W", "A", "B")),
                   "delta s B A reshaped to [O, C, k]")
    for dtype in ("float32", "bfloat16"):
        yield case(1, "unmerge", "unmerge", dtype, linear_params(2, 4), shapes(1, 1, 6, 1, 8, 3, 2, names=("W_merged", "A", "B")),
                   "W_merged - s (B A) (fast)")
    # Conv3d: [N, C, D, H, W]
    yield case(3, "forward-3x3x3", "forward", "float32", linear_params(2, 4, stride=1, padding=1),
               shapes(3, 1, 2, 4, 3, 3, 2), "3x3x3 kernel, padding 1, bias")
    yield case(3, "forward-1x1x1", "forward", "float16", linear_params(2, 8, stride=1, padding=0),
               shapes(3, 2, 4, 3, 5, 1, 2), "1x1x1 kernel")
    yield case(3, "forward-dilation2", "forward", "bfloat16", linear_params(2, 4, stride=1, padding=2, dilation=2),
               shapes(3, 1, 2, 4, 3, 3, 2), "3x3x3 kernel, dilation 2, padding 2")
    yield case(3, "backward-3x3x3_dilation2", "backward", "float32", linear_params(2, 4, stride=2, padding=1, dilation=2, want_base_grads=True),
               shapes(3, 1, 2, 5, 3, 3, 2, 2, grads), "stride 2, dilation 2: dx, dA, dB, dW, db")
    yield case(3, "backward-1x1x1", "backward", "bfloat16", linear_params(2, 4, stride=1, padding=0),
               shapes(3, 1, 3, 3, 4, 1, 2, 3, grads), "1x1x1 kernel")
    for dtype in ("float32", "bfloat16"):
        yield case(3, "merge-1x1x1", "merge", dtype, linear_params(2, 4), shapes(3, 1, 12, 1, 10, 1, 2, names=("W", "A", "B")),
                   "1x1x1 kernel (PEFT's 1x1 special case crashes on it)")
    yield case(3, "merge-3x3x3", "merge", "float16", linear_params(3, 6, rslora=True), shapes(3, 1, 3, 1, 4, 3, 3, names=("W", "A", "B")),
               "rsLoRA, kernel-shaped delta [O, C, 3, 3, 3]")
    for dtype in ("float32", "float16"):
        yield case(3, "unmerge-1x1x1", "unmerge", dtype, linear_params(2, 4),
                   shapes(3, 1, 12, 1, 10, 1, 2, names=("W_merged", "A", "B")), "1x1x1 kernel (fast)")


def _dora_layer_cases() -> Iterator[CaseSpec]:
    """DoRA on Embedding (norm per column of [V, D]) and Conv2d (norm per output channel over C, kh, kw)."""

    def case(group: str, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        return CaseSpec(group, f"{name}-{dtype}", f"{group}.{operation}", dtype, params, shapes, description)

    V, D, r = 20, 12, 4
    emb = {"ids": ((2, 5), V), "W": ((V, D), 1.0), "A": ((r, V), 1.0), "B": ((D, r), 1.0), "magnitude": ((D,), 4.0)}
    weights = {k: v for k, v in emb.items() if k != "ids"}
    for dtype in ("float32", "bfloat16"):
        yield case("dora_embedding", "forward", "forward", dtype, linear_params(r, 8), emb,
                   "g ∘ (W[ids] + s Aᵀ[ids] Bᵀ), g = m / ‖W + s Aᵀ Bᵀ‖ per column (over the vocabulary)")
    for dtype in ALL_DTYPES:
        yield case("dora_embedding", "merge", "merge", dtype, linear_params(r, 8, rslora=dtype == "float16"), weights,
                   "W' = g ∘ (W + s Aᵀ Bᵀ), g per embedding dimension")
    for dtype in ("float32", "bfloat16"):
        yield case("dora_embedding", "unmerge-exact", "unmerge", dtype, linear_params(r, 8, exact=True), weights,
                   "exact round trip: merge, then unmerge with the residual -> W's bits")

    def conv(c: int, o: int, k: int, rank: int, names=("x", "W", "b", "A", "B", "magnitude")) -> dict:
        every = {"x": ((2, c, 5, 5), 2.0), "W": ((o, c, k, k), 1.0), "b": ((o,), 1.0), "A": ((rank, c, k, k), 1.0),
                 "B": ((o, rank, 1, 1), 1.0), "magnitude": ((o,), 4.0)}
        return {name: every[name] for name in names}

    for dtype in ("float32", "bfloat16"):
        yield case("dora_conv2d", "forward-3x3", "forward", dtype, linear_params(2, 4, stride=1, padding=1), conv(3, 4, 3, 2),
                   "g ∘ (conv(x, W) + s conv1x1(conv(x, A), B)) + b, g = m / ‖W + ΔW‖ over (C, kh, kw)")
    yield case("dora_conv2d", "forward-1x1", "forward", "float16", linear_params(2, 8, stride=1, padding=0), conv(6, 5, 1, 2),
               "1x1 kernel")
    for dtype in ALL_DTYPES:
        yield case("dora_conv2d", "merge-3x3", "merge", dtype, linear_params(3, 6), conv(3, 8, 3, 3, ("W", "A", "B", "magnitude")),
                   "W' = g ∘ (W + ΔW), g per output channel")
    for dtype in ("float32", "bfloat16"):
        yield case("dora_conv2d", "unmerge-exact", "unmerge", dtype, linear_params(2, 4, exact=True),
                   conv(3, 8, 3, 2, ("W", "A", "B", "magnitude")), "exact round trip -> W's bits")


def _route(*index: int) -> Callable[[dict[str, np.ndarray], np.dtype], None]:
    """A fixed routing (every adapter and the base at least once), with id 7 repeated when there are ids."""

    def special(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
        arrays["index"][...] = np.array(index, dtype=np.int64)
        if "ids" in arrays:
            _repeat_ids(arrays, dtype)

    return special


def conv_length(size: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """A conv's output length along one axis: (size + 2 padding − dilation (k − 1) − 1) // stride + 1."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv_shape(size: tuple[int, ...], kernel: tuple[int, ...], geometry: Mapping[str, int | list[int]]) -> tuple[int, ...]:
    """A conv's output spatial shape: :func:`conv_length` per axis (each geometry value an int or one per axis)."""
    each = [(lambda v: list(v) if isinstance(v, list) else [v] * len(size))(geometry.get(key, default))
            for key, default in (("stride", 1), ("padding", 0), ("dilation", 1))]
    return tuple(conv_length(*axis) for axis in zip(size, kernel, *each))


def _cell_cases() -> Iterator[CaseSpec]:
    """Issue 14's cells: mixed batches of Embedding and Conv1d/2d/3d, DoRA backward on Embedding and Conv, DoRA on Conv1d/3d."""

    def case(group: str, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str, special=None) -> CaseSpec:
        return CaseSpec(group, f"{name}-{dtype}", operation, dtype, params, shapes, description, special)

    two = [linear_params(2, 4), linear_params(3, 7, rslora=True)]
    route = _route(0, 1, -1, 1)

    def factors(a_tail: tuple[int, ...], b_head: int, b_tail: tuple[int, ...]) -> dict:
        return {f"{g}.{i}": (((r,) + a_tail) if g == "A" else ((b_head, r) + b_tail), 1.0) for i, r in enumerate((2, 3)) for g in "AB"}

    V, D = 20, 12
    emb = {"ids": ((4, 3), V), "W": ((V, D), 1.0), "index": ((4,), 2), **factors((V,), D, ())}
    for dtype in ("float32", "bfloat16"):
        yield case("mixed_embedding", "forward", "mixed_embedding.forward", dtype, {"adapters": two}, emb,
                   "ids [4, 3], row b uses adapter index[b] (-1 = base), ranks 2 and 3, the second rsLoRA", route)
        yield case("mixed_embedding", "backward", "mixed_embedding.backward", dtype, {"adapters": two}, {**emb, "dy": ((4, 3, D), 1.0)},
                   "dA.i (scatter-add over repeated ids), dB.i from adapter i's rows only", route)
    for d, dtypes, size, k, geometry in ((1, ("float32", "bfloat16"), 9, 3, dict(stride=2, padding=1)),
                                         (2, ("float32", "bfloat16", "float16"), 5, 3, dict(stride=1, padding=1)),
                                         (3, ("float32", "float16"), 3, 3, dict(stride=1, padding=1))):
        c, o = 3 if d < 3 else 2, 4 if d < 3 else 3
        conv = {"x": ((4, c) + (size,) * d, 2.0), "W": ((o, c) + (k,) * d, 1.0), "b": ((o,), 1.0), "index": ((4,), 2),
                **factors((c,) + (k,) * d, o, (1,) * d)}
        dy = {"dy": ((4, o) + (conv_length(size, k, **geometry),) * d, 1.0)}
        for dtype in dtypes:
            yield case(f"mixed_conv{d}d", "forward", f"mixed_conv{d}d.forward", dtype, {"adapters": two, **geometry}, conv,
                       f"Conv{d}d mixed batch {geometry}: row b uses adapter index[b] (-1 = base), bias", route)
            yield case(f"mixed_conv{d}d", "backward", f"mixed_conv{d}d.backward", dtype, {"adapters": two, **geometry},
                       {**{n: v for n, v in conv.items() if n != "b"}, **dy},
                       "dx per row through its adapter; dA.i, dB.i from adapter i's rows only", route)
        dropping = [{**a, "lora_dropout": 0.5} for a in two]
        masked = {**conv, "dropout_mask": conv["x"]}
        for dtype in ("float32", "bfloat16"):  # training: the mask row b multiplies row b's LoRA input only (SPEC M.1)
            yield case(f"mixed_conv{d}d", "forward-mask", f"mixed_conv{d}d.forward", dtype, {"adapters": dropping, **geometry}, masked,
                       f"Conv{d}d training mixed batch {geometry}: row b = conv(x[b], W) + b + s_i lora_i(x[b] ∘ mask[b])", route)
            yield case(f"mixed_conv{d}d", "backward-mask", f"mixed_conv{d}d.backward", dtype, {"adapters": dropping, **geometry},
                       {**{n: v for n, v in masked.items() if n != "b"}, **dy},
                       "training: dx's LoRA part ∘ mask per row; dA.i, dB.i on x ∘ mask over adapter i's rows only", route)

    n_in, n_out = 10, 6
    lin = {"x": ((4, n_in), 2.0), "W": ((n_out, n_in), 1.0), "b": ((n_out,), 1.0), "index": ((4,), 2),
           **factors((n_in,), n_out, ())}
    for variant, extra, description in (
            ("lora_bias", {"lora_bias.0": ((n_out,), 0.5), "lora_bias.1": ((n_out,), 0.5)}, "both adapters with lora_bias (s_i b_i)"),
            ("dora", {"magnitude.1": ((n_out,), 4.0)}, "adapter 1 DoRA (its rows: g_1 = m_1 / ‖W + s_1 B_1 A_1‖), adapter 0 plain"),
            ("dora_lora_bias", {"lora_bias.0": ((n_out,), 0.5), "magnitude.1": ((n_out,), 4.0)},
             "adapter 0 plain with lora_bias, adapter 1 DoRA with its own norm")):
        for dtype in ("float32", "bfloat16"):
            yield case("mixed_linear", f"forward-{variant}", "mixed_linear.forward", dtype, {"adapters": two}, {**lin, **extra},
                       description, route)
            yield case("mixed_linear", f"backward-{variant}", "mixed_linear.backward", dtype, {"adapters": two},
                       {**{k: v for k, v in lin.items() if k != "b"}, **extra, "dy": ((4, n_out), 1.0)},
                       f"{description}: dx per row, and each adapter's gradients (dlora_bias.i, dmagnitude.i) from its rows", route)

    stacks = {"linear": {"x": ((3, n_in), 2.0), "W": ((n_out, n_in), 1.0), "b": ((n_out,), 1.0), "lora_bias.0": ((n_out,), 0.5),
                         **factors((n_in,), n_out, ())},
              "embedding": {"ids": ((2, 3), V), "W": ((V, D), 1.0), **factors((V,), D, ())},
              **{f"conv{d}d": {"x": ((2, 3) + (5,) * d if d < 3 else (1, 2, 3, 3, 3), 2.0),
                               "W": ((4, 3) + (3,) * d if d < 3 else (3, 2, 3, 3, 3), 1.0), "b": ((4 if d < 3 else 3,), 1.0),
                               **factors((3 if d < 3 else 2,) + (3,) * d, 4 if d < 3 else 3, (1,) * d)} for d in (1, 2, 3)}}
    for kind, shapes in stacks.items():
        for dtype in ("float32", "bfloat16"):
            yield case(f"stack_{kind}", "forward", f"stack_{kind}.forward", dtype, {"adapters": two, "stride": 1, "padding": 1} if "conv" in kind
                       else {"adapters": two}, shapes, f"{kind}: both adapters active on every row, unmerged: base + Σ_j s_j lora_j"
                       + (" (+ s_0 lora_bias_0)" if kind == "linear" else ""))

    dora_emb = {"ids": ((2, 5), V), "W": ((V, D), 1.0), "A": ((4, V), 1.0), "B": ((D, 4), 1.0), "magnitude": ((D,), 4.0),
                "dy": ((2, 5, D), 1.0)}
    for dtype in ("float32", "float16"):
        yield case("dora_embedding", "backward", "dora_embedding.backward", dtype, linear_params(4, 8), dora_emb,
                   "G = g ∘ dY per column: dA (scatter-add over repeated ids), dB, dmagnitude = Σ dY ∘ z / n", _repeat_ids)
    for d, size, k, geometry in ((1, 9, 3, dict(stride=2, padding=1)), (2, 5, 3, dict(stride=1, padding=1)),
                                 (3, 4, 3, dict(stride=1, padding=1))):
        c, o, n = (3, 4, 2) if d < 3 else (2, 3, 1)
        every = {"x": ((n, c) + (size,) * d, 2.0), "W": ((o, c) + (k,) * d, 1.0), "b": ((o,), 1.0), "A": ((2, c) + (k,) * d, 1.0),
                 "B": ((o, 2) + (1,) * d, 1.0), "magnitude": ((o,), 4.0), "dy": ((n, o) + (conv_length(size, k, **geometry),) * d, 1.0)}
        weights = {name: every[name] for name in ("W", "A", "B", "magnitude")}
        group = f"dora_conv{d}d"
        for dtype in ("float32", "bfloat16"):
            yield case(group, "backward", f"{group}.backward", dtype, linear_params(2, 4, **geometry), every,
                       f"Conv{d}d DoRA backward {geometry}: dx, dA, dB at G = g ∘ dY (n detached), dmagnitude, db")
        if d == 2:
            continue
        fwd = {name: every[name] for name in ("x", "W", "b", "A", "B", "magnitude")}
        for dtype in ("float32", "bfloat16" if d == 1 else "float16"):
            yield case(group, "forward", f"{group}.forward", dtype, linear_params(2, 4, **geometry), fwd,
                       f"Conv{d}d DoRA {geometry}: g ∘ (conv(x, W) + lora(x)) + b, g = m / ‖W + ΔW‖ over (C, *k)")
            yield case(group, "merge", f"{group}.merge", dtype, linear_params(2, 4, rslora=dtype != "float32"), weights,
                       f"Conv{d}d DoRA merge W' = g ∘ (W + ΔW)")
        for dtype in ("float32", "bfloat16"):
            yield case(group, "unmerge-exact", f"{group}.unmerge", dtype, linear_params(2, 4, exact=True), weights,
                       "exact round trip -> W's bits")


def _combine_cases() -> Iterator[CaseSpec]:
    """Weighted combination of two adapters (SPEC M.3): cat (exact stacking) and svd (lossless and truncated)."""

    def case(name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        return CaseSpec("combine", f"{name}-{dtype}", operation, dtype, params, shapes, description)

    def factors(ranks: tuple[int, ...], n_in: int = 16, n_out: int = 12) -> dict:
        shapes = {}
        for i, r in enumerate(ranks):
            shapes[f"A.{i}"], shapes[f"B.{i}"] = ((r, n_in), 1.0), ((n_out, r), 1.0)
        return shapes

    mixed = {"adapters": [linear_params(2, 4), linear_params(3, 6, rslora=True)], "weights": [0.75, -1.5]}
    for dtype in ALL_DTYPES:
        yield case("cat", "combine.cat", dtype, mixed, factors((2, 3)),
                   "A = [c_1 A_1; c_2 A_2], B = [B_1, B_2], c_i = w_i s_i (second adapter rsLoRA, negative weight)")
    yield case("cat-rslora_first", "combine.cat", "float32", {"adapters": [linear_params(4, 8, rslora=True), linear_params(2, 4)],
                                                               "weights": [1.0, 0.5]}, factors((4, 2)),
               "the first adapter uses rsLoRA: the combined adapter's scale must still be 1")
    for dtype in ("float32", "bfloat16"):
        yield case("svd-lossless", "combine.svd", dtype, {**mixed, "rank": 5}, factors((2, 3)),
                   "rank 5 = r_1 + r_2: B A = Δ up to rounding")
    # any kind's factor shapes (param kind: linear, embedding, conv) and lora_bias (Σ c_i b_i)
    emb = {"A.0": ((2, 20), 1.0), "B.0": ((12, 2), 1.0), "A.1": ((3, 20), 1.0), "B.1": ((12, 3), 1.0)}
    conv = {"A.0": ((2, 3, 3, 3), 1.0), "B.0": ((4, 2, 1, 1), 1.0), "A.1": ((3, 3, 3, 3), 1.0), "B.1": ((4, 3, 1, 1), 1.0)}
    biased = {**factors((2, 3)), "lora_bias.0": ((12,), 0.5), "lora_bias.1": ((12,), 0.5)}
    for name, kind, shapes in (("embedding", "embedding", emb), ("conv2d", "conv", conv), ("lora_bias", "linear", biased)):
        for dtype in ("float32", "bfloat16"):
            yield case(f"cat-{name}", "combine.cat", dtype, {**mixed, "kind": kind}, shapes,
                       f"cat of {kind} factors along the rank axis" + (", lora_bias = Σ c_i b_i" if name == "lora_bias" else ""))
            yield case(f"svd-{name}", "combine.svd", dtype, {**mixed, "kind": kind, "rank": 3}, shapes,
                       f"rank-3 svd of Σ c_i B_i A_i on {kind} factors (Conv: A [k, C, kh, kw], B [O, k, 1, 1])"
                       + (", lora_bias = Σ c_i b_i" if name == "lora_bias" else ""))
    gap = {"adapters": [linear_params(3, 6), linear_params(2, 4)], "weights": [1.0, 2.0**-6], "rank": 3}
    for dtype in ALL_DTYPES:
        yield case("svd-truncated", "combine.svd", dtype, gap, factors((3, 2)),
                   "rank 3 of 5, the second adapter weighted 2^-6: the discarded singular values are small")


def _dropout_and_conv_combine_cases() -> Iterator[CaseSpec]:
    """Dropout masks in mixed batches (per-row index, the mask an input: each row's LoRA path on x ∘ mask, a DoRA row by
    SPEC 4.3's dropout formula), DoRA's training formula on Conv1d/2d/3d (forward, backward), and ``combine`` of Conv1d / Conv3d factors."""

    def case(group: str, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str, special=None) -> CaseSpec:
        return CaseSpec(group, f"{name}-{dtype}", operation, dtype, params, shapes, description, special)

    two = [linear_params(2, 4, lora_dropout=0.5), linear_params(3, 7, rslora=True, lora_dropout=0.5)]
    n_in, n_out, rows = 10, 6, 6
    lin = {"x": ((rows, n_in), 2.0), "W": ((n_out, n_in), 1.0), "b": ((n_out,), 1.0), "index": ((rows,), 2),
           "dropout_mask": ((rows, n_in), 1.0),
           **{f"{g}.{i}": (((r, n_in) if g == "A" else (n_out, r)), 1.0) for i, r in enumerate((2, 3)) for g in "AB"}}
    for variant, extra, description in (
            ("plain", {}, "two plain adapters"),
            ("lora_bias", {"lora_bias.0": ((n_out,), 0.5), "lora_bias.1": ((n_out,), 0.5)}, "both adapters with lora_bias"),
            ("dora", {"lora_bias.0": ((n_out,), 0.5), "magnitude.1": ((n_out,), 4.0)},
             "adapter 0 with lora_bias, adapter 1 DoRA (its rows: base(x) + (g − 1) base(x̃) + g lora(x̃))")):
        for dtype in ("float32", "bfloat16"):
            yield case("mixed_linear", f"forward-mask-{variant}", "mixed_linear.forward", dtype, {"adapters": two}, {**lin, **extra},
                       f"training mixed batch, the mask row b multiplies row b's LoRA input only: {description}", _every_route)
            yield case("mixed_linear", f"backward-mask-{variant}", "mixed_linear.backward", dtype, {"adapters": two},
                       {**{k: v for k, v in lin.items() if k != "b"}, **extra, "dy": ((rows, n_out), 1.0)},
                       f"training mixed batch backward: the mask enters each row's dx LoRA part and its adapter's gradients: {description}",
                       _every_route)

    for d, size, geometry in ((1, (9,), dict(stride=2, padding=1)), (2, (5, 6), dict(stride=[1, 2], padding=1)),
                              (3, (3, 4, 3), dict(stride=1, padding=1))):
        c, o, k = (3, 4, (3,) * d) if d < 3 else (2, 3, (3, 2, 1))
        x = ((2, c) + size, 2.0)
        shapes = {"x": x, "W": ((o, c) + k, 1.0), "b": ((o,), 1.0), "A": ((2, c) + k, 1.0), "B": ((o, 2) + (1,) * d, 1.0),
                  "magnitude": ((o,), 4.0), "dropout_mask": x}
        dy = {"dy": ((2, o) + conv_shape(size, k, geometry), 1.0)}
        for dtype in ("float32", "bfloat16"):
            params = linear_params(2, 5, rslora=dtype == "bfloat16", lora_dropout=0.5, **geometry)
            yield case(f"dora_conv{d}d", "forward-dropout", f"dora_conv{d}d.forward", dtype, params, shapes,
                       f"Conv{d}d DoRA in training {geometry}: conv(x, W) + b + (g − 1) ∘ conv(x̃, W) + g ∘ lora(x̃), x̃ = x ∘ mask")
            yield case(f"dora_conv{d}d", "backward-dropout", f"dora_conv{d}d.backward", dtype, params, {**shapes, **dy},
                       f"Conv{d}d DoRA backward in training {geometry}: dx = base_vjp(dY) + mask ∘ (base_vjp((g − 1) ∘ dY) + "
                       "lora_vjp(g ∘ dY)); dA, dB, dmagnitude on x̃ = x ∘ mask; db")

    mixed = {"adapters": [linear_params(2, 4), linear_params(3, 6, rslora=True)], "weights": [0.75, -1.5]}
    for d, (c, o, k) in ((1, (3, 4, (3,))), (3, (2, 3, (3, 2, 1)))):
        shapes = {f"{g}.{i}": (((r, c) + k if g == "A" else (o, r) + (1,) * d), 1.0) for i, r in enumerate((2, 3)) for g in "AB"}
        for dtype in ("float32", "bfloat16"):
            yield case("combine", f"cat-conv{d}d", "combine.cat", dtype, {**mixed, "kind": "conv"}, shapes,
                       f"cat of Conv{d}d factors (A [r, C, *k], B [O, r, 1...]) along the rank axis")
            for rank, why in ((3, "truncated"), (5, "lossless: rank = r_1 + r_2")):
                yield case("combine", f"svd{rank}-conv{d}d", "combine.svd", dtype, {**mixed, "kind": "conv", "rank": rank}, shapes,
                           f"rank-{rank} svd of Σ c_i B_i A_i on Conv{d}d factors ({why}); A [k, C, *kernel], B [O, k, 1...]")


# -- covering cases: one table of every family's independent dimensions -------------------------
def rank_past(limit: int) -> int:
    """The smallest r > ``limit`` that is neither a power of two nor a square (so s stays inexact)."""
    r = limit + 1
    while r & (r - 1) == 0 or math.isqrt(r) ** 2 == r:
        r += 1
    return r


def rank_of(label: str, out_features: int, in_features: int) -> int:
    """``r1`` -> 1, ``r3`` -> 3, ``r_past`` -> :func:`rank_past` (min(out, in))."""
    return {"r1": 1, "r3": 3}.get(label) or rank_past(min(out_features, in_features))


def scale_params(label: str, r: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora): ``exact`` s = 2; ``non_dyadic`` s = (2r+1)/r; ``rslora`` s = (2r+1)/√r."""
    if label == "exact":
        return 2.0 * r, False
    return float(2 * r + 1), label == "rslora"


DTYPE = Dimension("dtype", ALL_DTYPES, "the storage dtype t")
RANK = Dimension("rank", ("r1", "r3", "r_past"),
                 "r = 1; r = 3; r_past = the smallest r > min(out, in) that is neither a power of two nor a square")
SCALE = Dimension("scale", ("exact", "non_dyadic", "rslora"),
                  "s = 2 (exact in every dtype); s = (2r+1)/r (not dyadic: rounds in every dtype); rsLoRA s = (2r+1)/√r (irrational)")


def _valid_scale(row: Mapping[str, str]) -> bool:
    """A non-dyadic alpha / r needs r > 1 (with r = 1 it is the integer alpha)."""
    return not (row.get("rank") == "r1" and row.get("scale") == "non_dyadic")


LIN_OUT, LIN_IN = 5, 7
_ROWS = {"rows3": (3,), "rows2x3": (2, 3), "rows1": (1,), "rows0": (0,)}


def _pw(group: str, row: Row, family: str, action: str, operation: str, params: dict, inputs: dict, description: str,
        special=None) -> CaseSpec:
    """A covering case named after its row's values: ``<group>/pw-<action>-<values...>-<dtype>``."""
    values = [v for k, v in row.items() if k not in ("dtype", "action", "method")]
    name = "-".join(["pw", action, *values, row["dtype"]])
    return CaseSpec(group, name, operation, row["dtype"], params, inputs, description, special, family=family)


def _linear_row(row: Row, action: str) -> CaseSpec:
    special_values = row.get("values") == "special"
    out_f, in_f = (10, 12) if special_values else (LIN_OUT, LIN_IN)
    r = rank_of(row["rank"], out_f, in_f)
    alpha, rslora = scale_params(row["scale"], r)
    fifo = row.get("weight") == "in_out"
    rows = _ROWS.get(row.get("rows", ""), ())
    extra: dict[str, Any] = {}
    names: tuple[str, ...] = ("W", "A", "B")
    if action == "forward":
        names = ("x", "W", "A", "B") + {"none": (), "bias": ("b",), "lora_bias": ("b", "lora_bias")}[row["bias"]]
    elif action == "backward":
        names = ("x", "dy", "W", "A", "B") + (("lora_bias",) if row["lora_bias"] == "lora_bias" else ())
        extra["want_base_grads"] = row["base_grads"] == "dW"
    elif action == "unmerge":
        extra["exact"] = row["mode"] == "exact"
        names = ("W", "A", "B") if extra["exact"] else ("W_merged", "A", "B")
    if row.get("dropout") == "mask":
        names += ("dropout_mask",)
        extra["lora_dropout"] = 0.5
    elif action == "forward":
        extra["lora_dropout"] = 0.25  # inference: dropout must be off
    params = linear_params(r, alpha, rslora=rslora, fan_in_fan_out=fifo, **extra)
    special = _special_weight if special_values else None
    return _pw("linear", row, f"linear.{action}", action, f"linear.{action}",
               params, _linear_inputs(rows, in_f, out_f, r, fan_in_fan_out=fifo, names=names),
               f"covering row {dict(row)}", special)


V_EMB, D_EMB = 9, 6
_IDS = {"ids2x4": (2, 4), "ids7": (7,), "ids_repeat": (3, 4)}


def _embedding_row(row: Row, action: str) -> CaseSpec:
    r = rank_of(row["rank"], D_EMB, V_EMB)
    alpha, rslora = scale_params(row["scale"], r)
    action = row.get("action", action)
    weights = {"W": ((V_EMB, D_EMB), 1.0), "A": ((r, V_EMB), 1.0), "B": ((D_EMB, r), 1.0)}
    extra: dict[str, Any] = {}
    special = None
    if action in ("forward", "backward"):
        ids = _IDS[row["ids"]]
        inputs = {"ids": (ids, V_EMB), **weights}
        if action == "backward":
            inputs["dy"] = (ids + (D_EMB,), 1.0)
            extra["want_base_grads"] = row.get("base_grads") == "dW"
        if row["ids"] == "ids_repeat":
            special = _repeat_ids
    elif action == "unmerge":
        inputs = {"W_merged": ((V_EMB, D_EMB), 4.0), "A": weights["A"], "B": weights["B"]}
    else:
        inputs = weights
    return _pw("embedding", row, "embedding." + ("merge" if action in ("merge", "unmerge") else action), action,
               f"embedding.{action}", linear_params(r, alpha, rslora=rslora, **extra), inputs, f"covering row {dict(row)}", special)


#: Per spatial rank d: batch, channels in, channels out, input size (not square in any axis).
_CONV_SHAPES = {1: (2, 3, 4, (11,)), 2: (2, 3, 4, (6, 7)), 3: (1, 2, 3, (5, 6, 7))}


def _conv_axis(label: str, d: int) -> int | list[int]:
    """Geometry labels: an int for every axis, or ``*_axis``: different values per axis."""
    per_axis = {"s_axis": [2] + [1] * (d - 1), "p_axis": [1] + [0] * (d - 1), "d_axis": [1] * (d - 1) + [2],
                "k_ns": [3, 2, 1][:d] if d > 1 else [2]}
    if d == 1:
        per_axis.update(s_axis=[3], p_axis=[2], d_axis=[3])
    if label in per_axis:
        return per_axis[label]
    return int(label[1:])


def _conv_kernel(label: str, d: int) -> tuple[int, ...]:
    value = _conv_axis(label, d)
    return tuple(value) if isinstance(value, list) else (value,) * d


def _each(value: int | list[int], d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (value,) * d


def _conv_out(row: Mapping[str, str], d: int) -> tuple[int, ...] | None:
    """The output size of a row's geometry (None when an axis is empty)."""
    size = _CONV_SHAPES[d][3]
    k = _conv_kernel(row["kernel"], d)
    s, p, dl = (_each(_conv_axis(row[name], d), d) for name in ("stride", "padding", "dilation"))
    out = tuple(conv_length(n, kk, ss, pp, dd) for n, kk, ss, pp, dd in zip(size, k, s, p, dl))
    return out if all(o >= 1 and n + 2 * pp - dd * (kk - 1) - 1 >= 0 for o, n, kk, pp, dd in zip(out, size, k, p, dl)) else None


def _conv_valid(d: int) -> Callable[[Mapping[str, str]], bool]:
    def valid(row: Mapping[str, str]) -> bool:
        if not _valid_scale(row):
            return False
        if all(name in row for name in ("kernel", "stride", "padding", "dilation")):
            return _conv_out(row, d) is not None
        return True

    return valid


def _conv_row(row: Row, d: int) -> CaseSpec:
    n, c, o, size = _CONV_SHAPES[d]
    kernel = _conv_kernel(row["kernel"], d)
    r = rank_of(row["rank"], o, c * int(np.prod(kernel)))
    alpha, rslora = scale_params(row["scale"], r)
    action = row["action"]
    weights = {"W": ((o, c) + kernel, 1.0), "A": ((r, c) + kernel, 1.0), "B": ((o, r) + (1,) * d, 1.0)}
    if action in ("forward", "backward"):
        geometry = {name: _conv_axis(row[name], d) for name in ("stride", "padding", "dilation")}
        inputs = {"x": ((n, c) + size, 2.0), **weights, "b": ((o,), 1.0)}
        if action == "backward":
            inputs["dy"] = ((n, o) + _conv_out(row, d), 1.0)
            geometry["want_base_grads"] = True
        params = linear_params(r, alpha, rslora=rslora, **geometry)
        family = f"conv{d}d.forward"
    else:
        inputs = weights if action == "merge" else {"W_merged": ((o, c) + kernel, 4.0), "A": weights["A"], "B": weights["B"]}
        params = linear_params(r, alpha, rslora=rslora)
        family = f"conv{d}d.merge"
    return _pw(f"conv{d}d", row, family, action, f"conv{d}d.{action}", params, inputs, f"covering row {dict(row)}")


def _mixed_row(row: Row) -> CaseSpec:
    ranks = {"r1_r3": (1, 3), "r3_r_past": (3, rank_past(min(LIN_OUT, LIN_IN)))}[row["ranks"]]
    labels = {"exact_rslora": ("exact", "rslora"), "non_dyadic_exact": ("non_dyadic", "exact")}[row["scales"]]
    adapters = []
    for r, label in zip(ranks, labels):
        alpha, rslora = scale_params(label if not (r == 1 and label == "non_dyadic") else "exact", r)
        adapters.append(linear_params(r, alpha, rslora=rslora))
    rows = (6,) if row["x"] == "2d" else (6, 2)
    inputs: dict[str, tuple[tuple[int, ...], float]] = {"x": (rows + (LIN_IN,), 2.0), "W": ((LIN_OUT, LIN_IN), 1.0), "index": ((6,), 2)}
    if row["action"] == "forward":
        inputs["b"] = ((LIN_OUT,), 1.0)
    else:
        inputs["dy"] = (rows + (LIN_OUT,), 1.0)
    for i, r in enumerate(ranks):
        inputs[f"A.{i}"], inputs[f"B.{i}"] = ((r, LIN_IN), 1.0), ((LIN_OUT, r), 1.0)
    return _pw("mixed_batch", row, "mixed_batch", row["action"], f"mixed_batch.{row['action']}", {"adapters": adapters}, inputs,
               f"covering row {dict(row)}; x [batch, seq, in] with one index per batch row when 3-D", _every_route)


def _dora_row(row: Row) -> CaseSpec:
    r = rank_of(row["rank"], LIN_OUT, LIN_IN)
    alpha, rslora = scale_params(row["scale"], r)
    action = row["action"]
    every = {"x": ((3, LIN_IN), 2.0), "W": ((LIN_OUT, LIN_IN), 1.0), "b": ((LIN_OUT,), 1.0), "A": ((r, LIN_IN), 1.0),
             "B": ((LIN_OUT, r), 1.0), "magnitude": ((LIN_OUT,), 4.0), "dy": ((3, LIN_OUT), 1.0)}
    names = {"forward": ("x", "W", "b", "A", "B", "magnitude"), "backward": ("x", "W", "b", "A", "B", "magnitude", "dy"),
             "merge": ("W", "A", "B", "magnitude"), "unmerge_exact": ("W", "A", "B", "magnitude")}[action]
    extra = {"exact": True} if action == "unmerge_exact" else {}
    return _pw("dora", row, "dora", action, "dora." + action.split("_")[0], linear_params(r, alpha, rslora=rslora, **extra),
               {k: every[k] for k in names}, f"covering row {dict(row)}")


def _combine_row(row: Row) -> CaseSpec:
    plain, rs = linear_params(1, 2), linear_params(3, 7, rslora=True)
    adapters = [plain, rs] if row["first"] == "plain" else [rs, plain]
    ranks = [a["r"] for a in adapters]
    method = row["method"]
    params: dict[str, Any] = {"adapters": adapters, "weights": [0.75, -1.5]}
    if method != "cat":  # sum of ranks 4 < min(out, in) = 5
        params["rank"] = {"svd_sum": sum(ranks), "svd_min": min(LIN_OUT, LIN_IN), "svd_past_min": min(LIN_OUT, LIN_IN) + 1}[method]
    shapes: dict[str, tuple[tuple[int, ...], float]] = {}
    for i, r in enumerate(ranks):
        shapes[f"A.{i}"], shapes[f"B.{i}"] = ((r, LIN_IN), 1.0), ((LIN_OUT, r), 1.0)
    return _pw("combine", row, "combine", method, "combine." + ("cat" if method == "cat" else "svd"), params, shapes,
               f"covering row {dict(row)}: ranks {ranks}, svd rank at / past the sum of ranks and min(out, in)")


def _conv_family(d: int, merge: bool) -> Family:
    if merge:
        dims = (DTYPE, RANK, SCALE, Dimension("kernel", ("k1", "k3", "k_ns"), "1, 3 and a non-square kernel per axis"),
                Dimension("action", ("merge", "unmerge"), "merge, fast unmerge"))
        return Family(f"conv{d}d.merge", (f"conv{d}d.merge", f"conv{d}d.unmerge"), dims, _valid_scale, lambda row: _conv_row(row, d))
    geometry = (Dimension("kernel", ("k1", "k3", "k_ns"), "kernel 1, 3, or non-square per axis (3x2, 3x2x1; 2 for Conv1d)"),
                Dimension("stride", ("s1", "s2", "s_axis"), "stride 1, 2, or per axis (2 then 1s; 3 for Conv1d)"),
                Dimension("padding", ("p0", "p1", "p_axis"), "zero padding 0, 1, or per axis (1 then 0s; 2 for Conv1d)"),
                Dimension("dilation", ("d1", "d2", "d_axis"), "dilation 1, 2, or per axis (1s then 2; 3 for Conv1d)"),
                Dimension("action", ("forward", "backward"), "forward; backward with dW, db"))
    return Family(f"conv{d}d.forward", (f"conv{d}d.forward", f"conv{d}d.backward"), (DTYPE, RANK, SCALE) + geometry,
                  _conv_valid(d), lambda row: _conv_row(row, d), note=f"input {'x'.join(map(str, _CONV_SHAPES[d][3]))}")


#: DoRA kinds of the fast-unmerge family: (operation group, W shape, W's channel axis).
_DORA_KINDS = {"linear": ("dora", (LIN_OUT, LIN_IN), 0), "embedding": ("dora_embedding", (V_EMB, D_EMB), 1),
               **{f"conv{d}d": (f"dora_conv{d}d", (_CONV_SHAPES[d][2], _CONV_SHAPES[d][1]) + _conv_kernel("k_ns" if d > 1 else "k3", d), 0)
                  for d in (1, 2, 3)}}


def _dora_fast_unmerge_row(row: Row) -> CaseSpec:
    """W = W_merged / g − ΔW with the merge-time norm n an input (issue 11: fast unmerge of every DoRA kind)."""
    group, shape, axis = _DORA_KINDS[row["kind"]]
    out_f, in_f = shape[axis], int(np.prod(shape)) // shape[axis]
    r = rank_of(row["rank"], out_f, in_f)
    alpha, rslora = scale_params(row["scale"], r)
    if row["kind"] == "embedding":
        factors = {"A": ((r, shape[0]), 1.0), "B": ((shape[1], r), 1.0)}
    else:
        factors = {"A": ((r,) + shape[1:], 1.0), "B": ((shape[0], r) + (1,) * (len(shape) - 2), 1.0)}
    inputs = {"W_merged": (shape, 1.0), **factors, "magnitude": ((out_f,), 4.0), "norm": ((out_f,), 2.0)}
    return _pw(group, row, "dora.unmerge_fast", "unmerge_fast", f"{group}.unmerge", linear_params(r, alpha, rslora=rslora, exact=False),
               inputs, f"covering row {dict(row)}: W = W_merged / g − ΔW, g = m / n with n the merge-time norm (an input)")


def _dora_dropout_row(row: Row) -> CaseSpec:
    """Linear DoRA in training with a given mask: PEFT's formula, base on x, the DoRA terms on x ∘ mask (SPEC 4.3)."""
    r = rank_of(row["rank"], LIN_OUT, LIN_IN)
    alpha, rslora = scale_params(row["scale"], r)
    rows = _ROWS[row["rows"]]
    every = {"x": (rows + (LIN_IN,), 2.0), "W": ((LIN_OUT, LIN_IN), 1.0), "b": ((LIN_OUT,), 1.0), "A": ((r, LIN_IN), 1.0),
             "B": ((LIN_OUT, r), 1.0), "magnitude": ((LIN_OUT,), 4.0), "dropout_mask": (rows + (LIN_IN,), 1.0),
             "dy": (rows + (LIN_OUT,), 1.0)}
    names = ("x", "W", "b", "A", "B", "magnitude", "dropout_mask") + (("dy",) if row["action"] == "backward" else ())
    return _pw("dora", row, "dora.dropout", f"{row['action']}_dropout", f"dora.{row['action']}",
               linear_params(r, alpha, rslora=rslora, lora_dropout=0.5), {k: every[k] for k in names},
               f"covering row {dict(row)}: training with a given inverted-dropout mask (p = 1/2)")


#: Tree shapes: (parents, visits). A stack is a chain merged in order, unmerged LIFO one step, then two at once, rebuilt, then two;
#: a tree's switches walk between branches through their lowest common ancestor (−1: the bare base).
_TREES = {"stack": ([None, 0, 1], [0, 1, 2, 1, -1, 2, 0]), "tree": ([None, 0, 1, 0], [2, 3, 1, 2, -1, 3])}
#: Node adapters: ranks and scales differ (exact, rsLoRA, exact, non-dyadic); which nodes are DoRA per variant.
_TREE_ADAPTERS = ((2, 4.0, False), (3, 7.0, True), (1, 2.0, False), (2, 5.0, False))
_TREE_DORA = {"plain": (), "dora": (0, 1, 2, 3), "mixed": (1, 3)}
#: Per kind: (operation group, W shape); Conv kernels not square.
_TREE_KINDS = {"linear": ("tree_linear", (LIN_OUT, LIN_IN)), "embedding": ("tree_embedding", (V_EMB, D_EMB)),
               "conv1d": ("tree_conv1d", (4, 3, 3)), "conv2d": ("tree_conv2d", (4, 3, 3, 2)), "conv3d": ("tree_conv3d", (3, 2, 3, 2, 1))}


def _tree_row(row: Row) -> CaseSpec:
    """Exact switches between the nodes of an adapter tree or a merged stack (SPEC M.2, M.4)."""
    group, shape = _TREE_KINDS[row["kind"]]
    parents, visits = _TREES[row["shape"]]
    inputs: dict[str, tuple[tuple[int, ...], float]] = {"W": (shape, 1.0)}
    adapters = []
    for i, (r, alpha, rslora) in enumerate(_TREE_ADAPTERS[: len(parents)]):
        adapters.append(linear_params(r, alpha, rslora=rslora))
        if row["kind"] == "embedding":
            inputs[f"A.{i}"], inputs[f"B.{i}"] = ((r, shape[0]), 1.0), ((shape[1], r), 1.0)
        else:
            inputs[f"A.{i}"], inputs[f"B.{i}"] = ((r,) + shape[1:], 1.0), ((shape[0], r) + (1,) * (len(shape) - 2), 1.0)
        if i in _TREE_DORA[row["variant"]]:
            inputs[f"magnitude.{i}"] = ((shape[1 if row["kind"] == "embedding" else 0],), 4.0)
    return _pw(group, row, "tree", "switch", f"{group}.switch", {"adapters": adapters, "parents": parents, "visits": visits, "exact": True},
               inputs, f"covering row {dict(row)}: parents {parents}, visits {visits} (-1 = base); each switch unmerges to the "
               "common ancestor (LIFO) and merges down; a revisited state must be bitwise the first one")


#: The coverage table: every operation family, its independent dimensions and values (SPEC C.2 renders it).
COVERAGE: tuple[Family, ...] = (
    Family("linear.forward", ("linear.forward",), (
        DTYPE, RANK, SCALE,
        Dimension("weight", ("out_in", "in_out"), "W stored [out, in], or [in, out] (fan_in_fan_out)"),
        Dimension("bias", ("none", "bias", "lora_bias"), "no bias; base bias; base bias and lora_bias (scaled by s)"),
        Dimension("rows", tuple(_ROWS), "x [3, in], [2, 3, in] (3-D), [1, in], [0, in] (empty batch)"),
        Dimension("dropout", ("eval", "mask"), "lora_dropout > 0 at inference (off); training with a given mask")),
        _valid_scale, lambda row: _linear_row(row, "forward"), note=f"out {LIN_OUT}, in {LIN_IN}"),
    Family("linear.backward", ("linear.backward",), (
        DTYPE, RANK, SCALE,
        Dimension("weight", ("out_in", "in_out"), "W stored [out, in], or [in, out] (fan_in_fan_out)"),
        Dimension("lora_bias", ("no_lora_bias", "lora_bias"), "without / with lora_bias"),
        Dimension("rows", tuple(_ROWS), "x [3, in], [2, 3, in] (3-D), [1, in], [0, in] (empty batch)"),
        Dimension("dropout", ("eval", "mask"), "no mask; training with a given mask"),
        Dimension("base_grads", ("no_dW", "dW"), "LoRA gradients only; also dW, db (and dlora_bias)")),
        _valid_scale, lambda row: _linear_row(row, "backward")),
    Family("linear.merge", ("linear.merge",), (
        DTYPE, RANK, SCALE,
        Dimension("weight", ("out_in", "in_out"), "W stored [out, in], or [in, out] (fan_in_fan_out)"),
        Dimension("values", ("random", "special"), "random; NaN payloads, ±inf, ±0, subnormals (float32's too), overflow (W 10x12)")),
        _valid_scale, lambda row: _linear_row(row, "merge")),
    Family("linear.unmerge", ("linear.unmerge",), (
        DTYPE, RANK, SCALE,
        Dimension("weight", ("out_in", "in_out"), "W stored [out, in], or [in, out] (fan_in_fan_out)"),
        Dimension("mode", ("fast", "exact"), "fast: round(W_merged − s B A); exact: round trip with the residual, bitwise"),
        Dimension("values", ("random", "special"), "random; NaN payloads, ±inf, ±0, subnormals (float32's too), overflow (W 10x12)")),
        _valid_scale, lambda row: _linear_row(row, "unmerge")),
    Family("embedding.forward", ("embedding.forward",), (
        DTYPE, RANK, SCALE, Dimension("ids", tuple(_IDS), "ids [2, 4], [7], [3, 4] with a repeated id")),
        _valid_scale, lambda row: _embedding_row(row, "forward"), note=f"V {V_EMB}, D {D_EMB}"),
    Family("embedding.backward", ("embedding.backward",), (
        DTYPE, RANK, SCALE, Dimension("ids", tuple(_IDS), "ids [2, 4], [7], [3, 4] with a repeated id (scatter-add)"),
        Dimension("base_grads", ("no_dW", "dW"), "LoRA gradients only; also dW")),
        _valid_scale, lambda row: _embedding_row(row, "backward")),
    Family("embedding.merge", ("embedding.merge", "embedding.unmerge"), (
        DTYPE, RANK, SCALE, Dimension("action", ("merge", "unmerge"), "merge, fast unmerge")),
        _valid_scale, lambda row: _embedding_row(row, "merge")),
    *(_conv_family(d, merge) for d in (1, 2, 3) for merge in (False, True)),
    Family("mixed_batch", ("mixed_batch.forward", "mixed_batch.backward"), (
        DTYPE, Dimension("ranks", ("r1_r3", "r3_r_past"), "adapter ranks (1, 3) or (3, r_past)"),
        Dimension("scales", ("exact_rslora", "non_dyadic_exact"), "adapter scales: (exact, rsLoRA) or (non-dyadic, exact)"),
        Dimension("x", ("2d", "3d"), "x [6, in], or [6, 2, in] with one adapter index per batch row"),
        Dimension("action", ("forward", "backward"), "forward with bias; backward")),
        lambda row: True, _mixed_row),
    Family("dora", ("dora.forward", "dora.backward", "dora.merge", "dora.unmerge"), (
        DTYPE, RANK, SCALE, Dimension("action", ("forward", "backward", "merge", "unmerge_exact"), "DoRA (Linear) operations")),
        _valid_scale, _dora_row),
    Family("dora.unmerge_fast", tuple(f"{group}.unmerge" for group, _, _ in _DORA_KINDS.values()), (
        DTYPE, RANK, SCALE, Dimension("kind", tuple(_DORA_KINDS), "the DoRA layer kind (W 5x7; Embedding 9x6; Conv1d 4x3x3, "
                                      "Conv2d 4x3x3x2, Conv3d 3x2x3x2x1)")),
        _valid_scale, _dora_fast_unmerge_row, note="the merge-time norm n is an input"),
    Family("dora.dropout", ("dora.forward", "dora.backward"), (
        DTYPE, RANK, SCALE, Dimension("rows", ("rows3", "rows1", "rows0"), "x [3, in], [1, in], [0, in] (empty batch)"),
        Dimension("action", ("forward", "backward"), "training forward; backward (dx, dA, dB, dmagnitude, db)")),
        _valid_scale, _dora_dropout_row, note="mask p = 1/2 (entries 0 or 2)"),
    Family("tree", tuple(f"{group}.switch" for group, _ in _TREE_KINDS.values()), (
        DTYPE, Dimension("kind", tuple(_TREE_KINDS), "the layer kind (W 5x7; Embedding 9x6; Conv1d 4x3x3, Conv2d 4x3x3x2, "
                                   "Conv3d 3x2x3x2x1)"),
        Dimension("shape", tuple(_TREES), "a merged stack of 3 (merge in order, unmerge LIFO, rebuild) or a tree of 4 nodes "
                                         "(switches through the common ancestor, the base, back)"),
        Dimension("variant", tuple(_TREE_DORA), "plain nodes; every node DoRA (norms of the weight as merged so far); "
                                                "DoRA and plain nodes mixed")),
        lambda row: True, _tree_row, note="exact mode; ranks 2, 3, 1, 2 with exact, rsLoRA, exact and non-dyadic scales"),
    Family("combine", ("combine.cat", "combine.svd"), (
        DTYPE, Dimension("method", ("cat", "svd_sum", "svd_min", "svd_past_min"),
                         "cat; svd at rank = Σ r_i (4), = min(out, in) (5), past min(out, in) (6)"),
        Dimension("first", ("plain", "rslora"), "which adapter comes first (the combined scale must stay 1)")),
        lambda row: True, _combine_row),
)


def _covering_cases() -> Iterator[CaseSpec]:
    """Every family's pairwise rows, built into cases."""
    for family in COVERAGE:
        for row in family.rows():
            yield family.build(row)


# -- expected refusals (SPEC C.4): inputs an implementation must refuse with a typed error -------
def _set_first(name: str, value: int) -> Callable[[dict[str, np.ndarray], np.dtype], None]:
    """Set the first element of integer input ``name`` (ids or adapter index) to ``value``."""

    def special(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
        arrays[name].reshape(-1)[0] = value

    return special


def _nan_in_A(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    arrays["A"][0, 1] = np.nan


def _inf_in_B(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    arrays["B"][1, 0] = -np.inf


def _refusal_cases() -> Iterator[CaseSpec]:
    """Cases whose expected outcome is a refusal: an implementation that wraps, clamps or broadcasts fails them."""

    def case(name: str, operation: str, dtype: str, params: dict, inputs: dict, why: str, special=None) -> CaseSpec:
        return CaseSpec("refusal", f"{name}-{dtype}", operation, dtype, params, inputs, why, special, refusal=why)

    emb = {"ids": ((2, 4), V_EMB), "W": ((V_EMB, D_EMB), 1.0), "A": ((3, V_EMB), 1.0), "B": ((D_EMB, 3), 1.0)}
    for dtype in ("float32", "bfloat16"):
        yield case("embedding-id_eq_V", "embedding.forward", dtype, linear_params(3, 6), emb,
                   f"token id V = {V_EMB} is outside [0, V): clamping reads the last row", _set_first("ids", V_EMB))
    for dtype in ("float32", "float16"):
        yield case("embedding-id_negative", "embedding.forward", dtype, linear_params(3, 6), emb,
                   "token id -1 is outside [0, V): Python/NumPy indexing wraps it to the last row", _set_first("ids", -1))
    yield case("embedding_backward-id_negative", "embedding.backward", "float32", linear_params(3, 6),
               {**emb, "dy": ((2, 4, D_EMB), 1.0)}, "token id -1 in backward: a scatter-add wraps it to the last row",
               _set_first("ids", -1))
    mixed = {"x": ((6, LIN_IN), 2.0), "W": ((LIN_OUT, LIN_IN), 1.0), "index": ((6,), 2),
             "A.0": ((2, LIN_IN), 1.0), "B.0": ((LIN_OUT, 2), 1.0), "A.1": ((3, LIN_IN), 1.0), "B.1": ((LIN_OUT, 3), 1.0)}
    two = {"adapters": [linear_params(2, 4), linear_params(3, 7, rslora=True)]}
    for dtype in ("float32", "bfloat16"):
        yield case("mixed-index_eq_n", "mixed_batch.forward", dtype, two, mixed,
                   "adapter index 2 with 2 adapters: out of range, not the base", _set_first("index", 2))
        yield case("mixed-index_minus2", "mixed_batch.forward", dtype, two, mixed,
                   "adapter index -2 (only -1 means the base): negative indexing wraps it to adapter 0", _set_first("index", -2))
    for dtype in ("float32", "bfloat16"):
        yield case("mixed-index_short", "mixed_batch.forward", dtype, two, {**mixed, "index": ((5,), 2)},
                   "5 adapter indices for 6 rows: the last row has no routing")
    fwd = _linear_inputs((3,), LIN_IN, LIN_OUT, 3, names=("x", "W", "b", "A", "B"))
    for dtype in ("float32", "float16"):
        yield case("linear-x_width", "linear.forward", dtype, linear_params(3, 6), {**fwd, "x": ((3, LIN_IN + 1), 2.0)},
                   f"x has {LIN_IN + 1} features, W and A take {LIN_IN}")
        yield case("linear-B_rows", "linear.forward", dtype, linear_params(3, 6), {**fwd, "B": ((LIN_OUT - 1, 3), 1.0)},
                   f"B has {LIN_OUT - 1} rows, W has {LIN_OUT} outputs")
    yield case("linear-bias_len", "linear.forward", "bfloat16", linear_params(3, 6), {**fwd, "b": ((1,), 1.0)},
               "bias of length 1 for 5 outputs: broadcasting it is silently wrong")
    mrg = _linear_inputs((), LIN_IN, LIN_OUT, 3, names=("W", "A", "B"))
    for dtype in ALL_DTYPES:
        yield case("merge-B_one_row", "linear.merge", dtype, linear_params(3, 6), {**mrg, "B": ((1, 3), 1.0)},
                   "B [1, r] for a W with 5 rows: broadcasting B A over W's rows is silently wrong")
    for dtype in ("float32", "bfloat16"):
        yield case("merge-nan_factor", "linear.merge", dtype, linear_params(3, 6, safe_merge=True), mrg,
                   "a NaN in A at a safe merge: must be refused, not merged into the weight", _nan_in_A)
    yield case("merge-inf_factor", "linear.merge", "float16", linear_params(3, 6, safe_merge=True), mrg,
               "-inf in B at a safe merge: must be refused", _inf_in_B)
    conv = {"x": ((1, 3, 6, 7), 2.0), "W": ((4, 3, 3, 3), 1.0), "b": ((4,), 1.0), "A": ((2, 2, 3, 3), 1.0), "B": ((4, 2, 1, 1), 1.0)}
    yield case("conv2d-A_channels", "conv2d.forward", "float32", linear_params(2, 4, stride=1, padding=1), conv,
               "lora_A has 2 input channels, the base conv 3")
    yield case("conv2d-merge_kernel", "conv2d.merge", "float32", linear_params(2, 4),
               {"W": ((4, 3, 3, 3), 1.0), "A": ((2, 3, 1, 1), 1.0), "B": ((4, 2, 1, 1), 1.0)},
               "lora_A's kernel 1x1 for a 3x3 base kernel: B A does not have the kernel's shape")


# -- semantic guards (SPEC C.5): inputs that make every semantic error exceed even the storage bound ---
def _positive(factors: Mapping[str, float], pattern: Callable[[dict[str, np.ndarray], np.dtype], None] | None = None):
    """Make every float input |v|·factor + factor/4 (stored in t), then apply ``pattern``.

    With every input positive nothing cancels: M = |y| and the storage bound is γ_K(u_t)|y| +
    ½ ulp, a few percent of |y| for small K. The factors make the LoRA term dominate (W, b scaled
    down), so a scale off by √r, a transposed factor or a dropped term moves y by a large fraction
    of itself: many times the storage bound.
    """

    def special(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
        for name, array in arrays.items():
            if name not in INDEX_INPUTS and name != "dropout_mask":  # (bfloat16's dtype kind is not "f")
                f = factors.get(name.split(".")[0], 1.0)
                arrays[name] = round_to(np.abs(array.astype(np.float64)) * f + f / 4, dtype)
        if pattern is not None:
            pattern(arrays, dtype)

    return special


def _triangular_weight(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """W[i, j] = 1 below the diagonal, 1/16 elsewhere: W and Wᵀ give very different x Wᵀ."""
    W = arrays["W"]
    W[...] = round_to(np.where(np.tri(*W.shape, -1, dtype=bool), 1.0, 1 / 16), dtype)


def _parity_input(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """x = 1 at even columns, 1/8 at odd ones: taps two apart (dilation 2) and adjacent taps see different sums."""
    x = arrays["x"]
    x[...] = round_to(np.where(np.arange(x.shape[-1]) % 2 == 0, 1.0, 0.125) * np.ones(x.shape), dtype)


def _semantic_cases() -> Iterator[CaseSpec]:
    """Small contractions, positive inputs, a dominant LoRA term: semantic bugs fail in both tiers."""

    def case(name: str, operation: str, dtype: str, params: dict, inputs: dict, description: str, special) -> CaseSpec:
        return CaseSpec("semantic", f"{name}-{dtype}", operation, dtype, params, inputs, description, special)

    small = lambda names, fifo=False, n=4: _linear_inputs((3,), n, 3 if not fifo else n, 4, fan_in_fan_out=fifo, names=names)  # noqa: E731
    lora_heavy = _positive({"W": 1 / 16, "b": 1 / 4, "lora_bias": 1 / 4})
    rs = linear_params(4, 8, rslora=True)  # s = 8/√4 = 4; a scale of alpha/r is 2: off by a factor 2
    for dtype in ("bfloat16", "float16"):
        yield case("linear-forward-rslora", "linear.forward", dtype, rs, small(("x", "W", "b", "A", "B", "lora_bias")),
                   "rsLoRA r = 4 with positive inputs and a dominant LoRA term: s = alpha/r, an unscaled lora_bias, "
                   "a dropped bias all exceed the storage bound", lora_heavy)
        yield case("linear-merge-rslora", "linear.merge", dtype, rs, small(("W", "A", "B")),
                   "rsLoRA merge with a dominant delta: a scale off by √r exceeds the storage bound", lora_heavy)
    yield case("linear-backward-rslora", "linear.backward", "bfloat16", {**rs, "want_base_grads": True},
               small(("x", "dy", "W", "A", "B", "lora_bias")), "rsLoRA gradients with positive inputs: s off by √r in dA, dB, dx",
               lora_heavy)
    yield case("linear-forward-fan_in_fan_out_square", "linear.forward", "bfloat16", linear_params(4, 2, fan_in_fan_out=True),
               small(("x", "W", "A", "B"), fifo=True), "square W [in, out] that is far from symmetric, dominant base: "
               "a missing transpose exceeds the storage bound", _positive({"A": 1 / 16, "B": 1 / 16}, _triangular_weight))
    yield case("linear-merge-fan_in_fan_out_square", "linear.merge", "bfloat16", linear_params(4, 8, fan_in_fan_out=True),
               small(("W", "A", "B"), fifo=True), "square [in, out] merge, delta far from symmetric: a delta not transposed "
               "exceeds the storage bound", _positive({"W": 1 / 16}, lambda a, t: a["B"].__setitem__(..., round_to(
                   np.tri(*a["B"].shape, dtype=np.float64) + 1 / 16, t))))
    emb = {"ids": ((2, 3), 6), "W": ((6, 3), 1.0), "A": ((4, 6), 1.0), "B": ((3, 4), 1.0)}
    yield case("embedding-forward-rslora", "embedding.forward", "bfloat16", rs, emb,
               "Embedding rsLoRA with a dominant LoRA term: s off by √r exceeds the storage bound", _positive({"W": 1 / 16}))
    yield case("embedding-merge-rslora", "embedding.merge", "bfloat16", rs, {k: v for k, v in emb.items() if k != "ids"},
               "Embedding merge (Δ = s Aᵀ Bᵀ): s off by √r, or B A reshaped instead of transposed, exceeds the storage bound",
               _positive({"W": 1 / 16}))
    conv = {"x": ((1, 1, 8, 11), 1.0), "W": ((2, 1, 3, 3), 1.0), "b": ((2,), 1.0), "A": ((2, 1, 3, 3), 1.0), "B": ((2, 2, 1, 1), 1.0)}
    for dtype in ("bfloat16", "float16"):
        yield case("conv2d-forward-dilation2_stride3", "conv2d.forward", dtype, linear_params(2, 8, stride=3, padding=0, dilation=2),
                   conv, "dilation 2, stride 3 (the output size is the same without dilation), x alternating 1 and 1/8 by column, "
                   "dominant LoRA term: a lora_A without dilation exceeds the storage bound", _positive({"W": 1 / 16, "b": 1 / 16}, _parity_input))
    mixed = {"x": ((4, 4), 1.0), "W": ((3, 4), 1.0), "b": ((3,), 1.0), "index": ((4,), 2),
             "A.0": ((1, 4), 1.0), "B.0": ((3, 1), 1.0), "A.1": ((4, 4), 1.0), "B.1": ((3, 4), 1.0)}
    route = lambda a, t: a["index"].__setitem__(..., np.array([1, -1, 0, 1]))  # noqa: E731
    yield case("mixed-forward-rslora", "mixed_batch.forward", "bfloat16", {"adapters": [linear_params(1, 2), rs]}, mixed,
               "mixed batch, second adapter rsLoRA r = 4, dominant LoRA terms, a base-only row: a wrong scale or a wrapped -1 "
               "exceeds the storage bound", _positive({"W": 1 / 16, "b": 1 / 16}, route))
    dora = {"x": ((3, 4), 1.0), "W": ((3, 4), 1.0), "b": ((3,), 1.0), "A": ((4, 4), 1.0), "B": ((3, 4), 1.0), "magnitude": ((3,), 4.0)}
    yield case("dora-forward-rslora", "dora.forward", "bfloat16", rs, dora,
               "DoRA rsLoRA with positive inputs and a dominant delta: a norm without the delta exceeds the storage bound",
               _positive({"W": 1 / 16, "b": 4.0}))
    yield case("dora-forward-bias", "dora.forward", "bfloat16", rs, dora,
               "DoRA with small W, A, B (gain m/‖W + sBA‖ far above 1) and a bias that dominates y: a bias scaled by the gain "
               "exceeds the storage bound", _positive({"W": 1 / 16, "A": 1 / 16, "B": 1 / 16, "b": 4.0}))


#: Builders of case specs, one per layer kind; each yields CaseSpecs with unique ids.
BUILDERS: list[Callable[[], Iterator[CaseSpec]]] = [_linear_cases, _layer_cases, _conv_nd_cases, _dora_layer_cases, _cell_cases, _combine_cases,
                                                    _dropout_and_conv_combine_cases,
                                                    _covering_cases, _refusal_cases, _semantic_cases]


def all_cases() -> list[CaseSpec]:
    """Every frozen case, in a fixed order."""
    specs = [spec for build in BUILDERS for spec in build()]
    ids = [spec.case_id for spec in specs]
    if len(set(ids)) != len(ids):
        raise AssertionError("duplicate case ids in the catalog")
    return specs
