"""Merge an adapter into a safetensors checkpoint, and unmerge it, streaming tensor by tensor.

Base weights are keyed as torch's ``state_dict()`` keys them: ``<module>.weight``. Every
tensor of the input is written to the output (targeted ones merged); peak memory is about
one tensor plus one float64 row block, because the input is memory-mapped and the output is
written incrementally (its header is known before any data). The output is atomic.

Besides the LoRA targets (:func:`merge_targets`), a merge applies the tensors the adapter
carries (:mod:`lora_ref.carried`: ``modules_to_save`` copies, trainable biases, trainable-token
rows), which *replace* base values: only an exact unmerge (with the residual, which holds the
replaced originals) can undo them, and a fast unmerge of such a merge is refused.

Residual file (exact mode): a safetensors file with, per merged tensor ``<key>``, the tensors
``<key>::indices`` (uint32; int64 for weights of more than 2^32 elements) and
``<key>::values`` (the weight's dtype), and a metadata entry
``lora_ref.residual`` holding JSON: format version, and per key the shape and the two checksums.
A DoRA module's merge is not additive and its unmerge needs the weight norm n of the unmerged
weight (W' does not determine it), so the residual file also holds ``<key>::dora_norm``
(float64 [C]); unmerging a DoRA checkpoint without it raises DoraNormMissingError.

Format 2 (:data:`RESIDUAL_FORMAT`) adds what makes exactness verified rather than assumed:
``targets`` (every tensor the merge changed, so a removed entry is seen), ``merge_id`` (the
merge record's, :mod:`lora_ref.provenance`), and per key ``payload_digest`` = digest_arrays
(indices, values[, dora_norm]) (a flipped bit in the payload is refused before anything is
written) and ``base_digest`` = digest_arrays of the tensor before the merge, which the unmerged
tensor must reproduce. Format 1 files (lora-ref 0.1.0 before this) are still read; they cannot
be verified, which :attr:`CheckpointReport.verified` and the CLI say.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .atomic import OutputFile, scratch_folder
from .carried import ReplacementDelta, check_base_copies, replacing
from .deltas import delta_for
from .dora import DoraDelta
from .dtypes import FLOAT_DTYPES, dtype_name, resolve_dtype, round_to
from .errors import CarriedTensorError, ExactnessError, FileFormatError, TargetNotFoundError
from .linear import LinearBiasDelta
from .merge import (
    BLOCK_BYTES, FIXED_ORDER, MERGE_SEMANTICS, SEMANTICS_META_KEY, THREAD_BLOCK_BYTES, DeltaSource, Residual, block_rows,
    check_semantics, digest_arrays, merge, merge_many, unmerge,
)
from .provenance import PROVENANCE_KEY, adapter_digest, merge_record, popped, pushed, tensors_digest
from .safetensors_io import SafetensorsFile, SafetensorsWriter, save_file

RESIDUAL_FORMAT = "lora-ref-residual/2"
#: The format lora-ref 0.1.0 wrote before residuals carried checksums; read, never verified.
RESIDUAL_FORMAT_V1 = "lora-ref-residual/1"
RESIDUAL_META_KEY = "lora_ref.residual"
#: The ``part`` of a checkpoint target that a carried tensor (lora_ref.carried) changes.
CARRIED = "carried"


def base_key(module: str) -> str:
    """The state_dict key of a module's weight."""
    return f"{module}.weight"


