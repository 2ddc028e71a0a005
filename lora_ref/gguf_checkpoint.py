"""Merge a PEFT adapter into a GGUF model and unmerge it, tensor by tensor (SPEC G.4).

Float tensors (F32, F16, BF16) keep their type: W' = round_t(W + s·B·A) with PEFT's exact s and
B's rows permuted as the GGUF stores them (:mod:`lora_ref.gguf_model`), through
:func:`lora_ref.merge.merge`, so the exact residual and bit-exact unmerge are the safetensors
ones (the residual file is the same format, keyed by GGUF tensor name).

Quantized targets (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are refused by default: their blocks cannot
hold W + Δ exactly. With ``requantize`` the tensor is dequantized, Δ added in float64, rounded to
float32 and quantized again with ``gguf.quants`` (byte-identical to ggml's reference quantizers),
and each such tensor is reported: the error e = deq(q(W + Δ)) − (W + Δ) against Δ itself
(max |e|, RMS e / RMS Δ), so a user sees how much of the adapter's effect the blocks kept.
Requantized tensors cannot be restored bit for bit: a residual is refused with them.

The output copies every metadata key and untargeted tensor byte for byte (one tensor in memory at
a time; the input is memory-mapped). The merge record is :mod:`lora_ref.provenance`'s, kept as
the GGUF string key ``lora_ref.provenance`` (pushed by merge, popped by unmerge, in its place
among the keys), with the same checks as safetensors merges (double merge, LIFO order, exact
merges unmerged without residual, residual of another merge); so an exact unmerge gives back the
original file's bytes, and each restored tensor is checked against the base digest the residual
recorded (ExactnessError otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .atomic import atomic_path
from .checkpoint import read_residual_file, save_residuals
from .dtypes import float32, float64
from .errors import ExactnessError
from .gguf_model import GgufFile, GgufUnsupportedError, ModuleSite, QuantizedTensorError, gguf_module, locate_modules
from .merge import DeltaSource, Residual, digest_arrays, merge, unmerge
from .provenance import (PROVENANCE_KEY, adapter_digest, check_merge, check_unmerge, merge_record, popped, pushed,
                         read_stack, tensors_digest)

REQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass
class GgufMergeReport:
    """Per targeted tensor: elements merged, residual sizes, requantization errors."""

    tensors_written: int = 0
    merged: dict[str, int] = field(default_factory=dict)
    residual_counts: dict[str, int] = field(default_factory=dict)
    residual_bytes: int = 0
    requantized: dict[str, dict[str, object]] = field(default_factory=dict)
    verified: bool = False  # an exact unmerge checked every restored tensor against the recorded base digest
    note: str | None = None  # e.g. the input had no lora-ref merge record


def _metadata(model: GgufFile) -> dict[str, str]:
    """The file's merge record as provenance reads it: {PROVENANCE_KEY: JSON} or {}."""
    raw = model.value(PROVENANCE_KEY)
    return {} if raw is None else {PROVENANCE_KEY: str(raw)}


def _tensor_digest(model: GgufFile, name: str) -> str:
    """digest_arrays of a tensor as stored (float view, or the raw blocks of a quantized one)."""
    tensor = model.tensors[name]
    return digest_arrays(model.array(name) if tensor.tensor_type.name in ("F32", "F16", "BF16") else tensor.data)


