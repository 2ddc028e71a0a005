"""The layer-kind registry: one :class:`Kind` per kind of adapted layer, registered by name.

A kind (``"linear"``, ``"embedding"``, ``"conv"``) owns everything that differs between layer
kinds, so the rest of the code asks the registry instead of testing a kind string:

* shapes: :meth:`Kind.check_shapes` (W, lora_A, lora_B agree; returns (out, in, r)) and
  :meth:`Kind.lora_shapes` (A's and B's shapes for a base weight and a rank, PEFT layout);
* the delta ΔW in W's stored layout (:meth:`Kind.delta`, a :class:`lora_ref.merge.DeltaSource`);
* the float64 forward/backward maps (:meth:`Kind.ops`, a :class:`LayerOps`: base, lora and
  their vector-Jacobian products), which DoRA wraps generically;
* DoRA's channel axis of the stored weight (:meth:`Kind.dora_axis`; the output's is
  ``LayerOps.channel_axis``);
* facts: dropout on the LoRA path, lora_bias, PEFT's init (reversed for embeddings, PiSSA /
  OLoRA on Linear only), PEFT's checkpoint key parts, and what the exporter needs
  (:class:`ExportFacts`: which ONNX op reads the weight, at which input, its ranks, and the
  layout of the graph's LoRA factors).

Adding a kind: write its module (shape check, delta source, ops, and a ``Kind`` subclass
registered with :func:`register`), and add the module to :data:`BUILTIN_MODULES`. The built-in
kinds are imported on the first lookup, so kind modules may import this one freely.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from .errors import ConfigError

#: The names of the built-in kinds, as stored in :class:`lora_ref.adapter.LoraModule`.
KindName = Literal["linear", "embedding", "conv"]

#: Modules that register the built-in kinds (imported on the first lookup).
BUILTIN_MODULES = ("lora_ref.linear", "lora_ref.embedding", "lora_ref.conv")


class LayerOps(Protocol):
    """A kind's float64 maps of one LoRA layer (W, A, B, s fixed) and their VJPs.

    ``base(x)`` is the layer without bias, ``lora(x)`` the scaled LoRA path without lora_bias;
    ``*_vjp(x, dY)`` give the gradient of Σ dY ∘ map(x): ``base_vjp`` dx (None for ids),
    ``lora_vjp`` (dx, dA, dB). ``channel_axis`` is the output's channel axis (DoRA's m).
    """

    channel_axis: int

    def check_input(self, x: np.ndarray) -> np.ndarray: ...
    def base(self, x: np.ndarray) -> np.ndarray: ...
    def base_vjp(self, x: np.ndarray, dY: np.ndarray) -> np.ndarray | None: ...
    def lora(self, x: np.ndarray) -> np.ndarray: ...
    def lora_vjp(self, x: np.ndarray, dY: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]: ...


#: How the graph stores a LoRA pair: ``matrix`` A_g = Aᵀ [in, r], B_g = s·Bᵀ [r, out] (rank axis
#: 1 of A_g, 0 of B_g); ``kernel`` A_g = A [r, C, *k], B_g = s·B [O, r, 1...] (rank axis 0 of A_g, 1 of B_g).
FactorLayout = Literal["matrix", "kernel"]


@dataclass(frozen=True)
class ExportFacts:
    """What the ONNX exporter needs to know about a kind.

    ``ops``: the op types that read the weight; ``weight_input``: the weight's input position;
    ``weight_ranks``: the weight's possible ranks; ``transposable``: the weight may be stored
    transposed ([in, out], or behind a Transpose / Gemm transB=1); ``form``: those uses in words;
    ``lora_a_op``: the op that applies A_g to the site's input (MatMul, Gather or Conv);
    ``factor_layout``: see :data:`FactorLayout`.
    """

    ops: tuple[str, ...]
    weight_input: int
    weight_ranks: tuple[int, ...]
    transposable: bool
    form: str
    lora_a_op: Literal["MatMul", "Gather", "Conv"]
    factor_layout: FactorLayout


class Kind(ABC):
    """One layer kind. Subclasses set the facts and implement the abstract methods."""

    #: Registry name (:data:`KindName`) and the name in messages.
    name: str
    label: str
    #: PEFT checkpoint key parts of lora_A and lora_B (``<module>.<part>``).
    peft_parts: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    #: lora_A has kernel axes (telling Conv from Linear when both use lora_A/lora_B keys).
    kernel_axes: bool = False
    #: PEFT applies dropout to the LoRA input of this kind.
    dropout: bool = True
    #: The base layer has a bias (torch's Linear and Conv do, Embedding does not).
    base_bias: bool = True
    #: The kind can carry a lora_B.bias (PEFT's lora_bias).
    lora_bias: bool = True
    #: PEFT's default/gaussian init is reversed (A = 0, B ~ N(0, 1)).
    reversed_init: bool = False
    #: PiSSA / OLoRA (a decomposition of W) are defined for this kind.
    decomposition_init: bool = False
    export: ExportFacts

    @abstractmethod
    def check_shapes(self, W_shape: tuple[int, ...], A: np.ndarray, B: np.ndarray, *,
                     fan_in_fan_out: bool = False, module: str = "") -> tuple[int, int, int]:
        """Validate W/A/B shapes (ShapeError naming ``module``); return (out, in, r)."""

    @abstractmethod
    def lora_shapes(self, W_shape: tuple[int, ...], r: int, *, fan_in_fan_out: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(A's shape, B's shape) of rank ``r`` for a base weight of ``W_shape``, in PEFT's layout."""

    @abstractmethod
    def delta(self, A: np.ndarray, B: np.ndarray, scale: float, *, fan_in_fan_out: bool = False, module: str = ""):
        """ΔW = s·(B A in the kind's form) in W's stored layout, as a :class:`~lora_ref.merge.DeltaSource`."""

    @abstractmethod
    def ops(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, *, fan_in_fan_out: bool = False,
            geometry=None, padding_idx: int | None = None, module: str = "") -> LayerOps:
        """The kind's :class:`LayerOps`; an option the kind does not take is a ConfigError."""

    @abstractmethod
    def forward(self, x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, *,
                bias: np.ndarray | None = None, lora_bias: np.ndarray | None = None, dropout_mask: np.ndarray | None = None,
                fan_in_fan_out: bool = False, geometry=None, out_dtype: object = None, module: str = "") -> np.ndarray:
        """The kind's LoRA forward (its module's ``forward``), rounded once to ``out_dtype``;
        an option the kind does not take is a ConfigError."""

    def dora_axis(self, fan_in_fan_out: bool = False) -> int:
        """The output-channel axis of the stored W: what DoRA's m indexes and its norm is not taken over."""
        return 0

    def inner_length(self, W_shape: tuple[int, ...]) -> int:
        """Terms summed per output element by the base map (Linear: in; Conv: in·Πk; Embedding: 0)."""
        return int(np.prod(W_shape[1:], dtype=np.int64))

    def zero_factors(self, W_shape: tuple[int, ...], *, fan_in_fan_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rank-1 zero A, B for W: the layer without an adapter (they add exact zeros)."""
        A_shape, B_shape = self.lora_shapes(W_shape, 1, fan_in_fan_out=fan_in_fan_out)
        return np.zeros(A_shape), np.zeros(B_shape)

    def refuse_options(self, module: str, **options) -> None:
        """ConfigError naming the first option given (not None) that this kind does not take."""
        for option, value in options.items():
            if value is not None and value is not False:
                raise ConfigError(f"{module or self.name}: {self.label} layers take no {option}")

    def __repr__(self) -> str:
        return f"<Kind {self.name}>"


_REGISTRY: dict[str, Kind] = {}
_loaded = False


def register(kind: Kind) -> Kind:
    """Add ``kind`` under ``kind.name`` (once) and return it."""
    if kind.name in _REGISTRY:
        raise ConfigError(f"layer kind {kind.name!r} is registered twice")
    _REGISTRY[kind.name] = kind
    return kind


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def kinds() -> dict[str, Kind]:
    """Every registered kind, sorted by name (registration order follows import order)."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def kind_of(name: str | Kind) -> Kind:
    """The registered kind called ``name`` (a Kind passes through); ConfigError for an unknown one."""
    if isinstance(name, Kind):
        return name
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown layer kind {name!r}; expected one of {tuple(kinds())}") from None


def kind_for_tensors(parts: set[str], A_ndim: int) -> Kind:
    """The kind of a checkpoint module from its key parts and lora_A's number of axes.

    The kinds whose lora_A part is among ``parts``; of several, the one whose lora_A has kernel
    axes exactly when A has more than two (Conv vs Linear). ConfigError when none claims it.
    """
    candidates = [k for k in kinds().values() if k.peft_parts[0] in parts]
    if len(candidates) > 1:
        candidates = [k for k in candidates if k.kernel_axes == (A_ndim > 2)]
    if not candidates:
        raise ConfigError(f"no layer kind has the checkpoint key parts {sorted(parts)}")
    return candidates[0]
