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

import importlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import numpy as np

from .adapter import Adapter
from .carried import check_base_copies, replacing
from .checkpoint import merge_targets, target_delta
from .errors import CarriedTensorError, MergeStateError, NonFiniteError, ShapeError, TargetNotFoundError
from .merge import (BLOCK_BYTES, MERGE_SEMANTICS, DeltaSource, Residual, _Product, _product, _Workspace,
                    check_factors_finite, merge, switch)

_merge_module = importlib.import_module(".merge", __package__)  # (lora_ref.merge, the attribute, is the function)


@dataclass(frozen=True)
class _Kept:
    """A delta as the ledger keeps it for one weight: read-only copies of its factors and what is
    derived from them alone, for the weight's dtype under :data:`MERGE_SEMANTICS`.

    ``plan`` is the delta's evaluation plan (:func:`lora_ref.merge._product`: float64 factors,
    error-bound norms, zero rows and columns), ``finite`` whether every factor is finite. Both are
    functions of the delta's class, its ``factors()`` (dtypes, shapes, bits) and the weight's dtype,
    so a delta that matches all three (:meth:`matches`) is served them as they are.
    """

    kind: type
    factors: tuple[np.ndarray, ...]
    dtype: np.dtype
    plan: _Product | None
    finite: bool

    def matches(self, delta: DeltaSource, dtype: np.dtype) -> bool:
        """True when ``delta`` is of this class and its factors have the dtypes, shapes and bits kept,
        for a weight of ``dtype`` (a memory-speed comparison of the factors, no hashing)."""
        return type(delta) is self.kind and dtype == self.dtype and _same_factors(self.factors, delta)


def _keep(delta: DeltaSource, dtype: np.dtype) -> _Kept:
    """:class:`_Kept` for ``delta`` on a weight of ``dtype``: its plan shares no memory with the adapter."""
    factors = tuple(_read_only(np.array(f, copy=True)) for f in delta.factors())
    plan = _product(delta, dtype, MERGE_SEMANTICS)
    if plan is not None:  # float64 factors may be the adapter's own arrays in the plan: copy those
        shared = [f.name for f in fields(plan) if isinstance(getattr(plan, f.name), np.ndarray)
                  and any(np.may_share_memory(getattr(plan, f.name), np.asarray(a)) for a in delta.factors())]
        plan = replace(plan, **{name: getattr(plan, name).copy() for name in shared})
    try:
        check_factors_finite(delta)
        finite = True
    except NonFiniteError:
        finite = False
    return _Kept(type(delta), factors, dtype, plan, finite)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class _Entry:
    adapter_name: str
    kept: _Kept  # the delta when merged (its factors compared bit for bit on unmerge, its plan reused)
    residual: Residual | None
    dora_norm: np.ndarray | None = None


def _same_factors(kept: tuple[np.ndarray, ...], delta: DeltaSource) -> bool:
    """True when ``delta``'s factors have the dtypes, shapes and bits of ``kept`` (a memory-speed comparison)."""
    now = delta.factors()
    return len(now) == len(kept) and all(
        np.asarray(a).dtype == b.dtype and np.shape(a) == b.shape
        and np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
        for a, b in zip(now, kept))


