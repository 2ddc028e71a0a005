"""Issue 15 part 3: a CLI scripts can rely on (one-line refusals, --json reports, --overwrite, examples, progress)."""

from __future__ import annotations

import subprocess
import sys

import pytest

REFERENCE = "lora_ref.conformance.reference_impl:factory"


def lora_ref_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("how", [["--impl", REFERENCE], ["--cmd", "true"]])
def test_conformance_filters_matching_nothing_exit_2_with_one_line(how: list[str]) -> None:
    done = lora_ref_cli("conformance", "run", *how, "-k", "no-such-case-id-anywhere")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no case matches" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("program", ["lora-ref-no-such-program-xyz", "./not-here.sh"])
def test_conformance_cmd_naming_no_program_exits_2_with_one_line(program: str, tmp_path) -> None:
    done = lora_ref_cli("conformance", "run", "--cmd", f"{program} --flag", "--op", "linear.forward", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and program in done.stderr and "ERROR" not in done.stdout + done.stderr


@pytest.fixture()
def workdir(tmp_path):
    import numpy as np

    from lora_ref import save_adapter
    from lora_ref.demo import build_demo_model
    from lora_ref.safetensors_io import save_file

    weights, adapter = build_demo_model(np.dtype(np.float32))
    save_file(tmp_path / "base.safetensors", weights)
    save_adapter(adapter, tmp_path / "ad")
    save_adapter(adapter, tmp_path / "ad2")
    return tmp_path


def _targets(workdir) -> dict[str, int]:
    """base key -> element count of every tensor the adapter changes, read with the safetensors package (not ours)."""
    import json as _json

    from safetensors.numpy import load_file

    base = load_file(str(workdir / "base.safetensors"))
    config = _json.loads((workdir / "ad" / "adapter_config.json").read_text())
    factors = load_file(str(workdir / "ad" / "adapter_model.safetensors"))
    modules = {k.split(".lora_A")[0].removeprefix("base_model.model.") for k in factors if ".lora_A" in k}
    assert config["r"] > 0 and modules
    return {f"{m}.weight": base[f"{m}.weight"].size for m in modules}


def test_merge_json_to_stdout_is_the_only_stdout_and_counts_each_tensor(workdir) -> None:
    import json

    done = lora_ref_cli("merge", str(workdir / "base.safetensors"), str(workdir / "ad"), "-o", str(workdir / "m.safetensors"),
                        "--residual", str(workdir / "r.safetensors"), "--json", "-")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert report["merged"] == _targets(workdir) and report["elements"] == sum(_targets(workdir).values())
    assert report["output"] == str(workdir / "m.safetensors") and report["residual"]["path"] == str(workdir / "r.safetensors")
    assert 0 < report["residual"]["bytes"] <= (workdir / "r.safetensors").stat().st_size  # tensor bytes, without the header
    back = lora_ref_cli("unmerge", str(workdir / "m.safetensors"), str(workdir / "ad"), "-o", str(workdir / "u.safetensors"),
                        "--residual", str(workdir / "r.safetensors"), "--json")
    unmerged = json.loads(back.stdout)
    assert back.returncode == 0 and unmerged["mode"] == "exact" and unmerged["verified"] is True
    assert unmerged["unmerged"] == _targets(workdir)
    assert (workdir / "u.safetensors").read_bytes() == (workdir / "base.safetensors").read_bytes()


def test_json_to_a_file_keeps_the_summary_and_quiet_prints_nothing(workdir) -> None:
    import json

    loud = lora_ref_cli("combine", str(workdir / "ad"), str(workdir / "ad2"), "--method", "cat", "-o", str(workdir / "c"),
                        "--json", str(workdir / "c.json"))
    assert loud.returncode == 0 and loud.stdout.startswith("cat: 2 adapters")
    report = json.loads((workdir / "c.json").read_text())
    ranks = json.loads((workdir / "ad" / "adapter_config.json").read_text())["r"] * 2  # cat: ranks add up
    assert report["output"] == str(workdir / "c") and report["rank"] == ranks
    assert set(report["modules"]) == {k.removesuffix(".weight") for k in _targets(workdir)}
    quiet = lora_ref_cli("--quiet", "merge", str(workdir / "base.safetensors"), str(workdir / "ad"), "-o", str(workdir / "q.safetensors"))
    assert quiet.returncode == 0 and quiet.stdout == "" and (workdir / "q.safetensors").is_file()
    failed = lora_ref_cli("--quiet", "merge", str(workdir / "none.safetensors"), str(workdir / "ad"), "-o", str(workdir / "x.safetensors"))
    assert failed.returncode == 2 and failed.stdout == "" and failed.stderr.startswith("lora-ref: error: ")


def test_conformance_list_json() -> None:
    import json

    done = lora_ref_cli("conformance", "list", "--op", "linear.forward", "--json", "-")
    report = json.loads(done.stdout)
    table = lora_ref_cli("conformance", "list", "--op", "linear.forward").stdout.splitlines()
    assert report["count"] == len(report["cases"]) == len(table) - 1 > 0
    assert [c["id"] for c in report["cases"]] == [line.split()[0] for line in table[:-1]]
    assert {c["operation"] for c in report["cases"]} == {"linear.forward"}


def test_an_existing_output_is_refused_without_overwrite_for_every_writing_command(workdir) -> None:
    """One rule (cli/paths.py): an existing output file is replaced only with --overwrite; refused, untouched, exit 2."""
    base, ad = str(workdir / "base.safetensors"), str(workdir / "ad")
    assert lora_ref_cli("merge", base, ad, "-o", str(workdir / "m.safetensors"), "--residual", str(workdir / "r.safetensors")).returncode == 0
    merged = str(workdir / "m.safetensors")
    taken = workdir / "taken"
    taken.write_bytes(b"someone's file")
    for name in ("model.onnx", "base.gguf", "g.onnx"):  # never parsed: the guard refuses first
        (workdir / name).write_bytes(b"not read")
    (workdir / "c").mkdir()
    (workdir / "c" / "adapter_model.safetensors").write_bytes(b"someone's file")
    commands = {
        "merge -o": ["merge", base, ad, "-o", str(taken)],
        "merge --residual": ["merge", base, ad, "-o", str(workdir / "new.safetensors"), "--residual", str(taken)],
        "unmerge -o": ["unmerge", merged, ad, "-o", str(taken)],
        "combine -o DIR": ["combine", ad, ad, "--method", "cat", "-o", str(workdir / "c")],
        "inspect --json": ["inspect", ad, "--json", str(taken)],
        "conformance list --json": ["conformance", "list", "--json", str(taken)],
        "conformance run --junit": ["conformance", "run", "--impl", REFERENCE, "--op", "linear.forward", "--junit", str(taken)],
        "export -o": ["export", str(workdir / "model.onnx"), ad, "--mode", "merged", "-o", str(taken)],
        "to-gguf -o": ["to-gguf", ad, "--base", str(workdir / "base.gguf"), "-o", str(taken)],
        "convert-adapters --json": ["convert-adapters", ad, "--graph", str(workdir / "g.onnx"), "-o", str(workdir / "o"), "--json", str(taken)],
    }
    for what, argv in commands.items():
        done = lora_ref_cli(*argv)
        assert done.returncode == 2 and "already exists; pass --overwrite" in done.stderr and done.stderr.count("\n") == 1, (what, done.stderr)
        assert taken.read_bytes() == (workdir / "c" / "adapter_model.safetensors").read_bytes() == b"someone's file", what
    replaced = lora_ref_cli("merge", base, ad, "-o", str(taken), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    from safetensors.numpy import load_file

    assert load_file(str(taken)).keys() == load_file(base).keys()  # replaced by the merged model


def test_every_writing_command_offers_overwrite() -> None:
    from lora_ref.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "merge" in a.choices).choices
    conformance = next(a for a in sub["conformance"]._actions if a.choices and "run" in (a.choices or {})).choices
    parsers = {**{n: sub[n] for n in ("merge", "unmerge", "combine", "export", "to-gguf", "convert-adapters", "inspect")},
               "conformance run": conformance["run"], "conformance list": conformance["list"]}
    for name, parser in parsers.items():
        assert any("--overwrite" in a.option_strings for a in parser._actions), name


def test_not_an_adapter_directory_says_what_is_missing(workdir) -> None:
    import shutil

    no_config = workdir / "no_config"
    shutil.copytree(workdir / "ad", no_config)
    (no_config / "adapter_config.json").unlink()
    model = workdir / "model_dir"
    model.mkdir()
    shutil.copy(workdir / "base.safetensors", model / "model.safetensors")
    empty = workdir / "empty"
    empty.mkdir()
    for folder, says in [(no_config, "missing adapter_config.json;"),
                         (model, "missing adapter_config.json and adapter_model.safetensors; it holds model.safetensors"),
                         (empty, "missing adapter_config.json and adapter_model.safetensors; a PEFT adapter folder")]:
        done = lora_ref_cli("inspect", str(folder))
        assert done.returncode == 2 and "not an adapter directory" in done.stderr and says in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


def test_pickled_adapter_refusal_names_the_conversion(workdir) -> None:
    pickled = workdir / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((workdir / "ad" / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"never opened")
    done = lora_ref_cli("inspect", str(pickled))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "torch.load('adapter_model.bin', weights_only=True)" in done.stderr and "adapter_model.safetensors" in done.stderr


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_counts_bytes_percentage_and_eta_on_a_tty() -> None:
    from lora_ref.cli.progress import Progress

    now = [0.0]
    stream = _Stream(tty=True)
    progress = Progress("merge", {"a": 1024, "b": 3072}, stream=stream, clock=lambda: now[0])
    progress("a")
    now[0] = 2.0  # a (1 KiB of 4 KiB) took 2 s: the other 3 KiB at that rate take 6 s
    progress("b")
    last = stream.text.split("\r")[-1]
    assert "merge 2/2 (25%) 1.0 KiB/4.0 KiB ETA 0:00:06 b" in last
    progress.close()
    assert stream.text.endswith("\n") and stream.text.startswith("\r")  # the summary then starts on its own line


def test_progress_off_a_tty_is_plain_periodic_lines() -> None:
    from lora_ref.cli.progress import Progress

    now = [0.0]
    stream = _Stream(tty=False)
    progress = Progress("unmerge", {f"t{i}": 10 for i in range(10)}, stream=stream, interval=5.0, clock=lambda: now[0])
    for i in range(10):
        now[0] = 2.0 * i  # one line per 5 s at most: at 6 s and 12 s (and 18 s), none at the start
        progress(f"t{i}")
    progress.close()
    lines = stream.text.splitlines()
    assert "\r" not in stream.text and len(lines) == 3, lines
    assert lines[0].startswith("  unmerge 4/10 (30%) 30 B/100 B ETA 0:00:14")  # 30 B in 6 s -> 70 B in 14 s
