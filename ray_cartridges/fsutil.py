"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_writer(path: str | Path):
    """A text file handle whose content appears at ``path`` only when the block ends without an error (written
    to a temporary file in the same directory, then renamed): a reader, or a re-run after a crash, sees the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
