import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_cartridges.convert import ConversionError, convert_jsonl, convert_record, keep_top
from ray_cartridges.flat_topk import FlatTopkError, FlatTopkWriter, read_flat_topk, validate_row


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keep_top_stops_at_mass_or_k():
    entries = [(1, math.log(0.5)), (2, math.log(0.3)), (3, math.log(0.15)), (4, math.log(0.05))]
    assert [t for t, _ in keep_top(entries, 0.79, 10)] == [1, 2]
    assert [t for t, _ in keep_top(entries, 0.99, 10)] == [1, 2, 3, 4]
    assert [t for t, _ in keep_top(entries, 0.99, 2)] == [1, 2]
    assert [t for t, _ in keep_top(list(reversed(entries)), 0.5, 10)] == [1]  # sorted first


def test_teacher_rows_align_with_the_chat_template(teacher_jsonl, tokenizer):
    recs = _records(teacher_jsonl)
    for n, rec in enumerate(recs[:12], 1):
        row = convert_record(rec, tokenizer, min_prob_mass=0.9, top_k=5, where=f"line {n}")
        validate_row(row, vocab_size=len(tokenizer))
        answer = rec["messages"][-1]["token_ids"]
        pos = np.asarray(row["topk_pos"])
        ids = np.asarray(row["topk_ids"])
        lps = np.asarray(row["topk_logprobs"])
        uniq = np.unique(pos)
        assert len(uniq) == len(answer) == row["num_positions"]
        # the supervised positions hold exactly the teacher's tokens, in order
        assert [row["input_ids"][p] for p in uniq] == answer
        # the student's conversation has no memory: the teacher's system prompt is gone
        text = tokenizer.decode(row["input_ids"])
        assert rec["system_prompt"][:60] not in text and rec["messages"][1]["content"] in text
        for p in uniq:
            sel = pos == p
            lp = lps[sel]
            assert np.all(np.diff(lp) <= 0) and np.all(lp <= 0)  # sorted, valid
            assert len(lp) == 5 or np.exp(lp).sum() >= 0.9  # cut by k or by mass
            assert np.exp(lp[:-1]).sum() < 0.9 or len(lp) == 1  # and not later than needed
            assert ids[sel][0] == row["input_ids"][p]  # greedy teacher: sampled token is the top-1


def test_token_strings_are_accepted_only_when_unambiguous(teacher_jsonl, tokenizer):
    rec = _records(teacher_jsonl)[0]
    ref = convert_record(rec, tokenizer)

    def strip_ids(r, fmt):
        r = copy.deepcopy(r)
        msg = r["messages"][-1]
        msg["token_ids"] = None
        for e in msg["logprobs"]["content"]:
            for x in [e] + e["top_logprobs"]:
                x["token"] = fmt(x)
                del x["token_id"]
        return r

    vllm_form = convert_record(strip_ids(rec, lambda x: f"token_id:{x['token_id']}"), tokenizer)
    vocab_form = convert_record(strip_ids(rec, lambda x: tokenizer.convert_ids_to_tokens(x["token_id"])), tokenizer)
    assert vllm_form["topk_ids"] == ref["topk_ids"] == vocab_form["topk_ids"]
    # decoded strings (" The" rather than the vocabulary entry "ĠThe") are not guessed
    decoded = strip_ids(rec, lambda x: tokenizer.decode([x["token_id"]]))
    with pytest.raises(ConversionError, match=r"line 7: .*token position \d+: token .* does not map to exactly one"):
        convert_record(decoded, tokenizer, where="line 7")


def test_misaligned_answer_is_an_error_not_a_shift(teacher_jsonl, tokenizer):
    rec = copy.deepcopy(_records(teacher_jsonl)[0])
    rec["messages"][-1]["content"] = "Something else entirely. " + rec["messages"][-1]["content"]
    with pytest.raises(ConversionError, match="token position 0.*does not align"):
        convert_record(rec, tokenizer, where="f.jsonl:3")


def _resegment(rec, tokenizer):
    """The record's answer with one token spelled as two (another segmentation of the same text, as a sampling
    teacher may produce); returns (record, the new answer ids)."""
    rec = copy.deepcopy(rec)
    ans = rec["messages"][-1]
    vocab = tokenizer.get_vocab()
    for j, t in enumerate(ans["token_ids"]):
        tok = tokenizer.convert_ids_to_tokens(t)
        for cut in range(1, len(tok)):
            a, b = vocab.get(tok[:cut]), vocab.get(tok[cut:])
            if a is not None and b is not None and tokenizer.decode([a, b]) == tokenizer.decode([t]):
                entries = ans["logprobs"]["content"]
                split = [
                    {"token_id": a, "logprob": -0.1, "top_logprobs": [{"token_id": a, "logprob": -0.1}]},
                    {"token_id": b, "logprob": -0.2, "top_logprobs": [{"token_id": b, "logprob": -0.2}]},
                ]
                ans["logprobs"]["content"] = entries[:j] + split + entries[j + 1 :]
                ans["token_ids"] = ans["token_ids"][:j] + [a, b] + ans["token_ids"][j + 1 :]
                assert tokenizer.decode(ans["token_ids"]) == tokenizer.decode(rec["messages"][-1]["token_ids"])
                return rec, ans["token_ids"]
    raise AssertionError("no token of the answer splits into two vocabulary entries")


