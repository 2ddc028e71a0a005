"""Sharded safetensors checkpoints (``model.safetensors.index.json``): validate, merge, unmerge.

Index layout (Hugging Face): ``{"metadata": {"total_size": <bytes>}, "weight_map": {<tensor>:
<shard file name>}}``; the shards sit beside the index. A hostile index is refused before any
shard is opened for writing: shard names must be plain file names in the index's folder (no
``..``, no separators, no absolute paths), every shard must exist, and every tensor must live
in the shard the index names, with no shard holding tensors the index does not list.

Merging streams shard by shard through :func:`lora_ref.checkpoint.merge_checkpoint`, so peak
memory stays at a few row blocks whatever the model size (DESIGN section 8). All or nothing:
the shards and the index are written into a hidden temporary folder beside the output folder
(:func:`lora_ref.atomic.staged_folder`) that becomes the output folder only when every shard is
done (a new folder is one rename; an existing one, which must not hold any of those names,
receives the files then). A refused or interrupted run leaves no shard, no index and no folder
it created. Exact mode writes one residual per shard, under the shard's name, into a residual
folder, staged the same way and committed together with the output.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter
from .atomic import copy_file_atomic, staged_folder, transaction, write_text_atomic
from .checkpoint import CheckpointReport, base_key, checkpoint_targets, merge_checkpoint, unmerge_checkpoint
from .errors import FileFormatError, LoraRefError, TargetNotFoundError
from .jsonfile import read_json
from .merge import BLOCK_BYTES
from .provenance import adapter_digest
from .safetensors_io import SafetensorsFile

INDEX_SUFFIX = ".safetensors.index.json"
#: An index larger than this is refused before it is read (a 70B model's index is ~100 KB).
MAX_INDEX_BYTES = 64 * 1024 * 1024


class ShardedOutputError(LoraRefError, ValueError):
    """The output directory already holds files a sharded merge would write, or is the input's."""


@dataclass(frozen=True)
class ShardedIndex:
    """A validated index: its path, metadata and tensor -> shard file name map."""

    path: Path
    metadata: dict
    weight_map: dict[str, str]

    @property
    def shards(self) -> list[str]:
        """Shard file names in order of first appearance in the weight map."""
        return list(dict.fromkeys(self.weight_map.values()))

    def shard_path(self, shard: str) -> Path:
        return self.path.parent / shard

    def tensors_in(self, shard: str) -> set[str]:
        return {name for name, where in self.weight_map.items() if where == shard}


def _fail(path: Path, message: str) -> FileFormatError:
    return FileFormatError(f"{path}: not a valid sharded-checkpoint index: {message}")


def read_index(path: str | os.PathLike[str]) -> ShardedIndex:
    """Read and validate an index and the headers of all its shards (module doc)."""
    path = Path(path)
    data = read_json(path, what="sharded checkpoint index", max_bytes=MAX_INDEX_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict) or not data["weight_map"]:
        raise _fail(path, "needs a non-empty 'weight_map' object")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(path, "'metadata' must be an object")
    weight_map: dict[str, str] = data["weight_map"]
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard \
                or not shard.endswith(".safetensors"):
            raise _fail(path, f"tensor {tensor[:80]!r} names shard {str(shard)[:80]!r}: shards must be "
                              ".safetensors file names in the index's own folder")
    index = ShardedIndex(path, metadata, weight_map)
    for shard in index.shards:
        with SafetensorsFile(index.shard_path(shard)) as handle:
            listed, held = index.tensors_in(shard), set(handle.tensors)
            if listed - held:
                raise _fail(path, f"shard {shard} lacks {sorted(listed - held)[:3]} that the index puts there")
            if held - listed:
                raise _fail(path, f"shard {shard} holds {sorted(held - listed)[:3]} that the index does not list there")
    return index


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def check_folder_output(input_dir: Path, out_dir: Path, names: Sequence[str], residual_dir: Path | None = None) -> None:
    """Refuse an output folder that is the input's, a residual folder that is either, or names ``out_dir`` holds."""
    if _same_folder(out_dir, input_dir):
        raise ShardedOutputError(f"{out_dir}: is the input checkpoint's folder; write the output elsewhere")
    if residual_dir is not None and (_same_folder(residual_dir, out_dir) or _same_folder(residual_dir, input_dir)):
        raise ShardedOutputError(f"{residual_dir}: the residual folder must differ from the input and output folders "
                                 "(residuals are named like the shards)")
    taken = [name for name in names if os.path.lexists(out_dir / name)]
    if taken:
        raise ShardedOutputError(f"{out_dir}: already holds {', '.join(taken[:3])}; choose an empty or new folder")


