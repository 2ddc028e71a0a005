"""onnxruntime-genai model folders in and out: ``lora-ref export GENAI_DIR ADAPTER... -o OUT_DIR``.

A genai model folder holds ``genai_config.json`` (its ``model.decoder.filename`` names the graph,
usually ``model.onnx``), the graph with its external data (``model.onnx.data``), and the tokenizer
and processing files. The export reads the graph (sites by genai's names, :mod:`lora_ref.locate`),
builds the merged or dynamic graph, and writes a new folder: the graph under the same file name
with external data ``<file>.data``, for a dynamic graph one ``<adapter>.onnx_adapter`` per adapter
(genai's names by default, so ``og.Adapters(model).load(path, name)`` binds them), and every other
file copied unchanged. genai needs no change to ``genai_config.json`` for either mode: a dynamic
graph's LoRA inputs have rank-0 default initializers, which genai leaves alone until an adapter is
active. Batched graphs are not written for genai: its generator feeds the graph's inputs itself and
has no way to feed ``adapter_index``. The folder is staged beside the output and renamed into place
only when complete (:func:`lora_ref.atomic.staged_folder`); every byte of it, the copies too, is
written through lora-ref's one write primitive, so a full disk is a WriteFailedError naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import onnx

from lora_ref.adapter import Adapter
from lora_ref.atomic import copy_file_atomic, staged_folder
from lora_ref.errors import FileFormatError

from .errors import ExportConfigError

CONFIG = "genai_config.json"


def is_genai_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with a ``genai_config.json``."""
    return (Path(path) / CONFIG).is_file()


def model_file(folder: str | os.PathLike[str]) -> Path:
    """The decoder graph of a genai model folder (``model.decoder.filename`` of its config)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        name = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileFormatError(f"{folder / CONFIG}: not a genai config with model.decoder.filename ({exc})") from None
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise FileFormatError(f"{folder / CONFIG}: model.decoder.filename {name!r} is not a file in the folder")
    return path


def _external_files(path: Path) -> set[str]:
    """The external data files the graph at ``path`` refers to (names relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return files


def export_genai(
    folder: str | os.PathLike[str],
    adapters: Sequence[Adapter],
    mode: str,
    output: str | os.PathLike[str],
    *,
    adapter_names: str = "genai",
    **options,
):
    """Export the genai model folder ``folder`` with ``adapters`` to the new folder ``output`` (module docstring).

    ``options`` are :func:`lora_ref.export.export`'s (base_weights, max_rank, dtype, progress).
    Returns its ExportReport, with paths inside ``output``.
    """
    from .exporter import export

    if mode == "batched":
        raise ExportConfigError("genai cannot feed a batched graph's adapter_index; export --mode dynamic and switch "
                                "adapters with og.Adapters / set_active_adapter")
    folder, output = Path(folder), Path(output)
    graph_path = model_file(folder)
    if output.exists():
        raise ExportConfigError(f"{output}: already exists; the genai output folder must be new")
    skip = {graph_path.name, *_external_files(graph_path)}
    with staged_folder(output) as staging:
        report = export(graph_path, adapters, mode, staging / graph_path.name, external_data=True,
                        adapter_out=staging if mode == "dynamic" else None, adapter_names=adapter_names, **options)
        for item in sorted(folder.iterdir()):
            if item.name not in skip and item.is_file() and not (staging / item.name).exists():
                copy_file_atomic(item, staging / item.name)
    report.output = output / graph_path.name
    report.adapter_files = {name: output / path.name for name, path in report.adapter_files.items()}
    return report
