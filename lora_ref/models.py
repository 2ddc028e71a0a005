"""Small reference models built from mixed-batch LoRA layers, with NumPy forward/backward.

Every adapted layer is :func:`lora_ref.mixed_batch.mixed_forward` of its kind: each batch row
goes through the adapter its index names (-1: the base), so one forward/backward trains several
adapters at once, each from its own rows only. Base weights are frozen; ``backward`` returns the
gradients per adapter (A, B, and lora_bias / DoRA magnitude where the adapter has them) and
dL/dx. With a :class:`lora_ref.dropout.RowDropout` the forward applies each adapter's dropout
to its rows' LoRA input, as PEFT does in training (the masks are kept on the tape for backward;
Embedding layers take none). Everything is float64 (train adapters in float64 and save them in
the dtype you want).

* :class:`LayerModel`: one adapted layer of any kind (Linear, Embedding, Conv1d/2d/3d), y = layer(x).
* :class:`TinyEmbedConv`: ids [batch, T] -> embed -> Conv1d over T -> tanh -> y [batch, C, T].
* :class:`TinyMLP`: x [batch, d_in] -> fc1 -> tanh -> fc2 -> y [batch, d_out].
* :class:`TinyTransformer`: one pre-norm-free block on x [batch, T, d]:
  h = x + o_proj(Attn(q_proj x, k_proj x, v_proj x)),  y = h + down_proj(tanh(up_proj h)),
  with H heads of width d/H, causal softmax attention softmax(q k^T / sqrt(d/H) + M) v.
  (tanh keeps the whole model smooth, so finite differences check the backward everywhere.)
Weights use torch's layout and state_dict keys (``<module>.weight`` [out, in], ``<module>.bias``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter
from .conv import ConvGeometry
from .dropout import RowDropout
from .dtypes import float64
from .errors import ShapeError
from .kinds import kind_of
from .mixed_batch import LoraFactors, factors_for, mixed_backward, mixed_forward

#: Per-adapter LoRA gradients: grads[i][module] = {"A": dA, "B": dB}.
AdapterGrads = list[dict[str, dict[str, np.ndarray]]]


@dataclass
class Tape:
    """What a forward pass saves for its backward pass."""

    index: np.ndarray
    factors: dict[str, list[LoraFactors | None]]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    saved: dict[str, np.ndarray] = field(default_factory=dict)
    dropout: RowDropout | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)


class RoutedModel:
    """Base class: frozen weights, adapted layers routed per row through adapters.

    ``kinds`` / ``geometry``: a layer's kind and conv geometry by module (default: Linear).
    """

    #: (module, out_features, in_features) of every Linear layer, in forward order.
    layers: tuple[tuple[str, int, int], ...] = ()
    kinds: dict[str, str] = {}
    geometry: dict[str, object] = {}
    #: Weights stored [in, out] (GPT-2's Conv1D), for every adapted layer.
    fan_in_fan_out: bool = False

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.weights: dict[str, np.ndarray] = {}
        for name, out_f, in_f in self.layers:  # torch's default Linear init: U(-1/sqrt(in), 1/sqrt(in))
            bound = in_f**-0.5
            self.weights[f"{name}.weight"] = rng.uniform(-bound, bound, (out_f, in_f))
            self.weights[f"{name}.bias"] = rng.uniform(-bound, bound, out_f)

    @property
    def targets(self) -> tuple[str, ...]:
        """The adapted modules, in forward order."""
        return tuple(key[: -len(".weight")] for key in self.weights if key.endswith(".weight"))

    def kind_for(self, name: str) -> str:
        return self.kinds.get(name, "linear")

    def _tape(self, adapters: Sequence[Adapter], index: np.ndarray | Sequence[int], dropout: RowDropout | None = None) -> Tape:
        return Tape(np.asarray(index), {name: factors_for(adapters, name) for name in self.targets}, dropout=dropout)

    def _options(self, name: str) -> dict:
        return {"kind": self.kind_for(name), "geometry": self.geometry.get(name), "fan_in_fan_out": self.fan_in_fan_out}

    def _layer(self, name: str, x: np.ndarray, tape: Tape) -> np.ndarray:
        tape.inputs[name] = x
        if tape.dropout is not None and kind_of(self.kind_for(name)).dropout:
            mask = tape.dropout.mask(np.shape(x), tape.index)
            if mask is not None:
                tape.masks[name] = mask
        return mixed_forward(x, self.weights[f"{name}.weight"], tape.factors[name], tape.index,
                             bias=self.weights.get(f"{name}.bias"), dropout_mask=tape.masks.get(name),
                             out_dtype=float64, **self._options(name))

    def _layer_back(self, name: str, dy: np.ndarray, tape: Tape, grads: AdapterGrads) -> np.ndarray | None:
        g = mixed_backward(tape.inputs[name], dy, self.weights[f"{name}.weight"], tape.factors[name], tape.index,
                           dropout_mask=tape.masks.get(name), **self._options(name))
        for i, (dA, dB, dlb, dm) in enumerate(zip(g.dA, g.dB, g.dlora_bias, g.dmagnitude)):
            if dA is not None:
                grads[i][name] = {"A": dA, "B": dB, **({"lora_bias": dlb} if dlb is not None else {}),
                                  **({"magnitude": dm} if dm is not None else {})}
        return g.dx

    def forward(self, x: np.ndarray, adapters: Sequence[Adapter], index: np.ndarray | Sequence[int],
                dropout: RowDropout | None = None) -> tuple[np.ndarray, Tape]:
        raise NotImplementedError

    def backward(self, tape: Tape, dy: np.ndarray) -> tuple[np.ndarray, AdapterGrads]:
        raise NotImplementedError


class LayerModel(RoutedModel):
    """One adapted layer ``layer`` of any kind, y = layer(x), frozen W (and bias where the kind has one).

    Linear: x [batch, in] (W [out, in], or [in, out] with ``fan_in_fan_out``); Embedding: ids [batch, T]; Conv: x [N, C, *S] with ``geometry``.
    W ~ U(−1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default; Embedding: N(0, 1), as torch).
    """

    def __init__(self, kind: str = "linear", weight_shape: tuple[int, ...] = (4, 6), *, geometry=None,
                 fan_in_fan_out: bool = False, seed: int = 0) -> None:
        k = kind_of(kind)
        self.kinds, self.geometry, self.fan_in_fan_out = {"layer": k.name}, {"layer": geometry}, fan_in_fan_out
        rng = np.random.default_rng(seed)
        bound = max(k.inner_length(tuple(weight_shape)), 1) ** -0.5
        W = rng.normal(size=weight_shape) if k.reversed_init else rng.uniform(-bound, bound, weight_shape)
        self.weights = {"layer.weight": W}
        if k.base_bias:
            self.weights["layer.bias"] = rng.uniform(-bound, bound, weight_shape[1 if fan_in_fan_out else 0])

    def forward(self, x, adapters, index, dropout=None):
        tape = self._tape(adapters, index, dropout)
        x = np.asarray(x)
        return self._layer("layer", x if x.dtype.kind in "iu" else x.astype(float64), tape), tape

    def backward(self, tape, dy):
        grads: AdapterGrads = [{} for _ in tape.factors["layer"]]
        return self._layer_back("layer", dy, tape, grads), grads


class TinyEmbedConv(RoutedModel):
    """y = tanh(conv(embed(ids)ᵀ)): ids [batch, T] -> embed [batch, T, D] -> as channels [batch, D, T]
    -> Conv1d (D -> C, kernel 3, padding 1, adapted) -> tanh -> y [batch, C, T]. Both layers adapted."""

    def __init__(self, vocab: int = 16, d: int = 6, channels: int = 4, seed: int = 0) -> None:
        self.kinds, self.geometry = {"embed": "embedding", "conv": "conv"}, {"conv": ConvGeometry(padding=1)}
        rng = np.random.default_rng(seed)
        bound = (3 * d) ** -0.5  # torch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        self.weights = {"embed.weight": rng.normal(size=(vocab, d)),
                        "conv.weight": rng.uniform(-bound, bound, (channels, d, 3)),
                        "conv.bias": rng.uniform(-bound, bound, channels)}

    def forward(self, x, adapters, index, dropout=None):
        tape = self._tape(adapters, index, dropout)
        e = self._layer("embed", np.asarray(x), tape)
        y = np.tanh(self._layer("conv", e.transpose(0, 2, 1), tape))
        tape.saved["y"] = y
        return y, tape

    def backward(self, tape, dy):
        grads: AdapterGrads = [{} for _ in tape.factors["conv"]]
        de = self._layer_back("conv", dy * (1.0 - tape.saved["y"] ** 2), tape, grads)
        self._layer_back("embed", de.transpose(0, 2, 1), tape, grads)
        return None, grads


class TinyMLP(RoutedModel):
    """y = fc2(tanh(fc1(x))); x [batch, d_in]."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4, seed: int = 0) -> None:
        self.layers = (("fc1", hidden, d_in), ("fc2", d_out, hidden))
        super().__init__(seed)

    def forward(self, x, adapters, index, dropout=None):
        tape = self._tape(adapters, index, dropout)
        h = np.tanh(self._layer("fc1", np.asarray(x, dtype=float64), tape))
        tape.saved["h"] = h
        return self._layer("fc2", h, tape), tape

    def backward(self, tape, dy):
        grads: AdapterGrads = [{} for _ in next(iter(tape.factors.values()))]
        dh = self._layer_back("fc2", dy, tape, grads)
        dx = self._layer_back("fc1", dh * (1.0 - tape.saved["h"] ** 2), tape, grads)
        return dx, grads


