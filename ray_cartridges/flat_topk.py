"""FlatTopLogprobs: the one on-disk schema of tokenized teacher data (parquet), with its reader and writer.

One row per conversation:

- ``row_id``: content hash of the source conversation (stable across runs; used to resume without duplicates)
- ``input_ids``: the student's whole conversation, tokenized with the model's chat template
- ``topk_pos``: per kept teacher entry, the position t in ``input_ids`` of the token it is a distribution over
  (the student predicts it from its logits at t - 1)
- ``topk_ids`` / ``topk_logprobs``: the teacher's token id and logprob of that entry
- ``num_positions``: how many distinct positions are supervised (the "shape" of the flat arrays)
- ``split_key``: what the train/eval split groups by (e.g. the memory entry a prompt came from)
- ``metadata``: JSON string (checkpoint, strategy, teacher model, ...)

Entries of one position are contiguous and sorted by decreasing logprob.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .fsutil import temp_path

SCHEMA_VERSION = "1"
SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_pos", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),
        pa.field("split_key", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ],
    metadata={"ray_cartridges.flat_topk.version": SCHEMA_VERSION},
)
COLUMNS = SCHEMA.names


class FlatTopkError(ValueError):
    """A parquet file that is not valid flat top-k data."""


# a logprob this far above 0 is rounding (vLLM's and torch's log-softmax give up to ~1e-6) and is clamped to 0;
# anything larger, or not finite, is not a logprob
LOGPROB_TOLERANCE = 1e-3


def clean_logprob(value, where: str) -> float:
    """``value`` as a logprob <= 0, or a ValueError naming ``where`` and the value."""
    lp = float(value)
    if not np.isfinite(lp):
        raise ValueError(f"{where}: logprob {lp} is not finite")
    if lp > LOGPROB_TOLERANCE:
        raise ValueError(f"{where}: logprob {lp} > 0 (more than the rounding tolerance {LOGPROB_TOLERANCE})")
    return min(lp, 0.0)


def validate_row(row: dict, vocab_size: int | None = None, where: str = "row") -> None:
    """Check one row's invariants; raise :class:`FlatTopkError` naming the field and the value."""
    n = len(row["input_ids"])
    pos = np.asarray(row["topk_pos"])
    ids = np.asarray(row["topk_ids"])
    lps = np.asarray(row["topk_logprobs"])
    if not (len(pos) == len(ids) == len(lps)):
        raise FlatTopkError(
            f"{where}: topk_pos/topk_ids/topk_logprobs lengths differ ({len(pos)}, {len(ids)}, {len(lps)})"
        )
    if len(pos) and (pos.min() < 1 or pos.max() >= n):
        raise FlatTopkError(f"{where}: topk_pos out of range [1, {n}): min {pos.min()}, max {pos.max()}")
    if len(pos) and np.any(np.diff(pos) < 0):
        raise FlatTopkError(f"{where}: topk_pos is not grouped by position")
    bad = np.flatnonzero(~np.isfinite(lps) | (lps > LOGPROB_TOLERANCE))
    if len(bad):
        i = bad[0]
        raise FlatTopkError(
            f"{where}: topk_logprobs[{i}] = {lps[i]} at token position {pos[i]} (must be finite and <= 0)"
        )
    if vocab_size is not None and len(ids):
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if len(bad):
            i = bad[0]
            raise FlatTopkError(
                f"{where}: topk_ids[{i}] = {ids[i]} at token position {pos[i]} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    unsorted = np.flatnonzero((np.diff(pos) == 0) & (np.diff(lps) > 1e-6))
    if len(unsorted):
        i = unsorted[0] + 1
        raise FlatTopkError(f"{where}: topk_logprobs of token position {pos[i]} are not sorted (entry {i})")
    if int(row["num_positions"]) != len(np.unique(pos)):
        raise FlatTopkError(
            f"{where}: num_positions={row['num_positions']} but {len(np.unique(pos))} distinct positions"
        )


class FlatTopkWriter:
    """Streamed parquet writer; the file appears under its final name only on :meth:`close` (atomic)."""

    def __init__(self, path: str | Path, row_group_size: int = 256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        self._buf: list[dict] = []
        self.row_group_size = row_group_size
        self.rows = 0

    def write(self, row: dict) -> None:
        validate_row(row, where=f"{self.path}: row {self.rows + len(self._buf)} (row_id {row.get('row_id')})")
        self._buf.append(row)
        if len(self._buf) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(rows_to_table(self._buf))
            self.rows += len(self._buf)
            self._buf = []

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows], schema=SCHEMA)


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files of a file or directory (hidden/temporary files are never read)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return files
        raise FlatTopkError(f"{path}: directory holds no .parquet files")
    raise FlatTopkError(f"{path}: no such file or directory")


def check_schema(schema: pa.Schema, source: str) -> None:
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise FlatTopkError(f"{source}: not flat top-k data, missing columns {missing} (has {schema.names})")
    for c in COLUMNS:
        if not schema.field(c).type.equals(SCHEMA.field(c).type):
            raise FlatTopkError(
                f"{source}: column {c!r} has type {schema.field(c).type}, expected {SCHEMA.field(c).type}"
            )


def read_flat_topk(path: str | Path) -> pa.Table:
    """Read a flat top-k file or directory of shards into one table (schema checked)."""
    tables = []
    for f in parquet_files(path):
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise FlatTopkError(f"{f}: cannot read parquet ({err})") from None
        check_schema(t.schema, str(f))
        tables.append(t.select(COLUMNS).cast(SCHEMA))
    return pa.concat_tables(tables)


def iter_rows(path: str | Path) -> Iterator[dict]:
    for f in parquet_files(path):
        pf = pq.ParquetFile(f)
        check_schema(pf.schema_arrow, str(f))
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=COLUMNS).to_pylist()


def write_flat_topk(rows: Iterable[dict], path: str | Path, row_group_size: int = 256) -> int:
    with FlatTopkWriter(path, row_group_size) as w:
        for r in rows:
            w.write(r)
    return w.rows
