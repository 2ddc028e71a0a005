"""MergeLedger (SPEC 3.5): refusals, LIFO order, and many adapter switches.

Exact mode: 1,000 random switches among 3 adapters (with LIFO stacking on top) leave every
bit of every weight unchanged, special values included. Fast mode: the drift over the same
switches is measured (printed at the end of the module) and checked against the bound that
follows from SPEC 3.3: each merge/unmerge cycle of one adapter moves an element by at most
fast_roundtrip_bound(W_before_cycle, Δ), so the total drift is at most the sum of those.
"""

from __future__ import annotations

import numpy as np
import pytest

from lora_ref.adapter import Adapter, LoraModule
from lora_ref.config import LoraConfig
from lora_ref.deltas import delta_for
from lora_ref.dtypes import BITS_VIEW, bits_of, float64, resolve_dtype, round_to, ulp_distance
from lora_ref.errors import MergeStateError, ShapeError, TargetNotFoundError
from lora_ref.ledger import MergeLedger
from lora_ref.merge import fast_roundtrip_bound

from helpers import ErrorLog

pytestmark = pytest.mark.usefixtures("kernel_path")  # on the NumPy and the numba evaluation (conftest.py)

STORAGE = ["float32", "float16", "bfloat16"]
LAYERS = {"blocks.0.attn.q_proj": (24, 16), "blocks.0.mlp.up_proj": (32, 24), "blocks.1.attn.q_proj": (24, 16)}
CYCLES = 1000
LOG = ErrorLog("Ledger")


@pytest.fixture(scope="module", autouse=True)
def _print_drift(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not DRIFT:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"Fast-mode drift after {CYCLES} switch cycles among 3 adapters (exact mode: 0 bits changed)")
        for dtype, row in DRIFT.items():
            reporter.write_line(
                f"  {dtype:<9} changed {row['changed']:>5}/{row['elements']} elements ({row['changed_share']:.2%}), "
                f"max {row['max_ulps']} ulps, max |drift| / accumulated bound {row['bound_ratio']:.3g}"
            )


DRIFT: dict[str, dict] = {}


def build_weights(dtype: np.dtype, rng: np.random.Generator, special: bool) -> dict[str, np.ndarray]:
    weights = {}
    for module, (out_f, in_f) in LAYERS.items():
        W = round_to(rng.normal(0, 0.05, (out_f, in_f)), dtype)
        if special:  # NaN payload, ±inf, -0, a subnormal, the largest finite value
            width = BITS_VIEW[dtype].itemsize * 8
            exp_mask = {32: 0x7F800000, 16: 0x7C00 if dtype == np.float16 else 0x7F80}[width]
            raw = np.array([exp_mask | 5, exp_mask, (1 << (width - 1)) | exp_mask, 1 << (width - 1), 1, exp_mask - 1],
                           dtype=BITS_VIEW[dtype])
            W.reshape(-1)[: raw.size] = raw.view(dtype)
        weights[f"{module}.weight"] = W
    return weights


def build_adapter(name: str, dtype: np.dtype, rng: np.random.Generator, modules=tuple(LAYERS), r: int = 4,
                  use_rslora: bool = False) -> Adapter:
    config = LoraConfig(r=r, lora_alpha=3 * r + 1, use_rslora=use_rslora, target_modules=["q_proj", "up_proj"])
    lora = {}
    for module in modules:
        out_f, in_f = LAYERS[module]
        lora[module] = LoraModule(module, A=round_to(rng.normal(0, 0.3, (r, in_f)), dtype),
                                  B=round_to(rng.normal(0, 0.3, (out_f, r)), dtype))
    return Adapter(config, lora, name=name)


def three_adapters(dtype: np.dtype, rng: np.random.Generator) -> list[Adapter]:
    return [
        build_adapter("a", dtype, rng, r=4),
        build_adapter("b", dtype, rng, modules=("blocks.0.attn.q_proj", "blocks.0.mlp.up_proj"), r=8, use_rslora=True),
        build_adapter("c", dtype, rng, modules=("blocks.1.attn.q_proj",), r=2),
    ]


def snapshot(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in weights.items()}


def switch_sequence(rng: np.random.Generator, ledger: MergeLedger, adapters: list[Adapter], on_cycle=None) -> None:
    """CYCLES switches: unmerge the current adapter, merge a random other one; one switch in four
    also stacks a second adapter on top and takes it off again (LIFO)."""
    current = None
    for _ in range(CYCLES):
        if current is not None:
            ledger.unmerge(current)
        current = adapters[rng.integers(len(adapters))]
        if on_cycle:
            on_cycle(current)
        ledger.merge(current)
        if rng.random() < 0.25:
            top = adapters[(adapters.index(current) + 1 + rng.integers(len(adapters) - 1)) % len(adapters)]
            ledger.merge(top)
            ledger.unmerge(top)
    ledger.unmerge(current)
    assert ledger.merged == [] and ledger.residual_elements() == 0


