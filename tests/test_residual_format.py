"""Residual index format: uint32 while the flat index fits (half of int64's bytes), int64 beyond."""

from __future__ import annotations

import numpy as np
import pytest

from lora_ref.checkpoint import load_residuals, save_residuals
from lora_ref.dtypes import bits_of, round_to
from lora_ref.errors import FileFormatError
from lora_ref.linear import LinearDelta
from lora_ref.merge import Residual, merge, residual_index_dtype, unmerge


def test_index_dtype_switches_exactly_where_uint32_stops_fitting() -> None:
    # Flat indices run 0 .. size-1, so uint32 (max 2^32 - 1) serves sizes up to 2^32 inclusive.
    assert residual_index_dtype(2**32) == np.uint32
    assert residual_index_dtype(2**32 + 1) == np.int64
    assert np.iinfo(np.uint32).max == 2**32 - 1


def _merged(tmp_path):
    rng = np.random.default_rng(3)
    W = round_to(rng.normal(size=(64, 48)), np.dtype(np.float16))
    delta = LinearDelta(round_to(rng.normal(size=(4, 48)), np.dtype(np.float16)),
                        round_to(rng.normal(size=(64, 4)), np.dtype(np.float16)), 2.0, module="m")
    result = merge(W, delta, exact=True)
    assert result.residual.count > 0 and result.residual.indices.dtype == np.uint32
    return W, delta, result


@pytest.mark.parametrize("stored", [np.uint32, np.int64])
def test_both_index_widths_restore_bit_for_bit_through_files(tmp_path, stored) -> None:
    W, delta, result = _merged(tmp_path)
    r = result.residual
    save_residuals(tmp_path / "r.safetensors", {"m.weight": Residual(r.indices.astype(stored), r.values, r.shape,
                                                                       r.merged_digest, r.delta_digest)})
    loaded = load_residuals(tmp_path / "r.safetensors")["m.weight"]
    assert loaded.indices.dtype == stored
    assert np.array_equal(bits_of(unmerge(result.weight, delta, residual=loaded)), bits_of(W))


@pytest.mark.parametrize("stored", [np.int32, np.float32])
def test_other_index_dtypes_are_refused(tmp_path, stored) -> None:
    _, _, result = _merged(tmp_path)
    r = result.residual
    save_residuals(tmp_path / "r.safetensors", {"m.weight": Residual(r.indices.astype(stored), r.values, r.shape,
                                                                       r.merged_digest, r.delta_digest)})
    with pytest.raises(FileFormatError, match="inconsistent indices"):
        load_residuals(tmp_path / "r.safetensors")
