"""The fast paths for many small tensors give bitwise what the per-tensor paths give.

- ``merge_many`` (one stacked correctly rounded evaluation) against ``merge`` one weight at a time
  (itself checked against an exact rational oracle in test_merge_semantics.py): merged bits,
  residual indices, values and checksums, and the same refusal (type and message) on bad input;
  weights near rounding boundaries, ±inf/NaN, zeros and float64-range scales included, so the
  fallbacks (undecided elements, near overflow, non-finite factors) run too.
- ``merge_checkpoint`` with runs of small tensors against the same merge with a block budget too
  small for any run (every tensor on its own): the merged file and the residual file byte for byte,
  on a checkpoint that mixes runs, large tensors, a dtype change, DoRA and lora_bias.
(The safetensors header and gathered-write checks of the same change live in test_header_speed.py.)
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.config import LoraConfig
from lora_ref.dtypes import bfloat16, bits_of, resolve_dtype
from lora_ref.errors import LoraRefError
from lora_ref.linear import LinearDelta
from lora_ref.safetensors_io import save_file

pytestmark = pytest.mark.usefixtures("kernel_path")  # on the NumPy and the numba evaluation (conftest.py)

merge_module = importlib.import_module("lora_ref.merge")  # the attribute lora_ref.merge is the function
merge, merge_many = merge_module.merge, merge_module.merge_many
STORAGE = ["float32", "float16", "bfloat16"]

#: Values that put W + Δ on or near rounding boundaries, or at the edges of the formats.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0**-24, 2.0**-149, 65504.0, 3.0e38, np.inf, -np.inf, np.nan, 1 + 2.0**-23]


def _values(draw, shape, dtype, special_weight: bool = True) -> np.ndarray:
    size = int(np.prod(shape))
    base = draw(st.lists(st.one_of(st.floats(-4, 4, width=32), st.sampled_from(SPECIAL)) if special_weight
                         else st.floats(-4, 4, width=32), min_size=size, max_size=size))
    with np.errstate(over="ignore"):
        return np.array(base, dtype=np.float64).astype(dtype).reshape(shape)


@st.composite
def stacks(draw):
    dtype = resolve_dtype(draw(st.sampled_from(STORAGE)))
    k, rows, cols, rank = draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    factor_dtype = resolve_dtype(draw(st.sampled_from(["float32", "bfloat16", "float64"])))
    W = _values(draw, (k, rows, cols), dtype)
    deltas = []
    for i in range(k):
        A = _values(draw, (rank, cols), factor_dtype, special_weight=draw(st.booleans()))
        B = _values(draw, (rows, rank), factor_dtype, special_weight=draw(st.booleans()))
        scale = draw(st.sampled_from([1.0, 0.5, 1 / 3, 2.0**-30, 2.0**40, 0.0, -2.0]))
        if draw(st.booleans()):  # a nudge of W + Δ onto a tie of the format: the bracket cannot decide
            A = np.zeros_like(A)
        deltas.append(LinearDelta(A, B, scale, module=f"m{i}"))
    return W, deltas


def _outcome(fn):
    try:
        return fn(), None
    except LoraRefError as exc:
        return None, (type(exc), str(exc))


@given(stacks(), st.booleans(), st.booleans())
def test_merge_many_is_the_per_tensor_merge_bitwise(stack, exact: bool, allow_nonfinite: bool) -> None:
    W, deltas = stack
    many, many_error = _outcome(lambda: merge_many(W, deltas, exact=exact, allow_nonfinite=allow_nonfinite))
    each, each_error = _outcome(lambda: [merge(W[i], d, exact=exact, allow_nonfinite=allow_nonfinite)
                                         for i, d in enumerate(deltas)])
    assert many_error == each_error
    if each is None:
        return
    merged, residuals = many
    assert merged.dtype == W.dtype and merged.shape == W.shape
    for i, result in enumerate(each):
        assert bits_of(merged[i]).tobytes() == bits_of(result.weight).tobytes()
        if not exact:
            assert residuals[i] is None
            continue
        got, want = residuals[i], result.residual
        assert got.indices.dtype == want.indices.dtype and got.indices.tobytes() == want.indices.tobytes()
        assert got.values.dtype == want.values.dtype and got.values.tobytes() == want.values.tobytes()
        assert (got.shape, got.merged_digest, got.delta_digest, got.semantics) == \
            (want.shape, want.merged_digest, want.delta_digest, want.semantics)


def test_merge_many_refuses_like_merge() -> None:
    """A shape mismatch and a NaN factor are refused with the per-tensor merge's error, at the first such weight."""
    W = np.ones((3, 2, 2), np.float32)
    good = LinearDelta(np.ones((1, 2), np.float32), np.ones((2, 1), np.float32), 1.0, module="good")
    nan = LinearDelta(np.full((1, 2), np.nan, np.float32), np.ones((2, 1), np.float32), 1.0, module="nan")
    wrong = LinearDelta(np.ones((1, 3), np.float32), np.ones((2, 1), np.float32), 1.0, module="wrong")
    for deltas in ([good, nan, wrong], [good, wrong, nan]):
        with pytest.raises(LoraRefError) as many:
            merge_many(W, deltas)
        with pytest.raises(LoraRefError) as each:
            [merge(W[i], d) for i, d in enumerate(deltas)]
        assert (type(many.value), str(many.value)) == (type(each.value), str(each.value))


