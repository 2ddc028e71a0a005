"""MergeLedger with DoRA adapters: the norm is taken at merge time and kept for unmerge.

Oracle: merging DoRA on top of another adapter must equal lora_ref.merge.merge with the DoRA
source built from the weight as it is at that moment (dora_delta), bit for bit; exact mode
must restore the original weights bit for bit after LIFO unmerges.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref import Adapter, LoraConfig, LoraModule, MergeLedger
from lora_ref.dora import dora_delta
from lora_ref.kinds import kind_of
from lora_ref.dtypes import STORAGE_DTYPES, bits_of, round_to
from lora_ref.errors import MergeStateError
from lora_ref.linear import LinearDelta
from lora_ref.merge import merge

OUT, IN, R = 12, 10, 3


def _adapter(rng: np.random.Generator, dtype: np.dtype, *, dora: bool) -> Adapter:
    A = round_to(rng.normal(size=(R, IN)), dtype)
    B = round_to(rng.normal(size=(OUT, R)), dtype)
    magnitude = round_to(rng.uniform(0.5, 2.0, OUT), dtype) if dora else None
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], use_dora=dora)
    return Adapter(config, {"proj": LoraModule("proj", A, B, magnitude=magnitude)})


@given(seed=st.integers(0, 2**32 - 1), dtype_name=st.sampled_from(sorted(STORAGE_DTYPES)))
def test_dora_on_top_of_a_plain_adapter_round_trips_bitwise(seed: int, dtype_name: str) -> None:
    dtype = STORAGE_DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    W = round_to(rng.normal(size=(OUT, IN)), dtype)
    plain, dora = _adapter(rng, dtype, dora=False), _adapter(rng, dtype, dora=True)
    weights = {"proj.weight": W.copy()}
    ledger = MergeLedger(weights, exact=True)
    ledger.merge(plain, "plain")
    after_plain = weights["proj.weight"].copy()
    ledger.merge(dora, "dora")

    module = dora.modules["proj"]
    lora = LinearDelta(module.A, module.B, dora.scale_for("proj"), module="proj")
    expected = merge(after_plain, dora_delta(lora, module.magnitude, after_plain, kind_of("linear").dora_axis(False))).weight
    assert np.array_equal(bits_of(weights["proj.weight"]), bits_of(expected))

    with pytest.raises(MergeStateError, match="last-in, first-out"):
        ledger.unmerge(plain, "plain")
    ledger.unmerge(dora, "dora")
    assert np.array_equal(bits_of(weights["proj.weight"]), bits_of(after_plain))
    ledger.unmerge(plain, "plain")
    assert np.array_equal(bits_of(weights["proj.weight"]), bits_of(W))
    assert ledger.merged == []


def test_dora_unmerge_with_another_magnitude_is_refused() -> None:
    rng = np.random.default_rng(0)
    dtype = STORAGE_DTYPES["float32"]
    weights = {"proj.weight": round_to(rng.normal(size=(OUT, IN)), dtype)}
    dora = _adapter(rng, dtype, dora=True)
    ledger = MergeLedger(weights, exact=True)
    ledger.merge(dora, "d")
    impostor = Adapter(dora.config, {"proj": LoraModule("proj", dora.modules["proj"].A, dora.modules["proj"].B,
                                                        magnitude=dora.modules["proj"].magnitude * 2)})
    with pytest.raises(MergeStateError, match="not the one that was merged"):
        ledger.unmerge(impostor, "d")
