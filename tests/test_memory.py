"""Peak memory of checkpoint merge/unmerge is bounded by the row block, not by the model or a tensor.

The test sets a memory cap from the block size, builds a checkpoint several times larger than
the cap (each tensor alone is larger than the cap too), merges and unmerges it, and measures the
peak of Python/NumPy heap allocations with tracemalloc (NumPy reports its data buffers to it).
Memory-mapped input and output pages are file-backed page cache, not heap, so they are not
counted: that is the point of streaming. Asserted against the bound, never against time.

The bound. A merge keeps at most ``LIVE_BLOCKS`` block-sized float64 temporaries alive at once:
W[rows] as float64, the Δ accumulator, one rank-1 outer product, s·Δ, W + Δ, and in exact mode
round(W') as float64 and W' − Δ; rounding and the bitwise comparison add arrays of at most half
a block (float32/uint32) or an eighth (bool), covered by the last slot. With the numba kernels (lora_ref/kernels.py) a block holds twice the
elements and no float64 temporary: int32 found positions (one block's bytes), the merged block
when the output is a file and the exact resolution's restored block (each at most 4 bytes an
element: one block's bytes), so 3 of the slots. Exact mode also holds
one tensor's residual (flat int64 index + value per differing element): its per-block pieces
and their concatenation, so 2 × the largest tensor's residual bytes; earlier tensors' residuals
are spilled to disk. Unmerge reads the residual file through a memory mapping (no heap), and
its per-tensor work is the same blocks. The adapter's factors and Python bookkeeping fit in
``SLACK``.

What is measured is the merge's data, never one-time code: the first merge in a process imports
the built-in layer kinds (lora_ref.kinds loads lora_ref.conv and lora_ref.embedding on first use),
and loading them allocates ~950 KiB while it runs. :func:`_peak` loads them before it starts
tracing, so the peak is the same whichever test (or test module) runs first. Float32, fast, one
thread: 1403 KiB as the first merge of a fresh process (over the 768 KiB cap), 456 KiB as any
later one. tracemalloc counts every thread of the process: a failure names the other threads
alive, in case one left by another test allocated during the measurement.
"""

from __future__ import annotations

import importlib
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lora_ref.adapter import Adapter, LoraModule
from lora_ref.checkpoint import merge_checkpoint, unmerge_checkpoint
from lora_ref.config import LoraConfig
from lora_ref.kinds import kinds
from lora_ref.safetensors_io import SafetensorsWriter

lora_merge = importlib.import_module("lora_ref.merge")  # the package re-exports a function named merge

BLOCK = 64 * 1024  # bytes of one float64 row block
LIVE_BLOCKS = 8
SLACK = 256 * 1024  # adapter factors (6 modules x r=4 x (1024 + 512) x 4 bytes = 147 KiB) and bookkeeping
CAP = LIVE_BLOCKS * BLOCK + SLACK  # 768 KiB
ROWS, COLS, N_TENSORS = 512, 1024, 6  # 2 MiB per float32 tensor (4 MiB as float64), 12 MiB + bias in all


