"""SC-MIL: the supervised contrastive loss against Khosla et al.'s formula computed directly (and
pytorch-metric-learning's ``SupConLoss`` where it is importable), its schedule, its options, and
the projection head on every aggregator trained by gradient, through the training objective."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mil.config import config_from_dict
from mil.data.batch import collate_bags
from mil.errors import ConfigError
from mil.losses.supcon import SupCon, supcon_loss
from mil.tasks import make_task
from mil.train.loop import BatchForward
from mil.train.objective import local_objective, projection_head
from tests.test_models_uniform import GRADIENT_MODELS, build, make_bags

BASE = {"data": {"csv": "x.csv", "features": "f"}}


def khosla_by_hand(z: torch.Tensor, labels: list[int], tau: float) -> float:
    """L^sup_out written out term by term (float64, plain loops): per anchor i with positives,
    -1/|P(i)| sum_p log(exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau)); mean over them."""
    z = z.double()
    z = z / z.norm(dim=1, keepdim=True)
    n, per_anchor = len(labels), []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        terms = [math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
def test_supcon_equals_khoslas_formula_by_hand(tau):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(9, 6, generator=gen) * 3  # not normalised: the loss normalises
    labels = [0, 1, 0, 2, 1, 1, 0, 3, 2]  # class 3 has one bag: an anchor without positives
    got = supcon_loss(z, torch.tensor(labels), tau)
    assert float(got) == pytest.approx(khosla_by_hand(z, labels, tau), rel=1e-5)


def test_supcon_equals_pytorch_metric_learning():
    """pytorch-metric-learning is not a dependency: run with it on PYTHONPATH to check
    (e.g. ``pip install --target /tmp/pml --no-deps pytorch-metric-learning``)."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(12, 5, generator=gen), torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 3, 0, 2, 1])
    for tau in (0.1, 0.5, 1.0):
        assert float(supcon_loss(z, y, tau)) == pytest.approx(
            float(losses.SupConLoss(temperature=tau)(z, y)), rel=1e-5
        )


def test_supcon_without_positive_pairs_is_zero_with_a_zero_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    loss = supcon_loss(z, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_supcon_pulls_a_class_together():
    """One gradient step on the loss raises the cosine similarity of same-class embeddings."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 4, generator=gen, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

    def same_class_cosine() -> float:
        u = F.normalize(z.detach(), dim=1)
        sim = u @ u.T
        return float(sim[:4, :4].sum() - 4 + sim[4:, 4:].sum() - 4)

    before = same_class_cosine()
    supcon_loss(z, y, 0.5).backward()
    with torch.no_grad():
        z -= 0.5 * z.grad
    assert same_class_cosine() > before


@pytest.mark.parametrize(
    "schedule, expected",
    [("constant", [0.8, 0.8, 0.8]), ("linear", [0.8, 0.4, 0.0]), ("parabolic", [0.8, 0.6, 0.0])],
)
def test_schedule_by_hand(schedule, expected):
    sc = SupCon(weight=0.8, schedule=schedule)
    assert [sc.alpha(t) for t in (0.0, 0.5, 1.0)] == pytest.approx(expected)


def test_supcon_options_are_checked_and_saved_with_their_defaults():
    cfg = config_from_dict({**BASE, "task": {"supcon": {"weight": 0.5}}})
    assert cfg.to_dict()["task"]["supcon"] == {
        "weight": 0.5,
        "temperature": 0.1,
        "schedule": "parabolic",
    }
    task = make_task(cfg, ["a", "b"])
    assert task.supcon == SupCon(0.5, 0.1, "parabolic")
    assert make_task(config_from_dict(BASE), ["a", "b"]).supcon is None
    assert (
        make_task(config_from_dict({**BASE, "task": {"supcon": {"weight": 0}}}), ["a", "b"]).supcon
        is None
    )
    for bad, match in [
        ({"weight": 2}, r"task.supcon.weight must be a number in \[0, 1\]"),
        ({"temperature": 0}, "task.supcon.temperature must be a number > 0"),
        ({"schedule": "step"}, "task.supcon.schedule = 'step'"),
        ({"tau": 0.1}, "unknown key 'task.supcon.tau'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**BASE, "task": {"supcon": bad}}, source="c.yaml")


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_every_aggregator_trains_with_the_contrastive_term(name):
    """The projection head sits on each model's bag embedding; the objective is (1 - a) CE +
    a SupCon(head(embedding)) (+ the model's auxiliary loss), and the contrastive term alone
    sends a gradient into the head and into the model."""
    cfg = config_from_dict({**BASE, "task": {"supcon": {"weight": 0.5, "schedule": "constant"}}})
    task = make_task(cfg, ["a", "b"])
    model = build(name).train()
    bags = make_bags(model)
    data, train = {b.bag_id: b for b in bags}, pd.DataFrame({"bag_id": [b.bag_id for b in bags]})
    torch.manual_seed(0)
    head = projection_head(model, task, data, train, torch.device("cpu"))
    assert model.training  # the probe leaves the mode as it was
    y = torch.tensor([0, 1, 0, 1])
    step = BatchForward(model, 1 << 20, torch.device("cpu"), "fp32", head)
    torch.manual_seed(1)
    logits, aux, z = step(bags, y)
    assert z.shape == (4, 128)
    objective, shown = local_objective(task, {"label": y}, (logits, aux, z), progress=0.3)
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * supcon_loss(z, y, 0.1)
    expected = expected if aux is None else expected + aux
    assert float(objective) == pytest.approx(float(expected), rel=1e-6)
    assert shown == pytest.approx(float(F.cross_entropy(logits, y) + (0 if aux is None else aux)))
    supcon_loss(z, y, 0.1).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    if model(
        collate_bags(bags)
    ).embedding.requires_grad:  # `linear`: a fixed mean, nothing to shape
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_run_with_supcon_trains_and_saves_the_model_alone(tmp_path):
    """Cross-validation with SC-MIL on the small cohort: finite losses, the history's
    ``train_loss`` is the cross-entropy (the constant prediction's measure), and ``model.pt``
    holds the model without its projection head."""
    from mil.models import create
    from mil.results.checkpoint import read_checkpoint
    from mil.train.runner import run_cv
    from tests.conftest import small_config

    raw = small_config(tmp_path, epochs=2)
    raw["task"]["supcon"] = {"weight": 0.7}
    run = run_cv(
        config_from_dict(raw),
        tmp_path / "run",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    hist = pd.read_csv(run / "fold_0" / "history.csv")
    assert np.isfinite(hist["train_loss"]).all() and hist["train_loss"].iloc[-1] < 2.0
    ckpt = read_checkpoint(run / "fold_0" / "model.pt")
    fresh = create(ckpt["model"], in_dim=ckpt["in_dim"], n_out=ckpt["n_out"], **ckpt["hparams"])
    assert set(ckpt["state_dict"]) == set(fresh.state_dict())
    pred = pd.read_csv(run / "fold_0" / "predictions.csv")
    assert np.isfinite(pred.filter(like="prob_").to_numpy()).all()
