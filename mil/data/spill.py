"""Tensors computed once and kept on disk: written to an unlinked temporary file, read back
as memory-mapped views (the OS page cache keeps the hot ones in memory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


class SpillFile:
    """Key -> tensor, each written once and mapped back on every :meth:`get` (no copy).

    The file has no name (``tempfile.TemporaryFile``): it goes away with the object or the
    process, whatever ends it. ``folder``: where it lives (None: the system's temporary
    folder, ``TMPDIR``).
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)
        self._where: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._end = 0
        self._map = np.empty(0, np.uint8)  # the file as mapped (remapped when it has grown)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def nbytes(self) -> int:
        return self._end

    def put(self, key: str, t: torch.Tensor) -> None:
        a = t.detach().cpu().contiguous().numpy()
        self._file.seek(self._end)
        self._file.write(a.tobytes())
        self._file.flush()  # visible to the maps of get()
        self._where[key] = (self._end, a.dtype, tuple(a.shape))
        self._end += a.nbytes

    def get(self, key: str) -> torch.Tensor:
        offset, dtype, shape = self._where[key]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if offset + size > len(self._map):  # written since the file was last mapped: map it all
            # copy-on-write: writable views (torch warns on read-only arrays); writes stay private
            self._map = np.memmap(self._file, np.uint8, "c", shape=(self._end,))
        raw = self._map[offset : offset + size]
        return torch.from_numpy(raw.view(dtype).reshape(shape))
