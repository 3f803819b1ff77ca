"""Paths and atomic writes for every file the project writes, local or remote (``gs://``).

One rule for all outputs (adapters, configs, merged models, results, metrics, plots): a
reader never sees a half-written file. Locally a file is written to a temporary name in the
same directory, flushed to disk and renamed over the target (``os.replace`` is atomic on
POSIX). Remote paths go through :mod:`etils.epath` (the library orbax uses, so ``gs://``
works wherever orbax's checkpoints do); object stores publish an object only when its upload
completes, which gives the same guarantee.

Paths are never passed through :class:`pathlib.Path`, which collapses ``gs://bucket`` into
``gs:/bucket``. :func:`as_path` returns an ``epath.Path`` that keeps the scheme.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> atomic_write_text(os.path.join(d, "a.json"), '{"x": 1}')
>>> read_text(os.path.join(d, "a.json"))
'{"x": 1}'
>>> str(as_path("gs://bucket/run") / "metrics.jsonl")
'gs://bucket/run/metrics.jsonl'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(path: PathLike) -> bool:
    """True for a path with a URL scheme (``gs://``, ``s3://``, ...), False for a local path."""
    return "://" in os.fspath(path) if not isinstance(path, epath.Path) else "://" in str(path)


def as_path(path: PathLike) -> epath.Path:
    """An ``epath.Path`` for a local or remote path (``gs://x/y`` keeps its double slash)."""
    return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def path_str(path: PathLike) -> str:
    """The path as a string, scheme intact (for orbax and log lines)."""
    return str(as_path(path))


def join(path: PathLike, *parts: str) -> str:
    """``path/part/...`` as a string, scheme intact."""
    p = as_path(path)
    for part in parts:
        p = p / part
    return str(p)


def makedirs(path: PathLike) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces ``path`` only if the ``with`` block succeeds.

    Locally the data goes to a temporary file in the target's directory, which is flushed,
    fsynced and renamed over ``path`` on success and deleted on any error (or interrupt), so
    ``path`` holds the old content or the new, never a part. The parent directory is created
    if missing.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "w.bin")
    >>> with atomic_open(p) as f:
    ...     _ = f.write(b"abc")
    >>> read_bytes(p)
    b'abc'
    """
    if is_remote(path):
        p = as_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as f:  # an object store publishes the object only once the upload completes
            yield f
        return
    target = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(target) + ".", dir=parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode open() would give a new file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(parent)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The parent directory is created if missing.
    """
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: PathLike, what: str = "JSON file") -> dict:
    """Parse ``path`` as a JSON object (dict); any other content is a one-line ``ValueError``
    naming the file (``what`` says what the file should be, e.g. "safetensors index").

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "c.json")
    >>> atomic_write_text(p, "[1, 2]")
    >>> read_json_object(p, "adapter config")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../c.json: adapter config must be a JSON object, got a list
    """
    import json

    try:
        text = read_text(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path_str(path)}: {what} is not UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path_str(path)}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path_str(path)}: {what} must be a JSON object, got {_json_kind(value)}")
    return value


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
