"""``lora-ref export MODEL.onnx ADAPTER_DIR... --mode merged|dynamic|batched -o OUT.onnx``.

The exporter (``lora_ref.export``) imports onnx and onnxruntime; it is imported inside
:func:`run` so that the rest of the CLI, and the core, never load them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapter import load_adapter
from ..errors import ConfigError
from .paths import PathGuard, add_overwrite_option
from .progress import Progress, progress_line
from .report import add_json_option, emit_report, guard_report

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", epilog="examples:\n  lora-ref export model.onnx my_adapter/ --mode merged -o merged.onnx\n  lora-ref export model.onnx en/ fr/ --mode batched -o batched.onnx --json -", help="write an ONNX graph with LoRA adapters: merged, dynamic or batched")
    p.add_argument("model", help="base ONNX model (e.g. from torch.onnx.export(..., dynamo=True)), or an onnxruntime-genai "
                                 "model folder (then -o is a new folder)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter directories (batched: bank order)")
    p.add_argument("--mode", required=True, choices=["merged", "dynamic", "batched"],
                   help="merged: weights replaced; dynamic: adapters fed as inputs; batched: adapter banks + per-row adapter_index")
    p.add_argument("-o", "--output", help="ONNX file to write (not with --triton-repo)")
    p.add_argument("--base-weights", help="base checkpoint (.safetensors, a sharded index or a model directory): find weights "
                                        "by value when names and metadata do not")
    p.add_argument("--adapter-out", help="dynamic mode: write one <adapter>.onnx_adapter per adapter into this directory")
    p.add_argument("--max-rank", type=int, help="static, zero-padded rank (dynamic: for TensorRT/CUDA graphs; batched: bank width)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage/compute dtype of the graph")
    p.add_argument("--external-data", action="store_true", help="write tensors to OUT.onnx.data (automatic above 2 GiB)")
    p.add_argument("--triton-repo", metavar="DIR", help="batched mode: write the next version of a Triton model repository "
                   "(DIR/NAME/config.pbtxt, DIR/NAME/<v>/model.onnx, adapters.json) instead of -o")
    p.add_argument("--name", default="lora", help="Triton model name in --triton-repo (default: lora)")
    p.add_argument("--requantize", action="store_true",
                   help="merged mode, quantized (MatMulNBits, QDQ, MatMulInteger) bases: write requantized merged weights (reports the error) "
                        "instead of keeping the base with the LoRA beside it")
    p.add_argument("--adapter-names", choices=["genai", "olive", "peft"],
                   help="names of a dynamic graph's LoRA inputs and .onnx_adapter tensors (default: genai for a genai folder, else peft)")
    add_json_option(p, "the export (mode, output, adapters, how each module was found)")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def _progress(args: argparse.Namespace) -> Progress | None:
    """The stderr progress of an export, one step per targeted module (slot); None if quiet."""
    return None if getattr(args, "quiet", False) else Progress(f"export {args.mode}", {})


def run(args: argparse.Namespace) -> int:
    from lora_ref.export import export  # lazy: onnx / onnxruntime only when exporting
    from lora_ref.export.adapter_files import SUFFIX
    from lora_ref.export.graphio import external_data_name, load_model

    if (args.output is None) == (args.triton_repo is None):
        raise ConfigError("give exactly one of -o/--output and --triton-repo")
    if args.triton_repo is not None:
        return _run_triton(args)
    names = [Path(d).resolve().name or "adapter" for d in args.adapters]
    guard = _reading(args)
    if Path(args.model).is_dir():  # a genai model folder is written as a folder holding the same files
        guard.write("output folder", args.output, folder=True)
        for item in sorted(Path(args.model).iterdir()):
            guard.write(f"output folder's {item.name}", Path(args.output) / item.name)
        for name in names:
            guard.write(f"adapter file {name}{SUFFIX}", Path(args.output) / f"{name}{SUFFIX}")
    else:
        guard.write("output graph", args.output).write("output graph's external-data file", external_data_name(args.output))
    if args.adapter_out is not None:
        guard.write("adapter output folder", args.adapter_out, folder=True)
        for name in names:
            guard.write(f"adapter file {name}{SUFFIX}", Path(args.adapter_out) / f"{name}{SUFFIX}")
    guard_report(guard, args).check()
    adapters = [load_adapter(d, name=name) for d, name in zip(args.adapters, names)]
    options = dict(base_weights=args.base_weights, max_rank=args.max_rank, dtype=args.dtype, requantize=args.requantize)
    if Path(args.model).is_dir() and args.adapter_out:
        raise ConfigError("--adapter-out does not apply to a genai folder: its .onnx_adapter files go into the output folder")
    with progress_line(_progress(args)) as progress:
        step = progress.step if progress is not None else None
        if Path(args.model).is_dir():
            from lora_ref.export.genai import export_genai

            report = export_genai(args.model, adapters, args.mode, args.output, adapter_names=args.adapter_names or "genai",
                                  progress=step, **options)
        else:
            report = export(load_model(args.model), adapters, args.mode, args.output, adapter_out=args.adapter_out,
                            external_data=True if args.external_data else None, adapter_names=args.adapter_names or "peft",
                            progress=step, **options)
    found = report.found_by()
    how = ", ".join(f"{count} by {way}" for way, count in sorted({w: list(found.values()).count(w) for w in found.values()}.items()))
    lines = [f"{args.mode} graph with {len(adapters)} adapter(s), {len(found)} module(s) ({how}) -> {report.output}"]
    if args.mode == "batched":
        lines += [*(f"  adapter_index {i}: {name}" for i, name in enumerate(names)), "  adapter_index -1: base model"]
    lines += [f"  {name}: {path}" for name, path in report.adapter_files.items()]
    lines += [f"  {module}: {note}" for module, note in report.notes.items()]
    emit_report(args, {"command": "export", "mode": args.mode, "model": args.model, "output": str(report.output),
                       "adapters": names, "dtype": args.dtype, "found_by": found, "notes": dict(report.notes),
                       "adapter_files": {name: str(path) for name, path in report.adapter_files.items()}}, lines)
    return 0


def _reading(args: argparse.Namespace) -> PathGuard:
    """The path guard with everything an export reads: the graph, its external data, base weights, adapters."""
    from lora_ref.export.graphio import external_data_files

    guard = PathGuard(overwrite=args.overwrite).read("model", args.model).read_checkpoint("base weights", args.base_weights)
    graph = Path(args.model)
    if graph.is_dir():  # an onnxruntime-genai model folder: its decoder graph and every file beside it
        from lora_ref.export.genai import model_file

        graph = model_file(graph)
        for item in sorted(Path(args.model).iterdir()):
            guard.read(f"model folder's {item.name}", item)
    for data in external_data_files(graph):
        guard.read("model's external-data file", data)
    for directory in args.adapters:
        guard.read_adapter(directory)
    return guard


def _run_triton(args: argparse.Namespace) -> int:
    """``--triton-repo DIR [--name NAME]``: the batched graph as the next version of model NAME (export/triton.py)."""
    from lora_ref.export import build_graph
    from lora_ref.export.graphio import load_model
    from lora_ref.export.triton import write_repository

    if args.mode != "batched" or args.adapter_out is not None:
        raise ConfigError("--triton-repo takes --mode batched (and no --adapter-out)")
    guard_report(_reading(args).write("Triton repository", args.triton_repo, folder=True), args).check()
    names = [Path(d).resolve().name or "adapter" for d in args.adapters]
    adapters = [load_adapter(d, name=name) for d, name in zip(args.adapters, names)]
    graph, _ = build_graph(load_model(args.model), adapters, "batched", base_weights=args.base_weights, max_rank=args.max_rank,
                           dtype=args.dtype)
    version = write_repository(graph, args.triton_repo, names, name=args.name, external_data=True if args.external_data else None)
    emit_report(args, {"command": "export", "mode": "batched", "model": args.model, "triton_repo": args.triton_repo,
                       "name": args.name, "version": str(version), "adapters": names},
                [f"Triton model {args.name!r} version {version.name} with {len(names)} adapter(s) -> {version}",
                 *(f"  adapter {name!r}: adapter_index {i}" for i, name in enumerate(names))])
    return 0
