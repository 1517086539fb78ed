"""Trained fold models on new bags: each fold's preprocessing, instance graph and task outputs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mil.config import Config
from mil.data.dataset import BagDataset, FeatureStore
from mil.data.readers import FEATURE_SUFFIXES
from mil.data.tabular import TabularScaler, TabularTable
from mil.data.transforms import Standardizer
from mil.errors import MilError, MilWarning
from mil.metrics.instances import LOGIT_KINDS
from mil.results import REFIT
from mil.results.checkpoint import load_model
from mil.results.members import read_chosen, read_members
from mil.results.scores import DEFAULT
from mil.tasks import Task, make_task
from mil.train.loop import Forward, predict
from mil.train.replicas import average_forwards

Item = str | Path


class FoldModel:
    """A fold's ``model.pt``: the model (eval mode), its task and feature standardisation."""

    def __init__(
        self, path: Path, cfg: Config, fold: str, device: str | torch.device = "cpu"
    ) -> None:
        if not path.is_file() and fold == REFIT:
            raise MilError(
                f"{path}: the refit model is missing; delete {path.parent} and run `mil train "
                f"CONFIG --out {path.parent.parent} --refit` again"
            )
        if not path.is_file():
            raise MilError(f"fold {fold}: no checkpoint {path}")
        # read on the CPU, where the fold's preprocessing runs; the model alone moves
        self.model, self.payload = load_model(path)
        self.cfg, self.fold, self.device = cfg, fold, torch.device(device)
        self.model.to(self.device)
        self.task: Task = make_task(cfg, list(self.payload.get("classes", [])))
        self.task.load_fold_state(self.payload.get("task_state") or {})  # a target scaler, bins
        norm = self.payload.get("standardize")
        self.norm = None if norm is None else Standardizer.from_state(norm)
        # the fold's ensemble (members.json): the model's seed replicas, its linear members,
        # and every one's scale
        entries = read_members(path.parent) or []
        chosen = read_chosen(path.parent) or [e["name"] for e in entries]
        #: whether the model's own outputs are part of the fold's (``select:`` may choose a
        #: linear member alone)
        self.model_chosen = not entries or entries[0]["name"] in chosen
        kept = [e for e in entries if e["name"] in chosen]
        self.scales = [e["scale"] for e in kept]
        self.members = [
            FoldModel(path.parent / e["model"], cfg, fold, device) for e in entries[1:] if e in kept
        ]
        replicas = entries[0].get("replicas", []) if entries else []
        self.replica_scales = [r["scale"] for r in replicas]
        self.replicas = [
            FoldModel(path.parent / r["model"], cfg, fold, device) for r in replicas[1:]
        ]

    def forward(
        self,
        bag_slides: dict[str, list[str]],
        store: FeatureStore,
        keep_scores: bool = False,
        tabular: TabularTable | None = None,
    ) -> Forward:
        """The model on ``bag_slides`` (bag id -> slide ids of ``store``), full bags; a fusion
        model reads ``tabular`` (the bags' tables, laid out as the run's:
        :meth:`~mil.data.tabular.TabularTable.aligned`) scaled by the fold's saved scaler, and
        treats every table as missing without it."""
        in_dim = self.payload["in_dim"]
        for sid in dict.fromkeys(s for slides in bag_slides.values() for s in slides):
            d = store.get(sid)[0].shape[1]
            if d != in_dim:
                raise MilError(
                    f"{store.path(sid)}: features of dimension {d}, but fold {self.fold}'s model "
                    f"was trained on {in_dim}-dimensional features; were they made by another "
                    f"encoder than the run's?"
                )
        data = BagDataset.with_graph(bag_slides, store, self.model.graph, self.model.graph_k)
        if self.norm is not None:
            norm = self.norm
            if tabular is not None and norm.tabular is not None:
                scaler = TabularScaler(norm.tabular.center, norm.tabular.scale).bind(tabular)
                norm = dataclasses.replace(norm, tabular=scaler)
            data = data.with_transform(norm)
        train = self.cfg.train
        out = predict(
            self.model,
            data,
            list(bag_slides),
            train.max_instances,
            self.device,
            keep_scores,
            precision=train.precision,
        )
        if keep_scores and self.replicas:  # train.seeds: the replicas' averaged instance scores
            others = [r.forward(bag_slides, store, True, tabular) for r in self.replicas]
            out = average_forwards([out, *others])
        return out

    def tables_layout(self) -> list[dict[str, Any]] | None:
        """The tables' layout that the fold's model or one of its members reads
        (``clinical_linear`` beside a slide model); None where none reads tables."""
        for m in (self, *self.members):
            if layout := m.payload["hparams"].get("tabular"):
                return layout
        return None

    def instance_scores(
        self, fwd: Forward, kind: str | None, cls: int | str | None, slide_id: str
    ) -> np.ndarray:
        """The instance scores of ``kind`` (column ``cls``) of a one-bag :meth:`forward`, as the
        fold's ``attention.h5`` holds them (:meth:`mil.tasks.Task.instance_view`).

        ``kind`` ``"default"``: the default heatmap score (:mod:`mil.results.scores`); a class
        kind without ``cls``: the last class of two, else the predicted class."""
        if kind == DEFAULT:
            order = self.task.score_order
            kind = next((k for k in order if k in fwd.extra_scores), None)
        if kind == "attention" and kind not in fwd.extra_scores:  # the main score (ABMIL...)
            kind = None
        if kind is None:
            if fwd.scores is None:
                raise MilError(
                    f"slide {slide_id}: fold {self.fold}'s model ({self.payload['model']}) has "
                    f"no instance scores"
                )
            return fwd.scores[0].numpy()
        if kind not in fwd.extra_scores:
            raise MilError(
                f"slide {slide_id}: fold {self.fold}'s model has no {kind!r} scores; "
                f"kinds: {sorted(fwd.extra_scores)}"
            )
        v = self.task.instance_view(fwd.extra_scores[kind][0].numpy(), kind)
        classes = list(self.payload["classes"])
        names = classes if len(classes) == v.shape[1] else []
        if cls is None and kind in (*LOGIT_KINDS, "instance_classifier") and v.shape[1] > 1:
            cls = v.shape[1] - 1 if v.shape[1] == 2 else int(fwd.logits[0].argmax())
        j = names.index(cls) if cls in names else int(cls or 0)
        return v[:, j]

    def outputs(
        self,
        bag_slides: dict[str, list[str]],
        store: FeatureStore,
        tabular: TabularTable | None = None,
    ) -> pd.DataFrame:
        """``bag_id``, ``fold`` and the task's prediction columns of each bag (a fold with an
        ensemble: the average of its members' outputs, as its ``predictions.csv``)."""
        parts = [self._model_outputs(bag_slides, store, tabular)] if self.model_chosen else []
        parts += [m.outputs(bag_slides, store, tabular).drop(columns="fold") for m in self.members]
        df = parts[0] if len(parts) == 1 else self.task.average_predictions(parts, self.scales)
        df.insert(1, "fold", self.fold)
        return df

    def _model_outputs(
        self, bag_slides: dict[str, list[str]], store: FeatureStore, tabular: TabularTable | None
    ) -> pd.DataFrame:
        """``bag_id`` and the model's prediction columns (with ``train.seeds``, the average of
        its replicas')."""
        df = self.task.outputs(self.forward(bag_slides, store, tabular=tabular).logits.numpy())
        df.insert(0, "bag_id", list(bag_slides))
        if self.replicas:  # train.seeds: the replicas' average is the model's output
            parts = [df]
            parts += [
                r.outputs(bag_slides, store, tabular).drop(columns="fold") for r in self.replicas
            ]
            df = self.task.average_predictions(parts, self.replica_scales)
        return df


