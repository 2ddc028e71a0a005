"""``lora-ref convert-adapters ADAPTER_DIR... --graph MODEL.onnx -o OUT_DIR [--json]``.

PEFT adapters to ``.onnx_adapter`` files that fit an existing dynamic graph (lora-ref's, genai's
or Olive's), every name, shape and dtype checked against the graph's LoRA inputs
(:mod:`lora_ref.export.convert`). The exporter is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..adapter import load_adapter
from .paths import refuse_overwrites


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-adapters", help="PEFT adapters -> .onnx_adapter files for an existing dynamic ONNX graph")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter directories")
    p.add_argument("--graph", required=True, help="the dynamic graph the files are for (lora-ref's, genai's or Olive's)")
    p.add_argument("-o", "--output", required=True, help="new folder for <adapter>.onnx_adapter files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_ref.export.convert import convert_adapters  # lazy: onnx / onnxruntime only here

    refuse_overwrites({"output folder": args.output}, {"graph": args.graph, **{f"adapter {d}": d for d in args.adapters}})
    adapters = [load_adapter(d, name=Path(d).resolve().name or "adapter") for d in args.adapters]
    report = convert_adapters(adapters, args.graph, args.output)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for name, entry in report["adapters"].items():
            print(f"{name}: {entry['tensors']} tensors ({report['scheme']} names) -> {entry['file']}")
    return 0
