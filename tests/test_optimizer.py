"""`train.optimizer`: AdamW (decoupled decay), Adam (coupled L2) and SGD, checked against hand updates."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mil.config import TrainConfig, config_from_dict
from mil.errors import ConfigError
from mil.train import loop
from mil.train.runner import run_cv

LR, WD, STEPS = 0.1, 0.5, 8  # RAdam rectifies from step 6 on (rho_t > 5)
B1, B2, EPS = 0.9, 0.999, 1e-8


def gradients(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of the test loss sum((x @ w)^2) / 2 + sum(w): x^T x w + 1."""
    return x.T @ (x @ w) + 1.0


def by_hand(kind: str, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t in range(1, STEPS + 1):
        g = gradients(w, x)
        if kind == "sgd":  # L2 in the gradient, momentum 0.9 (buffer starts at the first gradient)
            g = g + WD * w
            m = g if t == 1 else 0.9 * m + g
            w = w - LR * m
            continue
        if kind in ("adam", "radam"):  # coupled: the L2 term goes through the moment estimates
            g = g + WD * w
        else:  # adamw: decoupled, the weights shrink directly
            w = w * (1 - LR * WD)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
        if kind == "radam":  # Liu et al. 2020: SGD with momentum until the variance is tractable
            rho_inf = 2 / (1 - B2) - 1
            rho = rho_inf - 2 * t * B2**t / (1 - B2**t)
            if rho <= 5:
                w = w - LR * m_hat
                continue
            r = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
            # torch's form of 1 / (sqrt(v_hat) + eps): sqrt(1 - b2^t) / (sqrt(v) + eps)
            w = w - LR * m_hat * r * (1 - B2**t) ** 0.5 / (v.sqrt() + EPS)
            continue
        w = w - LR * m_hat / (v_hat.sqrt() + EPS)
    return w


def by_factory(kind: str, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = torch.nn.Parameter(w0.clone())
    opt = loop.make_optimizer([w], TrainConfig(lr=LR, weight_decay=WD, optimizer=kind))
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (x @ w).pow(2).sum() / 2 + w.sum()
        loss.backward()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "radam"])
def test_optimizer_updates_match_hand_computation(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(by_factory(kind, w0, x), by_hand(kind, w0, x))


def test_coupled_and_decoupled_decay_differ():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)
    adam, adamw = by_factory("adam", w0, x), by_factory("adamw", w0, x)
    assert (adam - adamw).abs().max() > 1e-3
    assert TrainConfig().optimizer == "adamw"  # the default is unchanged


def test_optimizer_key_is_validated():
    cfg = config_from_dict(
        {"data": {"csv": "a", "features": "b"}}, overrides=["train.optimizer=adam"]
    )
    assert cfg.train.optimizer == "adam"
    with pytest.raises(ConfigError, match="optimizer"):
        config_from_dict({"data": {"csv": "a", "features": "b"}, "train": {"optimizer": "rmsprop"}})


def test_fit_builds_the_configured_optimizer(tmp_path, monkeypatch):
    rows = [(f"b{i}", i % 2, j, float(i + j), float(i * j)) for i in range(8) for j in range(3)]
    path = tmp_path / "bags.csv"
    pd.DataFrame(rows, columns=["bag_id", "bag_label", "instance_id", "f0", "f1"]).to_csv(
        path, index=False
    )
    made = []
    real = loop.make_optimizer

    def spy(params, cfg):
        opt = real(params, cfg)
        made.append(type(opt))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = config_from_dict(
        {
            "name": "opt",
            "data": {"instances": str(path), "bag_col": "bag_id", "label_col": "bag_label"},
            "splits": {"folds": 2, "val_fraction": 0.0, "dir": str(tmp_path / "splits")},
            "model": {"name": "abmil", "hidden_dim": 4},
            "train": {"epochs": 1, "patience": None, "batch_size": 4, "optimizer": "sgd"},
        }
    )
    run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10)
    assert made == [torch.optim.SGD, torch.optim.SGD]
