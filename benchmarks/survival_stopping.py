"""Which epoch should a survival fold keep? Per-epoch traces of every candidate criterion.

Trains the default survival recipe for its whole budget (no early stopping) on each cohort's
5 patient-level folds and records, per epoch, what each stopping criterion sees on the inner
validation patients, and what the test fold would have scored at that epoch (for analysis
only; never for a choice):

- ``val_loss``: the Cox partial likelihood of the validation risks (today's criterion);
- ``val_c_index``: Harrell's C of the validation risks;
- ``val_loss_z``: the partial likelihood of the validation risks standardised by the training
  fold's risks (mean 0, sd 1): scale-free, so a model growing confident is not penalised;
- ``val_loss_best_scale``: the partial likelihood at the best scale of the risks (a 1-d fit):
  the likelihood of the ranking alone;
- ``test_c_index`` and, in ``fold_<k>/epoch_risks.npz``, every epoch's test and training
  risks, so that a kept epoch can be averaged with a linear model afterwards.

Then it reads the traces and writes ``stopping.csv`` / ``stopping.md``: per cohort and
criterion (raw, and smoothed by a 3-epoch moving average), the kept epochs and the pooled
test C-index at them, beside the last epoch and the oracle (best test epoch).

    python benchmarks/survival_stopping.py --out results/stopping [--only blca,hnsc]

Cohorts: the six TCGA survival cohorts of ``../shared/datasets/real`` (selection cohorts)
and a synthetic one. Each is an ordinary run folder, so runs resume.

    python benchmarks/survival_stopping.py --smoke [--out results/stopping_smoke]

runs every step on a 40-patient synthetic cohort (``surv-smoke``), 2 folds of 4 epochs:
seconds (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "datasets" / "real"
REAL_SURVIVAL = ("nsclc", "blca", "hnsc", "stad", "lihc", "skcm")
CRITERIA = {  # column -> +1 higher is better, -1 lower is better
    "val_loss": -1,
    "val_c_index": +1,
    "val_loss_z": -1,
    "val_loss_best_scale": -1,
}


def real_data(name: str) -> dict:
    folder = REAL / (f"hipt4k_tcga_{name}" + ("" if name == "nsclc" else "_surv"))
    return {
        "csv": str(folder / "cohort.csv"),
        "features": str(folder / "features"),
        "patient_col": "case_id",
        "time_col": "time",
        "event_col": "event",
        "bag_level": "patient",
    }


#: synthetic cohorts (``mil.data.synthetic``, log-hazard from a tile kind's share): the cohort
#: zoo's ``surv-fraction``, and a tiny one for ``--smoke``
SYNTHETIC = {
    "surv-fraction": dict(
        n_patients=150, n_two_slides=10, dim=64, min_tiles=40, max_tiles=400, seed=7
    ),
    "surv-smoke": dict(n_patients=40, n_two_slides=4, dim=16, min_tiles=10, max_tiles=40, seed=7),
}
#: ``--smoke``: ``run_cohort``'s arguments (the inner validation split large enough for events)
SMOKE = {"names": ["surv-smoke"], "folds": 2, "train": {"epochs": 4}, "val_fraction": 0.3}


def synthetic_data(name: str, out: Path) -> dict:
    """A cohort of :data:`SYNTHETIC`, generated once under ``out/cohorts``."""
    from mil.data.synthetic import write_synthetic_cohort

    root = out / "cohorts" / name
    if not (root / "cohort.csv").exists():
        write_synthetic_cohort(
            "survival", root / "cohort.csv", root / "features", **SYNTHETIC[name]
        )
    return {
        "csv": str(root / "cohort.csv"),
        "features": str(root / "features"),
        "patient_col": "case_id",
        "time_col": "survival_months",
        "event_col": "censorship",
        "censored_value": 1,
    }


def best_scale_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> float:
    """The Cox loss at the best scale ``s`` of ``risk`` (golden-section search on log s)."""
    from mil.losses import cox_ph_loss

    z = (risk - risk.mean()) / risk.std().clamp_min(1e-12)

    def f(log_s: float) -> float:
        return float(cox_ph_loss(z * float(np.exp(log_s)), time, event))

    lo, hi = np.log(1e-3), np.log(1e2)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return min(fa, fb)


@contextlib.contextmanager
def traced(fold_dir_of):
    """Patch the runner so that every validation pass also records the criteria above and
    the test fold's C-index (written into history.csv) and the epoch's risks."""
    from mil.losses import cox_ph_loss
    from mil.metrics.survival import c_index
    from mil.train import loop, runner

    context: dict = {}
    original_validate, original_tt, original_setup = (
        loop._validate,
        runner._train_and_test,
        runner.fold_setup,
    )

    def fold_setup(exp, task, train_ids):
        model, norm, data = original_setup(exp, task, train_ids)
        context["data"] = data
        return model, norm, data

    def train_and_test(exp, task, split, train, val, test, device, dist, *more, **options):
        context.update(train=train, test=test, risks=[], split=split)
        out = original_tt(exp, task, split, train, val, test, device, dist, *more, **options)
        path = fold_dir_of(split.name) / "epoch_risks.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            test_ids=np.array(test["bag_id"].tolist()),
            test=np.stack([r[0] for r in context["risks"]]),
            train_mean=np.array([r[1] for r in context["risks"]]),
            train_sd=np.array([r[2] for r in context["risks"]]),
        )
        return out

    def validate(model, task, data, val, val_targets, cfg, device, dist, desc, epoch):
        row = original_validate(model, task, data, val, val_targets, cfg, device, dist, desc, epoch)

        def risks(frame):
            fwd = loop.predict(
                model, context["data"], frame["bag_id"].tolist(), cfg.max_instances, device
            )
            return fwd.logits[:, 0].double()

        r_train, r_val, r_test = risks(context["train"]), risks(val), risks(context["test"])
        t, e = val_targets["time"].double(), val_targets["event"]
        z = (r_val - r_train.mean()) / r_train.std().clamp_min(1e-12)
        row["val_loss_z"] = float(cox_ph_loss(z, t, e))
        row["val_loss_best_scale"] = best_scale_loss(r_val, t, e)
        test = context["test"]
        row["test_c_index"] = c_index(
            test["time"].to_numpy(float), test["event"].to_numpy(int), r_test.numpy()
        )
        context["risks"].append((r_test.numpy(), float(r_train.mean()), float(r_train.std())))
        return row

    loop._validate, runner._train_and_test, runner.fold_setup = validate, train_and_test, fold_setup
    try:
        yield
    finally:
        loop._validate, runner._train_and_test, runner.fold_setup = (
            original_validate,
            original_tt,
            original_setup,
        )


def run_cohort(
    name: str,
    out: Path,
    folds: int = 5,
    train: dict | None = None,
    val_fraction: float | None = None,
) -> Path:
    """The cohort's traced run (``out/full/<name>``); ``train`` keys and ``val_fraction`` (the
    smoke run's) beside the defaults."""
    from mil.config import config_from_dict
    from mil.results import RunFolder
    from mil.train.runner import run_cv

    data = synthetic_data(name, out) if name in SYNTHETIC else real_data(name)
    splits = {"folds": folds, "seed": 0, "dir": str(out / "splits" / name)}
    if val_fraction is not None:
        splits["val_fraction"] = val_fraction
    raw = {
        "name": name,
        "task": {"type": "survival"},
        "data": data,
        "splits": splits,
        "train": {"patience": None, "threads": 1, "faithfulness": False, **(train or {})},
        "ensemble": [],  # the model alone: the analysis averages it with the linear model itself
    }
    run_dir = out / "full" / name
    with traced(RunFolder(run_dir).fold_dir):
        run_cv(
            config_from_dict(raw, source=name),
            run_dir,
            progress=False,
            log=lambda *a: None,
            n_boot=200,
        )
    return run_dir


