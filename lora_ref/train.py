"""Fine-tune LoRA adapters end to end in NumPy: several adapters, one mixed batch (SPEC M.6).

Each step draws ``batch_size`` rows from every task k, routes task k's rows through adapter k
(:mod:`lora_ref.mixed_batch`), and minimises the sum of the per-task mean squared errors

    L = Σ_k L_k,   L_k = mean over task k's rows and outputs of (f(x; W_0, adapter k) − y)²

Because adapter k only sees its own rows and L_k only depends on them, dL/d(adapter k) =
dL_k/d(adapter k): training K adapters in one batch is K independent trainings that share the
base forward pass. Each adapter has its own :class:`lora_ref.optim.AdamW` state, and each
task's rows come from its own random stream, so adapter k's trajectory does not depend on the
other tasks' data, adapters or learning rates at all (tests check it bit for bit).

Dropout as PEFT applies it in training: each adapter's ``lora_dropout`` p_k masks the LoRA input
of its own rows (inverted dropout, kept elements scaled by 1/(1 − p_k)); DoRA layers use the
dropout formula base(x) + (g − 1) base(x̃) + g lora(x̃) (:mod:`lora_ref.dora`); Embedding layers
take none. Task k's masks come from its own stream seeded by (seed, k, 1), so a run is a pure
function of its seed and the independence above still holds.

Synthetic tasks (:func:`teacher_task`): targets are the base model run with a random "teacher"
adapter, so a LoRA of sufficient rank can fit them exactly and the loss must fall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter, LoraModule
from .config import LoraConfig
from .dropout import RowDropout
from .dtypes import float64
from .errors import ConfigError, ShapeError
from .init import init_magnitude
from .kinds import kind_of
from .models import RoutedModel
from .optim import AdamW


@dataclass(frozen=True)
class Task:
    """Inputs [n, ...] and targets [n, ...] of one regression task."""

    inputs: np.ndarray
    targets: np.ndarray


@dataclass
class TrainHistory:
    """losses[step][k]: task k's loss L_k at that step (before the update)."""

    losses: list[list[float]] = field(default_factory=list)

    def first_last(self, k: int, window: int = 5) -> tuple[float, float]:
        """Mean loss of task k over the first and the last ``window`` steps."""
        values = [row[k] for row in self.losses]
        return float(np.mean(values[:window])), float(np.mean(values[-window:]))


def init_adapter(model: RoutedModel, r: int, alpha: float, *, seed: int, name: str = "default",
                 init_B: str = "zeros", use_rslora: bool = False, lora_dropout: float = 0.0,
                 lora_bias: bool = False, use_dora: bool = False) -> Adapter:
    """A float64 adapter on every layer of ``model`` (any kind), initialised as PEFT does by default.

    Linear and Conv: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5);
    fan_in = A's elements per rank), B = 0 so the adapter starts as the identity; Embedding
    (PEFT's reversed init): A = 0, B ~ N(0, 1). ``init_B="normal"`` draws the zero factor
    ~ N(0, 1/r) instead (teachers, tests). ``lora_bias``: lora_B.bias = 0; ``use_dora``:
    m = ‖W + ΔW‖ (= ‖W‖ at the identity start); kinds without lora_bias (Embedding) get none. ``lora_dropout`` goes to the config, where
    :func:`train_mixed` reads it.
    """
    if init_B not in ("zeros", "normal"):
        raise ConfigError(f"init_B must be 'zeros' or 'normal', got {init_B!r}")
    rng = np.random.default_rng(seed)
    ffo = model.fan_in_fan_out
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(model.targets),
                        inference_mode=False, lora_dropout=lora_dropout, lora_bias=lora_bias, use_dora=use_dora,
                        fan_in_fan_out=ffo)
    modules = {}
    for module in model.targets:
        W = model.weights[f"{module}.weight"]
        kind = kind_of(model.kind_for(module))
        A_shape, B_shape = kind.lora_shapes(W.shape, r, fan_in_fan_out=ffo)
        bound = int(np.prod(A_shape[1:])) ** -0.5
        if kind.reversed_init:
            A = np.zeros(A_shape) if init_B == "zeros" else rng.normal(0.0, r**-0.5, A_shape)
            B = rng.normal(0.0, 1.0, B_shape)
        else:
            A = rng.uniform(-bound, bound, A_shape)
            B = np.zeros(B_shape) if init_B == "zeros" else rng.normal(0.0, r**-0.5, B_shape)
        lora = LoraModule(name=module, A=A, B=B, kind=kind.name, lora_bias=np.zeros(B_shape[0]) if lora_bias and kind.lora_bias else None)
        if use_dora:
            delta = kind.delta(A, B, config.scale_for(module), fan_in_fan_out=ffo, module=module)
            lora.magnitude = init_magnitude(W, delta, kind.dora_axis(ffo), dtype=float64)
        modules[module] = lora
    return Adapter(config=config, modules=modules, name=name)


def teacher_task(model: RoutedModel, teacher: Adapter, inputs: np.ndarray) -> Task:
    """Targets = the base model with ``teacher`` applied to every row."""
    targets, _ = model.forward(inputs, [teacher], np.zeros(len(inputs), np.int64))
    inputs = np.asarray(inputs)
    return Task(inputs if inputs.dtype.kind in "iu" else inputs.astype(np.float64), targets)  # ids stay ids


def train_mixed(
    model: RoutedModel,
    adapters: Sequence[Adapter],
    tasks: Sequence[Task],
    *,
    steps: int,
    batch_size: int,
    optimizers: Sequence[AdamW],
    seed: int = 0,
) -> TrainHistory:
    """Train adapter k on task k for ``steps`` mixed-batch steps (module doc); adapters change in place."""
    if not (len(adapters) == len(tasks) == len(optimizers)) or not adapters:
        raise ConfigError(f"need one task and one optimizer per adapter: {len(adapters)} adapters, "
                          f"{len(tasks)} tasks, {len(optimizers)} optimizers")
    for k, task in enumerate(tasks):
        if len(task.inputs) != len(task.targets) or len(task.inputs) < batch_size:
            raise ShapeError(f"task {k}: {len(task.inputs)} inputs, {len(task.targets)} targets, batch_size {batch_size}")
    streams = [np.random.default_rng([seed, k]) for k in range(len(tasks))]
    dropout = RowDropout([a.config.lora_dropout for a in adapters], [np.random.default_rng([seed, k, 1]) for k in range(len(tasks))])
    index = np.repeat(np.arange(len(tasks)), batch_size)
    history = TrainHistory()
    for _ in range(steps):
        picks = [stream.choice(len(task.inputs), batch_size, replace=False) for stream, task in zip(streams, tasks)]
        x = np.concatenate([task.inputs[p] for task, p in zip(tasks, picks)])
        y = np.concatenate([task.targets[p] for task, p in zip(tasks, picks)])
        pred, tape = model.forward(x, adapters, index, dropout)
        residual = pred - y
        per_row = residual[0].size
        losses, dy = [], np.empty_like(residual)
        for k in range(len(tasks)):
            rows = slice(k * batch_size, (k + 1) * batch_size)
            losses.append(float(np.mean(residual[rows] ** 2)))
            dy[rows] = 2.0 * residual[rows] / (batch_size * per_row)
        history.losses.append(losses)
        _, grads = model.backward(tape, dy)
        for adapter, optimizer, adapter_grads in zip(adapters, optimizers, grads):
            optimizer.step(adapter, adapter_grads)
    return history
