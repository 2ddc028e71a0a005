"""LoraConfig: PEFT's ``adapter_config.json`` fields, their defaults, and per-module resolution.

Scaling (SPEC 2.2): s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
``rank_pattern`` and ``alpha_pattern`` are resolved independently, as PEFT 0.21 does: for a
module path m, the first pattern key k (in the dict's order) for which
``re.match(rf"(.*\\.)?({k})$", m)`` succeeds gives the value; otherwise the global value.
Target matching: a string is a regex that must match the whole module path; a list matches a
module whose path equals an entry or ends with ``"." + entry``. All of it runs through
:mod:`lora_ref.matching` (linear-time regexes, set lookups), with PEFT's answers.
Fields lora-ref does not interpret are kept verbatim and written back on save.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import ConfigError
from .jsonfile import read_json
from .matching import PatternTable, TargetSpec, check_pattern

CONFIG_NAME = "adapter_config.json"
_BIAS_CHOICES = ("none", "all", "lora_only")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    if r <= 0:
        raise ConfigError(f"rank r must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraConfig:
    """The adapter_config.json of a PEFT LoRA adapter (defaults are PEFT 0.21's)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    peft_type: str = "LORA"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = True
    #: Fields of the JSON that lora-ref does not interpret, kept for a faithful round trip.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for any value PEFT would reject or that makes the math undefined."""
        if self.peft_type != "LORA":
            raise ConfigError(f"peft_type {self.peft_type!r} is not supported (only 'LORA')")
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not (
            0.0 <= self.lora_dropout < 1.0
        ):
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(f"{name} must be a string (regex) or a list of strings, got {value!r}")
            if isinstance(value, str):
                _check_regex(name, value)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ConfigError(f"{name} must be an object, got {patterns!r}")
            for key, value in patterns.items():
                _check_regex(f"{name} key {key[:120]!r}", key, pattern_key=True)
                check(f"{name}[{key!r}]", value)

    # -- per-module resolution ---------------------------------------------------------------
    def rank_for(self, module: str) -> int:
        """The rank of ``module``: rank_pattern's first matching key, else r."""
        value = self._compiled("rank_pattern", PatternTable).value(module)
        return self.r if value is None else int(value)

    def alpha_for(self, module: str) -> float:
        """The alpha of ``module``: alpha_pattern's first matching key, else lora_alpha."""
        value = self._compiled("alpha_pattern", PatternTable).value(module)
        return self.lora_alpha if value is None else value

    def scale_for(self, module: str) -> float:
        """s = alpha / r (or alpha / sqrt(r) with use_rslora) for ``module``."""
        return lora_scale(self.rank_for(module), self.alpha_for(module), self.use_rslora)

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA layer on ``module`` (exclusions applied)."""
        return self._compiled("target_modules", TargetSpec)(module) \
            and not self._compiled("exclude_modules", TargetSpec)(module)

    def _compiled(self, name: str, kind: type) -> Any:
        """The bounded matcher (:mod:`lora_ref.matching`) of field ``name``, built once per value."""
        value = getattr(self, name)
        cache = self.__dict__.get("_matchers")
        if cache is None:
            cache = self.__dict__["_matchers"] = {}
        size = len(value) if value is not None else 0
        held = cache.get(name)
        if held is None or held[0] is not value or held[1] != size:  # the value object itself is held: no id reuse
            cache[name] = held = (value, size, kind(value))
        return held[2]

    # -- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build from a parsed adapter_config.json; unknown keys go to ``extra``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {key: value for key, value in data.items() if key in known}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes, including preserved unknown fields."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data.update(self.extra)
        return data

    @classmethod
    def load(cls, directory: str | Path) -> LoraConfig:
        """Read ``<directory>/adapter_config.json``."""
        path = Path(directory) / CONFIG_NAME
        data = read_json(path, what="adapter config")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, directory: str | Path) -> None:
        """Write ``<directory>/adapter_config.json`` atomically."""
        write_text_atomic(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    # an int beyond float range (JSON allows 1e400 written out as digits) is not finite either
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > _FLOAT_MAX or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {str(value)[:60]}")


_FLOAT_MAX = sys.float_info.max


def _check_regex(name: str, pattern: str, *, pattern_key: bool = False) -> None:
    """Raise ConfigError unless ``pattern`` compiles for the bounded matcher (:mod:`lora_ref.matching`)."""
    check_pattern(name, pattern, pattern_key=pattern_key)
