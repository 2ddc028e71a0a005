"""Writes the files in this folder with lora-ref as released before the merge semantics had a name
(main at d4d7a26, which merged in the fixed order): run from that checkout,
``PYTHONPATH=<release checkout> python tests/data/fixed_order_v1/make.py``. The files are committed;
tests/test_merge_semantics.py unmerges them with today's code, which must restore the base bit for bit.
"""

from pathlib import Path

import numpy as np

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.config import LoraConfig
from lora_ref.dtypes import round_to, resolve_dtype
from lora_ref.safetensors_io import save_file

HERE = Path(__file__).resolve().parent

for name in ("float32", "float16", "bfloat16"):
    t = resolve_dtype(name)
    rng = np.random.default_rng(13)
    r, out_f, in_f = 24, 96, 80
    # a delta of W's size, so the fixed-order and the correctly rounded unmerge differ somewhere
    base = {"layer.q.weight": round_to(rng.normal(size=(out_f, in_f)), t),
            "layer.v.weight": round_to(rng.normal(size=(out_f, in_f)), t),
            }
    modules = {m: LoraModule(m, round_to(rng.normal(size=(r, in_f)), t), round_to(rng.normal(size=(out_f, r)), t) * 0.3)
               for m in ("layer.q", "layer.v")}
    # Element (0, 0) of layer.q: W = 2^k, Δ = 3·2^k − 2^(k−p) − ε (k increasing: the fixed order drops
    # ε, which is below half an ulp of 3·2^k in float64). Merged: 4·2^k in both evaluations. Unmerged:
    # the fixed order gets 2^k + 2^(k−p), a tie that rounds to even, 2^k = W (no residual entry);
    # the exact value 2^k + 2^(k−p) + ε rounds up. So reading this file with the correctly rounded
    # evaluation would leave one wrong bit: the test sees which evaluation unmerge used.
    k, p, eps = {"float32": (0, 24, (-45, -45)), "float16": (5, 11, (-24, -24)), "bfloat16": (0, 8, (-45, -45))}[name]
    base["layer.q.weight"][0, 0] = 2.0**k
    B, A = modules["layer.q"].B, modules["layer.q"].A
    B[0, :] = 0
    A[:, 0] = 0
    B[0, :3] = [3 * 2.0**k, -(2.0 ** (k - p)), -(2.0 ** eps[0])]
    A[:3, 0] = [1, 1, 2.0 ** eps[1]]
    adapter = Adapter(LoraConfig(r=r, lora_alpha=r, target_modules=["q", "v"]), modules)
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    save_file(folder / "base.safetensors", base)
    save_adapter(adapter, folder / "adapter")
    merge_checkpoint(folder / "base.safetensors", adapter, folder / "merged.safetensors",
                     residual_path=folder / "residual.safetensors")
