"""Dropout on the LoRA path, made reproducible.

PEFT applies ``nn.Dropout(p)`` to the LoRA input only: kept elements are scaled by 1/(1-p).
The reference takes an explicit mask (values 0 or 1/(1-p)) or builds one from a seeded
NumPy generator, so a forward pass with dropout is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator | int) -> np.ndarray:
    """A float64 inverted-dropout mask: 0 with probability p, else 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return np.ones(shape, dtype=np.float64)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    keep = generator.random(shape) >= p
    return keep / (1.0 - p)


class RowDropout:
    """Dropout masks for a routed batch (SPEC M.6): row b of adapter i = idx[b] is drawn from
    adapter i's own generator with its own p_i (PEFT's per-adapter ``lora_dropout``); base rows
    and rows of an adapter with p_i = 0 get 1. Rows are drawn in increasing b, one layer after
    another, so adapter i's masks depend only on its own rows and seed: reproducible, and
    independent of the other adapters' rows.
    """

    def __init__(self, ps: Sequence[float], rngs: Sequence[np.random.Generator]) -> None:
        if len(ps) != len(rngs):
            raise ConfigError(f"{len(ps)} dropout probabilities but {len(rngs)} generators")
        self.ps, self.rngs = [float(p) for p in ps], list(rngs)

    def mask(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray | None:
        """A mask of ``shape`` ([batch, ...]), or None when no row drops anything."""
        if not any(p > 0 and np.any(index == i) for i, p in enumerate(self.ps)):
            return None
        mask = np.ones(shape, dtype=np.float64)
        for b, i in enumerate(np.asarray(index)):
            if i >= 0 and self.ps[i] > 0:
                mask[b] = dropout_mask(tuple(shape[1:]), self.ps[i], self.rngs[i])
        return mask
