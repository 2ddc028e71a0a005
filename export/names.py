"""Names that fit the target graph: PEFT module paths, onnxruntime-genai's names, fused projections, LoRA inputs.

**Module paths.** A PEFT adapter names modules by their torch path (``model.layers.0.self_attn.q_proj``).
onnxruntime-genai's model builder names the same Linear ``model.layers.0.attn.q_proj`` (``self_attn``
becomes ``attn``) and stores its weight as ``<genai path>.MatMul.weight`` ([in, out], the second
input of a MatMul), or ``<genai path>.MatMul.weight_Q4`` (and ``_scales``, ``_zp``) for a
``MatMulNBits`` node. :func:`genai_module` maps a PEFT path to genai's; :func:`peft_module` the reverse.

**Fused projections.** genai fuses q/k/v into one ``qkv_proj`` weight by default (and gate/up into
``gate_up_proj`` when asked); Phi-3 checkpoints are fused themselves. :data:`FUSED` lists each fused
projection's parts in output order. Its output axis is the concatenation of the parts' outputs, so a
PEFT module on a part is the column slice [start, stop) of the fused weight. The slice widths come
from the adapters (B's rows); the widths not given follow from the fused width and the parts' rule:
k and v are equally wide (both num_key_value_heads · head_dim), and gate and up are (both
intermediate_size).

**LoRA input names** (``--adapter-names``), for a dynamic graph's inputs and ``.onnx_adapter`` files:

* ``peft`` (lora-ref's default): ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with the
  PEFT module path; also what ``olive convert-adapters`` writes for Llama-style paths (``model.…``);
* ``olive``: what ``olive convert-adapters`` writes for other architectures: the same names with
  PEFT's ``base_model.model.`` prefix kept;
* ``genai``: ``<genai path>.lora_A.MatMul.weight`` / ``<genai path>.lora_B.MatMul.weight``, as in
  graphs made by genai's builder with ``adapter_path`` and by Olive's ExtractAdapters on them;
* ``olive_extract`` (read only, for ``convert-adapters``): Olive's ExtractAdapters on a torch-exported
  PEFT model, ``<prefix>base_model.model.<module>.lora_A.default.weight`` = A^T and
  ``….lora_B.default.weight`` = B^T *without* s: the graph multiplies by the scale of the adapter
  it was exported with, a constant, so files for it carry (s / s_graph)·B^T.

A fused site has one pair of inputs named after the fused projection (``…qkv_proj``). Every scheme
has A_g = A^T [in, r] and B_g = s·B^T [r, out] (``olive_extract``: see above). A dynamic graph records its slot layout (which
PEFT modules fill which columns of each slot) in the metadata key ``lora_ref.lora_slots``, so files
can be made for it later (``lora-ref convert-adapters``); a graph without that record (genai's,
Olive's) is read by its names alone (unfused only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx

from .errors import ExportConfigError

SCHEMES = ("peft", "olive", "genai")
PEFT_PREFIX = "base_model.model."
#: metadata_props key: JSON {stem: [[module, width], ...]} of a dynamic graph's LoRA slots.
SLOTS_KEY = "lora_ref.lora_slots"
#: metadata_props key: the --adapter-names scheme of a dynamic graph.
SCHEME_KEY = "lora_ref.adapter_names"

#: fused projection -> its parts, in the fused weight's output order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: parts of a fused projection that are equally wide (see module docstring).
EQUAL_WIDTHS = {"qkv_proj": ("k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

#: read-only scheme (convert-adapters): graphs from Olive's ExtractAdapters on a torch-exported PEFT model,
#: inputs ``<prefix>base_model.model.<module>.lora_A.default.weight`` = A^T, ``….lora_B.default.weight`` =
#: B^T unscaled (the graph multiplies by the exported adapter's s itself)
EXTRACT = "olive_extract"

_SUFFIXES = {
    EXTRACT: (".lora_A.default.weight", ".lora_B.default.weight", ".lora_B.default.bias"),
    "peft": (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"),
    "olive": (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"),
    "genai": (".lora_A.MatMul.weight", ".lora_B.MatMul.weight", ".lora_B.MatMul.bias"),
}


def strip_prefix(module: str) -> str:
    """``module`` without PEFT's ``base_model.model.`` prefix."""
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def genai_module(module: str) -> str:
    """genai's path of the PEFT module ``module`` (``.self_attn.`` -> ``.attn.``)."""
    return strip_prefix(module).replace(".self_attn.", ".attn.")


def peft_module(genai: str) -> str:
    """The PEFT (HF Llama-family) path of genai's module ``genai`` (``.attn.`` -> ``.self_attn.``)."""
    return genai.replace(".attn.", ".self_attn.")


def fused_parent(module: str) -> tuple[str, str, int] | None:
    """(fused module path, fused name, part index) when ``module`` is a part of a fused projection, else None."""
    parent, _, leaf = strip_prefix(module).rpartition(".")
    for fused, parts in FUSED.items():
        if leaf in parts:
            return f"{parent}.{fused}", fused, parts.index(leaf)
    return None


def part_modules(fused_path: str, fused: str) -> tuple[str, ...]:
    """The PEFT paths of the parts of the fused projection at ``fused_path``."""
    parent = fused_path.rpartition(".")[0]
    return tuple(f"{parent}.{leaf}" for leaf in FUSED[fused])


def part_widths(fused: str, parts: tuple[str, ...], total: int, known: Mapping[str, int]) -> tuple[int, ...] | None:
    """The output widths of ``parts`` (in order) of a fused weight ``total`` wide, or None when undetermined.

    ``known`` gives some widths (from the adapters); the rest follow from the total and
    :data:`EQUAL_WIDTHS`. The widths are checked to add up to ``total``.
    """
    leaves = [p.rpartition(".")[2] for p in parts]
    widths = {leaf: known[p] for leaf, p in zip(leaves, parts) if p in known}
    equal = EQUAL_WIDTHS[fused]
    for leaf in equal:
        if leaf in widths:
            widths.update({other: widths[leaf] for other in equal if other not in widths})
            break
    missing = [leaf for leaf in leaves if leaf not in widths]
    if len(missing) == 1:
        widths[missing[0]] = total - sum(widths.values())
    elif missing and set(missing) == set(equal) and (total - sum(widths.values())) % len(missing) == 0:
        widths.update({leaf: (total - sum(widths.values())) // len(missing) for leaf in missing})
    if len(widths) != len(leaves) or sum(widths.values()) != total or min(widths.values()) <= 0:
        return None
    return tuple(widths[leaf] for leaf in leaves)


def slot_names(stem: str, scheme: str = "peft") -> tuple[str, str, str]:
    """(A, B, bias) input names of the slot ``stem`` (a module path in the scheme's spelling)."""
    if scheme not in SCHEMES:
        raise ExportConfigError(f"--adapter-names must be one of {SCHEMES}, got {scheme!r}")
    a, b, bias = _SUFFIXES[scheme]
    return stem + a, stem + b, stem + bias


def stem_for(module: str, scheme: str) -> str:
    """The slot stem of PEFT module (or fused projection) path ``module`` in ``scheme``."""
    if scheme == "genai":
        return genai_module(module)
    if scheme == "olive" and not module.startswith("model."):
        return PEFT_PREFIX + module
    return module


#: DoRA's magnitude input ``<stem>.lora_magnitude_vector`` [out] (PEFT's key; the same in every scheme:
#: genai and Olive have no name for a fed magnitude, Olive finds DoRA initializers by this substring).
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


def magnitude_name(stem: str) -> str:
    """The DoRA magnitude input of the slot ``stem`` (any scheme)."""
    return stem + MAGNITUDE_SUFFIX


def all_suffixes() -> tuple[str, ...]:
    """Every LoRA input suffix of every scheme, DoRA's magnitude included (longest first, so ``.lora_A.MatMul.weight`` wins)."""
    return tuple(sorted({MAGNITUDE_SUFFIX, *(s for suffixes in _SUFFIXES.values() for s in suffixes)}, key=len, reverse=True))


def detect_scheme(input_names: Iterable[str]) -> str:
    """The naming scheme of a graph's LoRA inputs (``genai`` when they use ``.lora_A.MatMul.weight``)."""
    names = list(input_names)
    if any(n.endswith(_SUFFIXES[EXTRACT][0]) for n in names):
        return EXTRACT
    if any(n.endswith(_SUFFIXES["genai"][0]) for n in names):
        return "genai"
    if any(n.startswith(PEFT_PREFIX) and n.endswith(_SUFFIXES["peft"][0]) for n in names):
        return "olive"
    return "peft"


@dataclass(frozen=True)
class SlotLayout:
    """Which PEFT modules fill one LoRA slot: ``parts`` = ((module, out width), ...) in output order."""

    stem: str
    parts: tuple[tuple[str, int], ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def write_layouts(model: onnx.ModelProto, layouts: Mapping[str, SlotLayout], scheme: str) -> None:
    """Record ``layouts`` and ``scheme`` in ``model``'s metadata (replacing earlier records)."""
    keep = [p for p in model.metadata_props if p.key not in (SLOTS_KEY, SCHEME_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = {stem: [list(part) for part in layout.parts] for stem, layout in layouts.items()}
    model.metadata_props.add(key=SLOTS_KEY, value=json.dumps(entry, sort_keys=True))
    model.metadata_props.add(key=SCHEME_KEY, value=scheme)


def read_layouts(model: onnx.ModelProto, stems: Iterable[str]) -> tuple[dict[str, SlotLayout], str]:
    """The slot layouts and scheme of a dynamic graph with slot ``stems``.

    From the ``lora_ref.lora_slots`` record when there is one; otherwise each stem is one PEFT
    module, named by the scheme detected from the stems (genai paths mapped back to PEFT's).
    """
    props = {p.key: p.value for p in model.metadata_props}
    stems = list(stems)
    if SLOTS_KEY in props:
        entry = json.loads(props[SLOTS_KEY])
        layouts = {stem: SlotLayout(stem, tuple((m, int(w)) for m, w in parts)) for stem, parts in entry.items()}
        return layouts, props.get(SCHEME_KEY, "peft")
    scheme = props.get(SCHEME_KEY) or detect_scheme(info.name for info in model.graph.input)
    layouts = {}
    for stem in stems:
        if scheme == EXTRACT and PEFT_PREFIX in stem:  # the exporter's wrapper may add a prefix before PEFT's
            module = stem[stem.index(PEFT_PREFIX) + len(PEFT_PREFIX):]
        else:
            module = peft_module(stem) if scheme == "genai" else strip_prefix(stem)
        layouts[stem] = SlotLayout(stem, ((module, -1),))
    return layouts, scheme
