"""``lora-ref merge`` and ``lora-ref unmerge``: checkpoint files in, checkpoint files out.

Nothing is lost. Every output is written atomically (a ``.partial`` temporary beside it, renamed
at the end), so an interrupted command leaves whatever was at the output name intact. No output
may be one of the command's inputs (checked by inode, and by resolved path for files not yet
written) unless ``--in-place`` is given, and ``--in-place`` replaces its input only once a
verified way back exists:

- ``merge BASE ADAPTER --in-place --residual R`` merges exactly into a temporary beside BASE,
  saves R, unmerges the temporary with R into a second temporary and checks that this is
  byte-identical to BASE; only then renames the merged temporary onto BASE.
- ``unmerge MERGED ADAPTER --in-place [--residual R]`` unmerges into a temporary, merges that
  again and checks the result is byte-identical to MERGED (so MERGED is recoverable from the
  output and the adapter); only then renames. A fast unmerge that does not round-trip is refused.

A sharded checkpoint is given by its ``*.safetensors.index.json``; ``-o`` and ``--residual`` are
then folders (:mod:`lora_ref.sharded`), and ``--in-place`` is not offered.

Before any work, the merge record of the input (each shard's) is checked (:mod:`lora_ref.provenance`):
a double merge, an unmerge of an adapter the record does not hold or not on top, and an exact
residual of another merge are refused unless ``--force``; an exact merge unmerged without its
residual needs ``--fast``. "exactly" is printed only when the restored tensors matched the base
digests the residual recorded (docs/integrity.md).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import sys
from pathlib import Path

from ..adapter import load_adapter
from ..atomic import atomic_path, scratch_path
from ..checkpoint import checkpoint_targets, merge_checkpoint, unmerge_checkpoint
from ..dtypes import STORAGE_DTYPES
from ..checkpoint import RESIDUAL_META_KEY
from ..errors import MergeStateError, OverwriteRefusedError
from ..provenance import adapter_digest, check_merge, check_unmerge, read_stack
from ..safetensors_io import SafetensorsFile
from ..sharded import INDEX_SUFFIX, merge_sharded, read_index, unmerge_sharded
from . import gguf_cmd
from .paths import PathGuard, add_overwrite_option
from .progress import Progress
from .report import add_json_option, emit_report, json_file, unmerge_mode


class InPlaceVerificationError(MergeStateError):
    """An in-place rewrite could not be shown lossless; the input was left untouched."""


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", epilog="examples:\n  lora-ref merge base.safetensors my_adapter/ -o merged.safetensors --residual residual.safetensors\n  lora-ref merge model.safetensors.index.json my_adapter/ -o merged_dir/   (sharded)", help="write BASE + adapter; exact with --residual")
    m.add_argument("base", help="base weights (.safetensors, keys as torch state_dict, or a sharded *.safetensors.index.json)")
    m.add_argument("adapter", help="PEFT adapter directory")
    target = m.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="merged .safetensors to write")
    target.add_argument("--in-place", action="store_true",
                        help="replace BASE with the merged weights (needs --residual; verified first)")
    m.add_argument("--residual", help="also write the exact-unmerge residual here")
    m.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), help="convert floating tensors before merging")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge adapters holding NaN/inf")
    m.add_argument("--force", action="store_true", help="merge even if BASE's merge record already holds this adapter")
    m.add_argument("--requantize", action="store_true", help="GGUF: requantize quantized targets (lossy, reported)")
    add_json_option(m, "the merge (tensors, element counts, residual size)")
    add_overwrite_option(m)
    m.set_defaults(func=run_merge)
    u = sub.add_parser("unmerge", epilog="example:\n  lora-ref unmerge merged.safetensors my_adapter/ -o base_again.safetensors --residual residual.safetensors", help="write MERGED - adapter; bit-exact with --residual")
    u.add_argument("merged", help="merged weights (.safetensors or a sharded *.safetensors.index.json)")
    u.add_argument("adapter", help="PEFT adapter directory")
    target = u.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="unmerged .safetensors to write")
    target.add_argument("--in-place", action="store_true",
                        help="replace MERGED with the unmerged weights (only if merging them again gives MERGED back)")
    u.add_argument("--residual", help="residual written by merge --residual")
    u.add_argument("--fast", action="store_true", help="accept a rounding unmerge of an exactly merged file (no residual)")
    u.add_argument("--force", action="store_true",
                   help="unmerge even if the merge record does not hold this adapter on top, or the residual is another merge's")
    u.add_argument("--requantize", action="store_true", help="GGUF: requantize quantized targets (lossy, reported)")
    add_json_option(u, "the unmerge (tensors, mode, verification)")
    add_overwrite_option(u)
    u.set_defaults(func=run_unmerge)


def _progress(args: argparse.Namespace, label: str, path: str, adapter) -> Progress | None:
    """The stderr progress of a merge/unmerge of ``path`` (a file or a sharded index), by the targets' bytes; None if quiet."""
    if getattr(args, "quiet", False):
        return None
    targets = checkpoint_targets(adapter)
    files = [str(read_index(path).shard_path(s)) for s in read_index(path).shards] if path.endswith(INDEX_SUFFIX) else [path]
    sizes: dict[str, int] = {}
    for file in files:
        with SafetensorsFile(file) as handle:
            sizes.update({key: handle.tensors[key].nbytes for key in targets if key in handle})
    return Progress(label, sizes)


