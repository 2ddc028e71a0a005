"""Other LoRA implementations wrapped for the conformance runner (imported lazily: torch, onnxruntime, jax, mlx)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def ids_out_of_range(operation: str, inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether an Embedding case (canonical inputs: ids, W [V, D]) holds a token id outside [0, V): the refusal
    cases that a peer which wraps, clamps or fills bad ids fails (each peer's deviation says how)."""
    ids, W = inputs.get("ids"), inputs.get("W")
    if not operation.startswith("embedding.") or ids is None or W is None:
        return False
    return bool(((np.asarray(ids) < 0) | (np.asarray(ids) >= W.shape[0])).any())
