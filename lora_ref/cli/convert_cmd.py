"""``lora-ref convert-adapters ADAPTER_DIR... --graph MODEL.onnx -o OUT_DIR [--json]``.

PEFT adapters to ``.onnx_adapter`` files that fit an existing dynamic graph (lora-ref's, genai's
or Olive's), every name, shape and dtype checked against the graph's LoRA inputs
(:mod:`lora_ref.export.convert`). The exporter is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapter import load_adapter
from .paths import PathGuard, add_overwrite_option
from .progress import Progress, progress_line
from .report import add_json_option, emit_report, guard_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-adapters", epilog="example:\n  lora-ref convert-adapters my_adapter/ --graph model_dynamic.onnx -o onnx_adapters/", help="PEFT adapters -> .onnx_adapter files for an existing dynamic ONNX graph")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter directories")
    p.add_argument("--graph", required=True, help="the dynamic graph the files are for (lora-ref's, genai's or Olive's)")
    p.add_argument("-o", "--output", required=True, help="new folder for <adapter>.onnx_adapter files")
    add_json_option(p, "the conversion (scheme, per-adapter tensors and files)")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_ref.export.convert import convert_adapters  # lazy: onnx / onnxruntime only here

    from lora_ref.export.adapter_files import SUFFIX

    names = [Path(d).resolve().name or "adapter" for d in args.adapters]
    guard = PathGuard(overwrite=args.overwrite).read("graph", args.graph).write("output folder", args.output, folder=True)
    for directory in args.adapters:
        guard.read_adapter(directory)
    for name in names:
        guard.write(f"adapter file {name}{SUFFIX}", Path(args.output) / f"{name}{SUFFIX}")
    guard_report(guard, args).check()
    adapters = [load_adapter(d, name=name) for d, name in zip(args.adapters, names)]
    progress = None if args.quiet else Progress("convert-adapters", {a.name: a.nbytes() for a in adapters})
    with progress_line(progress):
        report = convert_adapters(adapters, args.graph, args.output, progress=progress)
    emit_report(args, report, [f"{name}: {entry['tensors']} tensors ({report['scheme']} names) -> {entry['file']}"
                               for name, entry in report["adapters"].items()])
    return 0
