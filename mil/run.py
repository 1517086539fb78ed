"""``mil.Run``: a finished results folder as Python objects, for notebooks and the CLI.

Opens what the cross-validation runner wrote (config, summary, out-of-fold
predictions, instance scores, fold checkpoints) and adds what a user does
next: heatmaps, top tiles, and fold-ensemble predictions on new slides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from mil.config import Config, config_from_dict, read_yaml_mapping
from mil.errors import DataError, MilError
from mil.io import read_json

Item = str | Path


class Run:
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
        run.predict(["new_slide.h5"])     # fold-ensemble probabilities for new feature files
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg_path = self.path / "config.yaml"
        if not self.path.is_dir():
            raise MilError(f"run folder not found: {self.path}")
        if not cfg_path.is_file():
            raise MilError(
                f"{self.path}: no config.yaml; is this a run folder of `mil train` "
                f"(results/<name>/ holding fold_<k>/ folders)?"
            )
        raw = read_yaml_mapping(cfg_path, "run's saved config")
        self.config: Config = config_from_dict(raw, source=str(cfg_path))
        self._bags: dict[str, dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]] = {}
        self._tests: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.config.task.type}, model {self.config.model_name}, folds {self.folds})"

    # ---- what the runner wrote -------------------------------------------------------------

    @cached_property
    def split_folds(self) -> list[str]:
        """Names of all folds the run's split files define (finished or not)."""
        names = [
            p.stem[len("splits_") :]
            for p in (self.path / "splits").glob("splits_*.csv")
            if not p.stem.endswith("_descriptor")
        ]
        return sorted(names, key=_fold_key)

    @property
    def folds(self) -> list[str]:
        """Names of the finished folds (those with ``metrics.json``)."""
        done = [
            p.name[len("fold_") :]
            for p in self.path.glob("fold_*")
            if (p / "metrics.json").is_file()
        ]
        return sorted(done, key=_fold_key)

    def fold_dir(self, fold: int | str) -> Path:
        return self.path / f"fold_{_fold_name(fold)}"

    @cached_property
    def summary(self) -> pd.DataFrame:
        """``summary.csv``: one row per fold, then the mean and sd rows."""
        path = self.path / "summary.csv"
        if not path.is_file():
            raise MilError(f"{path} not found; run `mil summarize {self.path}` to write it")
        return pd.read_csv(path, dtype={"fold": str})

    def metrics(self, fold: int | str) -> dict[str, Any]:
        """A fold's ``metrics.json`` (test metrics, sizes, classes; an undefined metric is None)."""
        path = self.fold_dir(fold) / "metrics.json"
        if not path.is_file():
            raise MilError(
                f"fold {_fold_name(fold)} of {self.path} is not finished ({path} missing)"
            )
        return read_json(
            path,
            "fold record",
            f"re-run `mil train` on this run folder (--out {self.path}) to train the fold again",
        )

    @cached_property
    def classes(self) -> list[str]:
        """Class names (classification) in label-index order; [] for survival."""
        for f in self.folds:
            return list(self.metrics(f).get("classes", []))
        return []

    def predictions(self, fold: int | str | None = None, level: str = "bag") -> pd.DataFrame:
        """Test-set predictions with a ``fold`` column.

        ``fold`` None: all finished folds concatenated, i.e. the out-of-fold
        predictions (every bag once; once per repeat with repeated CV).
        ``level="patient"`` reads the patient-level file (probabilities or risks
        averaged over a patient's bags).
        """
        if level not in ("bag", "patient"):
            raise MilError(f"level={level!r}: use 'bag' or 'patient'")
        name = "predictions.csv" if level == "bag" else "predictions_patient.csv"
        folds = self.folds if fold is None else [_fold_name(fold)]
        if not folds:
            raise MilError(f"{self.path}: no finished folds (fold_*/metrics.json)")
        parts = []
        for f in folds:
            path = self.fold_dir(f) / name
            if not path.is_file():
                raise MilError(f"fold {f}: {path} not found")
            df = pd.read_csv(path, dtype={"bag_id": str, "patient_id": str})
            df["fold"] = f
            parts.append(df)
        return pd.concat(parts, ignore_index=True)

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
            f"(test slides are listed in {self.path / 'splits'}/splits_<k>.csv)"
        )

    def _test_slides(self, fold: str) -> set[str]:
        if fold not in self._tests:
            path = self.path / "splits" / f"splits_{fold}.csv"
            found = set(pd.read_csv(path, dtype=str)["test"].dropna()) if path.is_file() else set()
            self._tests[fold] = found
        return self._tests[fold]

    def _attention_file(self, fold: str, slide_id: str) -> Path:
        path = self.fold_dir(fold) / "attention.h5"
        if not path.is_file():
            raise MilError(
                f"slide {slide_id}: fold {fold} has no attention file ({path}); the fold is "
                f"unfinished or the file was removed: re-run the fold with `mil train "
                f"{self.path / 'config.yaml'} --out {self.path} --folds {fold}` (first delete "
                f"{self.fold_dir(fold) / 'metrics.json'} if it exists, or the fold is skipped)"
            )
        with _open_scores(path, fold) as f:
            if not bool(f.attrs.get("has_scores", False)):
                model = f.attrs.get("model", self.config.model_name)
                raise MilError(
                    f"slide {slide_id}: fold {fold}'s model ({model}) wrote no instance scores "
                    f"({path} has has_scores = false); heatmaps need a model with instance "
                    f"scores, e.g. abmil, clam_sb, clam_mb, dsmil"
                )
        return path

    def _bag_index(
        self, fold: str, slide_id: str, strict: bool = True
    ) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
        """``{bag_id or slide_id: (group, slides, slide_ptr)}`` of one fold's attention file."""
        if fold not in self._bags:
            path = self.fold_dir(fold) / "attention.h5"
            if not path.is_file():
                if strict:
                    self._attention_file(fold, slide_id)
                return {}
            index: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
            with _open_scores(path, fold) as f:
                for name, g in f.items():
                    slides = tuple(str(s) for s in np.atleast_1d(g.attrs.get("slides", [])))
                    ptr = tuple(int(p) for p in np.atleast_1d(g.attrs.get("slide_ptr", [])))
                    entry = (name, slides, ptr)
                    index[str(g.attrs.get("bag_id", name))] = entry
                    for s in slides:
                        index.setdefault(s, entry)
            self._bags[fold] = index
        return self._bags[fold]

    def scores(
        self,
        slide_id: str,
        kind: str | None = None,
        cls: int | str | None = None,
        fold: int | str | None = None,
    ) -> pd.DataFrame:
        """Per-tile scores of a test slide, as saved by the fold that tested it.

        Returns ``index`` (the tile's row in the slide's feature file), ``x, y``
        (when the features had coordinates) and ``score``; ``df.attrs`` holds
        ``slide_id, bag_id, fold, kind, cls, model, tile_size``. For a
        patient-level bag, the slide's own rows are selected; a multi-slide bag
        id returns all rows with a ``slide_id`` column.

        ``kind`` None is the model's instance score (ABMIL: attention logits
        before the softmax; the scores behind ``witness_auc``). Other kinds are
        the model's extra score sets, e.g. CLAM's ``"attention"`` with one
        column per branch: pick one with ``cls`` (class name or index).
        """
        if fold is None:
            fold = self.test_fold(slide_id)
        else:
            fold = _fold_name(fold)
            if slide_id not in self._test_slides(fold) and slide_id not in self._bag_index(
                fold, slide_id, strict=False
            ):
                raise MilError(
                    f"slide {slide_id!r} was not in the test set of fold {fold} "
                    f"(it was tested in fold {self.test_fold(slide_id)})"
                )
        path = self._attention_file(fold, slide_id)
        index = self._bag_index(fold, slide_id)
        if slide_id not in index:
            raise MilError(f"slide {slide_id}: not found in fold {fold}'s attention file ({path})")
        group, slides, ptr = index[slide_id]
        with _open_scores(path, fold) as f:
            g = f[group]
            bag_id = str(g.attrs.get("bag_id", group))
            values, label = self._read_kind(g, kind, cls, slide_id, fold, path)
            coords = g["coords"][()] if "coords" in g else None
            model = str(f.attrs.get("model", self.config.model_name))
        if slide_id in slides and len(slides) > 1:
            i = slides.index(slide_id)
            lo, hi = ptr[i], ptr[i + 1]
        else:
            lo, hi = 0, len(values)
        df = pd.DataFrame({"index": np.arange(hi - lo)})
        if slide_id not in slides and len(slides) > 1:  # a whole multi-slide bag
            df["index"] = np.concatenate(
                [np.arange(ptr[j + 1] - ptr[j]) for j in range(len(slides))]
            )
            df["slide_id"] = np.repeat(slides, np.diff(ptr))
        if coords is not None:
            df["x"] = coords[lo:hi, 0]
            df["y"] = coords[lo:hi, 1]
        df["score"] = values[lo:hi]
        one_slide = slide_id if slide_id in slides or len(slides) == 1 else None
        df.attrs = {
            "slide_id": slide_id,
            "bag_id": bag_id,
            "fold": fold,
            "kind": label,
            "cls": cls,
            "model": model,
            "tile_size": self.tile_size(one_slide) if one_slide else None,
        }
        return df

    def _read_kind(self, g, kind, cls, slide_id, fold, path) -> tuple[np.ndarray, str]:
        available = ["scores", *sorted(k for k in g if k.startswith("scores_"))]
        if kind is None or (kind == "attention" and "scores_attention" not in g):
            name = "scores"
        else:
            name = f"scores_{kind}"
        if name not in g:
            kinds = ", ".join(
                ["None (the model's instance score)", *(k[7:] for k in available[1:])]
            )
            raise MilError(
                f"slide {slide_id}: fold {fold} has no {kind!r} scores in {path}; kinds: {kinds}"
            )
        values = g[name][()]
        if values.ndim == 1:
            if cls is not None:
                raise MilError(
                    f"cls={cls!r}: the {kind or 'instance'} scores of fold {fold} have one "
                    f"column; leave cls out"
                )
            return values.astype(np.float64), kind or "score"
        k = values.shape[1]
        names = self.classes if len(self.classes) == k else [str(j) for j in range(k)]
        if cls is None:
            if k == 1:
                return values[:, 0].astype(np.float64), kind
            raise MilError(
                f"slide {slide_id}: {kind!r} scores have {k} columns (one per branch/class); "
                f"choose one with cls= one of {names}"
            )
        if isinstance(cls, (int, np.integer)) and 0 <= int(cls) < k:
            j = int(cls)
        elif str(cls) in names:
            j = names.index(str(cls))
        else:
            raise MilError(f"cls={cls!r}: not one of {names} (or an index 0..{k - 1})")
        return values[:, j].astype(np.float64), f"{kind}[{names[j]}]"

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

    def tile_size(self, slide_id: str) -> float | None:
        """The tile size in the slide's feature-file attributes, or None (then inferred from coords)."""
        from mil.explain.heatmap import tile_size_from_h5

        path = self._feature_index.get(slide_id)
        return None if path is None else tile_size_from_h5(path)

    def _resolve(self, item: Item) -> tuple[str, Path]:
        from mil.data.readers import FEATURE_SUFFIXES

        p = Path(item)
        if p.suffix.lower() in FEATURE_SUFFIXES and p.is_file():
            return p.stem, p
        if str(item) in self._feature_index:
            return str(item), self._feature_index[str(item)]
        raise MilError(
            f"{item}: neither a feature file (.h5/.pt/.npy) nor a slide id in the run's feature "
            f"folder ({self.config.data.features})"
        )

    # ---- fold models -----------------------------------------------------------------------

    def checkpoint(self, fold: int | str) -> dict[str, Any]:
        """A fold's ``model.pt`` payload (weights, model name, hparams, classes, standardisation)."""
        from mil.train.runner import read_checkpoint

        path = self.fold_dir(fold) / "model.pt"
        if not path.is_file():
            raise MilError(f"fold {_fold_name(fold)}: no checkpoint {path}")
        return read_checkpoint(path)

    def model(self, fold: int | str, device: str = "cpu"):
        """The fold's model in eval mode (checkpoint loaded with ``weights_only=True``)."""
        from mil.train.runner import load_model

        path = self.fold_dir(fold) / "model.pt"
        if not path.is_file():
            raise MilError(f"fold {_fold_name(fold)}: no checkpoint {path}")
        return load_model(path, map_location=device)[0]

    def _forward(
        self, fold: str, bag_slides: dict[str, list[str]], store, device: str, keep_scores: bool
    ):
        from mil.data.dataset import BagDataset
        from mil.train.loop import predict
        from mil.train.runner import Standardizer, load_model

        path = self.fold_dir(fold) / "model.pt"
        if not path.is_file():
            raise MilError(f"fold {fold}: no checkpoint {path}")
        model, payload = load_model(path, map_location=device)
        for sid in dict.fromkeys(s for slides in bag_slides.values() for s in slides):
            d = store.get(sid)[0].shape[1]
            if d != payload["in_dim"]:
                raise MilError(
                    f"{store.path(sid)}: features of dimension {d}, but fold {fold}'s model was "
                    f"trained on {payload['in_dim']}-dimensional features; were they made by "
                    f"another encoder than the run's?"
                )
        norm = payload.get("standardize")
        transform = None
        if norm is not None:
            transform = Standardizer(mean=norm["mean"].float(), std=norm["std"].float()).apply
        graph_fn, kind = None, None
        if getattr(model, "graph", None):
            from mil.data.graph import bag_graph

            kind, k = model.graph, model.graph_k
            graph_fn = lambda bag: bag_graph(bag, kind, k)  # noqa: E731
        data = BagDataset(
            bag_slides,
            store,
            graph_fn=graph_fn,
            transform=transform,
            graph_uses_features=kind != "spatial",
        )
        ids = list(bag_slides)
        return predict(
            model,
            data,
            ids,
            self.config.train.max_instances,
            torch.device(device),
            keep_scores,
            precision=self.config.train.precision,
        ), payload

    def _bags_of(self, bags) -> tuple[dict[str, list[str]], Any]:
        from mil.data.dataset import FeatureStore

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
                sid, path = self._resolve(m)
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
        standardised them.

        Returns ``bag_id``, then per class ``prob_<class>`` and ``pred``
        (classification) or ``risk`` (survival; plus ``surv_<k>`` for the
        discrete-time loss), and ``n_folds``. ``per_fold=True`` returns one
        row per bag and fold (a ``fold`` column) instead of the mean.
        """
        bag_slides, store = self._bags_of(bags)
        folds = self.folds if folds is None else [_fold_name(f) for f in folds]
        if not folds:
            raise MilError(f"{self.path}: no finished folds with a model to predict with")
        rows = []
        for f in folds:
            fwd, payload = self._forward(f, bag_slides, store, device, keep_scores=False)
            df = self._outputs(fwd.logits, payload)
            df.insert(0, "bag_id", list(bag_slides))
            df.insert(1, "fold", f)
            rows.append(df)
        long = pd.concat(rows, ignore_index=True)
        if per_fold:
            return long
        value_cols = [c for c in long.columns if c not in ("bag_id", "fold", "pred")]
        out = long.groupby("bag_id", sort=False)[value_cols].mean().reset_index()
        if self.config.task.type == "classification":
            probs = out[[f"prob_{c}" for c in self.classes]].to_numpy()
            out["pred"] = [self.classes[i] for i in probs.argmax(1)]
        out["n_folds"] = len(folds)
        return out

    def _outputs(self, logits: torch.Tensor, payload: dict[str, Any]) -> pd.DataFrame:
        logits = logits.double()
        if payload["task"] == "classification":
            prob = torch.softmax(logits, 1).numpy()
            classes = list(payload["classes"])
            df = pd.DataFrame({f"prob_{c}": prob[:, i] for i, c in enumerate(classes)})
            df["pred"] = [classes[i] for i in prob.argmax(1)]
            return df
        if logits.shape[1] == 1:
            return pd.DataFrame({"risk": logits[:, 0].numpy()})
        from mil.losses.discrete import discrete_survival

        d = discrete_survival(logits)
        df = pd.DataFrame({"risk": d["risk"].numpy()})
        for k in range(logits.shape[1]):
            df[f"surv_{k}"] = d["survival"][:, k].numpy()
        return df

    def fold_scores(
        self,
        slide: Item,
        folds: Sequence[int | str] | None = None,
        kind: str | None = None,
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
        bag_slides, store = self._bags_of([slide])
        folds = self.folds if folds is None else [_fold_name(f) for f in folds]
        sid = next(iter(bag_slides))
        x, coords, _ = store.get(sid)
        df = pd.DataFrame(index=np.arange(len(x)))
        if coords is not None:
            df["x"], df["y"] = coords[:, 0].numpy(), coords[:, 1].numpy()
        for f in folds:
            fwd, payload = self._forward(f, bag_slides, store, device, keep_scores=True)
            if kind is None:
                if fwd.scores is None:
                    raise MilError(
                        f"slide {sid}: fold {f}'s model ({payload['model']}) has no instance scores"
                    )
                vals = fwd.scores[0].numpy()
            else:
                if kind not in fwd.extra_scores:
                    raise MilError(
                        f"slide {sid}: fold {f}'s model has no {kind!r} scores; "
                        f"kinds: {sorted(fwd.extra_scores)}"
                    )
                v = fwd.extra_scores[kind][0].numpy()
                names = list(payload["classes"]) if len(payload["classes"]) == v.shape[1] else []
                j = names.index(cls) if cls in names else int(cls or 0)
                vals = v[:, j]
            df[f"fold_{f}"] = vals.astype(np.float64)
        return df

    # ---- pictures and review lists -----------------------------------------------------------

    def top_slides(self, n: int, fold: int | str | None = None) -> list[str]:
        """The ``n`` test slides the model was most sure are positive (or highest-risk).

        Ranking: out-of-fold probability of the last class (the positive class
        of a binary task), or the predicted risk for survival; ties by slide
        id. Patient-level bags contribute all their slides.
        """
        pred = self.predictions(fold)
        col = f"prob_{self.classes[-1]}" if self.classes else "risk"
        pred = pred.sort_values([col, "bag_id"], ascending=[False, True], kind="stable")
        out: list[str] = []
        for bag_id, f in zip(pred["bag_id"], pred["fold"]):
            entry = self._bag_index(f, bag_id, strict=False).get(bag_id)
            for s in entry[1] if entry and entry[1] else (bag_id,):
                if s not in out:
                    out.append(s)
            if len(out) >= n:
                break
        return out[:n]

    def top_tiles(
        self,
        slide_id: str,
        k: int = 16,
        kind: str | None = None,
        cls: int | str | None = None,
        fold: int | str | None = None,
    ) -> pd.DataFrame:
        """The ``k`` highest-scored tiles of a test slide: ``rank, index, x, y, score`` (+ slide, fold)."""
        from mil.explain.heatmap import top_k_tiles

        s = self.scores(slide_id, kind=kind, cls=cls, fold=fold)
        if "x" not in s:
            raise MilError(f"slide {slide_id}: its feature file has no tile coordinates")
        top = top_k_tiles(s[["x", "y"]].to_numpy(), s["score"].to_numpy(), k)
        top["index"] = s["index"].to_numpy()[top["index"].to_numpy()]
        top.insert(0, "slide_id", slide_id)
        top["fold"] = s.attrs["fold"]
        return top

    def heatmap(
        self,
        slide_id: str,
        kind: str | None = None,
        cls: int | str | None = None,
        fold: int | str | None = None,
        normalize: str = "rank",
        smooth: float = 0.0,
        top_k: int = 16,
        cmap: str = "viridis",
        slide_path: str | Path | None = None,
        ax=None,
        title: str | None = None,
    ):
        """A matplotlib Figure of the slide's instance scores at their tile positions.

        Scores come from :meth:`scores` (the fold that tested the slide); the
        tile size from the feature file's attributes, else the coordinate
        grid. See :func:`mil.explain.heatmap.plot_heatmap` for the options.
        """
        from mil.explain.heatmap import plot_heatmap

        s = self.scores(slide_id, kind=kind, cls=cls, fold=fold)
        if "slide_id" in s:
            raise MilError(
                f"{slide_id} is a bag of several slides ({', '.join(s['slide_id'].unique())}); "
                f"draw one slide at a time"
            )
        if "x" not in s:
            raise MilError(
                f"slide {slide_id}: its feature file has no tile coordinates, so there is "
                f"nothing to place the scores on"
            )
        if title is None:
            title = self._title(slide_id, s.attrs)
        return plot_heatmap(
            s[["x", "y"]].to_numpy(),
            s["score"].to_numpy(),
            tile_size=s.attrs["tile_size"],
            normalize=normalize,
            smooth=smooth,
            top_k=top_k,
            cmap=cmap,
            title=title,
            ax=ax,
            slide_path=slide_path,
        )

    def save_heatmap(self, slide_id: str, path: str | Path, dpi: int = 150, **options) -> Path:
        """Draw :meth:`heatmap` (same ``options``) and save it as a PNG at ``path`` (atomically)."""
        import matplotlib.pyplot as plt

        from mil.io import atomic_path

        fig = self.heatmap(slide_id, **options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path

    def _title(self, slide_id: str, attrs: dict) -> str:
        parts = [f"{slide_id}", f"fold {attrs['fold']}"]
        try:
            pred = self.predictions(attrs["fold"])
        except MilError:
            pred = None
        if pred is not None:
            row = pred[pred["bag_id"] == attrs["bag_id"]]
            if len(row):
                r = row.iloc[0]
                if self.classes:
                    c = self.classes[-1]
                    parts.append(f"label {r['label']}, P({c}) = {r[f'prob_{c}']:.2f}")
                elif "risk" in r:
                    parts.append(f"risk {r['risk']:.2f}")
        if attrs.get("kind") not in (None, "score"):
            parts.append(str(attrs["kind"]))
        return " · ".join(parts)


@contextlib.contextmanager
def _open_scores(path: Path, fold: str) -> Iterator[h5py.File]:
    """A fold's ``attention.h5``, opened for reading; a damaged file is a clear error."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read fold {fold}'s instance scores ({exc}); the file is damaged "
            f"(a partial copy?). Copy it again, or retrain the fold: delete "
            f"{path.parent / 'metrics.json'} and re-run `mil train` on the run folder"
        ) from None
    with f:
        yield f


def _fold_name(fold: int | str) -> str:
    return str(fold)


def _fold_key(name: str) -> tuple[int, int, str]:
    try:
        if name.startswith("r"):
            r, k = name[1:].split("_")
            return int(r), int(k), ""
        return 0, int(name), ""
    except ValueError:
        return 1 << 30, 0, name
