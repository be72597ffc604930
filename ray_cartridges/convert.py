"""Seed JSONL (OpenAI-style logprobs) -> flat top-k parquet.

Per assistant token the teacher's top entries are kept, in decreasing probability, until their mass reaches
``min_prob_mass`` or ``top_k`` entries are kept. Token ids come from the data (``token_id`` fields or the
message's ``token_ids``); a token *string* is accepted only where it maps to exactly one id: vLLM's
``token_id:N`` form or an exact vocabulary entry. Anything else rejects the row, never a guess.

The student's conversation is the record's messages without system messages (those carry the teacher's
memory), plus ``student_system_prompt`` when one is set, tokenized with the model's chat template. The
teacher's answer tokens must equal the template's assistant span token for token: a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .chat import chat_template_ids
from .flat_topk import clean_logprob

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A record that cannot be converted; the message names file, line, message and token position."""


@dataclass
class ConversionStats:
    rows: int = 0
    rejected: int = 0
    positions: int = 0
    entries: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        mean_k = self.entries / max(1, self.positions)
        return (
            f"{self.rows} rows converted, {self.rejected} rejected; {self.positions} supervised tokens, "
            f"{mean_k:.2f} kept entries per token"
        )


def row_id_of(record: dict) -> str:
    canon = json.dumps({"messages": record.get("messages"), "metadata": record.get("metadata")}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:24]


_VOCABS: dict[int, tuple[weakref.ref, dict[str, int]]] = {}


def _vocab(tokenizer) -> dict[str, int]:
    """The tokenizer's vocabulary, built once per tokenizer object (``get_vocab`` builds a new dict of the whole
    vocabulary on every call: ~50 ms for a 49k vocabulary, which was most of a record's conversion)."""
    hit = _VOCABS.get(id(tokenizer))
    if hit is None or hit[0]() is not tokenizer:
        try:
            hit = (weakref.ref(tokenizer), tokenizer.get_vocab())
        except TypeError:  # an object without weak references: not cached
            return tokenizer.get_vocab()
        _VOCABS[id(tokenizer)] = hit
    return hit[1]


def _token_id(entry: dict, tokenizer, where: str) -> int:
    """An entry's token id: its ``token_id``, a ``token_id:N`` token, or an exact vocabulary entry (the
    vocabulary is read only for entries that carry no id); an id outside the tokenizer's vocabulary is an error."""
    tid = entry.get("token_id") if isinstance(entry.get("token_id"), int) else None
    tok = entry.get("token")
    if tid is None and isinstance(tok, str):
        if tok.startswith("token_id:"):
            try:
                tid = int(tok.split(":", 1)[1])
            except ValueError:
                pass
        elif tok in (vocab := _vocab(tokenizer)):
            tid = vocab[tok]
    if tid is None:
        raise ConversionError(
            f"{where}: token {tok!r} has no token id and does not map to exactly one vocabulary entry"
        )
    if not 0 <= tid < len(tokenizer):
        raise ConversionError(f"{where}: token id {tid} is outside the vocabulary [0, {len(tokenizer)})")
    return tid


def _logprob(value, where: str) -> float:
    try:
        return clean_logprob(value, where)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _logprob_entries(logprobs, where: str) -> list[dict]:
    content = logprobs.get("content") if isinstance(logprobs, dict) else logprobs
    if not isinstance(content, list):
        raise ConversionError(
            f"{where}: logprobs must be a list or {{'content': [...]}}, got {type(logprobs).__name__}"
        )
    return content


def keep_top(entries: list[tuple[int, float]], min_prob_mass: float, top_k: int) -> list[tuple[int, float]]:
    """Entries sorted by decreasing logprob, cut once the kept mass reaches min_prob_mass or top_k are kept."""
    out, mass = [], 0.0
    for tid, lp in sorted(entries, key=lambda e: -e[1]):
        out.append((tid, lp))
        mass += math.exp(lp)
        if mass >= min_prob_mass or len(out) >= top_k:
            break
    return out


