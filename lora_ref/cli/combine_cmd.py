"""``lora-ref combine ADAPTER_DIR... --weights W... --method cat|svd|linear [--rank N] -o OUT_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapter import WEIGHTS_NAME, load_adapter, save_adapter
from ..config import CONFIG_NAME
from ..combine import METHODS, combine
from ..errors import ConfigError, FileFormatError
from . import printable
from .paths import PathGuard, add_overwrite_option
from .report import add_json_option, emit_report, guard_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("combine", epilog="example:\n  lora-ref combine en/ legal/ --weights 1 0.5 --method cat -o en_legal/ --json report.json", help="combine adapters into one: cat (exact), svd (rank N, error reported), "
                                       "linear (PEFT-compatible, with cross terms)")
    p.add_argument("adapters", nargs="+", help="PEFT adapter directories")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: all 1)")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="cat: exact (ranks add up); svd: best rank --rank approximation; linear: PEFT's weighted sum")
    p.add_argument("--rank", type=int, help="target rank for svd (default: the largest source rank)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                   help="stored dtype (default: the first adapter's)")
    p.add_argument("-o", "--output", required=True, help="adapter directory to write")
    add_json_option(p, "the combination (method, weights, per-module ranks and errors, output)")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise ConfigError(f"{len(args.adapters)} adapter(s) but {len(weights)} weight(s); give one weight per adapter")
    guard = PathGuard(overwrite=args.overwrite)
    for directory in args.adapters:
        guard.read_adapter(directory)
    guard.write("output adapter directory", args.output, folder=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        guard.write(f"output {name}", Path(args.output) / name)
    guard_report(guard, args).check()
    adapters = [load_adapter(d, name=f"adapter{i}") for i, d in enumerate(args.adapters)]
    result = combine(adapters, weights, args.method, rank=args.rank, dtype=args.dtype)
    try:
        save_adapter(result.adapter, args.output)
    except (FileExistsError, NotADirectoryError):
        raise FileFormatError(f"{args.output}: cannot write an adapter directory there (a file is in the way)") from None
    report = {"command": "combine", "adapters": args.adapters, "output": args.output, **result.to_dict()}
    lines = [f"{args.method}: {len(adapters)} adapters, weights {weights} -> rank {report['rank']} adapter in {args.output}",
             f"{'module':<40} {'R':>4} {'r':>4} {'||delta||_F':>12} {'stored err_F':>13} {'discarded_F':>12}"]
    for name, row in report["modules"].items():
        lines.append(f"{printable(name):<40} {row['target_rank']:>4} {row['rank']:>4} {row['delta_frobenius']:>12.4g} "
                     f"{row['stored_error_frobenius']:>13.4g} {row['discarded_frobenius']:>12.4g}")
    if args.method == "linear":
        lines.append("note: linear is PEFT's combination: B A includes cross terms B_i A_j (i != j); "
                     "'stored err_F' is their size. Use cat for the exact weighted sum.")
    emit_report(args, report, lines)
    return 0
