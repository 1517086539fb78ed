"""Fit the linear baselines (:mod:`mil.models.linear`) with the task's closed-form model.

One fold: the pooled bag vectors of the training bags (a k-means codebook first for
``bow_linear``, a Gaussian mixture for ``proto_linear``, fit on training-fold instances only) are standardised with
their training mean and spread, and the task's penalised linear model
(:meth:`mil.tasks.Task.fit_linear`: logistic regression for classification, ridge
Cox for survival, ridge regression for regression) is fit per penalty of the
task's grid (:attr:`mil.tasks.Task.linear_penalty`).

The penalty kept is the one with the lowest *task loss* on the validation bags
(the criterion early stopping uses for the MIL models); without usable validation
bags, the mean loss over a 3-fold split of the training bags. The test bags are
never seen. With more features than training bags the fit runs in the span of the
training vectors (an SVD rotation), which is exact for an L2 penalty.
``history.csv`` gets one row per penalty.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold

from mil.data.dataset import BagDataset
from mil.errors import ConfigError, DataError
from mil.models.linear import PooledLinear
from mil.schema import TrainConfig
from mil.tasks import Task
from mil.tasks.linear_fits import ALPHA_GRID, C_GRID  # noqa: F401  (importable from here)

#: instances the k-means codebook is fit on, at most (drawn evenly over training bags)
CODEBOOK_INSTANCES = 30_000


def fit_closed_form(
    model: PooledLinear,
    task: Task,
    data: BagDataset,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    cfg: TrainConfig,
    penalties: tuple[float, ...] | None = None,
) -> pd.DataFrame:
    """Fit ``model``'s head on the training bags (see the module); returns the history.

    ``penalties`` replaces the grid; one penalty is fitted as given, with no
    validation loss (a refit at the penalty cross-validation chose)."""
    if not task.linear_penalty[1]:
        raise ConfigError(
            f"model {model.registry_name!r} is fitted in closed form by the task's linear model, "
            f"and task.type {task.name!r} declares none (Task.fit_linear, Task.linear_penalty)"
        )
    model.cpu()
    try:
        model.fit_basis(instance_sample(data, train["bag_id"].tolist(), cfg.seed), cfg.seed)
    except ValueError as e:  # a codebook or mixture larger than the training instances allow
        raise ConfigError(str(e)) from None
    f_tr = pooled(model, data, train["bag_id"].tolist())
    mu = f_tr.mean(0)
    sigma = f_tr.std(0)
    sigma[~(sigma > 1e-8)] = 1.0  # constant columns (a word no training bag uses)
    z_tr = (f_tr - mu) / sigma
    z_va = None if val is None else (pooled(model, data, val["bag_id"].tolist()) - mu) / sigma
    # the span of the training vectors holds every L2-penalised solution
    rot = np.linalg.svd(z_tr, full_matrices=False)[2].T if z_tr.shape[1] > len(z_tr) else None
    fitter = _LinearFit(model, task, train, rot, cfg.seed)
    if penalties is not None:
        fitter.grid = tuple(float(p) for p in penalties)
    rows, best, fitted = [], None, []
    for i, penalty in enumerate(fitter.grid):
        try:
            head = fitter.fit(z_tr, train, penalty)
        except (ValueError, np.linalg.LinAlgError) as e:  # the solver diverged at this penalty
            failure, nan = e, float("nan")
            rows.append(
                {
                    "epoch": i,
                    fitter.penalty_name: penalty,
                    "train_loss": nan,
                    "val_loss": nan,
                    "steps": 0,
                }
            )
            continue
        fitted.append(i)
        if len(fitter.grid) == 1:
            val_loss = float("nan")
        elif z_va is not None:
            val_loss = fitter.loss(head, z_va, val)
        else:
            val_loss = fitter.inner_loss(z_tr, train, penalty)
        rows.append(
            {
                "epoch": i,
                fitter.penalty_name: penalty,
                "train_loss": fitter.loss(head, z_tr, train),
                "val_loss": val_loss,
                "steps": 0,
            }
        )
        if np.isfinite(val_loss) and (best is None or val_loss < rows[best]["val_loss"]):
            best = i
    if not fitted:
        raise DataError(
            f"model {model.registry_name!r}: the task's linear model failed at every penalty of "
            f"{fitter.grid} on {len(train)} training bags ({failure})"
        )
    best = fitted[0] if best is None else best
    head = fitter.fit(z_tr, train, fitter.grid[best])
    model.set_head(*head, mu=torch.as_tensor(mu).float(), sigma=torch.as_tensor(sigma).float())
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best
    return history


def pooled(model: PooledLinear, data: BagDataset, bag_ids: list[str]) -> np.ndarray:
    """The bag vectors (means of the model's per-instance basis), ``[bags, basis_dim]``."""

    with torch.no_grad():
        return np.stack([model.bag_vector(data[b]).numpy() for b in bag_ids])


def instance_sample(data: BagDataset, bag_ids: list[str], seed: int) -> np.ndarray:
    """At most :data:`CODEBOOK_INSTANCES` training-fold instances, drawn evenly over the bags:
    what a codebook or a mixture (:meth:`PooledLinear.fit_basis`) is fit on."""
    rng = np.random.default_rng(seed)
    per_bag = max(1, CODEBOOK_INSTANCES // max(1, len(bag_ids)))
    rows = []
    for b in bag_ids:
        x = data[b].x.float().numpy()
        rows.append(x[rng.choice(len(x), per_bag, replace=False)] if len(x) > per_bag else x)
    return np.concatenate(rows)


class _LinearFit:
    """The task's penalised linear model (:meth:`mil.tasks.Task.fit_linear`) on standardised
    bag vectors, fitted in the span of the training vectors where ``rot`` is given."""

    def __init__(self, model: PooledLinear, task: Task, train: pd.DataFrame, rot, seed: int):
        self.model, self.task, self.rot, self.seed = model, task, rot, seed
        self.penalty_name, self.grid = task.linear_penalty

    def fit(self, z: np.ndarray, bags: pd.DataFrame, penalty: float):
        """``(weight, bias, delta_h0)`` tensors for :meth:`PooledLinear.set_head`."""
        zr = z if self.rot is None else z @ self.rot
        w, b, delta = self.task.fit_linear(zr, bags, penalty, self.seed)
        w = w if self.rot is None else w @ self.rot.T
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)).float()  # noqa: E731
        return as_t(w), as_t(b), None if delta is None else as_t(delta)

    def loss(self, head, z: np.ndarray, bags: pd.DataFrame) -> float:
        self.model.set_head(*head, mu=torch.zeros(z.shape[1]), sigma=torch.ones(z.shape[1]))
        with torch.no_grad():
            logits = self.model.head(torch.as_tensor(z).float())
            value = self.task.loss(logits, self.task.targets(bags))
        return float(value)

    def inner_loss(self, z: np.ndarray, bags: pd.DataFrame, penalty: float) -> float:
        """Mean validation loss over a 3-fold split of the training bags."""
        losses = []
        for a, b in KFold(3, shuffle=True, random_state=self.seed).split(z):
            try:
                losses.append(self.loss(self.fit(z[a], bags.iloc[a], penalty), z[b], bags.iloc[b]))
            except ValueError:  # a part with one class, or no events
                continue
        finite = [v for v in losses if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")
