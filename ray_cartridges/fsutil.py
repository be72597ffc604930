"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: Path) -> Path:
    """Where a file bound for ``path`` is written first: beside it (the rename stays on one file system),
    hidden, and per process (two writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path):
    """A temporary path to write a file at; the file appears at ``path`` only when the block ends without an
    error (then renamed): a reader, or a re-run after a crash, sees the old file or the new one, never half
    of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_writer(path: str | Path):
    """A text file handle whose content appears at ``path`` only when the block ends without an error (see
    :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yield fh


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_writer``)."""
    with atomic_writer(path) as fh:
        fh.write(text)


def file_hash(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (read in 1 MiB pieces)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def bundled_data(name: str) -> Path:
    """A text file shipped with the package (``ray_cartridges/data/``)."""
    return Path(__file__).resolve().parent / "data" / name
