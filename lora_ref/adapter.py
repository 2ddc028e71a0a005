"""A LoRA adapter in memory, and PEFT's on-disk format read and written without torch.

On disk (PEFT): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys

    base_model.model.<module>.lora_A.weight          A  [r, in]        (Conv: [r, in/g, *k])
    base_model.model.<module>.lora_B.weight          B  [out, r]       (Conv: [out, r, 1...])
    base_model.model.<module>.lora_B.bias            lora_bias [out]
    base_model.model.<module>.lora_embedding_A       A  [r, num_embeddings]
    base_model.model.<module>.lora_embedding_B       B  [embedding_dim, r]
    base_model.model.<module>.lora_magnitude_vector  DoRA magnitude (``.weight`` suffix tolerated)

Other keys (``modules_to_save`` copies, trainable base biases, trainable-token deltas) are kept
in ``Adapter.extra_tensors`` and written back unchanged; :meth:`Adapter.carried_tensors` says
what each one changes (:mod:`lora_ref.carried`), and loading refuses any key it cannot apply.
``adapter_model.bin`` (a pickle) is refused and never opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .carried import CarriedTensor, classify
from .config import CONFIG_NAME, LoraConfig
from .dora import check_magnitude
from .dtypes import check_float_array
from .errors import ConfigError, FileFormatError, ShapeError, UnsafeFileError
from .inputs import require_directory
from .kinds import KindName, kind_for_tensors, kind_of
from .safetensors_io import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
PREFIX = "base_model.model."

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
_PART_FIELD = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "lora_bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}


@dataclass
class LoraModule:
    """The trained tensors of one adapted module.

    ``kind`` names its layer kind in :mod:`lora_ref.kinds` (``"linear"``: A 2-D from ``lora_A``;
    ``"embedding"``: ``lora_embedding_*``; ``"conv"``: A with kernel axes).
    """

    name: str
    A: np.ndarray
    B: np.ndarray
    lora_bias: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    kind: KindName = "linear"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The present tensors by field name."""
        named = {"A": self.A, "B": self.B, "lora_bias": self.lora_bias, "magnitude": self.magnitude}
        return {key: value for key, value in named.items() if value is not None}

    def peft_keys(self) -> dict[str, np.ndarray]:
        """This module's tensors under PEFT's checkpoint keys."""
        base = PREFIX + self.name
        part_A, part_B = kind_of(self.kind).peft_parts
        keys = {f"{base}.{part_A}": self.A, f"{base}.{part_B}": self.B}
        if self.lora_bias is not None:
            keys[f"{base}.lora_B.bias"] = self.lora_bias
        if self.magnitude is not None:
            keys[f"{base}.lora_magnitude_vector"] = self.magnitude
        return keys


@dataclass
class Adapter:
    """A LoRA adapter: its config and its modules by module path."""

    config: LoraConfig
    modules: dict[str, LoraModule]
    name: str = "default"
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    #: The digest that names this adapter in merge records (lora_ref.provenance.adapter_digest);
    #: None until computed. A part of an adapter (one shard's modules) keeps the whole one's.
    content_digest: str | None = None

    def __post_init__(self) -> None:
        for module in self.modules.values():
            validate_module(module, self.config)

    def carried_tensors(self, source: str | None = None) -> dict[str, CarriedTensor]:
        """The non-LoRA tensors by the base key each changes; CarriedTensorError for one that cannot be applied."""
        return classify(self.config, self.extra_tensors, source=source or f"adapter {self.name!r}")

    def scale_for(self, module: str) -> float:
        """The LoRA scale s of ``module`` (rank_pattern / alpha_pattern / rsLoRA applied)."""
        return self.config.scale_for(module)

    def parameter_count(self) -> int:
        return sum(a.size for m in self.modules.values() for a in m.arrays().values())

    def nbytes(self) -> int:
        return sum(a.nbytes for m in self.modules.values() for a in m.arrays().values())


def validate_module(module: LoraModule, config: LoraConfig) -> None:
    """Shapes and dtypes every layer kind shares; raises ShapeError / ConfigError / DTypeError."""
    for key, array in module.arrays().items():
        check_float_array(array, f"{module.name}.{key}")
    A, B = module.A, module.B
    if A.ndim < 2 or B.ndim < 2:
        raise ShapeError(f"{module.name}: lora_A {A.shape} and lora_B {B.shape} must have at least 2 axes")
    if A.shape[0] != B.shape[1]:
        raise ShapeError(
            f"{module.name}: rank mismatch: lora_A {A.shape} has r={A.shape[0]} but lora_B {B.shape} has r={B.shape[1]}"
        )
    expected = config.rank_for(module.name)
    if A.shape[0] != expected:
        raise ConfigError(
            f"{module.name}: the config gives r={expected} but lora_A {A.shape} has rank {A.shape[0]}"
        )
    if module.lora_bias is not None and module.lora_bias.shape != (B.shape[0],):
        raise ShapeError(f"{module.name}: lora_B.bias has shape {module.lora_bias.shape}, expected ({B.shape[0]},)")
    if config.use_dora and module.magnitude is None:
        raise FileFormatError(f"{module.name}: use_dora is set but there is no lora_magnitude_vector for this module")
    if module.magnitude is not None and not config.use_dora:
        raise ConfigError(f"{module.name}: has a lora_magnitude_vector (DoRA) but the config's use_dora is false")
    if module.magnitude is not None and module.lora_bias is not None:
        raise ConfigError(f"{module.name}: DoRA with lora_bias is undefined (PEFT refuses it too)")
    if module.magnitude is not None:
        check_magnitude(module.magnitude, B.shape[0], module.name)  # one entry per output channel


