"""The layer-kind registry (lora_ref.kinds): every kind's facts agree with its own functions,
lookups of unknown kinds are refused, and DoRA's forward and merge use one norm, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref import dora
from lora_ref.adapter import modules_from_state_dict
from lora_ref.conv import ConvGeometry
from lora_ref.errors import ConfigError, ShapeError
from lora_ref.kinds import kind_for_tensors, kind_of, kinds

KINDS = list(kinds())


def weight_shape(name: str, draw) -> tuple[int, ...]:
    if name == "conv":
        return (draw(st.integers(1, 4)), draw(st.integers(1, 3))) + tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    return (draw(st.integers(1, 6)), draw(st.integers(1, 6)))


@st.composite
def layers(draw: st.DrawFn):
    """(kind, fan_in_fan_out, W, A, B, m) with random values of the kind's shapes."""
    kind = kind_of(draw(st.sampled_from(KINDS)))
    ffo = kind.name == "linear" and draw(st.booleans())
    W_shape = weight_shape(kind.name, draw)
    r = draw(st.integers(1, 3))
    A_shape, B_shape = kind.lora_shapes(W_shape, r, fan_in_fan_out=ffo)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in (W_shape, A_shape, B_shape))
    m = rng.uniform(0.5, 2.0, W_shape[kind.dora_axis(ffo)]).astype(np.float32)
    return kind, ffo, W, A, B, m


def test_builtin_kinds_are_registered_once_under_their_names():
    assert KINDS == ["conv", "embedding", "linear"]
    for name in KINDS:
        assert kind_of(name).name == name and kind_of(kind_of(name)) is kind_of(name)


@pytest.mark.parametrize("name", ["dense", "", None, "Linear"])
def test_unknown_kind_is_a_config_error(name):
    with pytest.raises(ConfigError, match="unknown layer kind"):
        kind_of(name)


@given(layer=layers())
def test_shapes_delta_and_axis_agree(layer):
    """lora_shapes fits check_shapes; the delta has W's stored shape; the DoRA axis indexes B's outputs."""
    kind, ffo, W, A, B, _ = layer
    out, _, r = kind.check_shapes(W.shape, A, B, fan_in_fan_out=ffo)
    assert r == A.shape[0] and out == B.shape[0] == W.shape[kind.dora_axis(ffo)]
    assert kind.delta(A, B, 0.5, fan_in_fan_out=ffo).shape == W.shape
    zero_A, zero_B = kind.zero_factors(W.shape, fan_in_fan_out=ffo)
    assert not kind.delta(zero_A, zero_B, 1.0, fan_in_fan_out=ffo).full().any()


@given(layer=layers())
def test_wrong_rank_is_refused_by_every_kind(layer):
    kind, ffo, W, A, B, _ = layer
    with pytest.raises(ShapeError):
        kind.check_shapes(W.shape, A, np.concatenate([B, B], axis=1), fan_in_fan_out=ffo)


@given(layer=layers())
def test_dora_forward_and_merge_share_one_norm_bitwise(layer):
    """n of the DoRA layer (forward) is bitwise the n merge computes from the same W (weight_norm)."""
    kind, ffo, W, A, B, m = layer
    layer64 = dora.build(kind, W, A, B, 0.75, m, fan_in_fan_out=ffo)
    merge_source = dora.dora_delta(kind.delta(A, B, 0.75, fan_in_fan_out=ffo), m, W, kind.dora_axis(ffo))
    assert np.array_equal(layer64.n.view(np.uint64), merge_source.norm.view(np.uint64))


def test_a_kind_refuses_options_it_does_not_take():
    W, A, B = np.ones((3, 2), np.float32), np.ones((1, 2), np.float32), np.ones((3, 1), np.float32)
    with pytest.raises(ConfigError, match="Linear layers take no geometry"):
        kind_of("linear").ops(W, A, B, 1.0, geometry=ConvGeometry())
    with pytest.raises(ConfigError, match="Conv layers take no padding_idx"):
        kind_of("conv").ops(np.ones((3, 2, 1), np.float32), np.ones((1, 2, 1), np.float32), np.ones((3, 1, 1), np.float32), 1.0,
                            padding_idx=0)


def test_checkpoint_keys_name_the_kind():
    """PEFT key parts and lora_A's axes tell the kinds apart, and peft_keys writes them back."""
    assert kind_for_tensors({"lora_embedding_A", "lora_embedding_B"}, 2).name == "embedding"
    assert kind_for_tensors({"lora_A.weight", "lora_B.weight"}, 2).name == "linear"
    assert kind_for_tensors({"lora_A.weight", "lora_B.weight"}, 4).name == "conv"
    with pytest.raises(ConfigError):
        kind_for_tensors({"lora_B.weight"}, 2)
    tensors = {"base_model.model.emb.lora_embedding_A": np.ones((2, 5), np.float32),
               "base_model.model.emb.lora_embedding_B": np.ones((3, 2), np.float32)}
    modules, _ = modules_from_state_dict(tensors)
    assert modules["emb"].kind == "embedding" and set(modules["emb"].peft_keys()) == set(tensors)
