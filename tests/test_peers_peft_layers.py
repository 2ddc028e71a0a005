"""Embedding, Conv1d/2d/3d and DoRA against PEFT 0.21.2 on torch 2.13.0 (CPU, float32).

What is compared, per module kind and with DoRA on each kind: forward, gradients (dx, dA, dB,
dm), merged weights, and adapter files written by either side and loaded by the other (bit for
bit). Where PEFT 0.21 differs from the spec, the test asserts the documented deviation
(SPEC "PEFT deviations"): lora_A ignoring dilation and padding_mode, Conv3d 1x1 merge crash,
the DoRA training formula, init sign conventions.

Bounds: PEFT evaluates in float32, so it sits within γ_K(u32)·M of the exact value (K the
roundings a term sees, M the same expression on |inputs|); the reference is within
u32·|y| + γ_K(u64)·M. Their distance is therefore at most (γ_K(u32) + γ_K(u64))·M + u32·|y|,
and we assert 2·γ_K(u32)·M + u32·|y| (M evaluated in float64 by the reference's maps on
|inputs|). For DoRA, K also covers PEFT's float32 norm (N squares) and m/n.
"""

from __future__ import annotations

import numpy as np
import pytest

from lora_ref import dora
from lora_ref.adapter import load_adapter, save_adapter
from lora_ref.conv import ConvDelta, ConvGeometry, ConvOps
from lora_ref.conv import backward as conv_backward
from lora_ref.conv import forward as conv_forward
from lora_ref.deltas import delta_for
from lora_ref.linear import LinearOps
from lora_ref.dtypes import UNIT_ROUNDOFF, float32, float64
from lora_ref.embedding import EmbeddingOps
from lora_ref.embedding import backward as emb_backward
from lora_ref.embedding import forward as emb_forward
from lora_ref.init import init_lora
from lora_ref.linear import backward as lin_backward
from lora_ref.linear import forward as lin_forward
from lora_ref.merge import merge
from lora_ref.numerics import gamma

from helpers import error_log

U32 = UNIT_ROUNDOFF[float32]
U64 = UNIT_ROUNDOFF[float64]
LOG, _print_errors = error_log("Layers vs PEFT 0.21.2 / torch 2.13.0")


def modules(nn):
    """name -> (kind, base layer factory, input shape or (vocab, shape) for ids)."""
    return {
        "emb": ("embedding", lambda: nn.Embedding(12, 5, padding_idx=0), (12, (2, 4))),
        "c1": ("conv", lambda: nn.Conv1d(3, 4, 3, padding=1, stride=2), (2, 3, 9)),
        "c2": ("conv", lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=1), (2, 3, 6, 7)),
        "c2x1": ("conv", lambda: nn.Conv2d(3, 4, 1), (2, 3, 4, 4)),
        "c3": ("conv", lambda: nn.Conv3d(2, 3, (2, 1, 2), padding=(1, 0, 1)), (1, 2, 4, 3, 4)),
        "lin": ("linear", lambda: nn.Linear(6, 5), (3, 6)),
    }


def build_peft(torch, names, use_dora, seed=0, **config):
    from peft import LoraConfig, get_peft_model

    nn = torch.nn
    specs = modules(nn)
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            for name in names:
                setattr(self, name, specs[name][1]())

    cfg = LoraConfig(r=2, lora_alpha=3, target_modules=list(names), use_dora=use_dora, init_lora_weights=False, **config)
    model = get_peft_model(Net(), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "magnitude" in pname else 0.0))
    return model, Net


def peft_layer(model, name):
    return getattr(model.base_model.model, name)


def params(layer, kind):
    """(W, b, A, B, m) as float32 numpy arrays from a PEFT layer."""
    t = lambda p: None if p is None else p.detach().numpy().copy()  # noqa: E731
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight if "default" in layer.lora_magnitude_vector else None
    return t(layer.base_layer.weight), t(getattr(layer.base_layer, "bias", None)), t(A), t(B), t(mag)


def geometry(conv):
    return ConvGeometry(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        padding_mode=conv.padding_mode, groups=conv.groups)