@contextlib.contextmanager
def _progress_line(progress: Progress | None):
    """The progress line is ended before anything else is printed, whether the work succeeds or not."""
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()


def _guard(outputs: dict[str, str | None], inputs: dict[str, str | None], adapter_dir: str, sharded: bool,
           args: argparse.Namespace) -> None:
    """The path guard (:mod:`.paths`) over every file the command reads and writes, before any work.

    For a sharded checkpoint (``inputs`` then names its index, outputs are folders) the shards
    are inputs too, and each folder output is checked file by file (its shards and index).
    """
    guard = PathGuard(hint="write elsewhere (or use --in-place, which keeps a verified way back)", overwrite=args.overwrite)
    guard.read_adapter(adapter_dir)
    shards: list[str] = []
    index_name = None
    for label, path in inputs.items():
        guard.read(label, path)
        if sharded and path is not None and path.endswith(INDEX_SUFFIX):
            index = read_index(path)
            shards, index_name = index.shards, index.path.name
            for shard in shards:
                guard.read(f"input shard {shard}", index.shard_path(shard))
    folders = {label: path for label, path in inputs.items() if sharded and label == "residual" and path is not None}
    for label, path in folders.items():  # unmerge: the residual folder's per-shard files
        for shard in shards:
            guard.read(f"residual {shard}", Path(path) / shard)
    for label, path in outputs.items():
        if not sharded or path is None:
            guard.write(label, path)
            continue
        guard.write(f"{label} folder", path, folder=True)
        for name in [*shards, index_name] if label == "output" else shards:  # a residual folder has no index
            guard.write(f"{label} {name}", Path(path) / name)
    guard.write("JSON report", json_file(args)).check()


def _records(path: str, residual: str | None) -> list[tuple[str, list[dict] | None, str | None]]:
    """(file, its merge records or None, the merge id of its residual or None) for a file or each shard."""
    if path.endswith(INDEX_SUFFIX):
        index = read_index(path)
        files = [(str(index.shard_path(s)), str(Path(residual) / s) if residual else None) for s in index.shards]
    else:
        files = [(path, residual)]
    out = []
    for file, res in files:
        with SafetensorsFile(file) as handle:
            stack = read_stack(handle.metadata, file)
        merge_id = None
        if res is not None and Path(res).is_file():
            with SafetensorsFile(res) as handle, contextlib.suppress(ValueError, AttributeError, RecursionError):
                merge_id = json.loads(handle.metadata.get(RESIDUAL_META_KEY, "{}")).get("merge_id")
        out.append((file, stack, merge_id))
    return out


def _refuse_sharded_in_place(path: str, in_place: bool) -> bool:
    """Whether ``path`` is a sharded index; --in-place is refused for those."""
    sharded = path.endswith(INDEX_SUFFIX)
    if sharded and in_place:
        raise OverwriteRefusedError(f"{path}: --in-place is not offered for sharded checkpoints; write with -o FOLDER")
    return sharded


def run_merge(args: argparse.Namespace) -> int:
    if args.base.endswith(".gguf"):
        return gguf_cmd.run_merge_gguf(args)
    output = args.base if args.in_place else args.output
    sharded = _refuse_sharded_in_place(args.base, args.in_place)
    if args.in_place:
        if not args.residual:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place needs --residual: the exact residual is the way back")
        if args.dtype:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place cannot convert --dtype (the original bytes could not be restored)")
        _guard({"residual": args.residual}, {"base": args.base}, args.adapter, sharded, args)
    else:
        _guard({"output": args.output, "residual": args.residual}, {"base": args.base}, args.adapter, sharded, args)
    adapter = load_adapter(args.adapter)
    for file, stack, _ in _records(args.base, None):
        check_merge(stack, adapter_digest(adapter), file, force=args.force)
    with _progress_line(_progress(args, "merge", args.base, adapter)) as progress:
        report = _merge(args, adapter, sharded, progress)
    elements = sum(report.merged.values())
    line = f"merged {len(report.merged)} tensors ({elements} elements) of {report.tensors_written} into {output}"
    if args.in_place:
        line += " in place (verified: the residual restores the original bytes)"
    if args.residual:
        count = sum(report.residual_counts.values())
        line += (f"; residual: {count} elements ({count / max(elements, 1):.4%}), "
                 f"{report.residual_bytes} bytes -> {args.residual}")
    emit_report(args, {
        "command": "merge", "base": args.base, "adapter": args.adapter, "output": output, "in_place": args.in_place,
        "dtype": args.dtype, "tensors_written": report.tensors_written, "merged": report.merged, "elements": elements,
        "residual": None if not args.residual else {
            "path": args.residual, "elements": sum(report.residual_counts.values()), "bytes": report.residual_bytes,
            "per_tensor": report.residual_counts},
    }, line)
    return 0


