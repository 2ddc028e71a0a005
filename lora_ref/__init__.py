"""lora-ref: the reference implementation of LoRA in NumPy (never imports onnx or torch).

The public API, one entry per job (each name is importable from ``lora_ref``; the semantics and
bounds are in conformance/SPEC.md). The examples run as doctests (``tests/test_docs.py``)::

    >>> import numpy as np, lora_ref
    >>> from lora_ref.demo import build_demo_model
    >>> weights, adapter = build_demo_model(np.dtype("float32"))
    >>> W, module = weights["attn.q_proj.weight"], adapter.modules["attn.q_proj"]

Adapters in PEFT's files, without torch (``adapter``, ``config``)::

    >>> lora_ref.save_adapter(adapter, "my_adapter"); lora_ref.load_adapter("my_adapter").name
    'my_adapter'

One layer: forward, backward, delta (``linear``; ``embedding``, ``conv``, ``dora`` likewise); what
differs between layer kinds is one registry entry per kind (``kinds``)::

    >>> lora_ref.lora_scale(8, 16), lora_ref.lora_scale(16, 16, use_rslora=True)   # alpha/r, alpha/sqrt(r)
    (2.0, 4.0)
    >>> x, s = np.ones((2, W.shape[1]), np.float32), adapter.scale_for("attn.q_proj")
    >>> y = lora_ref.lora_forward(x, W, module.A, module.B, s); y.shape
    (2, 256)
    >>> lora_ref.lora_backward(x, np.ones_like(y), W, module.A, module.B, s).dA.shape
    (8, 256)
    >>> lora_ref.kind_of(module.kind).lora_shapes(W.shape, r=8)   # (A's shape, B's shape)
    ((8, 256), (256, 8))

Merge and unmerge one weight, fast or exact (``merge``), or every targeted weight (``MergeLedger``)::

    >>> delta = lora_ref.delta_for(adapter, "attn.q_proj")
    >>> merged = lora_ref.merge(W, delta, exact=True)
    >>> lora_ref.unmerge(merged.weight, delta, residual=merged.residual).tobytes() == W.tobytes()
    True
    >>> ledger = lora_ref.MergeLedger({k: v.copy() for k, v in weights.items()}, exact=True)
    >>> ledger.merge(adapter, "a"); ledger.unmerge(adapter, "a")

Checkpoint files, streamed tensor by tensor (``checkpoint``, ``safetensors_io`` with bfloat16)::

    >>> lora_ref.save_file("base.safetensors", weights)
    >>> report = lora_ref.merge_checkpoint("base.safetensors", adapter, "merged.safetensors",
    ...                                    residual_path="residual.safetensors")
    >>> report = lora_ref.unmerge_checkpoint("merged.safetensors", adapter, "restored.safetensors",
    ...                                      residual_path="residual.safetensors")
    >>> lora_ref.load_file("restored.safetensors")["attn.q_proj.weight"].tobytes() == W.tobytes()
    True

Many adapters at once: mixed batches (``mixed_batch``), combination (``combine``), trees (``tree``)::

    >>> factors = lora_ref.factors_for([adapter, adapter], "attn.q_proj")
    >>> lora_ref.mixed_forward(x, W, factors, index=[0, -1]).shape
    (2, 256)
    >>> [g.shape for g in lora_ref.mixed_backward(x, np.ones_like(y), W, factors, index=[0, -1]).dA]
    [(8, 256), (8, 256)]
    >>> from lora_ref.combine import combine
    >>> combine([adapter, adapter], [1.0, 0.5], "cat").adapter.config.r
    16
    >>> tree = lora_ref.AdapterTree([lora_ref.TreeNode("en", None, adapter)])
    >>> lora_ref.TreeSwitcher(tree, dict(weights), exact=True).switch("en").steps
    1

ONNX graphs: ``lora_ref.export`` (a separate package that imports onnx and onnxruntime; install
``lora-ref[export]``), e.g. ``lora_ref.export.export("model.onnx", [adapter], "dynamic", "out.onnx")``.
The conformance suite: ``lora_ref.conformance`` (``lora-ref conformance run``).
"""

from .adapter import Adapter, LoraModule, load_adapter, save_adapter
from .checkpoint import merge_checkpoint, unmerge_checkpoint
from .config import LoraConfig, lora_scale
from .deltas import delta_for
from .errors import LoraRefError
from .kinds import kind_of
from .ledger import MergeLedger
from .linear import backward as lora_backward
from .linear import forward as lora_forward
from .merge import MergeResult, Residual, merge, unmerge
from .mixed_batch import StackedBank, factors_for, mixed_backward, mixed_forward
from .safetensors_io import load_file, save_file
from .tree import AdapterTree, TreeNode, TreeSwitcher

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterTree",
    "LoraConfig",
    "LoraModule",
    "LoraRefError",
    "MergeLedger",
    "MergeResult",
    "Residual",
    "StackedBank",
    "TreeNode",
    "TreeSwitcher",
    "delta_for",
    "factors_for",
    "kind_of",
    "load_adapter",
    "load_file",
    "lora_backward",
    "lora_forward",
    "lora_scale",
    "merge",
    "merge_checkpoint",
    "mixed_backward",
    "mixed_forward",
    "save_adapter",
    "save_file",
    "unmerge",
    "unmerge_checkpoint",
]
