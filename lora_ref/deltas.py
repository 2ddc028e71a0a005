"""Pick the delta source for one adapted module, by layer kind (linear, embedding, conv)."""

from __future__ import annotations

from .adapter import Adapter
from .errors import LoraRefError
from .linear import LinearDelta
from .merge import DeltaSource


def delta_for(adapter: Adapter, module: str) -> DeltaSource:
    """The ΔW source of ``module`` in ``adapter``, in the base weight's stored layout."""
    lora = adapter.modules[module]
    scale = adapter.scale_for(module)
    if lora.kind == "linear":
        return LinearDelta(lora.A, lora.B, scale, fan_in_fan_out=adapter.config.fan_in_fan_out, module=module)
    raise LoraRefError(f"{module}: merging {lora.kind} LoRA layers is not supported yet")
