"""lora_ref.export: ONNX graphs with LoRA adapters (merged, dynamic, batched) for ONNX Runtime.

Imports onnx and onnxruntime; the NumPy core (``lora_ref``) never imports this package.

    from lora_ref import load_adapter
    from lora_ref.export import export, open_session, AdapterCache

    report = export("model.onnx", [load_adapter("my_adapter")], "dynamic", "model.lora.onnx",
                    adapter_out="adapters/")
    session = open_session("model.lora.onnx", providers=["cuda", "cpu"])
    print(session.describe())                       # which provider runs the nodes
    adapter = session.load_adapter("adapters/my_adapter.onnx_adapter")
    logits = session.run({"input_ids": ids}, adapter)
"""

from .adapter_files import LoadedAdapter, adapter_tensors, load_onnx_adapter, read_onnx_adapter, write_onnx_adapter
from .batched import INDEX_INPUT, build_batched
from .convert import convert_adapters
from .dynamic import build_dynamic
from .errors import (
    AdapterIndexError,
    AdapterNameError,
    ExportConfigError,
    GraphTargetNotFoundError,
    IRVersionError,
    ProviderFallbackWarning,
    RuntimeBuildWarning,
    TokenIdError,
    UncheckedIdsWarning,
    UnsupportedGraphError,
)
from .exporter import MODES, ExportReport, build_graph, export
from .fp16 import to_float16
from .genai import export_genai
from .graphio import load_model, make_loadable, runtime_limits, save_model
from .locate import TargetSite, locate_targets
from .merged import build_merged
from .runtime import AdapterCache, LoraSession, check_build, open_session
from .slots import slots_from_model, slots_from_session

__all__ = [
    "MODES", "INDEX_INPUT", "AdapterCache", "AdapterIndexError", "AdapterNameError", "ExportConfigError", "ExportReport",
    "GraphTargetNotFoundError", "IRVersionError", "LoadedAdapter", "LoraSession", "ProviderFallbackWarning", "TargetSite",
    "TokenIdError", "UncheckedIdsWarning", "UnsupportedGraphError", "adapter_tensors", "build_batched", "build_dynamic", "build_graph", "build_merged", "export",
    "load_model", "load_onnx_adapter", "locate_targets", "make_loadable", "open_session", "read_onnx_adapter",
    "runtime_limits", "save_model", "slots_from_model", "slots_from_session", "to_float16", "write_onnx_adapter",
    "RuntimeBuildWarning", "check_build", "convert_adapters", "export_genai",
]
