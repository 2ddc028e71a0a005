"""Merge records in the files lora-ref writes, and the checks that refuse what contradicts them.

A merged checkpoint (each shard of a sharded one) carries, in its safetensors ``__metadata__``
under :data:`PROVENANCE_KEY`, JSON ``{"format": RECORD_FORMAT, "merges": [record, ...]}``: a
stack, oldest merge first. One record (:func:`merge_record`)::

    {"tool": "lora-ref", "version": "0.1.0", "adapter": "<adapter digest>", "mode": "exact" | "fast",
     "base_digest": "<digest of the targeted base tensors>", "dtype": null | "bfloat16", ...,
     "targets": <count>, "merge_id": "<digest naming this merge>"}

``adapter`` is :func:`adapter_digest` (BLAKE2b-128 over the config JSON and every tensor of
the adapter file, by key: independent of file names and of the adapter's in-memory name);
``base_digest`` BLAKE2b-128 over (key, :func:`lora_ref.merge.digest_arrays` of the tensor) of
every tensor the merge changes, as read from the input; ``merge_id`` BLAKE2b-128 over the
record's other fields, so the same merge of the same files gives the same bytes. The exact
residual written by that merge carries the same ``merge_id`` (and the record), which links the
two: the residual's own integrity is its per-target checksums (:mod:`lora_ref.checkpoint`).
Unmerging pops the adapter's record; the file whose stack becomes empty loses the key, so an
exact unmerge gives back the base's bytes, header included.

Checks (:func:`check_merge`, :func:`check_unmerge`): a merge of an adapter already on the stack
(double merge), an unmerge of one that is not on it, or not on top (PEFT's unmerge order is
LIFO too), and an exact residual from another merge are refused unless forced; an exact merge
unmerged without its residual needs ``fast=True`` (``--fast``). A file without a record (written
by another tool) passes, with a note.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from .errors import FileFormatError, ProvenanceError
from .merge import digest_arrays

PROVENANCE_KEY = "lora_ref.provenance"
RECORD_FORMAT = "lora-ref-provenance/1"


def _blake(parts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def adapter_digest(adapter: object) -> str:
    """The adapter's content digest (module doc), cached in ``adapter.content_digest``."""
    if adapter.content_digest is None:  # type: ignore[attr-defined]
        tensors: dict[str, np.ndarray] = {}
        for module in adapter.modules.values():  # type: ignore[attr-defined]
            tensors.update(module.peft_keys())
        tensors.update(adapter.extra_tensors)  # type: ignore[attr-defined]
        config = json.dumps(adapter.config.to_dict(), sort_keys=True, default=str)  # type: ignore[attr-defined]
        adapter.content_digest = _blake([config] + [f"{k}={digest_arrays(tensors[k])}" for k in sorted(tensors)])  # type: ignore[attr-defined]
    return adapter.content_digest  # type: ignore[attr-defined]


def tensors_digest(digests: Mapping[str, str]) -> str:
    """One digest over per-tensor digests (key -> digest_arrays), order-independent."""
    return _blake([f"{k}={digests[k]}" for k in sorted(digests)])


def merge_record(adapter: object, *, exact: bool, base_digest: str, dtype: str | None, targets: int) -> dict:
    """The record of one merge (module doc); the one place its fields are chosen."""
    from . import __version__

    record = {"tool": "lora-ref", "version": __version__, "adapter": adapter_digest(adapter),
              "mode": "exact" if exact else "fast", "base_digest": base_digest, "dtype": dtype, "targets": targets}
    record["merge_id"] = _blake([json.dumps(record, sort_keys=True)])
    return record


def read_stack(metadata: Mapping[str, str], where: object) -> list[dict] | None:
    """The merge records of a file's metadata, oldest first; None when it has no record."""
    raw = metadata.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("merges"), list) \
                or not all(isinstance(r, dict) and isinstance(r.get("adapter"), str) for r in data["merges"]):
            raise ValueError(f"not a {RECORD_FORMAT} record")
    except (ValueError, RecursionError) as exc:
        raise FileFormatError(f"{where}: the {PROVENANCE_KEY!r} metadata is malformed ({str(exc)[:120]})") from None
    return data["merges"]


def _with_stack(metadata: Mapping[str, str], stack: list[dict]) -> dict[str, str]:
    out = {k: v for k, v in metadata.items() if k != PROVENANCE_KEY}
    if stack:
        out[PROVENANCE_KEY] = json.dumps({"format": RECORD_FORMAT, "merges": stack}, sort_keys=True, separators=(",", ":"))
    return out


def pushed(metadata: Mapping[str, str], record: dict, where: object) -> dict[str, str]:
    """``metadata`` with ``record`` on top of its stack (the merged file's metadata)."""
    return _with_stack(metadata, [*(read_stack(metadata, where) or []), record])


def popped(metadata: Mapping[str, str], digest: str, where: object) -> dict[str, str]:
    """``metadata`` without the top-most record of adapter ``digest`` (unchanged if it has none)."""
    stack = list(read_stack(metadata, where) or [])
    for i in range(len(stack) - 1, -1, -1):
        if stack[i]["adapter"] == digest:
            del stack[i]
            return _with_stack(metadata, stack)
    return dict(metadata)


def check_merge(stack: list[dict] | None, digest: str, where: object, *, force: bool = False) -> None:
    """Refuse merging adapter ``digest`` into a file whose record already holds it (unless ``force``)."""
    if force or not stack:
        return
    hits = [i for i, record in enumerate(stack) if record["adapter"] == digest]
    if hits:
        raise ProvenanceError(f"{where}: this adapter is already merged into it (merge {hits[-1] + 1} of {len(stack)} in "
                              "its lora-ref record); merging again would add its delta twice; pass --force to merge anyway")


def check_unmerge(stack: list[dict] | None, digest: str, where: object, *, exact: bool, fast: bool, force: bool = False,
                  residual_merge_id: str | None = None) -> str | None:
    """Refuse an unmerge the record contradicts (module doc); return a note for a file without record."""
    if stack is None:
        return f"note: {where} has no lora-ref merge record (written by another tool?); cannot check it holds this adapter"
    hits = [i for i, record in enumerate(stack) if record["adapter"] == digest]
    if not force:
        if not hits:
            raise ProvenanceError(f"{where}: its lora-ref record ({len(stack)} merge(s)) does not hold this adapter: it was "
                                  "not merged with it, or the adapter changed since; pass --force to unmerge anyway")
        if hits[-1] != len(stack) - 1:
            raise ProvenanceError(f"{where}: {len(stack) - 1 - hits[-1]} later merge(s) sit on top of this adapter's; "
                                  "unmerge those first (last merged, first unmerged), or pass --force")
    record = stack[hits[-1]] if hits else None
    if record is None:
        return None
    if record.get("mode") == "exact" and not exact and not fast:
        raise ProvenanceError(f"{where}: was merged exactly; pass --residual with that merge's residual for a bit-exact "
                              "unmerge, or --fast to accept a rounding unmerge")
    if exact and not force and residual_merge_id is not None and record.get("merge_id") != residual_merge_id:
        raise ProvenanceError(f"{where}: the residual was written by another merge (merge ids differ); "
                              "pass the residual of this file's merge, or --force")
    return None
