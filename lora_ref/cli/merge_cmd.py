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
then folders (:mod:`lora_ref.sharded`), and ``--in-place`` is not offered. A Hugging Face model
directory (``model.safetensors`` or a sharded index, beside config.json, tokenizer files, ...) is
accepted too: ``-o`` is then a folder that receives the same layout and a verbatim copy of every
other regular file, so ``from_pretrained`` loads it (:mod:`lora_ref.hf_model`); ``--residual`` is
a file (one weights file) or a folder (shards).

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
from dataclasses import dataclass
from pathlib import Path

from ..adapter import load_adapter
from ..atomic import atomic_path, scratch_path
from ..checkpoint import checkpoint_targets, merge_checkpoint, unmerge_checkpoint
from ..dtypes import STORAGE_DTYPES
from ..checkpoint import RESIDUAL_META_KEY
from ..errors import ConfigError, MergeStateError, OverwriteRefusedError
from ..hf_model import ModelDir, merge_model_dir, model_dir, unmerge_model_dir
from ..provenance import adapter_digest, check_merge, check_unmerge, read_stack
from ..safetensors_io import SafetensorsFile
from ..sharded import INDEX_SUFFIX, merge_sharded, read_index, unmerge_sharded
from . import gguf_cmd
from .paths import PathGuard, add_overwrite_option
from .progress import Progress, progress_line
from .report import add_json_option, emit_report, json_file, unmerge_mode


class InPlaceVerificationError(MergeStateError):
    """An in-place rewrite could not be shown lossless; the input was left untouched."""


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", epilog="examples:\n  lora-ref merge base.safetensors my_adapter/ -o merged.safetensors --residual residual.safetensors\n  lora-ref merge model.safetensors.index.json my_adapter/ -o merged_dir/   (sharded)\n  lora-ref merge hf_model_dir/ my_adapter/ -o merged_model_dir/ --residual residual.safetensors   (from_pretrained loads merged_model_dir/)", help="write BASE + adapter; exact with --residual")
    m.add_argument("base", help="base weights (.safetensors, keys as torch state_dict, a sharded *.safetensors.index.json, or a Hugging Face model directory)")
    m.add_argument("adapter", help="PEFT adapter directory")
    target = m.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="merged .safetensors to write (a folder for a sharded or model-directory BASE)")
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
    u.add_argument("merged", help="merged weights (.safetensors, a sharded *.safetensors.index.json, or a merged model directory)")
    u.add_argument("adapter", help="PEFT adapter directory")
    target = u.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="unmerged .safetensors to write (a folder for a sharded or model-directory MERGED)")
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


@dataclass(frozen=True)
class _Checkpoint:
    """The BASE / MERGED argument: a .safetensors file, a sharded index, or a model directory (lora_ref.hf_model)."""

    given: str
    weights: str  # the .safetensors file or the index
    model: ModelDir | None
    shards: tuple[str, ...]  # the index's shard file names; empty for one file

    @property
    def folder(self) -> bool:
        """Whether -o (and, sharded, --residual) are folders."""
        return self.model is not None or bool(self.shards)

    def output_names(self) -> list[str]:
        """The files written into the -o folder."""
        return self.model.output_names() if self.model else [*self.shards, Path(self.weights).name]


def _checkpoint(path: str, in_place: bool, output: str | None) -> _Checkpoint:
    """Resolve BASE / MERGED; --in-place is refused for sharded checkpoints and model directories, and so is
    an -o that names a .safetensors file for a model directory (its output is a folder)."""
    model = model_dir(path)
    if model is not None and output is not None and output.endswith(".safetensors"):
        raise ConfigError(f"{output}: {path} is a model directory, so -o is a folder (the merged model directory); "
                          f"for one weights file give {model.weights} as the checkpoint")
    weights = str(model.weights) if model else path
    shards = tuple(read_index(weights).shards) if weights.endswith(INDEX_SUFFIX) else ()
    if in_place and (model or shards):
        what = "model directories" if model else "sharded checkpoints"
        raise OverwriteRefusedError(f"{path}: --in-place is not offered for {what}; write with -o FOLDER")
    return _Checkpoint(path, weights, model, shards)


