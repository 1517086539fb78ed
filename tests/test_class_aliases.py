"""``data.class_aliases``: centres that name a class differently are read as one class, in
training and in ``mil evaluate``; contradictory aliases are refused naming the key."""

from __future__ import annotations

import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.data.sources import load_cohort
from mil.errors import ConfigError, DataError
from mil.evaluate import evaluate
from tests.conftest import small_config
from tests.test_evaluate import cls_run, cohort_yaml, root, write_cohort  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def relabel(csv, old: str, new: str, every: int = 2) -> pd.DataFrame:
    """Rename class ``old`` to ``new`` in every ``every``-th row of that class."""
    df = pd.read_csv(csv)
    rows = df.index[df["label"] == old][::every]
    df.loc[rows, "label"] = new
    df.to_csv(csv, index=False)
    return df


def test_aliases_are_read_as_their_class(tmp_path):
    raw = small_config(tmp_path)
    original = pd.read_csv(raw["data"]["csv"])
    df = relabel(raw["data"]["csv"], "positive", "Positive (NOS)")
    cohort, _ = load_cohort(config_from_dict(raw))
    assert sorted(cohort.classes) == ["Positive (NOS)", "negative", "positive"]  # without aliases
    raw["data"]["class_aliases"] = {"positive": ["Positive (NOS)"]}
    cohort, _ = load_cohort(config_from_dict(raw))
    assert cohort.classes == ["negative", "positive"]
    expected = original.set_index("slide_id")["label"].map({"negative": 0, "positive": 1})
    got = cohort.bags.set_index("bag_id")["label"]  # slide-level bags: bag id = slide id
    assert (got == expected.loc[got.index]).all()
    assert df["label"].eq("Positive (NOS)").sum() > 0


@pytest.mark.parametrize(
    "aliases, match",
    [
        ({"positive": ["pos"], "negative": ["pos"]}, "alias of both"),
        ({"positive": ["negative"], "negative": ["neg"]}, "both a class and an alias"),
        ({"positive": "pos"}, "must be a list"),
    ],
)
def test_contradictory_aliases_are_refused(tmp_path, aliases, match):
    raw = small_config(tmp_path)
    raw["data"]["class_aliases"] = aliases
    with pytest.raises(ConfigError, match=match) as err:
        config_from_dict(raw, source="cohort.yaml")
    assert "data.class_aliases" in str(err.value)


def test_an_external_cohort_naming_a_class_differently_is_evaluated_with_an_alias(
    root,
    cls_run,
    tmp_path,
):
    data = write_cohort(root, "ext_alias", "classification", seed=11)
    relabel(data["csv"], "positive", "POS", every=1)
    with pytest.raises(DataError, match=r"class 'POS'.*data.class_aliases"):
        evaluate(
            cls_run, cohort_yaml(tmp_path / "plain.yaml", data), tmp_path / "refused", n_boot=20
        )
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    config = cohort_yaml(tmp_path / "alias.yaml", {**data, "class_aliases": {"positive": ["POS"]}})
    summary = evaluate(cls_run, config, tmp_path / "ok", n_boot=20)
    pred = pd.read_csv(tmp_path / "ok" / "predictions.csv")
    truth = pd.read_csv(data["csv"]).set_index("slide_id")["label"].eq("POS").astype(int)
    assert (pred.set_index("bag_id")["label_index"] == truth.loc[pred["bag_id"]].to_numpy()).all()
    assert summary["n_bags"] == len(truth)