def kept_epoch(
    h: pd.DataFrame, column: str, sign: int, smooth: int, start: int, patience: int | None = None
) -> int:
    """The epoch a criterion keeps: its best (moving average over ``smooth`` epochs) from
    ``start`` on; with ``patience``, the best before it first fails to improve for that many
    epochs (as early stopping would stop)."""
    v = h[column].to_numpy(float) * sign
    if smooth > 1:
        v = pd.Series(v).rolling(smooth, center=True, min_periods=1).mean().to_numpy()
    v[: min(start, len(v) - 1)] = -np.inf
    if patience is None:
        return int(np.nanargmax(v))
    best, waited = start, 0
    for e in range(start, len(v)):
        if v[e] > v[best] + 1e-9 or e == start:
            best, waited = e, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best


def run_linear(name: str, out: Path) -> Path:
    """``meanpool_linear`` on the cohort's split files (the member to average with)."""
    from mil.config import config_from_dict
    from mil.train.runner import run_cv

    raw = yaml.safe_load((out / "full" / name / "config.yaml").read_text())
    raw["model"] = {"name": "meanpool_linear"}
    run_dir = out / "linear" / name
    run_cv(
        config_from_dict(raw, source=name), run_dir, progress=False, log=lambda *a: None, n_boot=200
    )
    return run_dir