def modules_from_state_dict(tensors: dict[str, np.ndarray], source: str = "adapter") -> tuple[dict[str, LoraModule], dict[str, np.ndarray]]:
    """Group PEFT checkpoint keys into LoraModules; return (modules, uninterpreted tensors)."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    key_parts: dict[str, set[str]] = {}
    extra: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        match = _KEY.match(key)
        if match is None:
            extra[key] = array
            continue
        module, part = match["module"], match["part"]
        key_parts.setdefault(module, set()).add(part)
        parts.setdefault(module, {})[_PART_FIELD[part]] = array
    modules = {}
    for name, fields_ in parts.items():
        missing = [k for k in ("A", "B") if k not in fields_]
        if missing:
            label = {"A": "lora_A", "B": "lora_B"}
            raise FileFormatError(f"{source}: module {name!r} has no {' or '.join(label[m] for m in missing)} tensor")
        kind = kind_for_tensors(key_parts[name], fields_["A"].ndim)
        modules[name] = LoraModule(name=name, kind=kind.name, **fields_)
    return modules, extra


def _not_an_adapter(directory: Path) -> str:
    """Why ``directory`` is not a PEFT adapter folder: which of its two files is missing, and what it looks like instead."""
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).exists()]
    model = next((n for n in ("model.safetensors", "model.safetensors.index.json") if (directory / n).exists()), None)
    hint = (f"; it holds {model}: a model folder, not an adapter (give the folder as the base checkpoint)" if model else
            "; a PEFT adapter folder (save_pretrained) holds adapter_config.json and adapter_model.safetensors")
    return f"{directory}: not an adapter directory: missing {' and '.join(missing)}{hint}"


def load_adapter(directory: str | Path, name: str | None = None) -> Adapter:
    """Read a PEFT adapter directory (config + safetensors). Pickled weights are refused.

    ``name`` defaults to the directory's own name, so two adapters loaded from two folders
    never share a name (in a ledger, a cache, an export's adapter files).
    """
    directory = Path(directory)
    if name is None:
        name = directory.resolve().name or "default"
    require_directory(directory, "adapter directory")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p for p in PICKLE_NAMES if (directory / p).exists()]
        if pickles:
            raise UnsafeFileError(
                f"{directory / pickles[0]}: pickled weights can execute code and are never loaded; convert them once, "
                f"where you trust the file, to {WEIGHTS_NAME}: python -c \"import torch, safetensors.torch as st; "
                f"st.save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_NAME}')\" "
                "(or PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
    if not weights.exists() or not (directory / CONFIG_NAME).exists():
        raise FileFormatError(_not_an_adapter(directory))
    config = LoraConfig.load(directory)
    modules, extra = modules_from_state_dict(load_file(weights), str(weights))
    if not modules:
        raise FileFormatError(f"{weights}: no LoRA tensors (keys like base_model.model.<module>.lora_A.weight)")
    if config.target_modules:  # PEFT would silently drop weights of modules its config does not target
        untargeted = sorted(m for m in modules if not config.targets(m))
        if untargeted:
            raise ConfigError(
                f"{directory / 'adapter_config.json'}: target_modules {str(config.target_modules)[:120]} "
                f"(exclude_modules {str(config.exclude_modules)[:60]}) do not target {len(untargeted)} module(s) "
                f"in {weights.name}, e.g. {untargeted[0]!r}"
            )
    try:
        adapter = Adapter(config=config, modules=modules, name=name, extra_tensors=extra)
        adapter.carried_tensors(source=str(weights))  # refuses a tensor it could not apply
    except (ShapeError, ConfigError, FileFormatError) as exc:
        raise type(exc)(f"{weights}: {exc}") from None
    return adapter


def save_adapter(adapter: Adapter, directory: str | Path) -> None:
    """Write ``adapter`` in PEFT's layout; each file is written atomically."""
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for module in adapter.modules.values():
        tensors.update(module.peft_keys())
    tensors.update(adapter.extra_tensors)
    save_file(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    adapter.config.save(directory)