def bags_of(
    bags: Item | Sequence[Item] | Mapping[str, Sequence[Item]],
    feature_index: dict[str, Path],
    features_dir: str | None = None,
) -> tuple[dict[str, list[str]], FeatureStore]:
    """Bags to predict -> (bag id -> slide ids, a store of their files).

    ``bags``: feature files or slide ids of ``feature_index``, one bag each;
    or ``{bag_id: [files or ids]}`` for multi-slide (patient) bags.
    """
    if isinstance(bags, (str, Path)):
        bags = [bags]
    index: dict[str, Path] = {}
    bag_slides: dict[str, list[str]] = {}
    items = bags.items() if isinstance(bags, Mapping) else ((None, [b]) for b in bags)
    for bag_id, members in items:
        if isinstance(members, (str, Path)):
            members = [members]
        ids = []
        for m in members:
            sid, path = _resolve(m, feature_index, features_dir)
            if sid in index and index[sid] != path:
                raise MilError(f"two feature files named {sid}: {index[sid]} and {path}")
            index[sid] = path
            ids.append(sid)
        key = str(bag_id) if bag_id is not None else ids[0]
        if key in bag_slides:
            raise MilError(f"{key} is given twice")
        bag_slides[key] = ids
    if not bag_slides:
        raise MilError("predict: no bags given")
    return bag_slides, FeatureStore(index)