class MergeLedger:
    """Merge state of a dict of weights; see module doc.

    The ledger owns ``weights``: it changes them in place and trusts that nothing else does, so
    its residuals carry no checksums (a checksum of every merged weight on every switch would cost
    more than the switch; files keep theirs, :mod:`lora_ref.checkpoint`), and a switch hashes
    nothing. The adapter given to unmerge is still checked against the one merged: its factors
    against a copy kept at merge, bit for bit (the factors are small; a comparison runs at memory
    speed, a cryptographic digest at a fraction of it).

    What a switch derives from an adapter's factors alone (the evaluation plan: float64 copies of
    the factors, the error bound's norms; whether they are finite) is made once and kept with
    read-only copies of the factors (:class:`_Kept`): for each merged entry, and for the last
    ``kept_deltas`` adapters merged on each weight (by name), so that switching back and forth
    recomputes nothing. The rule: a kept plan is used only for a delta of the same class whose
    factors equal the kept copies in dtype, shape and every bit, on a weight of the same dtype (an
    adapter changed in place, or another adapter under the same name, gets a new plan; for an
    unmerge it is refused, as before). A kept delta takes about 8(r + 1)(n + c) bytes for an n×c
    weight: at r = 16, 7% of a 1024×1024 float32 weight (13% of a bfloat16 one), less for larger
    weights; ``kept_deltas=0`` keeps only the merged entries'.
    """

    def __init__(self, weights: dict[str, np.ndarray], *, exact: bool = True, kept_deltas: int = 2) -> None:
        self.weights = weights
        self.exact = exact
        self.kept_deltas = kept_deltas
        self._stacks: dict[str, list[_Entry]] = {}
        self._order: list[str] = []
        self._kept: dict[str, dict[str, _Kept]] = {}  # weight key -> adapter name -> kept delta, least recent first

    @property
    def merged(self) -> list[str]:
        """Names of merged adapters, oldest first."""
        return list(self._order)

    def residual_elements(self) -> int:
        """Total residual entries currently held (exact mode)."""
        return sum(e.residual.count for stack in self._stacks.values() for e in stack if e.residual is not None)

    def merge(self, adapter: Adapter, name: str | None = None, *, allow_nonfinite: bool = False) -> None:
        """Merge every module of ``adapter`` into its weight."""
        self.switch((), [(adapter, name)], allow_nonfinite=allow_nonfinite)

    def unmerge(self, adapter: Adapter, name: str | None = None) -> None:
        """Undo the merge of ``adapter``; it must be the most recently merged on every weight it touched."""
        self.switch([(adapter, name)], ())

    def switch(
        self,
        unmerge_adapters: Sequence[tuple[Adapter, str | None]] = (),
        merge_adapters: Sequence[tuple[Adapter, str | None]] = (),
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        """Unmerge ``unmerge_adapters`` in order (each the last merged on its weights at its turn), then
        merge ``merge_adapters`` in order: in one pass over each weight, block by block (restore with
        the residual, add the new delta, record the new residual), bitwise what separate unmerge and
        merge calls give. Entries are (adapter, name); a None name is the adapter's own.

        Everything is checked before any weight changes (LIFO order, the adapter given for each
        unmerge is the one merged, targets, shapes, finite factors), so a refused switch changes
        nothing. A DoRA merge needs the weight as it is at its turn (its norm), so a switch that
        merges DoRA modules unmerges first, then merges one adapter at a time; if one is refused,
        the steps taken are reversed (exact mode: bit for bit).
        """
        undo, order = self._plan_unmerges(unmerge_adapters)
        if any(_is_dora(adapter) for adapter, _ in merge_adapters):
            self._apply(undo, {})
            self._order = order
            done: list[tuple[Adapter, str | None]] = []
            try:
                for adapter, name in merge_adapters:
                    self.switch((), [(adapter, name)], allow_nonfinite=allow_nonfinite) if not _is_dora(adapter) \
                        else self._merge_one_by_one(adapter, name, allow_nonfinite)
                    done.append((adapter, name))
            except BaseException:
                self.switch(done[::-1], list(unmerge_adapters)[::-1], allow_nonfinite=True)
                raise
            return
        do = self._plan_merges(merge_adapters, order, allow_nonfinite)
        self._apply(undo, do)
        self._order = order

    def _plan_unmerges(self, adapters: Sequence[tuple[Adapter, str | None]]) -> tuple[dict, list[str]]:
        """Per weight key, the (delta, entry) pairs to undo in order, and the merged names afterwards."""
        stacks = {key: list(stack) for key, stack in self._stacks.items()}
        order = list(self._order)
        undo: dict[str, list[tuple[DeltaSource, _Entry]]] = {}
        for adapter, name in adapters:
            name = name or adapter.name
            if name not in order:
                raise MergeStateError(f"adapter {name!r} is not merged (merged: {order or 'none'})")
            for key, target in merge_targets(adapter).items():
                stack = stacks.get(key, [])
                if not stack or stack[-1].adapter_name != name:
                    top = stack[-1].adapter_name if stack else "nothing"
                    raise MergeStateError(
                        f"{target[0]}: cannot unmerge {name!r} before {top!r}; unmerge is last-in, first-out"
                    )
                entry = stack.pop()
                norm = entry.dora_norm
                delta = target_delta(adapter, target, **({"norm": norm} if norm is not None else {}))
                if not entry.kept.matches(delta, self.weights[key].dtype):
                    raise MergeStateError(f"{delta.module}: the adapter given for {name!r} is not the one that was merged")
                undo.setdefault(key, []).append((delta, entry))
            order.remove(name)
        return undo, order

    def _plan_merges(self, adapters: Sequence[tuple[Adapter, str | None]], order: list[str],
                     allow_nonfinite: bool) -> dict[str, list[tuple[str, DeltaSource, _Kept]]]:
        """Per weight key, the (name, delta, kept delta) triples to merge in order (no DoRA); appends to ``order``."""
        do: dict[str, list[tuple[str, DeltaSource, _Kept]]] = {}
        for adapter, name in adapters:
            name = name or adapter.name
            deltas = self._checked_deltas(adapter, name, order, allow_nonfinite)
            for key, (delta, kept) in deltas.items():
                do.setdefault(key, []).append((name, delta, kept))
            order.append(name)
        return do

    def _checked_deltas(self, adapter: Adapter, name: str, order: list[str],
                        allow_nonfinite: bool) -> dict[str, tuple[DeltaSource, _Kept]]:
        """The delta source of every target of ``adapter`` and its kept form, each checked (DoRA norms
        from the weights as they are)."""
        if name in order:
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
        checked = {}
        for key, delta in deltas.items():  # validate every target before touching any weight
            if self.weights[key].shape != delta.shape:  # SPEC 3.7: adapter vs base dimensions
                raise ShapeError(
                    f"{delta.module}: base tensor {key!r} has shape {self.weights[key].shape} "
                    f"but the adapter's delta has {delta.shape}"
                )
            kept = self._kept_delta(key, name, delta)
            if not allow_nonfinite and not kept.finite:  # refuse before any weight changes, not after the first module
                check_factors_finite(delta)
            checked[key] = (delta, kept)
        return checked

    def _kept_delta(self, key: str, name: str, delta: DeltaSource) -> _Kept:
        """The kept delta of ``name`` on weight ``key`` if it matches ``delta`` (:class:`_Kept`), else a new one;
        it becomes the most recent of the (at most ``kept_deltas``) kept on that weight."""
        kept_here = self._kept.setdefault(key, {})
        kept = kept_here.pop(name, None)
        if kept is None or not kept.matches(delta, self.weights[key].dtype):
            kept = _keep(delta, self.weights[key].dtype)
        kept_here[name] = kept
        while len(kept_here) > max(self.kept_deltas, 0):
            del kept_here[next(iter(kept_here))]
        return kept

    def _merge_one_by_one(self, adapter: Adapter, name: str | None, allow_nonfinite: bool) -> None:
        """Merge one adapter holding DoRA modules (norms from the weights as they are now)."""
        name = name or adapter.name
        for key, (delta, kept) in self._checked_deltas(adapter, name, self._order, allow_nonfinite).items():
            weight = self.weights[key]
            result = merge(weight, delta, exact=self.exact, allow_nonfinite=allow_nonfinite, out=weight, digest=False)
            self._stacks.setdefault(key, []).append(_Entry(name, kept, result.residual, getattr(delta, "norm", None)))
        self._order.append(name)

    def _dora_base(self, adapter: Adapter, target: tuple[str, str], key: str) -> dict[str, np.ndarray]:
        """``base=`` for a DoRA weight target (its norm comes from the weight as it is now)."""
        module, part = target
        is_dora = part == "weight" and adapter.modules[module].magnitude is not None
        return {"base": self.weights[key]} if is_dora and key in self.weights else {}

    def _apply(self, undo: dict[str, list[tuple[DeltaSource, _Entry]]],
               do: dict[str, list[tuple[str, DeltaSource, _Kept]]]) -> None:
        """Run the planned steps, one fused pass per weight (:func:`lora_ref.merge.switch`), with the kept plans.

        With k = ``lora_ref.merge.MAX_THREADS`` > 1 threads and at least 2k weights to switch, k
        threads take whole weights, largest first (each weight's blocks in turn, in the thread's
        own workspace, of block_bytes / k: the memory of one threaded weight), so that small weights
        run side by side instead of each splitting into a few row blocks; else each weight's blocks
        run on :func:`lora_ref.merge._map_row_blocks`' threads. Every weight's bits are the same
        either way (each element's value does not depend on the blocks or the threads).
        """
        keys = list({**undo, **do})

        def run(key: str, workspace: _Workspace | None = None, block_bytes: int = BLOCK_BYTES) -> list:
            steps_undo, steps_do = undo.get(key, []), do.get(key, [])
            return switch(self.weights[key], [(delta, entry.residual) for delta, entry in steps_undo],
                          [delta for _, delta, _ in steps_do], exact=self.exact, semantics=MERGE_SEMANTICS,
                          plans=[entry.kept.plan for _, entry in steps_undo] + [kept.plan for _, _, kept in steps_do],
                          workspace=workspace, block_bytes=block_bytes)

        threads = _merge_module.MAX_THREADS
        outcomes: dict[str, list | BaseException] = {}  # residuals, or what stopped the weight
        if threads > 1 and len(keys) >= 2 * threads:
            local = threading.local()

            def run_in_thread(key: str) -> list:
                if not hasattr(local, "workspace"):
                    local.workspace = _Workspace()
                return run(key, local.workspace, BLOCK_BYTES // threads)

            with ThreadPoolExecutor(max_workers=threads) as pool:
                largest_first = sorted(keys, key=lambda k: -self.weights[k].size)
                futures = {key: pool.submit(run_in_thread, key) for key in largest_first}
            for key in keys:
                outcomes[key] = futures[key].exception() or futures[key].result()
        else:
            for key in keys:
                try:
                    outcomes[key] = run(key)
                except BaseException as stopped:
                    outcomes[key] = stopped
                    break
        error = None
        for key in outcomes:  # the stacks of the weights switched (all, unless a bug or MemoryError stopped one)
            if isinstance(outcomes[key], BaseException):
                error = error or outcomes[key]
                continue
            steps_undo, steps_do = undo.get(key, []), do.get(key, [])
            stack = self._stacks.setdefault(key, [])
            del stack[len(stack) - len(steps_undo):]
            stack.extend(_Entry(name, kept, residual, getattr(delta, "norm", None))
                         for (name, delta, kept), residual in zip(steps_do, outcomes[key]))
        if error is not None:
            raise error


def _is_dora(adapter: Adapter) -> bool:
    return any(lora.magnitude is not None for lora in adapter.modules.values())