def student_messages(messages: list[dict], student_system_prompt: str | None) -> list[dict]:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    if student_system_prompt:
        msgs.insert(0, {"role": "system", "content": student_system_prompt})
    return msgs


def _answer_span(tokenizer, canon: list[int], start: int, teacher: list[int], where: str) -> int:
    """How many of the template's tokens from ``start`` on spell the teacher's answer ``teacher``.

    Mostly the template re-tokenizes the answer into the teacher's own ids. Where the teacher produced another
    segmentation of the same text ("\n" + "\n" for "\n\n", " mag" + "ma" for " magma"), the template's ids
    are replaced by the teacher's, whose logprobs these are. Any other difference is an error, never a shift."""
    span = canon[start : start + len(teacher)]
    if span == teacher:
        return len(teacher)
    text = tokenizer.decode(teacher)
    for m in range(1, len(canon) - start + 1):
        got = tokenizer.decode(canon[start : start + m])
        if got == text:
            return m
        if len(got) > len(text):
            break
    for j, (a, b) in enumerate(zip(teacher, span)):
        if a != b:
            raise ConversionError(
                f"{where}: token position {j}: teacher token id {a} ({tokenizer.decode([a])!r}) != chat-template "
                f"token id {b} ({tokenizer.decode([b])!r}); the answer does not align with the template"
            )
    raise ConversionError(f"{where}: teacher has {len(teacher)} tokens, template span only {len(span)}")


def convert_record(
    record: dict,
    tokenizer,
    *,
    min_prob_mass: float = 0.99,
    top_k: int = 20,
    student_system_prompt: str | None = None,
    where: str = "record",
) -> dict:
    """One seed-format record -> one flat top-k row (see :mod:`ray_cartridges.flat_topk`)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversionError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConversionError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    kept_src = [m for m in messages if m["role"] != "system"]
    msgs = student_messages(messages, student_system_prompt)
    offset = len(msgs) - len(kept_src)
    canon = chat_template_ids(tokenizer, msgs, add_generation_prompt=False)
    full, shift = list(canon), 0  # the student's ids: the template's, each answer as the teacher's tokens
    pos, ids, lps = [], [], []
    for i, src in enumerate(kept_src):
        if src["role"] != "assistant" or not src.get("logprobs"):
            continue
        mw = f"{where}: messages (non-system) [{i}]"
        entries = _logprob_entries(src["logprobs"], mw)
        msg_ids = src.get("token_ids")
        teacher = []
        for j, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("logprob"), (int, float)):
                raise ConversionError(f"{mw}: token position {j}: entry needs a numeric 'logprob'")
            if "token_id" not in e and isinstance(msg_ids, list) and j < len(msg_ids):
                e = {**e, "token_id": msg_ids[j]}
            teacher.append(_token_id(e, tokenizer, f"{mw}: token position {j}"))
        prefix = chat_template_ids(tokenizer, msgs[: i + offset], add_generation_prompt=True)
        if canon[: len(prefix)] != prefix:
            raise ConversionError(f"{mw}: the chat template's prompt is not a prefix of the whole conversation")
        m = _answer_span(tokenizer, canon, len(prefix), teacher, mw)
        # the student reads the teacher's own tokens: the template's tokens of the same text are replaced
        start = len(prefix) + shift
        full[start : start + m] = teacher
        shift += len(teacher) - m
        for j, e in enumerate(entries):
            top = e.get("top_logprobs") or []
            cand = []
            for r, t in enumerate(top):
                if not isinstance(t, dict) or not isinstance(t.get("logprob"), (int, float)):
                    raise ConversionError(f"{mw}: token position {j}: top_logprobs[{r}] needs a numeric 'logprob'")
                here = f"{mw}: token position {j}: top_logprobs[{r}]"
                cand.append((_token_id(t, tokenizer, here), _logprob(t["logprob"], here)))
            if not cand:  # no alternatives recorded: the sampled token alone
                cand = [(teacher[j], _logprob(e["logprob"], f"{mw}: token position {j}"))]
            for tid, lp in keep_top(cand, min_prob_mass, top_k):
                pos.append(start + j)
                ids.append(tid)
                lps.append(lp)
    if not pos:
        raise ConversionError(f"{where}: no assistant message with logprobs")
    meta = record.get("metadata") or {}
    return {
        "row_id": row_id_of(record),
        "input_ids": full,
        "topk_pos": pos,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "num_positions": len(set(pos)),
        "split_key": str(meta.get("split_key") or meta.get("memory_entry") or row_id_of(record)),
        "metadata": json.dumps(meta, sort_keys=True),
    }


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error or None) for each non-empty line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, None, f"{path}:{n}: not valid JSON ({err.msg})"
                continue
            if not isinstance(rec, dict):
                yield n, None, f"{path}:{n}: a record must be a JSON object"
                continue
            yield n, rec, None


def convert_jsonl(input_path: str | Path, output_path: str | Path, tokenizer, **kw) -> ConversionStats:
    """Convert a JSONL file of teacher records (any kind ``record_formats`` reads) into one flat top-k parquet
    file (written atomically); ``kw`` as :func:`convert_stream`'s."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    items = ((f"{input_path}:{n}", rec, err) for n, rec, err in iter_jsonl(input_path))
    return convert_stream(items, input_path, output_path, tokenizer, **kw)


