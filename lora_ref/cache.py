"""An adapter cache: many adapters in host memory, LRU-bounded in bytes, loaded lazily (SPEC M.5).

``cache.get(directory)`` returns the adapter stored in a PEFT directory, reading it from disk
only on a miss. The cache holds at most ``max_bytes`` of adapter tensors (``Adapter.nbytes``:
the A, B, bias and magnitude arrays); inserting an adapter evicts the least recently used ones
until it fits. An adapter larger than the whole bound is refused with
:class:`CacheBoundError` (the cache cannot hold it even alone), and the cache is unchanged.
Counters: ``hits``, ``misses``, ``evictions``; ``bytes`` is the current total.
Keys are resolved directory paths, so two spellings of one directory share an entry.
Not thread-safe: guard it with a lock when sharing one between threads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter, load_adapter
from .errors import ConfigError


class CacheBoundError(ConfigError):
    """The cache's byte bound is too small for an adapter, or not a positive integer."""


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class AdapterCache:
    """LRU cache of adapters keyed by directory (module doc)."""

    def __init__(self, max_bytes: int, loader: Callable[[Path], Adapter] = load_adapter) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise CacheBoundError(f"cache bound must be a positive number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._loader = loader
        self._entries: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()  # key -> (adapter, bytes at insertion)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, directory: object) -> bool:
        return isinstance(directory, (str, Path)) and self._key(directory) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(directory: str | Path) -> str:
        return str(Path(directory).resolve())

    def get(self, directory: str | Path) -> Adapter:
        """The adapter in ``directory``: from memory on a hit, from disk on a miss (then cached)."""
        key = self._key(directory)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        adapter = self._loader(Path(key))
        size = adapter.nbytes()
        if size > self.max_bytes:
            raise CacheBoundError(
                f"{directory}: adapter needs {size} bytes but the cache bound is {self.max_bytes} bytes; "
                "raise the bound to at least the largest adapter"
            )
        while self.bytes + size > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.bytes -= evicted_size
            self.evictions += 1
        self._entries[key] = (adapter, size)
        self.bytes += size
        return adapter

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, len(self._entries), self.bytes, self.max_bytes)
