"""Hugging Face model directories (``save_pretrained``) as base checkpoints, and as merged outputs.

A model directory holds its weights as ``model.safetensors``, or as shards listed by
``model.safetensors.index.json`` (:mod:`lora_ref.sharded`), beside the files that make it
loadable: ``config.json``, ``generation_config.json``, tokenizer files, ``special_tokens_map.json``,
chat templates, ... (:attr:`ModelDir.files`).

Merging a directory into a directory writes the same layout (one file, or the same shards and an
index whose ``weight_map`` lists every tensor of the merged shards and whose ``total_size`` is
theirs) and copies every other regular file of the top level byte for byte, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the merged model. All or nothing: the
weights and the copies are written into one staged folder (:func:`lora_ref.atomic.staged_folder`)
that becomes the output only when everything is written. Unmerging such a directory gives the
original directory back (weights bit for bit with the merge's residual).

What is never carried, and is named in :attr:`ModelDir.skipped` (the CLI prints it): pickled files
(``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``: never opened), other weight files
(``*.safetensors`` that are not the model's weights, ``*.gguf``, ``*.onnx``, ...: they would hold
unmerged weights), hidden files, subfolders and anything that is not a regular file. A directory
whose weights exist only as pickles (``pytorch_model.bin``) is refused with the one-time conversion
to safetensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .atomic import copy_file_atomic, staged_folder, transaction
from .checkpoint import CheckpointReport, merge_checkpoint, unmerge_checkpoint
from .errors import FileFormatError, UnsafeFileError
from .safetensors_io import SafetensorsFile, TensorInfo
from .sharded import INDEX_SUFFIX, check_folder_output, merge_sharded, read_index, unmerge_sharded

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model" + INDEX_SUFFIX
#: Files that may run code when loaded (pickles): never opened, never copied.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Weight files of other formats: copying them would put unmerged weights beside the merged ones.
OTHER_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".npz", ".npy")
#: The one-time conversion of a pickled model directory, where the files are trusted.
CONVERSION = ("convert it once, where you trust the files, to safetensors: python -c \"from transformers import "
              "AutoModelForCausalLM as M; M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors', "
              "safe_serialization=True)\" (use the Auto class of the model's task)")


@dataclass(frozen=True)
class ModelDir:
    """A validated model directory: its weights (``model.safetensors`` or the index), the files carried, the rest."""

    path: Path
    weights: Path
    files: tuple[Path, ...]
    skipped: tuple[str, ...]

    @property
    def sharded(self) -> bool:
        return self.weights.name == INDEX_FILE

    def weight_names(self) -> list[str]:
        """The names of the weight files in the directory: the file, or the shards and the index."""
        return [*read_index(self.weights).shards, INDEX_FILE] if self.sharded else [WEIGHTS_FILE]

    def output_names(self) -> list[str]:
        """Every file name a merge or unmerge of this directory writes into the output folder."""
        return [*self.weight_names(), *(f.name for f in self.files)]


def _skip_reason(entry: os.DirEntry[str]) -> str | None:
    """Why a top-level entry is not copied (None: it is copied)."""
    name = entry.name
    if name.startswith("."):
        return "hidden"
    if entry.is_dir():
        return "a folder"
    if not entry.is_file():
        return "not a regular file"
    if name.lower().endswith(PICKLE_SUFFIXES):
        return "pickle, never opened"
    if name.lower().endswith(OTHER_WEIGHT_SUFFIXES):
        return "other weights"
    return None


def model_dir(path: str | os.PathLike[str]) -> ModelDir | None:
    """The model directory at ``path``, or None when ``path`` is not a directory (a file: the caller's case).

    Raises UnsafeFileError for a directory whose weights are only pickles, FileFormatError for one
    without ``model.safetensors`` or ``model.safetensors.index.json`` (or with both), saying which.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    single, index = (path / WEIGHTS_FILE).is_file(), (path / INDEX_FILE).is_file()
    if single and index:
        raise FileFormatError(f"{path}: holds both {WEIGHTS_FILE} and {INDEX_FILE}; which are the weights is "
                              "ambiguous: remove one")
    if not single and not index:
        names = sorted(os.listdir(path))
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UnsafeFileError(f"{path}: its weights are pickles ({', '.join(pickles[:3])}), which can execute code "
                                  f"and are never loaded; {CONVERSION.format(dir=path)}")
        if "adapter_config.json" in names:
            raise FileFormatError(f"{path}: is an adapter directory (adapter_config.json), not a model; give the base "
                                  f"model's directory or its {WEIGHTS_FILE}")
        raise FileFormatError(f"{path}: not a model directory: missing {WEIGHTS_FILE} (or a sharded {INDEX_FILE})")
    weights = path / (INDEX_FILE if index else WEIGHTS_FILE)
    weight_names = set([*read_index(weights).shards, INDEX_FILE] if index else [WEIGHTS_FILE])
    files, skipped = [], []
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name in weight_names:
                continue
            reason = _skip_reason(entry)
            if reason is None:
                files.append(path / entry.name)
            else:
                skipped.append(f"{entry.name} ({reason})")
    return ModelDir(path=path, weights=weights, files=tuple(files), skipped=tuple(skipped))


def weight_files(path: str | os.PathLike[str]) -> list[Path]:
    """The .safetensors files of a checkpoint given as one file, a sharded index or a model directory."""
    model = model_dir(path)
    weights = model.weights if model else Path(path)
    if weights.name.endswith(INDEX_SUFFIX):
        index = read_index(weights)
        return [index.shard_path(shard) for shard in index.shards]
    return [weights]


class CheckpointTensors(Mapping):
    """Every tensor of a checkpoint (one file, a sharded index or a model directory), read only when asked.

    A context manager: the files stay open (memory-mapped by :class:`SafetensorsFile`) until it exits.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.files = weight_files(path)
        self._stack = contextlib.ExitStack()
        try:
            handles = [self._stack.enter_context(SafetensorsFile(file)) for file in self.files]
        except BaseException:
            self._stack.close()
            raise
        self._where = {key: handle for handle in handles for key in handle.keys()}

    def __enter__(self) -> CheckpointTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def info(self, key: str) -> TensorInfo:
        """dtype, shape and byte size of ``key`` without reading it."""
        return self._where[key].tensors[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _write_dir(model: ModelDir, adapter: Adapter, out_dir: str | os.PathLike[str], residual: str | os.PathLike[str] | None,
               single: Callable[..., CheckpointReport], sharded: Callable[..., CheckpointReport], options: dict) -> CheckpointReport:
    """The weights (by the one-file ``single`` or the per-shard ``sharded`` step) and the carried files, into ``out_dir`` all together."""
    if model.sharded:
        return sharded(model.weights, adapter, out_dir, residual_dir=residual, extra_files=model.files, **options)
    out_dir = Path(out_dir)
    check_folder_output(model.path, out_dir, [WEIGHTS_FILE, *(f.name for f in model.files)])
    with transaction(), staged_folder(out_dir) as staged:
        report = single(model.weights, adapter, staged / WEIGHTS_FILE, residual_path=residual, **options)
        for source in model.files:
            copy_file_atomic(source, staged / source.name)
    return report


def merge_model_dir(
    model: ModelDir,
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    residual: str | os.PathLike[str] | None = None,
    **options,
) -> CheckpointReport:
    """Merge ``adapter`` into the model directory; write a loadable model directory ``out_dir`` (module doc).

    ``residual`` is a file for a single-file model and a folder (one residual per shard) for a
    sharded one, as for :func:`merge_checkpoint` and :func:`lora_ref.sharded.merge_sharded`;
    ``options`` are theirs (dtype, allow_nonfinite, progress, block_bytes).
    """
    return _write_dir(model, adapter, out_dir, residual, merge_checkpoint, merge_sharded, options)


def unmerge_model_dir(
    model: ModelDir,
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    residual: str | os.PathLike[str] | None = None,
    **options,
) -> CheckpointReport:
    """Unmerge ``adapter`` from a merged model directory into ``out_dir`` (exact with the merge's ``residual``)."""
    return _write_dir(model, adapter, out_dir, residual, unmerge_checkpoint, unmerge_sharded, options)
