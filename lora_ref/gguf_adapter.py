"""PEFT adapter -> llama.cpp GGUF LoRA adapter with PEFT's exact scale, and verification (SPEC G.2, G.3).

What llama.cpp reads: one float32 ``adapter.lora.alpha`` per file, and per tensor pair the rank
r = ``lora_b``'s ne[0]; it applies (llama_adapter_lora_weight::get_scale, in float32)

    scale_llama = alpha ? fl32(alpha / r) : 1          (times the user's --lora-scaled factor)

PEFT's scale is s = alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA, per module m
(rank_pattern, alpha_pattern). With a_m := s_m · r_m (alpha_m, or alpha_m·sqrt(r_m)), the file
alpha is the most common non-zero a_m; a module whose a_m equals it is written as is (llama.cpp
then applies fl32(fl32(a_m)/r_m) = s_m (1 + σ), |σ| ≤ 2u_32 + u_32²). Every other module (another
a_m, alpha = 0, which llama.cpp would read as scale 1) has the ratio folded into B:

    B' = round_t((s_m / scale_llama_m) · B)     one rounding from float64, t the output type

so llama.cpp applies scale_llama_m · B' A = s_m · B A up to that one rounding of B.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .atomic import atomic_path
from .dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, STORAGE_DTYPES, float32, float64, round_to
from .errors import FileFormatError, NonFiniteError
from .gguf_model import FLOAT_TYPES, GgufFile, ModuleSite, gguf_module, locate_modules
from .merge import block_rows, digest_arrays

ALPHA_KEY = "adapter.lora.alpha"
#: GGUF metadata key recording what lora-ref did (JSON): PEFT scales and folded factors per tensor.
RECORD_KEY = "lora_ref.conversion"


def llama_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies: fl32(fl32(alpha) / r) when alpha != 0, else 1 (float32 arithmetic)."""
    a = np.float32(alpha)
    return 1.0 if a == 0 else float(a / np.float32(rank))


def _alpha_equivalent(adapter: Adapter, module: str) -> float:
    """a_m = s_m · r_m: the alpha llama.cpp would need for this module alone (module doc)."""
    config, rank = adapter.config, adapter.modules[module].rank
    alpha = float(config.alpha_for(module))
    return alpha * math.sqrt(rank) if config.use_rslora else alpha


def plan_alpha(adapter: Adapter) -> tuple[float, dict[str, float | None]]:
    """(file alpha, per module the factor folded into B, or None when the file alpha serves it)."""
    equivalents = {m: _alpha_equivalent(adapter, m) for m in adapter.modules}
    with np.errstate(over="ignore"):  # an alpha beyond float32's range is not usable as the file alpha
        usable = [a for a in equivalents.values() if np.isfinite(np.float32(a)) and np.float32(a) != 0]
    alpha = Counter(usable).most_common(1)[0][0] if usable else 1.0
    folds: dict[str, float | None] = {}
    for module, equivalent in equivalents.items():
        if equivalent == alpha:
            folds[module] = None
        else:
            folds[module] = adapter.scale_for(module) / llama_scale(alpha, adapter.modules[module].rank)
    return float(np.float32(alpha)), folds


@dataclass
class ConversionReport:
    """What to_gguf wrote: the file alpha, and per GGUF tensor the PEFT scale and any folded factor."""

    alpha: float
    architecture: str
    tensors: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def folded(self) -> list[str]:
        return [name for name, info in self.tensors.items() if info["folded_factor"] is not None]


def _as_gguf(array: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, object]:
    """(array to write, raw GGML type) for a float array already rounded to ``dtype``."""
    gguf = gguf_module()
    kind = {float32: "F32", np.dtype(np.float16): "F16"}.get(dtype, "BF16")
    raw = getattr(gguf.GGMLQuantizationType, kind)
    return (np.ascontiguousarray(array).view(np.uint8), raw) if kind == "BF16" else (np.ascontiguousarray(array), raw)


