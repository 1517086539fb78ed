"""The built-in tasks' closed-form linear models on standardised bag vectors (the heads of
``meanpool_linear`` / ``bow_linear``, fitted by :mod:`mil.train.closed_form`).

- classification: ``sklearn.linear_model.LogisticRegression(C)`` (multinomial; class weights);
- survival: ``sksurv.linear_model.CoxPHSurvivalAnalysis(alpha)`` (ridge Cox, the task's ties);
  for the discrete-time loss its linear predictor becomes per-bin hazards through the
  Breslow baseline of the training bags (``sksurv.linear_model.coxph.BreslowEstimator``).
"""

from __future__ import annotations

import warnings

import numpy as np

#: inverse penalties of the logistic regression, and ridge penalties of the Cox model
C_GRID = tuple(10.0**k for k in range(-4, 3))
ALPHA_GRID = tuple(10.0**k for k in range(-2, 4))


def logistic_head(
    z: np.ndarray, y: np.ndarray, C: float, weight: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray, None]:
    """Class logits ``W z + b`` (``[K, D]``, ``[K]``) of an L2 logistic regression; two classes
    as ``softmax([0, eta]) = sigmoid(eta)``."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes at the weakest penalties
        lr = LogisticRegression(
            C=C,
            max_iter=5000,
            random_state=seed,
            class_weight=None if weight is None else dict(enumerate(np.asarray(weight).tolist())),
        ).fit(z, y)
    w, b = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2:
        w, b = np.vstack([np.zeros_like(w), w]), np.array([0.0, b[0]])
    return w, b, None


def cox_head(
    z: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    alpha: float,
    ties: str,
    bin_cuts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A ridge Cox model's coefficients ``[1, D]`` and zero bias; with ``bin_cuts`` (the
    discrete-time bins) the Breslow baseline hazard of each bin, ``delta_h0``."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.util import Surv

    event = np.asarray(event, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cox = CoxPHSurvivalAnalysis(alpha=alpha, ties=ties, n_iter=200).fit(
            z, Surv.from_arrays(event, np.asarray(time, float))
        )
    delta = None
    if bin_cuts is not None:
        breslow = BreslowEstimator().fit(z @ cox.coef_, event, time)
        h0 = breslow.cum_baseline_hazard_
        at = np.concatenate([[0.0], np.asarray(bin_cuts, float), [h0.x[-1]]])
        cum = np.where(at < h0.x[0], 0.0, h0(np.clip(at, h0.x[0], h0.x[-1])))
        delta = np.diff(cum)
    return cox.coef_[None, :], np.zeros(1), delta
