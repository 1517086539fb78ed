"""Reading ahead (``data.prefetch``): the same bags in the same order as inline reads, errors
where their batch comes, no read left running, and a run identical to the synchronous one."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.data.prefetch import read_ahead
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def test_reads_in_order_one_at_a_time_ahead_of_the_consumer():
    log, seen = [], []
    second_ahead = threading.Event()  # set by the read of item 2

    def read(i):
        log.append((i, threading.current_thread().name))
        if i == 2:
            second_ahead.set()
        return i * i

    ahead = None
    for item, value in read_ahead(read, list(range(7)), depth=2):
        if item == 0:  # while item 0 is in use, items 1 and 2 are read behind it
            ahead = second_ahead.wait(5)
        seen.append((item, value))
    assert ahead is True
    assert seen == [(i, i * i) for i in range(7)]
    assert [i for i, _ in log] == list(range(7))  # in order, one at a time
    assert all(name.startswith("mil-read-ahead") for _, name in log)
    assert list(read_ahead(lambda i: i * i, list(range(7)), depth=0)) == seen
    second_ahead.clear()
    for item, _ in read_ahead(read, list(range(3)), depth=0):
        if item == 0:  # inline: nothing is read before its item comes
            assert not second_ahead.is_set()


def test_an_error_is_raised_at_its_item_and_an_early_exit_leaves_no_thread():
    def read(i):
        if i == 3:
            raise ValueError("bad bag 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad bag 3"):
        for item, _ in read_ahead(read, list(range(6)), depth=2):
            got.append(item)
    assert got == [0, 1, 2]
    calls = []
    gate = threading.Event()

    def slow(i):
        calls.append(i)
        gate.wait(5)
        return i

    it = read_ahead(slow, list(range(50)), depth=3)
    next_item = threading.Timer(0.05, gate.set)
    next_item.start()
    assert next(it) == (0, 0)
    it.close()  # waits for the read in flight, cancels the rest
    assert len(calls) <= 5
    assert not [t for t in threading.enumerate() if t.name.startswith("mil-read-ahead")]


def test_a_run_reading_ahead_equals_the_synchronous_run(tmp_path, small_cohort):
    """Reads ahead or inline (data.prefetch 2 / 0), with instance subsampling (its random draws
    stay on the training thread, in order): the same losses and predictions, bit for bit."""
    out = {}
    for depth in (0, 2):
        raw = {
            **small_cohort,
            "data": {**small_cohort["data"], "prefetch": depth},
            "train": {**small_cohort["train"], "subsample": 30, "faithfulness": False},
        }
        run = run_cv(
            config_from_dict(raw),
            tmp_path / str(depth),
            folds=[1],
            progress=False,
            log=lambda *a: None,
            n_boot=10,
        )
        out[depth] = (
            pd.read_csv(run / "fold_1" / "predictions.csv"),
            pd.read_csv(run / "fold_1" / "history.csv"),
        )
    pd.testing.assert_frame_equal(out[0][0], out[2][0])
    assert out[0][1]["train_loss"].tolist() == out[2][1]["train_loss"].tolist()


def test_threads_default_to_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """train.threads null: torch's count capped by the affinity mask and the cgroup quota."""
    import os

    import torch

    from mil.train import distributed
    from mil.train.runner import torch_threads

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(distributed, "CPU_MAX", quota)
    quota.write_text("max 100000\n")
    assert distributed.usable_cores() == affinity
    quota.write_text("50000 100000\n")  # half a core: one thread
    assert distributed.usable_cores() == 1
    quota.write_text(f"{100000 * affinity + 1} 100000\n")  # a quota above the mask: the mask
    assert distributed.usable_cores() == affinity
    before = torch.get_num_threads()
    torch.set_num_threads(affinity + 3)
    try:
        quota.write_text("150000 100000\n")  # 1.5 cores: two threads, where the mask allows
        with torch_threads(None):
            assert torch.get_num_threads() == min(2, affinity)
        assert torch.get_num_threads() == affinity + 3
    finally:
        torch.set_num_threads(before)


def test_a_planned_epoch_reads_each_uncached_slide_once(tmp_path):
    """A cache of 3 slides, an epoch over 7: with the epoch's plan the 3 cached slides are
    kept until read, so only the 4 others are read (by hand: the fewest possible); without a
    plan least-recently-used eviction drops each cached slide just before its turn: 7 reads.
    The features served are the files' either way."""
    import numpy as np

    from mil.data.dataset import FeatureStore

    for s in "abcdefg":
        np.save(tmp_path / f"{s}.npy", np.full((10, 4), ord(s), dtype=np.float32))
    order = list("daebfcg")
    for planned, expected in ((True, 4), (False, 7)):
        store = FeatureStore.from_dir(tmp_path, budget_gb=3 * 10 * 4 * 4 / 2**30)
        store.preload(list("abc"), progress=False)
        assert list(store._cache) == list("abc")
        reads = []
        read = store.read
        store.read = lambda s, read=read, log=reads: log.append(s) or read(s)
        if planned:
            store.plan(order)
        for s in order:
            assert float(store.get(s)[0][0, 0]) == ord(s)
        assert len(reads) == expected
        assert reads == (list("defg") if planned else order)


def test_a_run_resumes_with_another_read_ahead_or_store_folder(tmp_path, small_cohort):
    """data.prefetch and data.store_dir change no prediction: a run folder accepts a config
    that differs in them; data.store (float32 sources are rounded in the packed store) does not."""
    from mil.errors import ConfigError
    from mil.train.runner import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(config_from_dict(small_cohort), run)
    again = {**small_cohort, "data": {**small_cohort["data"], "prefetch": 0, "store_dir": "s"}}
    prepare_run_dir(config_from_dict(again), run)
    packed = {**small_cohort, "data": {**small_cohort["data"], "store": "packed"}}
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(config_from_dict(packed), run)
