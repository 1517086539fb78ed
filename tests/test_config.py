from pathlib import Path

import pytest
import yaml

from mil.config import config_from_dict, dump_config, load_config
from mil.data.synthetic import demo_config
from mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_validates():
    files = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_demo_yaml_matches_what_mil_demo_runs():
    shipped = yaml.safe_load((ROOT / "experiments" / "demo_classification.yaml").read_text())
    ours = demo_config("classification", "results/demo")
    for section in ("task", "model", "train"):
        assert shipped[section] == ours[section], section
    for key in ("csv", "features"):
        assert shipped["data"][key] == ours["data"][key]
    assert {k: v for k, v in shipped["splits"].items() if k != "dir"} == {
        k: v for k, v in ours["splits"].items() if k != "dir"
    }


def test_overrides_and_types():
    cfg = config_from_dict(
        {"data": {"csv": "a", "features": "b"}},
        overrides=[
            "train.lr=1e-4",
            "train.patience=null",
            "splits.val_fraction=0",
            "model.gated=false",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.patience is None and cfg.model["gated"] is False
    assert isinstance(cfg.splits.val_fraction, float)
    # the resolved config round-trips
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trian": {}}, "'trian'"),
        ({"train": {"lrr": 1}}, "'train.lrr'"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size"),
        ({"data": {"bag_level": "case"}}, "data.bag_level"),
        ({"model": {"name": "nope"}}, "nope"),
        ({"model": {"name": "abmil", "heads": 2}}, "'model.heads'"),
        ({"train": {"patience": 5}, "splits": {"val_fraction": 0}}, "train.patience"),
        ({"splits": {"folds": 1}}, "splits.folds"),
    ],
)
def test_bad_values_name_the_key_and_file(raw, key):
    raw = {"data": {"csv": "a", "features": "b"}, **raw}
    if "data" in raw and "csv" not in raw["data"]:
        raw["data"].update(csv="a", features="b")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw, source="study.yaml")
    assert key in str(exc.value) and "study.yaml" in str(exc.value)


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
