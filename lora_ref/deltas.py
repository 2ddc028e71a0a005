"""Pick the delta source for one adapted module: its layer kind's (:mod:`lora_ref.kinds`), and DoRA's."""

from __future__ import annotations

import numpy as np

from .adapter import Adapter
from .dora import DoraDelta, DoraNormMissingError, dora_delta
from .kinds import kind_of
from .merge import DeltaSource


def delta_for(adapter: Adapter, module: str, *, base: np.ndarray | None = None, norm: np.ndarray | None = None) -> DeltaSource:
    """The ΔW source of ``module`` in ``adapter``, in the base weight's stored layout.

    A DoRA module (one with a magnitude) merges as W' = (m/n)(W + ΔW): pass the unmerged
    ``base`` weight to merge (n is computed from it), or the cached ``norm`` n to unmerge.
    """
    lora = adapter.modules[module]
    fan_in_fan_out = adapter.config.fan_in_fan_out
    kind = kind_of(lora.kind)
    source = kind.delta(lora.A, lora.B, adapter.scale_for(module), fan_in_fan_out=fan_in_fan_out, module=module)
    if lora.magnitude is None:
        return source
    axis = kind.dora_axis(fan_in_fan_out)
    if norm is not None:
        return DoraDelta(source, lora.magnitude, norm, axis)
    if base is not None:
        return dora_delta(source, lora.magnitude, base, axis)
    raise DoraNormMissingError(
        f"{module}: DoRA merge needs the unmerged base weight and unmerge needs the weight norm cached at merge "
        "(a merged weight does not determine it); merge with a residual, which records it"
    )
