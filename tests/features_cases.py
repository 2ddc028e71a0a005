"""Random layers and adapters for every variant of the feature matrix (lora_ref.features), plus
the test-side oracles the cell tests compare to: ΔW of each kind and DoRA's gain, written here
with numpy.einsum from the SPEC formulas (4.1-4.3), not through the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_ref.adapter import Adapter, LoraModule
from lora_ref.config import LoraConfig
from lora_ref.conv import ConvGeometry
from lora_ref.features import Variant
from lora_ref.mixed_batch import LoraFactors, factors_for

MODULE = "layer"
#: conv spatial rank -> (geometry, kernel, input spatial size); strides, paddings and dilations vary.
CONV = {1: (ConvGeometry(stride=2, padding=1), (3,), (7,)),
        2: (ConvGeometry(stride=1, padding=1, dilation=(1, 2)), (2, 3), (5, 6)),
        3: (ConvGeometry(stride=(1, 2, 1), padding=0), (2, 2, 1), (3, 4, 2))}


@dataclass
class Case:
    variant: Variant
    W: np.ndarray
    bias: np.ndarray | None
    x: np.ndarray
    adapters: list[Adapter]
    geometry: ConvGeometry | None

    @property
    def factors(self) -> list[LoraFactors | None]:
        return factors_for(self.adapters, MODULE)

    @property
    def options(self) -> dict:
        return {"kind": self.variant.kind, "fan_in_fan_out": self.variant.fan_in_fan_out, "geometry": self.geometry}

    @property
    def float_input(self) -> bool:
        return self.x.dtype.kind == "f"


def weight_shape(v: Variant) -> tuple[int, ...]:
    if v.kind == "linear":
        return (4, 5) if v.fan_in_fan_out else (5, 4)  # out 5, in 4
    if v.kind == "embedding":
        return (7, 3)  # V 7, D 3
    _, kernel, _ = CONV[v.conv_dims]
    return (3, 2) + kernel


def make_case(v: Variant, seed: int, n_adapters: int = 3, batch: int = 6, missing: bool = True) -> Case:
    """W, bias, a batch x and ``n_adapters`` adapters of ranks 1..3 with their own alphas (the
    last one absent from the layer when ``missing``: its rows see the base)."""
    rng = np.random.default_rng(seed)
    shape = weight_shape(v)
    W = rng.normal(size=shape)
    bias = None if v.kind == "embedding" else rng.normal(size=shape[1] if v.fan_in_fan_out else shape[0])
    if v.kind == "linear":
        x = rng.normal(size=(batch, 2, 4))
    elif v.kind == "embedding":
        x = rng.integers(0, 7, size=(batch, 3))
    else:
        x = rng.normal(size=(batch, 2) + CONV[v.conv_dims][2])
    adapters = []
    for i in range(n_adapters):
        r = int(rng.integers(1, 4))
        alpha = float(rng.uniform(0.5, 4))
        if v.patterns:  # the global r and alpha are decoys: the patterns give the module r and alpha, scaled by sqrt(r)
            cfg = LoraConfig(r=8, lora_alpha=100.0, target_modules=[MODULE], use_rslora=True, rank_pattern={MODULE: r},
                             alpha_pattern={MODULE: alpha}, lora_bias=v.lora_bias, use_dora=v.dora)
        else:
            cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[MODULE], fan_in_fan_out=v.fan_in_fan_out,
                             lora_bias=v.lora_bias, use_dora=v.dora)
        scale = alpha / np.sqrt(r) if v.patterns else alpha / r  # SPEC 2.2, computed here
        assert np.isclose(cfg.scale_for(MODULE), scale, rtol=4 * 2.0**-53), (cfg.scale_for(MODULE), scale)
        if missing and i == n_adapters - 1:
            adapters.append(Adapter(cfg, {}, name=f"a{i}"))
            continue
        out = 5 if v.kind == "linear" else shape[1] if v.kind == "embedding" else shape[0]
        if v.kind == "linear":
            A, B = rng.normal(size=(r, 4)), rng.normal(size=(out, r))
        elif v.kind == "embedding":
            A, B = rng.normal(size=(r, 7)), rng.normal(size=(out, r))
        else:
            A, B = rng.normal(size=(r,) + shape[1:]), rng.normal(size=(out, r) + (1,) * v.conv_dims)
        module = LoraModule(MODULE, A, B, kind=v.kind, lora_bias=rng.normal(size=out) if v.lora_bias else None,
                            magnitude=rng.uniform(0.5, 2.0, out) if v.dora else None)
        adapters.append(Adapter(cfg, {MODULE: module}, name=f"a{i}"))
    return Case(v, W, bias, x, adapters, CONV[v.conv_dims][0] if v.conv_dims else None)


def delta_oracle(v: Variant, A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    """ΔW in W's stored layout (SPEC 2.2, 4.1, 4.2): Linear s B A (transposed with fan_in_fan_out),
    Embedding s (B A)ᵀ, Conv s Σ_j B[:, j] A[j]."""
    if v.kind == "linear":
        d = s * (B @ A)
        return d.T if v.fan_in_fan_out else d
    if v.kind == "embedding":
        return s * (B @ A).T
    return s * np.einsum("or,r...->o...", B.reshape(B.shape[0], B.shape[1]), A)


def dora_gain(v: Variant, W: np.ndarray, f: LoraFactors) -> np.ndarray:
    """g = m / ‖W + ΔW‖ per output channel (SPEC 4.3), the norm over every other stored axis."""
    V = W + delta_oracle(v, f.A, f.B, f.scale)
    axis = 1 if v.kind == "embedding" or v.fan_in_fan_out else 0
    other = tuple(a for a in range(V.ndim) if a != axis)
    return np.asarray(f.magnitude).reshape(-1) / np.sqrt((V * V).sum(axis=other))