def _mixed_checkpoint(tmp: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A base with runs of small weights (two shapes, three dtypes, a rank_pattern), a large weight,
    untargeted tensors, a lora_bias target and non-finite base values, and its adapter (DoRA needs
    use_dora for every module: the next test covers it)."""
    base: dict[str, np.ndarray] = {}
    modules: dict[str, LoraModule] = {}
    layout = [("a", (3, 2), np.float32)] * 5 + [("b", (2, 5), np.float32)] * 3 + [("c", (3, 2), bfloat16)] * 4 \
        + [("big", (300, 40), np.float32), ("d", (3, 2), np.float16)] + [("e", (3, 2), np.float32)] * 3
    for i, (kind, shape, dtype) in enumerate(layout):
        name = f"layers.{i}.{kind}"
        base[f"{name}.weight"] = (rng.standard_normal(shape) * 2).astype(dtype)
        rank = 2 if kind != "b" else 1
        A = rng.standard_normal((rank, shape[1])).astype(np.float32)
        B = rng.standard_normal((shape[0], rank)).astype(np.float32)
        lora_bias = rng.standard_normal(shape[0]).astype(np.float32) if i == 6 else None
        if lora_bias is not None:
            base[f"{name}.bias"] = rng.standard_normal(shape[0]).astype(dtype)
        modules[name] = LoraModule(name, A, B, lora_bias=lora_bias)
        if i % 4 == 0:
            base[f"layers.{i}.norm"] = rng.standard_normal(4).astype(np.float32)  # untargeted: copied
    base["layers.1.a.weight"][0, 0] = np.inf  # non-finite base values: resolved one weight at a time
    base["layers.2.a.weight"][1, 1] = np.nan
    save_file(tmp / "base.safetensors", base)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=list(modules), rank_pattern={r"layers\.\d+\.b": 1})
    save_adapter(Adapter(config, modules), tmp / "adapter")
    return tmp / "base.safetensors", tmp / "adapter"


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_checkpoint_runs_write_the_per_tensor_bytes(tmp_path: Path, dtype: str | None) -> None:
    from lora_ref.adapter import load_adapter

    base, adapter_dir = _mixed_checkpoint(tmp_path, np.random.default_rng(7))
    adapter = load_adapter(adapter_dir)
    outputs = {}
    for label, block_bytes in (("runs", merge_module.BLOCK_BYTES), ("each", 64)):  # 64 bytes: no run forms
        merge_checkpoint(base, adapter, tmp_path / f"{label}.safetensors", residual_path=tmp_path / f"{label}.res",
                         dtype=dtype, block_bytes=block_bytes)
        outputs[label] = ((tmp_path / f"{label}.safetensors").read_bytes(), (tmp_path / f"{label}.res").read_bytes())
    assert outputs["runs"] == outputs["each"]


def test_checkpoint_runs_with_dora_write_the_per_tensor_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base, modules = {}, {}
    for i in range(6):
        name = f"layers.{i}.q"
        base[f"{name}.weight"] = rng.standard_normal((3, 2)).astype(np.float32)
        modules[name] = LoraModule(name, rng.standard_normal((1, 2)).astype(np.float32),
                                   rng.standard_normal((3, 1)).astype(np.float32),
                                   magnitude=np.abs(rng.standard_normal(3)).astype(np.float32) + 0.5)
    save_file(tmp_path / "base.safetensors", base)
    save_adapter(Adapter(LoraConfig(r=1, lora_alpha=1, target_modules=list(modules), use_dora=True), modules), tmp_path / "ad")
    from lora_ref.adapter import load_adapter

    adapter = load_adapter(tmp_path / "ad")
    for label, block_bytes in (("runs", merge_module.BLOCK_BYTES), ("each", 64)):
        merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / f"{label}.st", residual_path=tmp_path / f"{label}.r",
                         block_bytes=block_bytes)
    assert (tmp_path / "runs.st").read_bytes() == (tmp_path / "each.st").read_bytes()
    assert (tmp_path / "runs.r").read_bytes() == (tmp_path / "each.r").read_bytes()


def test_merge_many_resolves_an_undecided_unmerge() -> None:
    """W = 0.5, Δ = 0.71157968 · 2.0940959e-08 (float32): the merge's bracket decides, the round trip's
    (merged − Δ, for the residual) does not, and its low end is not the correctly rounded value (a
    residual from it would miss W's element); the weight must then be merged on its own."""
    W = np.full((2, 1, 1), 0.5, np.float32)
    A = np.array([[0.7115796804428101]], np.float32)
    B = np.array([[2.0940959188919805e-08]], np.float32)
    deltas = [LinearDelta(A, B, 1.0, module="tie"), LinearDelta(B.T.copy(), A.T.copy(), 1.0, module="other")]
    left, right, scale, left_norms, right_norms, spread, _ = merge_module._stacked_product(W, deltas, merge_module.MERGE_SEMANTICS)
    product = np.matmul(left, right) * scale[:, None, None]

    def bracket(base: np.ndarray, sign: float) -> tuple[np.ndarray, np.ndarray]:
        low = np.empty_like(base)
        undecided = merge_module._bracket(base, product, left_norms, right_norms, spread, sign, merge_module._Workspace(),
                                          low, keep=True)
        return low, undecided.copy()

    low, undecided = bracket(W, 1.0)
    assert not undecided[0].any() and bracket(low, -1.0)[1][0].any()
    merged, residuals = merge_many(W, deltas, exact=True)
    for i, d in enumerate(deltas):
        want = merge(W[i], d, exact=True)
        assert merged[i].tobytes() == want.weight.tobytes()
        assert residuals[i].indices.tobytes() == want.residual.indices.tobytes()
        assert residuals[i].values.tobytes() == want.residual.values.tobytes()
