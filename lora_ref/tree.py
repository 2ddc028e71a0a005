"""Adapter trees: nodes are adapters whose deltas add along the path from the root (SPEC M.4).

A tree over one base W_0 (a dict of weights) has nodes n with a parent (``None``: a child of
the base). The path of n is root, ..., n; its effective weight is

    W(n) = merge(... merge(merge(W_0, Δ_root), Δ_2) ..., Δ_n)      (merges in path order)

i.e. base + Σ of the deltas on the path, rounded once per merge step (SPEC 3.1). Switching
from node a to node b (either may be ``None``, the bare base) unmerges a's path down to the
lowest common ancestor c (last merged first, LIFO) and merges b's path below c in order. The
cost is |path(a)| − |path(c)| + |path(b)| − |path(c)| merge/unmerge steps, each touching the
node's targeted weights; :class:`SwitchReport` gives both figures.

Nodes may hold modules of any layer kind (Linear, fan_in_fan_out, Embedding, Conv), with
lora_bias (its base bias is merged too) or DoRA: a DoRA step merges W' = (m/n)(W_prev + ΔW)
with n = ‖W_prev + ΔW‖ of the weight as merged so far, so DoRA stacks depend on their order
(as merging is defined), and the ledger keeps each step's n for its exact unmerge.

Exact mode (the default) keeps a residual per merge step (:class:`lora_ref.ledger.MergeLedger`),
so every unmerge restores the previous state bit for bit. By induction over the switch
sequence the weights after any sequence of switches ending at b are bitwise the weights of
merging path(b) from scratch on the original base. Fast mode drops the residuals; its drift
is bounded per step by SPEC 3.3 and measured by ``examples/adapter_tree.py``.

On disk a tree is a directory: ``tree.json`` ({"format": "lora-ref-tree/1", "nodes": [{"name",
"parent", "adapter"}]}) plus one PEFT adapter directory per node (``adapter`` is its path
relative to the tree directory).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import Adapter, LoraModule, load_adapter, save_adapter
from .atomic import write_text_atomic
from .checkpoint import base_key
from .errors import ConfigError, FileFormatError, TargetNotFoundError
from .jsonfile import read_json
from .kinds import kind_of
from .ledger import MergeLedger

TREE_FILE = "tree.json"
TREE_FORMAT = "lora-ref-tree/1"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class TreeFormatError(FileFormatError):
    """A tree description is malformed: unknown parent, duplicate name, cycle, bad path."""


class BaseMismatchError(ConfigError):
    """Adapters in one tree (or a tree and its weights) belong to different base models."""


@dataclass(frozen=True)
class TreeNode:
    name: str
    parent: str | None
    adapter: Adapter


@dataclass(frozen=True)
class SwitchReport:
    """One switch: the nodes unmerged (in order), the nodes merged (in order), their LCA."""

    source: str | None
    target: str | None
    lca: str | None
    unmerged: tuple[str, ...]
    merged: tuple[str, ...]
    elements: int  # weight elements rewritten, summed over steps

    @property
    def steps(self) -> int:
        return len(self.unmerged) + len(self.merged)


class AdapterTree:
    """A validated forest of adapters over one base (module doc)."""

    def __init__(self, nodes: Iterable[TreeNode]) -> None:
        nodes = list(nodes)
        self._paths = tree_paths((node.name, node.parent) for node in nodes)
        self.nodes: dict[str, TreeNode] = {node.name: node for node in nodes}
        self._check_one_base()

    def _check_one_base(self) -> None:
        names = {n.adapter.config.base_model_name_or_path for n in self.nodes.values()} - {None}
        if len(names) > 1:
            raise BaseMismatchError(f"tree mixes adapters for different base models: {sorted(names)}")
        layouts = {n.adapter.config.fan_in_fan_out for n in self.nodes.values()}
        if len(layouts) > 1:
            raise BaseMismatchError("tree mixes fan_in_fan_out and regular adapters: different base layouts")
        shapes: dict[str, tuple[tuple[int, int], str]] = {}
        for node in self.nodes.values():
            for module, lora in node.adapter.modules.items():
                shape = stored_shape(lora, node.adapter.config.fan_in_fan_out)
                seen = shapes.setdefault(module, (shape, node.name))
                if seen[0] != shape:
                    raise BaseMismatchError(
                        f"{module}: node {node.name!r} fits a {shape} layer but node {seen[1]!r} a {seen[0]} one; "
                        "the adapters were trained on different bases"
                    )

    def path(self, name: str | None) -> tuple[str, ...]:
        """Nodes from the root down to ``name`` (empty for the base)."""
        if name is None:
            return ()
        if name not in self.nodes:
            raise TargetNotFoundError(f"tree has no node {name!r}")
        return self._paths[name]

    def depth(self) -> int:
        return max((len(p) for p in self._paths.values()), default=0)

    def check_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Raise unless every node's modules exist in ``weights`` with matching shapes."""
        for node in self.nodes.values():
            for module, lora in node.adapter.modules.items():
                key = base_key(module)
                if key not in weights:
                    raise TargetNotFoundError(f"tree node {node.name!r} targets {key}, which the base lacks")
                W = weights[key]
                expected = stored_shape(lora, node.adapter.config.fan_in_fan_out)
                if tuple(W.shape) != expected:
                    raise BaseMismatchError(f"{key}: base weight {tuple(W.shape)} but node {node.name!r} expects {expected}")

    # -- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write one PEFT adapter directory per node and ``tree.json`` (last, atomically)."""
        directory = Path(directory)
        entries = []
        for node in self.nodes.values():
            save_adapter(node.adapter, directory / node.name)
            entries.append({"name": node.name, "parent": node.parent, "adapter": node.name})
        write_text_atomic(directory / TREE_FILE, json.dumps({"format": TREE_FORMAT, "nodes": entries}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> AdapterTree:
        """Read a tree directory; the JSON is validated before any adapter is loaded."""
        directory = Path(directory)
        path = directory / TREE_FILE
        data = read_json(path, error=TreeFormatError, what="tree description")
        if not isinstance(data, dict) or data.get("format") != TREE_FORMAT or not isinstance(data.get("nodes"), list):
            raise TreeFormatError(f"{path}: expected {{\"format\": \"{TREE_FORMAT}\", \"nodes\": [...]}}")
        entries = []
        for entry in data["nodes"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("adapter"), str) \
                    or not (entry.get("parent") is None or isinstance(entry.get("parent"), str)):
                raise TreeFormatError(f"{path}: each node needs a string name and adapter and a string or null parent: {entry!r}")
            if "\x00" in entry["adapter"]:
                raise TreeFormatError(f"{path}: node {entry['name']!r} has a NUL byte in its adapter path")
            adapter_dir = (directory / entry["adapter"]).resolve()
            if not adapter_dir.is_relative_to(directory.resolve()):
                raise TreeFormatError(f"{path}: node {entry['name']!r} points outside the tree directory: {entry['adapter']!r}")
            entries.append((entry["name"], entry["parent"], adapter_dir))
        tree_paths((name, parent) for name, parent, _ in entries)  # structure first, before reading weights
        return cls(TreeNode(name, parent, load_adapter(adapter_dir, name=name)) for name, parent, adapter_dir in entries)


def stored_shape(lora: LoraModule, fan_in_fan_out: bool) -> tuple[int, ...]:
    """The base weight's stored shape that ``lora`` fits (any kind: its delta has W's layout)."""
    return tuple(kind_of(lora.kind).delta(lora.A, lora.B, 1.0, fan_in_fan_out=fan_in_fan_out, module=lora.name).shape)


def tree_paths(pairs: Iterable[tuple[str, str | None]]) -> dict[str, tuple[str, ...]]:
    """Validate (name, parent) pairs and return each node's path from its root.

    Raises TreeFormatError for a bad or duplicate name, an unknown parent, or a cycle.
    """
    parents: dict[str, str | None] = {}
    for name, parent in pairs:
        if not isinstance(name, str) or not _NAME.match(name):
            raise TreeFormatError(f"tree node name {name!r} must match {_NAME.pattern}")
        if name in parents:
            raise TreeFormatError(f"tree node {name!r} appears twice")
        parents[name] = parent
    for name, parent in parents.items():
        if parent is not None and parent not in parents:
            raise TreeFormatError(f"tree node {name!r} has unknown parent {parent!r}")
    paths = {}
    for name in parents:
        path: list[str] = []
        current: str | None = name
        while current is not None:
            if current in path:
                cycle = " -> ".join([*path[path.index(current):], current])
                raise TreeFormatError(f"tree has a cycle: {cycle} (child -> parent)")
            path.append(current)
            current = parents[current]
        paths[name] = tuple(reversed(path))
    return paths


@dataclass
class TreeSwitcher:
    """Keeps ``weights`` at the effective weight of one node and switches between nodes."""

    tree: AdapterTree
    weights: dict[str, np.ndarray]
    exact: bool = True
    current: str | None = None

    def __post_init__(self) -> None:
        self.tree.check_weights(self.weights)
        self._ledger = MergeLedger(self.weights, exact=self.exact)

    def switch(self, target: str | None) -> SwitchReport:
        """Unmerge to the LCA of the current node and ``target``, then merge down to ``target``.

        One :meth:`MergeLedger.switch <lora_ref.ledger.MergeLedger.switch>`: every weight is
        rewritten in one pass (all its unmerge and merge steps, block by block). If a step is
        refused (a node holding NaN, say), nothing changes: the weights and ``current`` are as
        before the call.
        """
        source_path, target_path = self.tree.path(self.current), self.tree.path(target)
        common = 0
        while common < min(len(source_path), len(target_path)) and source_path[common] == target_path[common]:
            common += 1
        unmerged, merged = source_path[common:][::-1], target_path[common:]
        self._ledger.switch([(self.tree.nodes[name].adapter, name) for name in unmerged],
                            [(self.tree.nodes[name].adapter, name) for name in merged])
        elements = sum(self._elements(name) for name in (*unmerged, *merged))
        report = SwitchReport(self.current, target, target_path[common - 1] if common else None, unmerged, merged, elements)
        self.current = target
        return report

    def _elements(self, name: str) -> int:
        return sum(int(self.weights[base_key(m)].size) for m in self.tree.nodes[name].adapter.modules)

    def residual_elements(self) -> int:
        return self._ledger.residual_elements()


def merge_path(tree: AdapterTree, base: dict[str, np.ndarray], name: str | None) -> dict[str, np.ndarray]:
    """W(name) from scratch: copies of ``base`` with the path's adapters merged in order."""
    weights = {key: np.array(value) for key, value in base.items()}
    ledger = MergeLedger(weights, exact=False)
    for node in tree.path(name):
        ledger.merge(tree.nodes[node].adapter, node)
    return weights
