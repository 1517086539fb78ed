"""The CUDA paths, checked against the CPU (skipped where no GPU is present, as in CI).

Every registered model must give on the GPU what it gives on the CPU (TF32 off,
so both are IEEE float32), keep bags apart in a packed batch there too (the
CUDA segment sums use a sparse product, the CPU ones ``index_add_``), and train
under bf16 autocast with finite float32 gradients. A short ``mil train`` runs
end to end on the GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_models_uniform import IN_DIM, assert_close, bag_rows, build, make_bags

from mil.data.batch import collate_bags
from mil.models import available
from mil.train.loop import forward_bags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", available())
def test_cuda_matches_cpu(name):
    model = build(name)
    batch = collate_bags(make_bags(model))
    with torch.no_grad():
        ref = model(batch)
        out = model.to(CUDA)(batch.to(CUDA))
    for i in range(len(batch.bag_ids)):
        want = bag_rows(ref, batch, i)
        got = {k: v.cpu() for k, v in bag_rows(out, batch, i).items()}
        assert_close(got, want, atol=1e-4)


@pytest.mark.parametrize("name", available())
def test_cuda_bag_alone_equals_packed(name):
    model = build(name).to(CUDA)
    bags = make_bags(model)
    packed = collate_bags(bags)
    with torch.no_grad():
        out = model(packed.to(CUDA))
        for i, bag in enumerate(bags):
            alone = collate_bags([bag])
            one = model(alone.to(CUDA))
            assert_close(bag_rows(one, alone, 0), bag_rows(out, packed, i), atol=1e-5)


@pytest.mark.parametrize("name", available())
def test_cuda_bf16_training_step(name):
    model = build(name).train().to(CUDA)
    bags = make_bags(model)
    targets = torch.tensor([0, 1, 1, 0])
    out = forward_bags(model, bags, 10_000, CUDA, targets=targets, precision="bf16")
    assert out.logits.dtype == torch.float32
    loss = F.cross_entropy(out.logits, targets.to(CUDA))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_cross_validation_end_to_end(tmp_path, small_cohort, precision):
    """``mil train`` on the GPU; the fold model loads on the CPU (a machine without a GPU)
    and predicts the saved test predictions again."""
    from mil import Run
    from mil.config import config_from_dict
    from mil.train.runner import run_cv

    small_cohort["train"].update(device="cuda", precision=precision)
    cfg = config_from_dict(small_cohort)
    run_dir = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    run = Run(run_dir)
    saved = pd.read_csv(run_dir / "fold_0" / "predictions.csv")
    again = run.predict(saved["bag_id"].tolist(), folds=[0], device="cpu")
    cols = ["prob_negative", "prob_positive"]
    # the CPU replays the GPU's forward: equal up to float32 (bf16: up to bfloat16) rounding
    atol = 1e-4 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(again[cols].to_numpy(), saved[cols].to_numpy(), atol=atol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_streamed_chunks_equal_resident(precision):
    """Host bags in float16, staged chunk by chunk (pinned, copied on the side stream, cast on
    the device: mil.data.staging) give what the same bags resident on the device give."""
    from mil.data.batch import Bag
    from mil.data.staging import CudaCopies, Stager

    model = build("abmil_additive").to(CUDA)
    gen = torch.Generator().manual_seed(0)
    host = [
        Bag(f"b{i}", torch.randn(n, IN_DIM, generator=gen).half())
        for i, n in enumerate([300, 20, 700, 90])
    ]
    resident = [Bag(b.bag_id, b.x.to(CUDA)) for b in host]
    with torch.no_grad():
        streamed = forward_bags(model, host, 256, CUDA, keep_scores=True, precision=precision)
        ref = forward_bags(model, resident, 256, CUDA, keep_scores=True, precision=precision)
    torch.cuda.synchronize()
    assert torch.equal(streamed.logits, ref.logits)
    for a, b in zip(streamed.scores, ref.scores):
        assert torch.equal(a, b)
    stager = Stager(CUDA, torch.float32)
    assert isinstance(stager.copies, CudaCopies)
    batch = stager.ready(stager.stage(host[:2]))
    assert batch.x.is_cuda and batch.x.dtype == torch.float32
    assert torch.equal(batch.x.cpu(), torch.cat([b.x for b in host[:2]]).float())
