"""Deletion / insertion curves (mil.explain.faithfulness) and the instance-score kinds they rank.

A hand computation on an additive toy model, then a planted cohort: an ABMIL trained
on bags whose positive ones hold a few shifted witnesses. Deleting the instances the
default score ranks highest must make the positive bags' prediction fall faster than
any other kind's ranking does, and clearly faster than a random order; the same check
fails when the default score is replaced by random numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mil.data.batch import Bag, collate_bags
from mil.explain.faithfulness import FRACTIONS, area, curves, faithfulness, predicted_columns
from mil.metrics.instances import task_scores
from mil.models import create
from mil.models.base import DEFAULT_SCORE_KIND
from mil.tasks import ClassificationTask


def test_deletion_and_insertion_by_hand():
    """A 'model' whose logit is the sum of the instances' first feature."""
    x = torch.tensor([[3.0], [-1.0], [2.0], [0.5], [0.0]])
    bag = Bag("b", x)

    def predict(bags):
        return np.stack([np.array([0.0, float(b.x[:, 0].sum())]) for b in bags])

    fractions = (0.0, 0.2, 0.4)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    dele = curves(predict, [bag], [x[:, 0].numpy()], "classification", "deletion", fractions)
    # the full bag (4.5) is predicted positive; drop 3, then 3 and 2
    np.testing.assert_allclose(dele[0], sig(np.array([4.5, 1.5, -0.5])))
    ins = curves(predict, [bag], [x[:, 0].numpy()], "classification", "insertion", fractions)
    # keep the top one (f = 0 keeps one), the top one, the top two
    np.testing.assert_allclose(ins[0], sig(np.array([3.0, 3.0, 5.0])))
    # trapezoids over [0, 0.4]: (mean of first two + mean of last two) / 2
    c = dele[0]
    assert area(dele, fractions) == pytest.approx(((c[0] + c[1]) / 2 + (c[1] + c[2]) / 2) / 2)
    surv = curves(predict, [bag], [x[:, 0].numpy()], "survival", "deletion", fractions)
    np.testing.assert_allclose(surv[0], np.array([4.5, 1.5, -0.5]) / 2)  # mean of the outputs


def planted_bags(n_bags: int, seed: int) -> tuple[list[Bag], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n_bags):
        n = int(torch.randint(12, 30, (1,), generator=gen))
        x = torch.randn(n, 8, generator=gen)
        lab = torch.zeros(n)
        if i % 2:
            k = int(torch.randint(2, 5, (1,), generator=gen))
            lab[:k] = 1
            x[:k, 0] += 4.0
        bags.append(Bag(f"b{i}", x))
        labels.append(i % 2)
    return bags, torch.tensor(labels)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    bags, y = planted_bags(100, 0)
    model = create("abmil", in_dim=8, n_out=2, hidden_dim=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    batch = collate_bags(bags)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(batch).logits, y).backward()
        opt.step()
    test, y_test = planted_bags(30, 1)
    model.eval()
    with torch.no_grad():
        tb = collate_bags(test)
        out = model(tb)
    assert (out.logits.argmax(1) == y_test).float().mean() > 0.9  # the model learnt the bags
    split = tb.ptr.tolist()
    kinds = {"attention": [out.scores[a:b].numpy() for a, b in zip(split[:-1], split[1:])]}
    extra = {
        k: [v[a:b].numpy() for a, b in zip(split[:-1], split[1:])]
        for k, v in out.extra_scores.items()
    }
    kinds.update(task_scores(extra, ClassificationTask.instance_view))
    positive = [b for b, lab in zip(test, y_test) if lab == 1]
    logits = out.logits.numpy()[y_test.numpy() == 1]
    keep = {k: [v for v, lab in zip(vals, y_test) if lab == 1] for k, vals in kinds.items()}
    return model, positive, logits, keep


def predict_with(model):
    def predict(bags):
        with torch.no_grad():
            return model(collate_bags(list(bags))).logits.numpy()

    return predict


def falls_fastest(result: dict[str, float], kind: str, others: list[str]) -> bool:
    """Deletion along ``kind`` ends lowest (within 0.02) and well below a random order's."""
    mine = result[f"deletion_{kind}"]
    return mine <= min(result[f"deletion_{o}"] for o in others) + 0.02 and (
        mine < result["deletion_random"] - 0.1
    )


def test_deletion_falls_fastest_for_the_default_score(trained):
    model, bags, logits, kinds = trained
    columns = {k: predicted_columns(v, logits, "classification") for k, v in kinds.items()}
    result = faithfulness(predict_with(model), bags, columns, "classification")
    others = [k for k in columns if k != DEFAULT_SCORE_KIND]
    assert falls_fastest(result, DEFAULT_SCORE_KIND, others), result
    # insertion: the default's top instances alone recover the prediction better than random ones
    assert result[f"insertion_{DEFAULT_SCORE_KIND}"] > result["insertion_random"] + 0.1, result


def test_the_check_fails_for_random_scores(trained):
    model, bags, logits, kinds = trained
    rng = np.random.default_rng(5)
    columns = {k: predicted_columns(v, logits, "classification") for k, v in kinds.items()}
    columns[DEFAULT_SCORE_KIND] = [rng.normal(size=len(b)) for b in bags]
    result = faithfulness(predict_with(model), bags, columns, "classification", seed=1)
    others = [k for k in columns if k != DEFAULT_SCORE_KIND]
    assert not falls_fastest(result, DEFAULT_SCORE_KIND, others), result
    assert len(FRACTIONS) >= 4
