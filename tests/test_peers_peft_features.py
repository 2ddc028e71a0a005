"""Peer tests of the feature matrix's mixed-batch cells against PEFT 0.21.2 (torch CPU, float64).

Every kind and variant with its PEFT layer: Linear (+ lora_bias), Embedding, Conv1d/2d/3d
(+ lora_bias) through PEFT's ``adapter_names`` mixed batch (forward, and backward by autograd
through it); DoRA (Linear, Embedding, Conv1d/2d/3d), which ``adapter_names`` refuses
(``ValueError: Cannot pass adapter_names when DoRA is enabled``, checked), row group by row
group with ``set_adapter``: PEFT's DoRA forward and its autograd (PEFT detaches the norm)
against the reference's mixed batch with each row's own norm. Conv geometries here have no
dilation: PEFT 0.21 builds lora_A without it (a documented deviation, SPEC 4.2).

Tolerance: both sides evaluate the same real expression in float64 by different routes, so they
differ by at most 2·γ_N·P (tests/test_features.py derives N = 2·|W| + 16 and P).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import require_peer
from features_cases import MODULE, make_case
from lora_ref.conv import ConvGeometry
from lora_ref.features import VARIANTS, cell
from lora_ref.mixed_batch import mixed_backward, mixed_forward
from lora_ref.numerics import gamma
from test_features import chain, magnitude_P, routing  # noqa: F401  (shared derivation of the bound)

U64 = 2.0**-53
PEER_VARIANTS = [v for v in VARIANTS if not v.fan_in_fan_out]  # PEFT's fan_in_fan_out is for GPT-2's Conv1D only
GEOMETRY = {1: ConvGeometry(stride=2, padding=1), 2: ConvGeometry(stride=(1, 2), padding=1), 3: ConvGeometry(stride=(1, 2, 1))}


def torch_layer(torch, case):
    v, W = case.variant, case.W
    if v.kind == "linear":
        layer = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
    elif v.kind == "embedding":
        layer = torch.nn.Embedding(*W.shape, dtype=torch.float64)
    else:
        g = case.geometry
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[v.conv_dims]
        layer = cls(W.shape[1], W.shape[0], W.shape[2:], stride=g.stride, padding=g.padding, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W))
        if case.bias is not None:
            layer.bias.copy_(torch.tensor(case.bias))
    return layer


def peft_model(torch, peft, case):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch_layer(torch, case)

        def forward(self, x):
            return self.layer(x)

    v = case.variant
    net = None
    for a in case.adapters:
        cfg = peft.LoraConfig(r=a.config.r, lora_alpha=a.config.lora_alpha, target_modules=[MODULE],
                              use_dora=v.dora, lora_bias=v.lora_bias, init_lora_weights=False, use_rslora=a.config.use_rslora,
                              rank_pattern=dict(a.config.rank_pattern), alpha_pattern=dict(a.config.alpha_pattern))
        if net is None:
            net = peft.get_peft_model(Net(), cfg, adapter_name=a.name)
        else:
            net.add_adapter(a.name, cfg)
    layer = net.base_model.model.layer
    with torch.no_grad():
        for a in case.adapters:
            lora = a.modules[MODULE]
            for param, value in peft_params(layer, a.name, v).items():
                if param is not None:
                    param.copy_(torch.tensor(np.reshape(getattr(lora, value), tuple(param.shape))))
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return net


def peft_params(layer, name, v):
    """{PEFT parameter: LoraModule field} of adapter ``name``."""
    if v.kind == "embedding":
        params = {layer.lora_embedding_A[name]: "A", layer.lora_embedding_B[name]: "B"}
    else:
        params = {layer.lora_A[name].weight: "A", layer.lora_B[name].weight: "B"}
        if v.lora_bias:
            params[layer.lora_B[name].bias] = "lora_bias"
    if v.dora:
        params[layer.lora_magnitude_vector[name].weight] = "magnitude"
    return params


def by_groups(torch, net, case, index, x_t, dy, prepare=None) -> np.ndarray:
    """PEFT's output row group by row group (``set_adapter``; the base with adapters disabled),
    accumulating autograd of Σ dy · y; ``prepare(name, rows)`` runs before each adapter's group."""
    out_all = None
    for i in range(-1, len(case.adapters)):
        rows = np.flatnonzero(index == i)
        if rows.size == 0:
            continue
        if i < 0:
            with net.disable_adapter():
                out = net(x_t[rows])
        else:
            name = case.adapters[i].name
            if prepare is not None:
                prepare(name, rows)
            net.set_adapter(name)
            out = net(x_t[rows])
        (out * torch.tensor(dy[rows])).sum().backward()
        if out_all is None:
            out_all = np.zeros((len(index),) + tuple(out.shape[1:]))
        out_all[rows] = out.detach().numpy()
    return out_all