def _targets(adapter: Adapter, model: GgufFile, requantize: bool, exact: bool) -> dict[str, ModuleSite]:
    sites = {site.tensor: site for site in locate_modules(adapter, model).values()}
    if model.reader.endianess.name != "LITTLE":
        raise GgufUnsupportedError(f"{model.path}: big-endian GGUF files are not supported")
    quantized = {n: model.type_name(n) for n in sites if model.type_name(n) not in ("F32", "F16", "BF16")}
    if quantized and not requantize:
        name, kind = next(iter(quantized.items()))
        raise QuantizedTensorError(
            f"{model.path}: {len(quantized)} targeted tensor(s) are quantized, e.g. {name} ({kind}): W + ΔW does not fit "
            "their blocks; pass --requantize to requantize them (lossy, with an error report) or use a float base")
    unsupported = {n: k for n, k in quantized.items() if k not in REQUANTIZABLE}
    if unsupported:
        name, kind = next(iter(unsupported.items()))
        raise GgufUnsupportedError(f"{name} is {kind}: requantization supports {', '.join(REQUANTIZABLE)} only")
    if quantized and exact:
        raise GgufUnsupportedError(
            f"{next(iter(quantized))}: requantized tensors cannot be restored bit for bit; drop --residual or keep the original file")
    return sites


def _copy_metadata(model: GgufFile, writer: object, provenance: str | None) -> None:
    """Every metadata key of ``model`` in its order, the merge record replaced by ``provenance``
    (in its place, else appended; dropped when None)."""
    gguf = gguf_module()
    writer.kv_data = [{}]  # type: ignore[attr-defined]  # drop the writer's own general.architecture: keep the file's order
    for f in model.reader.fields.values():
        if f.name == PROVENANCE_KEY and provenance is not None:
            writer.add_string(PROVENANCE_KEY, provenance)  # type: ignore[attr-defined]
            provenance = None
        if f.name.startswith("GGUF.") or f.name == PROVENANCE_KEY:
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 2:
            raise GgufUnsupportedError(f"{model.path}: metadata {f.name} is a nested array, which is not copied")
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)  # type: ignore[attr-defined]
        if f.name == "general.alignment":
            writer.data_alignment = int(f.contents())  # type: ignore[attr-defined]
    if provenance is not None:
        writer.add_string(PROVENANCE_KEY, provenance)  # type: ignore[attr-defined]


def _write(model: GgufFile, out_path: str | Path, provenance: str | None,
           produce: Callable[[str], np.ndarray | None]) -> int:
    """Write ``model`` to ``out_path`` atomically with each tensor ``produce(name)`` (None: copy its bytes)."""
    gguf = gguf_module()
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, model.architecture)
        _copy_metadata(model, writer, provenance)
        for t in model.reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.n_bytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in model.reader.tensors:
            data = produce(t.name)
            if data is None:
                data = t.data  # the mapped bytes, copied as they are
            elif t.tensor_type.name == "BF16":
                data = np.ascontiguousarray(data).view(np.uint8)  # the writer takes BF16 as raw bytes
            writer.write_tensor_data(data)
        writer.close()
    return len(model.reader.tensors)


def _requantize(model: GgufFile, name: str, combine: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, dict[str, object]]:
    """Quantized blocks of ``combine(deq(W))`` (float64 in, float64 out) and the error report."""
    gguf = gguf_module()
    tensor = model.tensors[name]
    before = gguf.dequantize(tensor.data, tensor.tensor_type).astype(float64)
    target = combine(before)
    blocks = gguf.quantize(target.astype(float32), tensor.tensor_type)
    error = gguf.dequantize(blocks, tensor.tensor_type).astype(float64) - target
    effect = target - before
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    info = {"type": tensor.tensor_type.name, "max_abs_error": float(np.max(np.abs(error))), "rms_error": rms(error),
            "rms_delta": rms(effect), "error_over_effect": rms(error) / rms(effect) if rms(effect) > 0 else float("inf")}
    return blocks, info


