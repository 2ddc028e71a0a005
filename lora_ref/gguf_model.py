"""GGUF files (llama.cpp) read without torch, and where a PEFT module lives in one (SPEC G.1).

``gguf`` is llama.cpp's own Python reader/writer (NumPy only). It is imported lazily, on the
first call that needs it, so ``import lora_ref`` never needs it: ``pip install 'lora-ref[gguf]'``.

Layout. GGUF lists a tensor's dims in ggml order ne = [ne0, ne1, ...] (ne0 contiguous); the
``gguf`` reader and writer reverse them, so a NumPy view has torch's layout: a Linear weight
[out, in] is ne = [in, out]. A LoRA pair is ``<base tensor>.lora_a`` [r, in] (= PEFT lora_A)
and ``<base tensor>.lora_b`` [out, r] (= PEFT lora_B), and llama.cpp adds
scale · (x a^T) b^T, i.e. ΔW = scale · b a. For ``token_embd.weight`` ([vocab, embd]) llama.cpp
gathers a row of ``lora_a`` per token, so ``lora_a`` is [vocab, r] = lora_embedding_A^T and
``lora_b`` is [embd, r] = lora_embedding_B, and ΔW = scale · a b^T (llm_build_inp_embd).

Row permutation. convert_hf_to_gguf.py's LlamaModel (GGUF arch ``llama``: Llama, Mistral,
Mixtral) stores q_proj and k_proj with their rows reordered per head, from HF's split-half
rotary pairing to llama.cpp's interleaved one (``LlamaModel.permute``):

    W_gguf = W_hf.reshape(n, 2, d/2, in).swapaxes(1, 2).reshape(out, in)

with n = head_count for q_proj and head_count_kv for k_proj, d = out / n. A row permutation of
ΔW = B A is the same permutation of B's rows, so a LoRA on those modules has B permuted so.
The other architectures here (qwen2, phi3, gemma, gemma2) store HF's rows unchanged.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .adapter import PREFIX, Adapter
from .dtypes import bfloat16, bits_of, float16, float32, round_to
from .errors import ConfigError, DTypeError, FileFormatError, LoraRefError, ShapeError, TargetNotFoundError
from .inputs import require_regular_file
from .kinds import kind_of
from .merge import DeltaSource

#: GGUF architectures lora-ref maps PEFT modules into -> whether q_proj/k_proj rows are permuted.
ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False, "phi3": False, "gemma": False, "gemma2": False}
#: Layer kinds llama.cpp applies a LoRA to (the pair layouts of the module doc).
GGUF_KINDS = ("linear", "embedding")
#: The float GGUF tensor types and their NumPy dtypes (BF16 is stored as raw 2-byte words).
FLOAT_TYPES = {"F32": float32, "F16": float16, "BF16": bfloat16}


class GgufDependencyError(LoraRefError, ImportError):
    """The ``gguf`` package (llama.cpp's reader/writer) is not installed."""


class GgufUnsupportedError(LoraRefError, ValueError):
    """The adapter or model holds something llama.cpp's LoRA cannot express (named in the message)."""


class QuantizedTensorError(DTypeError):
    """A quantized GGUF tensor was asked for as floats (merge targets need ``--requantize``)."""


def gguf_module() -> ModuleType:
    """``import gguf``, or a GgufDependencyError that says how to install it."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise GgufDependencyError(
            "GGUF support needs llama.cpp's 'gguf' package: pip install 'lora-ref[gguf]' (or pip install gguf)"
        ) from None


class GgufFile:
    """A GGUF file opened read-only (tensors are memory maps): metadata and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        gguf = gguf_module()
        self.path = Path(path)
        require_regular_file(self.path, "GGUF file")  # gguf maps the path itself: a FIFO would hang it
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, KeyError, IndexError) as exc:  # gguf raises these on bad files
            raise FileFormatError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool or list), or ``default`` when absent."""
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    @property
    def architecture(self) -> str:
        arch = self.value("general.architecture")
        if not isinstance(arch, str):
            raise FileFormatError(f"{self.path}: no general.architecture in the GGUF metadata")
        return arch

    def integer(self, key: str) -> int:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FileFormatError(f"{self.path}: metadata {key} must be a positive integer, got {str(value)[:60]}")
        return value

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in NumPy (torch) order."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def array(self, name: str) -> np.ndarray:
        """A float tensor (F32/F16/BF16) as a read-only NumPy view; quantized types raise QuantizedTensorError."""
        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in FLOAT_TYPES:
            raise QuantizedTensorError(f"{self.path}: tensor {name} is {kind}, not a float tensor (F32, F16 or BF16)")
        data = tensor.data
        if kind == "BF16":  # the reader gives BF16 as bytes: view them as 2-byte bfloat16 words
            data = data.view(np.uint16).view(bfloat16)
        return data.reshape(self.shape(name))


@dataclass(frozen=True)
class ModuleSite:
    """Where one PEFT module's LoRA goes in a GGUF model: tensor name, layer kind, B-row permutation."""

    module: str
    tensor: str
    kind: str  # "linear" | "embedding"
    row_permutation: np.ndarray | None = None

    def factors(self, adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
        """(lora_a, lora_b) in the GGUF model's NumPy layout (module doc), source dtype kept."""
        lora = adapter.modules[self.module]
        if self.kind == "embedding":
            return lora.A.T, lora.B
        B = lora.B if self.row_permutation is None else lora.B[self.row_permutation]
        return lora.A, B

    def product(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(L, R) with ΔW = scale · L R for a GGUF pair: (b, a) for Linear, (a, b^T) for token_embd."""
        return (a, b.T) if self.kind == "embedding" else (b, a)

    def peft_delta(self, adapter: Adapter) -> DeltaSource:
        """PEFT's ΔW = s·B·A (s exact, float64) in the GGUF weight's layout (B's rows permuted), for merge."""
        lora = adapter.modules[self.module]
        B = lora.B if self.row_permutation is None else lora.B[self.row_permutation]
        return kind_of(lora.kind).delta(lora.A, B, adapter.scale_for(self.module), module=self.tensor)


def _check_base_copy(model: GgufFile, site: ModuleSite, copy: np.ndarray) -> None:
    """Refuse a saved base-layer copy that is not the base model's tensor (one rounding to its type).

    A copy that differs means the adapter was trained on other weights (a resized or retrained
    vocabulary): applying its LoRA to this base would be silently wrong.
    """
    try:
        base = model.array(site.tensor)
    except QuantizedTensorError:
        base = None
    W = np.asarray(copy, dtype=np.float64)
    if site.row_permutation is not None:
        W = W[site.row_permutation]
    if base is None or W.shape != base.shape or not np.array_equal(
            bits_of(round_to(W, base.dtype)), bits_of(np.asarray(base))):
        raise GgufUnsupportedError(
            f"{site.module}: the adapter carries its own copy of the base weight ({site.module}.base_layer.weight, "
            f"PEFT's save_embedding_layers) and it differs from {site.tensor} in {model.path} "
            "(resized vocabulary or another base?); convert the base model from the same weights")


def rope_row_permutation(out_features: int, n_head: int) -> np.ndarray:
    """Row order of LlamaModel.permute: gguf row h·d + 2i + j is HF row h·d + j·d/2 + i."""
    if n_head <= 0 or out_features % (2 * n_head):
        raise ShapeError(f"{out_features} rows cannot be split into {n_head} heads of an even size")
    rows = np.arange(out_features).reshape(n_head, 2, out_features // n_head // 2)
    return rows.swapaxes(1, 2).reshape(-1)


def base_layer_copies(adapter: Adapter) -> dict[str, np.ndarray]:
    """The ``<module>.base_layer.weight`` copies PEFT saves with targeted embeddings, by module."""
    copies = {}
    for key, array in adapter.extra_tensors.items():
        match = _BASE_LAYER.match(key)
        if match and match["module"] in adapter.modules:
            copies[match["module"]] = array
    return copies


_BASE_LAYER = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")


def refuse_unexpressible(adapter: Adapter) -> None:
    """Raise GgufUnsupportedError for what a llama.cpp LoRA cannot carry, naming the module.

    PEFT's copies of targeted layers' base weights (``save_embedding_layers``) are not refused
    here: :func:`locate_modules` checks each equals the base model's tensor.
    """
    copies = {PREFIX + m + ".base_layer.weight" for m in base_layer_copies(adapter)}
    extra = sorted(k for k in adapter.extra_tensors if k not in copies)
    if extra:
        raise GgufUnsupportedError(
            f"adapter tensor {extra[0]!r} ({len(extra)} such) is not a LoRA factor (modules_to_save?): "
            "llama.cpp adapters carry only lora_a/lora_b pairs; merge it into the base model instead")
    if adapter.config.fan_in_fan_out:
        raise GgufUnsupportedError("fan_in_fan_out (GPT-2 Conv1D layout) adapters have no GGUF mapping here")
    for name, lora in adapter.modules.items():
        if lora.magnitude is not None:
            raise GgufUnsupportedError(f"{name}: DoRA (lora_magnitude_vector) cannot be applied by llama.cpp; "
                                       "merge it into the base model (lora-ref merge) instead")
        if lora.lora_bias is not None:
            raise GgufUnsupportedError(f"{name}: lora_bias (lora_B.bias) cannot be applied by llama.cpp; "
                                       "merge it into the base model (lora-ref merge) instead")
        if lora.kind not in GGUF_KINDS:
            raise GgufUnsupportedError(f"{name}: {lora.kind} LoRA layers have no GGUF mapping")


def locate_modules(adapter: Adapter, model: GgufFile) -> dict[str, ModuleSite]:
    """Map every adapter module to its GGUF tensor (checked present and of the right shape)."""
    gguf = gguf_module()
    refuse_unexpressible(adapter)
    arch = model.architecture
    if arch not in ARCHITECTURES:
        raise GgufUnsupportedError(
            f"{model.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, model.integer(f"{arch}.block_count"))
    sites = {}
    for module, lora in adapter.modules.items():
        stem = names.get_name(module)
        if stem is None:
            raise TargetNotFoundError(f"{module}: no {arch} GGUF tensor corresponds to this module path")
        tensor = f"{stem}.weight"
        if tensor not in model.tensors:
            raise TargetNotFoundError(f"{model.path}: the adapter's {module} maps to {tensor}, which the base lacks "
                                      "(tied embeddings have no output.weight)")
        kind = lora.kind
        perm = None
        if ARCHITECTURES[arch] and kind == "linear" and module.endswith(("q_proj", "k_proj")):
            heads = model.integer(f"{arch}.attention.head_count")
            if module.endswith("k_proj"):
                heads = model.integer(f"{arch}.attention.head_count_kv") if model.value(
                    f"{arch}.attention.head_count_kv") is not None else heads
            perm = rope_row_permutation(lora.B.shape[0], heads)
        site = ModuleSite(module, tensor, kind, perm)
        expected = site.peft_delta(adapter).shape
        if model.shape(tensor) != tuple(expected):
            raise ShapeError(f"{module}: the adapter's ΔW is {tuple(expected)} but {tensor} in {model.path} is "
                             f"{model.shape(tensor)} (another base model?)")
        sites[module] = site
    for module, copy in base_layer_copies(adapter).items():
        _check_base_copy(model, sites[module], copy)
    if len({s.tensor for s in sites.values()}) != len(sites):
        raise ConfigError("two adapter modules map to the same GGUF tensor")
    return sites
