"""Contracts every registered aggregator keeps, checked over ``mil.models.available()``.

A model added to the registry is covered here with no new test. Bags of 7, 1,
30 and 120 instances (coordinates on a grid; the kNN graph from ``bag_graph``
for models whose ``graph`` is set) go through each model with its default
hyper-parameters. A model whose output depends on instance order by design
sets the class attribute ``permutation_invariant = False`` and skips only
that check. A model fitted in closed form (``trained_by_gradient = False``: the
linear baselines, whose bag-of-words assignment has no gradient) skips the
gradient and bf16-training contracts; tests/test_baselines.py checks its fit.

The end of the file checks a few models against hand computations of their
papers' formulas.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mil.data.batch import Bag, BagBatch, collate_bags
from mil.data.graph import bag_graph
from mil.models import available, create, get
from mil.models.base import MILModel, MILOutput

MODELS = available()
#: models trained by the training loop (the gradient contracts apply)
GRADIENT_MODELS = [m for m in MODELS if get(m).trained_by_gradient]
IN_DIM = 12
SIZES = (7, 1, 30, 120)  # bag 0 is the one perturbed in the leak checks
ATOL = 1e-5


#: the tabular modalities of the fusion models (mil.models.fusion): 6 omics columns in three
#: groups and 3 clinical ones; bag 1 lacks the clinical table
TABULAR = [
    {
        "name": "rna",
        "dim": 6,
        "groups": [[0, 1], [2, 3, 4], [1, 5]],
        "group_names": ["a", "b", "c"],
    },
    {"name": "clinical", "dim": 3, "groups": [[0, 1, 2]], "group_names": ["clinical"]},
]


def make_bags(model: MILModel, sizes=SIZES, seed: int = 0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i, n in enumerate(sizes):
        cells = torch.randperm(16 * 16, generator=gen)[:n]
        coords = torch.stack([cells % 16, cells // 16], 1).float() * 224.0
        bag = Bag(f"bag{i}", torch.randn(n, IN_DIM, generator=gen), coords)
        if model.uses_tabular:
            bag.tabular, bag.tabular_mask = (
                torch.randn(9, generator=gen),
                torch.tensor([1.0, i != 1]),
            )
        if model.graph is not None:
            bag.edge_index = bag_graph(bag, model.graph, model.graph_k)
        bags.append(bag)
    return bags


def build(name: str, n_out: int = 2, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    tabular = {"tabular": TABULAR} if get(name).uses_tabular else {}
    return create(name, in_dim=IN_DIM, n_out=n_out, **tabular).eval()


def bag_rows(out: MILOutput, batch: BagBatch, i: int) -> dict[str, torch.Tensor]:
    """Everything the model says about bag ``i``."""
    lo, hi = int(batch.ptr[i]), int(batch.ptr[i + 1])
    rows = {"logits": out.logits[i], "embedding": out.embedding[i]}
    if out.scores is not None:
        rows["scores"] = out.scores[lo:hi]
    for kind, values in out.extra_scores.items():
        rows[kind] = values[lo:hi]
    return rows


def assert_close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("n_out", [1, 2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name, n_out):
    model = build(name, n_out)
    batch = collate_bags(make_bags(model))
    with torch.no_grad():
        out = model(batch)
    b, n = len(SIZES), sum(SIZES)
    assert out.logits.shape == (b, n_out)
    assert out.embedding.dim() == 2 and out.embedding.shape[0] == b
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()
    if out.scores is not None:
        assert out.scores.shape == (n,)
        assert torch.isfinite(out.scores).all()
    for kind, values in out.extra_scores.items():
        assert values.dim() == 2 and values.shape[0] == n, kind
    assert out.aux_loss is None  # no targets, no auxiliary loss


@pytest.mark.parametrize("name", MODELS)
def test_bag_alone_equals_bag_in_batch(name):
    model = build(name)
    bags = make_bags(model)
    batch = collate_bags(bags)
    with torch.no_grad():
        packed = model(batch)
        for i, bag in enumerate(bags):
            alone = collate_bags([bag])
            assert_close(bag_rows(model(alone), alone, 0), bag_rows(packed, batch, i))


def permuted(bag: Bag, gen: torch.Generator) -> tuple[Bag, torch.Tensor]:
    """``bag`` with its instances reordered (edges relabelled); returns (bag, perm)."""
    perm = torch.randperm(len(bag), generator=gen)
    new_index = torch.empty_like(perm)
    new_index[perm] = torch.arange(len(bag))
    edges = None if bag.edge_index is None else new_index[bag.edge_index]
    return Bag(
        bag.bag_id,
        bag.x[perm],
        bag.coords[perm],
        edge_index=edges,
        tabular=bag.tabular,
        tabular_mask=bag.tabular_mask,
    ), perm


@pytest.mark.parametrize("name", MODELS)
def test_instance_order_invariance(name):
    model = build(name)
    if not model.permutation_invariant:
        pytest.skip(f"{name} is order-dependent by design (see its docstring)")
    bags = make_bags(model)
    gen = torch.Generator().manual_seed(1)
    shuffled, perms = zip(*(permuted(b, gen) for b in bags))
    batch, batch_p = collate_bags(bags), collate_bags(list(shuffled))
    with torch.no_grad():
        out, out_p = model(batch), model(batch_p)
    for i, perm in enumerate(perms):
        expected = {
            k: (v[perm] if k not in ("logits", "embedding") else v)
            for k, v in bag_rows(out, batch, i).items()
        }
        assert_close(bag_rows(out_p, batch_p, i), expected)


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_no_value_or_gradient_leak_between_bags(name):
    model = build(name)
    if not model.uses_instances:
        pytest.skip(f"{name} reads no instances (tabular modalities only)")
    bags = make_bags(model)
    batch = collate_bags(bags)
    changed = collate_bags(bags)
    changed.x = batch.x.clone()
    n0 = len(bags[0])
    changed.x[:n0] = torch.randn(n0, IN_DIM) * 3.0
    with torch.no_grad():
        out, out_c = model(batch), model(changed)
    for i in range(1, len(bags)):
        assert_close(bag_rows(out_c, changed, i), bag_rows(out, batch, i))
    # Gradients in training mode, where batch statistics (e.g. BatchNorm) would leak.
    x = batch.x.clone().requires_grad_(True)
    batch.x = x
    out = model.train()(batch)
    (out.logits[1:].sum() + out.embedding[1:].sum()).backward()
    assert torch.equal(x.grad[:n0], torch.zeros_like(x.grad[:n0]))
    assert x.grad[n0:].abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model = build(name, seed=0)
    batch = collate_bags(make_bags(model))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = build(name, seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.eval()
    with torch.no_grad():
        a, b = model(batch), restored(batch)
    for i in range(batch.num_bags):
        assert_close(bag_rows(b, batch, i), bag_rows(a, batch, i), atol=0.0)


@pytest.mark.parametrize("n_out", [1, 2, 4])
@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_training_step_and_aux_loss(name, n_out):
    model = build(name, n_out).train()
    batch = collate_bags(make_bags(model))
    if n_out >= 2:
        batch.targets = torch.tensor([0, 1, n_out - 1, 1])
    out = model(batch)
    loss = out.logits.square().mean()
    if out.aux_loss is not None:
        assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
        assert out.aux_loss.requires_grad
        loss = loss + out.aux_loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("targets", [None, [1, 1, 1, 1], [0, 1, 0, 1]])
@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_every_parameter_gets_a_gradient_unless_declared(name, targets):
    """Data-parallel training waits for a gradient of every parameter unless the model sets
    ``unused_parameters`` (mil.train.loop.fit): no targets (survival), one class, two classes."""
    model = build(name, 1 if targets is None else 2).train()
    if model.unused_parameters:
        pytest.skip(f"{name} declares parameters that a step may leave unused")
    batch = collate_bags(make_bags(model))
    if targets is not None:
        batch.targets = torch.tensor(targets)
    out = model(batch)
    loss = out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}; set unused_parameters = True"


# Model-specific checks against hand computations of the papers' formulas.


def test_nystrom_attention_is_exact_with_one_landmark_per_token():
    """With as many landmarks as tokens, Nyström attention is softmax attention."""
    from mil.models.transformer import NystromAttention

    torch.manual_seed(0)
    attn = NystromAttention(dim=16, heads=2, num_landmarks=64, pinv_iterations=20).eval()
    x = torch.randn(10, 16) * 0.5
    out, _ = attn(x)
    q, k, v = (t.view(10, 2, 8).transpose(0, 1) for t in attn.qkv(x).chunk(3, -1))
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    exact = exact + attn.res_conv(v.unsqueeze(0)).squeeze(0)
    exact = attn.out(exact.transpose(0, 1).reshape(10, 16))
    torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-3)
    cls_out, cls_attn = attn(x, cls_only=True)
    torch.testing.assert_close(cls_out, out[:1], atol=1e-5, rtol=1e-4)
    scores = (q[:, :1] @ k.transpose(-1, -2)).squeeze(1) / math.sqrt(8)
    torch.testing.assert_close(cls_attn, torch.softmax(scores, -1))


def test_nystrom_landmarks_are_segment_means():
    from mil.models.transformer import NystromAttention

    attn = NystromAttention(dim=8, heads=1, num_landmarks=3)
    t = torch.arange(7.0).view(1, 7, 1)
    # 7 tokens in 3 segments of sizes 3, 2, 2 (segment of token j: floor(3 j / 7)).
    expected = torch.tensor([(0 + 1 + 2) / 3, (3 + 4) / 2, (5 + 6) / 2]).view(1, 3, 1)
    torch.testing.assert_close(attn._landmarks(t), expected)


def test_transformer_subsamples_long_bags_only_in_training():
    torch.manual_seed(0)
    model = create("transformer", in_dim=IN_DIM, n_out=1, max_instances_train=20)
    bags = make_bags(model, sizes=(50, 5))
    batch = collate_bags(bags)
    out = model.train()(batch)
    assert int((out.scores[:50] > 0).sum()) == 20 and bool((out.scores[50:] > 0).all())
    with torch.no_grad():
        out = model.eval()(batch)
    assert bool((out.scores > 0).all())
    cls_share = 1 - torch.stack([out.scores[:50].sum(), out.scores[50:].sum()])
    assert bool(((cls_share > 0) & (cls_share < 1)).all())


@pytest.mark.parametrize("subtyping", [False, True])
@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_instance_loss_matches_per_bag_reference(name, subtyping):
    """CLAM's inst_eval / inst_eval_out, written bag by bag from the paper."""
    torch.manual_seed(0)
    model = create(name, in_dim=IN_DIM, n_out=3, k_sample=4, subtyping=subtyping, dropout=0.0)
    bags = make_bags(model, sizes=(12, 5, 30))
    batch = collate_bags(bags)
    batch.targets = torch.tensor([2, 0, 1])
    out = model(batch)
    h = model.encoder(batch.x)
    e = model.attention(h)
    total = 0.0
    for b in range(3):
        lo, hi = int(batch.ptr[b]), int(batch.ptr[b + 1])
        k = min(4, (hi - lo) // 2)
        bag_loss = 0.0
        for c, clf in enumerate(model.instance_classifiers):
            a = e[lo:hi, c if name == "clam_mb" else 0]
            top, bottom = h[lo:hi][a.topk(k).indices], h[lo:hi][(-a).topk(k).indices]
            if c == int(batch.targets[b]):
                logits = clf(torch.cat([top, bottom]))
                labels = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            elif subtyping:
                logits, labels = clf(top), torch.zeros(k).long()
            else:
                continue
            bag_loss = bag_loss + F.cross_entropy(logits, labels)
        total = total + (bag_loss / 3 if subtyping else bag_loss)
    expected = (1 - 0.7) / 0.7 * total / 3
    torch.testing.assert_close(out.aux_loss, expected)


def test_dsmil_matches_per_bag_reference():
    torch.manual_seed(0)
    model = create("dsmil", in_dim=IN_DIM, n_out=2).eval()
    bags = make_bags(model, sizes=(9, 14))
    batch = collate_bags(bags)
    with torch.no_grad():
        out = model(batch)
        for i, bag in enumerate(bags):
            h = model.encoder(bag.x)
            s = model.instance_classifier(h)
            q = model.q(h)
            q_max = model.q(h[s.argmax(0)])  # one critical instance per class
            a = torch.softmax(q @ q_max.T / math.sqrt(q.shape[1]), 0)
            v = a.T @ h
            bag_logits = model.bag_classifier(v.unsqueeze(0)).view(-1)
            torch.testing.assert_close(out.logits[i], 0.5 * (s.max(0).values + bag_logits))


def test_ppeg_is_three_depthwise_convolutions_on_the_row_major_grid():
    from mil.models.transformer import PPEG

    torch.manual_seed(0)
    ppeg = PPEG(6)
    x = torch.randn(1 + 16, 6)
    grid = x[1:].T.reshape(1, 6, 4, 4)  # token r * 4 + c at row r, column c
    expected = grid + sum(conv(grid) for conv in ppeg.convs)
    expected = torch.cat([x[:1], expected.flatten(2)[0].T])
    torch.testing.assert_close(ppeg(x, 4), expected)


@pytest.mark.parametrize("kind", ["spatial", "feature"])
def test_graph_models_build_their_graph_when_the_batch_has_none(kind):
    for name in MODELS:
        model = build(name)
        if model.graph is None:
            continue
        model = create(name, in_dim=IN_DIM, n_out=2, graph=kind, graph_k=5).eval()
        assert (model.graph, model.graph_k) == (kind, 5)
        bags = make_bags(model)
        with_graph = collate_bags(bags)
        for bag in bags:
            bag.edge_index = None
        without = collate_bags(bags)
        assert without.edge_index is None
        with torch.no_grad():
            torch.testing.assert_close(model(without).logits, model(with_graph).logits)


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_bf16_autocast_tracks_fp32(name):
    """``train.precision: bf16`` path: features packed in bfloat16, the model under autocast.

    The logits stay within bf16 rounding of the fp32 forward and the weights
    get finite fp32 gradients.
    """
    from mil.train.loop import forward_bags

    model = build(name, n_out=2)
    with torch.no_grad():  # a weight that starts at zero (linear) gives 0 in both precisions
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, p.shape[1] ** -0.5)
    bags = make_bags(model)
    with torch.no_grad():
        ref = forward_bags(model, bags, 10**6, torch.device("cpu")).logits
    # eval mode (no dropout) but with gradients: the same function in both precisions
    out = forward_bags(model, bags, 10**6, torch.device("cpu"), precision="bf16")
    assert out.logits.dtype == torch.float32
    scale = ref.abs().max().clamp(min=1.0)
    assert (out.logits.detach() - ref).abs().max() <= 0.05 * scale, (out.logits, ref)
    assert not torch.equal(out.logits.detach(), ref)  # bf16 did run
    loss = out.logits.square().sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    # (parameters used only by a training-time loss, e.g. CLAM's instance classifiers, get none)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# Class-specific instance scores (issue 22): named kinds, one column per head output.