def merge_gguf(
    base_path: str | Path,
    adapter: Adapter,
    out_path: str | Path,
    *,
    residual_path: str | Path | None = None,
    requantize: bool = False,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GgufMergeReport:
    """Write the GGUF model ``base_path`` + adapter to ``out_path`` (module doc); exact with ``residual_path``.

    ``force`` merges even if the file's record already holds this adapter (ProvenanceError otherwise).
    """
    model = GgufFile(base_path)
    metadata = _metadata(model)
    check_merge(read_stack(metadata, base_path), adapter_digest(adapter), base_path, force=force)
    exact = residual_path is not None
    sites = _targets(adapter, model, requantize, exact)
    base_digests = {name: _tensor_digest(model, name) for name in sites}
    record = merge_record(adapter, exact=exact, base_digest=tensors_digest(base_digests), dtype=None, targets=len(sites))
    residuals: dict[str, Residual] = {}

    def merge_float(name: str, delta: DeltaSource, report: GgufMergeReport) -> np.ndarray:
        result = merge(model.array(name), delta, exact=exact, allow_nonfinite=allow_nonfinite)
        if result.residual is not None:
            residuals[name] = result.residual
            report.residual_counts[name] = result.residual.count
            report.residual_bytes += result.residual.nbytes
        return result.weight

    provenance = pushed(metadata, record, base_path)[PROVENANCE_KEY]
    report = _rewrite(model, adapter, sites, out_path, provenance, +1.0, merge_float, progress)
    if residual_path is not None:
        save_residuals(residual_path, residuals, base_digests=base_digests, record=record)
    return report


def unmerge_gguf(
    merged_path: str | Path,
    adapter: Adapter,
    out_path: str | Path,
    *,
    residual_path: str | Path | None = None,
    requantize: bool = False,
    fast: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GgufMergeReport:
    """Write merged − adapter; with the merge's residual every tensor (and the file) is bit-identical to the base.

    The record checks of :func:`lora_ref.provenance.check_unmerge` run first (``fast``: accept a
    rounding unmerge of an exact merge; ``force``: skip the record checks); with a residual, every
    target needs its entry and every restored tensor must match the recorded base digest.
    """
    model = GgufFile(merged_path)
    metadata = _metadata(model)
    sites = _targets(adapter, model, requantize, residual_path is not None)
    residual_file = read_residual_file(residual_path) if residual_path is not None else None
    digest = adapter_digest(adapter)
    note = check_unmerge(read_stack(metadata, merged_path), digest, merged_path, exact=residual_file is not None,
                         fast=fast, force=force, residual_merge_id=residual_file.merge_id if residual_file else None)
    if residual_file is not None:
        residual_file.check_covers(sites, residual_path)
    residuals = residual_file.residuals if residual_file else {}
    base_digests = residual_file.base_digests if residual_file else None

    def unmerge_float(name: str, delta: DeltaSource, report: GgufMergeReport) -> np.ndarray:
        restored = unmerge(model.array(name), delta, residual=residuals.get(name))
        if base_digests is not None and digest_arrays(restored) != base_digests[name]:
            raise ExactnessError(f"{name}: the exact unmerge does not reproduce the base digest recorded at merge in "
                                 f"{residual_path}; nothing was written")
        return restored

    provenance = popped(metadata, digest, merged_path).get(PROVENANCE_KEY)
    report = _rewrite(model, adapter, sites, out_path, provenance, -1.0, unmerge_float, progress)
    report.verified, report.note = base_digests is not None, note
    return report


def _rewrite(model: GgufFile, adapter: Adapter, sites: dict[str, ModuleSite], out_path: str | Path,
             provenance: str | None, sign: float,
             float_op: Callable[[str, DeltaSource, GgufMergeReport], np.ndarray],
             progress: Callable[[str], None] | None) -> GgufMergeReport:
    """Write ``model`` with each target replaced: float ones by ``float_op``, quantized ones requantized
    from deq(W) + sign·Δ; ``provenance`` (or none) as the merge record key."""
    report = GgufMergeReport()

    def produce(name: str) -> np.ndarray | None:
        site = sites.get(name)
        if site is None:
            return None
        if progress:
            progress(name)
        delta = site.peft_delta(adapter)
        report.merged[name] = int(np.prod(delta.shape))
        if model.type_name(name) in REQUANTIZABLE:
            blocks, report.requantized[name] = _requantize(model, name, lambda W: W + sign * delta.block(slice(None)))
            return blocks
        return float_op(name, delta, report)

    report.tensors_written = _write(model, out_path, provenance, produce)
    return report
