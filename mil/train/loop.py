"""One fold's training: loss batches of many bags, forwarded in instance-budget chunks."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mil.data.batch import Bag, chunk_by_budget, unpack
from mil.data.dataset import BagDataset, on_device
from mil.data.prefetch import read_ahead
from mil.data.staging import Stager, staged
from mil.errors import TrainingError
from mil.models.base import MILModel
from mil.schema import TrainConfig
from mil.tasks.base import Task
from mil.train.distributed import SINGLE, Dist
from mil.train.objective import local_objective, projection_head, sharded_objective
from mil.train.optim import StepSchedule, make_optimizer, make_scheduler, training_budget
from mil.train.sampling import loss_batches


@dataclass
class Forward:
    """Outputs of a chunked forward pass over a list of bags, in their order."""

    logits: Tensor  # [B, n_out]
    aux_loss: Tensor | None = None
    embedding: Tensor | None = None  # [B, H], kept where asked (SC-MIL's contrastive term)
    scores: list[Tensor] | None = None  # per bag [N_b]
    extra_scores: dict[str, list[Tensor]] = field(default_factory=dict)


ALONE_CPU = 1024


def forward_bags(
    model: MILModel,
    bags: Sequence[Bag],
    max_instances: int,
    device: torch.device,
    targets: Tensor | None = None,
    keep_scores: bool = False,
    precision: str = "fp32",
    keep_embedding: bool = False,
    stager: Stager | None = None,
) -> Forward:
    """Forward ``bags`` in compute chunks of at most ``max_instances`` rows.

    The chunks of one loss batch are run one after another and their bag
    outputs concatenated, so the loss (and a Cox risk set) spans the whole
    batch while each matrix product stays cache-sized. ``precision="bf16"``
    packs the features straight into bfloat16 and runs the model under autocast;
    the returned logits are float32 either way. ``stager`` packs and moves the chunks
    (:class:`~mil.data.staging.Stager`; by default one for ``device``).
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    logits, aux, scores, embedding = [], [], [], []
    extra: dict[str, list[Tensor]] = {}
    # CPU: a bag of >= ALONE_CPU rows runs alone (no packing copy; its products are
    # already efficient). CUDA: pack up to the budget (fewer, larger kernels), each chunk's
    # pinned copy issued on a side stream while the chunk before it computes (mil.data.staging)
    alone = ALONE_CPU if device.type == "cpu" else None
    chunks = list(chunk_by_budget([len(b) for b in bags], max_instances, alone=alone))
    for chunk, batch in staged(stager or Stager(device, dtype), bags, chunks):
        if targets is not None:
            batch.targets = targets[chunk].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch)
        logits.append(out.logits.float())
        if keep_embedding:
            embedding.append(out.embedding.float())
        if out.aux_loss is not None:
            aux.append(out.aux_loss.float() * len(chunk))
        if keep_scores:
            if out.scores is not None:
                scores.extend(unpack(out.scores.detach().float().cpu(), batch.ptr.cpu()))
            for kind, val in out.extra_scores.items():
                extra.setdefault(kind, []).extend(
                    unpack(val.detach().float().cpu(), batch.ptr.cpu())
                )
    return Forward(
        logits=torch.cat(logits),
        aux_loss=(torch.stack(aux).sum() / len(bags)) if aux else None,
        embedding=torch.cat(embedding) if keep_embedding else None,
        scores=scores if (keep_scores and scores) else None,
        extra_scores=extra,
    )


def subsample(bag: Bag, n: int, gen: torch.Generator) -> Bag:
    """A random subset of ``n`` instances of ``bag`` (the graph restricted to them)."""
    if len(bag) <= n:
        return bag
    keep = torch.randperm(len(bag), generator=gen)[:n].sort().values
    edge_index = None
    if bag.edge_index is not None:
        from torch_geometric.utils import subgraph

        edge_index, _ = subgraph(keep, bag.edge_index, relabel_nodes=True, num_nodes=len(bag))
    return Bag(
        bag_id=bag.bag_id,
        x=bag.x[keep],
        coords=None if bag.coords is None else bag.coords[keep],
        edge_index=edge_index,
        tabular=bag.tabular,
        tabular_mask=bag.tabular_mask,
    )