def make_input(torch, kind, shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        vocab, ids_shape = shape
        return torch.randint(0, vocab, ids_shape, generator=gen)
    return torch.randn(shape, generator=gen)


def ops_for(kind, layer, W, A, B, s):
    if kind == "linear":
        return LinearOps(W, A, B, s)
    if kind == "conv":
        return ConvOps(W, A, B, s, geometry(layer.base_layer))
    return EmbeddingOps(W, A, B, s)


def depth(kind, W, A, use_dora):
    k = int(np.prod(W.shape[1:])) if kind != "embedding" else 1
    k += A.shape[0] + 8
    if use_dora:
        k += int(W.size // (W.shape[1] if kind == "embedding" else W.shape[0])) + 8
    return k


def ours_forward(kind, layer, x, W, b, A, B, m, s):
    if m is not None:
        built = {"linear": lambda: dora.linear(W, A, B, s, m), "conv": lambda: dora.conv(W, A, B, s, m, geometry=geometry(layer.base_layer)),
                 "embedding": lambda: dora.embedding(W, A, B, s, m, padding_idx=layer.base_layer.padding_idx)}[kind]()
        return dora.forward(built, x, bias=b), built
    if kind == "linear":
        return lin_forward(x, W, A, B, s, bias=b), None
    if kind == "conv":
        return conv_forward(x, W, A, B, s, geometry=geometry(layer.base_layer), bias=b), None
    return emb_forward(x, W, A, B, s), None


def magnitude_of(kind, layer, x, W, b, A, B, m, s, built):
    """|g|·(base + lora)(|inputs|) + base(|x|) + |b|, float64 (module doc)."""
    ops = ops_for(kind, layer, np.abs(W), np.abs(A), np.abs(B), abs(s))
    xa = x if kind == "embedding" else np.abs(x.astype(float64))
    base, lora = ops.base(xa), ops.lora(xa)
    M = base + lora
    if built is not None:
        shape = [1] * M.ndim
        shape[ops.channel_axis] = -1
        M = np.abs(built.g).reshape(shape) * M + base
    if b is not None:
        shape = [1] * M.ndim
        shape[ops.channel_axis] = -1
        M = M + np.abs(b).reshape(shape)
    return M


ALL = ["emb", "c1", "c2", "c2x1", "c3", "lin"]


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_forward_and_gradients_match_peft(torch, name: str, use_dora: bool) -> None:
    model, _ = build_peft(torch, [name], use_dora)
    model.eval()
    kind, _, shape = modules(torch.nn)[name]
    layer = peft_layer(model, name)
    W, b, A, B, m = params(layer, kind)
    s = layer.scaling["default"]
    x_t = make_input(torch, kind, shape)
    if kind != "embedding":
        x_t.requires_grad_(True)
    y_t = layer(x_t)
    x = x_t.detach().numpy()
    y, built = ours_forward(kind, layer, x, W, b, A, B, m, s)
    M = magnitude_of(kind, layer, x, W, b, A, B, m, s, built)
    K = depth(kind, W, A, use_dora)
    LOG.check(f"forward {kind}{' DoRA' if use_dora else ''}", y, y_t.detach().numpy().astype(float64),
              2 * gamma(K, U32) * M + U32 * np.abs(y.astype(float64)))

    dy = torch.randn(y_t.shape, generator=torch.Generator().manual_seed(9))
    y_t.backward(dy)
    dy_np = dy.numpy()
    if use_dora:
        grads = dora.backward(built, x, dy_np, A, B)
        got = {"dA": grads.dA, "dB": grads.dB, "dm": grads.dmagnitude, "dx": grads.dx}
    elif kind == "linear":
        g = lin_backward(x, dy_np, W, A, B, s)
        got = {"dA": g.dA, "dB": g.dB, "dx": g.dx}
    elif kind == "conv":
        g = conv_backward(x, dy_np, W, A, B, s, geometry=geometry(layer.base_layer))
        got = {"dA": g.dA, "dB": g.dB, "dx": g.dx}
    else:
        g = emb_backward(x, dy_np, W, A, B, s, padding_idx=layer.base_layer.padding_idx)
        got = {"dA": g.dA, "dB": g.dB}
    if kind == "embedding":
        peft_grads = {"dA": layer.lora_embedding_A["default"].grad, "dB": layer.lora_embedding_B["default"].grad}
    else:
        peft_grads = {"dA": layer.lora_A["default"].weight.grad, "dB": layer.lora_B["default"].weight.grad, "dx": x_t.grad}
    if use_dora:
        peft_grads["dm"] = layer.lora_magnitude_vector["default"].weight.grad
    # gradient magnitudes: the same gradients of the |inputs| layer against |dy| (sums of |terms|)
    abs_built = None
    if use_dora:
        abs_built = {"linear": lambda: dora.linear(np.abs(W), np.abs(A), np.abs(B), s, np.abs(m)),
                     "conv": lambda: dora.conv(np.abs(W), np.abs(A), np.abs(B), s, np.abs(m), geometry=geometry(layer.base_layer)),
                     "embedding": lambda: dora.embedding(np.abs(W), np.abs(A), np.abs(B), s, np.abs(m),
                                                         padding_idx=layer.base_layer.padding_idx)}[kind]()
    G = K + int(np.size(dy_np))
    for key, want in peft_grads.items():
        if use_dora:
            xa = x if kind == "embedding" else np.abs(x.astype(float64))
            gm = dora.backward(abs_built, xa, np.abs(dy_np.astype(float64)), np.abs(A), np.abs(B))
            # |g| of the abs layer differs from |g| of the real one (n changes): scale by the ratio
            ratio = np.max(np.abs(built.g) / np.abs(abs_built.g))
            mag = {"dA": gm.dA, "dB": gm.dB, "dm": gm.dmagnitude * np.max(abs_built.n / built.n), "dx": gm.dx}[key].astype(float64) * max(ratio, 1.0)
            mag = mag + (np.abs(got[key].astype(float64)) if key in ("dm", "dx") else 0)
        else:
            mag = np.abs(got[key].astype(float64)) * 0
            mags = {"linear": lambda: lin_backward(np.abs(x.astype(float64)), np.abs(dy_np.astype(float64)), np.abs(W), np.abs(A), np.abs(B), s),
                    "conv": lambda: conv_backward(np.abs(x.astype(float64)), np.abs(dy_np.astype(float64)), np.abs(W), np.abs(A), np.abs(B), s, geometry=geometry(layer.base_layer)),
                    "embedding": lambda: emb_backward(x, np.abs(dy_np.astype(float64)), np.abs(W), np.abs(A), np.abs(B), s)}[kind]()
            mag = getattr(mags, key).astype(float64)
        LOG.check(f"grad {key} {kind}{' DoRA' if use_dora else ''}", got[key], want.numpy().astype(float64),
                  2 * gamma(G, U32) * mag + U32 * np.abs(got[key].astype(float64)))


MERGEABLE = ["emb", "c1", "c2", "c2x1", "c3", "lin"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weights_match_peft(torch, use_dora: bool, tmp_path) -> None:
    model, _ = build_peft(torch, MERGEABLE, use_dora)
    model.eval()
    specs = modules(torch.nn)
    before = {name: params(peft_layer(model, name), specs[name][0]) for name in MERGEABLE}
    model.save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    model.merge_adapter()
    for name in MERGEABLE:
        kind = specs[name][0]
        W, _, A, B, m = before[name]
        merged_peft = peft_layer(model, name).base_layer.weight.detach().numpy()
        source = delta_for(adapter, name, base=W)
        ours = merge(W, source).weight
        lora = source.lora if use_dora else source
        abs_delta = np.abs(type(lora)(np.abs(A), np.abs(B), lora.scale).full())
        M = np.abs(W.astype(float64)) + abs_delta
        K = depth(kind, W, A, use_dora)
        if use_dora:
            gshape = [1] * W.ndim
            gshape[source.axis] = -1
            M = M * np.abs(source.gain).reshape(gshape)
        LOG.check(f"merged weight {kind}{' DoRA' if use_dora else ''}", ours, merged_peft.astype(float64),
                  2 * gamma(K, U32) * M + U32 * np.abs(ours.astype(float64)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_files_load_on_either_side(torch, use_dora: bool, tmp_path) -> None:
    from peft import PeftModel

    model, Net = build_peft(torch, ALL, use_dora)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    specs = modules(torch.nn)
    for name in ALL:
        kind = specs[name][0]
        _, _, A, B, m = params(peft_layer(model, name), kind)
        module = adapter.modules[name]
        assert module.kind == kind
        assert np.array_equal(module.A, A) and np.array_equal(module.B, B)
        assert (m is None and module.magnitude is None) or np.array_equal(module.magnitude, m)
    save_adapter(adapter, tmp_path / "ours")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(Net(), tmp_path / "ours")
    reloaded.eval()
    for name in ALL:
        kind, _, shape = specs[name]
        x = make_input(torch, kind, shape)
        original, again = peft_layer(model, name), peft_layer(reloaded, name)
        for p, q in zip(params(original, kind), params(again, kind)):
            assert (p is None and q is None) or np.array_equal(p, q)
        assert torch.equal(original(x), again(x))


# -- documented deviations (SPEC "PEFT deviations") ---------------------------------------------------------


def _single_conv(torch, conv, use_dora=False):
    nn = torch.nn
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["conv"], init_lora_weights=False, use_dora=use_dora))
    model.eval()
    return model, model.base_model.model.conv


def test_deviation_dilation_and_padding_mode_ignored_by_peft_lora_A(torch) -> None:
    """PEFT 0.21 builds lora_A without the base's dilation (issue #3697) and padding_mode: its
    unmerged output then disagrees with its own merged output; the spec's (ours) agrees with
    the merged conv. With dilation and explicit padding PEFT's shapes do not even match."""
    nn = torch.nn
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")):
        model, layer = _single_conv(torch, conv)
        x = torch.randn(2, 3, 7, 7)
        unmerged = layer(x).detach().numpy()
        W, b, A, B, _ = params(layer, "conv")
        s = layer.scaling["default"]
        ours = conv_forward(x.numpy(), W, A, B, s, geometry=geometry(layer.base_layer), bias=b)
        model.merge_adapter()
        merged = layer(x).detach().numpy()
        M = magnitude_of("conv", layer, x.numpy(), W, b, A, B, None, s, None)
        bound = 2 * gamma(depth("conv", W, A, False) + 4, U32) * M + U32 * np.abs(ours)
        LOG.check("deviation: ours vs PEFT merged", ours, merged.astype(float64), bound)
        assert np.any(np.abs(unmerged - merged) > bound), "PEFT's unmerged conv now honours the geometry: update SPEC"
    model, layer = _single_conv(torch, nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 3, 8, 8))


def test_deviation_conv3d_1x1_merge_crashes_in_peft(torch) -> None:
    """PEFT 0.21's 1x1 special case tests weight.size()[2:4] == (1, 1), which a Conv3d with
    kernel (1, 1, k) also meets, and then multiplies 3-D tensors: merge raises. The spec's delta
    is the same formula for every kernel; ours equals PEFT's unmerged forward."""
    nn = torch.nn
    for kernel in (1, (1, 1, 3)):
        torch.manual_seed(0)
        model, layer = _single_conv(torch, nn.Conv3d(2, 3, kernel))
        x = torch.randn(1, 2, 3, 3, 4)
        unmerged = layer(x).detach().numpy()
        W, b, A, B, _ = params(layer, "conv")
        merged = merge(W, ConvDelta(A, B, layer.scaling["default"])).weight
        ours = ConvOps(merged, A, B, 1.0, geometry(layer.base_layer)).base(x.numpy().astype(float64)) + b.reshape(1, -1, 1, 1, 1)
        M = magnitude_of("conv", layer, x.numpy(), W, b, A, B, None, layer.scaling["default"], None)
        LOG.check("deviation: Conv3d 1x1 ours merged vs PEFT unmerged", ours, unmerged.astype(float64),
                  2 * gamma(depth("conv", W, A, False) + 4, U32) * M + U32 * np.abs(ours))
        with pytest.raises(RuntimeError):
            model.merge_adapter()


@pytest.mark.parametrize("name", ["lin", "c2"])
def test_dora_training_formula_with_dropout(torch, name: str) -> None:
    """PEFT's DoRA in training with dropout: y = base(x) + b + (g − 1)·base(x̃) + g·lora(x̃), not
    g·(base(x) + lora(x̃)) + b. The spec defines both (SPEC 4.3); ours with the same mask equals
    PEFT's training output."""
    model, _ = build_peft(torch, [name], True, lora_dropout=0.5)
    kind, _, shape = modules(torch.nn)[name]
    layer = peft_layer(model, name)
    x = make_input(torch, kind, shape)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) >= 0.5).float() / 0.5

    class FixedDropout(torch.nn.Module):
        def forward(self, t):
            return t * mask

    layer.lora_dropout["default"] = FixedDropout()
    model.train()
    y_train = layer(x).detach().numpy()
    W, b, A, B, m = params(layer, kind)
    s = layer.scaling["default"]
    _, built = ours_forward(kind, layer, x.numpy(), W, b, A, B, m, s)
    ours = dora.forward(built, x.numpy(), bias=b, dropout_mask=mask.numpy())
    M = magnitude_of(kind, layer, x.numpy(), W, b, A, B, m, s, built) * 2
    LOG.check(f"DoRA training formula {kind}", ours, y_train.astype(float64),
              2 * gamma(depth(kind, W, A, True), U32) * M + U32 * np.abs(ours.astype(float64)))
    # the eval formula on the dropped input is a different function
    x_drop = x.numpy() * mask.numpy()
    naive = dora.forward(built, x_drop, bias=b)
    assert np.max(np.abs(naive - y_train)) > np.max(2 * gamma(depth(kind, W, A, True), U32) * M)