def _guard(source: _Checkpoint, label: str, outputs: dict[str, str | None], residual_in: str | None, adapter_dir: str,
           args: argparse.Namespace) -> None:
    """The path guard (:mod:`.paths`) over every file the command reads and writes, before any work.

    ``source`` is read with its shards (a sharded index) or every file of its model directory;
    a folder output is checked file by file (its shards and index, the copied files), and so is a
    sharded residual folder (one residual per shard).
    """
    guard = PathGuard(hint="write elsewhere (or use --in-place, which keeps a verified way back)", overwrite=args.overwrite)
    guard.read_adapter(adapter_dir).read(label, source.given).read(f"{label} weights", source.weights)
    parent = Path(source.weights).parent
    for shard in source.shards:
        guard.read(f"input shard {shard}", parent / shard)
    for item in source.model.files if source.model else ():
        guard.read(f"{label}'s {item.name}", item)
    guard.read("residual", residual_in)
    for shard in source.shards if residual_in is not None else ():  # unmerge: the residual folder's per-shard files
        guard.read(f"residual {shard}", Path(residual_in) / shard)
    for out_label, path in outputs.items():
        names = source.output_names() if out_label == "output" else list(source.shards)  # a residual folder has no index
        if path is None or not names or not source.folder:
            guard.write(out_label, path)
            continue
        guard.write(f"{out_label} folder", path, folder=True)
        for name in names:
            guard.write(f"{out_label} {name}", Path(path) / name)
    guard.write("JSON report", json_file(args)).check()


def _model_files(source: _Checkpoint) -> dict:
    """For a model directory, the report's ``copied`` (file names) and ``not_copied`` ("name (why)") lists."""
    if source.model is None:
        return {}
    return {"copied": [f.name for f in source.model.files], "not_copied": list(source.model.skipped)}


def _skipped_note(source: _Checkpoint) -> None:
    """Say, on stderr, which files of a model directory are not carried into the output (lora_ref.hf_model)."""
    if source.model and source.model.skipped:
        print(f"note: not copied from {source.given}: {', '.join(source.model.skipped[:8])}"
              f"{' ...' if len(source.model.skipped) > 8 else ''}", file=sys.stderr)


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


def run_merge(args: argparse.Namespace) -> int:
    if args.base.endswith(".gguf"):
        return gguf_cmd.run_merge_gguf(args)
    output = args.base if args.in_place else args.output
    source = _checkpoint(args.base, args.in_place, args.output)
    if args.in_place:
        if not args.residual:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place needs --residual: the exact residual is the way back")
        if args.dtype:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place cannot convert --dtype (the original bytes could not be restored)")
        _guard(source, "base", {"residual": args.residual}, None, args.adapter, args)
    else:
        _guard(source, "base", {"output": args.output, "residual": args.residual}, None, args.adapter, args)
    adapter = load_adapter(args.adapter)
    for file, stack, _ in _records(source.weights, None):
        check_merge(stack, adapter_digest(adapter), file, force=args.force)
    with progress_line(_progress(args, "merge", source.weights, adapter)) as progress:
        report = _merge(args, adapter, source, progress)
    _skipped_note(source)
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
        **_model_files(source),
    }, line)
    return 0


def _merge(args: argparse.Namespace, adapter, source: _Checkpoint, progress: Progress | None):
    """The merge itself: in place (verified), a model directory, sharded, or one file; its CheckpointReport."""
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
    elif source.model:
        kwargs["residual"] = kwargs.pop("residual_path")
        report = merge_model_dir(source.model, adapter, args.output, **kwargs)
    elif source.shards:
        kwargs["residual_dir"] = kwargs.pop("residual_path")
        report = merge_sharded(args.base, adapter, args.output, **kwargs)
    else:
        report = merge_checkpoint(args.base, adapter, args.output, **kwargs)
    return report


def run_unmerge(args: argparse.Namespace) -> int:
    if args.merged.endswith(".gguf"):
        return gguf_cmd.run_unmerge_gguf(args)
    source = _checkpoint(args.merged, args.in_place, args.output)
    _guard(source, "merged checkpoint", {} if args.in_place else {"output": args.output}, args.residual, args.adapter, args)
    adapter = load_adapter(args.adapter)
    notes = {check_unmerge(stack, adapter_digest(adapter), file, exact=args.residual is not None, fast=args.fast,
                           force=args.force, residual_merge_id=merge_id)
             for file, stack, merge_id in _records(source.weights, args.residual)}
    with progress_line(_progress(args, "unmerge", source.weights, adapter)) as progress:
        report = _unmerge(args, adapter, source, progress)
    _skipped_note(source)
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
        **_model_files(source),
    }, f"unmerged {len(report.merged)} tensors {mode} into {where}")
    return 0


def _unmerge(args: argparse.Namespace, adapter, source: _Checkpoint, progress: Progress | None):
    """The unmerge itself: in place (verified by merging again), a model directory, sharded, or one file; its CheckpointReport."""
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
    elif source.model:
        report = unmerge_model_dir(source.model, adapter, args.output, residual=args.residual, progress=progress)
    elif source.shards:
        report = unmerge_sharded(args.merged, adapter, args.output, residual_dir=args.residual, progress=progress)
    else:
        report = unmerge_checkpoint(args.merged, adapter, args.output, residual_path=args.residual, progress=progress)
    return report
