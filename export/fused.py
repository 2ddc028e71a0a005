"""LoRA on fused projections (``qkv_proj``, ``gate_up_proj``): slots, stacked factors, slice merges.

A fused weight W_f [in, Σ w_j] (genai's layout; W_f^T stacks the parts' [w_j, in] weights) computes
every part at once; part j (PEFT module m_j, rank r_j, scale s_j) owns the output columns
[c_j, c_j + w_j). With A_j [r_j, in] and B_j [w_j, r_j]:

* **merged**: each slice is merged on its own, W_f[:, c_j:c_j+w_j] ← merge(W_j, Δ_j) with
  W_j the slice (transposed to [w_j, in] as the adapter's layout, exact) and Δ_j = s_j B_j A_j.
  merge rounds each element once (SPEC 3.1), independently of the others, so the fused result is
  bit for bit the concatenation of merging the unfused weights;
* **dynamic**: one branch y += (x·A_g)·B_g per fused site with the parts stacked along the rank:
  A_g = [A_1^T | A_2^T | ...] [in, Σ r_j] and B_g block-diagonal [Σ r_j, Σ w_j], block j =
  s_j·B_j^T at rows of its rank block and columns [c_j, c_j + w_j), zeros elsewhere. Column block
  j of x·A_g·B_g is then Σ_i (x A_i^T)(B_g)_{ij} = s_j (x A_j^T) B_j^T exactly: the off-diagonal
  blocks are exact zeros, whose products and sums add nothing. A part the adapter lacks has rank
  0 (no rows, no columns of A_g); an adapter on no part of the site feeds the rank-0 default.
  The sum over the stacked rank has Σ r_j terms instead of r_j, so the bound of E.5 holds with
  K = in + Σ r_j + 4.

The other way round, an adapter trained on a fused projection (Phi-3's ``qkv_proj``,
``gate_up_proj``) meets a graph with separate part weights: :func:`split_fused` turns its module
into one module per part, part j keeping A, B's rows [c_j, c_j + w_j) (and lora_bias's, DoRA
magnitude's) and the fused module's scale. merge rounds each element of W + s·B·A on its own, and
row i of Δ = s·B·A depends only on B's row i, so merging the parts is bit for bit merging the fused
weight (DoRA too: its norm is per output row). Dynamic graphs get one standard branch per part
(A repeated in each part's ``lora_A`` input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from lora_ref.adapter import Adapter

from .editing import lora_factors
from .errors import AdapterNameError, ExportConfigError
from .locate import TargetSite
from .names import SlotLayout, fused_parent, stem_for, strip_prefix


def slot_groups(sites: Mapping[str, Sequence[TargetSite]], scheme: str = "peft") -> dict[str, tuple[SlotLayout, list[TargetSite]]]:
    """stem -> (its slot layout, the sites its branch goes on) for the located ``sites``.

    An unfused module is its own slot; the parts of a fused weight share one slot, named after the
    fused projection, whose branch sites span the whole fused width.
    """
    groups: dict[str, tuple[SlotLayout, list[TargetSite]]] = {}
    for module, module_sites in sites.items():
        first = module_sites[0]
        if first.fused is None:
            stem = stem_for(module, scheme)
            groups[stem] = (SlotLayout(stem, ((module, first.out_features),)), list(module_sites))
            continue
        stem = stem_for(fused_parent(module)[0], scheme)
        if stem in groups:
            if groups[stem][0].parts != first.fused:
                raise ExportConfigError(f"{stem}: its parts disagree on the split {groups[stem][0].parts} vs {first.fused}")
            continue
        total = sum(w for _, w in first.fused)
        branch = [replace(site, module=stem, out_features=total, columns=None) for site in module_sites]
        groups[stem] = (SlotLayout(stem, first.fused), branch)
    return groups


def stacked_factors(adapter: Adapter, layout: SlotLayout, dtype: np.dtype, *, pad_to: int | None = None,
                    graph_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """(A_g [in, Σ r_j], block-diagonal B_g [Σ r_j, Σ w_j]) of ``adapter`` on ``layout`` (module docstring), or None.

    None when the adapter has none of the layout's modules. An unfused layout gives
    :func:`lora_factors` itself. ``pad_to`` zero-pads the stacked rank (a static-rank graph);
    ``graph_scale``: a scale the graph applies itself (:func:`lora_factors`).
    """
    present = [(m, w) for m, w in layout.parts if m in adapter.modules]
    if not present:
        return None
    if not layout.fused:
        return lora_factors(adapter, present[0][0], dtype, pad_to=pad_to, graph_scale=graph_scale)
    factors = {m: lora_factors(adapter, m, dtype, graph_scale=graph_scale) for m, _ in present}
    rank = sum(a.shape[1] for a, _ in factors.values())
    width = rank if pad_to is None else pad_to
    if width < rank:
        raise ExportConfigError(f"adapter {adapter.name!r}, {layout.stem}: stacked rank {rank} exceeds the graph's rank {width}")
    in_features = next(iter(factors.values()))[0].shape[0]
    A = np.zeros((in_features, width), dtype)
    B = np.zeros((width, sum(w for _, w in layout.parts)), dtype)
    row = column = 0
    for module, w in layout.parts:
        if module in factors:
            a, b = factors[module]
            if b.shape[1] != w:
                raise AdapterNameError(f"adapter {adapter.name!r}, module {module}: lora_B has {b.shape[1]} outputs, "
                                       f"its slice of {layout.stem} has {w}")
            A[:, row:row + a.shape[1]] = a
            B[row:row + a.shape[1], column:column + w] = b
            row += a.shape[1]
        column += w
    return A, B


def layout_of(module: str, layouts: Mapping[str, SlotLayout]) -> SlotLayout | None:
    """The layout whose parts include ``module`` (PEFT's ``base_model.model.`` prefix ignored), or None."""
    plain = strip_prefix(module)
    return next((layout for layout in layouts.values() if any(strip_prefix(m) == plain for m, _ in layout.parts)), None)


def split_fused(adapter: Adapter, module: str, parts: Sequence[tuple[str, int]]) -> Adapter:
    """``adapter`` with its fused ``module`` replaced by one module per part (module docstring).

    ``parts`` = ((part module, width), ...) in output order; the widths must add up to B's rows.
    Each part gets the fused module's rank and alpha by exact-path entries put first in
    rank_pattern / alpha_pattern (PEFT's first matching key wins), so its scale is the fused one's.
    """
    lora = adapter.modules[module]
    if sum(w for _, w in parts) != lora.B.shape[0]:
        raise ExportConfigError(f"adapter {adapter.name!r}, module {module}: lora_B has {lora.B.shape[0]} outputs, the graph's "
                                f"parts {[p for p, _ in parts]} have {[w for _, w in parts]}")
    config = adapter.config
    rank, alpha = config.rank_for(module), config.alpha_for(module)
    modules = {m: v for m, v in adapter.modules.items() if m != module}
    row = 0
    for part, width in parts:
        rows = slice(row, row + width)
        modules[part] = replace(lora, name=part, B=lora.B[rows],
                                lora_bias=None if lora.lora_bias is None else lora.lora_bias[rows],
                                magnitude=None if lora.magnitude is None else np.asarray(lora.magnitude).reshape(-1)[rows])
        row += width
    names = [p for p, _ in parts]
    targets = config.target_modules if isinstance(config.target_modules, str) or config.target_modules is None \
        else [*config.target_modules, *names]
    config = replace(config, target_modules=targets,
                     rank_pattern={**{p: rank for p in names}, **config.rank_pattern},
                     alpha_pattern={**{p: alpha for p in names}, **config.alpha_pattern})
    return replace(adapter, config=config, modules=modules)
