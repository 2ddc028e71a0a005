"""Adapter trees and stacks of merged adapters (SPEC M.2, 4.4).

The oracle for a node's weights is :func:`merge_path`: merging the root path from scratch on a
fresh copy of the base. Exact mode must reproduce it bit for bit after any switch sequence.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import Adapter, LoraModule
from lora_ref.config import LoraConfig
from lora_ref.dtypes import bfloat16, bits_of, round_to
from lora_ref.errors import MergeStateError, NonFiniteError, TargetNotFoundError
from lora_ref.ledger import MergeLedger
from lora_ref.tree import (
    AdapterTree,
    BaseMismatchError,
    TreeFormatError,
    TreeNode,
    TreeSwitcher,
    merge_path,
)

SHAPES = {"attn.q_proj": (6, 5), "mlp.up_proj": (4, 6)}  # small: the 10,000-switch test stays cheap


def base_weights(seed: int, dtype=bfloat16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{m}.weight": round_to(rng.normal(size=shape), dtype) for m, shape in SHAPES.items()}


def random_adapter(rng: np.random.Generator, name: str, dtype=bfloat16, modules=None) -> Adapter:
    r = int(rng.integers(1, 4))
    chosen = modules or [m for m in SHAPES if rng.random() < 0.7] or [next(iter(SHAPES))]
    mods = {m: LoraModule(m, round_to(rng.normal(size=(r, SHAPES[m][1])), dtype),
                          round_to(rng.normal(0, 0.3, size=(SHAPES[m][0], r)), dtype)) for m in chosen}
    cfg = LoraConfig(r=r, lora_alpha=float(rng.choice([1.0, 3.0, 7.0])), use_rslora=bool(rng.random() < 0.3), target_modules=chosen)
    return Adapter(cfg, mods, name=name)


def random_tree(seed: int, branching=(2, 2, 2, 1), dtype=bfloat16) -> AdapterTree:
    """A forest of depth len(branching) under the base; node names n0, n1, ..."""
    rng = np.random.default_rng(seed)
    nodes, level = [], [None]
    for width in branching:
        next_level = []
        for parent in level:
            for _ in range(width):
                name = f"n{len(nodes)}"
                nodes.append(TreeNode(name, parent, random_adapter(rng, name, dtype)))
                next_level.append(name)
        level = next_level
    return AdapterTree(nodes)


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(bits_of(a[k]), bits_of(b[k])) for k in a)


def test_ten_thousand_random_switches_are_bit_identical_to_merging_from_scratch():
    tree = random_tree(0)
    assert tree.depth() == 4
    base = base_weights(0)
    oracle = {name: merge_path(tree, base, name) for name in [None, *tree.nodes]}
    switcher = TreeSwitcher(tree, {k: v.copy() for k, v in base.items()}, exact=True)
    rng = np.random.default_rng(1)
    names = [None, *tree.nodes]
    steps = 0
    for _ in range(10_000):
        target = names[int(rng.integers(len(names)))]
        report = switcher.switch(target)
        steps += report.steps
        assert same_bits(switcher.weights, oracle[target]), f"drift after switching to {target}"
    assert steps > 10_000
    switcher.switch(None)
    assert same_bits(switcher.weights, base) and switcher.residual_elements() == 0


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 22), min_size=1, max_size=30),
       st.sampled_from([bfloat16, np.float16, np.float32]))
def test_switch_equals_merge_from_scratch_bitwise(seed, picks, dtype):
    tree = random_tree(seed % 1000, dtype=dtype)
    base = base_weights(seed, dtype)
    switcher = TreeSwitcher(tree, {k: v.copy() for k, v in base.items()})
    names = [None, *tree.nodes]
    for pick in picks:
        target = names[pick % len(names)]
        before = tree.path(switcher.current)
        report = switcher.switch(target)
        after = tree.path(target)
        common = len(tree.path(report.lca))
        assert report.unmerged == tuple(reversed(before[common:])) and report.merged == after[common:]
        assert report.steps == len(before) + len(after) - 2 * common  # cost ∝ path length below the LCA
        assert report.elements == sum(switcher.weights[f"{m}.weight"].size
                                      for n in report.unmerged + report.merged for m in tree.nodes[n].adapter.modules)
        assert same_bits(switcher.weights, merge_path(tree, base, target))


@given(st.integers(0, 2**32 - 1), st.integers(2, 5), st.sampled_from([bfloat16, np.float16, np.float32]))
def test_stack_on_one_weight_unmerges_lifo_and_exactly(seed, depth, dtype):
    """Several adapters merged in order on the same weights; LIFO unmerge restores every intermediate state."""
    rng = np.random.default_rng(seed)
    weights = base_weights(seed, dtype)
    ledger = MergeLedger(weights, exact=True)
    adapters = [random_adapter(rng, f"s{i}", dtype, modules=list(SHAPES)) for i in range(depth)]
    states = []
    for adapter in adapters:
        states.append({k: v.copy() for k, v in weights.items()})
        ledger.merge(adapter)
    assert ledger.merged == [a.name for a in adapters]
    with pytest.raises(MergeStateError):
        ledger.unmerge(adapters[0])  # not last in
    for adapter, state in zip(reversed(adapters), reversed(states)):
        ledger.unmerge(adapter)
        assert same_bits(weights, state)


def test_tree_directory_round_trip(tmp_path):
    tree = random_tree(3, branching=(2, 1, 1, 1), dtype=np.float32)
    tree.save(tmp_path / "tree")
    loaded = AdapterTree.load(tmp_path / "tree")
    assert {n: (t.parent, sorted(t.adapter.modules)) for n, t in loaded.nodes.items()} == \
           {n: (t.parent, sorted(t.adapter.modules)) for n, t in tree.nodes.items()}
    base = base_weights(3, np.float32)
    for name in tree.nodes:
        assert same_bits(merge_path(loaded, base, name), merge_path(tree, base, name))
    description = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert description["format"] == "lora-ref-tree/1" and len(description["nodes"]) == len(tree.nodes)


def write_description(directory, nodes):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tree.json").write_text(json.dumps({"format": "lora-ref-tree/1", "nodes": nodes}))


@pytest.mark.parametrize("nodes", [
    [{"name": "a", "parent": "b", "adapter": "a"}, {"name": "b", "parent": "a", "adapter": "b"}],  # 2-cycle
    [{"name": "a", "parent": "a", "adapter": "a"}],  # self loop
    [{"name": "a", "parent": None, "adapter": "a"}, {"name": "b", "parent": "c", "adapter": "b"},
     {"name": "c", "parent": "d", "adapter": "c"}, {"name": "d", "parent": "b", "adapter": "d"}],  # 3-cycle below a root
    [{"name": "a", "parent": "zz", "adapter": "a"}],  # unknown parent
    [{"name": "a", "parent": None, "adapter": "a"}, {"name": "a", "parent": None, "adapter": "a"}],  # duplicate
    [{"name": "../x", "parent": None, "adapter": "a"}],  # bad name
    [{"name": "a", "parent": None, "adapter": "../../etc"}],  # escapes the directory
    [{"name": "a", "parent": None}],  # no adapter path
])
def test_malformed_tree_files_are_tree_format_errors(tmp_path, nodes):
    write_description(tmp_path / "t", nodes)
    with pytest.raises(TreeFormatError):
        AdapterTree.load(tmp_path / "t")


def test_cycle_message_names_the_cycle(tmp_path):
    write_description(tmp_path / "t", [{"name": "a", "parent": "b", "adapter": "a"}, {"name": "b", "parent": "a", "adapter": "b"}])
    with pytest.raises(TreeFormatError, match="cycle"):
        AdapterTree.load(tmp_path / "t")
    (tmp_path / "t" / "tree.json").write_text("{not json")
    with pytest.raises(TreeFormatError):
        AdapterTree.load(tmp_path / "t")
    with pytest.raises(TreeFormatError):
        AdapterTree.load(tmp_path / "empty")


def test_adapters_for_different_bases_are_refused():
    rng = np.random.default_rng(4)
    a, b = random_adapter(rng, "a", modules=["attn.q_proj"]), random_adapter(rng, "b", modules=["attn.q_proj"])
    a.config.base_model_name_or_path, b.config.base_model_name_or_path = "org/base-1b", "org/base-7b"
    with pytest.raises(BaseMismatchError):
        AdapterTree([TreeNode("a", None, a), TreeNode("b", "a", b)])
    wide = Adapter(LoraConfig(r=1, target_modules=["attn.q_proj"]),
                   {"attn.q_proj": LoraModule("attn.q_proj", np.zeros((1, 9), np.float32), np.zeros((6, 1), np.float32))})
    c = random_adapter(rng, "c", modules=["attn.q_proj"])
    with pytest.raises(BaseMismatchError):
        AdapterTree([TreeNode("c", None, c), TreeNode("w", "c", wide)])
    tree = AdapterTree([TreeNode("w", None, wide)])
    with pytest.raises(BaseMismatchError):
        TreeSwitcher(tree, base_weights(0))
    with pytest.raises(TargetNotFoundError):
        TreeSwitcher(AdapterTree([TreeNode("c", None, c)]), {})
    with pytest.raises(TargetNotFoundError):
        AdapterTree([TreeNode("c", None, c)]).path("nope")


def test_failed_switch_rolls_back_bit_for_bit():
    """A node whose second module holds NaN is refused; weights and the current node are as before."""
    tree0 = random_tree(5, branching=(2, 1), dtype=np.float16)
    rng = np.random.default_rng(6)
    bad = random_adapter(rng, "bad", np.float16, modules=list(SHAPES))
    bad.modules["mlp.up_proj"].B[0, 0] = np.nan
    leaf = [n for n in tree0.nodes if len(tree0.path(n)) == 2][0]
    tree = AdapterTree([*tree0.nodes.values(), TreeNode("bad", leaf, bad)])
    base = base_weights(5, np.float16)
    switcher = TreeSwitcher(tree, {k: v.copy() for k, v in base.items()})
    other = [n for n in tree0.nodes if n not in tree.path(leaf)][-1]
    switcher.switch(other)
    with pytest.raises(NonFiniteError):
        switcher.switch("bad")  # unmerges other's path, merges down to leaf, then refuses "bad"
    assert switcher.current == other
    assert same_bits(switcher.weights, merge_path(tree0, base, other))
    switcher.switch(None)
    assert same_bits(switcher.weights, base)
