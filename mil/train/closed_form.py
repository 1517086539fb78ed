"""Fit the linear baselines (:mod:`mil.models.linear`) with scikit-learn / scikit-survival.

One fold: the pooled bag vectors of the training bags (a k-means codebook first,
for ``bow_linear``, fit on training-fold instances only) are standardised with
their training mean and spread, and a penalised linear model is fit per penalty
of a grid:

- classification: ``sklearn.linear_model.LogisticRegression(C)`` (multinomial;
  the task's class weights);
- survival: ``sksurv.linear_model.CoxPHSurvivalAnalysis(alpha)`` (ridge Cox, the
  task's ties); for the discrete-time loss its linear predictor becomes per-bin
  hazards through the Breslow baseline of the training bags
  (``sksurv.linear_model.coxph.BreslowEstimator``).

The penalty kept is the one with the lowest *task loss* on the validation bags
(the criterion early stopping uses for the MIL models); without usable validation
bags, the mean loss over a 3-fold split of the training bags. The test bags are
never seen. With more features than training bags the fit runs in the span of the
training vectors (an SVD rotation), which is exact for an L2 penalty.
``history.csv`` gets one row per penalty.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.util import Surv

from mil.data.dataset import BagDataset
from mil.errors import ConfigError
from mil.models.linear import BagOfWordsLinear, PooledLinear
from mil.schema import TrainConfig
from mil.tasks import Task

#: inverse penalties of the logistic regression, and ridge penalties of the Cox model
C_GRID = tuple(10.0**k for k in range(-4, 3))
ALPHA_GRID = tuple(10.0**k for k in range(-2, 4))
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
    if task.target_kind not in ("label", "survival"):
        raise ConfigError(
            f"model {model.registry_name!r} fits classification and survival tasks only, "
            f"not task.type {task.name!r}"
        )
    model.cpu()
    if isinstance(model, BagOfWordsLinear):
        model.set_codebook(codebook(model, data, train["bag_id"].tolist(), cfg.seed))
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
    rows, best = [], None
    for i, penalty in enumerate(fitter.grid):
        head = fitter.fit(z_tr, train, penalty)
        if len(fitter.grid) == 1:
            val_loss = float("nan")
        elif z_va is not None:
            val_loss = fitter.loss(head, z_va, val)
        else:
            val_loss = fitter.inner_loss(z_tr, train, penalty)
        rows.append(
            {"epoch": i, fitter.penalty_name: penalty, "train_loss": fitter.loss(head, z_tr, train),
             "val_loss": val_loss, "steps": 0}
        )  # fmt: skip
        if np.isfinite(val_loss) and (best is None or val_loss < rows[best]["val_loss"]):
            best = i
    best = 0 if best is None else best
    head = fitter.fit(z_tr, train, fitter.grid[best])
    model.set_head(*head, mu=torch.as_tensor(mu).float(), sigma=torch.as_tensor(sigma).float())
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best
    return history


def pooled(model: PooledLinear, data: BagDataset, bag_ids: list[str]) -> np.ndarray:
    """The bag vectors (means of the model's per-instance basis), ``[bags, basis_dim]``."""
    with torch.no_grad():
        return np.stack([model.basis(data[b].x).mean(0).double().numpy() for b in bag_ids])


def codebook(model: BagOfWordsLinear, data: BagDataset, bag_ids: list[str], seed: int) -> torch.Tensor:
    """k-means centres of (at most :data:`CODEBOOK_INSTANCES`) training-fold instances."""
    rng = np.random.default_rng(seed)
    per_bag = max(1, CODEBOOK_INSTANCES // max(1, len(bag_ids)))
    rows = []
    for b in bag_ids:
        x = data[b].x.float().numpy()
        rows.append(x[rng.choice(len(x), per_bag, replace=False)] if len(x) > per_bag else x)
    x = np.concatenate(rows)
    words = model.basis_dim
    if len(np.unique(x, axis=0)) < words:
        raise ConfigError(
            f"model.words = {words}, but the training bags hold fewer distinct instances; "
            f"lower model.words"
        )
    km = KMeans(n_clusters=words, n_init=3, random_state=seed).fit(x)
    return torch.as_tensor(km.cluster_centers_).float()


class _LinearFit:
    """The task's penalised linear model on standardised bag vectors."""

    def __init__(self, model: PooledLinear, task: Task, train: pd.DataFrame, rot, seed: int):
        self.model, self.task, self.rot, self.seed = model, task, rot, seed
        self.survival = task.target_kind == "survival"
        self.grid = ALPHA_GRID if self.survival else C_GRID
        self.penalty_name = "alpha" if self.survival else "C"

    def fit(self, z: np.ndarray, bags: pd.DataFrame, penalty: float):
        """``(weight, bias, delta_h0)`` tensors for :meth:`PooledLinear.set_head`."""
        zr = z if self.rot is None else z @ self.rot
        back = (lambda w: w) if self.rot is None else (lambda w: w @ self.rot.T)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes at the weakest penalties
            if self.survival:
                return self._fit_cox(zr, bags, penalty, back)
            weight = getattr(self.task, "weight", None)
            lr = LogisticRegression(
                C=penalty, max_iter=5000, random_state=self.seed,
                class_weight=None if weight is None else dict(enumerate(weight.tolist())),
            ).fit(zr, bags["label"].to_numpy(int))  # fmt: skip
        w, b = back(lr.coef_), lr.intercept_
        if len(lr.classes_) == 2:  # softmax([0, eta]) = sigmoid(eta)
            w, b = np.vstack([np.zeros_like(w), w]), np.array([0.0, b[0]])
        return torch.as_tensor(w).float(), torch.as_tensor(b).float(), None

    def _fit_cox(self, zr, bags, penalty, back):
        time, event = bags["time"].to_numpy(float), bags["event"].to_numpy(bool)
        ties = getattr(self.task, "ties", "efron")
        cox = CoxPHSurvivalAnalysis(alpha=penalty, ties=ties, n_iter=200).fit(
            zr, Surv.from_arrays(event, time)
        )
        w = back(cox.coef_[None, :])
        delta = None
        if self.model.n_out > 1:  # discrete-time hazards per bin from the Breslow baseline
            breslow = BreslowEstimator().fit(zr @ cox.coef_, event, time)
            cuts = np.asarray(self.task.state()["bin_cuts"], float)
            h0 = breslow.cum_baseline_hazard_
            at = np.concatenate([[0.0], cuts, [h0.x[-1]]])
            cum = np.where(at < h0.x[0], 0.0, h0(np.clip(at, h0.x[0], h0.x[-1])))
            delta = torch.as_tensor(np.diff(cum)).float()
        return torch.as_tensor(w).float(), torch.zeros(1), delta

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
