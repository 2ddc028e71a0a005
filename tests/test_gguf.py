"""GGUF (llama.cpp) adapters and models: to-gguf, verify-gguf, merge/unmerge (SPEC G).

Oracles independent of lora_ref.gguf_*: files are read back with gguf.GGUFReader directly, the
scale llama.cpp applies is recomputed here from its get_scale formula (float32 alpha / rank;
alpha = 0 means 1), the q/k row permutation by an explicit index loop (LlamaModel.permute's
definition), PEFT's scale from the config by hand, everything in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_ref.adapter import Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.cli import main
from lora_ref.config import LoraConfig
from lora_ref.errors import LoraRefError, NonFiniteError

from conftest import require_peer

gguf = require_peer("gguf")

from lora_ref.gguf_adapter import to_gguf, verify_gguf  # noqa: E402
from lora_ref.gguf_checkpoint import merge_gguf, unmerge_gguf  # noqa: E402
from lora_ref.gguf_model import GgufUnsupportedError, QuantizedTensorError  # noqa: E402

E, H, KV, HD, FF, V, LAYERS = 64, 4, 2, 16, 96, 40, 2
U32 = 2.0**-24
SHAPES = {"q_proj": (H * HD, E), "k_proj": (KV * HD, E), "v_proj": (KV * HD, E), "o_proj": (E, H * HD),
          "gate_proj": (FF, E), "up_proj": (FF, E), "down_proj": (E, FF)}
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
Q = gguf.GGMLQuantizationType


def hf_module(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{proj}"


def permute_rows(M: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute by its definition: gguf row h·d + 2i + j holds HF row h·d + j·d/2 + i."""
    d = M.shape[0] // n_head
    out = np.empty_like(M)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = M[h * d + j * (d // 2) + i]
    return out


def hf_to_gguf_rows(proj: str, M: np.ndarray) -> np.ndarray:
    return permute_rows(M, H) if proj == "q_proj" else permute_rows(M, KV) if proj == "k_proj" else M


def write_base(path: Path, rng: np.random.Generator, types: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """A tiny llama GGUF (random weights in GGUF layout); returns the float64 value of each tensor."""
    types = types or {}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(FF)
    writer.add_context_length(64)
    writer.add_string("general.name", "tiny")
    values = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        x = rng.standard_normal(shape).astype(np.float32)
        kind = types.get(name, "F32")
        if kind == "F16":
            x = x.astype(np.float16)
            writer.add_tensor(name, x)
        elif kind == "BF16":
            x = x.astype(ml_dtypes.bfloat16)
            writer.add_tensor(name, x.view(np.uint8), raw_dtype=Q.BF16)
        elif kind in ("Q8_0", "Q4_0"):
            blocks = gguf.quantize(x, getattr(Q, kind))
            writer.add_tensor(name, blocks, raw_dtype=getattr(Q, kind))
            x = gguf.dequantize(blocks, getattr(Q, kind))
        else:
            writer.add_tensor(name, x)
        values[name] = np.asarray(x, dtype=np.float64)

    add("token_embd.weight", (V, E))
    for layer in range(LAYERS):
        add(f"blk.{layer}.attn_norm.weight", (E,))
        for proj, shape in SHAPES.items():
            add(f"blk.{layer}.{GGUF_NAME[proj]}.weight", shape)
    add("output.weight", (V, E))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def make_adapter(rng: np.random.Generator, config: LoraConfig, projs=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                 magnitude: float = 0.05) -> Adapter:
    modules = {}
    for layer in range(LAYERS):
        for proj in projs:
            name = hf_module(layer, proj)
            r = config.rank_for(name)
            out, inp = SHAPES[proj]
            modules[name] = LoraModule(name, (rng.standard_normal((r, inp)) * magnitude).astype(np.float32),
                                       (rng.standard_normal((out, r)) * magnitude).astype(np.float32))
    return Adapter(config, modules)


def read_pairs(path: Path) -> tuple[float | None, dict[str, tuple[np.ndarray, np.ndarray]], gguf.GGUFReader]:
    reader = gguf.GGUFReader(path)
    field = reader.get_field("adapter.lora.alpha")
    alpha = None if field is None else float(field.contents())
    tensors = {}
    for t in reader.tensors:
        assert t.tensor_type == Q.F32
        tensors[t.name] = np.asarray(t.data, dtype=np.float64).reshape([int(d) for d in reversed(t.shape.tolist())])
    pairs = {n[: -len(".lora_a")]: (tensors[n], tensors[n[: -len(".lora_a")] + ".lora_b"]) for n in tensors if n.endswith(".lora_a")}
    return alpha, pairs, reader


def llama_scale(alpha: float | None, b: np.ndarray) -> float:
    """llama_adapter_lora_weight::get_scale with adapter_scale 1: rank is lora_b's ne[0]."""
    if not alpha:
        return 1.0
    return float(np.float32(alpha) / np.float32(b.shape[1]))


CONFIGS = {
    "plain": (LoraConfig(r=8, lora_alpha=16, target_modules=list(SHAPES)), lambda m: 16 / 8),
    "rslora": (LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=list(SHAPES)), lambda m: 16 / math.sqrt(8)),
    "patterns": (LoraConfig(r=8, lora_alpha=16, target_modules=list(SHAPES), rank_pattern={"k_proj": 4},
                            alpha_pattern={"v_proj": 3, "layers.1.self_attn.o_proj": 40}),
                 lambda m: 16 / 4 if m.endswith("k_proj") else 3 / 8 if m.endswith("v_proj")
                 else 40 / 8 if m == "model.layers.1.self_attn.o_proj" else 16 / 8),
    "rslora_patterns": (LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=list(SHAPES), rank_pattern={"q_proj": 2}),
                        lambda m: 16 / math.sqrt(2) if m.endswith("q_proj") else 16 / math.sqrt(8)),
    "alpha0": (LoraConfig(r=8, lora_alpha=16, target_modules=list(SHAPES), alpha_pattern={"o_proj": 0}),
               lambda m: 0.0 if m.endswith("o_proj") else 2.0),
    "all_alpha0": (LoraConfig(r=8, lora_alpha=0, target_modules=list(SHAPES)), lambda m: 0.0),
}


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_llama_cpp_applies_peft_effect(tmp_path: Path, variant: str) -> None:
    """ΔW as llama.cpp computes it from the file = PEFT's s·B·A (rows permuted for q/k), for every module.

    Bound: the file's factors are PEFT's (float32 sources, float32 file) except a folded B, one
    float32 rounding (u_32) of c·B; llama.cpp's scale is float32 arithmetic (≤ 2u_32 + u_32²);
    the float64 sums here add ≤ 2γ_r(64). So |ΔW_llama − ΔW_peft| ≤ 4u_32 · |s| (|B||A|).
    """
    rng = np.random.default_rng(1)
    write_base(tmp_path / "base.gguf", rng)
    config, scale_of = CONFIGS[variant]
    adapter = make_adapter(rng, config, projs=tuple(SHAPES))
    save_adapter(adapter, tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    to_gguf(adapter, tmp_path / "base.gguf", tmp_path / "a.gguf")
    alpha, pairs, reader = read_pairs(tmp_path / "a.gguf")
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("general.architecture").contents() == "llama"
    assert alpha not in (None, 0.0)  # llama.cpp would read 0 as scale 1
    assert len(pairs) == len(adapter.modules)
    for layer in range(LAYERS):
        for proj in SHAPES:
            name = hf_module(layer, proj)
            lora = adapter.modules[name]
            a, b = pairs[f"blk.{layer}.{GGUF_NAME[proj]}.weight"]
            got = llama_scale(alpha, b) * (b @ a)
            s = scale_of(name)
            B = hf_to_gguf_rows(proj, lora.B.astype(np.float64))
            want = s * (B @ lora.A.astype(np.float64))
            bound = 4 * U32 * abs(s) * (np.abs(B) @ np.abs(lora.A.astype(np.float64)))
            assert np.all(np.abs(got - want) <= bound), (variant, name)
            np.testing.assert_array_equal(a, lora.A)  # A is never changed
    if variant in ("plain", "rslora"):  # uniform: the file alpha carries everything, B is PEFT's
        for layer in range(LAYERS):
            for proj in SHAPES:
                _, b = pairs[f"blk.{layer}.{GGUF_NAME[proj]}.weight"]
                np.testing.assert_array_equal(b, hf_to_gguf_rows(proj, adapter.modules[hf_module(layer, proj)].B))
    assert verify_gguf(adapter, tmp_path / "a.gguf", tmp_path / "base.gguf").ok


def write_like_vendored_converter(adapter: Adapter, path: Path) -> None:
    """What llama.cpp's convert_lora_to_gguf.py writes: alpha = lora_alpha, factors as they are (q/k permuted)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(adapter.config.lora_alpha))
    for name, lora in adapter.modules.items():
        layer, proj = int(name.split(".")[2]), name.split(".")[-1]
        stem = f"blk.{layer}.{GGUF_NAME[proj]}.weight"
        writer.add_tensor(stem + ".lora_a", lora.A.astype(np.float32))
        writer.add_tensor(stem + ".lora_b", hf_to_gguf_rows(proj, lora.B).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_verify_flags_what_the_vendored_converter_loses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    write_base(tmp_path / "base.gguf", rng)
    plain = make_adapter(rng, LoraConfig(r=8, lora_alpha=16, target_modules=list(SHAPES)))
    write_like_vendored_converter(plain, tmp_path / "plain.gguf")
    assert verify_gguf(plain, tmp_path / "plain.gguf", tmp_path / "base.gguf").ok  # plain LoRA converts fine

    rs = Adapter(LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=list(SHAPES)), plain.modules)
    write_like_vendored_converter(rs, tmp_path / "rs.gguf")
    report = verify_gguf(rs, tmp_path / "rs.gguf", tmp_path / "base.gguf")
    assert not report.ok
    assert {m.status for m in report.modules} == {"scale mismatch"}
    for m in report.modules:  # llama.cpp: 16/8; PEFT: 16/sqrt(8)
        assert m.implied_ratio == pytest.approx(1 / math.sqrt(8), rel=1e-6)

    pattern = Adapter(LoraConfig(r=8, lora_alpha=16, alpha_pattern={"v_proj": 4}, target_modules=list(SHAPES)), plain.modules)
    write_like_vendored_converter(pattern, tmp_path / "pattern.gguf")
    report = verify_gguf(pattern, tmp_path / "pattern.gguf", tmp_path / "base.gguf")
    flagged = {m.module for m in report.modules if m.status != "ok"}
    assert flagged == {hf_module(layer, "v_proj") for layer in range(LAYERS)}

    save_adapter(rs, tmp_path / "a")
    capsys.readouterr()
    assert main(["verify-gguf", str(tmp_path / "a"), str(tmp_path / "rs.gguf"), "--base", str(tmp_path / "base.gguf"), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is False and {m["status"] for m in printed["modules"]} == {"scale mismatch"}
    assert main(["to-gguf", str(tmp_path / "a"), "--base", str(tmp_path / "base.gguf"), "-o", str(tmp_path / "ours.gguf")]) == 0
    assert main(["verify-gguf", str(tmp_path / "a"), str(tmp_path / "ours.gguf"), "--base", str(tmp_path / "base.gguf")]) == 0


def test_verify_reports_missing_extra_and_unpermuted(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_base(tmp_path / "base.gguf", rng)
    adapter = make_adapter(rng, LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES)), projs=("q_proj", "v_proj"))
    save_adapter(adapter, tmp_path / "ad")
    small = Adapter(adapter.config, {k: v for k, v in adapter.modules.items() if "layers.0" in k})
    write_like_vendored_converter(small, tmp_path / "half.gguf")
    report = verify_gguf(adapter, tmp_path / "half.gguf", tmp_path / "base.gguf")
    assert sorted(m.module for m in report.modules if m.status == "missing") == [hf_module(1, "q_proj"), hf_module(1, "v_proj")]
    other = Adapter(adapter.config, {k: v for k, v in adapter.modules.items() if "layers.1" not in k})
    assert verify_gguf(other, tmp_path / "half.gguf", tmp_path / "base.gguf").ok
    only_v = Adapter(adapter.config, {k: v for k, v in other.modules.items() if k.endswith("v_proj")})
    report = verify_gguf(only_v, tmp_path / "half.gguf", tmp_path / "base.gguf")
    assert report.extra == ["blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"] and not report.ok
    # a file whose q rows were not permuted: llama.cpp would apply a different ΔW, not a rescaled one
    writer = gguf.GGUFWriter(tmp_path / "noperm.gguf", "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    lora = other.modules[hf_module(0, "q_proj")]
    writer.add_tensor("blk.0.attn_q.weight.lora_a", lora.A)
    writer.add_tensor("blk.0.attn_q.weight.lora_b", lora.B)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    only_q = Adapter(adapter.config, {lora.name: lora})
    (check,) = verify_gguf(only_q, tmp_path / "noperm.gguf", tmp_path / "base.gguf").modules
    assert check.status == "values differ"


def test_refusals_name_the_module(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    values = write_base(tmp_path / "base.gguf", rng)
    base = make_adapter(rng, LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES)), projs=("q_proj",))
    # PEFT's save_embedding_layers copy of a base weight: accepted when it is the base's tensor, else refused
    v = make_adapter(rng, base.config, projs=("v_proj",))
    key = f"base_model.model.{hf_module(0, 'v_proj')}.base_layer.weight"
    same = Adapter(v.config, v.modules, extra_tensors={key: values["blk.0.attn_v.weight"].astype(np.float32)})
    to_gguf(same, tmp_path / "base.gguf", tmp_path / "ok.gguf")
    other = Adapter(v.config, v.modules, extra_tensors={key: values["blk.0.attn_v.weight"].astype(np.float32) + 1})
    with pytest.raises(GgufUnsupportedError, match="differs from blk.0.attn_v.weight"):
        to_gguf(other, tmp_path / "base.gguf", tmp_path / "x.gguf")
    name = hf_module(0, "q_proj")
    dora = Adapter(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=list(SHAPES)),
                   {name: LoraModule(name, base.modules[name].A, base.modules[name].B, magnitude=np.ones(H * HD, np.float32))})
    with pytest.raises(GgufUnsupportedError, match=f"{name}: DoRA"):
        to_gguf(dora, tmp_path / "base.gguf", tmp_path / "x.gguf")
    bias = Adapter(LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=list(SHAPES)),
                   {name: LoraModule(name, base.modules[name].A, base.modules[name].B, lora_bias=np.ones(H * HD, np.float32))})
    with pytest.raises(GgufUnsupportedError, match=f"{name}: lora_bias"):
        to_gguf(bias, tmp_path / "base.gguf", tmp_path / "x.gguf")
    saved = Adapter(base.config, base.modules, extra_tensors={"base_model.model.lm_head.modules_to_save.default.weight": np.ones((V, E), np.float32)})
    with pytest.raises(GgufUnsupportedError, match="modules_to_save"):
        to_gguf(saved, tmp_path / "base.gguf", tmp_path / "x.gguf")
    with pytest.raises(GgufUnsupportedError, match="modules_to_save"):
        merge_gguf(tmp_path / "base.gguf", saved, tmp_path / "x.gguf")
    wrong = Adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]),
                    {"model.layers.0.mlp.fc": LoraModule("model.layers.0.mlp.fc", base.modules[name].A, base.modules[name].B)})
    with pytest.raises(LoraRefError, match="model.layers.0.mlp.fc"):
        to_gguf(wrong, tmp_path / "base.gguf", tmp_path / "x.gguf")
    huge = Adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"layers.1.self_attn.q_proj": 1e300}, target_modules=list(SHAPES)),
                   make_adapter(rng, base.config, projs=("q_proj",)).modules)
    with pytest.raises(NonFiniteError, match="model.layers.1.self_attn.q_proj: lora_b"):  # folding overflows float32
        to_gguf(huge, tmp_path / "base.gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def ulp(v: np.ndarray, kind: str) -> np.ndarray:
    """The spacing of type ``kind`` at |v| (subnormal spacing below the normal range)."""
    p, min_exp = {"F32": (24, -126), "F16": (11, -14), "BF16": (8, -126)}[kind]
    exponent = np.maximum(np.floor(np.log2(np.maximum(np.abs(v), 2.0**min_exp))), min_exp)
    return 2.0 ** (exponent - (p - 1))


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_gguf_merge_is_correctly_rounded_and_unmerge_is_bit_exact(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(5)
    types = {f"blk.{layer}.{GGUF_NAME[p]}.weight": kind for layer in range(LAYERS) for p in SHAPES}
    values = write_base(tmp_path / "base.gguf", rng, types)
    adapter = make_adapter(rng, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=list(SHAPES)))
    save_adapter(adapter, tmp_path / "ad")
    code = main(["merge", str(tmp_path / "base.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "m.gguf"),
                 "--residual", str(tmp_path / "r.safetensors")])
    assert code == 0
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[kind]
    merged = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    s = 8 / math.sqrt(4)  # alpha / sqrt(r), rsLoRA
    for name, lora in adapter.modules.items():
        layer, proj = int(name.split(".")[2]), name.split(".")[-1]
        key = f"blk.{layer}.{GGUF_NAME[proj]}.weight"
        t = merged[key]
        assert t.tensor_type.name == kind
        got = np.asarray(t.data).view(dtype).reshape(values[key].shape) if kind == "BF16" else np.asarray(t.data)
        exact = values[key] + s * (hf_to_gguf_rows(proj, lora.B.astype(np.float64)) @ lora.A.astype(np.float64))
        # one rounding: within half an ulp (of t at the result) of W + ΔW, up to the float64 evaluation (2^-40 slack)
        err = np.abs(got.astype(np.float64) - exact)
        assert np.all(err <= 0.5 * ulp(got.astype(np.float64), kind) * (1 + 2**-40)), (kind, name)
    assert main(["unmerge", str(tmp_path / "m.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "u.gguf"),
                 "--residual", str(tmp_path / "r.safetensors")]) == 0
    assert (tmp_path / "u.gguf").read_bytes() == (tmp_path / "base.gguf").read_bytes()
    # an exact merge unmerged without its residual needs --fast; merged twice is refused; another adapter is refused
    assert main(["unmerge", str(tmp_path / "m.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "f.gguf")]) == 2
    assert main(["unmerge", str(tmp_path / "m.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "f.gguf"), "--fast"]) == 0
    assert main(["merge", str(tmp_path / "m.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "mm.gguf")]) == 2
    other = make_adapter(rng, adapter.config)
    save_adapter(other, tmp_path / "other")
    assert main(["unmerge", str(tmp_path / "m.gguf"), str(tmp_path / "other"), "-o", str(tmp_path / "x.gguf")]) == 2


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_quantized_targets_refused_then_requantized_with_a_report(tmp_path: Path, kind: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(6)
    values = write_base(tmp_path / "base.gguf", rng, {"blk.0.ffn_down.weight": kind, "blk.1.attn_output.weight": kind})
    adapter = make_adapter(rng, LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES)), magnitude=0.2)
    with pytest.raises(QuantizedTensorError, match=kind):
        merge_gguf(tmp_path / "base.gguf", adapter, tmp_path / "m.gguf")
    with pytest.raises(GgufUnsupportedError, match="bit for bit"):
        merge_gguf(tmp_path / "base.gguf", adapter, tmp_path / "m.gguf", requantize=True, residual_path=tmp_path / "r.safetensors")
    report = merge_gguf(tmp_path / "base.gguf", adapter, tmp_path / "m.gguf", requantize=True)
    assert sorted(report.requantized) == ["blk.0.ffn_down.weight", "blk.1.attn_output.weight"]
    merged = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for key, proj, layer in (("blk.0.ffn_down.weight", "down_proj", 0), ("blk.1.attn_output.weight", "o_proj", 1)):
        lora = adapter.modules[hf_module(layer, proj)]
        target = values[key] + 2.0 * (lora.B.astype(np.float64) @ lora.A.astype(np.float64))
        t = merged[key]
        assert t.tensor_type.name == kind
        got = gguf.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        # one block of 32 holds q·d with d = amax/127 (Q8_0) or amax/8 (Q4_0), d rounded to f16:
        # |error| ≤ d/2 + 127|d − fl16(d)| ≤ d (each element), with d from the block's amax
        blocks = np.abs(target).reshape(target.shape[0], -1, 32).max(axis=2, keepdims=True)
        d = blocks / (127 if kind == "Q8_0" else 8)
        assert np.all(np.abs(got - target).reshape(d.shape[0], -1, 32) <= d * (1 + 2**-10))
        info = report.requantized[key]
        err = got - target
        assert info["max_abs_error"] == pytest.approx(np.max(np.abs(err)), rel=1e-9)
        delta = target - values[key]
        assert info["error_over_effect"] == pytest.approx(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(delta**2)), rel=1e-9)
    save_adapter(adapter, tmp_path / "ad")
    assert main(["merge", str(tmp_path / "base.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "c.gguf"), "--requantize"]) == 0
    assert "requantized blk.0.ffn_down.weight" in capsys.readouterr().out
    # unmerging a requantized model needs --requantize too, and is reported the same way
    assert main(["unmerge", str(tmp_path / "c.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "u.gguf")]) == 2
    back = unmerge_gguf(tmp_path / "c.gguf", adapter, tmp_path / "u.gguf", requantize=True)
    assert sorted(back.requantized) == sorted(report.requantized)
    for key, info in back.requantized.items():  # back near the base: within two requantizations of it
        t = {t.name: t for t in gguf.GGUFReader(tmp_path / "u.gguf").tensors}[key]
        got = gguf.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert info["type"] == kind and np.max(np.abs(got - values[key])) <= report.requantized[key]["max_abs_error"] + info["max_abs_error"] + 1e-12


def test_peft_llama_adapter_through_gguf_matches_peft_delta(torch, tmp_path: Path) -> None:
    """Independent oracle: a real PEFT adapter on a tiny transformers Llama; the base GGUF written as
    convert_hf_to_gguf.py does (gguf's own name map, LlamaModel.permute on q/k in torch); llama.cpp's
    ΔW from our file vs PEFT's get_delta_weight, permuted the converter's way.

    Bound: PEFT's float32 get_delta_weight rounds B·A (γ_r u_32 |B||A|) and the scaling (u_32); our
    file adds ≤ 3u_32 (scale arithmetic, folded B): |ΔW_llama − ΔW_peft| ≤ (r + 6) u_32 |s| (|B||A|).
    """
    transformers, peft = require_peer("transformers"), require_peer("peft")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()

    def permute(weights, n_head: int, n_head_kv: int | None):  # convert_hf_to_gguf.py LlamaModel.permute
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    def to_gguf_layout(name: str, w):
        if name.endswith("q_proj.weight"):
            return permute(w, H, H)
        if name.endswith("k_proj.weight"):
            return permute(w, H, KV)
        return w

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    writer = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    for name, w in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), to_gguf_layout(name, w).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    lcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=[*SHAPES, "embed_tokens", "lm_head"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0, "layers.1.mlp.up_proj": 0.0})
    pm = peft.get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, param in pm.named_parameters():
            if "lora_" in pname:  # both factors random (PEFT's init zeroes one of them)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    pm.save_pretrained(tmp_path / "ad")
    to_gguf(load_adapter(tmp_path / "ad"), tmp_path / "base.gguf", tmp_path / "a.gguf")
    alpha, pairs, _ = read_pairs(tmp_path / "a.gguf")
    checked = 0
    for name, layer in pm.named_modules():
        if not hasattr(layer, "get_delta_weight") or "default" not in getattr(layer, "scaling", {}):
            continue
        hf = name.removeprefix("base_model.model.") + ".weight"
        embedding = "default" in layer.lora_embedding_A
        a, b = pairs[names.get_name(hf, try_suffixes=(".weight",))]
        with torch.no_grad():
            want = to_gguf_layout(hf, layer.get_delta_weight("default")).double().numpy()
            if embedding:  # ΔW [vocab, embd] = s (B A)^T; llama.cpp: scale · a b^T
                A, B = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
                magnitude = (A.abs().T @ B.abs().T).numpy() * layer.scaling["default"]
                got = llama_scale(alpha, b) * (a @ b.T)
            else:
                A, B = layer.lora_A["default"].weight.double(), to_gguf_layout(hf, layer.lora_B["default"].weight.double())
                magnitude = (B.abs() @ A.abs()).numpy() * layer.scaling["default"]
                got = llama_scale(alpha, b) * (b @ a)
        r = A.shape[0]
        assert np.all(np.abs(got - want) <= (r + 6) * U32 * abs(magnitude)), name
        checked += 1
    assert checked == LAYERS * len(SHAPES) + 2  # + embed_tokens, lm_head


def test_core_and_cli_import_without_gguf() -> None:
    """`gguf` is optional: importing lora_ref and building the CLI never loads it."""
    import subprocess
    import sys

    code = ("import sys; import lora_ref, lora_ref.gguf_model, lora_ref.gguf_adapter, lora_ref.gguf_checkpoint; "
            "from lora_ref.cli import build_parser; build_parser(); assert 'gguf' not in sys.modules, 'gguf imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_refuses_to_overwrite_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(8)
    write_base(tmp_path / "base.gguf", rng)
    adapter = make_adapter(rng, LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES)), projs=("v_proj",))
    save_adapter(adapter, tmp_path / "ad")
    before = (tmp_path / "base.gguf").read_bytes()
    assert main(["to-gguf", str(tmp_path / "ad"), "--base", str(tmp_path / "base.gguf"), "-o", str(tmp_path / "base.gguf")]) == 2
    assert main(["merge", str(tmp_path / "base.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "base.gguf")]) == 2
    assert main(["merge", str(tmp_path / "base.gguf"), str(tmp_path / "ad"), "--in-place", "--residual",
                 str(tmp_path / "r.safetensors")]) == 2
    assert (tmp_path / "base.gguf").read_bytes() == before
    capsys.readouterr()  # a file without a lora-ref record unmerges with a note (lora_ref.provenance's rule)
    assert main(["unmerge", str(tmp_path / "base.gguf"), str(tmp_path / "ad"), "-o", str(tmp_path / "u.gguf")]) == 0
    assert "has no lora-ref merge record" in capsys.readouterr().err


@pytest.mark.parametrize("arch, module, tensor, shape", [
    ("qwen2", "model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", (H * HD, E)),
    ("gemma", "model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", (KV * HD, E)),
    ("phi3", "model.layers.1.self_attn.qkv_proj", "blk.1.attn_qkv.weight", ((H + 2 * KV) * HD, E)),
    ("phi3", "model.layers.0.mlp.gate_up_proj", "blk.0.ffn_up.weight", (2 * FF, E)),
])
def test_other_architectures_keep_hf_rows(tmp_path: Path, arch: str, module: str, tensor: str, shape: tuple[int, int]) -> None:
    """qwen2, gemma and phi3 GGUFs store HF's rows (no rotary permutation); phi3 keeps HF's fused qkv / gate_up."""
    rng = np.random.default_rng(9)
    writer = gguf.GGUFWriter(tmp_path / "base.gguf", arch)
    writer.add_block_count(LAYERS)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_tensor(tensor, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    lora = LoraModule(module, rng.standard_normal((4, shape[1])).astype(np.float32), rng.standard_normal((shape[0], 4)).astype(np.float32))
    adapter = Adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[module.split(".")[-1]]), {module: lora})
    to_gguf(adapter, tmp_path / "base.gguf", tmp_path / "a.gguf")
    alpha, pairs, reader = read_pairs(tmp_path / "a.gguf")
    assert reader.get_field("general.architecture").contents() == arch and alpha == 8.0
    a, b = pairs[tensor]
    np.testing.assert_array_equal(a, lora.A)
    np.testing.assert_array_equal(b, lora.B)


@pytest.mark.parametrize("outtype", ["float16", "bfloat16"])
def test_half_precision_adapters_verify_within_their_rounding(tmp_path: Path, outtype: str) -> None:
    """An F16/BF16 file verifies (its bound has u_16 / u_bf16), and one element moved by 1% of the factor does not."""
    rng = np.random.default_rng(10)
    write_base(tmp_path / "base.gguf", rng)
    adapter = make_adapter(rng, CONFIGS["patterns"][0])
    to_gguf(adapter, tmp_path / "base.gguf", tmp_path / "a.gguf", outtype=outtype)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F16" if outtype == "float16" else "BF16"}
    report = verify_gguf(adapter, tmp_path / "a.gguf", tmp_path / "base.gguf")
    assert report.ok, [m for m in report.modules if m.status != "ok"]
    # corrupt one element of one lora_a in place: verify must catch it and name the module
    data = tmp_path / "a.gguf"
    target = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight.lora_a")
    raw = bytearray(data.read_bytes())
    width = 2
    value = np.frombuffer(raw[target.data_offset:target.data_offset + width], np.float16 if outtype == "float16" else ml_dtypes.bfloat16)[0]
    bumped = np.array([float(value) * 1.01 + 1e-3], dtype=np.float16 if outtype == "float16" else ml_dtypes.bfloat16)
    raw[target.data_offset:target.data_offset + width] = bumped.tobytes()
    del reader, target
    data.write_bytes(bytes(raw))
    bad = [m for m in verify_gguf(adapter, data, tmp_path / "base.gguf").modules if m.status != "ok"]
    assert [(m.module, m.status) for m in bad] == [(hf_module(1, "v_proj"), "values differ")]
