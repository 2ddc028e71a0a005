"""Typed errors of the ONNX exporter, each a subclass of the core's LoraRefError hierarchy."""

from __future__ import annotations

from lora_ref.errors import ConfigError, FileFormatError, ShapeError, TargetNotFoundError


class GraphTargetNotFoundError(TargetNotFoundError):
    """One or more adapted modules have no weight in the ONNX graph; the message lists what was tried."""


class UnsupportedGraphError(FileFormatError):
    """The graph uses a construct the exporter cannot rewrite (Gemm with transA, alpha != 1, ...)."""


class IRVersionError(FileFormatError):
    """The model needs an IR version or opset newer than the installed onnxruntime reads."""


class AdapterNameError(FileFormatError):
    """An ``.onnx_adapter`` (or a set of adapter tensors) does not fit the graph's LoRA inputs."""


class AdapterIndexError(ShapeError):
    """A batched graph's ``adapter_index`` holds a value outside [-1, N)."""


class TokenIdError(ShapeError):
    """Token ids fed to a batched graph's Embedding LoRA lie outside [0, num_embeddings).

    In the bank viewed as one table [N·V, r], such an id would read another adapter's rows.
    """


class UncheckedIdsWarning(UserWarning):
    """A batched graph's Embedding LoRA reads ids computed inside the graph, which cannot be checked before a run."""


class ExportConfigError(ConfigError):
    """An export option or adapter feature the chosen graph kind cannot express."""


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider is not the one that runs the session."""


class RuntimeBuildWarning(UserWarning):
    """The installed ONNX Runtime build(s) and the providers ONNX Runtime reports do not fit together."""