@torch.no_grad()
def predict(
    model: MILModel,
    data: BagDataset,
    bag_ids: Sequence[str],
    max_instances: int,
    device: torch.device,
    keep_scores: bool = False,
    group: int = 64,
    precision: str = "fp32",
    dist: Dist = SINGLE,
) -> Forward:
    """Evaluation-mode forward over all ``bag_ids`` (full bags, never subsampled).

    Under torchrun each rank predicts its shard and every rank returns all
    bags' outputs, in the order of ``bag_ids``.
    """
    model.eval()
    mine = dist.shard(list(bag_ids))
    parts = []
    for i in range(0, len(mine), group):
        bags = [data[b] for b in mine[i : i + group]]
        parts.append(
            forward_bags(
                model, bags, max_instances, device, keep_scores=keep_scores, precision=precision
            )
        )
    logits = torch.cat([p.logits for p in parts]).cpu() if parts else None
    if logits is None:  # this rank's shard is empty: an empty block of the right width
        logits = torch.zeros((0, model.n_out))
    out = Forward(logits=dist.gather_rows(logits, len(bag_ids)))
    if keep_scores:
        scores = [s for p in parts for s in (p.scores or [])]
        extra: dict[str, list[Tensor]] = {}
        for p in parts:
            for kind, vals in p.extra_scores.items():
                extra.setdefault(kind, []).extend(vals)
        if dist.enabled:
            # rank 0 holds at least one bag, so it knows whether the model gives scores
            has_scores, kinds = dist.broadcast((bool(scores), list(extra)))
            scores = dist.gather(scores, len(bag_ids)) if has_scores else []
            extra = {k: dist.gather(extra.get(k, []), len(bag_ids)) for k in kinds}
        out.scores = scores or None
        out.extra_scores = extra
    return out


class BatchForward(torch.nn.Module):
    """A loss batch's chunked forward (:func:`forward_bags`) as one module call: what DDP wraps.
    With a projection ``head`` (SC-MIL) it also returns the projected bag embeddings."""

    def __init__(
        self,
        model: MILModel,
        max_instances: int,
        device: torch.device,
        precision: str,
        head: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.max_instances = max_instances
        self.device = device
        self.precision = precision

    def forward(
        self, bags: Sequence[Bag], targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        out = forward_bags(
            self.model,
            bags,
            self.max_instances,
            self.device,
            targets=targets,
            precision=self.precision,
            keep_embedding=self.head is not None,
        )
        projected = None if self.head is None else self.head(out.embedding)
        return out.logits, out.aux_loss, projected


def diverged(where: str, epoch: int | None, what: str, cfg: TrainConfig) -> TrainingError:
    """The error for a run whose loss or outputs stopped being finite numbers (``where``
    names the fold; ``epoch`` counts from 0, None when ``where`` names it already)."""
    at = where if epoch is None else f"{where}, epoch {epoch + 1}"
    return TrainingError(
        f"{at}: {what}; training diverged. Lower train.lr (now "
        f"{cfg.lr:g}) or set train.grad_clip (e.g. 1.0); folds finished earlier are kept"
    )


def _train_epoch(
    step: torch.nn.Module,
    opt: torch.optim.Optimizer,
    model: MILModel,
    task: Task,
    data: BagDataset,
    train: pd.DataFrame,
    cfg: TrainConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    dist: Dist,
    where: str,
    constant: Tensor,
    scheduler: StepSchedule,
) -> dict[str, float]:
    """One pass over the training bags in loss batches: the mean loss (the task's, without a
    contrastive term), the mean loss of the constant prediction ``constant`` on the same
    batches, optimizer steps, instances seen."""
    model.train()
    train_ids = train["bag_id"].tolist()
    losses, constant_losses, n_inst = [], [], 0
    # the epoch's batches drawn up front, so that their bags are read ahead while one trains
    batches = list(loss_batches(task, train, cfg, rng))
    data.plan([train_ids[rows[i]] for rows in batches for i in dist.batch_share(len(rows))[1]])

    def read(rows: np.ndarray) -> list[Bag]:  # the bags this rank forwards
        return [data[train_ids[rows[i]]] for i in dist.batch_share(len(rows))[1]]

    for rows, bags in read_ahead(read, batches, data.read_ahead):
        tgt = task.targets(train.iloc[rows])
        with torch.no_grad():
            constant_losses.append(float(task.loss(constant.expand(len(rows), -1), tgt)))
        mine, use = dist.batch_share(len(rows))
        if cfg.subsample:
            bags = [subsample(b, cfg.subsample, gen) for b in bags]
        mtgt = task.model_targets(tgt)
        out = step(bags, None if mtgt is None else mtgt[torch.as_tensor(use)])
        if dist.enabled:
            loss, shown = sharded_objective(task, tgt, out, mine, dist, scheduler.progress)
        else:
            loss, shown = local_objective(task, tgt, out, scheduler.progress)
        if not (math.isfinite(shown) and math.isfinite(float(loss.detach()))):
            raise diverged(where, None, f"the training loss is {shown} (objective {loss:g})", cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        scheduler.step()
        losses.append(shown)
        n_inst += sum(len(b) for b in bags) if len(mine) else 0
    return {
        "train_loss": float(np.mean(losses)),
        "constant_loss": float(np.mean(constant_losses)),
        "steps": len(losses),
        "instances": int(dist.sum([n_inst])[0]),
    }


def _validate(
    model: MILModel,
    task: Task,
    data: BagDataset,
    val: pd.DataFrame,
    val_targets: dict[str, Tensor],
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist,
    desc: str,
    epoch: int,
) -> dict[str, float]:
    """Validation loss and metrics (``val_<metric>``) of one epoch."""
    fwd = predict(
        model,
        data,
        val["bag_id"].tolist(),
        cfg.max_instances,
        device,
        precision=cfg.precision,
        dist=dist,
    )
    if not torch.isfinite(fwd.logits).all():
        raise diverged(desc, epoch, "the model's validation outputs are NaN or infinite", cfg)
    out = {"val_loss": float(task.loss(fwd.logits, val_targets))}
    metrics = task.metrics(task.predictions(val, fwd.logits.numpy()))
    out.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)})
    return out