def merge_targets(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """The state_dict keys a merge changes -> (module, "weight" | "bias").

    Every module's weight, and, as PEFT merges them, the base bias of modules with lora_bias.
    """
    targets = {base_key(m): (m, "weight") for m in adapter.modules}
    targets.update({f"{m}.bias": (m, "bias") for m, lora in adapter.modules.items() if lora.lora_bias is not None})
    return targets


def checkpoint_targets(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """What a checkpoint merge changes: :func:`merge_targets` and every carried tensor's base key -> (key, CARRIED).

    Raises CarriedTensorError when a carried tensor and a LoRA merge would change one base tensor
    (their order is undefined).
    """
    targets = merge_targets(adapter)
    for key in replacing(adapter.carried_tensors()):
        if key in targets:
            raise CarriedTensorError(f"adapter {adapter.name!r}: base tensor {key!r} is both replaced by a carried tensor "
                                     "and changed by a LoRA merge; the order is undefined")
        targets[key] = (key, CARRIED)
    return targets


def target_delta(adapter: Adapter, target: tuple[str, str], **kwargs: object) -> DeltaSource:
    """The delta source of one merge target (``kwargs`` go to :func:`delta_for` for weights; a
    carried target needs ``shape``, the base tensor's)."""
    module, part = target
    if part == CARRIED:
        return ReplacementDelta(adapter.carried_tensors()[module], kwargs["shape"])  # type: ignore[arg-type]
    if part == "bias":
        return LinearBiasDelta(adapter.modules[module].lora_bias, adapter.scale_for(module), module=module)
    return delta_for(adapter, module, **kwargs)  # type: ignore[arg-type]


@dataclass
class CheckpointReport:
    """What a checkpoint merge or unmerge did, per targeted tensor."""

    tensors_written: int = 0
    merged: dict[str, int] = field(default_factory=dict)  # key -> element count
    residual_counts: dict[str, int] = field(default_factory=dict)
    residual_bytes: int = 0
    #: Exact unmerge: every restored tensor matched the base digest its residual recorded
    #: (False for a format-1 residual, which records none).
    verified: bool = False


def _check_targets(adapter: Adapter, handle: SafetensorsFile) -> None:
    missing = [key for key in checkpoint_targets(adapter) if key not in handle]
    if missing:
        lora_bias = [key for key in missing if key.endswith(".bias")]
        raise TargetNotFoundError(
            f"{handle.path}: the adapter targets {len(missing)} tensor(s) the base lacks: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
            + (" (lora_bias is merged into the base layer's bias, which must exist)" if lora_bias else "")
        )


def merge_checkpoint(
    base_path: str | Path,
    adapter: Adapter,
    out_path: str | Path,
    *,
    residual_path: str | Path | None = None,
    dtype: object = None,
    allow_nonfinite: bool = False,
    progress: Callable[[str], None] | None = None,
    block_bytes: int = BLOCK_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> CheckpointReport:
    """Write base + adapter to ``out_path``; with ``residual_path`` merge exactly and save the residual.

    The output's ``__metadata__`` is the base's with this merge's record pushed
    (:mod:`lora_ref.provenance`), or ``metadata`` when given (a re-merge that must reproduce a
    file's bytes, as ``unmerge --in-place`` checks).

    ``dtype`` converts every floating tensor (rounded once) before merging; the residual then
    restores the converted base. Converted and merged tensors are computed straight into the
    output (row blocks written with ``pwrite``, :class:`~lora_ref.safetensors_io.OutputTensor`) in
    float64 row blocks of about ``block_bytes``; copied tensors go from
    the mapped input to the file. In exact mode each tensor's residual is spilled to a temporary
    file beside ``residual_path`` as soon as it is computed, so the heap holds a few blocks plus
    one tensor's residual, not the model's.
    """
    target_dtype = resolve_dtype(dtype, allow_float64=False) if dtype is not None else None
    report = CheckpointReport()
    norms: dict[str, np.ndarray] = {}
    base_digests: dict[str, str] = {}
    targets = checkpoint_targets(adapter)
    with _ResidualSpill(residual_path) as spill, SafetensorsFile(base_path) as base:
        _check_targets(adapter, base)
        check_base_copies(adapter.carried_tensors(), lambda key: base.get(key) if key in base else None, base_path)
        names = base.keys()
        # one read of the targeted tensors before any output: the record goes into the header
        input_digests = {name: digest_arrays(base.get(name)) for name in names if name in targets}
        record = merge_record(adapter, exact=residual_path is not None, base_digest=tensors_digest(input_digests),
                              dtype=dtype_name(target_dtype) if target_dtype is not None else None, targets=len(targets))

        def out_dtype(name: str) -> np.dtype:
            stored = base.tensors[name].dtype
            is_float = stored in FLOAT_DTYPES.values()
            return target_dtype if target_dtype is not None and is_float else stored

        specs = [(n, out_dtype(n), base.tensors[n].shape) for n in names]
        header = pushed(base.metadata, record, base_path) if metadata is None else metadata
        header = {**header, SEMANTICS_META_KEY: MERGE_SEMANTICS}  # how unmerge must evaluate (SPEC 3.2)
        with SafetensorsWriter(out_path, specs, header) as writer:
            run = _Run(writer, report, spill, exact=residual_path is not None, allow_nonfinite=allow_nonfinite,
                       block_bytes=block_bytes)
            for name in names:
                tensor = base.get(name)
                delta = None
                if name in targets and targets[name][1] == "weight" and out_dtype(name) == tensor.dtype:
                    with run.flushed_on_error():
                        delta = target_delta(adapter, targets[name], base=tensor)
                    if run.takes(tensor, delta):
                        if progress:
                            progress(name)
                        base_digests[name] = input_digests[name]
                        run.add(name, tensor, delta)
                        continue
                run.flush()
                if out_dtype(name) == tensor.dtype and name not in targets:
                    writer.write(name, tensor)
                    report.tensors_written += 1
                    continue
                out = writer.reserve(name)
                if out_dtype(name) != tensor.dtype:
                    _convert_into(tensor, out, block_bytes)
                    tensor = out.view()  # read back what was written (no writable map)
                if name in targets:
                    if progress:
                        progress(name)
                    base_digests[name] = input_digests[name] if out_dtype(name) == base.tensors[name].dtype \
                        else digest_arrays(tensor)
                    kwargs = {"shape": tensor.shape} if targets[name][1] == CARRIED else {"base": tensor}
                    delta = delta if delta is not None else target_delta(adapter, targets[name], **kwargs)
                    result = merge(tensor, delta, exact=residual_path is not None, allow_nonfinite=allow_nonfinite,
                                   out=out, block_bytes=block_bytes)
                    if isinstance(delta, DoraDelta):
                        norms[name] = delta.norm
                    run.record(name, result.weight, result.residual)
                report.tensors_written += 1
            run.flush()
        if residual_path is not None:
            save_residuals(residual_path, spill.residuals(), norms, base_digests=base_digests, record=record)
    return report


class _Run:
    """Consecutive small weights of one dtype and shape (and factor layout), merged as one stack
    (:func:`lora_ref.merge.merge_many`, bitwise the per-tensor merge) and written in one write.

    A weight joins when its float64 copy is at most 1/16 of the stack's budget (the smaller of
    ``block_bytes`` and :data:`~lora_ref.merge.THREAD_BLOCK_BYTES`, so the stack's float64
    temporaries stay a few block sizes); any other tensor first flushes the run (:meth:`flush`), so the
    output keeps the input's order.
    """

    def __init__(self, writer: SafetensorsWriter, report: CheckpointReport, spill: _ResidualSpill, *, exact: bool,
                 allow_nonfinite: bool, block_bytes: int) -> None:
        self._writer, self._report, self._spill = writer, report, spill
        self._exact, self._allow_nonfinite = exact, allow_nonfinite
        self._budget = min(block_bytes, THREAD_BLOCK_BYTES)
        self._items: list[tuple[str, np.ndarray, DeltaSource]] = []
        self._key: tuple | None = None

    @staticmethod
    def _layout(tensor: np.ndarray, delta: DeltaSource) -> tuple | None:
        rank_factors = getattr(delta, "rank_factors", None)
        if rank_factors is None or getattr(delta, "merge_block", None) is not None:
            return None
        left, right = rank_factors()
        return tensor.dtype, tensor.shape, np.shape(left), np.shape(right), np.asarray(left).dtype, np.asarray(right).dtype

    def takes(self, tensor: np.ndarray, delta: DeltaSource) -> bool:
        """Whether ``tensor`` joins the run (flushing it first when its layout differs or it is full)."""
        if 16 * 8 * tensor.size > self._budget or tensor.ndim < 1:
            return False
        key = self._layout(tensor, delta)
        if key is None:
            return False
        if key != self._key or 8 * tensor.size * (len(self._items) + 1) > self._budget:
            self.flush()
            self._key = key
        return True

    def add(self, name: str, tensor: np.ndarray, delta: DeltaSource) -> None:
        self._items.append((name, tensor, delta))

    @contextlib.contextmanager
    def flushed_on_error(self):
        """Merge the run before an error of a later tensor propagates, so errors come in file order."""
        try:
            yield
        except Exception:
            self.flush()
            raise

    def record(self, name: str, weight: np.ndarray, residual: Residual | None) -> None:
        """Count a merged tensor (and spill its residual) in the report."""
        self._report.merged[name] = int(weight.size)
        if residual is not None:
            self._spill.keep(name, residual)
            self._report.residual_counts[name] = residual.count
            self._report.residual_bytes += residual.nbytes

    def flush(self) -> None:
        """Merge and write the run (nothing if empty)."""
        if not self._items:
            return
        items, self._items, self._key = self._items, [], None
        merged, residuals = merge_many(np.stack([tensor for _, tensor, _ in items]), [delta for *_, delta in items],
                                       exact=self._exact, allow_nonfinite=self._allow_nonfinite)
        self._writer.write_run([name for name, *_ in items], merged)
        for (name, _, _), weight, residual in zip(items, merged, residuals):
            self.record(name, weight, residual)
            self._report.tensors_written += 1


class _Empty(dict):
    """dtype -> a read-only empty array of it (made once): what a spilled residual holds until read back."""

    def __missing__(self, dtype: np.dtype) -> np.ndarray:
        empty = self[dtype] = np.zeros(0, dtype)
        empty.flags.writeable = False
        return empty


_EMPTY = _Empty()


class _ResidualSpill:
    """Holds exact-mode residuals on disk from their tensor's merge until the residual file is
    written: their bytes are appended to one temporary file in a hidden temporary folder beside
    the residual file (each array at an 8-byte aligned offset), removed on exit; :meth:`residuals`
    maps that file once, read-only, and returns the residuals viewing it. A no-op without a
    residual path. One file and one mapping for any number of tensors: a file per tensor would
    cost a create, an fsync and an open handle each (minutes, and the descriptor limit, at
    100,000 targets).
    """

    def __init__(self, residual_path: str | Path | None) -> None:
        self._residual_path = residual_path
        self._stack = contextlib.ExitStack()
        self._kept: dict[str, tuple[int, Residual, int, int]] = {}  # key -> (count, emptied residual, offsets)

    def __enter__(self) -> _ResidualSpill:
        if self._residual_path is not None:
            folder = self._stack.enter_context(scratch_folder(Path(self._residual_path), "spill"))
            (folder / "residuals.bin").touch()
            self._file = OutputFile(folder / "residuals.bin", gather=True)
            self._stack.callback(self._file.discard)  # the folder is removed: nothing more to write
        return self

    def _append(self, array: np.ndarray) -> int:
        self._file.write(bytes(-self._file.offset % 8))  # zeros to an 8-byte boundary
        offset = self._file.offset
        if array.size:
            self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        return offset

    def keep(self, key: str, residual: Residual) -> None:
        """Spill ``residual``'s arrays (the heap copy may go); :meth:`residuals` gives it back."""
        self._kept[key] = (residual.count, Residual(_EMPTY[residual.indices.dtype], _EMPTY[residual.values.dtype],
                                                    residual.shape, residual.merged_digest, residual.delta_digest,
                                                    residual.semantics),
                           self._append(residual.indices), self._append(residual.values))

    def residuals(self) -> dict[str, Residual]:
        """The kept residuals, by key in keeping order, their arrays read-only views of the spill file."""
        if not self._kept:
            return {}
        self._file.flush()
        data = np.asarray(np.memmap(self._file.path, dtype=np.uint8, mode="r")) if self._file.offset \
            else np.zeros(0, np.uint8)

        def view(empty: np.ndarray, offset: int, count: int) -> np.ndarray:
            return data[offset: offset + count * empty.itemsize].view(empty.dtype) if count else empty

        return {key: Residual(view(kept.indices, at_indices, count), view(kept.values, at_values, count), kept.shape,
                              kept.merged_digest, kept.delta_digest, kept.semantics)
                for key, (count, kept, at_indices, at_values) in self._kept.items()}

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def unmerge_checkpoint(
    merged_path: str | Path,
    adapter: Adapter,
    out_path: str | Path,
    *,
    residual_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> CheckpointReport:
    """Write merged − adapter to ``out_path``; with the residual the result is bit-identical to the base.

    Streams like :func:`merge_checkpoint` (row blocks of about ``block_bytes`` into the output).
    With a residual, every targeted tensor must have its entry and (format 2) pass its payload
    checksum before anything is written, and each restored tensor must match its recorded base
    digest (ExactnessError otherwise, nothing left at ``out_path``); ``report.verified`` says the
    check ran. Without a residual, carried tensors (replacements) are refused: they cannot be undone.
    """
    targets = checkpoint_targets(adapter)
    record = read_residual_file(residual_path) if residual_path is not None else None
    if record is None:
        replaced = [key for key, (_, part) in targets.items() if part == CARRIED]
        if replaced:
            raise CarriedTensorError(
                f"{merged_path}: the merge replaced {len(replaced)} base tensor(s) with the adapter's carried copies "
                f"({', '.join(replaced[:3])}{' ...' if len(replaced) > 3 else ''}); only the exact residual holds the "
                "originals: pass the --residual written by the merge")
    else:
        record.check_covers(targets, residual_path)
    residuals = record.residuals if record else {}
    norms = record.norms if record else {}
    report = CheckpointReport(verified=bool(record and record.base_digests is not None))
    with SafetensorsFile(merged_path) as merged:
        _check_targets(adapter, merged)
        names = merged.keys()
        specs = [(n, merged.tensors[n].dtype, merged.tensors[n].shape) for n in names]
        # files merged before the key existed were merged in the fixed order (SPEC 3.2)
        semantics = check_semantics(merged.metadata.get(SEMANTICS_META_KEY, FIXED_ORDER), str(merged_path))
        metadata = {k: v for k, v in popped(merged.metadata, adapter_digest(adapter), merged_path).items()
                    if k != SEMANTICS_META_KEY}
        with SafetensorsWriter(out_path, specs, metadata) as writer:
            for name in names:
                tensor = merged.get(name)
                if name in targets:
                    if progress:
                        progress(name)
                    kwargs = {"shape": tensor.shape} if targets[name][1] == CARRIED else {"norm": norms.get(name)}
                    delta = target_delta(adapter, targets[name], **kwargs)
                    out = writer.reserve(name)
                    residual = residuals.get(name)
                    unmerge(tensor, delta, residual=residual, out=out, block_bytes=block_bytes,
                            semantics=residual.semantics if residual is not None else semantics)
                    if record is not None and record.base_digests is not None \
                            and digest_arrays(out) != record.base_digests[name]:
                        raise ExactnessError(f"{name}: the exact unmerge does not reproduce the base digest recorded at "
                                             f"merge in {residual_path}; nothing was written")
                    report.merged[name] = int(tensor.size)
                else:
                    writer.write(name, tensor)
                report.tensors_written += 1
    return report


def _convert_into(source: np.ndarray, out: np.ndarray, block_bytes: int) -> None:
    """out = round_t(source), t = out's dtype (one rounding from float64), a row block at a time."""
    if source.ndim == 0:
        out[...] = round_to(np.asarray(source, dtype=np.float64), out.dtype)
        return
    step = block_rows(source.shape, block_bytes)
    for start in range(0, source.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = round_to(np.asarray(source[rows], dtype=np.float64), out.dtype)


def _payload_digest(residual: Residual, norm: np.ndarray | None) -> str:
    return digest_arrays(residual.indices, residual.values, *([] if norm is None else [norm]))


def save_residuals(
    path: str | Path,
    residuals: dict[str, Residual],
    norms: dict[str, np.ndarray] | None = None,
    *,
    base_digests: dict[str, str] | None = None,
    record: dict | None = None,
) -> None:
    """Write residuals and DoRA weight norms (see module doc, format 2) atomically.

    ``base_digests`` (key -> digest_arrays of the tensor before the merge) and ``record`` (the
    merge's provenance record) are what a verified unmerge checks; without them the entries
    carry an empty base digest and the unmerge cannot be verified.
    """
    norms = norms or {}
    tensors: dict[str, np.ndarray] = {f"{key}::dora_norm": norm for key, norm in norms.items()}
    meta: dict[str, object] = {"format": RESIDUAL_FORMAT, "tensors": {}, "targets": sorted(residuals),
                               "merge_id": (record or {}).get("merge_id")}
    for key, residual in residuals.items():
        if residual.merged_digest is None:
            raise ValueError(f"{key}: a residual written to a file needs its merged-weight checksum (merge with digest=True)")
        tensors[f"{key}::indices"] = residual.indices
        tensors[f"{key}::values"] = residual.values
        meta["tensors"][key] = {  # type: ignore[index]
            "shape": list(residual.shape),
            "dtype": dtype_name(residual.values.dtype),
            "merged_digest": residual.merged_digest,
            "delta_digest": residual.delta_digest,
            "payload_digest": _payload_digest(residual, norms.get(key)),
            "base_digest": (base_digests or {}).get(key, ""),
            "semantics": residual.semantics,
        }
    metadata = {RESIDUAL_META_KEY: json.dumps(meta, sort_keys=True)}
    if record is not None:
        metadata[PROVENANCE_KEY] = pushed({}, record, path)[PROVENANCE_KEY]
    save_file(path, tensors, metadata=metadata)


@dataclass
class ResidualFile:
    """A residual file, read and checked: the residuals and DoRA norms by base key, and what
    verifies them (format 2: ``targets``, ``base_digests``, ``merge_id``; None for format 1)."""

    residuals: dict[str, Residual]
    norms: dict[str, np.ndarray]
    targets: list[str] | None
    base_digests: dict[str, str] | None
    merge_id: str | None

    def check_covers(self, targets: Mapping[str, object], path: object) -> None:
        """Raise unless this file holds exactly one entry per target the adapter's merge changes."""
        unknown = sorted(set(self.residuals) - set(targets))
        if unknown:
            raise FileFormatError(f"{path}: residual holds tensors the adapter does not target: {', '.join(unknown[:5])}")
        missing = sorted(set(targets) - set(self.residuals))
        if missing:
            raise ExactnessError(f"{path}: the residual has no entry for {len(missing)} targeted tensor(s) "
                                 f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): removed, or from "
                                 "another merge; refusing (an exact unmerge needs every entry)")


def read_residual_file(path: str | Path) -> ResidualFile:
    """Read and check a residual file (:func:`save_residuals`, format 1 or 2).

    Malformed files raise FileFormatError; a format-2 file whose target list and entries disagree,
    or an entry whose payload does not match its checksum, raises ExactnessError.
    """
    with SafetensorsFile(path) as handle:
        raw = handle.metadata.get(RESIDUAL_META_KEY)
    if raw is None:
        raise FileFormatError(f"{path}: not a lora-ref residual file (no {RESIDUAL_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
        if meta.get("format") not in (RESIDUAL_FORMAT, RESIDUAL_FORMAT_V1) or not isinstance(meta.get("tensors"), dict):
            raise ValueError("unknown format")
        v2 = meta["format"] == RESIDUAL_FORMAT
        if v2 and (not isinstance(meta.get("targets"), list) or not all(isinstance(t, str) for t in meta["targets"])):
            raise ValueError("'targets' must be a list of tensor names")
    except (ValueError, AttributeError, RecursionError) as exc:  # RecursionError: hostile nesting
        raise FileFormatError(f"{path}: residual metadata is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
    if v2 and set(meta["targets"]) - set(meta["tensors"]):
        gone = sorted(set(meta["targets"]) - set(meta["tensors"]))
        raise ExactnessError(f"{path}: the residual lists {len(meta['targets'])} targets but has no entry for "
                             f"{len(gone)} ({', '.join(gone[:3])}); it was edited or truncated")
    if v2 and set(meta["tensors"]) - set(meta["targets"]):
        raise FileFormatError(f"{path}: the residual holds entries its target list lacks: "
                              f"{', '.join(sorted(set(meta['tensors']) - set(meta['targets']))[:3])}")
    norms = load_dora_norms(path)
    with SafetensorsFile(path) as handle:  # read-only views: the mapping outlives the handle while they live
        arrays = {name: handle.get(name) for name in handle.keys()}
    residuals, base_digests = {}, {}
    for key, info in meta["tensors"].items():
        try:
            indices, values = arrays[f"{key}::indices"], arrays[f"{key}::values"]
            shape = info["shape"]
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"shape {str(shape)[:60]} is not a list of non-negative integers")
            shape = tuple(shape)
            dtype = resolve_dtype(info["dtype"], allow_float64=False)
            merged_digest, delta_digest = str(info["merged_digest"]), str(info["delta_digest"])
            semantics = check_semantics(info.get("semantics", FIXED_ORDER), f"{path}: {key}")  # absent: older files
            if v2:
                payload, base_digests[key] = str(info["payload_digest"]), str(info["base_digest"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{path}: residual entry {key!r} is incomplete ({exc})") from None
        if indices.dtype not in (np.uint32, np.int64) or indices.ndim != 1 or values.dtype != dtype \
                or values.shape != indices.shape:
            raise FileFormatError(f"{path}: residual entry {key!r} has inconsistent indices/values")
        residuals[key] = Residual(indices, values, shape, merged_digest, delta_digest, semantics)
        if v2 and payload != _payload_digest(residuals[key], norms.get(key)):
            raise ExactnessError(f"{path}: residual entry {key!r} fails its checksum (its indices, values or DoRA norm "
                                 "changed since the merge wrote it); refusing")
    verifiable = v2 and all(base_digests.values())
    return ResidualFile(residuals, norms, list(meta["targets"]) if v2 else None, base_digests if verifiable else None,
                        meta.get("merge_id") if v2 else None)


def load_residuals(path: str | Path) -> dict[str, Residual]:
    """The residuals of a residual file, by base key (:func:`read_residual_file` checks them)."""
    return read_residual_file(path).residuals


def load_dora_norms(path: str | Path) -> dict[str, np.ndarray]:
    """The DoRA weight norms (``<key>::dora_norm``, float64 1-D) a residual file holds, by base key."""
    suffix = "::dora_norm"
    with SafetensorsFile(path) as handle:
        names = [n for n in handle.keys() if n.endswith(suffix)]
        norms = {n[: -len(suffix)]: np.array(handle.get(n)) for n in names}
    for key, norm in norms.items():
        if norm.dtype != np.float64 or norm.ndim != 1:
            raise FileFormatError(f"{path}: DoRA norm of {key!r} must be a float64 vector, got {norm.dtype} {norm.shape}")
    return norms
