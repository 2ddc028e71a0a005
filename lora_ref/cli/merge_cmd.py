"""``lora-ref merge`` and ``lora-ref unmerge``: checkpoint files in, checkpoint files out."""

from __future__ import annotations

import argparse
import sys

from ..adapter import load_adapter
from ..checkpoint import merge_checkpoint, unmerge_checkpoint
from ..dtypes import STORAGE_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="write BASE + adapter; exact with --residual")
    m.add_argument("base", help="base weights (.safetensors, keys as torch state_dict)")
    m.add_argument("adapter", help="PEFT adapter directory")
    m.add_argument("-o", "--output", required=True, help="merged .safetensors to write")
    m.add_argument("--residual", help="also write the exact-unmerge residual here")
    m.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), help="convert floating tensors before merging")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge adapters holding NaN/inf")
    m.set_defaults(func=run_merge)
    u = sub.add_parser("unmerge", help="write MERGED - adapter; bit-exact with --residual")
    u.add_argument("merged", help="merged weights (.safetensors)")
    u.add_argument("adapter", help="PEFT adapter directory")
    u.add_argument("-o", "--output", required=True, help="unmerged .safetensors to write")
    u.add_argument("--residual", help="residual written by merge --residual")
    u.set_defaults(func=run_unmerge)


def _progress(name: str) -> None:
    if sys.stderr.isatty():
        print(f"\r  {name[:70]:<70}", end="", file=sys.stderr, flush=True)


def run_merge(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.adapter)
    report = merge_checkpoint(args.base, adapter, args.output, residual_path=args.residual, dtype=args.dtype,
                              allow_nonfinite=args.allow_nonfinite, progress=_progress)
    elements = sum(report.merged.values())
    line = f"merged {len(report.merged)} tensors ({elements} elements) of {report.tensors_written} into {args.output}"
    if args.residual:
        count = sum(report.residual_counts.values())
        line += (f"; residual: {count} elements ({count / max(elements, 1):.4%}), "
                 f"{report.residual_bytes} bytes -> {args.residual}")
    print(line)
    return 0


def run_unmerge(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.adapter)
    report = unmerge_checkpoint(args.merged, adapter, args.output, residual_path=args.residual, progress=_progress)
    mode = "exactly (residual applied)" if args.residual else "fast (no residual: within the SPEC 3.3 bound)"
    print(f"unmerged {len(report.merged)} tensors {mode} into {args.output}")
    return 0
