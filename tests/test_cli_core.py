"""The core CLI: inspect (table, --json, --base), merge/unmerge with and without --residual,
--dtype, and user errors: exit code 2, one line on stderr, no output file left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.cli import main
from lora_ref.config import LoraConfig
from lora_ref.dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bits_of, float64, resolve_dtype, round_to
from lora_ref.linear import LinearDelta
from lora_ref.safetensors_io import load_file, save_file

LAYERS = {"model.layers.0.self_attn.q_proj": (12, 8), "model.layers.0.mlp.down_proj": (8, 16)}


def make_model(root: Path, dtype: str = "float32", *, alpha: int = 12, r: int = 4, lora_bias: bool = False) -> tuple[Path, Path]:
    """A base checkpoint (targeted weights, biases, an untargeted weight, an int tensor) and an adapter."""
    t = resolve_dtype(dtype)
    rng = np.random.default_rng(11)
    tensors = {
        "model.embed_tokens.weight": round_to(rng.normal(size=(10, 8)), t),
        "model.position_ids": np.arange(7, dtype=np.int64),
    }
    modules = {}
    for name, (out_f, in_f) in LAYERS.items():
        tensors[f"{name}.weight"] = round_to(rng.normal(0, 0.1, (out_f, in_f)), t)
        tensors[f"{name}.bias"] = round_to(rng.normal(0, 0.1, out_f), t)
        modules[name] = LoraModule(name, A=round_to(rng.normal(size=(r, in_f)), t), B=round_to(rng.normal(size=(out_f, r)), t),
                                   lora_bias=round_to(rng.normal(size=out_f), t) if lora_bias else None)
    base = root / "base.safetensors"
    save_file(base, tensors, {"format": "pt"})
    adapter = root / "adapter"
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["q_proj", "down_proj"],
                        rank_pattern={"down_proj": r}, alpha_pattern={"down_proj": 2 * alpha}, lora_bias=lora_bias)
    save_adapter(Adapter(config, modules), adapter)
    return base, adapter


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's own errors exit through SystemExit with their code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# -- inspect --------------------------------------------------------------------------------------------


def test_inspect_json_and_base_ratio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = make_model(tmp_path, "bfloat16", alpha=12, r=4)
    code, out, err = run(["inspect", adapter, "--json", "--base", base], capsys)
    assert code == 0 and err == ""
    report = json.loads(out)
    rows = {row["module"]: row for row in report["modules"]}
    assert set(rows) == set(LAYERS)
    q, down = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.0.mlp.down_proj"]
    assert (q["r"], q["alpha"], q["scale"]) == (4, 12, 12 / 2)  # rsLoRA: alpha / sqrt(4)
    assert (down["alpha"], down["scale"]) == (24, 24 / 2)  # alpha_pattern
    assert q["shapes"] == {"A": [4, 8], "B": [12, 4]} and q["dtype"] == "bfloat16"
    expected_params = {m: 4 * i + o * 4 for m, (o, i) in LAYERS.items()}
    assert {m: rows[m]["parameters"] for m in rows} == expected_params
    assert {m: rows[m]["bytes"] for m in rows} == {m: 2 * p for m, p in expected_params.items()}
    assert report["total_parameters"] == sum(expected_params.values())
    targeted = sum(o * i * 2 for o, i in LAYERS.values())
    assert report["targeted_base_bytes"] == targeted
    assert report["size_ratio"] == pytest.approx(report["total_bytes"] / targeted, rel=1e-15)


def test_inspect_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = make_model(tmp_path)
    code, out, _ = run(["inspect", adapter, "--base", base], capsys)
    assert code == 0
    assert all(name in out for name in LAYERS) and "total: 2 modules" in out and "adapter/base" in out


# -- merge / unmerge ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_merge_unmerge_with_residual_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str) -> None:
    base, adapter = make_model(tmp_path, dtype)
    merged, residual, restored = tmp_path / "merged.safetensors", tmp_path / "res.safetensors", tmp_path / "out.safetensors"
    code, out, err = run(["merge", base, adapter, "-o", merged, "--residual", residual], capsys)
    assert code == 0 and err == "" and "residual" in out
    code, out, err = run(["unmerge", merged, adapter, "-o", restored, "--residual", residual], capsys)
    assert code == 0 and err == ""
    assert restored.read_bytes() == base.read_bytes()
    # every tensor of BASE is in MERGED; untargeted ones unchanged, targeted ones merged once
    before, after = load_file(base), load_file(merged)
    assert list(after) == list(before)
    config = LoraConfig.load(adapter)
    adapter_tensors = load_file(adapter / "adapter_model.safetensors")
    for key, tensor in before.items():
        module = key.removesuffix(".weight")
        if module in LAYERS:
            A = adapter_tensors[f"base_model.model.{module}.lora_A.weight"]
            B = adapter_tensors[f"base_model.model.{module}.lora_B.weight"]
            want = round_to(tensor.astype(float64) + LinearDelta(A, B, config.scale_for(module)).full(), tensor.dtype)
            assert np.array_equal(bits_of(after[key]), bits_of(want)), key
        else:
            assert after[key].tobytes() == tensor.tobytes() and after[key].dtype == tensor.dtype, key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_unmerge_without_residual_within_fast_bound(tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str) -> None:
    base, adapter = make_model(tmp_path, dtype)
    merged, restored = tmp_path / "merged.safetensors", tmp_path / "out.safetensors"
    assert run(["merge", base, adapter, "-o", merged], capsys)[0] == 0
    code, out, _ = run(["unmerge", merged, adapter, "-o", restored], capsys)
    assert code == 0 and "fast" in out
    before, after, merged_t = load_file(base), load_file(restored), load_file(merged)
    t = resolve_dtype(dtype)
    u = UNIT_ROUNDOFF[t] + UNIT_ROUNDOFF[float64] * (1 + UNIT_ROUNDOFF[t])
    for key in before:
        if key.removesuffix(".weight") in LAYERS:
            # SPEC 3.3 with W + Δ replaced by the merged value M (|W + Δ| <= |M| / (1 - ũ) + η)
            W, M = before[key].astype(float64), merged_t[key].astype(float64)
            bound = u * (1 + u) * (np.abs(M) / (1 - u) + SMALLEST_SUBNORMAL[t]) + u * np.abs(W) + (1 + u) * SMALLEST_SUBNORMAL[t]
            assert np.all(np.abs(after[key].astype(float64) - W) <= bound), key
        else:
            assert after[key].tobytes() == before[key].tobytes()


def test_lora_bias_merged_into_base_bias(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = make_model(tmp_path, "bfloat16", lora_bias=True)
    merged, residual, restored = tmp_path / "m.safetensors", tmp_path / "r.safetensors", tmp_path / "o.safetensors"
    assert run(["merge", base, adapter, "-o", merged, "--residual", residual], capsys)[0] == 0
    before, after = load_file(base), load_file(merged)
    config, lora = LoraConfig.load(adapter), load_file(adapter / "adapter_model.safetensors")
    for module in LAYERS:  # b' = round(b + s·lora_bias): the merged layer equals the adapted one
        lb = lora[f"base_model.model.{module}.lora_B.bias"].astype(float64)
        want = round_to(before[f"{module}.bias"].astype(float64) + config.scale_for(module) * lb, before[f"{module}.bias"].dtype)
        assert np.array_equal(bits_of(after[f"{module}.bias"]), bits_of(want)), module
    assert run(["unmerge", merged, adapter, "-o", restored, "--residual", residual], capsys)[0] == 0
    assert restored.read_bytes() == base.read_bytes()
    # a lora_bias module whose base layer has no bias cannot be merged (PEFT refuses too)
    tensors = load_file(base)
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    save_file(base, tensors)
    code, _, err = run(["merge", base, adapter, "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "model.layers.0.self_attn.q_proj.bias" in err and not (tmp_path / "x.safetensors").exists()


def test_merge_dtype_converts_then_residual_restores_converted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = make_model(tmp_path, "float32")
    merged, residual, restored = tmp_path / "m.safetensors", tmp_path / "r.safetensors", tmp_path / "o.safetensors"
    code, _, _ = run(["merge", base, adapter, "-o", merged, "--residual", residual, "--dtype", "bfloat16"], capsys)
    assert code == 0
    assert run(["unmerge", merged, adapter, "-o", restored, "--residual", residual], capsys)[0] == 0
    before, after = load_file(base), load_file(restored)
    bf16 = resolve_dtype("bfloat16")
    for key, tensor in before.items():
        if tensor.dtype == np.float32:  # converted once, then restored bit for bit
            assert after[key].dtype == bf16
            assert np.array_equal(bits_of(after[key]), bits_of(round_to(tensor.astype(float64), bf16))), key
        else:
            assert after[key].tobytes() == tensor.tobytes()


def test_console_script_entry_point(tmp_path: Path) -> None:
    base, adapter = make_model(tmp_path)
    exe = shutil.which("lora-ref", path=str(Path(sys.executable).parent)) or shutil.which("lora-ref")
    command = [exe] if exe else [sys.executable, "-m", "lora_ref"]
    done = subprocess.run([*command, "inspect", str(adapter), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(json.loads(done.stdout)["modules"]) == 2
    done = subprocess.run([*command, "merge", str(base), str(tmp_path / "nope"), "-o", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


# -- user errors --------------------------------------------------------------------------------------------


def _break(kind: str, root: Path, base: Path, adapter: Path) -> list:
    """Arguments for one user error; files are altered as needed."""
    out = root / "out.safetensors"
    if kind == "missing-adapter":
        return ["merge", base, root / "absent", "-o", out]
    if kind == "missing-base":
        return ["merge", root / "absent.safetensors", adapter, "-o", out]
    if kind == "truncated-base":
        raw = base.read_bytes()
        base.write_bytes(raw[: len(raw) // 2])
        return ["merge", base, adapter, "-o", out]
    if kind == "module-not-in-base":
        tensors = load_file(base)
        del tensors["model.layers.0.mlp.down_proj.weight"]
        save_file(base, tensors)
        return ["merge", base, adapter, "-o", out]
    if kind == "shape-mismatch":
        tensors = load_file(base)
        tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((8, 15), np.float32)
        save_file(base, tensors)
        return ["merge", base, adapter, "-o", out]
    if kind == "rank-mismatch":
        tensors = load_file(adapter / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        tensors[key] = tensors[key][:, :3]
        save_file(adapter / "adapter_model.safetensors", tensors)
        return ["merge", base, adapter, "-o", out]
    if kind == "nonfinite-adapter":
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][0, 0] = np.nan
        save_file(adapter / "adapter_model.safetensors", tensors)
        return ["merge", base, adapter, "-o", out]
    if kind == "invalid-config":
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 0}))
        return ["inspect", adapter]
    if kind == "bad-json":
        (adapter / "adapter_config.json").write_text("{")
        return ["merge", base, adapter, "-o", out]
    if kind == "bad-dtype":
        return ["merge", base, adapter, "-o", out, "--dtype", "float8"]
    if kind == "residual-of-other-adapter":
        merged, residual = root / "m.safetensors", root / "r.safetensors"
        assert main(["merge", str(base), str(adapter), "-o", str(merged), "--residual", str(residual)]) == 0
        other_root = root / "other"
        other_root.mkdir()
        _, other = make_model(other_root, alpha=5)
        return ["unmerge", merged, other, "-o", out, "--residual", residual]
    if kind == "residual-is-not-a-residual":
        merged = root / "m.safetensors"
        assert main(["merge", str(base), str(adapter), "-o", str(merged)]) == 0
        return ["unmerge", merged, adapter, "-o", out, "--residual", base]
    raise AssertionError(kind)


ERRORS = ["missing-adapter", "missing-base", "truncated-base", "module-not-in-base", "shape-mismatch", "rank-mismatch",
          "nonfinite-adapter", "invalid-config", "bad-json", "bad-dtype", "residual-of-other-adapter",
          "residual-is-not-a-residual"]


@pytest.mark.parametrize("kind", ERRORS)
def test_user_error_exit_2_one_line_no_output(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    base, adapter = make_model(tmp_path)
    argv = _break(kind, tmp_path, base, adapter)
    capsys.readouterr()
    code, out, err = run(argv, capsys)
    assert code == 2, (kind, out, err)
    assert err.count("\n") == 1 and err.startswith("lora-ref: error:"), err
    assert "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*.partial")]  # no temporary left either


def test_error_messages_name_module_and_tensor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapter = make_model(tmp_path)
    _, _, err = run(_break("module-not-in-base", tmp_path, base, adapter), capsys)
    assert "model.layers.0.mlp.down_proj.weight" in err
    (tmp_path / "b").mkdir()
    base, adapter = make_model(tmp_path / "b")
    _, _, err = run(_break("nonfinite-adapter", tmp_path / "b", base, adapter), capsys)
    assert "model.layers.0.mlp.down_proj" in err
