"""bench/README.md is exactly what bench/readme.py renders from the committed bench/results/*.json.

No benchmark runs here: the renderers read JSON only. The checks can fail: a figure changed in a
results file shows up in the rendered text, a results file without a table or renderer is refused,
and a section needs no field beyond what its script writes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load_readme():
    spec = importlib.util.spec_from_file_location("bench_readme", BENCH / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme = _load_readme()


def test_committed_readme_is_generated_from_the_committed_results():
    assert (BENCH / "README.md").read_text() == readme.render(), (
        "bench/README.md differs from what bench/results/*.json give: run python bench/readme.py")


def test_every_results_file_has_its_own_renderer():
    stems = {p.stem for p in (BENCH / "results").glob("*.json")}
    assert stems, "no bench/results/*.json"
    missing = sorted(stems - set(readme.RENDERERS))
    assert not missing, f"results without a renderer in bench/readme.py: {missing}"


def test_every_section_is_in_the_readme():
    text = (BENCH / "README.md").read_text()
    for stem in (p.stem for p in (BENCH / "results").glob("*.json")):
        heading, _ = readme.RENDERERS[stem]
        assert f"<!-- bench:{stem} " in text and f"## {heading}\n" in text, stem


def _copy_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    return results


def test_a_changed_figure_changes_the_readme(tmp_path):
    results = _copy_results(tmp_path)
    path = results / "conformance.json"
    data = json.loads(path.read_text())
    data["rows"][1]["seconds"] = 1234.5  # reference, subprocess: table cell and the computed sentence
    path.write_text(json.dumps(data))
    text = readme.render(results)
    assert "| 1234.50 |" in text
    persistent = data["rows"][2]["seconds"]
    assert f"1234.50 s -> {persistent:.2f} s, {1234.5 / persistent:.0f}x" in text
    assert text != readme.render(BENCH / "results")


def test_sections_need_only_what_the_scripts_record(tmp_path):
    """Fields newer scripts add (merge's alpha, dtypes' repeats, matching's CPU time) are optional."""
    results = _copy_results(tmp_path)
    merge = json.loads((results / "merge.json").read_text())
    merge.update(alpha=32, merge_threads=2)
    merge.pop("kernels", None)
    (results / "merge.json").write_text(json.dumps(merge))
    matching = json.loads((results / "matching.json").read_text())
    matching["rows"][-1]["cpu_s"] = 19.25
    (results / "matching.json").write_text(json.dumps(matching))
    text = readme.render(results)
    assert "r=16, alpha=32, medians" in text and "merge threads 2." in text
    assert f"{readme._number(matching['rows'][-1]['lora_ref_s'])} wall, 19.2 CPU" in text
    merge["kernels"] = "numba"
    (results / "merge.json").write_text(json.dumps(merge))
    assert "merge threads 2, numba path (lora_ref/kernels.py)." in readme.render(results)


def test_a_results_file_without_table_or_renderer_is_refused(tmp_path):
    results = _copy_results(tmp_path)
    (results / "newbench.json").write_text(json.dumps({"rows": [{"x": 1}]}))
    with pytest.raises(KeyError, match="newbench"):
        readme.render(results)
    recorded = {"command": "python bench/bench_newbench.py", "table": "| a |\n|---|\n| 1 |"}
    (results / "newbench.json").write_text(json.dumps(recorded))
    assert "## newbench\n" in readme.render(results) and "| 1 |" in readme.render(results)


def test_the_check_flag(tmp_path, monkeypatch):
    assert readme.main(["--check"]) == 0
    stale = tmp_path / "README.md"
    stale.write_text((BENCH / "README.md").read_text() + "a hand-written line\n")
    monkeypatch.setattr(readme, "README", stale)
    assert readme.main(["--check"]) == 1