def to_gguf(adapter: Adapter, base_path: str | Path, out_path: str | Path, *, outtype: str = "float32") -> ConversionReport:
    """Write ``adapter`` as a llama.cpp LoRA GGUF for the model at ``base_path`` (atomic)."""
    gguf = gguf_module()
    if outtype not in STORAGE_DTYPES:
        raise FileFormatError(f"outtype must be one of {sorted(STORAGE_DTYPES)}, got {outtype!r}")
    dtype = STORAGE_DTYPES[outtype]
    base = GgufFile(base_path)
    sites = locate_modules(adapter, base)
    alpha, folds = plan_alpha(adapter)
    report = ConversionReport(alpha=alpha, architecture=base.architecture)
    pairs = []
    for module, site in sites.items():
        a, b = site.factors(adapter)
        a_out = round_to(np.asarray(a, dtype=float64), dtype)
        b64 = np.asarray(b, dtype=float64)
        fold = folds[module]
        b_out = round_to(b64 if fold is None else fold * b64, dtype)
        for label, arr in (("lora_a", a_out), ("lora_b", b_out)):
            if not np.all(np.isfinite(arr.astype(float64))):
                raise NonFiniteError(f"{module}: {label} is not finite in {outtype}"
                                     + (f" after folding the scale factor {fold:g} into B" if fold is not None else ""))
        pairs.append((site, a_out, b_out))
        report.tensors[site.tensor] = {"module": module, "rank": adapter.modules[module].rank,
                                       "peft_scale": adapter.scale_for(module),
                                       "llama_scale": llama_scale(alpha, adapter.modules[module].rank),
                                       "folded_factor": fold}
    record = {"tool": "lora-ref", "adapter_digest": digest_arrays(*[x for p in pairs for x in p[1:]]),
              "tensors": report.tensors}
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, base.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(ALPHA_KEY, alpha)
        writer.add_string(RECORD_KEY, json.dumps(record, sort_keys=True))
        for site, a_out, b_out in pairs:
            for suffix, arr in ((".lora_a", a_out), (".lora_b", b_out)):
                data, raw = _as_gguf(arr, dtype)
                writer.add_tensor(site.tensor + suffix, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return report


# --------------------------------------------------------------------------------------------
# verification


@dataclass
class ModuleCheck:
    """One adapter module against its pair in a GGUF adapter, as llama.cpp applies it."""

    module: str
    tensor: str
    status: str  # "ok" | "scale mismatch" | "values differ" | "missing" | "unreadable"
    peft_scale: float
    llama_scale: float | None = None
    implied_ratio: float | None = None  # least-squares ρ in ΔW_llama ≈ ρ ΔW_peft
    max_error_over_bound: float | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    """verify_gguf's verdict: per module checks, extra tensors, metadata problems."""

    path: str
    alpha: float | None
    modules: list[ModuleCheck] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.extra and all(m.status == "ok" for m in self.modules)

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "ok": self.ok, "alpha": self.alpha, "problems": self.problems,
                "extra_tensors": self.extra, "modules": [asdict(m) for m in self.modules]}


def _storage_roundoff(type_name: str) -> tuple[float, float]:
    """(u, η) of a stored float GGUF type: unit roundoff and smallest subnormal."""
    dtype = FLOAT_TYPES[type_name]
    return UNIT_ROUNDOFF[dtype], SMALLEST_SUBNORMAL[dtype]


