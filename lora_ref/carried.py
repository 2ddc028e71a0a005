"""Tensors a PEFT adapter file carries besides LoRA factors: each is applied, or refused by name.

PEFT 0.21.2 ``save_pretrained`` writes, under ``base_model.model.``, next to the LoRA keys
(checked by saving real PEFT models, tests/test_peers_peft_carried.py):

- **modules_to_save copies** (``modules_to_save`` in the config; ``task_type`` ``SEQ_CLS`` /
  ``TOKEN_CLS`` add ``classifier`` and ``score``): the full trained state of each such module,
  keyed ``<module>.<param>`` with PEFT's wrapper names stripped (``classifier.out_proj.weight``).
  A module path matches an entry e when it ends with e (PEFT's ``key.endswith(e)``); the key is
  a copy when one of its dot-prefixes matches. Applying it *replaces* the base tensor
  ``<module>.<param>``: W' = round_t(C), C the copy, t the base dtype (PEFT's load into the
  model rounds the same way).
- **trainable base biases** (``bias`` = ``"all"`` or ``"lora_only"``): ``<path>.bias`` and, for
  LoRA layers, ``<path>.base_layer.bias``; they replace the base bias ``<path>.bias``.
- **frozen base copies** (LoRA on an embedding or ``lm_head`` makes PEFT set
  ``save_embedding_layers``): ``<path>.base_layer.weight``, the base weight the adapter was
  trained on, loaded by PEFT before the LoRA delta. Not trained, so it must equal the base
  tensor (after rounding to its dtype): :func:`check_base_copies` verifies that, and a
  different one (a resized vocabulary, another base model) is refused, never merged over.
- **trainable-token deltas** (``trainable_token_indices``): ``<path>.token_adapter.trainable_tokens_delta``
  D [k, dim] with the config's k token ids I (a list: the input embedding; a dict: module suffix
  -> ids). PEFT merges them by ``index_copy``: rows I of ``<path>.weight`` are replaced, W'[I] = round_t(D).

Anything else (other PEFT methods' keys, ``original_module`` copies, keys of modules the config
does not name) raises :class:`lora_ref.errors.CarriedTensorError` naming the key: a tensor is
never silently ignored. A replacement cannot be undone from the adapter alone, so merges record
the replaced values in the exact residual and a fast unmerge of a replacement is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import LoraConfig
from .errors import CarriedTensorError

PREFIX = "base_model.model."
TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"
#: The kinds of carried tensor, as ``inspect`` and error messages name them.
KINDS = ("modules_to_save", "bias", "trainable_tokens", "base_layer")


@dataclass(frozen=True)
class CarriedTensor:
    """One carried tensor: the file ``key``, the base state_dict key it changes, and how.

    ``rows`` is None for a full replacement (``modules_to_save``, ``bias``); for trainable tokens
    it holds the replaced row indices of ``target`` (``values`` is then [len(rows), dim]).
    """

    key: str
    target: str
    kind: str
    module: str
    values: np.ndarray
    rows: tuple[int, ...] | None = None

    @property
    def replaces(self) -> bool:
        """Whether applying it changes the base (every kind but a frozen ``base_layer`` copy)."""
        return self.kind != "base_layer"

    def apply(self, W64: np.ndarray, rows: slice) -> np.ndarray:
        """The float64 result for W[rows] (W64 = W[rows] in float64), before the one rounding."""
        if self.rows is None:
            return np.asarray(self.values[rows], dtype=np.float64).reshape(W64.shape)
        out = W64.copy()
        start, stop = rows.start or 0, rows.stop
        for j, row in enumerate(self.rows):
            if start <= row < stop:
                out[row - start] = self.values[j]
        return out


class ReplacementDelta:
    """A :class:`lora_ref.merge.DeltaSource` that replaces (all or some rows of) a base tensor.

    merge_block gives the carried values; unmerge_block is the identity, so exact mode's residual
    holds every replaced element whose bits changed, and exact unmerge restores them bit for bit.
    ``needs_residual``: a fast unmerge cannot restore the base and must be refused.
    """

    needs_residual = True

    def __init__(self, carried: CarriedTensor, shape: tuple[int, ...]) -> None:
        self.carried, self.shape, self.module = carried, tuple(shape), carried.target
        expected = self.shape if carried.rows is None else (len(carried.rows), *self.shape[1:])
        if tuple(carried.values.shape) != expected or (carried.rows is not None and (
                not self.shape or any(not 0 <= r < self.shape[0] for r in carried.rows))):
            from .errors import ShapeError
            raise ShapeError(f"{carried.key}: a {carried.kind} tensor of shape {tuple(carried.values.shape)} "
                             f"does not fit base tensor {carried.target!r} {self.shape}"
                             + (f" (rows {list(carried.rows)[:8]})" if carried.rows is not None else ""))

    def block(self, rows: slice) -> np.ndarray:
        raise TypeError("a replacement is not an additive delta; use merge_block")

    def merge_block(self, rows: slice, W64: np.ndarray) -> np.ndarray:
        return self.carried.apply(W64, rows)

    def unmerge_block(self, rows: slice, M64: np.ndarray) -> np.ndarray:
        return M64

    def factors(self) -> tuple[np.ndarray, ...]:
        rows = np.asarray(self.carried.rows if self.carried.rows is not None else (), dtype=np.int64)
        return (rows, self.carried.values)


def _modules_to_save(config: LoraConfig) -> list[str]:
    value = config.extra.get("modules_to_save")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CarriedTensorError(f"modules_to_save must be a list of module names, got {str(value)[:80]}")
    return value


def _token_rows(config: LoraConfig, module: str, key: str) -> tuple[int, ...]:
    spec = config.extra.get("trainable_token_indices")
    if isinstance(spec, dict):
        matches = [ids for name, ids in spec.items() if isinstance(name, str) and module.endswith(name)]
        if len(matches) != 1:
            raise CarriedTensorError(f"{key}: trainable_token_indices names {len(matches)} entries for module "
                                     f"{module!r} (needs exactly one)")
        spec = matches[0]
    if not isinstance(spec, list) or not spec or not all(type(i) is int and i >= 0 for i in spec) \
            or len(set(spec)) != len(spec):
        raise CarriedTensorError(f"{key}: trainable_token_indices must be distinct non-negative token ids, "
                                 f"got {str(spec)[:80]}")
    return tuple(spec)


def classify(config: LoraConfig, extra: Mapping[str, np.ndarray], source: str = "adapter") -> dict[str, CarriedTensor]:
    """The carried tensors of ``extra`` (non-LoRA keys of an adapter file) by the base key they change.

    Raises CarriedTensorError for a key that is none of the module docstring's kinds and for two
    keys changing one base tensor.
    """
    saved = _modules_to_save(config)
    carried: dict[str, CarriedTensor] = {}
    for key, values in extra.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else None
        item = None
        if path and path.endswith(TOKEN_SUFFIX):
            module = path[: -len(TOKEN_SUFFIX)]
            if "trainable_token_indices" in config.extra and values.ndim == 2:
                rows = _token_rows(config, module, f"{source}: {key}")
                if values.shape[0] != len(rows):
                    raise CarriedTensorError(f"{source}: {key} holds {values.shape[0]} rows for {len(rows)} token ids")
                item = CarriedTensor(key, f"{module}.weight", "trainable_tokens", module, values, rows)
        elif path:
            parts = path.split(".")
            owners = [".".join(parts[:i]) for i in range(1, len(parts))]
            owner = next((p for p in owners if any(p.endswith(e) for e in saved)), None)
            if owner is not None:
                item = CarriedTensor(key, path, "modules_to_save", owner, values)
            elif path.endswith(".base_layer.weight"):
                target = path[: -len(".base_layer.weight")] + ".weight"
                item = CarriedTensor(key, target, "base_layer", target[: -len(".weight")], values)
            elif config.bias in ("all", "lora_only") and path.endswith(".bias"):
                target = path[: -len(".base_layer.bias")] + ".bias" if path.endswith(".base_layer.bias") else path
                item = CarriedTensor(key, target, "bias", target[: -len(".bias")], values)
        if item is None:
            raise CarriedTensorError(
                f"{source}: tensor {key[:160]!r} is neither a LoRA factor nor a modules_to_save copy, trainable base "
                "bias or trainable-token delta the config declares; refusing rather than ignoring it")
        if item.target in carried:
            raise CarriedTensorError(f"{source}: {key[:160]!r} and {carried[item.target].key[:160]!r} both change "
                                     f"base tensor {item.target!r}")
        carried[item.target] = item
    return carried


def replacing(carried: Mapping[str, CarriedTensor]) -> dict[str, CarriedTensor]:
    """The carried tensors that change the base (all but frozen base copies), by base key."""
    return {key: c for key, c in carried.items() if c.replaces}


def check_base_copies(carried: Mapping[str, CarriedTensor], lookup, where: object) -> None:
    """Refuse a frozen ``base_layer`` copy that differs from the base tensor ``lookup(target)``.

    The copy is rounded to the base tensor's dtype first (PEFT's load rounds it so); equality
    is bitwise. ``lookup`` returns the tensor in torch's layout, or None when it is absent.
    """
    from .dtypes import bits_of, round_to

    for key, c in carried.items():
        if c.replaces:
            continue
        base = lookup(key)
        if base is None:
            raise CarriedTensorError(f"{where}: the adapter holds a frozen copy {c.key!r} of base tensor {key!r}, "
                                     "which the base lacks (or cannot be compared here)")
        base = np.asarray(base)
        copy = round_to(np.asarray(c.values, dtype=np.float64), base.dtype) if base.dtype != c.values.dtype else c.values
        if base.shape != copy.shape or not np.array_equal(bits_of(base), bits_of(copy)):
            raise CarriedTensorError(
                f"{where}: the adapter's frozen copy {c.key!r} {tuple(c.values.shape)} differs from base tensor {key!r} "
                f"{tuple(base.shape)}: it was trained on another base (a resized vocabulary?); merge it into that base")
