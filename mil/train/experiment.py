"""What a run is made of, loaded once: cohort, features, splits, the model's bags, the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mil.config import Config, warn_ignored
from mil.data.dataset import BagDataset
from mil.data.sources import load_cohort
from mil.data.transforms import Standardizer, fold_preprocessing
from mil.models import create, get
from mil.models.fusion import with_tabular_layout
from mil.results import config_splits
from mil.results.checkpoint import Checkpoint
from mil.splits import Split
from mil.tasks import Task, make_task


class Experiment:
    """Everything a run needs, loaded once: cohort, features, splits, task.

    ``data`` holds the bags as read, with the instance graph the model asks
    for; each fold sees them through its own view
    (:meth:`~mil.data.dataset.BagDataset.with_transform`).
    """

    def __init__(
        self, cfg: Config, run_dir: Path, force_splits: bool = False, progress: bool = True
    ):
        self.cfg = cfg
        warn_ignored(cfg)  # task: keys of another task (task.operating_point of survival)
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.cohort, self.store = load_cohort(cfg, progress)
        self.splits, self.split_dir = config_splits(cfg, run_dir, self.cohort, force_splits)
        self.model_cls = get(cfg.model_name)
        graph, graph_k = None, 8
        if self.model_cls.graph:  # the instance graph is a hyper-parameter: ask a built model
            probe = create(cfg.model_name, in_dim=1, n_out=1, **cfg.model_hparams)
            graph, graph_k = probe.graph, probe.graph_k
        self.data = BagDataset.with_graph(self.cohort.bag_slides, self.store, graph, graph_k)
        self.data.read_ahead = cfg.data.prefetch

    def task(self) -> Task:
        task = make_task(self.cfg, self.cohort.classes)
        task.observe_cohort(self.cohort.bags)
        return task

    def fold_bags(self, split: Split, part: str) -> pd.DataFrame:
        ids = set(self.cohort.bags_of_slides(split.part(part)))
        b = self.cohort.bags
        return b[b["bag_id"].isin(ids)].reset_index(drop=True)

    def fold_setup(
        self,
        task: Task,
        train_ids: list[str],
        member: str | None = None,
        standardize: bool | str | None = None,
    ) -> tuple[torch.nn.Module, Standardizer | None, BagDataset]:
        """A new model for a fold (or a refit) trained on ``train_ids`` (``member``: that
        linear model of the ensemble, with its defaults, instead of the config's), the
        preprocessing fitted on those bags only, and the fold's own view of the bags (graphs
        built under it). ``standardize``: the model's preprocessing instead of
        ``data.standardize`` (the other preprocessing a selection tries)."""
        cfg = self.cfg
        name, hp = (cfg.model_name, cfg.model_hparams) if member is None else (member, {})
        hparams = with_tabular_layout(name, hp, self.cohort.tabular)
        model = create(name, in_dim=self.store.dim, n_out=task.n_out, **hparams)
        if standardize is None:
            standardize = cfg.data.standardize
        # baselines standardise their pooled vectors; tabular scalers are fitted for every model
        standardize = standardize if model.trained_by_gradient else False
        norm = fold_preprocessing(self.data, train_ids, standardize, self.cohort.tabular)
        return model, norm, self.data.with_transform(norm)

    def checkpoint(
        self, task: Task, name: str, hparams: dict[str, Any], state: dict, norm: Standardizer | None
    ) -> Checkpoint:
        """A fold's (or refit's) :class:`Checkpoint` of model ``name`` (``hparams`` as the
        config gives them; the tables' layout is added for a fusion model)."""
        return Checkpoint(
            state_dict=state,
            model=name,
            hparams=with_tabular_layout(name, hparams, self.cohort.tabular),
            in_dim=self.store.dim,
            n_out=task.n_out,
            task=task.name,
            classes=task.classes,
            task_state=task.state(),
            standardize=None if norm is None else norm.state(),
        )
