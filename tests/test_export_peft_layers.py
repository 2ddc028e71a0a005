"""Peer test: PEFT's Embedding, Linear + lora_bias, Conv1d/Conv2d and DoRA layers vs our ONNX graphs.

A small torch model (Embedding -> Linear with bias -> Conv1d, and a Conv2d) is exported by
torch's dynamo exporter, so the weights are found the way they are in users' graphs (name
scopes on Gather, MatMul + Add, Conv). PEFT adapters with non-zero B (lora_bias on Linear and
Conv; DoRA on every kind) are saved with ``save_pretrained`` and read by our loader; then every
site of the merged, dynamic and batched graphs in ONNX Runtime is compared with PEFT's own
layer evaluated in float64 (module.double()) on the input ORT computed there, within
lora_ref.export.parity.layer_bound: γ_K(2^-24) M + 2 γ_K(2^-53) M (SPEC E.5; the second term
covers the float64 peer's own roundings, the DoRA norm's included).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from conftest import require_peer

torch = require_peer("torch")
require_peer("peft")
require_peer("onnxruntime")

from lora_ref.adapter import load_adapter  # noqa: E402
from lora_ref.conv import ConvGeometry  # noqa: E402
from lora_ref.deltas import delta_for  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, open_session, slots_from_model  # noqa: E402
from lora_ref.export.parity import dora_gain_error, expose, layer_bound  # noqa: E402

# PEFT 0.21's save_pretrained flags every 1-D lora_B.bias as a "shard not gathered" (its check
# expects 2-D LoRA tensors); the file it writes is complete, which the tests below confirm.
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 6)
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv1d(5, 4, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, ids, img):
        h = self.proj(self.embed(ids))
        return self.conv(h.transpose(1, 2)), self.conv2(img)


KINDS = {"embed": "embedding", "proj": "linear", "conv": "conv", "conv2": "conv"}


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, 13, (3, 7)), "img": rng.standard_normal((3, 2, 4, 4)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Net().eval()
    feeds = _feeds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(copy.deepcopy(base), (torch.from_numpy(feeds["ids"]), torch.from_numpy(feeds["img"])),
                                    dynamo=True, verbose=False)
    configs = {
        "bias": LoraConfig(r=3, lora_alpha=5, target_modules=["proj", "conv", "conv2"], lora_bias=True, init_lora_weights=False),
        "dora": LoraConfig(r=2, lora_alpha=4, target_modules=list(KINDS), use_dora=True, init_lora_weights=False),
        "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "proj"], lora_bias=False, init_lora_weights=False),
    }
    peers, ours = {}, {}
    for name, config in configs.items():
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # make every trained tensor non-trivial (lora_bias and m start at 0 / ||W||)
            for key, param in model.named_parameters():
                if "lora_B.default.bias" in key or "lora_magnitude_vector" in key:
                    param.add_(0.3 * torch.randn_like(param))
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        peers[name] = model.double().eval()
        ours[name] = load_adapter(directory, name=name)
    return program.model_proto, base.double().eval(), peers, ours


def _site_tensor(graph, site) -> tuple[str, bool]:
    if site.bias_node is not None and site.bias_node != site.node:
        return graph.graph.node[site.bias_node].output[0], True
    return site.y, site.bias is not None


def _bound(base, path, x, adapter, include_bias, graph_kind="merged"):
    module = base.get_submodule(path)
    W = module.weight.detach().numpy()
    kind = KINDS[path]
    geometry = ConvGeometry(stride=module.stride, padding=module.padding, dilation=module.dilation) if kind == "conv" else None
    kwargs = {"kind": kind, "geometry": geometry, "bias": module.bias.detach().numpy() if include_bias and module.bias is not None else None}
    lora = adapter.modules.get(path) if adapter is not None else None
    gain_error = None
    if lora is not None:
        kwargs.update(A=lora.A, B=lora.B, scale=adapter.scale_for(path), lora_bias=lora.lora_bias)
        if lora.magnitude is not None:
            kwargs["gain"] = delta_for(adapter, path, base=W.astype(np.float32)).gain
            if graph_kind != "merged":  # the gain applied as its own factor: computed in the graph or gathered
                gain_error = dora_gain_error(W, lora.A, lora.B, adapter.scale_for(path), kind=kind, in_graph=graph_kind == "dynamic")
    return layer_bound(x, W, dtype=np.float32, gain_error=gain_error, **kwargs) + 2 * layer_bound(x, W, dtype=np.float64, **kwargs)


def _check(label, proto, graph, sites, run, rows, base, graph_kind="merged"):
    """rows: per batch row, (PEFT model or None for base, our Adapter or None); sites index ``proto``'s nodes."""
    names = {m: _site_tensor(proto, s) for m, ss in sites.items() for s in ss}
    session = open_session(expose(graph, [n for m, ss in sites.items() for s in ss for n in (s.x, names[m][0])]))
    values = dict(zip([o.name for o in session.session.get_outputs()], run(session)))
    worst = 0.0
    for path, module_sites in sites.items():
        for site in module_sites:
            name, include_bias = names[path]
            for row, (peer, adapter) in enumerate(rows):
                x = values[site.x][row : row + 1]
                layer = (peer.base_model.model if peer is not None else base).get_submodule(path)
                with torch.no_grad():
                    want = layer(torch.from_numpy(x if x.dtype.kind in "iu" else x.astype(np.float64))).numpy()
                if not include_bias and layer.__class__.__name__ != "Embedding":
                    bias = (layer.base_layer if hasattr(layer, "base_layer") else layer).bias
                    assert bias is None, f"{path}: the site output should hold the base bias"
                bound = _bound(base, path, x, adapter, include_bias, graph_kind)
                err = np.abs(values[name][row : row + 1].astype(np.float64) - want)
                assert np.all(err <= bound), f"{label} {path} row {row}: error/bound {np.max(err / bound):.3g}"
                worst = max(worst, float(np.max(err / bound)))
    print(f"{label}: worst error {worst:.3g} x bound")