def _resolve(
    item: Item, feature_index: dict[str, Path], features_dir: str | None
) -> tuple[str, Path]:
    p = Path(item)
    if p.suffix.lower() in FEATURE_SUFFIXES and p.is_file():
        return p.stem, p
    if str(item) in feature_index:
        return str(item), feature_index[str(item)]
    raise MilError(
        f"{item}: neither a feature file (.h5/.pt/.npy) nor a slide id in the run's feature "
        f"folder ({features_dir})"
    )


def ensemble(
    models: Sequence[FoldModel],
    bag_slides: dict[str, list[str]],
    store: FeatureStore,
    per_fold: bool = False,
    tabular: TabularTable | None = None,
) -> pd.DataFrame:
    """The fold models' outputs on ``bag_slides`` (see :func:`bags_of`; ``tabular``: see
    :meth:`FoldModel.forward`): one row per bag and fold (``per_fold``), or the mean over
    folds with ``n_folds``."""
    long = pd.concat([m.outputs(bag_slides, store, tabular) for m in models], ignore_index=True)
    if per_fold:
        return long
    out = models[0].task.mean_outputs(long, by="bag_id")
    out["n_folds"] = len(models)
    return out


def predict_with_tables(
    models: Sequence[FoldModel],
    bag_slides: dict[str, list[str]],
    store: FeatureStore,
    per_fold: bool,
    cfg: Config,
) -> pd.DataFrame:
    """:func:`ensemble` with the run's own tables (``data.tabular`` of ``cfg``) where its
    models read them: a bag whose slides are one patient's of the run's cohort gets that
    patient's values; any other bag is predicted with its tables missing, with a warning."""
    layout = models[0].tables_layout()
    if layout is None or not cfg.data.tabular:
        return ensemble(models, bag_slides, store, per_fold)
    from mil.data.sources import load_cohort

    cohort, _ = load_cohort(cfg)
    patient = cohort.slides.set_index("slide_id")["patient_id"]
    known = {
        b: patient[s[0]]
        for b, s in bag_slides.items()
        if all(x in patient.index for x in s) and patient[list(s)].nunique() == 1
    }
    table = TabularTable(cohort.tabular.patients, known, cohort.tabular.modalities)
    table = table.aligned(layout, str(cfg.source))
    parts = (
        [ensemble(models, {b: bag_slides[b] for b in known}, store, per_fold, table)]
        if known
        else []
    )
    others = {b: s for b, s in bag_slides.items() if b not in known}
    if others:
        warnings.warn(
            f"{len(others)} bag(s) ({', '.join(list(others)[:3])}) are no patient's slides of the "
            f"run's cohort, so their tables ({', '.join(m['name'] for m in layout)}) are unknown: "
            "they are predicted as missing; use mil evaluate with a cohort config that lists them",
            MilWarning,
            stacklevel=3,
        )
        parts.append(ensemble(models, others, store, per_fold))
    out = pd.concat(parts, ignore_index=True)
    order = {b: i for i, b in enumerate(bag_slides)}
    return out.sort_values("bag_id", key=lambda c: c.map(order), kind="stable").reset_index(
        drop=True
    )