# -- init methods ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [True, "gaussian"])
@pytest.mark.parametrize("name", ["lin", "c2", "emb"])
def test_init_matches_peft_bit_for_bit_given_the_draws(torch, method, name: str) -> None:
    """Re-seed, let PEFT re-initialise, re-seed, draw torch.rand / torch.randn of the same shape:
    the reference's A and B from those draws are PEFT's, bit for bit (float32, ≥ 16 elements so
    torch's vectorised sampler runs)."""
    model, _ = build_peft(torch, [name], False)
    kind, _, _ = modules(torch.nn)[name]
    layer = peft_layer(model, name)
    torch.manual_seed(5)
    layer.reset_lora_parameters("default", method)
    W, _, A, B, _ = params(layer, kind)
    torch.manual_seed(5)
    drawn_shape = B.shape if kind == "embedding" else A.shape
    draws = (torch.rand(drawn_shape) if method is True and kind != "embedding" else torch.randn(drawn_shape)).double().numpy()
    got = init_lora(kind, W, 2, 3, method="default" if method is True else method, draws=draws)
    assert np.array_equal(got.A, A) and np.array_equal(got.B, B)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_olora_match_peft_up_to_component_signs(torch, method: str) -> None:
    """PEFT decomposes in float32 with LAPACK's signs; the spec decomposes in float64 with fixed
    signs. Per component the factors agree up to sign; B A and the new base agree within the
    float32 decomposition's error (backward-stable SVD/QR: ‖E‖ ≤ c·u32·‖W‖ with c = 10·(out+in),
    amplified by at most ‖W‖/gap for the SVD's truncation)."""
    from peft import LoraConfig, get_peft_model

    nn = torch.nn
    torch.manual_seed(11)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 8)

    net = Net()
    W = net.lin.weight.detach().numpy().copy()
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], init_lora_weights=method))
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    new_base = layer.base_layer.weight.detach().numpy()
    ours = init_lora("linear", W, 3, 6, method=method)
    S = np.linalg.svd(W.astype(float64), compute_uv=False)
    amplify = 1.0 + (2 * S[0] / (S[2] - S[3]) if method == "pissa" else 0.0)
    tol = 10 * (W.shape[0] + W.shape[1]) * U32 * S[0] * amplify
    signs = np.sign(np.sum(ours.A.astype(float64) * A, axis=1))
    LOG.check(f"{method} A up to sign", ours.A, (A * signs[:, None]).astype(float64), np.full(A.shape, tol))
    LOG.check(f"{method} B up to sign", ours.B, (B * signs[None, :]).astype(float64), np.full(B.shape, tol))
    s = 2.0
    LOG.check(f"{method} s·B·A", s * ours.B.astype(float64) @ ours.A.astype(float64), s * B.astype(float64) @ A.astype(float64), np.full(W.shape, tol))
    LOG.check(f"{method} new base", ours.base, new_base.astype(float64), np.full(W.shape, tol))
