"""The benchmarks' jobs: in spawned worker processes, or in this process for one job at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def run_jobs(fn: Callable, jobs: int, *iterables: Iterable) -> Iterator:
    """``map(fn, *iterables)`` over ``jobs`` spawned processes (fresh interpreters: no torch
    thread pool inherited through a fork), results in order as they come; ``jobs <= 1`` runs
    them here, one after another (the smoke runs of ``tests/test_benchmarks.py``)."""
    if jobs <= 1:
        yield from map(fn, *iterables)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, *iterables)
