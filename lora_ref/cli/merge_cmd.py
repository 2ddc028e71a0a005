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
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..adapter import WEIGHTS_NAME, load_adapter
from ..atomic import atomic_path
from ..checkpoint import merge_checkpoint, unmerge_checkpoint
from ..config import CONFIG_NAME
from ..dtypes import STORAGE_DTYPES
from ..errors import MergeStateError, OverwriteRefusedError
from ..sharded import INDEX_SUFFIX, merge_sharded, unmerge_sharded
from .paths import refuse_overwrites


class InPlaceVerificationError(MergeStateError):
    """An in-place rewrite could not be shown lossless; the input was left untouched."""


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write BASE + adapter; exact with --residual")
    m.add_argument("base", help="base weights (.safetensors, keys as torch state_dict, or a sharded *.safetensors.index.json)")
    m.add_argument("adapter", help="PEFT adapter directory")
    target = m.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="merged .safetensors to write")
    target.add_argument("--in-place", action="store_true",
                        help="replace BASE with the merged weights (needs --residual; verified first)")
    m.add_argument("--residual", help="also write the exact-unmerge residual here")
    m.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), help="convert floating tensors before merging")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge adapters holding NaN/inf")
    m.set_defaults(func=run_merge)
    u = sub.add_parser("unmerge", help="write MERGED - adapter; bit-exact with --residual")
    u.add_argument("merged", help="merged weights (.safetensors or a sharded *.safetensors.index.json)")
    u.add_argument("adapter", help="PEFT adapter directory")
    target = u.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="unmerged .safetensors to write")
    target.add_argument("--in-place", action="store_true",
                        help="replace MERGED with the unmerged weights (only if merging them again gives MERGED back)")
    u.add_argument("--residual", help="residual written by merge --residual")
    u.set_defaults(func=run_unmerge)


def _progress(name: str) -> None:
    if sys.stderr.isatty():
        print(f"\r  {name[:70]:<70}", end="", file=sys.stderr, flush=True)


def _refuse_overwrites(outputs: dict[str, str | None], inputs: dict[str, str | None], adapter_dir: str) -> None:
    """Refuse an output that would replace an input (the adapter's files included) or another output."""
    named_inputs = dict(inputs)
    named_inputs.update({f"adapter {n}": str(Path(adapter_dir) / n) for n in (WEIGHTS_NAME, CONFIG_NAME)})
    refuse_overwrites(outputs, named_inputs, hint="write elsewhere (or use --in-place, which keeps a verified way back)")


@contextlib.contextmanager
def _scratch(beside: Path, tag: str) -> Iterator[Path]:
    """A temporary file path next to ``beside`` (same filesystem), removed on exit."""
    fd, name = tempfile.mkstemp(prefix=f".{beside.name}.{tag}.", suffix=".partial", dir=beside.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _refuse_sharded_in_place(path: str, in_place: bool) -> bool:
    """Whether ``path`` is a sharded index; --in-place is refused for those."""
    sharded = path.endswith(INDEX_SUFFIX)
    if sharded and in_place:
        raise OverwriteRefusedError(f"{path}: --in-place is not offered for sharded checkpoints; write with -o FOLDER")
    return sharded


def run_merge(args: argparse.Namespace) -> int:
    output = args.base if args.in_place else args.output
    sharded = _refuse_sharded_in_place(args.base, args.in_place)
    if args.in_place:
        if not args.residual:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place needs --residual: the exact residual is the way back")
        if args.dtype:
            raise OverwriteRefusedError(f"{args.base}: merge --in-place cannot convert --dtype (the original bytes could not be restored)")
        _refuse_overwrites({"residual": args.residual}, {"base": args.base}, args.adapter)
    else:
        _refuse_overwrites({"output": args.output, "residual": args.residual}, {"base": args.base}, args.adapter)
    adapter = load_adapter(args.adapter)
    kwargs = dict(residual_path=args.residual, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite, progress=_progress)
    if args.in_place:
        base = Path(args.base)
        with atomic_path(base) as merged:  # renamed onto BASE only if the block below completes
            report = merge_checkpoint(base, adapter, merged, **kwargs)
            with _scratch(base, "verify") as restored:
                unmerge_checkpoint(merged, adapter, restored, residual_path=args.residual)
                if not filecmp.cmp(restored, base, shallow=False):
                    raise InPlaceVerificationError(
                        f"{base}: unmerging with {args.residual} does not restore the original bytes; left unchanged")
    elif sharded:
        kwargs["residual_dir"] = kwargs.pop("residual_path")
        report = merge_sharded(args.base, adapter, args.output, **kwargs)
    else:
        report = merge_checkpoint(args.base, adapter, args.output, **kwargs)
    elements = sum(report.merged.values())
    line = f"merged {len(report.merged)} tensors ({elements} elements) of {report.tensors_written} into {output}"
    if args.in_place:
        line += " in place (verified: the residual restores the original bytes)"
    if args.residual:
        count = sum(report.residual_counts.values())
        line += (f"; residual: {count} elements ({count / max(elements, 1):.4%}), "
                 f"{report.residual_bytes} bytes -> {args.residual}")
    print(line)
    return 0


def run_unmerge(args: argparse.Namespace) -> int:
    sharded = _refuse_sharded_in_place(args.merged, args.in_place)
    inputs = {"merged checkpoint": args.merged, "residual": args.residual}
    if args.in_place:
        _refuse_overwrites({}, inputs, args.adapter)
    else:
        _refuse_overwrites({"output": args.output}, inputs, args.adapter)
    adapter = load_adapter(args.adapter)
    if args.in_place:
        merged = Path(args.merged)
        with atomic_path(merged) as unmerged:
            report = unmerge_checkpoint(merged, adapter, unmerged, residual_path=args.residual, progress=_progress)
            with _scratch(merged, "verify") as remerged:
                merge_checkpoint(unmerged, adapter, remerged)
                if not filecmp.cmp(remerged, merged, shallow=False):
                    raise InPlaceVerificationError(
                        f"{merged}: merging the unmerged weights again does not give back the original bytes "
                        "(a fast unmerge is lossy; pass the --residual from the merge, or write with -o); left unchanged")
    elif sharded:
        report = unmerge_sharded(args.merged, adapter, args.output, residual_dir=args.residual, progress=_progress)
    else:
        report = unmerge_checkpoint(args.merged, adapter, args.output, residual_path=args.residual, progress=_progress)
    mode = "exactly (residual applied)" if args.residual else "fast (no residual: within the SPEC 3.3 bound)"
    where = f"{args.merged} in place (verified: merging again gives the original bytes)" if args.in_place else args.output
    print(f"unmerged {len(report.merged)} tensors {mode} into {where}")
    return 0
