"""Reading ahead: the bags of the next loss batches read (and preprocessed) on a background
thread while the current one trains, in the same order, with the same results."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(read: Callable[[T], R], items: Sequence[T], depth: int) -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` for each of ``items`` in order, each read up to ``depth`` items
    ahead of the one being consumed, on one background thread (so reads happen in order, one
    at a time, as they would inline). ``depth`` 0: every read inline, when its item comes.

    An exception raised by ``read`` is raised here, when its item is reached. Closing the
    iterator early (``break``, an error in the consumer) cancels the reads not started and
    waits for the one in flight, so that no read runs on after it.
    """
    if depth <= 0:
        for item in items:
            yield item, read(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mil-read-ahead")
    pending: deque = deque()
    try:
        upcoming = iter(items)
        for item in upcoming:
            pending.append((item, pool.submit(read, item)))
            if len(pending) > depth:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
