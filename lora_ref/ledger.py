"""MergeLedger: which adapters are merged into a set of weights, in what order, and how to undo them.

Holds the model's weights (``{state_dict key: array}``) and, per weight, a stack of merges.
It refuses to merge an adapter twice, to unmerge one that is not merged, and to unmerge out
of order: unmerge is LIFO, like PEFT's ``merged_adapters``. In exact mode every merge keeps
its residual, so any sequence of merges and unmerges returns the weights bit for bit.
Weights are updated in place (row block by row block).

DoRA modules merge as W' = (m/n)(W + ΔW) with n computed from the weight as it is when that
adapter is merged; the ledger keeps n with the entry, since unmerge needs it and the merged
weight does not determine it (SPEC 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .adapter import Adapter
from .carried import check_base_copies, replacing
from .checkpoint import merge_targets, target_delta
from .errors import CarriedTensorError, MergeStateError, ShapeError, TargetNotFoundError
from .merge import Residual, check_factors_finite, digest_arrays, merge, unmerge


@dataclass(frozen=True)
class _Entry:
    adapter_name: str
    delta_digest: str
    residual: Residual | None
    dora_norm: np.ndarray | None = None


class MergeLedger:
    """Merge state of a dict of weights; see module doc."""

    def __init__(self, weights: dict[str, np.ndarray], *, exact: bool = True) -> None:
        self.weights = weights
        self.exact = exact
        self._stacks: dict[str, list[_Entry]] = {}
        self._order: list[str] = []

    @property
    def merged(self) -> list[str]:
        """Names of merged adapters, oldest first."""
        return list(self._order)

    def residual_elements(self) -> int:
        """Total residual entries currently held (exact mode)."""
        return sum(e.residual.count for stack in self._stacks.values() for e in stack if e.residual is not None)

    def merge(self, adapter: Adapter, name: str | None = None, *, allow_nonfinite: bool = False) -> None:
        """Merge every module of ``adapter`` into its weight."""
        name = name or adapter.name
        if name in self._order:
            raise MergeStateError(f"adapter {name!r} is already merged")
        carried = adapter.carried_tensors()
        if replacing(carried):  # never ignored: the ledger merges LoRA deltas only
            raise CarriedTensorError(f"adapter {name!r} carries {', '.join(sorted(replacing(carried))[:3])} "
                                     "(modules_to_save / trainable tokens / biases); merge it with lora-ref merge instead")
        # against the weight as no adapter has changed it yet (the first merge onto it checked it)
        check_base_copies(carried, lambda k: None if self._stacks.get(k) else self.weights.get(k), f"adapter {name!r}")
        targets = merge_targets(adapter)  # weights, and base biases of lora_bias modules (as PEFT)
        missing = [key for key in targets if key not in self.weights]
        if missing:
            raise TargetNotFoundError(f"adapter {name!r} targets tensors the model lacks: {', '.join(missing[:5])}")
        deltas = {key: target_delta(adapter, target, **self._dora_base(adapter, target, key))
                  for key, target in targets.items()}
        for key, delta in deltas.items():  # validate every target before touching any weight
            if self.weights[key].shape != delta.shape:  # SPEC 3.7: adapter vs base dimensions
                raise ShapeError(
                    f"{delta.module}: base tensor {key!r} has shape {self.weights[key].shape} "
                    f"but the adapter's delta has {delta.shape}"
                )
            if not allow_nonfinite:  # refuse before any weight changes, not after the first module
                check_factors_finite(delta)
        for key, delta in deltas.items():
            weight = self.weights[key]
            result = merge(weight, delta, exact=self.exact, allow_nonfinite=allow_nonfinite, out=weight)
            self._stacks.setdefault(key, []).append(
                _Entry(name, digest_arrays(*delta.factors()), result.residual, getattr(delta, "norm", None))
            )
        self._order.append(name)

    def _dora_base(self, adapter: Adapter, target: tuple[str, str], key: str) -> dict[str, np.ndarray]:
        """``base=`` for a DoRA weight target (its norm comes from the weight as it is now)."""
        module, part = target
        is_dora = part == "weight" and adapter.modules[module].magnitude is not None
        return {"base": self.weights[key]} if is_dora and key in self.weights else {}

    def unmerge(self, adapter: Adapter, name: str | None = None) -> None:
        """Undo the merge of ``adapter``; it must be the most recently merged on every weight it touched."""
        name = name or adapter.name
        if name not in self._order:
            raise MergeStateError(f"adapter {name!r} is not merged (merged: {self._order or 'none'})")
        deltas = {}
        for key, target in merge_targets(adapter).items():
            stack = self._stacks.get(key, [])
            if not stack or stack[-1].adapter_name != name:
                top = stack[-1].adapter_name if stack else "nothing"
                raise MergeStateError(
                    f"{target[0]}: cannot unmerge {name!r} before {top!r}; unmerge is last-in, first-out"
                )
            norm = stack[-1].dora_norm
            delta = deltas[key] = target_delta(adapter, target, **({"norm": norm} if norm is not None else {}))
            if stack[-1].delta_digest != digest_arrays(*delta.factors()):
                raise MergeStateError(f"{delta.module}: the adapter given for {name!r} is not the one that was merged")
        for key, delta in deltas.items():
            entry = self._stacks[key].pop()
            unmerge(self.weights[key], delta, residual=entry.residual, out=self.weights[key])
        self._order.remove(name)