@pytest.mark.parametrize("dtype", STORAGE)
def test_exact_switch_cycles_change_no_bit(dtype: str) -> None:
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(2024)
    weights = build_weights(t, rng, special=True)
    original = snapshot(weights)
    ledger = MergeLedger(weights, exact=True)
    switch_sequence(rng, ledger, three_adapters(t, rng))
    for key in original:
        assert np.array_equal(bits_of(weights[key]), bits_of(original[key])), key


@pytest.mark.parametrize("dtype", STORAGE)
def test_fast_switch_cycles_drift_measured_and_bounded(dtype: str) -> None:
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(2024)
    weights = build_weights(t, rng, special=False)
    original = snapshot(weights)
    ledger = MergeLedger(weights, exact=False)
    adapters = three_adapters(t, rng)
    accumulated = {k: np.zeros(v.shape) for k, v in weights.items()}

    def add_cycle_bound(adapter: Adapter) -> None:
        # the merge/unmerge cycle of ``adapter`` (and of any adapter stacked on top of it, whose
        # cycle runs on top of W + Δ) is bounded as in SPEC 3.3; the stacked cycle is covered by
        # adding the bound of every adapter on the weight at W's current value, twice
        for other in adapters:
            for module in other.modules:
                key = f"{module}.weight"
                d = delta_for(other, module).full()
                accumulated[key] += 2 * fast_roundtrip_bound(weights[key], d)

    switch_sequence(rng, ledger, adapters, on_cycle=add_cycle_bound)
    changed = sum(int(np.count_nonzero(bits_of(weights[k]) != bits_of(original[k]))) for k in original)
    elements = sum(v.size for v in original.values())
    max_ulps = max(int(ulp_distance(weights[k], original[k]).max()) for k in original)
    ratio = 0.0
    for key in original:
        drift = np.abs(weights[key].astype(float64) - original[key].astype(float64))
        assert np.all(drift <= accumulated[key]), key
        ratio = max(ratio, float(np.max(drift / accumulated[key])))
    DRIFT[dtype] = {"changed": changed, "elements": elements, "changed_share": changed / elements,
                    "max_ulps": max_ulps, "bound_ratio": ratio}


# -- refusals ------------------------------------------------------------------------------------------


def _setup(dtype: str = "float32"):
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(5)
    weights = build_weights(t, rng, special=False)
    return weights, three_adapters(t, rng)


def test_double_merge_refused() -> None:
    weights, (a, _, _) = _setup()
    ledger = MergeLedger(weights)
    ledger.merge(a)
    before = snapshot(weights)
    with pytest.raises(MergeStateError, match="'a' is already merged"):
        ledger.merge(a)
    assert all(np.array_equal(weights[k], before[k]) for k in weights)


def test_unmerge_of_not_merged_refused() -> None:
    weights, (a, b, _) = _setup()
    ledger = MergeLedger(weights)
    with pytest.raises(MergeStateError, match="not merged"):
        ledger.unmerge(a)
    ledger.merge(a)
    with pytest.raises(MergeStateError, match="'b' is not merged"):
        ledger.unmerge(b)


def test_lifo_enforced_and_restores_bits() -> None:
    weights, (a, b, _) = _setup("bfloat16")
    original = snapshot(weights)
    ledger = MergeLedger(weights)
    ledger.merge(a)
    ledger.merge(b)
    assert ledger.merged == ["a", "b"]
    before = snapshot(weights)
    with pytest.raises(MergeStateError, match="last-in, first-out"):
        ledger.unmerge(a)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(before[k])) for k in weights)  # nothing touched
    ledger.unmerge(b)
    ledger.unmerge(a)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(original[k])) for k in weights)


def test_adapters_on_disjoint_weights_unmerge_in_any_order() -> None:
    weights, (_, b, c) = _setup("float16")  # b and c touch different weights
    original = snapshot(weights)
    ledger = MergeLedger(weights)
    ledger.merge(b)
    ledger.merge(c)
    ledger.unmerge(b)
    ledger.unmerge(c)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(original[k])) for k in weights)


def test_unmerge_with_other_tensors_under_same_name_refused() -> None:
    weights, (a, _, _) = _setup()
    ledger = MergeLedger(weights)
    ledger.merge(a)
    impostor = build_adapter("a", resolve_dtype("float32"), np.random.default_rng(99))
    with pytest.raises(MergeStateError, match="not the one that was merged"):
        ledger.unmerge(impostor)