@pytest.mark.parametrize("v", PEER_VARIANTS, ids=lambda v: v.name)
def test_mixed_batch_matches_peft(v, tmp_path):
    torch = require_peer("torch")
    peft = require_peer("peft")
    assert cell(v, "mixed_forward").supported and cell(v, "mixed_backward").supported
    case = make_case(v, 5, missing=False)
    if v.conv_dims:
        case = dataclasses.replace(case, geometry=GEOMETRY[v.conv_dims])
    net = peft_model(torch, peft, case)
    index, _ = routing(case, 5)
    names = ["__base__" if i < 0 else case.adapters[i].name for i in index]
    factors = case.factors
    ours = mixed_forward(case.x, case.W, factors, index, bias=case.bias, **case.options)
    dy = np.random.default_rng(6).normal(size=ours.shape)
    grads = mixed_backward(case.x, dy, case.W, factors, index, **case.options)
    x_t = torch.tensor(case.x, requires_grad=case.float_input)
    if not v.dora:
        theirs = net(x_t, adapter_names=names)
        (theirs * torch.tensor(dy)).sum().backward()
        theirs = theirs.detach().numpy()
    else:
        with pytest.raises(ValueError, match="DoRA"):  # on a second model: PEFT leaves its hooks behind on this error
            peft_model(torch, peft, case)(x_t, adapter_names=names)
        theirs = by_groups(torch, net, case, index, x_t, dy)
    P = magnitude_P(case, case.x, factors, index)
    bound = 2 * gamma(chain(case), U64)
    assert np.all(np.abs(ours - theirs) <= bound * P)
    Q = float(np.sum(np.abs(dy) * magnitude_P(case, case.x, factors, index, shift=1.0)))
    if case.float_input:
        assert np.max(np.abs(x_t.grad.numpy() - grads.dx)) <= bound * Q
    layer = net.base_model.model.layer
    for i, a in enumerate(case.adapters):
        ours_i = {"A": grads.dA[i], "B": grads.dB[i], "lora_bias": grads.dlora_bias[i], "magnitude": grads.dmagnitude[i]}
        for param, field in peft_params(layer, a.name, v).items():
            theirs_g = np.zeros(param.shape) if param.grad is None else param.grad.numpy()
            assert np.max(np.abs(theirs_g.reshape(ours_i[field].shape) - ours_i[field])) <= bound * Q * 4, (a.name, field)


@pytest.mark.parametrize("v", [v for v in PEER_VARIANTS if v.kind != "embedding"], ids=lambda v: v.name)
def test_training_dropout_matches_peft(v):
    """Dropout as PEFT applies it in training: PEFT's lora_dropout module replaced by a fixed mask
    (the same mask the reference is given), PEFT in train mode, one row group per adapter.
    For DoRA this is PEFT's training-with-dropout formula (base(x) + (g − 1) base(x̃) + g lora(x̃))."""
    torch = require_peer("torch")
    peft = require_peer("peft")
    case = make_case(v, 7, missing=False)
    if v.conv_dims:
        case = dataclasses.replace(case, geometry=GEOMETRY[v.conv_dims])
    net = peft_model(torch, peft, case)
    net.train()
    index, mask = routing(case, 7)
    factors = case.factors
    ours = mixed_forward(case.x, case.W, factors, index, bias=case.bias, dropout_mask=mask, **case.options)
    dy = np.random.default_rng(8).normal(size=ours.shape)
    grads = mixed_backward(case.x, dy, case.W, factors, index, dropout_mask=mask, **case.options)

    class FixedMask(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = torch.tensor(m)

        def forward(self, x):
            return x * self.m

    layer = net.base_model.model.layer
    x_t = torch.tensor(case.x, requires_grad=True)

    def masked(name, rows):
        layer.lora_dropout[name] = FixedMask(mask[rows])

    theirs = by_groups(torch, net, case, index, x_t, dy, masked)
    bound = 2 * gamma(chain(case), U64)
    assert np.all(np.abs(ours - theirs) <= bound * magnitude_P(case, case.x, factors, index))
    Q = float(np.sum(np.abs(dy) * magnitude_P(case, case.x, factors, index, shift=1.0)))
    assert np.max(np.abs(x_t.grad.numpy() - grads.dx)) <= bound * Q
    for i, a in enumerate(case.adapters):
        ours_i = {"A": grads.dA[i], "B": grads.dB[i], "lora_bias": grads.dlora_bias[i], "magnitude": grads.dmagnitude[i]}
        for param, field in peft_params(layer, a.name, v).items():
            assert np.max(np.abs(param.grad.numpy().reshape(ours_i[field].shape) - ours_i[field])) <= bound * Q * 4, (a.name, field)
