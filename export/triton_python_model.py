"""A Triton python-backend ``model.py`` that runs a lora-ref batched graph in ONNX Runtime.

A stand-in for Triton's ONNX Runtime backend where that backend is not installed (the
``tritonserver`` binary in the ``nvidia-pytriton`` wheel ships the python backend only): it
loads the same repository layout (``<version>/model.onnx`` beside this file, the same
config.pbtxt with ``backend: "python"`` instead of ``platform``, see
:func:`lora_ref.export.triton.python_stand_in`) and answers the same requests. Each ``execute``
gets the requests Triton's dynamic batcher joined; their rows are concatenated into one
ONNX Runtime run (what the ORT backend does) and split back. A request whose
``adapter_index`` lies outside [-1, N) gets its own error response naming the index and N; the
other requests of the batch still run. The custom metric ``lora_ref_distinct_adapters`` adds,
per run, the number of distinct adapters in it (``lora_ref_batches`` counts the runs), so the
metrics endpoint shows multi-adapter batches.

The python backend's stub ignores PYTHONPATH: the config parameter ``lora_ref.sys_path`` (a
JSON list) names the folders to put on ``sys.path`` before numpy/onnxruntime are imported.
Tensors cross through DLPack: with numpy 2, the pytriton 0.7.0 stub's ``as_numpy()`` returns
wrong values and ``pb_utils.Tensor(name, array)`` sends an empty buffer (both seen here);
``np.from_dlpack`` / ``Tensor.from_dlpack`` carry the data.
"""

import json
import sys
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for folder in json.loads(parameters.get("lora_ref.sys_path", "[]")):
            if folder not in sys.path:
                sys.path.append(folder)
        import numpy as np
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.np, self.pb = np, pb_utils
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", "0"))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        maps = json.loads(parameters.get("lora_ref.adapters", "{}"))
        self.adapters = len(maps.get(args["model_version"], {}))
        batches = pb_utils.MetricFamily(name="lora_ref_batches", description="ONNX Runtime runs", kind=pb_utils.MetricFamily.COUNTER)
        distinct = pb_utils.MetricFamily(name="lora_ref_distinct_adapters", description="distinct adapters, summed over runs",
                                         kind=pb_utils.MetricFamily.COUNTER)
        widest = pb_utils.MetricFamily(name="lora_ref_max_distinct_adapters", description="most distinct adapters in one run",
                                       kind=pb_utils.MetricFamily.GAUGE)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.families = (batches, distinct, widest)  # a family must outlive its metrics
        self.batches, self.distinct, self.widest = batches.Metric(labels=labels), distinct.Metric(labels=labels), widest.Metric(labels=labels)

    def execute(self, requests):
        np, pb = self.np, self.pb
        responses = [None] * len(requests)
        good, feeds = [], {name: [] for name in self.inputs}
        for k, request in enumerate(requests):
            arrays = {name: np.from_dlpack(pb.get_input_tensor_by_name(request, name)).copy() for name in self.inputs}
            rows = len(next(iter(arrays.values())))
            if "adapter_index" in arrays:  # a batched graph (a merged one, for comparisons, has none)
                index = arrays["adapter_index"].reshape(-1).astype(np.int64)
                bad = index[(index < -1) | (index >= self.adapters)]
                if bad.size:
                    message = f"adapter_index {int(bad[0])} is outside [-1, {self.adapters}): {self.adapters} adapters, -1 = base model"
                    responses[k] = pb.InferenceResponse(error=pb.TritonError(message))
                    continue
                arrays["adapter_index"] = index
            good.append((k, rows))
            for name in self.inputs:
                feeds[name].append(arrays[name])
        if good:
            joined = {name: np.concatenate(parts, axis=0) for name, parts in feeds.items()}
            results = self.session.run(self.outputs, joined)
            adapters = len(np.unique(joined["adapter_index"])) if "adapter_index" in joined else 0
            self.batches.increment(1)
            self.distinct.increment(adapters)
            self.widest.set(max(self.widest.value(), adapters))
            start = 0
            for k, rows in good:
                tensors = [pb.Tensor.from_dlpack(name, np.ascontiguousarray(result[start:start + rows])) for name, result in zip(self.outputs, results)]
                responses[k] = pb.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses
