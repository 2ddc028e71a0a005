"""SPEC.md is one hop from the code: every formula section names the functions that compute it,
and no name SPEC mentions has gone stale.

Rules checked (conformance/SPEC.md):

- A *numbered section* is a heading ``## N.`` / ``## L.`` or ``### N.k`` / ``### L.k`` (N a
  number, L a capital letter: ``## 1. Conventions``, ``### M.3 ...``); its body runs to the next
  heading (for a ``##`` section: to its first subsection).
- A numbered section is a *formula section* when its body, without generated blocks
  (``<!-- x:begin --> ... <!-- x:end -->``), table rows and code spans, holds display math (an
  indented block after a blank line: how SPEC writes displayed formulas) or an inline formula:
  one of ``= ≤ ≥ Σ ∘ γ ‖ √ Δ`` or ``round_t`` / ``RN_t``. Sections whose title says
  ``deviations`` describe what a peer does, not what to compute, and are not formula sections.
- Every formula section has a line ``Implemented by: `lora_ref.module.function`, ...``; every
  backticked ``lora_ref.`` name on such a line resolves to a function, class, method or property
  (not a module: a module is not one hop).
- Anywhere in SPEC, every backticked ``lora_ref.a.b...`` name resolves (module or attribute); a
  one-dot name that is no module (``lora_ref.merge_semantics``) is a metadata key, and must be a
  string literal in the code that writes it; a short ``module.attribute`` name of a module of
  lora_ref or export (``parity.dora_gain_error``) resolves unless it is a conformance operation
  (``dora.merge``) or a key the code writes (``adapter.type``, a string literal in the code); a
  backticked ``*.py`` path exists.
- The depth K that SPEC states for the forward and merge operations (C.3, 4.1, 4.2) is the K of
  every frozen case of those operations.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from pathlib import Path

import pytest

from lora_ref.conformance.operations import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "conformance" / "SPEC.md"

HEADING = re.compile(r"^(#{1,3}) (.*)$", re.M)
NUMBERED = re.compile(r"^(\d+|[A-Z])(\.\d+)?[. ]")
GENERATED = re.compile(r"<!-- (\w+):begin.*?<!-- \1:end -->", re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
DISPLAY = re.compile(r"\n[ \t]*\n {4}\S")
INLINE_MATH = re.compile(r"[=≤≥Σ∘γ‖√Δ]|round_t|RN_t")
LINK_LINE = re.compile(r"^Implemented by: (.+)$", re.M)
DOTTED = re.compile(r"\blora_ref(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = (".json", ".safetensors", ".onnx", ".onnx_adapter", ".py", ".md", ".gguf", ".bin", ".data", ".pbtxt",
                 ".txt", ".xml")


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of every heading, the body up to the next heading of any level."""
    marks = list(HEADING.finditer(text))
    return [(m.group(2), text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)]


def is_formula_section(title: str, body: str) -> bool:
    if not NUMBERED.match(title) or "deviations" in title.lower():
        return False
    prose = CODE_SPAN.sub("", GENERATED.sub("", body))
    prose = "\n".join(line for line in prose.split("\n") if not line.lstrip().startswith("|"))
    return bool(DISPLAY.search(prose) or INLINE_MATH.search(prose))


def resolve(name: str) -> object:
    """The object a dotted name denotes: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise LookupError(f"{name}: {'.'.join(parts[:cut])} has no {attr!r}")
            obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        return obj
    raise LookupError(f"{name}: no module")


def is_code_unit(obj: object) -> bool:
    """A function, class, method or property: what one hop from a formula may land on."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, property) or inspect.ismethod(obj)


def code_literals() -> str:
    return "\n".join(p.read_text() for folder in ("lora_ref", "export") for p in (ROOT / folder).rglob("*.py"))


TEXT = SPEC.read_text()
FORMULA_SECTIONS = [(t, b) for t, b in sections(TEXT) if is_formula_section(t, b)]


def test_the_definition_finds_the_formula_sections():
    """The rule picks the sections that define computations and skips the ones that do not."""
    titles = [t for t, _ in FORMULA_SECTIONS]
    for expected in ("2.2 Scaling", "2.3 Forward", "2.4 Backward", "3.2 Merge semantics", "3.3 The fast round-trip bound",
                     "4.1 Embedding", "4.2 Conv1d", "4.3 DoRA", "M.1 Mixed batch", "M.3 Weighted combination",
                     "M.4 Adapter trees", "E.2 Graph kinds", "E.5 Conformance", "C.3 Tolerances", "G.2 Keeping"):
        assert any(t.startswith(expected) for t in titles), expected
    for not_formula in ("2. Linear LoRA", "3.6 Files", "M.7 PEFT", "PEFT 0.21.2 deviations", "Seen by"):
        assert not any(t.startswith(not_formula) for t in titles), not_formula
    assert is_formula_section("9.9 New", "\n\n    y = f(x)\n") and not is_formula_section("9.9 New", "`y = f(x)` only\n")


@pytest.mark.parametrize("title, body", FORMULA_SECTIONS, ids=[t.split(" ")[0] for t, _ in FORMULA_SECTIONS])
def test_every_formula_section_names_its_code(title, body):
    links = LINK_LINE.findall(body)
    assert links, (f"SPEC section {title!r} states a formula but names no code: add a line "
                   "'Implemented by: `lora_ref.module.function`' (the function that computes it)")
    for line in links:
        names = DOTTED.findall(" ".join(CODE_SPAN.findall(line)))
        assert names, f"SPEC {title!r}: 'Implemented by:' names nothing: {line!r}"
        for name in names:
            obj = resolve(name)
            assert is_code_unit(obj), f"SPEC {title!r}: {name} is a {type(obj).__name__}, not a function or class"


def test_every_dotted_name_in_spec_resolves():
    literals = code_literals()
    spans = CODE_SPAN.findall(TEXT)
    names = sorted({n for span in spans for n in DOTTED.findall(span)})
    assert len(names) > 50
    for name in names:
        try:
            resolve(name)
        except LookupError:
            assert name.count(".") == 1 and f'"{name}"' in literals, f"SPEC names {name}, which does not exist"
    modules = {p.stem for folder in ("lora_ref", "export") for p in (ROOT / folder).rglob("*.py")}
    operations = set(OPERATIONS)  # conformance operation names (`dora.merge`) are not code names
    for span in {s.strip("`") for s in spans}:
        short = re.fullmatch(r"([a-z_]+)\.([A-Za-z_]\w*)", span)
        if short and short.group(1) in modules and not span.endswith(FILE_SUFFIXES) and span not in operations:
            owners = [p for folder in ("lora_ref", "export") for p in (ROOT / folder).rglob(f"{short.group(1)}.py")]
            defined = any(re.search(rf"^\s*(def|class) {short.group(2)}\b|^{short.group(2)}\b", p.read_text(), re.M)
                          for p in owners)
            assert defined or f'"{span}"' in literals, f"SPEC names {span}, which does not exist"


def test_every_file_spec_names_exists():
    for span in sorted({s.strip("`") for s in CODE_SPAN.findall(TEXT)}):
        if not re.fullmatch(r"[\w/.-]+\.py", span):
            continue
        if "/" in span:
            assert (ROOT / span).exists(), f"SPEC names {span}, which does not exist"
        else:
            assert any(ROOT.glob(f"*/**/{span}")), f"SPEC names {span}, which does not exist"


def test_resolve_catches_stale_names():
    """The checks can fail: names that SPEC once carried and the code no longer has."""
    for stale in ("lora_ref.merge.merge_exact", "lora_ref.merge.unmerge_exact", "lora_ref.nothing.here"):
        with pytest.raises(LookupError):
            resolve(stale)
    assert not is_code_unit(resolve("lora_ref.merge"))
    assert is_code_unit(resolve("lora_ref.dora.Dora.forward64"))
    assert is_code_unit(resolve("lora_ref.conformance.runner.CaseResult.verdict"))


def _section(title_start: str) -> str:
    return next(body for title, body in sections(TEXT) if title.startswith(title_start))


def _depth(expression: str, A_shape: tuple[int, ...]) -> int:
    """A SPEC depth such as ``in + r + 6`` or ``C·kh·kw + r + 6`` for lora_A of ``A_shape`` [r, in] / [r, C, *k]."""
    values = {"r": A_shape[0], "in": A_shape[1], "C·kh·kw": math.prod(A_shape[1:]), "C·∏k": math.prod(A_shape[1:])}
    terms = [t.strip() for t in expression.split("+")]
    return sum(int(t) if t.isdigit() else values[t] for t in terms)


def test_spec_depths_are_the_frozen_cases_depths():
    """The K that SPEC states per operation (C.3, and 4.1 / 4.2 for the layer kinds) is the K every frozen
    case of that operation carries: SPEC once said r + 3 for Embedding where the cases use r + 6."""
    c3 = _section("C.3")
    stated = {
        "linear.forward": re.search(r"linear\.forward K = ([^;,]+)[;,]", c3).group(1),
        "embedding.forward": re.search(r"embedding\.forward K = ([^;,(]+?)[,(]", c3).group(1),
        "conv2d.forward": re.search(r"conv2d\.forward K = ([^;,]+)[;,]", c3).group(1),
        "merge": re.search(r"merge and unmerge K = ([^;(]+?) \(every kind\)", c3).group(1),
    }
    assert re.search(r"K = ([^(.]+?) \(C\.3\)", _section("4.1")).group(1) == stated["embedding.forward"]
    conv_general = re.search(r"K = (C·∏k \+ [^.]+?)\.", _section("4.2")).group(1)
    kinds = ("linear", "embedding", "conv1d", "conv2d", "conv3d")
    expected = {f"{kind}.{action}": stated["merge"] for kind in kinds for action in ("merge", "unmerge")}
    expected.update({"linear.forward": stated["linear.forward"], "embedding.forward": stated["embedding.forward"],
                     "conv2d.forward": stated["conv2d.forward"], "conv1d.forward": conv_general, "conv3d.forward": conv_general})
    checked = 0
    for path in sorted((ROOT / "conformance" / "cases").glob("*/*/case.json")):
        case = json.loads(path.read_text())
        if case["operation"] not in expected or "A" not in case["inputs"]:
            continue
        A_shape = tuple(case["inputs"]["A"]["shape"])
        for name, output in case["outputs"].items():
            if output.get("check") == "bound":
                assert output["K"] == _depth(expected[case["operation"]], A_shape), (case["id"], name)
                checked += 1
    assert checked > 100
