"""How tests/data/residual_v1/ was made: lora-ref 0.1.0 (main at d4d7a26, before residual checksums
and merge records) ran

    python make.py .            # base.safetensors (bfloat16) and adapter/
    lora-ref merge base.safetensors adapter -o merged.safetensors --residual residual.safetensors

The files are committed as written; tests/test_integrity.py unmerges them with the current code.
"""

import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.config import LoraConfig
from lora_ref.safetensors_io import save_file

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)
bf = ml_dtypes.bfloat16
cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"])
mods = {n: LoraModule(n, A=rng.standard_normal((2, 8)).astype(np.float32), B=rng.standard_normal((8, 2)).astype(np.float32))
        for n in ("layer.q", "layer.v")}
save_adapter(Adapter(cfg, mods), out / "adapter")
save_file(out / "base.safetensors", {"layer.q.weight": rng.standard_normal((8, 8)).astype(bf),
                                     "layer.v.weight": rng.standard_normal((8, 8)).astype(bf),
                                     "other": np.arange(4, dtype=np.int64)})
