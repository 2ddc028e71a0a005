"""Dropout on the LoRA path, made reproducible.

PEFT applies ``nn.Dropout(p)`` to the LoRA input only: kept elements are scaled by 1/(1-p).
The reference takes an explicit mask (values 0 or 1/(1-p)) or builds one from a seeded
NumPy generator, so a forward pass with dropout is a pure function of its inputs.
"""

from __future__ import annotations

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
