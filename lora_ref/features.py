"""The feature matrix: every layer kind and variant × every composition feature, in one table.

:data:`VARIANTS` lists the layer variants (a kind from :mod:`lora_ref.kinds` plus lora_bias,
DoRA, fan_in_fan_out, the conv's spatial rank); :data:`FEATURES` the features. :func:`cell`
says, for one (variant, feature), whether it is supported and, if not, the typed error raised
and why. The tests read this table (each supported cell has a test, each refused cell checks
its error), and :func:`render` writes it as ``docs/features.md`` (``python -m lora_ref.features``
regenerates the file, and the one-row-per-cell list of SPEC M.8 with :func:`spec_rows`; a test
checks both match), so code, tests, docs and SPEC cannot disagree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .docsplice import splice
from .errors import UnsupportedFeatureError


@dataclass(frozen=True)
class Variant:
    """One row: ``kind`` (registry name), lora_bias, DoRA, fan_in_fan_out, conv spatial axes (0: not a conv),
    ``patterns``: rsLoRA with rank_pattern / alpha_pattern giving the module its rank and alpha."""

    name: str
    kind: str
    lora_bias: bool = False
    dora: bool = False
    fan_in_fan_out: bool = False
    conv_dims: int = 0
    patterns: bool = False

    @property
    def label(self) -> str:
        base = {"linear": "Linear", "embedding": "Embedding"}.get(self.kind, f"Conv{self.conv_dims}d")
        extras = [e for e, on in (("fan_in_fan_out", self.fan_in_fan_out), ("lora_bias", self.lora_bias),
                                  ("rsLoRA + rank/alpha patterns", self.patterns)) if on]
        text = base + "".join(f" + {e}" for e in extras)
        return f"DoRA {text}" if self.dora else text


VARIANTS: tuple[Variant, ...] = (
    Variant("linear", "linear"),
    Variant("linear_fan_in_fan_out", "linear", fan_in_fan_out=True),
    Variant("linear_lora_bias", "linear", lora_bias=True),
    Variant("linear_rslora_patterns", "linear", patterns=True),
    Variant("embedding", "embedding"),
    Variant("embedding_rslora_patterns", "embedding", patterns=True),
    Variant("conv1d", "conv", conv_dims=1),
    Variant("conv2d", "conv", conv_dims=2),
    Variant("conv3d", "conv", conv_dims=3),
    Variant("conv2d_lora_bias", "conv", lora_bias=True, conv_dims=2),
    Variant("conv2d_rslora_patterns", "conv", conv_dims=2, patterns=True),
    Variant("dora_linear", "linear", dora=True),
    Variant("dora_linear_fan_in_fan_out", "linear", dora=True, fan_in_fan_out=True),
    Variant("dora_embedding", "embedding", dora=True),
    Variant("dora_conv1d", "conv", dora=True, conv_dims=1),
    Variant("dora_conv2d", "conv", dora=True, conv_dims=2),
    Variant("dora_conv3d", "conv", dora=True, conv_dims=3),
)

#: feature -> (title, where it lives, SPEC section).
FEATURES: dict[str, tuple[str, str, str]] = {
    "mixed_forward": ("mixed-batch forward", "mixed_batch.mixed_forward", "M.1"),
    "mixed_backward": ("mixed-batch backward", "mixed_batch.mixed_backward", "M.1"),
    "train_dropout": ("training with dropout", "train.train_mixed, models.LayerModel", "M.6"),
    "combine_cat": ("combine cat", "combine.combine(method='cat')", "M.3"),
    "combine_linear": ("combine linear", "combine.combine(method='linear')", "M.3"),
    "combine_svd": ("combine svd", "combine.combine(method='svd')", "M.3"),
    "active_stack": ("active stack (unmerged)", "mixed_batch.active_forward", "M.2"),
    "merged_stack": ("merged stack / tree, LIFO", "ledger.MergeLedger, tree.TreeSwitcher", "M.2, M.4"),
    "onnx_merged": ("ONNX merged graph", "export.build_graph(kind='merged')", "E.2"),
    "onnx_dynamic": ("ONNX dynamic graph", "export.build_graph(kind='dynamic')", "E.2"),
    "onnx_batched": ("ONNX batched graph", "export.build_graph(kind='batched')", "E.2"),
}
#: The ONNX export features (tests/test_features_onnx.py exports and runs each cell; the core's tests skip them).
ONNX_FEATURES = ("onnx_merged", "onnx_dynamic", "onnx_batched")


@dataclass(frozen=True)
class Cell:
    """``supported``; else ``error`` (the typed error raised) and ``reason``. ``note``: a fact of a supported cell."""

    supported: bool
    reason: str = ""
    error: type | None = None
    note: str = ""


_DORA_COMBINE = ("each DoRA layer is (m_i/n_i)(W + ΔW_i) with n_i depending on W: no weighted sum of them is a LoRA "
                 "delta plus one magnitude")
_DORA_ACTIVE = "an unmerged stack is additive and DoRA's m/n rescaling of the whole output is not; merge DoRA adapters in turn"
_BIAS_LINEAR = "linear mixes B with weights sqrt|c_i| (cross terms), which defines no bias; cat and svd store Σ c_i b_i"


_ONNX_DORA = {"onnx_merged": "W' = g ∘ (W + ΔW) baked into the initializer, g from the core's float64 norm",
              "onnx_dynamic": "the norm ‖W + s·B·A‖ is computed in the graph from the fed A and B, per channel, and used as a "
                              "constant factor (PEFT's detached norm)",
              "onnx_batched": "each row multiplies by its adapter's gain m/n gathered from a gain bank built at export"}
_ONNX_NOTES = {"onnx_batched": "rows choose adapters by an index input (−1 = base); ranks zero-padded to r_max",
               "onnx_dynamic": "A and B (and lora_bias) are graph inputs: a running session switches adapters by feeding them"}


def _onnx_cell(v: Variant, feature: str) -> Cell:
    """The exporter's state for ``v`` in ``feature``'s graph kind (every cell exported and run: tests/test_features_onnx.py)."""
    if v.dora:
        return Cell(True, note=_ONNX_DORA[feature])
    if v.patterns:
        return Cell(True, note="each module's s from its rank_pattern / alpha_pattern (rsLoRA: alpha/√r), folded into the fed or merged tensors")
    if v.fan_in_fan_out and feature == "onnx_merged":
        return Cell(True, note="the delta is merged in the layout the graph stores W in ([in, out] here: no transpose)")
    return Cell(True, note=_ONNX_NOTES.get(feature, ""))


def cell(variant: Variant | str, feature: str) -> Cell:
    """The matrix entry for ``variant`` × ``feature`` (the one table; module doc)."""
    v = variant if isinstance(variant, Variant) else _BY_NAME[variant]
    if feature not in FEATURES:
        raise KeyError(feature)
    if feature in ONNX_FEATURES:
        return _onnx_cell(v, feature)
    if v.dora and feature.startswith("combine_"):
        return Cell(False, _DORA_COMBINE, UnsupportedFeatureError)
    if v.dora and feature == "active_stack":
        return Cell(False, _DORA_ACTIVE, UnsupportedFeatureError)
    if v.lora_bias and feature == "combine_linear":
        return Cell(False, _BIAS_LINEAR, UnsupportedFeatureError)
    if feature == "train_dropout" and v.kind == "embedding":
        return Cell(True, note="no dropout: PEFT applies none to embeddings (a mask is refused)")
    if v.dora and feature == "merged_stack":
        return Cell(True, note="each DoRA step's norm is taken from the weight as merged so far; the ledger keeps it for exact unmerge")
    if v.dora and feature == "train_dropout" and v.kind != "embedding":
        return Cell(True, note="DoRA's dropout formula: base(x) + (g − 1) ∘ base(x̃) + g ∘ lora(x̃), x̃ = x ∘ mask")
    if v.dora and feature in ("mixed_forward", "mixed_backward"):
        return Cell(True, note="each row uses its adapter's m and n = ‖W + ΔW_i‖ (n detached); PEFT's adapter_names refuses DoRA")
    if v.lora_bias and feature in ("combine_cat", "combine_svd"):
        return Cell(True, note="lora_bias = Σ c_i b_i, rounded once")
    return Cell(True)


_BY_NAME = {v.name: v for v in VARIANTS}


def variant(name: str) -> Variant:
    return _BY_NAME[name]


def render() -> str:
    """The matrix as Markdown (what ``docs/features.md`` holds)."""
    lines = [
        "# Feature matrix: layer kinds and variants × composition features",
        "",
        "Generated from `lora_ref/features.py` by `python -m lora_ref.features`; do not edit by hand",
        "(`tests/test_features.py` checks that this file matches the table and that every cell is tested).",
        "✓ supported, ✗ refused with `UnsupportedFeatureError` (a `ConfigError`); notes and reasons below.",
        "The ONNX columns are checked by exporting a tiny model of each variant and running it in ONNX Runtime",
        "against the float64 reference (`tests/test_features_onnx.py`).",
        "",
        "| variant | " + " | ".join(title for title, _, _ in FEATURES.values()) + " |",
        "| --- |" + " :---: |" * len(FEATURES),
    ]
    notes: list[str] = []
    for v in VARIANTS:
        marks = []
        for feature in FEATURES:
            c = cell(v, feature)
            text = c.note if c.supported else c.reason
            if text:
                if text not in notes:
                    notes.append(text)
                marks.append(("✓" if c.supported else "✗") + f" ({notes.index(text) + 1})")
            else:
                marks.append("✓")
        lines.append(f"| {v.label} | " + " | ".join(marks) + " |")
    lines += ["", "Notes:", ""] + [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    lines += ["", "Where each feature lives:", "", "| feature | code | SPEC |", "| --- | --- | --- |"]
    lines += [f"| {title} | `{where}` | {spec} |" for title, where, spec in FEATURES.values()]
    return "\n".join(lines) + "\n"


def spec_rows() -> str:
    """One Markdown table row per cell, for SPEC M.8 (between its ``features:`` markers)."""
    lines = ["| variant | feature | cell | SPEC | reason or note |", "| --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        for feature, (title, _, spec) in FEATURES.items():
            c = cell(v, feature)
            lines.append(f"| {v.label} | {title} | {'✓' if c.supported else '✗'} | {spec} | {c.note if c.supported else c.reason} |")
    return "\n".join(lines) + "\n"


ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "features.md"
SPEC = ROOT / "conformance" / "SPEC.md"
SPEC_BEGIN, SPEC_END = "<!-- features:begin -->", "<!-- features:end -->"


def with_spec_rows(spec: str) -> str:
    """``spec`` with the M.8 block between the markers replaced by :func:`spec_rows`."""
    return splice(spec, SPEC_BEGIN, SPEC_END, "\n" + spec_rows(), document="SPEC.md")


if __name__ == "__main__":
    write_text_atomic(DOC, render())
    write_text_atomic(SPEC, with_spec_rows(SPEC.read_text(encoding="utf-8")))
    sys.stdout.write(f"wrote {DOC} and the rows of {SPEC} M.8\n")
