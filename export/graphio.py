"""Load, check and write ONNX models at an IR version and opset the installed onnxruntime reads.

onnx 1.23 stamps IR version 14 on new models; onnxruntime 1.31 reads IR <= 13 and default-domain
opset <= 26. Rather than hard-coding those numbers, :func:`runtime_limits` asks the installed
onnxruntime once (it loads a one-node model at descending IR versions / opsets), and
:func:`make_loadable` lowers a model's ``ir_version`` to the smallest one its opsets need
(``onnx.helper.find_min_ir_version_for``), refusing with :class:`IRVersionError` when even that is
newer than the runtime reads. Every written model is validated first (:func:`check_graph`).

Validation: ``onnx.checker`` knows only the ONNX domains, so it rejects the graphs of
onnxruntime-genai's builder and of Olive (``SimplifiedLayerNormalization`` registered by ONNX
Runtime in the default domain, ``com.microsoft`` ops such as ``GroupQueryAttention`` and
``MatMulNBits``). A graph the checker rejects is therefore also offered to ONNX Runtime itself: a
CPU session with graph optimisations off, which runs ORT's type and shape inference over every
node (contrib ops included). The graph is accepted when ORT loads it; when neither accepts it the
error quotes both.

Models whose tensors exceed protobuf's 2 GiB message limit are written with external data
(``<name>.data`` beside the model); both files are renamed into place only after a complete write.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from lora_ref.atomic import check_output, commit, scratch_folder, transaction, write_bytes_atomic, write_failed
from lora_ref.errors import FileFormatError
from lora_ref.inputs import require_regular_file

from .errors import IRVersionError

#: protobuf cannot serialise messages of 2 GiB or more; models whose tensors come within 64 MiB of
#: that (room for the nodes and names) use external data.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_BYTES = PROTOBUF_LIMIT - 2**26
#: Tensors at least this large go to the external data file when external data is used.
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class RuntimeLimits:
    """The newest IR version and default-domain opset the installed onnxruntime loads."""

    ir_version: int
    opset: int


def _probe_model(ir_version: int, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _loads(model: onnx.ModelProto) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime raises its own untyped Fail/InvalidGraph
        return False
    return True


@functools.cache
def runtime_limits() -> RuntimeLimits:
    """Probe the installed onnxruntime for its newest readable IR version and opset (cached)."""
    opset = next((v for v in range(onnx.defs.onnx_opset_version(), 6, -1) if _loads(_probe_model(7, v))), None)
    if opset is None:
        raise IRVersionError("the installed onnxruntime loads no model at all (probe failed)")
    ir = next(v for v in range(onnx.IR_VERSION, 2, -1) if _loads(_probe_model(v, opset)))
    return RuntimeLimits(ir_version=ir, opset=opset)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ("" or "ai.onnx") opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise IRVersionError("the model imports no default-domain opset")


def loadable_ir_version(model: onnx.ModelProto, *, where: str = "model") -> int:
    """The IR version to write ``model`` with: what its opsets need, within what onnxruntime reads.

    Raises IRVersionError when the model's default opset, or the IR version its opsets need, is
    newer than the installed onnxruntime supports. ``model`` is not changed.
    """
    limits = runtime_limits()
    opset = default_opset(model)
    if opset > limits.opset:
        raise IRVersionError(
            f"{where}: uses opset {opset}, but the installed onnxruntime reads opset <= {limits.opset}; "
            "convert it with onnx.version_converter first"
        )
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if needed > limits.ir_version:
        raise IRVersionError(
            f"{where}: its opsets need IR version {needed}, but the installed onnxruntime reads IR <= {limits.ir_version}"
        )
    return max(needed, min(model.ir_version, limits.ir_version), 4)  # IR 4: initializers as overridable inputs


def legacy_initializer_inputs(model: onnx.ModelProto) -> set[str]:
    """Initializers an IR < 4 model lists as graph inputs because IR 3 required it (not to be overridden).

    Written at IR >= 4 they would be overridable inputs, which ONNX Runtime warns about once each
    ("Initializer ... appears in graph inputs") and cannot constant-fold: :func:`drop_graph_inputs`
    takes them out. An IR >= 4 model that lists an initializer as an input means it (kept).
    """
    if model.ir_version >= 4:
        return set()
    return {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}


def drop_graph_inputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the graph inputs named in ``names`` in place (their initializers stay)."""
    if names:
        kept = [i for i in model.graph.input if i.name not in names]
        del model.graph.input[:]
        model.graph.input.extend(kept)


