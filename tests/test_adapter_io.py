"""PEFT adapter files without torch: layout, bitwise round trip, and refusals (pickles, missing
keys, rank mismatches, config/file disagreement) with typed errors naming module and tensor."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import PREFIX, WEIGHTS_NAME, Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.config import CONFIG_NAME, LoraConfig
from lora_ref.dtypes import bits_of, resolve_dtype, round_to
from lora_ref.errors import ConfigError, DTypeError, FileFormatError, LoraRefError, ShapeError, UnsafeFileError
from lora_ref.safetensors_io import load_file, save_file

STORAGE = ["float32", "float16", "bfloat16"]
MODULE_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
                "transformer.h.0.attn.c_attn", "lm_head"]


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    dtype = resolve_dtype(draw(st.sampled_from(STORAGE)))
    names = draw(st.lists(st.sampled_from(MODULE_NAMES), min_size=1, max_size=4, unique=True))
    r = draw(st.integers(1, 6))
    rank_pattern = {"v_proj": draw(st.integers(1, 6))} if draw(st.booleans()) else {}
    lora_bias = draw(st.booleans())
    config = LoraConfig(r=r, lora_alpha=draw(st.integers(1, 64)), use_rslora=draw(st.booleans()),
                        target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}), rank_pattern=rank_pattern,
                        lora_bias=lora_bias, fan_in_fan_out=draw(st.booleans()),
                        alpha_pattern={"down_proj": 3} if draw(st.booleans()) else {})
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    modules = {}
    for name in names:
        rank = config.rank_for(name)
        out_f, in_f = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        modules[name] = LoraModule(
            name,
            A=round_to(rng.normal(size=(rank, in_f)), dtype),
            B=round_to(rng.normal(size=(out_f, rank)), dtype),
            lora_bias=round_to(rng.normal(size=out_f), dtype) if lora_bias else None,
        )
    if draw(st.booleans()):  # a modules_to_save copy, keyed as PEFT 0.21.2 saves it (wrapper names stripped)
        config.extra["modules_to_save"] = ["score"]
        extra = {"base_model.model.score.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    else:
        extra = {}
    return Adapter(config, modules, extra_tensors=extra)


@given(adapter=adapters())
def test_peft_layout_round_trip_bitwise(tmp_path_factory: pytest.TempPathFactory, adapter: Adapter) -> None:
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(adapter, directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    # PEFT's key layout, read back with the plain safetensors reader
    keys = set(load_file(directory / WEIGHTS_NAME))
    expected = set(adapter.extra_tensors)
    for name, module in adapter.modules.items():
        expected |= {f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"}
        if module.lora_bias is not None:
            expected.add(f"{PREFIX}{name}.lora_B.bias")
    assert keys == expected
    loaded = load_adapter(directory)
    assert loaded.config == adapter.config
    assert set(loaded.modules) == set(adapter.modules)
    for name, module in adapter.modules.items():
        got = loaded.modules[name]
        assert got.kind == "linear"
        for field, array in module.arrays().items():
            assert got.arrays()[field].dtype == array.dtype
            assert np.array_equal(bits_of(got.arrays()[field]), bits_of(array)), (name, field)
        assert loaded.scale_for(name) == adapter.scale_for(name)
    assert set(loaded.extra_tensors) == set(adapter.extra_tensors)


def _write(directory: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config if config is not None else {"r": 2, "target_modules": ["q"]}))
    return directory


def _pair(module: str = "m.q", r: int = 2, r_b: int | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    return {f"{PREFIX}{module}.lora_A.weight": np.ones((r, 3), dtype),
            f"{PREFIX}{module}.lora_B.weight": np.ones((4, r if r_b is None else r_b), dtype)}


class _Boom:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    (directory / CONFIG_NAME).write_text(json.dumps({"r": 2}))
    with pytest.raises(UnsafeFileError, match="adapter_model.bin"):
        load_adapter(directory)
    assert not marker.exists()


def test_safetensors_preferred_over_a_pickle_beside_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = _write(tmp_path / "adapter", _pair())
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    assert set(load_adapter(directory).modules) == {"m.q"} and not marker.exists()


@pytest.mark.parametrize("missing", ["lora_A.weight", "lora_B.weight"])
def test_missing_key_names_module(tmp_path: Path, missing: str) -> None:
    tensors = _pair()
    del tensors[f"{PREFIX}m.q.{missing}"]
    with pytest.raises(FileFormatError, match=rf"'m\.q'.*{missing.split('.')[0]}"):
        load_adapter(_write(tmp_path / "a", tensors))


def test_no_lora_tensors_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="no LoRA tensors"):
        load_adapter(_write(tmp_path / "empty", {"something.else": np.zeros(2, np.float32)}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / CONFIG_NAME).write_text("{}")
    with pytest.raises(FileFormatError, match=WEIGHTS_NAME):
        load_adapter(tmp_path / "noweights")
    directory = _write(tmp_path / "noconfig", _pair())
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(FileFormatError, match=CONFIG_NAME):
        load_adapter(directory)
    with pytest.raises(FileFormatError, match="not an adapter directory"):
        load_adapter(tmp_path / "absent")


def test_rank_mismatch_between_A_and_B(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match=r"m\.q.*rank mismatch"):
        load_adapter(_write(tmp_path / "a", _pair(r=2, r_b=3)))


def test_config_rank_disagrees_with_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"m\.q.*r=8"):
        load_adapter(_write(tmp_path / "a", _pair(r=2), {"r": 8, "target_modules": ["q"]}))
    # rank_pattern resolves the module's rank: agreement
    adapter = load_adapter(_write(tmp_path / "b", _pair(r=2), {"r": 8, "rank_pattern": {"q": 2}, "target_modules": ["q"]}))
    assert adapter.modules["m.q"].rank == 2 and adapter.scale_for("m.q") == 8 / 2


def test_bad_lora_bias_shape_and_dtype(tmp_path: Path) -> None:
    tensors = {**_pair(), f"{PREFIX}m.q.lora_B.bias": np.zeros(5, np.float32)}
    with pytest.raises(ShapeError, match=r"m\.q.*lora_B.bias"):
        load_adapter(_write(tmp_path / "a", tensors))
    with pytest.raises(DTypeError, match=r"m\.q"):
        load_adapter(_write(tmp_path / "b", _pair(dtype=np.int32)))


def test_invalid_config_values_and_corrupt_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lora_dropout"):
        load_adapter(_write(tmp_path / "a", _pair(), {"r": 2, "lora_dropout": -0.5}))
    directory = _write(tmp_path / "b", _pair())
    raw = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 5])
    with pytest.raises(FileFormatError, match=WEIGHTS_NAME):
        load_adapter(directory)
    (directory / WEIGHTS_NAME).write_bytes(raw)
    (directory / CONFIG_NAME).write_text("{oops")
    with pytest.raises(FileFormatError, match="invalid JSON"):
        load_adapter(directory)


def test_errors_are_one_line_lora_ref_errors(tmp_path: Path) -> None:
    with pytest.raises(LoraRefError) as info:
        load_adapter(_write(tmp_path / "a", _pair(r=2, r_b=3)))
    assert "\n" not in str(info.value)