def _restricted(adapter: Adapter, keys: set[str]) -> Adapter:
    """The adapter's modules whose base weight is among ``keys`` and the carried tensors that change
    one of ``keys`` (one shard's share); it keeps the whole adapter's digest (its merge records)."""
    modules = {name: module for name, module in adapter.modules.items() if base_key(name) in keys}
    extra = {c.key: c.values for target, c in adapter.carried_tensors().items() if target in keys}
    return Adapter(config=adapter.config, modules=modules, name=adapter.name, extra_tensors=extra,
                   content_digest=adapter_digest(adapter))


def _per_shard(
    index_path: str | os.PathLike[str],
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    residual_dir: str | os.PathLike[str] | None,
    step: Callable[[Path, Adapter, Path, Path | None], CheckpointReport],
    *,
    write_residuals: bool,
    extra_files: Sequence[Path] = (),
) -> CheckpointReport:
    index = read_index(index_path)
    missing = sorted(key for key in checkpoint_targets(adapter) if key not in index.weight_map)
    if missing:
        raise TargetNotFoundError(f"{index.path}: the adapter targets {len(missing)} weight(s) no shard holds: "
                                  f"{', '.join(missing[:5])}")
    check_folder_output(index.path.parent, Path(out_dir), [*index.shards, index.path.name, *(f.name for f in extra_files)],
                        None if residual_dir is None else Path(residual_dir))
    total = CheckpointReport()
    with contextlib.ExitStack() as stack:
        stack.enter_context(transaction())  # both folders, or neither
        staged_out = stack.enter_context(staged_folder(out_dir))
        staged_residual = None
        if residual_dir is not None:
            staged_residual = stack.enter_context(staged_folder(residual_dir)) if write_residuals else Path(residual_dir)
        for shard in index.shards:
            residual = staged_residual / shard if staged_residual is not None else None
            report = step(index.shard_path(shard), _restricted(adapter, index.tensors_in(shard)), staged_out / shard,
                          residual)
            total.tensors_written += report.tensors_written
            total.merged.update(report.merged)
            total.residual_counts.update(report.residual_counts)
            total.residual_bytes += report.residual_bytes
            total.verified = report.verified if shard == index.shards[0] else total.verified and report.verified
        size = 0
        for shard in index.shards:
            with SafetensorsFile(staged_out / shard) as handle:
                size += sum(info.nbytes for info in handle.tensors.values())
        metadata = {**index.metadata, "total_size": size}
        write_text_atomic(staged_out / index.path.name,
                          json.dumps({"metadata": metadata, "weight_map": index.weight_map}, indent=2, sort_keys=True)
                          + "\n")
        for source in extra_files:  # a model directory's config, tokenizer, ... (lora_ref.hf_model)
            copy_file_atomic(source, staged_out / source.name)
    return total


def merge_sharded(
    index_path: str | os.PathLike[str],
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    residual_dir: str | os.PathLike[str] | None = None,
    dtype: object = None,
    allow_nonfinite: bool = False,
    progress: Callable[[str], None] | None = None,
    block_bytes: int = BLOCK_BYTES,
    extra_files: Sequence[Path] = (),
) -> CheckpointReport:
    """Merge ``adapter`` into every shard; write shards + index to ``out_dir`` (residuals per shard).

    ``extra_files`` are copied verbatim into ``out_dir`` with the shards (all or nothing).
    """
    def step(shard: Path, part: Adapter, out: Path, residual: Path | None) -> CheckpointReport:
        return merge_checkpoint(shard, part, out, residual_path=residual, dtype=dtype, allow_nonfinite=allow_nonfinite,
                                progress=progress, block_bytes=block_bytes)

    return _per_shard(index_path, adapter, out_dir, residual_dir, step, write_residuals=True, extra_files=extra_files)


def unmerge_sharded(
    index_path: str | os.PathLike[str],
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    residual_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    block_bytes: int = BLOCK_BYTES,
    extra_files: Sequence[Path] = (),
) -> CheckpointReport:
    """Unmerge ``adapter`` from every shard (exactly, with the residual directory of the merge); ``extra_files`` as merge's."""
    def step(shard: Path, part: Adapter, out: Path, residual: Path | None) -> CheckpointReport:
        return unmerge_checkpoint(shard, part, out, residual_path=residual, progress=progress, block_bytes=block_bytes)

    return _per_shard(index_path, adapter, out_dir, residual_dir, step, write_residuals=False, extra_files=extra_files)
