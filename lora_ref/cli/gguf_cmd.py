"""``lora-ref to-gguf`` and ``lora-ref verify-gguf``, and the GGUF side of ``merge`` / ``unmerge``.

llama.cpp users: convert a PEFT adapter to a GGUF LoRA that llama.cpp applies with PEFT's exact
scale (rsLoRA, rank/alpha patterns, alpha = 0 kept), check any GGUF adapter against its PEFT
source, and merge an adapter into a GGUF model exactly (docs/gguf.md, SPEC G).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..adapter import WEIGHTS_NAME, load_adapter
from ..config import CONFIG_NAME
from ..dtypes import STORAGE_DTYPES
from .paths import add_overwrite_option, refuse_overwrites
from .report import emit_report, json_file, unmerge_mode

EXIT_CHECK_FAILED = 1


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("to-gguf", epilog="example:\n  lora-ref to-gguf my_adapter/ --base model.gguf -o my_adapter.gguf", help="write a PEFT adapter as a llama.cpp LoRA GGUF that keeps PEFT's scale")
    t.add_argument("adapter", help="PEFT adapter directory")
    t.add_argument("--base", required=True, help="the base model's .gguf (architecture, heads, tensor names)")
    t.add_argument("-o", "--output", required=True, help="adapter .gguf to write")
    t.add_argument("--outtype", choices=sorted(STORAGE_DTYPES), default="float32", help="type of lora_a/lora_b (default float32)")
    add_overwrite_option(t)
    t.set_defaults(func=run_to_gguf)
    v = sub.add_parser("verify-gguf", epilog="example:\n  lora-ref verify-gguf my_adapter/ my_adapter.gguf --base model.gguf --json -", help="check a GGUF LoRA's effect, as llama.cpp applies it, against the PEFT adapter")
    v.add_argument("adapter", help="PEFT adapter directory")
    v.add_argument("gguf_adapter", help="the GGUF LoRA adapter to check")
    v.add_argument("--base", required=True, help="the base model's .gguf")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=run_verify_gguf)


def _adapter_inputs(adapter_dir: str) -> dict[str, str]:
    return {f"adapter {n}": f"{adapter_dir}/{n}" for n in (WEIGHTS_NAME, CONFIG_NAME)}


def run_to_gguf(args: argparse.Namespace) -> int:
    from ..gguf_adapter import to_gguf

    refuse_overwrites({"output": args.output}, {"base model": args.base, **_adapter_inputs(args.adapter)}, overwrite=args.overwrite)
    report = to_gguf(load_adapter(args.adapter), args.base, args.output, outtype=args.outtype)
    folded = report.folded
    print(f"wrote {len(report.tensors)} LoRA pairs ({report.architecture}, adapter.lora.alpha = {report.alpha:g}) to "
          f"{args.output}" + (f"; PEFT's scale folded into lora_b for {len(folded)} of them" if folded else ""))
    return 0


def run_verify_gguf(args: argparse.Namespace) -> int:
    from ..gguf_adapter import verify_gguf

    report = verify_gguf(load_adapter(args.adapter), args.gguf_adapter, args.base)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        bad = [m for m in report.modules if m.status != "ok"]
        for problem in report.problems:
            print(f"problem: {problem}")
        for m in bad:
            print(f"{m.status}: {m.module} -> {m.tensor}" + (f": {m.detail}" if m.detail else ""))
        for name in report.extra:
            print(f"extra tensor: {name}")
        worst = max((m.max_error_over_bound or 0.0 for m in report.modules), default=0.0)
        verdict = "ok" if report.ok else "FAILED"
        print(f"{verdict}: {len(report.modules) - len(bad)} of {len(report.modules)} modules match PEFT within the bound "
              f"(worst error {worst:.3g} x bound), {len(report.extra)} extra tensors, {len(report.problems)} metadata problems")
    return 0 if report.ok else EXIT_CHECK_FAILED


def run_merge_gguf(args: argparse.Namespace) -> int:
    """``lora-ref merge BASE.gguf ADAPTER -o OUT.gguf [--residual R] [--requantize]``."""
    from ..gguf_checkpoint import merge_gguf

    _refuse_gguf_options(args, "merge")
    refuse_overwrites({"output": args.output, "residual": args.residual, "JSON report": json_file(args)},
                      {"base": args.base, **_adapter_inputs(args.adapter)}, overwrite=args.overwrite)
    report = merge_gguf(args.base, load_adapter(args.adapter), args.output, residual_path=args.residual,
                        requantize=args.requantize, allow_nonfinite=args.allow_nonfinite, force=args.force)
    line = f"merged {len(report.merged)} tensors of {report.tensors_written} into {args.output}"
    if args.residual:
        line += f"; residual: {sum(report.residual_counts.values())} elements, {report.residual_bytes} bytes -> {args.residual}"
    emit_report(args, {"command": "merge", "base": args.base, "adapter": args.adapter, "output": args.output,
                       "tensors_written": report.tensors_written, "merged": report.merged,
                       "residual": None if not args.residual else {"path": args.residual, "per_tensor": report.residual_counts,
                                                                   "bytes": report.residual_bytes},
                       "requantized": report.requantized}, [line, *_requantized_lines(report.requantized)])
    return 0


def run_unmerge_gguf(args: argparse.Namespace) -> int:
    """``lora-ref unmerge MERGED.gguf ADAPTER -o OUT.gguf [--residual R] [--requantize]``."""
    from ..gguf_checkpoint import unmerge_gguf

    _refuse_gguf_options(args, "unmerge")
    refuse_overwrites({"output": args.output, "JSON report": json_file(args)},
                      {"merged model": args.merged, "residual": args.residual, **_adapter_inputs(args.adapter)},
                      overwrite=args.overwrite)
    report = unmerge_gguf(args.merged, load_adapter(args.adapter), args.output, residual_path=args.residual,
                          requantize=args.requantize, fast=args.fast, force=args.force)
    if report.note:
        print(report.note, file=sys.stderr)
    kind, mode = unmerge_mode(args.residual is not None, report.verified)
    emit_report(args, {"command": "unmerge", "merged": args.merged, "adapter": args.adapter, "output": args.output,
                       "residual": args.residual, "mode": kind, "verified": report.verified, "unmerged": report.merged,
                       "requantized": report.requantized},
                [f"unmerged {len(report.merged)} tensors {mode} into {args.output}", *_requantized_lines(report.requantized)])
    return 0


def _refuse_gguf_options(args: argparse.Namespace, command: str) -> None:
    from ..errors import OverwriteRefusedError

    if args.in_place:
        raise OverwriteRefusedError(f"{command} --in-place is not offered for GGUF files; write with -o OUT.gguf")
    if getattr(args, "dtype", None):
        raise OverwriteRefusedError(f"{command} --dtype is not offered for GGUF files (tensor types are kept)")


def _requantized_lines(requantized: dict[str, dict[str, object]]) -> list[str]:
    return [f"requantized {name} ({info['type']}): max |error| {info['max_abs_error']:.3g}, "
            f"RMS error / RMS ΔW = {info['error_over_effect']:.3g}" for name, info in requantized.items()]
