"""Teacher data in the research workflow's formats, read into the seed record that ``convert_record`` takes.

- ``messages`` records (its earlier ``data_generation.py``, and ours): taken as they are.
- top-k records (its later ``data_generation.py``): ``teacher_messages``, ``input_messages``,
  ``output_message``, ``output_ids`` [T], ``topk_logprobs`` [T][K], ``topk_token_ids`` [T][K], ``sample_id``.
- its Cartridges-trainer parquet (``convert_to_cartridges.py``): ``messages`` as a list of
  ``{content, role, token_ids, top_logprobs: {token_idx, token_id, logprobs, shape}}``, ``system_prompt``,
  ``metadata``, ``type``. Its converter mapped top-k token strings back with ``encode(token)[0]``, which gets
  many ids wrong: ids are taken from the file as they are, and a file whose answer ids do not spell its
  answer text is reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TOPK_FIELDS = ("input_messages", "output_message", "output_ids", "topk_logprobs", "topk_token_ids")
THEIR_PARQUET_COLUMNS = {"messages", "system_prompt"}


class RecordFormatError(ValueError):
    pass


def _entries(ids: list[int], top_ids: list[list[int]], top_lps: list[list[float]], where: str) -> list[dict]:
    """OpenAI-style per-token entries from parallel id / top-k arrays."""
    if not (len(ids) == len(top_ids) == len(top_lps)):
        raise RecordFormatError(
            f"{where}: output_ids ({len(ids)}), topk_token_ids ({len(top_ids)}) and topk_logprobs ({len(top_lps)}) "
            "must have one entry per answer token"
        )
    out = []
    for t, tid in enumerate(ids):
        if len(top_ids[t]) != len(top_lps[t]):
            raise RecordFormatError(
                f"{where}: token position {t}: {len(top_ids[t])} ids but {len(top_lps[t])} logprobs"
            )
        pairs = list(zip(top_ids[t], top_lps[t]))
        own = next((lp for i, lp in pairs if i == tid), min((lp for _, lp in pairs), default=0.0))
        out.append(
            {
                "token_id": int(tid),
                "logprob": own,
                "top_logprobs": [{"token_id": int(i), "logprob": lp} for i, lp in pairs],
            }
        )
    return out


def from_topk_record(rec: dict, where: str) -> dict:
    """A later-``data_generation.py`` record as a seed record (the teacher's system messages carry the memory)."""
    missing = [f for f in TOPK_FIELDS if f not in rec]
    if missing:
        raise RecordFormatError(f"{where}: top-k record without {missing}")
    inputs, answer = rec["input_messages"], rec["output_message"]
    if not isinstance(inputs, list) or not isinstance(answer, dict) or not isinstance(answer.get("content"), str):
        raise RecordFormatError(f"{where}: input_messages must be a list and output_message a message")
    ids = [int(x) for x in rec["output_ids"]]
    system = [m for m in rec.get("teacher_messages") or [] if isinstance(m, dict) and m.get("role") == "system"]
    msgs = system + [m for m in inputs if m.get("role") != "system"]
    msgs.append(
        {
            "role": "assistant",
            "content": answer["content"],
            "token_ids": ids,
            "logprobs": {"content": _entries(ids, rec["topk_token_ids"], rec["topk_logprobs"], where)},
        }
    )
    meta = {"sample_id": rec.get("sample_id"), "format": "topk"}
    if rec.get("sample_id") is not None:
        meta["split_key"] = str(rec["sample_id"])
    return {"messages": msgs, "metadata": meta}


def normalise(rec: dict, where: str) -> dict:
    """Any supported record kind as a seed record."""
    if "messages" in rec:
        return rec
    if "output_ids" in rec or "topk_token_ids" in rec:
        return from_topk_record(rec, where)
    raise RecordFormatError(f"{where}: neither a 'messages' record nor a top-k record (keys: {sorted(rec)[:8]})")


def from_their_parquet_row(row: dict, tokenizer, where: str) -> dict:
    """A Cartridges-trainer parquet row as a seed record; warns where an answer's ids do not spell its text."""
    msgs = []
    if row.get("system_prompt"):
        msgs.append({"role": "system", "content": row["system_prompt"]})
    for i, m in enumerate(row.get("messages") or []):
        msg = {"role": m["role"], "content": m["content"]}
        top = m.get("top_logprobs")
        if m["role"] == "assistant" and top and m.get("token_ids"):
            ids = list(m["token_ids"])
            per_pos: list[list[tuple[int, float]]] = [[] for _ in ids]
            for pos, tid, lp in zip(top["token_idx"], top["token_id"], top["logprobs"]):
                if not 0 <= pos < len(ids):
                    raise RecordFormatError(f"{where}: messages[{i}]: token_idx {pos} outside the answer ({len(ids)})")
                per_pos[pos].append((int(tid), float(lp)))
            if tokenizer.decode(ids, skip_special_tokens=True).strip() != m["content"].strip():
                logger.warning("%s: messages[%d]: its token ids do not spell its text; the ids are used", where, i)
            top_ids = [[t for t, _ in p] for p in per_pos]
            top_lps = [[lp for _, lp in p] for p in per_pos]
            msg.update(token_ids=ids, logprobs={"content": _entries(ids, top_ids, top_lps, f"{where}: messages[{i}]")})
        msgs.append(msg)
    meta = row.get("metadata")
    meta = json.loads(meta) if isinstance(meta, str) and meta.startswith("{") else (meta or {})
    return {"messages": msgs, "metadata": {**(meta if isinstance(meta, dict) else {}), "type": row.get("type")}}


def is_their_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception:
        return False
    return THEIR_PARQUET_COLUMNS <= names and "topk_ids" not in names
