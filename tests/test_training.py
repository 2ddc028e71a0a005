"""Training (SPEC M.6): AdamW against torch's, model backward against finite differences, two
adapters trained in one mixed batch (both losses fall, trajectories independent bit for bit),
PEFT files out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_peer
from lora_ref.adapter import load_adapter, save_adapter
from lora_ref.dropout import RowDropout
from lora_ref.errors import ConfigError, ShapeError
from lora_ref.models import TinyEmbedConv, TinyMLP, TinyTransformer
from lora_ref.optim import AdamW
from lora_ref.train import Task, init_adapter, teacher_task, train_mixed

U64 = 2.0**-53


def make_tasks(model, shape, seed, n=96):
    rng = np.random.default_rng(seed)
    teachers = [init_adapter(model, 2, 4.0, seed=seed + 10 + k, init_B="normal") for k in range(2)]
    return [teacher_task(model, t, rng.normal(size=(n, *shape))) for t in teachers]


MODELS = [(TinyMLP, (8,)), (TinyTransformer, (5, 16))]


@pytest.mark.parametrize("cls,shape", MODELS)
def test_two_adapters_in_one_mixed_batch_both_learn(cls, shape, tmp_path):
    model = cls(seed=0)
    tasks = make_tasks(model, shape, 1)
    students = [init_adapter(model, 4, 8.0, seed=20 + k, name=f"task{k}") for k in range(2)]
    history = train_mixed(model, students, tasks, steps=60, batch_size=16,
                          optimizers=[AdamW(lr=1e-2), AdamW(lr=1e-2)])
    for k in range(2):
        first, last = history.first_last(k)
        assert last < 0.3 * first, f"task {k}: loss {first:.4g} -> {last:.4g}"
    # Each adapter fits its own task better than the other adapter does.
    for k in range(2):
        x, y = tasks[k].inputs, tasks[k].targets
        own, _ = model.forward(x, students, np.full(len(x), k))
        other, _ = model.forward(x, students, np.full(len(x), 1 - k))
        assert np.mean((own - y) ** 2) < np.mean((other - y) ** 2)
    # Saved as PEFT files; float64 round trip is bit for bit, float32 is one rounding.
    for k, student in enumerate(students):
        save_adapter(student, tmp_path / f"task{k}")
        loaded = load_adapter(tmp_path / f"task{k}")
        assert loaded.config.target_modules == list(model.targets)
        for name, module in student.modules.items():
            np.testing.assert_array_equal(loaded.modules[name].A, module.A)
            np.testing.assert_array_equal(loaded.modules[name].B, module.B)


@pytest.mark.parametrize("cls,shape", MODELS)
def test_trajectories_are_independent(cls, shape):
    """Adapter 0's weights after training do not depend on task 1's data, adapter 1's init or its
    learning rate: bit for bit (its rows, its loss and its random stream are its own)."""
    model = cls(seed=3)
    results = []
    for other_seed, other_lr in ((5, 1e-2), (6, 3e-2)):
        tasks = make_tasks(model, shape, 7)
        tasks[1] = make_tasks(model, shape, other_seed)[1]
        students = [init_adapter(model, 3, 6.0, seed=30, name="a"), init_adapter(model, 2, 2.0, seed=other_seed, name="b")]
        train_mixed(model, students, tasks, steps=8, batch_size=8, optimizers=[AdamW(lr=1e-2), AdamW(lr=other_lr)], seed=11)
        results.append(students)
    for name in model.targets:
        np.testing.assert_array_equal(results[0][0].modules[name].A, results[1][0].modules[name].A)
        np.testing.assert_array_equal(results[0][0].modules[name].B, results[1][0].modules[name].B)
        assert not np.array_equal(results[0][1].modules[name].A, results[1][1].modules[name].A)


def check_directional(loss, D: float, h: float = 1e-4) -> None:
    """|FD(h) − D| within the Richardson estimate |FD(2h) − FD(h)| plus the float64 rounding of the
    loss values, ≤ 2·n_ops·u·Σ|terms|/(2h) with n_ops ≤ 10^3 (``loss(t)`` gives (L, Σ|terms|))."""
    (lp, ap), (lm, am) = loss(h), loss(-h)
    (lp2, _), (lm2, _) = loss(2 * h), loss(-2 * h)
    fd, fd2 = (lp - lm) / (2 * h), (lp2 - lm2) / (4 * h)
    tol = abs(fd2 - fd) + 2 * 1e3 * U64 * (ap + am) / (2 * h)
    assert abs(fd - D) <= tol


@pytest.mark.parametrize("cls,shape", MODELS)
@given(seed=st.integers(0, 2**32 - 1))
def test_model_backward_matches_finite_differences(cls, shape, seed):
    """Directional derivative of L = <g, f(x)> along a random direction of every adapter's A and B.

    Central differences at step h have truncation error ≈ h² f'''/6, estimated by Richardson:
    FD(2h) − FD(h) ≈ h² f'''/2, so |FD(h) − D| ≤ |FD(2h) − FD(h)| plus the float64 rounding of
    the two loss values, ≤ 2 · n_ops · u · Σ|terms| / (2h), with n_ops ≤ 10^3 for these models."""
    model = cls(seed=seed % 97)
    rng = np.random.default_rng(seed)
    adapters = [init_adapter(model, 2, 4.0, seed=seed % 1000 + k, init_B="normal", name=f"a{k}") for k in range(2)]
    x = rng.normal(size=(5, *shape))
    index = np.array([0, -1, 1, 0, 1])
    y, tape = model.forward(x, adapters, index)
    g = rng.normal(size=y.shape)
    _, grads = model.backward(tape, g)
    directions = [{m: {f: rng.normal(size=getattr(a.modules[m], f).shape) for f in "AB"} for m in a.modules} for a in adapters]
    D = sum(float(np.sum(grads[k][m][f] * directions[k][m][f])) for k in range(2) for m in grads[k] for f in "AB")

    def loss(t):
        moved = []
        for a, d in zip(adapters, directions):
            copy = init_adapter(model, 2, 4.0, seed=0, name=a.name)
            for m in copy.modules:
                copy.modules[m].A = a.modules[m].A + t * d[m]["A"]
                copy.modules[m].B = a.modules[m].B + t * d[m]["B"]
            moved.append(copy)
        out, _ = model.forward(x, moved, index)
        return float(np.sum(g * out)), float(np.sum(np.abs(g * out)))

    check_directional(loss, D)


def test_adamw_matches_torch_and_decays_only_A_and_B():
    torch = require_peer("torch")
    model = TinyMLP(seed=0)
    adapter = init_adapter(model, 3, 6.0, seed=1, init_B="normal")
    for m in adapter.modules.values():
        m.lora_bias = np.random.default_rng(2).normal(size=m.B.shape[0])
    params = {(m, f): torch.tensor(getattr(adapter.modules[m], f).copy()) for m in adapter.modules for f in ("A", "B", "lora_bias")}
    for p in params.values():
        p.requires_grad_(True)
    lr, wd, steps = 3e-2, 0.1, 7
    opt_t = torch.optim.AdamW([{"params": [p for (m, f), p in params.items() if f != "lora_bias"], "weight_decay": wd},
                               {"params": [p for (m, f), p in params.items() if f == "lora_bias"], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.99), eps=1e-8)
    opt = AdamW(lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    rng = np.random.default_rng(3)
    for _ in range(steps):
        grads = {m: {f: rng.normal(size=params[(m, f)].shape) for f in ("A", "B", "lora_bias")} for m in adapter.modules}
        for (m, f), p in params.items():
            p.grad = torch.tensor(grads[m][f])
        opt_t.step()
        opt.step(adapter, grads)
    # Each step's update is lr·m̂/(sqrt(v̂)+ε) with |m̂/sqrt(v̂)| ≤ (1−β1)/sqrt(1−β2)·(bias corrections) ≤ 10
    # here, evaluated with ≤ 16 roundings by either implementation; the decay adds one rounding of |p|.
    for (m, f), p in params.items():
        ours = getattr(adapter.modules[m], f)
        theirs = p.detach().numpy()
        tol = steps * (2 * 16 * U64 * lr * 10 + 2 * 2 * U64 * np.abs(ours))
        assert np.all(np.abs(ours - theirs) <= tol), (m, f)


def test_weight_decay_applies_to_A_and_B_only():
    model = TinyMLP(seed=0)
    adapter = init_adapter(model, 2, 2.0, seed=1, init_B="normal")
    module = adapter.modules["fc1"]
    module.lora_bias = np.ones(module.B.shape[0])
    A0, B0 = module.A.copy(), module.B.copy()
    opt = AdamW(lr=0.1, weight_decay=0.5)
    zero = {"fc1": {"A": np.zeros_like(A0), "B": np.zeros_like(B0), "lora_bias": np.zeros(module.B.shape[0])}}
    opt.step(adapter, zero)  # zero gradient: Adam's step is 0/(0+ε) = 0, only the decay acts
    np.testing.assert_array_equal(module.A, A0 - 0.1 * 0.5 * A0)
    np.testing.assert_array_equal(module.B, B0 - 0.1 * 0.5 * B0)
    np.testing.assert_array_equal(module.lora_bias, np.ones(module.B.shape[0]))


def test_bad_training_input():
    model = TinyMLP(seed=0)
    adapter = init_adapter(model, 2, 2.0, seed=1)
    task = Task(np.zeros((4, 8)), np.zeros((4, 4)))
    with pytest.raises(ConfigError):
        train_mixed(model, [adapter], [task, task], steps=1, batch_size=2, optimizers=[AdamW()])
    with pytest.raises(ShapeError):
        train_mixed(model, [adapter], [task], steps=1, batch_size=8, optimizers=[AdamW()])
    with pytest.raises(ConfigError):
        AdamW(lr=-1.0)
    with pytest.raises(ShapeError):
        AdamW().step(adapter, {"fc1": {"A": np.zeros((9, 9))}})
    with pytest.raises(ShapeError):
        AdamW().step(adapter, {"nope": {"A": np.zeros((2, 8))}})
    with pytest.raises(ConfigError):
        init_adapter(model, 2, 2.0, seed=0, init_B="ones")
    with pytest.raises(ShapeError):
        TinyTransformer(d_model=10, n_heads=3)


@given(seed=st.integers(0, 2**32 - 1), dora=st.booleans())
def test_embed_conv_model_backward_with_dropout_matches_finite_differences(seed, dora):
    """TinyEmbedConv (Embedding + Conv1d) with lora_bias or DoRA and dropout masks (the same seeded
    masks in every evaluation): the directional derivative along every trained tensor against
    central differences, with the Richardson tolerance of the test above. DoRA's norm depends on
    A and B, so with DoRA only the magnitude is moved (n is detached, PEFT's gradient)."""
    model = TinyEmbedConv(seed=seed % 97)
    rng = np.random.default_rng(seed)
    adapters = [init_adapter(model, 2, 4.0, seed=seed % 1000 + k, init_B="normal", name=f"a{k}", lora_bias=not dora,
                             use_dora=dora, lora_dropout=0.3) for k in range(2)]
    ids = rng.integers(0, 16, size=(5, 7))
    index = np.array([0, -1, 1, 0, 1])

    def dropout():
        return RowDropout([0.3, 0.3], [np.random.default_rng([seed, k]) for k in range(2)])

    y, tape = model.forward(ids, adapters, index, dropout())
    assert "conv" in tape.masks and "embed" not in tape.masks  # PEFT applies no dropout to embeddings
    g = rng.normal(size=y.shape)
    _, grads = model.backward(tape, g)
    moved_fields = ("magnitude",) if dora else ("A", "B", "lora_bias")
    directions = [{m: {f: rng.normal(size=getattr(a.modules[m], f).shape) for f in moved_fields
                       if getattr(a.modules[m], f) is not None} for m in a.modules} for a in adapters]
    D = sum(float(np.sum(grads[k][m][f] * d)) for k in range(2) for m in directions[k] for f, d in directions[k][m].items())

    def loss(t):
        moved = []
        for a, d in zip(adapters, directions):
            copy = dataclasses.replace(a, modules={m: dataclasses.replace(lora) for m, lora in a.modules.items()})
            for m, fields_ in d.items():
                for f, direction in fields_.items():
                    setattr(copy.modules[m], f, getattr(a.modules[m], f) + t * direction)
            moved.append(copy)
        out, _ = model.forward(ids, moved, index, dropout())
        return float(np.sum(g * out)), float(np.sum(np.abs(g * out)))

    check_directional(loss, D)
