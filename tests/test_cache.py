"""Adapter cache (SPEC M.5): LRU order, byte bound, lazy loading, counters, bad bounds.

The oracle is a plain list-based LRU model run on the same access sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.cache import AdapterCache, CacheBoundError
from lora_ref.config import LoraConfig
from lora_ref.errors import ConfigError, FileFormatError, LoraRefError


def adapter_of_rank(r: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    module = LoraModule("q", rng.normal(size=(r, 4)).astype(np.float32), rng.normal(size=(3, r)).astype(np.float32))
    return Adapter(LoraConfig(r=r, target_modules=["q"]), {"q": module})


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, r in enumerate([1, 2, 3, 4, 2, 1]):
        save_adapter(adapter_of_rank(r, i), root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def size_of(r: int) -> int:
    return (r * 4 + 3 * r) * 4  # float32 A [r, 4] and B [3, r]


RANKS = [1, 2, 3, 4, 2, 1]


@given(st.lists(st.integers(0, 5), max_size=60), st.integers(size_of(4), 3 * size_of(4)))
def test_lru_matches_a_reference_model(adapter_dirs, accesses, bound):
    loads = []

    def counting_loader(path):
        from lora_ref.adapter import load_adapter
        loads.append(path)
        return load_adapter(path)

    cache = AdapterCache(bound, loader=counting_loader)
    model: list[int] = []  # most recent last
    hits = misses = evictions = 0
    for i in accesses:
        adapter = cache.get(adapter_dirs[i])
        assert adapter.modules["q"].rank == RANKS[i]
        if i in model:
            hits += 1
            model.remove(i)
        else:
            misses += 1
            while sum(size_of(RANKS[j]) for j in model) + size_of(RANKS[i]) > bound:
                model.pop(0)
                evictions += 1
        model.append(i)
        assert cache.bytes == sum(size_of(RANKS[j]) for j in model) <= bound
        assert [adapter_dirs[j] in cache for j in range(6)] == [j in model for j in range(6)]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (hits, misses, evictions, len(model))
    assert len(loads) == misses  # lazy: disk is read only on a miss


def test_hit_returns_the_same_object_and_paths_are_normalised(adapter_dirs):
    cache = AdapterCache(10_000)
    first = cache.get(adapter_dirs[0])
    assert cache.get(str(adapter_dirs[0]) + "/./") is first
    assert (cache.hits, cache.misses) == (1, 1) and len(cache) == 1


def test_bound_too_small_for_one_adapter(adapter_dirs):
    cache = AdapterCache(size_of(4) - 1)
    cache.get(adapter_dirs[0])
    with pytest.raises(CacheBoundError) as err:
        cache.get(adapter_dirs[3])
    assert isinstance(err.value, ConfigError) and isinstance(err.value, LoraRefError)
    assert adapter_dirs[0] in cache and cache.bytes == size_of(1)  # unchanged by the refusal


@pytest.mark.parametrize("bound", [0, -5, 1.5, True, "1000"])
def test_bad_bounds(bound):
    with pytest.raises(CacheBoundError):
        AdapterCache(bound)


def test_missing_directory_is_a_file_format_error_and_not_cached(tmp_path):
    cache = AdapterCache(1000)
    with pytest.raises(FileFormatError):
        cache.get(tmp_path / "nope")
    assert len(cache) == 0 and cache.misses == 1
