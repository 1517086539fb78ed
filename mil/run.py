"""``mil.Run``: a finished results folder as Python objects, for notebooks and the CLI.

A thin facade: the folder is read through :mod:`mil.results`, predictions are
made by the fold models of :mod:`mil.train.inference`, and what a task's
predictions mean comes from its :class:`~mil.tasks.base.Task`. It adds what a
user does next: heatmaps (over the slide), top tiles, and fold-ensemble predictions on new slides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import Config
from mil.errors import MilError
from mil.explain.review import ReviewMixin
from mil.results import (
    METRICS,
    MODEL,
    PREDICTIONS,
    PREDICTIONS_PATIENT,
    REFIT,
    SCORES,
    SUMMARY_CSV,
    RunFolder,
    fold_name,
)
from mil.results.scores import DEFAULT, BagIndex, bag_index, has_scores, read_scores, scores_frame
from mil.tasks import Task, make_task

Item = str | Path


class Run(ReviewMixin):
    """A results folder written by ``mil train`` / ``mil demo``.

    Folds are named as their folders: ``"0"``, ``"1"``… (``"r1_0"``… for
    repeated cross-validation); wherever a fold is asked for, an int ``k``
    means ``"k"``.

    Example::

        run = mil.Run("results/demo/demo_classification")
        run.summary                       # per-fold metrics, mean and sd
        run.predictions()                 # out-of-fold predictions, one row per test bag
        run.scores("P007-S1")             # x, y, score of each tile (from the fold that tested it)
        run.heatmap("P007-S1", top_k=16)  # a matplotlib Figure
        run.heatmap("P007-S1", wsi="slides/P007-S1.svs")  # over the whole-slide image
        run.contact_sheet("P007-S1", wsi="slides/P007-S1.svs")  # top/bottom tiles at level 0
        run.predict(["new_slide.h5"])     # fold-ensemble probabilities for new feature files
        run.faithfulness(0)               # deletion/insertion areas of fold 0's test bags
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.folder = RunFolder(self.path)
        if not self.path.is_dir():
            raise MilError(f"run folder not found: {self.path}")
        if not self.folder.config_path.is_file():
            raise MilError(
                f"{self.path}: no config.yaml; is this a run folder of `mil train` "
                f"(results/<name>/ holding fold_<k>/ folders)?"
            )
        self.config: Config = self.folder.read_config()
        self._bags: dict[str, BagIndex] = {}
        self._tests: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.config.task.type}, model {self.config.model_name}, folds {self.folds})"

    # ---- what the runner wrote -------------------------------------------------------------

    @cached_property
    def split_folds(self) -> list[str]:
        """Names of all folds the run's split files define (finished or not)."""
        return self.folder.split_folds()

    @property
    def folds(self) -> list[str]:
        """Names of the finished folds (those with ``metrics.json``)."""
        return self.folder.finished_folds()

    def fold_dir(self, fold: int | str) -> Path:
        return self.folder.fold_dir(fold)

    @cached_property
    def summary(self) -> pd.DataFrame:
        """``summary.csv``: one row per fold, then the mean and sd rows."""
        path = self.folder.file(SUMMARY_CSV)
        if not path.is_file():
            raise MilError(f"{path} not found; run `mil summarize {self.path}` to write it")
        return pd.read_csv(path, dtype={"fold": str})

    def metrics(self, fold: int | str) -> dict[str, Any]:
        """A fold's ``metrics.json`` (test metrics, sizes, classes; an undefined metric is None)."""
        path = self.folder.fold_file(fold, METRICS)
        if not path.is_file():
            raise MilError(
                f"fold {fold_name(fold)} of {self.path} is not finished ({path} missing)"
            )
        return self.folder.record(fold)

    @cached_property
    def classes(self) -> list[str]:
        """Class names (classification) in label-index order; [] for survival."""
        for f in self.folds:
            return list(self.metrics(f).get("classes", []))
        return []

    @cached_property
    def task(self) -> Task:
        """The run's task: what its predictions and scores mean."""
        return make_task(self.config, self.classes)

    def predictions(self, fold: int | str | None = None, level: str = "bag") -> pd.DataFrame:
        """Test-set predictions with a ``fold`` column.

        ``fold`` None: all finished folds concatenated, i.e. the out-of-fold
        predictions (every bag once; once per repeat with repeated CV).
        ``level="patient"`` reads the patient-level file (probabilities or risks
        averaged over a patient's bags).
        """
        if level not in ("bag", "patient"):
            raise MilError(f"level={level!r}: use 'bag' or 'patient'")
        name = PREDICTIONS if level == "bag" else PREDICTIONS_PATIENT
        folds = self.folds if fold is None else [fold_name(fold)]
        if not folds:
            raise MilError(f"{self.path}: no finished folds (fold_*/metrics.json)")
        parts = []
        for f in folds:
            path = self.folder.fold_file(f, name)
            if not path.is_file():
                raise MilError(f"fold {f}: {path} not found")
            parts.append(self.folder.predictions(f, name).assign(fold=f))
        return pd.concat(parts, ignore_index=True)

    # ---- instance scores -------------------------------------------------------------------

    def test_fold(self, slide_id: str) -> str:
        """The fold whose test set holds ``slide_id`` (a slide or bag id; first repeat if several)."""
        for f in self.split_folds:
            if slide_id in self._test_slides(f):
                return f
        for f in self.folds:  # a patient-level bag id
            if slide_id in self._bag_index(f, slide_id, strict=False):
                return f
        raise MilError(
            f"slide {slide_id!r} is in no fold's test set of {self.path} "
            f"(test slides are listed in {self.folder.splits_dir}/splits_<k>.csv)"
        )

    def _test_slides(self, fold: str) -> set[str]:
        if fold not in self._tests:
            path = self.folder.split_file(fold)
            found = set(pd.read_csv(path, dtype=str)["test"].dropna()) if path.is_file() else set()
            self._tests[fold] = found
        return self._tests[fold]

    def _attention_file(self, fold: str, slide_id: str) -> Path:
        path = self.folder.fold_file(fold, SCORES)
        if not path.is_file():
            raise MilError(
                f"slide {slide_id}: fold {fold} has no attention file ({path}); the fold is "
                f"unfinished or the file was removed: re-run the fold with `mil train "
                f"{self.folder.config_path} --out {self.path} --folds {fold}` (first delete "
                f"{self.folder.fold_file(fold, METRICS)} if it exists, or the fold is skipped)"
            )
        found, model = has_scores(path, fold)
        if not found:
            raise MilError(
                f"slide {slide_id}: fold {fold}'s model ({model or self.config.model_name}) wrote "
                f"no instance scores ({path} has has_scores = false); heatmaps need a model with "
                f"instance scores, e.g. abmil, clam_sb, clam_mb, dsmil"
            )
        return path

    def _bag_index(self, fold: str, slide_id: str, strict: bool = True) -> BagIndex:
        """``{bag_id or slide_id: (group, slides, slide_ptr)}`` of one fold's attention file."""
        if fold not in self._bags:
            path = self.folder.fold_file(fold, SCORES)
            if not path.is_file():
                if strict:
                    self._attention_file(fold, slide_id)
                return {}
            self._bags[fold] = bag_index(path, fold)
        return self._bags[fold]

    def scores(
        self,
        slide_id: str,
        kind: str | None = DEFAULT,
        cls: int | str | None = None,
        fold: int | str | None = None,
    ) -> pd.DataFrame:
        """Per-tile scores of a test slide, as saved by the fold that tested it.

        Returns ``index`` (the tile's row in the slide's feature file), ``x, y``
        (when the features had coordinates) and ``score``; ``df.attrs`` holds
        ``slide_id, bag_id, fold, kind, cls, model, tile_size``. For a
        patient-level bag, the slide's own rows are selected; a multi-slide bag
        id returns all rows with a ``slide_id`` column.

        ``kind`` ``"default"`` is the default heatmap score
        (the task's :attr:`~mil.tasks.Task.score_order`, chosen by the localization
        benchmark: classification, ``instance_logits``, the model's logit for the tile
        alone; survival, ``contribution``, the tile's signed share of the risk). ``None`` is the
        model's main instance score (ABMIL: attention logits before the softmax;
        the scores behind ``witness_auc``). Other kinds are the model's extra score
        sets (:data:`mil.models.base.SCORE_KINDS`), e.g. ``"instance_logits"`` or
        CLAM's ``"attention"`` with one column per branch: pick one with ``cls``
        (class name or index; a class kind defaults to the positive class of a
        binary task, or the bag's predicted class). A multi-target run reads one target's
        columns as its own task does with ``cls="<target>"`` or ``"<target>/<class>"``
        (``mil heatmap --target``; a head output's index ``cls=j`` reads column ``j`` raw).
        """
        fold = self._scoring_fold(slide_id, fold)
        path = self._attention_file(fold, slide_id)
        index = self._bag_index(fold, slide_id)
        if slide_id not in index:
            raise MilError(f"slide {slide_id}: not found in fold {fold}'s attention file ({path})")
        _, slides, ptr = index[slide_id]
        target = getattr(self.task, "score_target", lambda c: None)(cls)
        if target is not None:  # "<target>[/<class>]" of a multi-target run
            from mil.explain.heatmap import read_target_scores

            sub = self.task.subs[target[0]]
            values, label, coords, bag_id, model = read_target_scores(
                path,
                fold,
                index[slide_id],
                slide_id,
                kind,
                self.task,
                *target,
                self._predicted_class(fold, index[slide_id][0], sub.classes, f"{target[0]}/pred"),
            )
        else:
            values, label, coords, bag_id, model = read_scores(
                path,
                fold,
                index[slide_id],
                slide_id,
                kind,
                cls,
                self.classes,
                self._predicted_class(fold, index[slide_id][0]),
                self.task.score_order,
            )
        df = scores_frame(values, coords, slides, ptr, slide_id)
        one_slide = slide_id if slide_id in slides or len(slides) == 1 else None
        df.attrs = {
            "slide_id": slide_id,
            "bag_id": bag_id,
            "fold": fold,
            "kind": label,
            "cls": cls,
            "model": model or self.config.model_name,
            "tile_size": self.tile_size(one_slide) if one_slide else None,
        }
        return df

    def _predicted_class(
        self, fold: str, group: str, classes: list[str] | None = None, column: str = "pred"
    ) -> int | None:
        """The predicted class index of a test bag (its scores group name), if the task (or the
        target of ``classes`` and prediction ``column``) has classes."""
        classes = self.classes if classes is None else classes
        pred = self.folder.predictions(fold, PREDICTIONS) if classes else None
        if pred is None or column not in pred:
            return None
        hit = pred.loc[pred["bag_id"].astype(str).str.replace("/", "|") == group, column]
        found = str(hit.iloc[0]) if len(hit) else None
        return classes.index(found) if found in classes else None

    def _scoring_fold(self, slide_id: str, fold: int | str | None) -> str:
        """The fold whose scores of ``slide_id`` are read: the one that tested it."""
        if fold is None:
            return self.test_fold(slide_id)
        fold = fold_name(fold)
        if slide_id not in self._test_slides(fold) and slide_id not in self._bag_index(
            fold, slide_id, strict=False
        ):
            raise MilError(
                f"slide {slide_id!r} was not in the test set of fold {fold} "
                f"(it was tested in fold {self.test_fold(slide_id)})"
            )
        return fold

    # ---- feature files ---------------------------------------------------------------------

    @cached_property
    def _feature_index(self) -> dict[str, Path]:
        from mil.data.readers import index_feature_dir

        feats = self.config.data.features
        if not feats or not Path(feats).is_dir():
            return {}
        try:
            return index_feature_dir(feats)[0]
        except MilError:
            return {}

    @property
    def feature_index(self) -> dict[str, Path]:
        """Slide id -> feature file of the run's feature folder (``data.features``; empty
        where it is missing)."""
        return self._feature_index

    def tile_size(self, slide_id: str) -> float | None:
        """The tile size in the slide's feature-file attributes, or None (then inferred from coords)."""
        from mil.explain.heatmap import tile_size_from_h5

        path = self._feature_index.get(slide_id)
        return None if path is None else tile_size_from_h5(path)

    # ---- fold models -----------------------------------------------------------------------

    def checkpoint(self, fold: int | str) -> dict[str, Any]:
        """A fold's ``model.pt`` payload (weights, model name, hparams, classes, standardisation)."""
        from mil.results.checkpoint import read_checkpoint

        path = self.folder.fold_file(fold, MODEL)
        if not path.is_file():
            raise MilError(f"fold {fold_name(fold)}: no checkpoint {path}")
        return read_checkpoint(path)

    def model(self, fold: int | str, device: str = "cpu"):
        """The fold's model in eval mode (checkpoint loaded with ``weights_only=True``)."""
        return self._fold_model(fold_name(fold), device).model

    def _fold_model(self, fold: str, device: str):
        from mil.train.inference import FoldModel

        if fold == REFIT:  # the model refit on every bag (mil train --refit)
            from mil.train.refit import read_refit

            read_refit(self.path)  # names the missing refit
        return FoldModel(self.folder.fold_file(fold, MODEL), self.config, fold, device)

    def _fold_models(self, folds, device: str) -> list:
        folds = self.folds if folds is None else [fold_name(f) for f in folds]
        if not folds:
            raise MilError(f"{self.path}: no finished folds with a model to predict with")
        return [self._fold_model(f, device) for f in folds]

    def predict(
        self,
        bags: Item | Sequence[Item] | Mapping[str, Sequence[Item]],
        folds: Sequence[int | str] | None = None,
        per_fold: bool = False,
        device: str = "cpu",
    ) -> pd.DataFrame:
        """Predict new bags with the fold ensemble (mean of the fold models' outputs).

        ``bags``: feature files (``.h5``/``.pt``/``.npy``) or slide ids of the
        run's feature folder, one bag each; or ``{bag_id: [files or ids]}`` for
        multi-slide (patient) bags. Each fold model sees the features
        standardised with its own training statistics when the run
        standardised them; a model that reads tables (``data.tabular``) gets the
        run's tables of the bag's patient (a bag of the run's cohort).

        Returns ``bag_id``, then the task's prediction columns (per class
        ``prob_<class>`` and ``pred``; or ``risk``, plus ``surv_<k>`` for the
        discrete-time loss), and ``n_folds``. ``per_fold=True`` returns one
        row per bag and fold (a ``fold`` column) instead of the mean.
        ``folds=["refit"]`` predicts with the model refit on every bag
        (``mil train --refit``) alone.
        """
        from mil.train.inference import bags_of
        from mil.train.scoring import FoldEnsemble, score_fold

        bag_slides, store = bags_of(bags, self.feature_index, self.config.data.features)
        models = self._fold_models(folds, device)
        ens = FoldEnsemble(models, bag_slides, store, run_config=self.config, per_fold=per_fold)
        return score_fold(self.task, ens, list(bag_slides)).pred

    def faithfulness(
        self,
        fold: int | str,
        kinds: Sequence[str] | None = None,
        device: str = "cpu",
    ) -> dict[str, float]:
        """Deletion/insertion areas (:mod:`mil.explain.faithfulness`) of a fold's test bags,
        re-predicted by the fold's saved model (its preprocessing, without its members): whole,
        without their top-scored instances and from those alone, for the model's main score
        (``main``), each kind of ``kinds`` (default: the task's default heatmap kind) and a
        random order, each read at the bag's predicted class; keys ``deletion_<kind>`` and
        ``insertion_<kind>``, as a fold's ``metrics.json`` holds them."""
        from mil.data.sources import read_cohort
        from mil.train.inference import bags_of
        from mil.train.scoring import FoldEnsemble, Scoring, score_fold

        fold = fold_name(fold)
        ids = self.predictions(fold)["bag_id"].astype(str).tolist()
        slides = read_cohort(self.config).bag_slides
        bag_slides, store = bags_of(
            {b: slides[b] for b in ids}, self.feature_index, self.config.data.features
        )
        ens = FoldEnsemble([self._fold_model(fold, device)], bag_slides, store)
        scoring = Scoring(faithfulness=True, faithfulness_kinds=kinds)
        return score_fold(self.task, ens, ids, scoring).metrics

    def fold_scores(
        self,
        slide: Item,
        folds: Sequence[int | str] | None = None,
        kind: str | None = DEFAULT,
        cls: int | str | None = None,
        device: str = "cpu",
    ) -> pd.DataFrame:
        """Score one slide's tiles afresh with every fold model: how stable is attention?

        ``slide``: a slide id of the run's feature folder or a feature file.
        Returns ``x, y`` (if the features have coordinates) and one column
        ``fold_<k>`` of instance scores per fold model, e.g. for
        ``df.filter(like="fold_").corr("spearman")``. Only one fold tested the
        slide; the other folds trained on it, so their scores are in-sample.
        """
        from mil.train.inference import bags_of

        bag_slides, store = bags_of([slide], self._feature_index, self.config.data.features)
        sid = next(iter(bag_slides))
        x, coords, _ = store.get(sid)
        df = pd.DataFrame(index=np.arange(len(x)))
        if coords is not None:
            df["x"], df["y"] = coords[:, 0].numpy(), coords[:, 1].numpy()
        for m in self._fold_models(folds, device):
            fwd = m.forward(bag_slides, store, keep_scores=True)
            df[f"fold_{m.fold}"] = m.instance_scores(fwd, kind, cls, sid).astype(np.float64)
        return df