def test_missing_target_refused_before_any_change() -> None:
    weights, (a, _, _) = _setup()
    del weights["blocks.1.attn.q_proj.weight"]
    before = snapshot(weights)
    with pytest.raises(TargetNotFoundError, match="blocks.1.attn.q_proj.weight"):
        MergeLedger(weights).merge(a)
    assert all(np.array_equal(weights[k], before[k]) for k in weights)


def test_shape_mismatch_refused_before_any_change() -> None:
    weights, (a, _, _) = _setup()
    weights["blocks.1.attn.q_proj.weight"] = np.zeros((24, 17), np.float32)
    before = snapshot(weights)
    with pytest.raises(ShapeError, match="blocks.1.attn.q_proj"):
        MergeLedger(weights).merge(a)
    assert all(np.array_equal(weights[k], before[k]) for k in weights)


def test_lora_bias_merged_into_base_bias_and_restored() -> None:
    """PEFT merges s·lora_bias into the base bias; so does the ledger, exactly undone in exact mode."""
    t = resolve_dtype("float16")
    rng = np.random.default_rng(8)
    weights = build_weights(t, rng, special=False)
    adapter = build_adapter("a", t, rng, modules=("blocks.0.attn.q_proj",))
    adapter.config.lora_bias = True
    adapter.modules["blocks.0.attn.q_proj"].lora_bias = round_to(rng.normal(size=24), t)
    with pytest.raises(TargetNotFoundError, match=r"blocks\.0\.attn\.q_proj\.bias"):
        MergeLedger(weights).merge(adapter)  # no base bias to merge into
    weights["blocks.0.attn.q_proj.bias"] = round_to(rng.normal(size=24), t)
    original = snapshot(weights)
    ledger = MergeLedger(weights)
    ledger.merge(adapter)
    s = adapter.scale_for("blocks.0.attn.q_proj")
    lb = adapter.modules["blocks.0.attn.q_proj"].lora_bias.astype(float64)
    want = round_to(original["blocks.0.attn.q_proj.bias"].astype(float64) + s * lb, t)  # one rounding
    assert np.array_equal(bits_of(weights["blocks.0.attn.q_proj.bias"]), bits_of(want))
    ledger.unmerge(adapter)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(original[k])) for k in weights)


def test_factors_changed_in_place_after_merge_refused() -> None:
    """The ledger keeps a copy of each merged delta's factors (no digest per switch): an adapter whose
    arrays were edited in place since the merge is refused, one bit flipped is enough, and the
    in-memory residuals (no checksums) cannot unmerge through the file path either."""
    from lora_ref.errors import ResidualMismatchError
    from lora_ref.merge import IN_MEMORY, unmerge

    weights, (a, _, _) = _setup()
    ledger = MergeLedger(weights)
    ledger.merge(a)
    module = next(iter(a.modules.values()))
    bits = module.A.view(BITS_VIEW[module.A.dtype])
    bits.reshape(-1)[0] ^= 1
    before = snapshot(weights)
    with pytest.raises(MergeStateError, match="not the one that was merged"):
        ledger.unmerge(a)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(before[k])) for k in weights)
    bits.reshape(-1)[0] ^= 1
    key, stack = next((k, s) for k, s in ledger._stacks.items() if s)
    residual = stack[-1].residual
    assert residual.delta_digest == IN_MEMORY
    delta = delta_for(a, next(m for m in a.modules if key.startswith(m)))
    with pytest.raises(ResidualMismatchError, match="in-memory switch"):
        unmerge(weights[key], delta, residual=residual)
    ledger.unmerge(a)
    assert not ledger.merged


