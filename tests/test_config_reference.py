"""docs/config.md against the schema: every key, its default and its choices; the search,
compare and tabular keys; its examples are valid configs."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mil.compare import ENTRY_KEYS
from mil.config import SEARCH_DATA_KEYS, SEARCH_TRAIN_KEYS, config_from_dict, searchable
from mil.data.tabular_read import SPEC_KEYS
from mil.models.registry import hyperparameters
from mil.schema import Config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"
SCHEMA_HEADER = ["key", "type", "default", "meaning", "default chosen on"]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of ``text``: its header cells and its rows of cells."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"[|\-: ]+", lines[i + 1].strip()):
            header, rows, i = cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def rows_of(first_header_cell: str) -> dict[str, list[str]]:
    """The rows (by their first cell, unquoted) of the tables whose first header cell is this."""
    found = [rows for header, rows in tables(DOC.read_text()) if header[0] == first_header_cell]
    assert found, f"docs/config.md has no table headed {first_header_cell!r}"
    return {unquote(r[0]): r for rows in found for r in rows}


def schema_rows() -> dict[str, list[str]]:
    """Rows of the schema tables (header ``key | type | default | meaning | default chosen on``)."""
    out = {}
    for header, rows in tables(DOC.read_text()):
        if header[0] == "key":
            assert header == SCHEMA_HEADER, header
            for r in rows:
                assert len(r) == len(SCHEMA_HEADER), r
                assert unquote(r[0]) not in out, f"{r[0]} is documented twice"
                out[unquote(r[0])] = r
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def schema_keys() -> dict[str, tuple[Any, Any]]:
    """Every key a config may set (dotted), with its type hint and default; ``model`` is its
    ``name`` (the model's own keys are the model's, not the schema's)."""
    out: dict[str, tuple[Any, Any]] = {}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = typing.get_type_hints(hint)
            for g in dataclasses.fields(hint):
                if not g.metadata.get("internal"):
                    out[f"{f.name}.{g.name}"] = (sub[g.name], _default(g))
        elif f.name == "model":
            out["model.name"] = (str, _default(f)["name"])
        else:
            out[f.name] = (hint, _default(f))
    return out


def words(hint: Any) -> list[str]:
    """What the type cell of ``hint`` must name: each literal value (in backticks), ``null``
    for an optional key, and the plain types."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, type(int | None)):
        return [w for h in typing.get_args(hint) for w in words(h)]
    if origin is Literal:
        return [f"`{v}`" for v in typing.get_args(hint)]
    if hint is type(None):
        return ["null"]
    if origin is list:
        return ["list"]
    if origin is dict:
        return ["mapping"]
    return [{bool: "bool", int: "int", float: "float", str: "str"}[hint]]


def test_every_schema_key_is_documented_and_no_other():
    documented, schema = set(schema_rows()), set(schema_keys())
    assert not schema - documented, (
        f"schema keys missing from docs/config.md: {sorted(schema - documented)}"
    )
    assert not documented - schema, (
        f"docs/config.md names keys the schema lacks: {sorted(documented - schema)}"
    )


@pytest.mark.parametrize("key", sorted(schema_keys()))
def test_documented_default_and_type(key):
    hint, default = schema_keys()[key]
    row = schema_rows().get(key)
    if row is None:
        pytest.skip(f"{key} is not documented (the test above fails)")
    documented = yaml.safe_load(unquote(row[2]))
    if isinstance(default, float):
        assert isinstance(documented, (int, float)) and documented == pytest.approx(default), key
    else:
        assert documented == default and type(documented) is type(default), (
            key,
            documented,
            default,
        )
    for word in words(hint):
        assert word in row[1], f"{key}: the type cell {row[1]!r} does not name {word}"
    assert row[3], f"{key}: no meaning given"


def test_the_default_models_keys():
    """The table of the default model's keys names each of its hyper-parameters with its default."""
    name = Config().model_name
    rows = rows_of(f"key (`{name}`)")
    assert {k.removeprefix("model.") for k in rows} == set(hyperparameters(name))
    for key, row in rows.items():
        assert (
            yaml.safe_load(unquote(row[1])) == hyperparameters(name)[key.removeprefix("model.")]
        ), key


def test_search_keys():
    """The search table lists exactly the searchable ``train.`` and ``data.`` keys, with the
    choices of each; the other ``train.`` keys are named as refused."""
    rows = rows_of("`search` key")
    assert {k for k in rows if k.startswith("train.")} == {f"train.{k}" for k in SEARCH_TRAIN_KEYS}
    assert {k for k in rows if k.startswith("data.")} == set(SEARCH_DATA_KEYS)
    assert {k for k in rows if k.startswith("model.")} == {"model.name", "model.<hyper-parameter>"}
    hints = schema_keys()
    for key, row in rows.items():
        assert searchable(key.replace("<hyper-parameter>", "hidden_dim")), key
        if key in hints:
            for word in words(hints[key][0]):
                if word.startswith("`"):
                    assert word in row[1], f"search {key}: {word} is not among its values"
    text = DOC.read_text()
    refused = [k for k in hints if k.startswith("train.") and k not in rows]
    section = text[text.index("## `search:` keys") :]
    for key in refused:
        assert f"`{key.removeprefix('train.')}`" in section, f"{key}: not named as refused"


def test_compare_and_tabular_entry_keys():
    assert set(rows_of("`compare` entry key")) == ENTRY_KEYS
    assert set(rows_of("`data.tabular` entry key")) == set(SPEC_KEYS)


def test_examples_are_valid_configs():
    """The YAML blocks of docs/config.md, together, load as one config."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    raw: dict[str, Any] = {}
    for block in blocks:
        raw.update(yaml.safe_load(block))
    cfg = config_from_dict(raw, source="docs/config.md")
    assert cfg.compare and cfg.search


def test_readme_links_the_reference():
    assert "docs/config.md" in (ROOT / "README.md").read_text()
