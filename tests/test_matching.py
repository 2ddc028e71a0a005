"""Bounded matching (lora_ref.matching) gives PEFT's answers, in time linear in the name.

Oracles: Python's ``re`` itself on short names (where backtracking is harmless), and PEFT
0.21.2's own ``check_target_module_exists`` / ``get_pattern_key`` (peer: run when PEFT is
installed). Liveness, not speed: a pattern that makes ``re`` backtrack exponentially is run on
a long name in a subprocess that must finish (a hang fails; nothing is timed against a number).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_peer
from lora_ref.config import LoraConfig
from lora_ref.errors import ConfigError
from lora_ref.matching import Matcher, PatternTable, TargetSpec

ALPHABET = "ab._1\n é"


def _regexes() -> st.SearchStrategy[str]:
    """Random regexes over a small alphabet: literals, classes, anchors, groups, alternation, repeats."""
    atoms = st.sampled_from(["a", "b", r"\.", ".", "_", r"\d", r"\w", r"\s", r"\W", "[ab]", "[^a.]", "[a-z_]", "é",
                             r"\b", r"\B", "^", "$", r"\Z", r"\A", "(?:)", "1"])

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "*?", "{2}", "{1,3}", "{0,2}?", "{2,}"]))
              .map(lambda t: f"({t[0]}){t[1]}"),
        )
    return st.recursive(atoms, extend, max_leaves=8).map(lambda r: r if r else "a")


@given(pattern=_regexes(), names=st.lists(st.text(ALPHABET, max_size=7), min_size=1, max_size=8),
       dotall=st.booleans(), ascii_=st.booleans())
def test_same_answers_as_re(pattern: str, names: list[str], dotall: bool, ascii_: bool) -> None:
    flags = ("(?s)" if dotall else "") + ("(?a)" if ascii_ else "")
    pattern = flags + pattern
    compiled, ours = re.compile(pattern), Matcher(pattern)
    for name in names:
        assert ours.fullmatch(name) == bool(compiled.fullmatch(name)), (pattern, name)
        assert ours.match(name) == bool(compiled.match(name)), (pattern, name)


def _peft_pattern_key(keys: list[str], name: str) -> str | None:
    """PEFT 0.21.2's get_pattern_key, as written there (the oracle for rank/alpha patterns)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


names_st = st.lists(st.text("ab.q\n", max_size=8), min_size=1, max_size=10)
keys_st = st.lists(st.one_of(st.text("ab.q", min_size=1, max_size=4).map(re.escape),
                             st.sampled_from(["a.*", "q|b", r"\w+\.q", "b?a", "a$"])), min_size=1, max_size=6, unique=True)


@given(keys=keys_st, names=names_st)
def test_pattern_table_is_first_matching_key(keys: list[str], names: list[str]) -> None:
    table = PatternTable({key: i for i, key in enumerate(keys)})
    for name in names:
        expected = _peft_pattern_key(keys, name)
        assert table.value(name) == (None if expected is None else keys.index(expected)), (keys, name)


@given(targets=st.lists(st.text("ab.q", max_size=4), max_size=6), names=names_st)
def test_list_targets_by_lookup(targets: list[str], names: list[str]) -> None:
    spec = TargetSpec(targets)
    for name in names:
        assert spec(name) == (name in targets or any(name.endswith(f".{t}") for t in targets)), (targets, name)


@pytest.mark.parametrize("pattern, refused", [
    (r"(a)\1", "backreferences"), (r"(?=a)a", "lookahead"), (r"(?<!a)b", "lookahead"), (r"(?>a)", "atomic"),
    (r"a*+", "possessive"), (r"(?i)a", "IGNORECASE"), (r"(?m)^a", "MULTILINE"), (r"(a)?(?(1)b|c)", "conditional"),
    (r"(a{100}){300}", "states"), (r"(", "not a valid regex"),
])
def test_refused_constructs(pattern: str, refused: str) -> None:
    with pytest.raises(ConfigError, match=refused):
        LoraConfig(target_modules=pattern)


def test_config_uses_bounded_matching() -> None:
    config = LoraConfig(r=4, target_modules=r".*\.(q|v)_proj", rank_pattern={"v_proj": 2, r"layers\.1\..*": 8},
                        alpha_pattern={r"layers\.0\.q_proj": 3})
    assert config.targets("model.layers.0.q_proj") and not config.targets("model.layers.0.k_proj")
    assert config.rank_for("model.layers.1.v_proj") == 2  # the first key in dict order wins
    assert config.rank_for("model.layers.1.q_proj") == 8 and config.rank_for("model.layers.0.q_proj") == 4
    assert config.alpha_for("model.layers.0.q_proj") == 3 and config.alpha_for("x.layers.0.q_proj") == 3
    config.target_modules = ["k_proj"]  # a new value is compiled again
    assert config.targets("model.layers.0.k_proj") and not config.targets("model.layers.0.q_proj")


def test_catastrophic_backtracking_pattern_finishes() -> None:
    """(a|aa)*c against 'a'*5000+'b': re would take ~2^2500 steps; the bounded matcher answers at once."""
    code = ("from lora_ref.config import LoraConfig\n"
            "c = LoraConfig(target_modules='(a|aa)*c', rank_pattern={'(x+x+)+y': 2})\n"
            "name = 'a' * 5000 + 'b'\n"
            "assert not c.targets(name) and c.rank_for('x' * 5000) == c.r\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@given(keys=keys_st, names=names_st, targets=st.one_of(st.lists(st.text("ab.q", min_size=1, max_size=4), max_size=5),
                                                      st.sampled_from([r".*\.q", "a|b.q", r"(\w+\.)*q"])))
def test_against_peft(keys: list[str], names: list[str], targets) -> None:
    """PEFT's own functions are the oracle for target_modules and rank_pattern."""
    from types import SimpleNamespace

    require_peer("peft")
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    ours = LoraConfig(target_modules=targets, rank_pattern={k: i + 1 for i, k in enumerate(keys)})
    peft_config = SimpleNamespace(target_modules=targets, exclude_modules=None, modules_to_save=None,
                                  target_parameters=None, layers_to_transform=None, layers_pattern=None)
    for name in names:
        assert ours.targets(name) == bool(check_target_module_exists(peft_config, name)), (targets, name)
        key = get_pattern_key(list(ours.rank_pattern), name)
        assert ours.rank_for(name) == ours.rank_pattern.get(key, ours.r), (keys, name)