@pytest.mark.parametrize("dtype", STORAGE)
def test_exact_fused_switches_change_no_bit(dtype: str) -> None:
    """CYCLES one-call switches (``switch([(old, None)], [(new, None)])``) among 3 adapters, with
    one kept delta per weight (so kept plans are evicted, rebuilt and reused), then the last
    unmerge: every bit of every weight is the original's, special values included."""
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(77)
    weights = build_weights(t, rng, special=True)
    original = snapshot(weights)
    adapters = three_adapters(t, rng)
    ledger = MergeLedger(weights, exact=True, kept_deltas=1)
    current = adapters[0]
    ledger.merge(current)
    for _ in range(CYCLES):
        new = adapters[(adapters.index(current) + 1 + rng.integers(len(adapters) - 1)) % len(adapters)]
        ledger.switch([(current, None)], [(new, None)])
        current = new
    ledger.unmerge(current)
    assert ledger.merged == [] and ledger.residual_elements() == 0
    for key in original:
        assert np.array_equal(bits_of(weights[key]), bits_of(original[key])), key


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("change", ["A in place", "B in place", "alpha, same arrays", "another adapter, same name"])
def test_kept_plan_not_served_to_a_changed_adapter(dtype: str, change: str) -> None:
    """A switch back to an adapter reuses the plan the ledger kept for it, but only for the same
    factors: an adapter edited in place (one bit), with another scale, or another adapter under
    the name merges as a fresh :func:`lora_ref.merge.merge` of it does (the oracle: no ledger, no
    kept state), and unlike the kept adapter (so the check can fail)."""
    from lora_ref.merge import merge

    t = resolve_dtype(dtype)
    weights, (a, b, _) = _setup(dtype)
    original = snapshot(weights)
    ledger = MergeLedger(weights, exact=True)
    ledger.merge(a)
    ledger.switch([(a, None)], [(b, None)])
    ledger.switch([(b, None)], [(a, None)])  # a's plans kept and reused
    ledger.switch([(a, None)], [(b, None)])
    module = "blocks.0.attn.q_proj"
    if change.endswith("in place"):
        array = getattr(a.modules[module], change[0])
        array.view(BITS_VIEW[t]).reshape(-1)[3] ^= 1 << 4  # a mantissa bit
        changed = a
    elif change.startswith("alpha"):
        config = LoraConfig(r=a.config.r, lora_alpha=a.config.lora_alpha + 5, target_modules=["q_proj", "up_proj"])
        changed = Adapter(config, a.modules, name="a")
    else:
        changed = build_adapter("a", t, np.random.default_rng(9))
    ledger.switch([(b, None)], [(changed, None)])
    key = f"{module}.weight"
    want = merge(original[key], delta_for(changed, module)).weight
    assert np.array_equal(bits_of(weights[key]), bits_of(want))
    if change.endswith("in place"):  # the stale plan: the factors as they were merged before
        array.view(BITS_VIEW[t]).reshape(-1)[3] ^= 1 << 4
    assert not np.array_equal(bits_of(want), bits_of(merge(original[key], delta_for(a, module)).weight))
    if change.endswith("in place"):
        array.view(BITS_VIEW[t]).reshape(-1)[3] ^= 1 << 4
    ledger.unmerge(changed)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(original[k])) for k in weights)


@pytest.mark.parametrize("dtype", [*STORAGE, "float64"])
@pytest.mark.parametrize("threads", [1, 3])
def test_weights_switched_side_by_side_give_the_same_bits(dtype: str, threads: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With k > 1 threads and at least 2k weights, the ledger switches whole weights side by side
    (one workspace per thread), else one after another: after every switch each weight is what a
    fresh :func:`lora_ref.merge.merge` of the merged adapter gives from the original (no ledger, no
    threads), and the last unmerge restores every bit; float64 weights (the fixed order) and a
    column-major weight (its row blocks are not contiguous) included."""
    import importlib

    from lora_ref.merge import merge

    lora_merge = importlib.import_module("lora_ref.merge")
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(11)
    shapes = {f"layers.{i}.proj": (8 * (1 + i % 3), 16 + 8 * (i % 2)) for i in range(9)}
    weights = {f"{m}.weight": round_to(rng.normal(0, 0.05, s), t) for m, s in shapes.items()}
    weights["layers.4.proj.weight"] = np.asfortranarray(weights["layers.4.proj.weight"])
    original = snapshot(weights)

    def adapter(name: str) -> Adapter:
        modules = {m: LoraModule(m, A=round_to(rng.normal(0, 0.3, (4, c)), t), B=round_to(rng.normal(0, 0.3, (r, 4)), t))
                   for m, (r, c) in shapes.items()}
        return Adapter(LoraConfig(r=4, lora_alpha=9, target_modules=["proj"]), modules, name=name)

    adapters = [adapter("a"), adapter("b"), adapter("c")]
    monkeypatch.setattr(lora_merge, "MAX_THREADS", threads)
    ledger = MergeLedger(weights, exact=True)
    current = adapters[0]
    ledger.merge(current)
    for i in range(12):
        new = adapters[(i + 1) % 3]
        ledger.switch([(current, None)], [(new, None)])
        current = new
        for m in shapes:
            want = merge(original[f"{m}.weight"], delta_for(current, m)).weight
            assert np.array_equal(bits_of(weights[f"{m}.weight"]), bits_of(want)), (i, m)
    ledger.unmerge(current)
    assert all(np.array_equal(bits_of(weights[k]), bits_of(original[k])) for k in weights)