def _criterion_score(row: dict[str, float], column: str, sign: int) -> float:
    """An epoch's stopping criterion, higher is better; undefined (NaN) never improves."""
    score = sign * float(row.get(column, float("nan")))
    return score if math.isfinite(score) else -math.inf


def _step_and_optimizer(
    model: MILModel,
    task: Task,
    data: BagDataset,
    train: pd.DataFrame,
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A loss batch's forward (with SC-MIL's projection head where the task asks for one;
    under torchrun wrapped in DDP) and the optimizer of its parameters."""
    head = projection_head(model, task, data, train, device, cfg.seed)
    params = [*model.parameters(), *([] if head is None else head.parameters())]
    step: torch.nn.Module = BatchForward(model, cfg.max_instances, device, cfg.precision, head)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # one call per loss batch (forward_bags moves the data); a model that may leave
        # parameters out of a step says so (MILModel.unused_parameters)
        step = DistributedDataParallel(step, find_unused_parameters=model.unused_parameters)
    return step, make_optimizer(params, cfg)


def fit(
    model: MILModel,
    task: Task,
    data: BagDataset,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    dist: Dist = SINGLE,
    stop_after: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Tensor]]:
    """Train with ``cfg.optimizer`` (AdamW by default); early stopping on ``cfg.stop_on``
    (:meth:`Task.stop_criterion`: the validation loss, or the survival C-index) restores the
    best weights (of epoch ``cfg.best_from_epoch`` or later; patience counts from there). With ``cfg.patience`` None (or no validation bags) it trains a fixed
    ``cfg.epochs`` (more to reach ``cfg.min_steps``: :func:`training_budget`) and keeps
    the final weights; the learning rate follows ``cfg.schedule`` (:func:`make_scheduler`).
    ``stop_after`` ends it after that many epochs, the schedule laid out over the whole
    budget (a refit stopping where cross-validation did). Returns (history, state_dict).
    Under torchrun (``dist``) each loss batch is shared out across the ranks
    (:mod:`mil.train.distributed`); every rank returns the same weights.
    """
    data = on_device(data, [*train["bag_id"], *([] if val is None else val["bag_id"])], device)
    rng = np.random.default_rng(cfg.seed)
    # the batches are the same on every rank; the subsampling (and dropout) draws are per rank
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * dist.rank)
    step, opt = _step_and_optimizer(model, task, data, train, cfg, device, dist)
    constant = torch.as_tensor(task.constant_logits(train), dtype=torch.float32)
    budget = training_budget(task, train, cfg)
    scheduler = make_scheduler(opt, cfg, budget.steps)
    early = cfg.patience is not None and val is not None and len(val) > 0
    val_targets = task.targets(val) if val is not None and len(val) else None
    column, sign = task.stop_criterion(cfg.stop_on)
    best_score, best_state, best_epoch, waited = -float("inf"), None, -1, 0
    history = []
    bar = tqdm(range(budget.epochs), desc=desc, disable=not progress or not dist.main, leave=False)
    for epoch in bar:
        t0, where = time.perf_counter(), f"{desc}, epoch {epoch + 1}"
        ep = _train_epoch(
            step, opt, model, task, data, train, cfg, rng, gen, dist, where, constant, scheduler
        )
        row = {
            "epoch": epoch,
            "train_loss": ep["train_loss"],
            "seconds": time.perf_counter() - t0,
            "instances_per_s": ep["instances"] / max(time.perf_counter() - t0, 1e-9),
            # the loss of the best constant prediction on the same batches, and the updates
            "constant_loss": ep["constant_loss"],
            "steps": ep["steps"],
            "lr": opt.param_groups[0]["lr"],  # after the epoch's last step
        }
        if val_targets is not None:
            row.update(
                _validate(model, task, data, val, val_targets, cfg, device, dist, desc, epoch)
            )
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("train_loss", "val_loss")})
        if early and epoch >= cfg.best_from_epoch:
            score = _criterion_score(row, column, sign)
            if score > best_score + 1e-6 or best_state is None:
                best_score, best_epoch, waited = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
                if waited >= cfg.patience and epoch + 1 >= budget.min_epochs:
                    break
        if stop_after is not None and epoch + 1 >= stop_after:
            break
    hist = pd.DataFrame(history)
    hist["best"] = hist["epoch"] == best_epoch if early else hist["epoch"] == hist["epoch"].max()
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
