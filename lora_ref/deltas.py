"""Pick the delta source for one adapted module, by layer kind (linear, embedding, conv) and DoRA."""

from __future__ import annotations

import numpy as np

from .adapter import Adapter
from .conv import ConvDelta
from .dora import DoraDelta, DoraNormMissingError, dora_axis, dora_delta
from .embedding import EmbeddingDelta
from .errors import LoraRefError
from .linear import LinearDelta
from .merge import DeltaSource


def delta_for(adapter: Adapter, module: str, *, base: np.ndarray | None = None, norm: np.ndarray | None = None) -> DeltaSource:
    """The ΔW source of ``module`` in ``adapter``, in the base weight's stored layout.

    A DoRA module (one with a magnitude) merges as W' = (m/n)(W + ΔW): pass the unmerged
    ``base`` weight to merge (n is computed from it), or the cached ``norm`` n to unmerge.
    """
    lora = adapter.modules[module]
    scale = adapter.scale_for(module)
    fan_in_fan_out = adapter.config.fan_in_fan_out
    if lora.kind == "linear":
        source: DeltaSource = LinearDelta(lora.A, lora.B, scale, fan_in_fan_out=fan_in_fan_out, module=module)
    elif lora.kind == "embedding":
        source = EmbeddingDelta(lora.A, lora.B, scale, module=module)
    elif lora.kind == "conv":
        source = ConvDelta(lora.A, lora.B, scale, module=module)
    else:
        raise LoraRefError(f"{module}: unknown LoRA layer kind {lora.kind!r}")
    if lora.magnitude is None:
        return source
    axis = dora_axis(lora.kind, fan_in_fan_out)
    if norm is not None:
        return DoraDelta(source, lora.magnitude, norm, axis)
    if base is not None:
        return dora_delta(source, lora.magnitude, base, axis)
    raise DoraNormMissingError(
        f"{module}: DoRA merge needs the unmerged base weight and unmerge needs the weight norm cached at merge "
        "(a merged weight does not determine it); merge with a residual, which records it"
    )
