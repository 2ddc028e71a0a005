"""Convert a float32 graph to float16 storage and compute (the ``--dtype float16`` export).

Every float32 tensor type becomes float16: initializers (rounded once from their float32
values, round-to-nearest-even via :func:`lora_ref.dtypes.round_to`), graph inputs, outputs and
value_info, ``Constant``/``ConstantOfShape`` values, and ``Cast``/``dtype`` attributes that
produce float32; subgraphs (If/Loop/Scan) are converted too. Initializers already in float16
(the merged weights, rounded once from float64) are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from lora_ref.dtypes import round_to

_FLOAT, _HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_DTYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                     "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


def _half_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if tensor.data_type != _FLOAT:
        return tensor
    return numpy_helper.from_array(round_to(numpy_helper.to_array(tensor).astype(np.float64), np.float16), tensor.name)


def _value_infos(graph: onnx.GraphProto):
    yield from graph.input
    yield from graph.output
    yield from graph.value_info


def convert_graph(graph: onnx.GraphProto) -> None:
    """Convert ``graph`` (and its subgraphs) to float16 in place."""
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == _FLOAT:
            graph.initializer[i].CopyFrom(_half_tensor(tensor))
    for info in _value_infos(graph):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type == _FLOAT:
            info.type.tensor_type.elem_type = _HALF
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                attribute.t.CopyFrom(_half_tensor(attribute.t))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                convert_graph(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    convert_graph(sub)
            elif attribute.name == _DTYPE_ATTRIBUTES.get(node.op_type) and attribute.i == _FLOAT:
                attribute.i = _HALF
            elif node.op_type == "Constant" and attribute.name == "value_float":
                attribute.CopyFrom(onnx.helper.make_attribute(
                    "value", numpy_helper.from_array(round_to(np.array(attribute.f), np.float16))))
            elif node.op_type == "Constant" and attribute.name == "value_floats":
                attribute.CopyFrom(onnx.helper.make_attribute(
                    "value", numpy_helper.from_array(round_to(np.array(list(attribute.floats)), np.float16))))


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert ``model`` to float16 in place and return it."""
    convert_graph(model.graph)
    return model
