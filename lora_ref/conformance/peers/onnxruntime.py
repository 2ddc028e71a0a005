"""Our ONNX graphs on ONNX Runtime as a conformance implementation:
``--impl lora_ref.conformance.peers.onnxruntime:factory``.

Per case, a one-layer ONNX model (``Gemm(x, layer.weight, layer.bias, transB=1)``) is built,
exported by :mod:`lora_ref.export` with the case's adapter, and run by ONNX Runtime on the CPU
execution provider:

* ``linear.forward``: the *dynamic* graph (A and s·B fed as graph inputs);
* ``mixed_batch.forward``: the *batched* graph (adapter banks, per-row ``adapter_index``).

float32 cases run a float32 graph, float16 cases a float16 graph (the exporter's ``--dtype
float16``). Skipped (NotImplementedError): bfloat16 (the exporter writes float32/float16
graphs), dropout masks (inference graphs), ``lora_bias`` (not exported), and every other
operation (merge happens in the exporter, i.e. in lora_ref itself, not in ONNX Runtime).
Imports onnx / onnxruntime lazily. Takes the ``canonical`` or ``peft`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import Refusal

Arrays = dict[str, np.ndarray]


class OnnxRuntimeImplementation:
    """The protocol object; ``versions`` names what ran."""

    def __init__(self) -> None:
        import onnx
        import onnxruntime

        from ...export import exporter, runtime

        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

        self.onnx, self.exporter, self.runtime = onnx, exporter, runtime
        self.versions = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
        #: ONNX Runtime's typed errors for inputs that do not fit the graph (input validation, a kernel's shape check)
        self.shape_errors = (InvalidArgument, Fail)

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        """The case through an exported graph; ONNX Runtime's shape errors are reported as refusals."""
        try:
            return self._run(op, params, inputs)
        except self.shape_errors as exc:
            raise Refusal(f"ONNX Runtime refused the inputs: {exc}") from exc

    def _run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        if op not in ("linear.forward", "mixed_batch.forward"):
            raise NotImplementedError(f"ONNX Runtime runs exported forward graphs only, not {op!r}")
        dtype = np.asarray(inputs["x"]).dtype
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise NotImplementedError(f"the exporter writes float32 and float16 graphs, not {dtype}")
        if "dropout_mask" in inputs or "lora_bias" in inputs:
            raise NotImplementedError("exported graphs are inference graphs without dropout or lora_bias")
        W = np.asarray(inputs["W"])
        if params.get("fan_in_fan_out", False):
            W = W.T  # the ONNX graph holds the weight its own way; the adapter math is unchanged
        x = np.asarray(inputs["x"])
        model = self._model(W, inputs.get("b"), W.shape[1])
        if op == "linear.forward":
            adapters = [self._adapter("default", params, inputs["A"], inputs["B"])]
            graph, _ = self.exporter.build_graph(model, adapters, "dynamic", dtype=str(dtype))
            session = self.runtime.LoraSession(graph, ("cpu",))
            from ...export.adapter_files import adapter_tensors

            feeds = {"x": x.reshape(-1, x.shape[-1]), **adapter_tensors(adapters[0], session.slots)}
            y = session.run(feeds)[0]
            return {"y": y.reshape(x.shape[:-1] + (W.shape[0],)).astype(dtype)}
        adapters = [self._adapter(f"a{i}", adapter, inputs[f"A.{i}"], inputs[f"B.{i}"]) for i, adapter in enumerate(params["adapters"])]
        graph, _ = self.exporter.build_graph(model, adapters, "batched", dtype=str(dtype))
        session = self.runtime.LoraSession(graph, ("cpu",))
        # the batched graph takes x [rows, in] and one index per row: a [batch, seq, in] batch is flattened, its index repeated
        per_row = int(np.prod(x.shape[1:-1], dtype=np.int64))
        index = np.repeat(np.asarray(inputs["index"]), per_row) if x.ndim > 2 else inputs["index"]
        y = session.run_batched({"x": x.reshape(-1, x.shape[-1])}, index)[0]
        return {"y": y.reshape(x.shape[:-1] + (W.shape[0],)).astype(dtype)}

    def _model(self, W: np.ndarray, b: np.ndarray | None, in_features: int):
        from onnx import TensorProto, helper, numpy_helper

        out_features = W.shape[0]
        weights = [numpy_helper.from_array(W.astype(np.float32), "layer.weight")]
        names = ["x", "layer.weight"]
        if b is not None:
            weights.append(numpy_helper.from_array(np.asarray(b).astype(np.float32), "layer.bias"))
            names.append("layer.bias")
        node = helper.make_node("Gemm", names, ["y"], name="layer", transB=1)
        graph = helper.make_graph([node], "conformance_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lora-ref-conformance")
        model.ir_version = 9
        return model

    @staticmethod
    def _adapter(name: str, params: Mapping[str, Any], A: np.ndarray, B: np.ndarray):
        from ...adapter import Adapter, LoraModule
        from ...config import LoraConfig

        config = LoraConfig(r=int(params["r"]), lora_alpha=params["lora_alpha"], use_rslora=bool(params.get("use_rslora", False)),
                            target_modules=["layer"])
        return Adapter(config, {"layer": LoraModule("layer", np.asarray(A), np.asarray(B))}, name=name)


def factory() -> OnnxRuntimeImplementation:
    return OnnxRuntimeImplementation()


#: Deviation id -> (what the exported graphs do, the source line). SPEC C.6 explains O-1.
DEVIATIONS: dict[str, tuple[str, str]] = {
    "O-1": ("the dynamic and batched graphs store s·Bᵀ in the graph dtype: in float16 it rounds unless s is a power of two "
            "(precision)", "export/dynamic.py:16 (\"the scale s is folded into B\"; batched: export/batched.py:3)"),
    "S-O1": ("not an exported operation, a bfloat16 graph, or an inference graph with dropout / lora_bias (skipped)",
             "lora_ref/conformance/peers/onnxruntime.py: OnnxRuntimeImplementation._run"),
}


def deviation(case: Any, inputs: Arrays, result: Any) -> str | None:
    """The documented deviation behind a result that is not a float32-tier pass (see :data:`DEVIATIONS`)."""
    if result.status == "skip":
        return "S-O1"
    if result.verdict == "storage" and case.dtype == "float16":
        return "O-1"
    return None