#: the fusion models (mil.models.fusion, slides + tabular modalities) have no instance
#: score kinds yet; every tile-bag aggregator must
SLIDE_MODELS = [m for m in MODELS if not get(m).uses_tabular]


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("name", SLIDE_MODELS)
def test_every_model_has_class_specific_instance_scores(name, n_out):
    from mil.models.base import SCORE_KINDS

    model = build(name, n_out)
    batch = collate_bags(make_bags(model))
    with torch.no_grad():
        out = model(batch)
    assert set(out.extra_scores) <= set(SCORE_KINDS), sorted(out.extra_scores)
    per_class = {"contribution", "instance_logits", "attention_x_logit"} & set(out.extra_scores)
    assert per_class, f"{name}: no class-specific instance scores"
    for kind in per_class:
        assert out.extra_scores[kind].shape == (sum(SIZES), n_out), kind
        assert torch.isfinite(out.extra_scores[kind]).all(), kind


@pytest.mark.parametrize("n_out", [1, 2, 4])
@pytest.mark.parametrize("name", [m for m in MODELS if get(m).additive])
def test_contributions_sum_to_the_bag_logits(name, n_out):
    """An additive model's contributions, summed per bag (torch.bincount-style index_add
    over the bag index), plus its offset are its logits."""
    model = build(name, n_out)
    with torch.no_grad():
        for p in model.parameters():  # the linear baselines start at zero
            p.add_(torch.randn_like(p) * 0.1)
        batch = collate_bags(make_bags(model))
        out = model(batch)
        c = out.extra_scores["contribution"].double()
        summed = torch.zeros(batch.num_bags, n_out, dtype=torch.float64).index_add_(
            0, batch.batch, c
        )
        expected = out.logits.double() - model.logit_offset().double()
    torch.testing.assert_close(summed, expected, atol=1e-4, rtol=1e-4)