def pooled_c(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """Harrell's C over pairs within each fold (as mil pools folds)."""
    from mil.metrics.survival import pooled_c_index

    time = np.concatenate([p[0] for p in parts])
    event = np.concatenate([p[1] for p in parts])
    risk = np.concatenate([p[2] for p in parts])
    fold = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
    return pooled_c_index(time, event, risk, fold)["c_index"]


def analyse(name: str, out: Path) -> list[dict]:
    """Per criterion (and smoothing): kept epochs, pooled test C of the MIL model alone and
    averaged with ``meanpool_linear`` (risks standardised by each model's training risks)."""
    full, lin = out / "full" / name, run_linear(name, out)
    folds = sorted(p.name[len("fold_") :] for p in full.glob("fold_*"))
    rules = {"last": None, "oracle (test)": None}
    rules.update(
        {f"{c} (smooth {k})": (c, sign, k, None) for c, sign in CRITERIA.items() for k in (1, 3)}
    )
    rules.update({f"{c} (patience 8)": (c, sign, 1, 8) for c, sign in CRITERIA.items()})
    rows = []
    for rule, spec in rules.items():
        alone, mixed, epochs, c_gap, in_warmup = [], [], [], [], 0
        for k in folds:
            h = pd.read_csv(full / f"fold_{k}" / "history.csv")
            npz = np.load(full / f"fold_{k}" / "epoch_risks.npz")
            if spec is None:
                e = len(h) - 1 if rule == "last" else int(h["test_c_index"].to_numpy().argmax())
            else:
                e = kept_epoch(h, spec[0], spec[1], spec[2], 0, spec[3])
            epochs.append(e)
            # the 50-step warm-up's last epoch
            warm = int(np.searchsorted(h["steps"].cumsum().to_numpy(), 50))
            in_warmup += int(e <= warm)
            c_gap.append(float(h["val_c_index"].max() - h["val_c_index"].iloc[e]))
            test = pd.read_csv(full / f"fold_{k}" / "predictions.csv").set_index("bag_id")
            ids = [str(i) for i in npz["test_ids"]]
            time, event = (
                test.loc[ids, "time"].to_numpy(float),
                test.loc[ids, "event"].to_numpy(int),
            )
            z = (npz["test"][e] - npz["train_mean"][e]) / max(npz["train_sd"][e], 1e-12)
            lt = (
                pd.read_csv(lin / f"fold_{k}" / "predictions.csv")
                .set_index("bag_id")
                .loc[ids, "risk"]
            )
            ltr = pd.read_csv(lin / f"fold_{k}" / "predictions_train.csv")["risk"]
            zl = (lt.to_numpy(float) - ltr.mean()) / ltr.std(ddof=0)
            alone.append((time, event, z))
            mixed.append((time, event, (z + zl) / 2))
        rows.append(
            {
                "cohort": name,
                "rule": rule,
                "epochs": ",".join(map(str, epochs)),
                "c_mil": pooled_c(alone),
                "c_mil_plus_linear": pooled_c(mixed),
                "folds_in_warmup": in_warmup,
                "max_val_c_gap": max(c_gap),
            }
        )
    linear_only = []
    for k in folds:
        t = pd.read_csv(lin / f"fold_{k}" / "predictions.csv")
        linear_only.append(
            (t["time"].to_numpy(float), t["event"].to_numpy(int), t["risk"].to_numpy(float))
        )
    rows.append(
        {"cohort": name, "rule": "meanpool_linear", "epochs": "", "c_mil": pooled_c(linear_only)}
    )
    return rows


def markdown(frame: pd.DataFrame) -> str:
    head = ["rule", *map(str, frame.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule, r in frame.iterrows():
        lines.append("| " + " | ".join([str(rule), *(f"{v:.3f}" for v in r)]) + " |")
    return "\n".join(lines)


def stopping(
    out: Path,
    names: list[str],
    analyse_only: bool = False,
    folds: int = 5,
    train: dict | None = None,
    val_fraction: float | None = None,
) -> pd.DataFrame:
    """Every cohort's traced run (unless ``analyse_only``) and its analysis: ``stopping.csv``
    (a row per cohort and rule) and ``stopping.md``."""
    rows = []
    for name in names:
        if not analyse_only:
            print(f"== {name}", flush=True)
            run_cohort(name, out, folds, train, val_fraction)
        rows += analyse(name, out)
    table = pd.DataFrame(rows)
    table.to_csv(out / "stopping.csv", index=False)
    wide = table.pivot(index="rule", columns="cohort", values="c_mil").round(3)
    mixed = table.pivot(index="rule", columns="cohort", values="c_mil_plus_linear").round(3)
    wide["mean"], mixed["mean"] = wide.mean(1).round(3), mixed.mean(1).round(3)
    text = f"## MIL alone\n\n{markdown(wide)}\n\n## MIL + meanpool_linear (averaged)\n\n{markdown(mixed)}"
    (out / "stopping.md").write_text(text + "\n")
    print(text)
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", help="output folder (default results/stopping, or results/stopping_smoke)"
    )
    ap.add_argument("--only", default=None)
    ap.add_argument("--analyse", action="store_true", help="only read the finished traces")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    args = ap.parse_args(argv)
    out = Path(args.out or ("results/stopping_smoke" if args.smoke else "results/stopping"))
    if args.smoke:
        stopping(out, analyse_only=args.analyse, **SMOKE)
        return
    names = args.only.split(",") if args.only else [*REAL_SURVIVAL, "surv-fraction"]
    stopping(out, names, args.analyse)


if __name__ == "__main__":
    main()