def _check_pair(site: ModuleSite, adapter: Adapter, file: GgufFile, alpha: float) -> ModuleCheck:
    """Compare ΔW_llama = scale_llama · L R (from the file) with ΔW_peft = s · L₀ R₀ in row blocks.

    L R is b a (Linear) or a b^T (token_embd). Bound, elementwise, for a correct conversion whose
    stored factors are one rounding (types t_a, t_b) of PEFT's, and whose scale is PEFT's up to
    the float32 scale arithmetic (or up to float64, folded into B):

        |ΔW_llama − ΔW_peft| ≤ κ |s| (|L₀||R₀|) + |scale_llama| (η_L Σ|R| + η_R Σ|L| + r η_L η_R)
        κ = (1 + 2u_32 + u_32²)(1 + u_a)(1 + u_b)(1 + γ_r)² − 1,   γ_r = r u_64 / (1 − r u_64)

    (the γ_r terms are the float64 evaluation of both sums; Σ|R| is over the rank axis).
    """
    lora = adapter.modules[site.module]
    check = ModuleCheck(site.module, site.tensor, "ok", adapter.scale_for(site.module))
    names = (site.tensor + ".lora_a", site.tensor + ".lora_b")
    absent = [n for n in names if n not in file.tensors]
    if absent:
        check.status, check.detail = "missing", f"no {' or '.join(absent)} in the GGUF adapter"
        return check
    if any(file.type_name(n) not in FLOAT_TYPES for n in names):
        check.status = "unreadable"
        check.detail = f"adapter tensor types {file.type_name(names[0])}/{file.type_name(names[1])}: only F32/F16/BF16 are verified"
        return check
    a, b = file.array(names[0]), file.array(names[1])
    a0, b0 = site.factors(adapter)
    if a.shape != a0.shape or b.shape != b0.shape:
        check.status = "values differ"
        check.detail = f"shapes lora_a {a.shape}, lora_b {b.shape}; PEFT's in GGUF layout are {a0.shape}, {b0.shape}"
        return check
    rank = lora.rank
    check.llama_scale = scale = llama_scale(alpha, b.shape[1])  # llama.cpp's r is lora_b's ne[0]
    s = check.peft_scale
    (u_a, eta_a), (u_b, eta_b) = _storage_roundoff(file.type_name(names[0])), _storage_roundoff(file.type_name(names[1]))
    u32, u64 = UNIT_ROUNDOFF[float32], UNIT_ROUNDOFF[float64]
    gamma = rank * u64 / (1 - rank * u64)
    kappa = (1 + 2 * u32 + u32 * u32) * (1 + u_a) * (1 + u_b) * (1 + gamma) ** 2 - 1
    (L, R), (L0, R0) = site.product(a, b), site.product(a0, b0)
    eta_L, eta_R = (eta_a, eta_b) if site.kind == "embedding" else (eta_b, eta_a)
    R64, R0_64 = np.asarray(R, dtype=float64), np.asarray(R0, dtype=float64)
    sum_absR, absR0 = np.abs(R64).sum(axis=0), np.abs(R0_64)

    def blocks():
        step = block_rows((L.shape[0], R.shape[1]))
        for start in range(0, L.shape[0], step):
            L64 = np.asarray(L[start:start + step], dtype=float64)
            L0_64 = np.asarray(L0[start:start + step], dtype=float64)
            bound = kappa * abs(s) * (np.abs(L0_64) @ absR0) + abs(scale) * (
                eta_L * sum_absR[None, :] + eta_R * np.abs(L64).sum(axis=1)[:, None] + rank * eta_L * eta_R)
            yield scale * (L64 @ R64), s * (L0_64 @ R0_64), bound

    gp = pp = gg = worst = 0.0
    for got, want, bound in blocks():
        worst = max(worst, _worst_ratio(np.abs(got - want), bound))
        gp, pp, gg = gp + float(np.sum(got * want)), pp + float(np.sum(want * want)), gg + float(np.sum(got * got))
    check.max_error_over_bound = worst
    check.implied_ratio = rho = gp / pp if pp > 0 else (1.0 if gg == 0 else math.inf)
    if worst <= 1.0:
        return check
    # a pure scale error: ΔW_llama within the same bound of ρ ΔW_peft (the bound scaled by max(1, |ρ|))
    if math.isfinite(rho) and all(_worst_ratio(np.abs(got - rho * want), max(1.0, abs(rho)) * bound) <= 1.0
                                  for got, want, bound in blocks()):
        check.status = "scale mismatch"
        check.detail = (f"llama.cpp applies {rho:.6g} x PEFT's ΔW (its scale {scale:.6g} from alpha {alpha:g} and "
                        f"r={b.shape[1]}; PEFT's scale is {s:.6g})")
    else:
        check.status = "values differ"
        check.detail = f"the worst element is {worst:.3g} x its bound (layout or factors differ)"
    return check


def _worst_ratio(err: np.ndarray, bound: np.ndarray) -> float:
    """max(err / bound), with 0/0 = 0 (an exact zero needs no room)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(err == 0, 0.0, err / bound).max(initial=0.0))


def verify_gguf(adapter: Adapter, gguf_path: str | Path, base_path: str | Path) -> VerifyReport:
    """Each module's ΔW as llama.cpp applies ``gguf_path`` vs PEFT's, within the bound of _check_pair."""
    base = GgufFile(base_path)
    sites = locate_modules(adapter, base)
    file = GgufFile(gguf_path)
    alpha = file.value(ALPHA_KEY)
    report = VerifyReport(str(gguf_path), None if alpha is None else float(alpha))
    if file.value("general.type") != "adapter":
        report.problems.append(f"general.type is {file.value('general.type')!r}, llama.cpp requires 'adapter'")
    if file.value("adapter.type") != "lora":
        report.problems.append(f"adapter.type is {file.value('adapter.type')!r}, llama.cpp requires 'lora'")
    if file.value("general.architecture") != base.architecture:
        report.problems.append(f"general.architecture {file.value('general.architecture')!r} differs from the "
                               f"base model's {base.architecture!r} (llama.cpp refuses the adapter)")
    if alpha is None:
        report.problems.append(f"no {ALPHA_KEY}: llama.cpp applies scale 1 to every tensor")
    for site in sites.values():
        report.modules.append(_check_pair(site, adapter, file, report.alpha or 0.0))
    known = {site.tensor + suffix for site in sites.values() for suffix in (".lora_a", ".lora_b")}
    for name in file.tensors:
        if name not in known:
            report.extra.append(name + (" (ignored by llama.cpp)" if name.endswith("_norm.weight") else ""))
    return report
