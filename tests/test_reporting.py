"""One way to write a value with its 95% CI, a difference and a p-value in every table
(:mod:`mil.reporting`), checked on hand-chosen numbers, on every table writer fed known
numbers, and on the report, comparison and terminal lines of a real tiny run; and the metric
vocabulary against the keys the tasks and a run really write."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mil.reporting import (
    MISSING,
    gets_ci,
    interval,
    kind,
    mean_sd,
    metric_label,
    number,
    p_phrase,
    p_value,
    value_ci,
)
from tests.conftest import small_config

NUM = r"[+-]?\d+\.\d{3}"
#: the one style: a value, then its CI in brackets, both with three decimals
VALUE_CI = re.compile(rf"(?P<v>{NUM}) \[(?P<lo>{NUM}), (?P<hi>{NUM})\]")
#: a bracket holding a number (not a header's ``[95% CI]``, not an image link): an interval
BRACKET = re.compile(r"(?<!!)\[(?!95% CI)[^\[\]\n]*\d[^\[\]\n]*\]")
#: the styles it replaced: ``lo – hi``, ``(lo – hi)`` and ``95% CI lo to hi``
OLD_STYLES = (
    re.compile(r"\d\.\d+ – [+-]?\d"),
    re.compile(r"95% CI [+-]?\d"),
    re.compile(rf"{NUM} to {NUM}"),
)


def assert_one_style(text: str) -> int:
    """Every bracketed number in ``text`` is a ``[lo, hi]`` interval (three decimals, a sign on
    both bounds or on neither, lo <= hi, after its value where one stands before it), and
    none of the old styles occurs; returns how many intervals there are."""
    for old in OLD_STYLES:
        assert not old.search(text), f"old CI style {old.search(text)[0]!r} in:\n{text}"
    n = 0
    for b in BRACKET.finditer(text):
        m = re.fullmatch(rf"\[({NUM}), ({NUM})\]", b[0])
        assert m, f"{b[0]!r} is not an interval [lo, hi] of the one style"
        lo, hi = m[1], m[2]
        assert lo[0] in "+-" if hi[0] in "+-" else lo[0] not in "+-", b[0]
        assert float(lo) <= float(hi), b[0]
        n += 1
    for m in VALUE_CI.finditer(text):  # a difference is signed with its bounds, a value is not
        assert (m["v"][0] in "+-") == (m["lo"][0] in "+-"), m[0]
    return n


# ---- the formatter on hand-chosen numbers -------------------------------------------------


def test_value_with_ci_rounds_to_three_decimals():
    assert value_ci(0.81234, (0.77061, 0.84987)) == "0.812 [0.771, 0.850]"
    assert value_ci(np.float64(0.8126), [np.float32(0.5), 1.0]) == "0.813 [0.500, 1.000]"
    assert value_ci(1, (0, 1)) == "1.000 [0.000, 1.000]"
    assert number(12.3456, 2) == "12.35" and number(123.6, 0) == "124"
    assert interval((0.1, 0.25)) == "[0.100, 0.250]"


def test_differences_are_signed_and_never_minus_zero():
    assert value_ci(0.0214, (0.0021, 0.0396), signed=True) == "+0.021 [+0.002, +0.040]"
    assert value_ci(-0.0214, (-0.0396, 0.0021), signed=True) == "-0.021 [-0.040, +0.002]"
    assert value_ci(-0.0004, (-0.0204, 0.0001), signed=True) == "+0.000 [-0.020, +0.000]"
    assert number(-0.0004) == "0.000" and number(-0.0006) == "-0.001"


def test_undefined_numbers_have_one_placeholder():
    nan, inf = float("nan"), float("inf")
    for missing in (None, nan, inf, np.nan, "0.5"):
        assert number(missing) == MISSING and value_ci(missing, (0.1, 0.2)) == MISSING
        assert p_value(missing) == MISSING and mean_sd(missing, 0.1) == MISSING
    # an undefined CI (or bound) leaves the value alone
    for ci in (None, (), (nan, 0.6), [None, None], (0.4, inf)):
        assert value_ci(0.5, ci) == "0.500" and interval(ci) == ""
    assert mean_sd(0.81234, 0.0312) == "0.812 ± 0.031" and mean_sd(0.8, nan) == "0.800"


def test_p_values_have_one_style():
    assert [p_value(p) for p in (0.0342, 0.5, 1.0, 0.001, 0.00099, 1e-12)] == [
        "0.034",
        "0.5",
        "1",
        "0.001",
        "< 0.001",
        "< 0.001",
    ]
    assert p_phrase(0.0342) == "p = 0.034" and p_phrase(3e-5) == "p < 0.001"
    assert p_phrase(None) == f"p = {MISSING}"


def test_the_check_of_the_one_style_catches_the_old_ones():
    assert assert_one_style("| auc | 0.812 [0.771, 0.850] | +0.021 [+0.002, +0.040] |") == 2
    for old in (
        "| auc | 0.812 ± 0.020 | 0.771 – 0.850 |",
        "| site = A | 0.812 (0.771 – 0.850) |",
        "difference +0.021 (95% CI +0.002 to +0.040, p = 0.034)",
        "| auc | 0.812 [0.77, 0.85] |",
        "+0.021 [0.002, 0.040]",
        "0.812 [0.850, 0.771]",
    ):
        with pytest.raises(AssertionError):
            assert_one_style(old)


# ---- the vocabulary against the keys tasks and runs write ---------------------------------


def test_every_tasks_headline_and_report_metrics_are_scores():
    from mil.tasks import available, get

    for name in available():
        cls = get(name)
        for k in (*cls.headline_metrics, *cls.report_metrics):
            assert kind(k) == "score" and gets_ci(k), (name, k)


def test_survival_metrics_keys_are_classified_as_the_task_treats_them():
    """The keys SurvivalTask.metrics writes: its pooled CI covers scores only; the log-rank p
    and Uno's truncation time are the p-value and horizon kinds."""
    from mil.tasks.survival import SurvivalTask

    task = SurvivalTask(SurvivalTask.Options(), [], None)
    rng = np.random.default_rng(0)

    def frame(n: int, fold: str) -> pd.DataFrame:
        risk = rng.normal(size=n)
        return pd.DataFrame(
            {
                "bag_id": [f"{fold}b{i}" for i in range(n)],
                "patient_id": [f"{fold}p{i}" for i in range(n)],
                "time": rng.exponential(10 * np.exp(-risk)),
                "event": (rng.random(n) < 0.7).astype(int),
                "risk": risk,
                "fold": fold,
            }
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = task.metrics(frame(40, "0"), frame(60, "0"))
    scalar = {k for k, v in metrics.items() if isinstance(v, float)}
    assert {k for k in scalar if kind(k) == "p_value"} == {"logrank_p"}
    assert {k for k in scalar if kind(k) == "horizon"} == {"c_index_uno_tau"}
    assert set(task.pooled_ci(frame(50, "1"), n_boot=20)) <= {k for k in scalar if gets_ci(k)}


def test_timings_and_labels():
    assert kind("train_seconds") == kind("seconds_per_epoch") == "timing"
    assert kind("epochs") == kind("steps") == "count"
    assert kind("threshold") == "setting" and not gets_ci("threshold")
    assert not any(gets_ci(k) for k in ("train_seconds", "epochs", "logrank_p", "x_tau"))
    assert gets_ci("pearson_r") and gets_ci("p_value_like") and gets_ci("tau_score")
    assert metric_label("seconds_per_epoch") == "s / epoch" and metric_label("auc") == "auc"


# ---- every table writer, fed known numbers ------------------------------------------------

V, CI = 0.81234, (0.77061, 0.84987)  # "0.812 [0.771, 0.850]"
D, DCI, P = -0.0214, (-0.0402, -0.0021), 0.0342  # "-0.021 [-0.040, -0.002]", "0.034"


def writers_text() -> dict[str, str]:
    from mil.compare import format_comparison, format_patterns
    from mil.generalization import format_generalization
    from mil.results.members import ensemble_lines
    from mil.results.search import average_words
    from mil.train.external_report import format_evaluation, gap_lines

    gap = {"auc": {"internal": 0.9, "external": V, "difference": D, "ci95": list(DCI), "p": P}}
    evaluation = {
        "name": "x",
        "cohort": "ext",
        "n_bags": 10,
        "n_patients": 10,
        "folds": ["0"],
        "metrics": {"auc": {"value": V, "ci95_pooled": list(CI)}, "logrank_p": {"value": 0.2}},
        "gap": gap,
    }
    delta = {"delta": D, "ci_low": DCI[0], "ci_high": DCI[1], "p": P}
    search = {
        "metric": "auc",
        "folds": ["0"],
        "points": ["a", "b"],
        "selected": {"value": V, "ci95_pooled": list(CI)},
        "average": {"value": None, "ci95_pooled": None},
        "average_minus_selected": delta,
    }
    ensemble = {
        "metric": "auc",
        "folds": ["0"],
        "average": {"value": V, "ci95_pooled": list(CI)},
        "members": {"m": {"value": V, "ci95_pooled": list(CI), "average_minus_member": delta}},
    }
    rows = {"delta": D, "delta_ci_low": DCI[0], "delta_ci_high": DCI[1], "delta_p": P}
    patterns = pd.DataFrame(
        [
            {"modalities": "slides", "n_patients": 5, "model": "a", "value": V, **rows},
            {"modalities": "slides", "n_patients": 5, "model": "r", "value": 0.8, **rows},
        ]
    ).assign(metric="auc", reference="r")
    table = pd.DataFrame(
        [
            {"model": "a", "params": 1234, "folds": 3, "auc_mean": V, "auc_sd": 0.0312},
            {"model": "r", "params": None, "folds": 3, "auc_mean": 0.8, "auc_sd": float("nan")},
        ]
    ).assign(auc_pooled=V, reference="r", **rows, seconds_per_epoch=1.234, train_seconds=60.4)
    general = pd.DataFrame(
        [
            {"model": "a", "setting": "internal CV", "cohort": "", "metric": "auc"}
            | {"n_patients": 9, "value": V, "ci_low": CI[0], "ci_high": CI[1]}
            | {"delta": np.nan, "delta_ci_low": np.nan, "delta_ci_high": np.nan, "delta_p": np.nan},
            {"model": "a", "setting": "external", "cohort": "h", "metric": "auc"}
            | {"n_patients": 9, "value": V, "ci_low": CI[0], "ci_high": CI[1], **rows},
        ]
    )
    return {
        "gap_lines": "\n".join(gap_lines({"gap": gap})),
        "format_evaluation": format_evaluation(evaluation),
        "average_words": average_words(search),
        "ensemble_lines": "\n".join(ensemble_lines({"ensemble": ensemble})),
        "format_patterns": format_patterns(patterns),
        "format_comparison": format_comparison(table),
        "format_generalization": format_generalization(general, SimpleNamespace(name="x")),
    }


@pytest.mark.parametrize(
    "writer",
    [
        "gap_lines",
        "format_evaluation",
        "average_words",
        "ensemble_lines",
        "format_patterns",
        "format_comparison",
        "format_generalization",
    ],
)
def test_every_writer_uses_the_one_style(writer):
    text = writers_text()[writer]
    assert assert_one_style(text) >= 1
    value, diff = "0.812 [0.771, 0.850]", "-0.021 [-0.040, -0.002]"
    expected = {
        "gap_lines": [diff + " (p = 0.034)"],
        "format_evaluation": [value],
        "average_words": [value, f"predictions {MISSING};", diff + ", p = 0.034"],
        "ensemble_lines": [f"| `m` | {value} | {diff} | 0.034 |"],
        "format_patterns": [f"| slides | 5 | a | 0.812 | {diff} |", "| r | 0.800 | reference |"],
        "format_comparison": [
            f"| a | 1,234 | 0.812 ± 0.031 | 0.812: {diff}, p = 0.034 | 1.23 | 60 | 3 |",
            f"| r | {MISSING} | 0.800 | 0.812 (reference) |",
            "| s / epoch | train s / fold |",
        ],
        "format_generalization": [
            f"| internal CV | auc | 9 | {value} | {MISSING} | {MISSING} |",
            f"| external: h | auc | 9 | {value} | {diff} | 0.034 |",
        ],
    }[writer]
    for piece in expected:
        assert piece in text, f"{piece!r} not in {writer}:\n{text}"


# ---- a real tiny run: report.md, comparison.md, the terminal lines ------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of a small cohort with a site column, and ``mil train --baseline``'s step (its
    printed line): report.md with results, subgroups and the baseline's difference. Few
    bootstrap resamples, for speed."""
    from mil import compare
    from mil.cli import _train_baselines
    from mil.config import config_from_dict
    from mil.train import runner

    root = tmp_path_factory.mktemp("reporting")
    raw = small_config(root / "c")
    df = pd.read_csv(raw["data"]["csv"])
    patients = df["case_id"].drop_duplicates().tolist()
    df["site"] = df["case_id"].map({p: "AB"[i % 2] for i, p in enumerate(patients)})
    df.to_csv(root / "groups.csv", index=False)
    raw["data"].update(csv=str(root / "groups.csv"), subgroup_cols=["site"])
    out = runner.run_cv(
        config_from_dict(raw), root / "run", progress=False, log=lambda *a: None, n_boot=50
    )
    del raw["data"]["subgroup_cols"]  # the baseline's own summary needs no subgroups
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the baseline's folds may predict one class
        mp.setattr(runner, "run_cv", functools.partial(runner.run_cv, n_boot=50))
        mp.setattr(compare, "run_baselines", functools.partial(compare.run_baselines, n_boot=50))
        with contextlib.redirect_stdout(printed):
            _train_baselines(config_from_dict(raw), out, ["meanpool_linear"], False, None)
    return out, printed.getvalue()


def test_a_real_runs_tables_write_every_ci_in_the_one_style(tiny_run):
    from mil.compare import format_comparison, paired_comparison
    from mil.train.summary import format_summary

    out, printed = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    baseline = pd.read_csv(out / "baselines.csv").iloc[0]
    report = (out / "report.md").read_text()
    run_dirs = {"abmil": out, "meanpool_linear": out / "baselines" / "meanpool_linear"}
    compared = paired_comparison(run_dirs, "meanpool_linear", n_boot=50, log=print)
    comparison = format_comparison(compared)
    terminal = format_summary(summary)
    # results, subgroups and the baseline's difference in report.md; the comparison's
    # difference; the terminal summary's CIs and subgroups
    assert assert_one_style(report) >= len(summary["subgroups"]) + 2
    assert assert_one_style(comparison) == 1 and assert_one_style(printed) >= 1
    assert assert_one_style(terminal) >= 2
    # the numbers are the summary's and baselines.csv's, rounded by hand
    lo, hi = summary["metrics"]["auc"]["ci95_pooled"]
    m = summary["metrics"]["auc"]
    assert f"| auc | {m['mean']:.3f} ± {m['sd']:.3f} | [{lo:.3f}, {hi:.3f}] |" in report
    diff = (
        f"{baseline['delta']:+.3f} [{baseline['delta_ci_low']:+.3f}, "
        f"{baseline['delta_ci_high']:+.3f}]"
    )
    assert f"| {baseline['model_value']:.3f} | {diff} |" in report
    assert f"abmil - meanpool_linear: auc difference [95% CI] {diff}, p " in printed
    a = next(r for r in summary["subgroups"] if r["value"] == "A")
    assert f"{a['auc']:.3f} [{a['auc_ci_low']:.3f}, {a['auc_ci_high']:.3f}]" in report
    row = compared.set_index("model").loc["abmil"]
    assert f"{row['delta']:+.3f} [{row['delta_ci_low']:+.3f}, " in comparison
    assert row["delta"] == pytest.approx(baseline["delta"])  # the same paired difference


def test_a_real_runs_metric_keys_are_classified_as_its_summary_treats_them(tiny_run):
    """Every scalar key of a fold's metrics.json: the keys the summary gives a pooled CI are
    scores; timings, counts and the rest of the non-scores get none."""
    out, _ = tiny_run
    record = json.loads((out / "fold_0" / "metrics.json").read_text())["metrics"]
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    scalar = [k for k, v in record.items() if isinstance(v, (int, float))]
    assert {"train_seconds", "seconds_per_epoch", "epochs"} <= set(scalar)
    with_ci = {k for k in summary if "ci95_pooled" in summary[k]}
    assert with_ci and all(gets_ci(k) for k in with_ci)
    assert not any("ci95_pooled" in summary.get(k, {}) for k in scalar if not gets_ci(k))
    assert {kind(k) for k in scalar} >= {"score", "timing", "count"}


def test_the_kaplan_meier_legend_writes_the_log_rank_p_in_the_one_style():
    """The figure's legend title is lifelines' log-rank p in the report's p style (a p below
    0.001 as ``p < 0.001``, never ``1e-05``)."""
    from lifelines.statistics import logrank_test

    from mil.plots import km_figure

    rng = np.random.default_rng(0)
    n = 60
    group = np.repeat(["low", "high"], n)
    time = np.concatenate([rng.exponential(20, n), rng.exponential(2, n)])
    groups = pd.DataFrame({"group": group, "time": time, "event": 1})
    ref = logrank_test(time[:n], time[n:], np.ones(n), np.ones(n)).p_value
    assert ref < 0.001
    title = km_figure(groups, "t").axes[0].get_legend().get_title().get_text()
    assert title == f"log-rank {p_phrase(ref)}" == "log-rank p < 0.001"
