"""AdamW for LoRA adapters (Loshchilov and Hutter, decoupled weight decay), in float64.

For each trained tensor p with gradient g, at step t = 1, 2, ...:

    p ← p − lr·λ·p                         (decoupled decay; only lora_A and lora_B, λ = weight_decay)
    m ← β1 m + (1 − β1) g                  v ← β2 v + (1 − β2) g²
    p ← p − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε)

which is torch.optim.AdamW's update (amsgrad off). lora_bias and DoRA magnitudes, when
trained, follow the same update without the decay. The update is evaluated in float64 and
the parameter rounded once to its own dtype; the moments m, v are kept in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .adapter import Adapter
from .dtypes import float64, round_to
from .errors import ConfigError, ShapeError

#: Fields of a LoraModule that weight decay applies to.
DECAYED_FIELDS = ("A", "B")


class AdamW:
    """AdamW over the tensors of one adapter (module doc)."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate must be positive and finite, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas}")
        if not (eps > 0 and weight_decay >= 0):
            raise ConfigError(f"eps must be positive and weight_decay non-negative, got {eps}, {weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.t = 0
        self._m: dict[tuple[str, str], np.ndarray] = {}
        self._v: dict[tuple[str, str], np.ndarray] = {}

    def step(self, adapter: Adapter, grads: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Update ``adapter`` in place from ``grads[module][field]`` (field: "A", "B", "lora_bias", "magnitude")."""
        self.t += 1
        b1, b2 = self.betas
        correction1, correction2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for module, fields_ in grads.items():
            lora = adapter.modules.get(module)
            if lora is None:
                raise ShapeError(f"gradient for {module}, which adapter {adapter.name!r} does not have")
            for name, grad in fields_.items():
                p = getattr(lora, name, None)
                if p is None or np.shape(grad) != p.shape:
                    raise ShapeError(f"{module}.{name}: gradient {np.shape(grad)} does not fit the parameter "
                                     f"{None if p is None else p.shape}")
                g = np.asarray(grad, dtype=float64)
                p64 = p.astype(float64)
                if name in DECAYED_FIELDS:
                    p64 = p64 - self.lr * self.weight_decay * p64
                key = (module, name)
                m = self._m[key] = b1 * self._m.get(key, 0.0) + (1.0 - b1) * g
                v = self._v[key] = b2 * self._v.get(key, 0.0) + (1.0 - b2) * g * g
                p64 = p64 - (self.lr / correction1) * m / (np.sqrt(v) / math.sqrt(correction2) + self.eps)
                setattr(lora, name, round_to(p64, p.dtype))