def convert_their_parquet(input_path: str | Path, output_path: str | Path, tokenizer, **kw) -> ConversionStats:
    """The Cartridges trainer's parquet (see ``record_formats``) into our flat top-k parquet."""
    import pyarrow.parquet as pq

    from .record_formats import RecordFormatError, from_their_parquet_row

    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")

    def items():
        for i, row in enumerate(pq.read_table(input_path).to_pylist()):
            where = f"{input_path}: row {i}"
            try:
                yield where, from_their_parquet_row(row, tokenizer, where), None
            except (RecordFormatError, KeyError, TypeError) as err:
                yield where, None, f"{where}: {err}" if isinstance(err, (KeyError, TypeError)) else str(err)

    return convert_stream(items(), input_path, output_path, tokenizer, **kw)


def convert_stream(
    items,
    source: Path,
    output_path: str | Path,
    tokenizer,
    *,
    min_prob_mass: float = 0.99,
    top_k: int = 20,
    student_system_prompt: str | None = None,
    strict: bool = False,
    progress: bool = True,
) -> ConversionStats:
    """(where, record or None, error or None) items -> one flat top-k parquet file; bad rows are skipped and
    counted (``strict``: the first one stops it, and nothing is written)."""
    from tqdm.auto import tqdm

    from .flat_topk import FlatTopkWriter
    from .record_formats import RecordFormatError, normalise

    stats = ConversionStats()
    with FlatTopkWriter(output_path) as w:
        for where, rec, err in tqdm(items, desc="convert", unit="row", disable=not progress):
            try:
                if err:
                    raise ConversionError(err)
                row = convert_record(
                    normalise(rec, where),
                    tokenizer,
                    min_prob_mass=min_prob_mass,
                    top_k=top_k,
                    student_system_prompt=student_system_prompt,
                    where=where,
                )
            except (ConversionError, RecordFormatError) as e:
                if strict:
                    raise ConversionError(str(e)) from None
                stats.rejected += 1
                stats.errors.append(str(e))
                logger.warning("rejected %s", e)
                continue
            w.write(row)
            stats.rows += 1
            stats.positions += row["num_positions"]
            stats.entries += len(row["topk_ids"])
    if stats.rows == 0:
        Path(output_path).unlink(missing_ok=True)
        first = stats.errors[0] if stats.errors else "the file is empty"
        raise ConversionError(f"{source}: no row could be converted; first error: {first}")
    return stats
