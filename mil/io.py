"""Result files: atomic writes (temporary name, then rename), strict JSON, safe file names;
``.pt`` files loaded with tensors only.

Temporary files are named ``.<name>.<host>-<pid>.<random>.tmp`` next to their
target, so that :func:`remove_orphan_temps` can tell a file left by a killed
process from one that a live process (another fold job) is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mil.errors import ConfigError, DataError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once: os.umask can only be read by setting it, which is not thread-safe mid-run
_FILE_MODE = 0o666 & ~_current_umask()
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)\.[^.]+\.tmp$")
# a temporary file of another machine (shared folder) is an orphan once this old
ORPHAN_AGE_S = 24 * 3600


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    An interrupted write leaves the old file (or none) in place, never half a
    file; the content is flushed to disk (``fsync``) before the rename. The
    result gets the permissions of a plain ``open()`` under the user's umask
    (``mkstemp`` alone would make it private, 0600). A full disk is an
    ``OSError`` naming ``path``, whatever library was writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError:
            raise
        except Exception as exc:  # h5py reports a full disk as a RuntimeError
            if "No space left on device" in str(exc):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        os.chmod(tmp_path, _FILE_MODE)
        _fsync(tmp_path)  # the content is on disk before the name points to it
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync; the rename is still atomic
        pass
    finally:
        os.close(fd)


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files under ``folder`` that no running process will rename.

    A temporary file is an orphan when the process named in it is gone (same
    machine), or when it is older than :data:`ORPHAN_AGE_S` (another machine
    sharing the folder). Returns the files removed.
    """
    removed = []
    now = time.time()
    for p in Path(folder).rglob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m is None or not p.is_file():
            continue
        try:
            stale = now - p.stat().st_mtime > ORPHAN_AGE_S
            if (m["host"] == _HOST and not _pid_alive(int(m["pid"]))) or stale:
                p.unlink()
                removed.append(p)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if absent) for the block.

    ``flock`` on the folder itself, so a locked folder gains no lock file (a
    finished run stays untouched, even read-only). Where the file system has
    no such locks (some network mounts), the block runs unlocked.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        try:
            import fcntl

            fd = os.open(folder, os.O_RDONLY)
        except (ImportError, OSError):
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
            yield
        finally:
            os.close(fd)  # releases the lock
    except BaseException:
        if created:  # a run that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_text(path: str | os.PathLike, text: str, unless_same: bool = False) -> bool:
    """Write ``text`` atomically; with ``unless_same``, leave a file that already holds it.

    Returns whether the file was written.
    """
    path = Path(path)
    if unless_same and path.is_file():
        try:
            if path.read_text() == text:
                return False
        except (OSError, UnicodeDecodeError):
            pass
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON null), recursively.

    Python's ``json`` writes NaN as a bare ``NaN``, which strict parsers
    (JavaScript's ``JSON.parse``, jq, most JSON libraries) reject.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    import numpy as np

    if isinstance(obj, np.generic):
        return strict_json(obj.item())
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN and infinity written as null), atomically."""
    text = json.dumps(
        strict_json(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False
    )
    write_text(path, text + "\n")


def json_float(value: Any) -> float:
    """A number read back from a file :func:`write_json` wrote: null (and absent) is NaN."""
    return float("nan") if value is None else float(value)


def read_json(path: str | os.PathLike, what: str = "file", fix: str = "") -> Any:
    """Parse a JSON file a run wrote; a missing, unreadable or damaged file is a
    :class:`DataError` naming it (``what`` says what it is, ``fix`` what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else f"damaged ({exc})"
        raise DataError(
            f"{path}: cannot read this {what}: {reason}{'; ' + fix if fix else ''}"
        ) from None


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only. A file
    that holds other Python objects (unpickling them could run code) is a :class:`DataError`
    saying so, without torch's advice to load it with ``weights_only=False``; other failures
    (a damaged file) are torch's own exceptions, for the caller to name."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc):
            raise
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        raise DataError(
            f"{path}: cannot read it: it holds Python objects other than tensors"
            f"{f' ({found.group(1)})' if found else ''}; mil loads .pt files with tensors and "
            f"plain values only and refuses the rest, for safety (unpickling them could run code). "
            f"If you made this file, save tensors only (a tensor, or a dict of tensors)"
        ) from None


def write_csv(
    path: str | os.PathLike, df: pd.DataFrame, index: bool = False, unless_same: bool = False
) -> bool:
    """Write ``df`` as CSV atomically (see :func:`write_text` for ``unless_same``)."""
    if unless_same:
        return write_text(path, df.to_csv(index=index), unless_same=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index)
    return True


def safe_filename(name: str, max_len: int = 100) -> str:
    """A file name made from an id (slide, bag, patient) that stays in its folder.

    Path separators, control characters and characters that are unsafe on
    common file systems become ``_``; leading dots are dropped, so the name
    can be neither ``..`` nor hidden. An id that needed any change, or is
    longer than ``max_len``, gets a short hash of the original appended, so
    two ids never share a file. Plain ids (letters, digits, ``-_.``, spaces)
    are kept as they are.
    """
    text = unicodedata.normalize("NFC", str(name))
    clean = "".join(
        "_" if (c in '/\\:*?"<>|' or unicodedata.category(c)[0] == "C") else c for c in text
    )
    clean = clean.lstrip(". ").rstrip(" ")
    changed = clean != str(name) or len(clean) > max_len or not clean
    if changed:
        digest = hashlib.sha1(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        clean = f"{clean[:max_len]}-{digest}" if clean else digest
    return clean


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The top-level mapping of a YAML file (``yaml.safe_load``); a missing, unreadable or
    invalid file is a :class:`ConfigError` naming it (and the line, for a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the {what} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ConfigError(
            f"{path}: not valid YAML{where}: {problem}" + (f" ({context})" if context else "")
        ) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, found {type(raw).__name__}"
        )
    return raw
