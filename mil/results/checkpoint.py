"""``fold_<k>/model.pt``: a fold's weights and what rebuilds the model and its preprocessing.

A plain dict of tensors and Python values, so ``torch.load(weights_only=True)``
reads it: ``state_dict``, ``model``, ``hparams``, ``in_dim``, ``n_out``,
``task``, ``classes``, ``task_state`` and ``standardize`` (the training
fold's feature mean and sd, or None).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from mil.errors import ConfigError, DataError
from mil.io import atomic_path, load_tensors
from mil.models import create
from mil.results import METRICS, REFIT


@dataclass
class Checkpoint:
    """What a ``model.pt`` holds: the weights, what rebuilds the model (registered name,
    hyper-parameters, input and output sizes), the task (name, classes, fold state) and the
    fold's feature standardisation (None: features as read)."""

    state_dict: dict[str, torch.Tensor]
    model: str
    hparams: dict[str, Any]
    in_dim: int
    n_out: int
    task: str
    classes: list[str]
    task_state: dict[str, Any]
    standardize: dict[str, torch.Tensor] | None = None

    def payload(self) -> dict[str, Any]:
        """The plain dict ``torch.save`` writes (read back with ``weights_only=True``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(in_dim=int(self.in_dim), n_out=int(self.n_out), classes=list(self.classes))
        return out


def save_model(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically; loadable with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint.payload(), tmp)


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """A ``model.pt`` payload (``torch.load(weights_only=True)``); a missing, damaged or
    foreign file is a :class:`DataError` naming it and what to do (a fold's: train the fold
    again; the refit's: refit again). A ``map_location`` torch cannot use is a
    :class:`ConfigError`, never called a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    device = _device(map_location)
    try:
        payload = load_tensors(path, map_location=device)
    except DataError:  # Python objects other than tensors: refused, and said so
        raise
    except Exception as exc:  # torch/pickle raise many types for a damaged file
        raise DataError(
            f"{path}: cannot read this checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            f"the file is damaged or not a mil model.pt. {_redo(path)}"
        ) from None
    keys = ("state_dict", "model", "hparams", "in_dim", "n_out")
    missing = [k for k in keys if k not in payload] if isinstance(payload, dict) else list(keys)
    if missing:
        raise DataError(
            f"{path}: not a mil checkpoint (no {missing[0]!r}); was it written by `mil train`?"
        )
    return payload


def _device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device this machine has (a checkpoint is read onto it)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r}: not a torch device; use cpu, cuda or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
        device.type == "mps" and not torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device {name!r}: this machine's torch does not have it; use cpu")
    return device


def _redo(path: Path) -> str:
    """What to do about a damaged ``model.pt``: the refit's is made again by deleting its
    folder (``refit.json`` too, or ``mil train --refit`` skips it), a fold's by deleting its
    ``metrics.json``."""
    if path.parent.name == REFIT:
        return (
            f"Delete {path.parent} and run `mil train CONFIG --out {path.parent.parent} "
            f"--refit` again to refit the model"
        )
    return (
        f"Delete {path.parent / METRICS} and re-run `mil train` on the run folder to train "
        f"the fold again"
    )


def load_model(path: str | Path, map_location: str = "cpu"):
    """The model of a ``model.pt`` in eval mode, and the payload (``weights_only=True``)."""
    payload = read_checkpoint(path, map_location=map_location)
    model = create(
        payload["model"], in_dim=payload["in_dim"], n_out=payload["n_out"], **payload["hparams"]
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