@pytest.mark.parametrize("name", ["bias", "dora", "plain"])
def test_merged_graph_matches_peft_at_every_site(setup, name):
    proto, base, peers, ours = setup
    graph, sites = build_graph(proto, [ours[name]], "merged")
    assert {path: s[0].found_by for path, s in sites.items()} == {path: "name scopes" for path in ours[name].modules}
    feeds = _feeds(1)
    _check(f"merged {name}", proto, graph, sites, lambda s: s.session.run(None, feeds), [(peers[name], ours[name])] * 3, base)


def test_dynamic_and_batched_embedding_conv_and_lora_bias_match_peft(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    proto, base, peers, ours = setup
    # The "bias" adapter on proj only, next to the embedding adapter, and the full "bias" adapter
    # (Conv1d stride 2 and Conv2d padding 1 LoRA with lora_bias on proj and both convs).
    biased_dir = tmp_path / "proj_bias"
    model = get_peft_model(copy.deepcopy(base).float(), LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_bias=True,
                                                                  init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].bias.add_(0.5)
    model.save_pretrained(biased_dir)
    biased_peer, biased = model.double().eval(), load_adapter(biased_dir, name="proj_bias")
    plain_peer, plain = peers["plain"], ours["plain"]
    feeds = _feeds(2)
    graph, sites = build_graph(proto, [plain, biased, ours["bias"]], "dynamic")
    slots = slots_from_model(graph)
    for peer, adapter in ((plain_peer, plain), (biased_peer, biased), (peers["bias"], ours["bias"]), (None, None)):
        tensors = adapter_tensors(adapter, slots) if adapter is not None else {}
        _check(f"dynamic {adapter.name if adapter else 'none'}", proto, graph, sites,
               lambda s, t=tensors: s.session.run(None, {**feeds, **t}), [(peer, adapter)] * 3, base)
    graph, sites = build_graph(proto, [plain, biased, ours["bias"]], "batched")
    _check("batched rows bias, plain, base", proto, graph, sites, lambda s: s.run_batched(feeds, [2, 0, -1]),
           [(peers["bias"], ours["bias"]), (plain_peer, plain), (None, None)], base)
    _check("batched rows proj_bias, bias, plain", proto, graph, sites, lambda s: s.run_batched(feeds, [1, 2, 0]),
           [(biased_peer, biased), (peers["bias"], ours["bias"]), (plain_peer, plain)], base)


def test_dynamic_and_batched_dora_match_peft(setup, tmp_path):
    """PEFT DoRA on every kind (Embedding, Linear, Conv1d, Conv2d; PEFT's own layer in float64 is the oracle): one
    dynamic session switching DoRA -> plain -> base, and batched rows of two DoRA adapters, plain and -1."""
    from peft import LoraConfig, get_peft_model

    proto, base, peers, ours = setup
    doras = []
    for seed, r in ((1, 2), (2, 3)):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base).float(), LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=list(KINDS),
                                                                      use_dora=True, init_lora_weights=False))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_magnitude_vector" in key:
                    param.add_(0.3 * torch.randn_like(param))
        directory = tmp_path / f"dora{seed}"
        model.save_pretrained(directory)
        doras.append((model.double().eval(), load_adapter(directory, name=f"dora{seed}")))
    plain = (peers["plain"], ours["plain"])
    feeds = _feeds(3)
    graph, sites = build_graph(proto, [doras[0][1], doras[1][1], plain[1]], "dynamic")
    slots = slots_from_model(graph)
    for peer, adapter in (*doras, plain, (None, None)):
        tensors = adapter_tensors(adapter, slots) if adapter is not None else {}
        _check(f"dynamic {adapter.name if adapter else 'none'}", proto, graph, sites,
               lambda s, t=tensors: s.session.run(None, {**feeds, **t}), [(peer, adapter)] * 3, base, "dynamic")
    graph, sites = build_graph(proto, [doras[0][1], doras[1][1], plain[1]], "batched")
    _check("batched rows dora2, base, dora1", proto, graph, sites, lambda s: s.run_batched(feeds, [1, -1, 0]),
           [doras[1], (None, None), doras[0]], base, "batched")
    _check("batched rows plain, dora1, dora2", proto, graph, sites, lambda s: s.run_batched(feeds, [2, 0, 1]),
           [plain, doras[0], doras[1]], base, "batched")