def make_loadable(model: onnx.ModelProto, *, where: str = "model") -> onnx.ModelProto:
    """Set ``model.ir_version`` in place to :func:`loadable_ir_version` and return ``model``."""
    model.ir_version = loadable_ir_version(model, where=where)
    return model


def check_readable(model: onnx.ModelProto, *, where: str = "model") -> None:
    """Raise IRVersionError when onnxruntime cannot read ``model`` as it stands (no change made)."""
    limits = runtime_limits()
    if model.ir_version > limits.ir_version:
        raise IRVersionError(
            f"{where}: IR version {model.ir_version} is newer than the installed onnxruntime reads (<= {limits.ir_version}); "
            "re-export it through lora_ref.export, which writes a readable IR version"
        )
    opset = default_opset(model)
    if opset > limits.opset:
        raise IRVersionError(f"{where}: opset {opset} is newer than the installed onnxruntime reads (<= {limits.opset})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def ort_rejection(model: onnx.ModelProto | str | os.PathLike[str]) -> str | None:
    """None when ONNX Runtime (CPU, no graph optimisation) loads ``model``, else its first error line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped Fail/InvalidGraph
        return _first_line(exc)
    return None


def check_graph(model: onnx.ModelProto | str | os.PathLike[str], *, where: str) -> str:
    """Validate a model (or a path, which handles > 2 GiB); return ``"onnx.checker"`` or ``"onnxruntime"``.

    onnx.checker first; a graph it rejects is accepted when ONNX Runtime loads it (ONNX Runtime's
    own ops, module docstring). A rejection by both is a FileFormatError quoting both.
    """
    try:
        onnx.checker.check_model(str(model) if isinstance(model, (str, os.PathLike)) else model, full_check=False)
        return "onnx.checker"
    except (onnx.checker.ValidationError, ValueError) as exc:
        checker = _first_line(exc)
    runtime = ort_rejection(model)
    if runtime is None:
        return "onnxruntime"
    raise FileFormatError(f"{where}: not a valid ONNX graph (neither onnx.checker nor ONNX Runtime accepts it; onnx.checker: {checker}; onnxruntime: {runtime})")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX file (external data included); a malformed graph is a FileFormatError."""
    path = Path(path)
    for data in external_data_files(path):  # a FIFO there would hang onnx's reader
        if os.path.lexists(data):
            require_regular_file(data, "external-data file of an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise FileFormatError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    check_graph(path, where=str(path))
    return model


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers, Constant values, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in [attribute.g] if attribute.HasField("g") else []:
                yield from _tensors(sub)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files an ONNX file references (its tensors' ``location``s, beside it).

    Read without loading the data, for the path guard (:mod:`lora_ref.cli.paths`): the command
    then knows every file it reads. A file that cannot be parsed lists none (loading it fails later).
    """
    path = Path(path)
    require_regular_file(path, "ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports it with its reason
        return []
    locations = {item.value for tensor in _tensors(model.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for item in tensor.external_data if item.key == "location"}
    return [path.parent / location for location in sorted(locations)]


def external_data_name(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_model` puts the external data of a graph written to ``path``."""
    path = Path(path)
    return path.parent / f"{path.name}.data"


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the graph's initializers (computed without serialising the model)."""
    total = 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        total += count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Validate ``model`` (:func:`check_graph`) and write it atomically; return the path written.

    ``external_data=None`` chooses external data only when the tensors approach protobuf's 2 GiB
    limit; True forces it (tensors >= EXTERNAL_MIN_BYTES go to ``<file name>.data``; a graph with
    no tensor that large is written whole, without a data file). With
    external data ``model`` is changed in place (its tensors then refer to the data file), so a
    model of many GiB is not held twice. Sets ``model.ir_version`` (:func:`make_loadable`).
    """
    path = Path(path)
    make_loadable(model, where=str(path))
    use_external = tensor_bytes(model) >= EXTERNAL_DATA_BYTES if external_data is None else external_data
    if not use_external:
        check_graph(model, where=f"{path} (exported graph)")
        write_bytes_atomic(path, model.SerializeToString())
        return path
    data_name = external_data_name(path).name
    check_output(path)
    with transaction(), scratch_folder(path, "external") as staging:  # both files, or neither
        staged = staging / path.name
        try:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_MIN_BYTES)
        except OSError as exc:  # onnx writes these files itself
            raise write_failed(path, exc) from None
        check_graph(staged, where=f"{path} (exported graph)")  # the path form handles > 2 GiB models
        if (staging / data_name).exists():  # onnx writes it only when some tensor reaches EXTERNAL_MIN_BYTES
            commit(staging / data_name, path.parent / data_name)
        commit(staged, path)
    return path