def _merge(args: argparse.Namespace, adapter, sharded: bool, progress: Progress | None):
    """The merge itself: in place (verified), sharded, or one file; its CheckpointReport."""
    kwargs = dict(residual_path=args.residual, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite, progress=progress)
    if args.in_place:
        base = Path(args.base)
        with atomic_path(base) as merged:  # renamed onto BASE only if the block below completes
            report = merge_checkpoint(base, adapter, merged, **kwargs)
            with scratch_path(base, "verify") as restored:
                unmerge_checkpoint(merged, adapter, restored, residual_path=args.residual)
                if not filecmp.cmp(restored, base, shallow=False):
                    raise InPlaceVerificationError(
                        f"{base}: unmerging with {args.residual} does not restore the original bytes; left unchanged")
    elif sharded:
        kwargs["residual_dir"] = kwargs.pop("residual_path")
        report = merge_sharded(args.base, adapter, args.output, **kwargs)
    else:
        report = merge_checkpoint(args.base, adapter, args.output, **kwargs)
    return report


def run_unmerge(args: argparse.Namespace) -> int:
    if args.merged.endswith(".gguf"):
        return gguf_cmd.run_unmerge_gguf(args)
    sharded = _refuse_sharded_in_place(args.merged, args.in_place)
    inputs = {"merged checkpoint": args.merged, "residual": args.residual}
    _guard({} if args.in_place else {"output": args.output}, inputs, args.adapter, sharded, args)
    adapter = load_adapter(args.adapter)
    notes = {check_unmerge(stack, adapter_digest(adapter), file, exact=args.residual is not None, fast=args.fast,
                           force=args.force, residual_merge_id=merge_id)
             for file, stack, merge_id in _records(args.merged, args.residual)}
    with _progress_line(_progress(args, "unmerge", args.merged, adapter)) as progress:
        report = _unmerge(args, adapter, sharded, progress)
    kind, mode = unmerge_mode(args.residual is not None, report.verified)
    if kind == "residual-unverified":
        print(f"note: {args.residual} predates residual checksums (lora-ref-residual/1): the restore could not be "
              "verified against the base; re-merge with this version to get a verifiable residual", file=sys.stderr)
    where = f"{args.merged} in place (verified: merging again gives the original bytes)" if args.in_place else args.output
    for note in sorted(n for n in notes if n):  # after the work, so a refusal stays one line
        print(note, file=sys.stderr)
    emit_report(args, {
        "command": "unmerge", "merged": args.merged, "adapter": args.adapter, "output": args.merged if args.in_place else args.output,
        "in_place": args.in_place, "residual": args.residual, "mode": kind, "verified": report.verified,
        "tensors_written": report.tensors_written, "unmerged": report.merged, "elements": sum(report.merged.values()),
    }, f"unmerged {len(report.merged)} tensors {mode} into {where}")
    return 0


def _unmerge(args: argparse.Namespace, adapter, sharded: bool, progress: Progress | None):
    """The unmerge itself: in place (verified by merging again), sharded, or one file; its CheckpointReport."""
    if args.in_place:
        merged = Path(args.merged)
        with atomic_path(merged) as unmerged:
            report = unmerge_checkpoint(merged, adapter, unmerged, residual_path=args.residual, progress=progress)
            with scratch_path(merged, "verify") as remerged, SafetensorsFile(merged) as handle:
                merge_checkpoint(unmerged, adapter, remerged, metadata=handle.metadata)  # MERGED's own header back
                if not filecmp.cmp(remerged, merged, shallow=False):
                    raise InPlaceVerificationError(
                        f"{merged}: merging the unmerged weights again does not give back the original bytes "
                        "(a fast unmerge is lossy; pass the --residual from the merge, or write with -o); left unchanged")
    elif sharded:
        report = unmerge_sharded(args.merged, adapter, args.output, residual_dir=args.residual, progress=progress)
    else:
        report = unmerge_checkpoint(args.merged, adapter, args.output, residual_path=args.residual, progress=progress)
    return report