def test_another_segmentation_of_the_answer_keeps_the_teachers_tokens(teacher_jsonl, tokenizer):
    """The template re-tokenizes an answer canonically; a teacher's own tokens may spell the same text otherwise.
    The row must hold the teacher's tokens at the supervised positions (their logprobs are about those), with the
    template's tokens around them, and a later turn's positions moved by the difference."""
    base = _records(teacher_jsonl)[0]
    rec, new_ids = _resegment(base, tokenizer)
    row = convert_record(rec, tokenizer, where="f.jsonl:1")
    pos = sorted(set(row["topk_pos"]))
    assert [row["input_ids"][p] for p in pos] == new_ids and pos == list(range(pos[0], pos[0] + len(new_ids)))
    plain = convert_record(base, tokenizer, where="f.jsonl:1")
    assert len(row["input_ids"]) == len(plain["input_ids"]) + 1  # one token spelled as two
    assert row["input_ids"][: pos[0]] == plain["input_ids"][: pos[0]]  # the prompt as the template writes it
    n = len(base["messages"][-1]["token_ids"])
    assert row["input_ids"][pos[0] + len(new_ids) :] == plain["input_ids"][pos[0] + n :]  # and the turn's end
    # two turns, the first re-segmented: the second answer's supervised positions still hold its own tokens
    second = _records(teacher_jsonl)[1]
    two = copy.deepcopy(rec)
    two["messages"] += [m for m in second["messages"] if m["role"] != "system"]
    row2 = convert_record(two, tokenizer, where="f.jsonl:2")
    pos2 = sorted(set(row2["topk_pos"]))
    assert [row2["input_ids"][p] for p in pos2] == new_ids + second["messages"][-1]["token_ids"]
    assert tokenizer.decode(row2["input_ids"]).count(second["messages"][-1]["content"]) == 1


def test_convert_jsonl_skips_and_counts_bad_rows_or_fails_when_strict(tmp_path, teacher_jsonl, tokenizer):
    lines = teacher_jsonl.read_text().splitlines()[:4]
    bad = json.loads(lines[1])
    bad["messages"][-1]["content"] = "nope " + bad["messages"][-1]["content"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([lines[0], "{not json", json.dumps(bad), lines[2], lines[3]]) + "\n")
    out = tmp_path / "out.parquet"
    stats = convert_jsonl(src, out, tokenizer, progress=False)
    assert (stats.rows, stats.rejected) == (3, 2)
    assert any(":2: not valid JSON" in e for e in stats.errors) and any(":3:" in e for e in stats.errors)
    table = read_flat_topk(out)
    assert table.num_rows == 3
    with pytest.raises(ConversionError, match=":2: not valid JSON"):
        convert_jsonl(src, tmp_path / "strict.parquet", tokenizer, strict=True, progress=False)
    assert not (tmp_path / "strict.parquet").exists()


def test_writer_is_atomic_and_reader_checks_schema(tmp_path):
    path = tmp_path / "x.parquet"
    row = {
        "row_id": "a",
        "input_ids": [1, 2, 3],
        "topk_pos": [1, 1, 2],
        "topk_ids": [4, 5, 6],
        "topk_logprobs": [-0.1, -3.0, -0.2],
        "num_positions": 2,
        "split_key": "k",
        "metadata": "{}",
    }
    with pytest.raises(RuntimeError):
        with FlatTopkWriter(path) as w:
            w.write(row)
            raise RuntimeError("crash halfway")
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written left behind
    with FlatTopkWriter(path) as w:
        w.write(row)
    t = read_flat_topk(path)
    assert t.to_pylist()[0]["topk_ids"] == [4, 5, 6]
    pq.write_table(pa.table({"row_id": ["a"], "tokens": [[1]]}), tmp_path / "other.parquet")
    with pytest.raises(FlatTopkError, match="other.parquet.*missing columns"):
        read_flat_topk(tmp_path / "other.parquet")


def test_validate_row_catches_bad_values():
    row = {
        "input_ids": [1, 2, 3],
        "topk_pos": [1, 3],
        "topk_ids": [4, 5],
        "topk_logprobs": [-0.1, -0.2],
        "num_positions": 2,
    }
    with pytest.raises(FlatTopkError, match="topk_pos out of range"):
        validate_row(row)
    row.update(topk_pos=[1, 2], topk_logprobs=[0.5, -0.2])
    with pytest.raises(FlatTopkError, match="<= 0"):
        validate_row(row)
    row.update(topk_logprobs=[-0.5, -0.2], topk_ids=[4, 99])
    with pytest.raises(FlatTopkError, match="vocabulary"):
        validate_row(row, vocab_size=50)