def test_abmil_contribution_is_attention_times_head_by_hand():
    model = build("abmil", n_out=2)
    bags = make_bags(model, sizes=(9, 4))
    batch = collate_bags(bags)
    with torch.no_grad():
        out = model(batch)
        for i, bag in enumerate(bags):
            h = model.encoder(bag.x)
            a = torch.softmax(model.attention(h).squeeze(-1), 0)
            lo, hi = int(batch.ptr[i]), int(batch.ptr[i + 1])
            own = h @ model.head.weight.T
            torch.testing.assert_close(out.extra_scores["contribution"][lo:hi], a[:, None] * own)
            torch.testing.assert_close(
                out.extra_scores["instance_logits"][lo:hi], own + model.head.bias
            )


def test_additive_instance_logits_are_the_model_on_a_bag_of_one():
    model = build("abmil_additive", n_out=3)
    bag = make_bags(model, sizes=(11,))[0]
    with torch.no_grad():
        out = model(collate_bags([bag]))
        alone = [model(collate_bags([Bag("one", bag.x[j : j + 1])])).logits[0] for j in range(11)]
    torch.testing.assert_close(out.extra_scores["instance_logits"], torch.stack(alone))


def test_lse_pooling_by_hand():
    """log-mean-exp of the instance logits, bag by bag; a bag of one gives its instance logit."""
    model = build("lse", n_out=2)
    bags = make_bags(model, sizes=(9, 1))
    with torch.no_grad():
        out = model(collate_bags(bags))
        for i, bag in enumerate(bags):
            s = model.head(model.encoder(bag.x))
            expected = (torch.logsumexp(model.r * s, 0) - math.log(len(bag))) / model.r
            torch.testing.assert_close(out.logits[i], expected)
    torch.testing.assert_close(out.logits[1], out.extra_scores["instance_logits"][9])
