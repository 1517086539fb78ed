"""Fusion models (mil.models.fusion) against direct PyTorch computations of their docstring
formulas, bag by bag with dense tensors; missing modalities and modality dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mil.data.batch import Bag, collate_bags
from mil.models import create

D = 10
LAYOUT = [
    {"name": "rna", "dim": 5, "groups": [[0, 1], [1, 2, 3], [4]], "group_names": ["a", "b", "c"]},
    {"name": "clinical", "dim": 3, "groups": [[0, 1, 2]], "group_names": ["clinical"]},
]
MASKS = ([1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0])


def bags(sizes=(6, 1, 9, 4), seed: int = 0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        mask = torch.tensor(MASKS[i % len(MASKS)])
        t = torch.randn(8, generator=gen) * torch.repeat_interleave(mask, torch.tensor([5, 3]))
        out.append(Bag(f"b{i}", torch.randn(n, D, generator=gen), tabular=t, tabular_mask=mask))
    return out


def build(name: str, n_out: int = 2, **kw):
    torch.manual_seed(0)
    model = create(name, in_dim=D, n_out=n_out, tabular=LAYOUT, dropout=0.0, **kw).eval()
    with torch.no_grad():  # the learned missing tokens start near 0: make them matter
        for n, p in model.named_parameters():
            if n.endswith("missing"):
                p.normal_()
    return model


def snn_ref(seq, u):
    for block in seq:
        lin = block[0]
        u = F.selu(u @ lin.weight.T + lin.bias)
    return u


def expand_mask(m):
    return torch.repeat_interleave(m, torch.tensor([5, 3]))


def tokens_ref(model, t, m):
    """G_k = m_k SNN_k(t_{G_k}) + (1 - m_k) e_k."""
    rows = []
    for k, (idx, mod) in enumerate(model.groups):
        g = snn_ref(model.tokens.encoders[k], t[idx].unsqueeze(0))[0]
        rows.append(m[mod] * g + (1 - m[mod]) * model.tokens.missing[k])
    return torch.stack(rows), torch.stack([m[mod] for _, mod in model.groups])


def pool_ref(pool, g, mask=None):
    e = torch.stack([pool.w(torch.tanh(pool.v(gk)) * torch.sigmoid(pool.u(gk)))[0] for gk in g])
    if mask is None:
        a = torch.softmax(e, 0)
    else:
        keep = mask > 0
        a = torch.zeros_like(e)
        if keep.any():
            a[keep] = torch.softmax(e[keep], 0)
    return (a.unsqueeze(1) * g).sum(0)


@torch.no_grad()
def test_snn_matches_its_formula():
    model = build("snn", hidden_dim=[7, 5])
    bs = bags()
    out = model(collate_bags(bs))
    for i, b in enumerate(bs):
        u = torch.cat([b.tabular * expand_mask(b.tabular_mask), b.tabular_mask])
        h = snn_ref(model.net, u.unsqueeze(0))[0]
        torch.testing.assert_close(out.logits[i], model.head(h), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion", ["concat", "kronecker"])
@torch.no_grad()
def test_late_fusion_matches_its_formula(fusion):
    model = build("late_fusion", fusion=fusion, hidden_dim=8, fusion_dim=4)
    bs = bags()
    out = model(collate_bags(bs))
    s = model.slide
    for i, b in enumerate(bs):
        h = torch.relu(b.x @ s.encoder[0].weight.T + s.encoder[0].bias)
        e = (
            torch.tanh(h @ s.v.weight.T + s.v.bias) * torch.sigmoid(h @ s.u.weight.T + s.u.bias)
        ) @ s.w.weight.T
        p = torch.softmax(e[:, 0] + s.w.bias, 0) @ h
        m = b.tabular_mask
        g = snn_ref(model.omics, torch.cat([b.tabular * expand_mask(m), m]).unsqueeze(0))[0]
        o = m.max()
        if fusion == "concat":
            z = torch.relu(model.fuse.weight @ torch.cat([p, o * g]) + model.fuse.bias)
        else:

            def gate(bil, p=p, g=g):
                return torch.sigmoid(torch.einsum("i,oij,j->o", p, bil.weight, g) + bil.bias)

            pt = gate(model.gate_p) * torch.relu(model.proj_p.weight @ p + model.proj_p.bias)
            gt = o * gate(model.gate_g) * torch.relu(model.proj_g.weight @ g + model.proj_g.bias)
            kron = torch.outer(torch.cat([pt, torch.ones(1)]), torch.cat([gt, torch.ones(1)]))
            z = torch.relu(model.fuse.weight @ kron.flatten() + model.fuse.bias)
        torch.testing.assert_close(out.logits[i], model.head(z), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_mcat_matches_its_formula():
    model = build("mcat", hidden_dim=8)
    bs = bags()
    out = model(collate_bags(bs))
    for i, b in enumerate(bs):
        g, mk = tokens_ref(model, b.tabular, b.tabular_mask)
        h = torch.relu(model.encoder[0](b.x))
        logits = model.q(g) @ model.k(h).T / math.sqrt(8)  # [K, n]
        hh = torch.softmax(logits, 1) @ model.v(h)
        p, go = pool_ref(model.pool_path, hh), pool_ref(model.pool_omics, g, mk)
        z = torch.relu(model.fuse(torch.cat([p, go])))
        torch.testing.assert_close(out.logits[i], model.head(z), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_survpath_matches_masked_self_attention():
    """One softmax attention over [G; H] whose instance-to-instance block is masked out."""
    model = build("survpath", hidden_dim=8)
    bs = bags()
    out = model(collate_bags(bs))
    for i, b in enumerate(bs):
        g, _ = tokens_ref(model, b.tabular, b.tabular_mask)
        h = torch.relu(model.encoder[0](b.x))
        tok = torch.cat([g, h])
        k_groups = len(g)
        s = model.q(tok) @ model.k(tok).T / math.sqrt(8)
        s[k_groups:, k_groups:] = float("-inf")
        o = torch.softmax(s, 1) @ model.v(tok)
        z = torch.cat([o[:k_groups].mean(0), o[k_groups:].mean(0)])
        z = torch.relu(model.fuse(model.norm(z)))
        torch.testing.assert_close(out.logits[i], model.head(z), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["snn", "late_fusion", "mcat", "survpath"])
@torch.no_grad()
def test_instance_logits_are_the_model_on_a_bag_of_one_instance(name):
    model = build(name)
    bs = bags()
    out = model(collate_bags(bs))
    row = 0
    for b in bs:
        for j in range(len(b)):
            one = Bag("one", b.x[j : j + 1], tabular=b.tabular, tabular_mask=b.tabular_mask)
            alone = model(collate_bags([one])).logits[0]
            torch.testing.assert_close(
                out.extra_scores["instance_logits"][row], alone, atol=1e-5, rtol=1e-4
            )
            row += 1


@pytest.mark.parametrize("name", ["snn", "late_fusion", "mcat", "survpath"])
@torch.no_grad()
def test_a_missing_modality_is_ignored_whatever_its_values(name):
    model = build(name)
    bs = bags()
    changed = bags()
    for b in changed:
        b.tabular = b.tabular + 5.0 * (1 - expand_mask(b.tabular_mask))  # only the missing parts
    torch.testing.assert_close(model(collate_bags(changed)).logits, model(collate_bags(bs)).logits)
    # and no tables at all (an external cohort) reads as every modality missing
    bare = [Bag(b.bag_id, b.x) for b in bs]
    none = [Bag(b.bag_id, b.x, tabular=torch.zeros(8), tabular_mask=torch.zeros(2)) for b in bs]
    torch.testing.assert_close(model(collate_bags(bare)).logits, model(collate_bags(none)).logits)


@pytest.mark.parametrize("name", ["late_fusion", "mcat", "survpath"])
def test_modality_dropout_hides_whole_modalities_in_training_only(name):
    model = build(name, modality_dropout=1.0)
    bs = bags()
    hidden = [Bag(b.bag_id, b.x, tabular=b.tabular, tabular_mask=torch.zeros(2)) for b in bs]
    with torch.no_grad():
        eval_out = model(collate_bags(bs)).logits
        eval_hidden = model(collate_bags(hidden)).logits
        train_out = model.train()(collate_bags(bs)).logits  # dropout 0: only the modality draw
    torch.testing.assert_close(train_out, eval_hidden)
    assert not torch.allclose(eval_out, eval_hidden)


def test_late_fusion_without_omics_is_a_slide_model():
    """With o = 0 the Kronecker product keeps [p~; 1] only: the omics values cannot matter,
    and the patient's prediction moves only with its slides."""
    model = build("late_fusion")
    bs = bags(sizes=(5, 5))
    for b in bs:
        b.tabular_mask = torch.tensor([0.0, 0.0])
        b.tabular = torch.zeros(8)
    with torch.no_grad():
        a = model(collate_bags(bs)).logits
        bs[1].x = bs[1].x + 1.0
        c = model(collate_bags(bs)).logits
    torch.testing.assert_close(a[0], c[0])
    assert not torch.allclose(a[1], c[1])


def test_unknown_modality_and_missing_groups_are_config_errors():
    from mil.errors import ConfigError

    with pytest.raises(ConfigError, match="'methylation' is not a tabular modality"):
        create("snn", in_dim=D, n_out=1, tabular=LAYOUT, modalities=["methylation"])
    with pytest.raises(ConfigError, match="needs at least one tabular feature group"):
        create("mcat", in_dim=D, n_out=1)