def _adapter(r: int = 4) -> Adapter:
    rng = np.random.default_rng(0)
    names = [f"layers.{i}.proj" for i in range(N_TENSORS)]
    # trained-adapter magnitudes (|ΔW| ~ 0.1 |W|), so the exact residual has its typical size
    modules = {n: LoraModule(n, rng.standard_normal((r, COLS)).astype(np.float32),
                             0.02 * rng.standard_normal((ROWS, r)).astype(np.float32)) for n in names}
    return Adapter(LoraConfig(r=r, lora_alpha=8, target_modules=["proj"]), modules)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_TENSORS targeted [ROWS, COLS] float32 weights plus an untargeted one, written through mapped output."""
    path = tmp_path_factory.mktemp("mem") / "base.safetensors"
    specs = [(f"layers.{i}.proj.weight", np.dtype(np.float32), (ROWS, COLS)) for i in range(N_TENSORS)]
    specs.append(("embed.weight", np.dtype(np.float32), (ROWS, COLS)))
    rng = np.random.default_rng(1)
    with SafetensorsWriter(path, specs) as writer:
        for name, _, shape in specs:
            out = writer.reserve(name)
            for start in range(0, ROWS, 64):
                out[start:start + 64] = rng.standard_normal((64, COLS), dtype=np.float32)
    return path


@pytest.fixture(scope="module", autouse=True)
def _warm(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """One merge and unmerge of each kind before any measurement: importing numba and loading (or
    compiling) the kernels of lora_ref/kernels.py allocate tens of MiB once per process, not per tensor."""
    folder = tmp_path_factory.mktemp("warm")
    for dtype in (None, "bfloat16"):
        merge_checkpoint(checkpoint, _adapter(), folder / "m.st", residual_path=folder / "r.st", dtype=dtype, block_bytes=BLOCK)
        unmerge_checkpoint(folder / "m.st", _adapter(), folder / "b.st", residual_path=folder / "r.st", block_bytes=BLOCK)
        merge_checkpoint(checkpoint, _adapter(), folder / "f.st", dtype=dtype, block_bytes=BLOCK)
        unmerge_checkpoint(folder / "f.st", _adapter(), folder / "g.st", block_bytes=BLOCK)


def _peak(call) -> tuple[int, object]:
    """Peak heap bytes above the start while ``call()`` runs, and its result (one-time imports done first)."""
    kinds()  # imports the built-in kinds' modules now, outside the measurement (module docstring)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


def _others() -> str:
    """The other threads alive (their allocations count in tracemalloc's peak too)."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    return f"other threads alive: {others}" if others else "no other thread alive"


def test_checkpoint_is_several_times_the_cap(checkpoint: Path) -> None:
    assert checkpoint.stat().st_size >= 8 * CAP
    assert ROWS * COLS * 4 > CAP  # one tensor alone (even in its own dtype) exceeds the cap


# merge.py splits the block budget between its threads and keeps at most 2 blocks per thread in flight
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["same-dtype", "to-bf16"])
def test_merge_unmerge_peak_within_block_bound(checkpoint: Path, tmp_path: Path, exact: bool, dtype, threads: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_merge, "MAX_THREADS", threads)
    adapter = _adapter()
    merged, residual = tmp_path / "merged.safetensors", tmp_path / "residual.safetensors"
    peak, report = _peak(lambda: merge_checkpoint(checkpoint, adapter, merged, residual_path=residual if exact else None,
                                                  dtype=dtype, block_bytes=BLOCK))
    itemsize = 2 if dtype == "bfloat16" else 4
    largest = max(report.residual_counts.values(), default=0) * (8 + itemsize)  # int64 index + value
    bound = CAP + 2 * largest
    print(f"merge {dtype or 'float32'} {'exact' if exact else 'fast'} {threads} thread(s): peak {peak / 2**10:.0f} KiB, "
          f"bound {bound / 2**10:.0f} KiB, checkpoint {checkpoint.stat().st_size / 2**20:.1f} MiB")
    assert report.tensors_written == N_TENSORS + 1 and len(report.merged) == N_TENSORS
    assert peak <= bound, _others()

    restored = tmp_path / "restored.safetensors"
    peak, _ = _peak(lambda: unmerge_checkpoint(merged, adapter, restored, residual_path=residual if exact else None,
                                               block_bytes=BLOCK))
    # unmerge: W' as float64, Δ (accumulator, outer product, scaled), W' − Δ; the residual is mapped
    bound = CAP
    print(f"unmerge: peak {peak / 2**10:.0f} KiB, bound {bound / 2**10:.0f} KiB")
    assert peak <= bound, _others()
    if exact and dtype is None:  # and the streamed result is still exact
        assert restored.read_bytes() == checkpoint.read_bytes()


def test_bound_detects_a_full_tensor_temporary(checkpoint: Path, tmp_path: Path) -> None:
    """Control: the same measurement on a merge that materialises one float64 tensor exceeds the cap."""
    from lora_ref.safetensors_io import load_file

    def whole_tensor() -> None:
        W = load_file(checkpoint, ["layers.0.proj.weight"])["layers.0.proj.weight"]
        (W.astype(np.float64) + 1).astype(np.float32)

    peak, _ = _peak(whole_tensor)
    assert peak > CAP


def test_exact_merge_of_many_tensors_holds_few_files_open(tmp_path: Path) -> None:
    """Exact mode spills each tensor's residual as it goes: with 600 targeted tensors and the
    process limited to 64 open files, the merge and the exact unmerge succeed and restore the
    base bit for bit (one spill file per tensor, kept open, ran out of descriptors at ~10k)."""
    import subprocess
    import sys

    script = f"""
import resource, numpy as np
from pathlib import Path
from lora_ref.adapter import Adapter, LoraModule
from lora_ref.checkpoint import merge_checkpoint, unmerge_checkpoint
from lora_ref.config import LoraConfig
from lora_ref.safetensors_io import load_file, save_file
rng = np.random.default_rng(0)
n = 600
base = {{f"m{{i}}.weight": rng.standard_normal((4, 4)).astype(np.float32) for i in range(n)}}
modules = {{f"m{{i}}": LoraModule(f"m{{i}}", rng.standard_normal((2, 4)).astype(np.float32),
                                rng.standard_normal((4, 2)).astype(np.float32)) for i in range(n)}}
adapter = Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(modules)), modules)
root = Path({str(tmp_path)!r})
save_file(root / "base.safetensors", base)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
merge_checkpoint(root / "base.safetensors", adapter, root / "merged.safetensors", residual_path=root / "res.safetensors")
unmerge_checkpoint(root / "merged.safetensors", adapter, root / "back.safetensors", residual_path=root / "res.safetensors")
back = load_file(root / "back.safetensors")
assert all(back[k].tobytes() == v.tobytes() for k, v in base.items())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
