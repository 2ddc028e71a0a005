"""The frozen case set: every case's operation, dtype, parameters, input shapes and seed.

Inputs come from :class:`Stream`, a SplitMix64 generator written out here (not NumPy's,
whose streams may change between releases), as multiples of 2^-23 in [-1, 1) times a
power-of-two spread, then rounded once to the case dtype: the inputs, like the exact
oracle, are bit-for-bit reproducible anywhere.

To add cases for a new operation, append :class:`CaseSpec` entries in a ``_<kind>_cases``
function and list it in :data:`BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from ..config import lora_scale
from ..dtypes import STORAGE_DTYPES, round_to

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
    seed: int
    description: str
    special: Callable[[dict[str, np.ndarray], np.dtype], None] | None = field(default=None, compare=False)

    @property
    def case_id(self) -> str:
        return f"{self.group}/{self.name}"

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
            if name == "magnitude":  # DoRA magnitudes are positive
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
              "dropout_mask": (rows + (n_in,), 1.0), "W_merged": ((n_out, n_in), 4.0)}
    return {name: shapes[name] for name in names}


def _special_weight(arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """Put NaN (with payloads), ±inf, ±0, subnormals and an overflowing element into W.

    Row 0: A >= 0 with A[:, 0] = 1 and B[0] = ulp(max finite), so Δ[0, 0] = s·r·ulp(max) >
    ulp(max)/2 and W[0, 0] = max finite overflows to inf. Row 1: B[1] = 0, so Δ[1, :] = 0
    exactly and W's specials there meet a zero delta.
    """
    W, A, B = arrays["W"], arrays["A"], arrays["B"]
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
    nans = np.array([quiet_nan_payload, quiet_nan_payload | sign_bit], dtype=width).view(dtype)
    W[2, 1:3] = nans
    W[3, 0] = nans[0]


def _linear_cases() -> Iterator[CaseSpec]:
    seed = 1000
    common = dict(rows=(3,), n_in=24, n_out=16, r=4)

    def case(name: str, operation: str, dtype: str, params: dict, inputs: dict, description: str, special=None) -> CaseSpec:
        nonlocal seed
        seed += 1
        return CaseSpec("linear", f"{name}-{dtype}", operation, dtype, params, inputs, seed, description, special)

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
    arrays["ids"][0, 0] = arrays["ids"][1, 3] = arrays["ids"][0, 4] = 7


def _layer_cases() -> Iterator[CaseSpec]:
    """Embedding, Conv2d, mixed batch and DoRA (Linear) cases."""
    seed = 5000

    def case(group: str, name: str, operation: str, dtype: str, params: dict, inputs: dict, description: str, special=None) -> CaseSpec:
        nonlocal seed
        seed += 1
        return CaseSpec(group, f"{name}-{dtype}", operation, dtype, params, inputs, seed, description, special)

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
    seed = 7000

    def case(d: int, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        nonlocal seed
        seed += 1
        return CaseSpec(f"conv{d}d", f"{name}-{dtype}", f"conv{d}d.{operation}", dtype, params, shapes, seed, description)

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
    seed = 9000

    def case(group: str, name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        nonlocal seed
        seed += 1
        return CaseSpec(group, f"{name}-{dtype}", f"{group}.{operation}", dtype, params, shapes, seed, description)

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


def _combine_cases() -> Iterator[CaseSpec]:
    """Weighted combination of two adapters (SPEC M.3): cat (exact stacking) and svd (lossless and truncated)."""
    seed = 11000

    def case(name: str, operation: str, dtype: str, params: dict, shapes: dict, description: str) -> CaseSpec:
        nonlocal seed
        seed += 1
        return CaseSpec("combine", f"{name}-{dtype}", operation, dtype, params, shapes, seed, description)

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
    gap = {"adapters": [linear_params(3, 6), linear_params(2, 4)], "weights": [1.0, 2.0**-6], "rank": 3}
    for dtype in ALL_DTYPES:
        yield case("svd-truncated", "combine.svd", dtype, gap, factors((3, 2)),
                   "rank 3 of 5, the second adapter weighted 2^-6: the discarded singular values are small")


#: Builders of case specs, one per layer kind; each yields CaseSpecs with unique ids.
BUILDERS: list[Callable[[], Iterator[CaseSpec]]] = [_linear_cases, _layer_cases, _conv_nd_cases, _dora_layer_cases, _combine_cases]


def all_cases() -> list[CaseSpec]:
    """Every frozen case, in a fixed order."""
    specs = [spec for build in BUILDERS for spec in build()]
    ids = [spec.case_id for spec in specs]
    if len(set(ids)) != len(ids):
        raise AssertionError("duplicate case ids in the catalog")
    return specs
