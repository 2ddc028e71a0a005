"""LoraConfig: PEFT's defaults, scaling, rank/alpha pattern resolution, target matching,
faithful JSON round trip, and ConfigError / FileFormatError for invalid input.

PEFT's own resolution is compared in tests/test_peers_peft_linear.py; here the oracle is
the rule written out independently: a literal pattern key k applies to module m when m == k
or m ends with "." + k; the first such key in the dict's order wins; rank and alpha resolve
independently.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.config import CONFIG_NAME, LoraConfig, lora_scale
from lora_ref.errors import ConfigError, FileFormatError, LoraRefError

# Module-path components: dots only at component boundaries, and no component contains another
# followed by one character and a third, so an unescaped "." in a key cannot match a non-dot.
WORDS = ["model", "layers", "0", "1", "12", "self_attn", "q_proj", "k_proj", "v_proj", "mlp", "up_proj", "c_attn"]
paths = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(".".join)


def literal_matches(key: str, module: str) -> bool:
    return module == key or module.endswith("." + key)


def expected_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if literal_matches(key, module):
            return value
    return default


def test_defaults_are_peft_defaults() -> None:
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout) == (8, 8, 0.0)
    assert (c.fan_in_fan_out, c.use_rslora, c.use_dora, c.lora_bias, c.bias) == (False, False, False, False, "none")
    assert c.rank_pattern == {} and c.alpha_pattern == {} and c.target_modules is None
    assert c.scale_for("any.module") == 1.0 and c.rank_for("x") == 8 and c.alpha_for("x") == 8


@given(r=st.integers(1, 4096), alpha=st.integers(1, 4096) | st.floats(1e-3, 1e4))
def test_scale_is_alpha_over_r_correctly_rounded(r: int, alpha: float) -> None:
    # Python's float division is correctly rounded, and so is Fraction -> float: both are one
    # rounding of the exact alpha / r, so they must be equal bit for bit.
    assert lora_scale(r, alpha) == float(Fraction(alpha) / r)
    assert LoraConfig(r=r, lora_alpha=alpha).scale_for("m") == float(Fraction(alpha) / r)


@given(k=st.integers(1, 64), alpha=st.integers(1, 4096) | st.floats(1e-3, 1e4))
def test_rslora_scale_is_alpha_over_sqrt_r(k: int, alpha: float) -> None:
    # r = k^2: sqrt is exact, so alpha / sqrt(r) is one rounding of alpha / k
    assert lora_scale(k * k, alpha, use_rslora=True) == float(Fraction(alpha) / k)
    # any r: s^2 r = alpha^2 within (1 + u)^5 - 1 < 6u (sqrt, divide, square, times r: u each)
    r = k * k + 1
    s = Fraction(lora_scale(r, alpha, use_rslora=True))
    assert abs(s * s * r / Fraction(alpha) ** 2 - 1) < 6 * 2.0**-53


@given(
    module=paths,
    rank_keys=st.lists(paths, max_size=4, unique=True),
    alpha_keys=st.lists(paths, max_size=4, unique=True),
    data=st.data(),
)
def test_patterns_first_suffix_match_independently(module: str, rank_keys, alpha_keys, data) -> None:
    ranks = {k: data.draw(st.integers(1, 64)) for k in rank_keys}
    alphas = {k: data.draw(st.integers(1, 256)) for k in alpha_keys}
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern=ranks, alpha_pattern=alphas)
    want_r, want_alpha = expected_value(ranks, module, 8), expected_value(alphas, module, 16)
    assert config.rank_for(module) == want_r
    assert config.alpha_for(module) == want_alpha
    assert config.scale_for(module) == want_alpha / want_r


def test_pattern_examples() -> None:
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 4, r"layers\.1\..*": 32, "layers.1.self_attn.q_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 7},
    )
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 4  # first matching key wins, not the longest
    assert config.rank_for("model.layers.1.mlp.up_proj") == 32  # a regex key
    assert config.rank_for("model.layers.0.mlp.up_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8  # suffix must start at a component
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 7 and config.alpha_for("model.layers.0.q_proj") == 16
    assert config.scale_for("model.layers.1.self_attn.q_proj") == 7 / 4


@given(module=paths, targets=st.lists(paths, max_size=4), excludes=st.none() | st.lists(paths, max_size=2))
def test_target_modules_list_suffix_rule(module: str, targets, excludes) -> None:
    config = LoraConfig(target_modules=targets, exclude_modules=excludes)
    hit = any(literal_matches(t, module) for t in targets)
    excluded = excludes is not None and any(literal_matches(e, module) for e in excludes)
    assert config.targets(module) == (hit and not excluded)


def test_target_modules_regex_is_a_full_match() -> None:
    config = LoraConfig(target_modules=r".*\.(q|v)_proj")
    assert config.targets("model.layers.0.self_attn.q_proj")
    assert not config.targets("model.layers.0.self_attn.q_proj.base")
    assert not config.targets("q_proj")  # the regex needs a dot before
    assert not LoraConfig().targets("anything")  # no target_modules: nothing targeted


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@given(
    r=st.integers(1, 64),
    alpha=st.integers(1, 128) | st.floats(0.5, 64),
    dropout=st.floats(0, 0.99),
    targets=st.none() | st.lists(st.sampled_from(WORDS), max_size=3) | st.just(r".*proj"),
    extra=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in LoraConfig.__dataclass_fields__),
                          json_values, max_size=3),
    flags=st.fixed_dictionaries({"fan_in_fan_out": st.booleans(), "use_rslora": st.booleans(), "lora_bias": st.booleans()}),
)
def test_json_round_trip_keeps_unknown_fields(tmp_path_factory, r, alpha, dropout, targets, extra, flags) -> None:
    data = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
            "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}, **flags, **extra}
    directory = tmp_path_factory.mktemp("cfg")
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    config = LoraConfig.load(directory)
    assert config.extra == extra
    config.save(directory)
    written = json.loads((directory / CONFIG_NAME).read_text())
    for key, value in data.items():
        assert written[key] == value, key
    assert LoraConfig.from_dict(written) == config


def test_null_patterns_and_target_set() -> None:
    config = LoraConfig.from_dict({"rank_pattern": None, "alpha_pattern": None, "target_modules": ("v", "q")})
    assert config.rank_pattern == {} and config.alpha_pattern == {} and config.target_modules == ["q", "v"]


@pytest.mark.parametrize(
    "bad",
    [
        {"r": 0}, {"r": -3}, {"r": 1.5}, {"r": True}, {"r": "8"},
        {"lora_alpha": "16"}, {"lora_alpha": math.inf}, {"lora_alpha": math.nan}, {"lora_alpha": None},
        {"lora_dropout": -0.1}, {"lora_dropout": 1.0}, {"lora_dropout": "0.1"}, {"lora_dropout": True},
        {"bias": "some"}, {"fan_in_fan_out": "yes"}, {"use_rslora": 1}, {"lora_bias": None},
        {"target_modules": 5}, {"target_modules": ["q", 1]}, {"target_modules": "(unclosed"},
        {"rank_pattern": {"q": 0}}, {"rank_pattern": {"(": 4}}, {"rank_pattern": [1]},
        {"alpha_pattern": {"q": math.inf}}, {"alpha_pattern": {"q": "x"}},
        {"peft_type": "IA3"},
    ],
    ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}",
)
def test_invalid_values_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_dict(bad)
    assert isinstance(info.value, LoraRefError) and isinstance(info.value, ValueError)
    assert next(iter(bad)) in str(info.value)  # the message names the field


def test_not_an_object_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        LoraConfig.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", None], ids=["invalid-json", "not-utf8", "missing"])
def test_unreadable_config_file(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(FileFormatError) as info:
        LoraConfig.load(tmp_path)
    assert CONFIG_NAME in str(info.value)


def test_invalid_value_in_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": -1}))
    with pytest.raises(ConfigError, match=CONFIG_NAME):
        LoraConfig.load(tmp_path)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    LoraConfig(r=4).save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]
