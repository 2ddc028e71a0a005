"""lora-ref: the reference implementation of LoRA in NumPy.

Pure functions on arrays (``lora_ref.linear.forward``), merge numerics with an exact mode
(``lora_ref.merge``), PEFT adapter files without torch (``lora_ref.adapter``), and a merge
ledger for several adapters (``lora_ref.ledger``). Never imports onnx or torch; the ONNX
exporter lives in ``lora_ref.export``.
"""

from .adapter import Adapter, LoraModule, load_adapter, save_adapter
from .config import LoraConfig, lora_scale
from .errors import LoraRefError
from .ledger import MergeLedger
from .merge import MergeResult, Residual, merge, unmerge

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LoraConfig",
    "LoraModule",
    "LoraRefError",
    "MergeLedger",
    "MergeResult",
    "Residual",
    "load_adapter",
    "lora_scale",
    "merge",
    "save_adapter",
    "unmerge",
]