class TinyTransformer(RoutedModel):
    """One attention + MLP block (module doc); x [batch, T, d]."""

    def __init__(self, d_model: int = 16, n_heads: int = 2, d_ff: int = 32, seed: int = 0) -> None:
        if d_model % n_heads:
            raise ShapeError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        d = d_model
        self.layers = (("attn.q_proj", d, d), ("attn.k_proj", d, d), ("attn.v_proj", d, d), ("attn.o_proj", d, d),
                       ("mlp.up_proj", d_ff, d), ("mlp.down_proj", d, d_ff))
        super().__init__(seed)

    def _heads(self, t: np.ndarray) -> np.ndarray:  # [b, T, d] -> [b, H, T, d/H]
        b, T, d = t.shape
        return t.reshape(b, T, self.n_heads, d // self.n_heads).transpose(0, 2, 1, 3)

    def _merge_heads(self, t: np.ndarray) -> np.ndarray:  # [b, H, T, d/H] -> [b, T, d]
        b, H, T, dh = t.shape
        return t.transpose(0, 2, 1, 3).reshape(b, T, H * dh)

    def forward(self, x, adapters, index, dropout=None):
        x = np.asarray(x, dtype=float64)
        if x.ndim != 3:
            raise ShapeError(f"TinyTransformer takes x [batch, T, d], got {x.shape}")
        tape = self._tape(adapters, index, dropout)
        q, k, v = (self._heads(self._layer(f"attn.{p}_proj", x, tape)) for p in "qkv")
        T = x.shape[1]
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        h = x + self._layer("attn.o_proj", self._merge_heads(probs @ v), tape)
        u = np.tanh(self._layer("mlp.up_proj", h, tape))
        tape.saved.update(q=q, k=k, v=v, probs=probs, u=u)
        return h + self._layer("mlp.down_proj", u, tape), tape

    def backward(self, tape, dy):
        s = tape.saved
        grads: AdapterGrads = [{} for _ in next(iter(tape.factors.values()))]
        du = self._layer_back("mlp.down_proj", dy, tape, grads)
        dh = dy + self._layer_back("mlp.up_proj", du * (1.0 - s["u"] ** 2), tape, grads)
        da = self._heads(self._layer_back("attn.o_proj", dh, tape, grads))
        probs, q, k, v = s["probs"], s["q"], s["k"], s["v"]
        dprobs = da @ v.transpose(0, 1, 3, 2)
        dv = probs.transpose(0, 1, 3, 2) @ da
        dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) / np.sqrt(q.shape[-1])
        dq, dk = dscores @ k, dscores.transpose(0, 1, 3, 2) @ q
        dx = dh
        for p, d in (("q", dq), ("k", dk), ("v", dv)):
            dx = dx + self._layer_back(f"attn.{p}_proj", self._merge_heads(d), tape, grads)
        return dx, grads
