"""The development set of memories (examples/dev_memories, the demo's facts): each reads, holds its facts, and
no training prompt holds a held-out phrasing or a near copy of one."""

import json
import re

import pytest
from helpers import EXAMPLE_CHECKPOINT, REPO

from ray_cartridges.config import DistillConfig, load_config
from ray_cartridges.generate.strategies import build_prompts
from ray_cartridges.memory import CheckpointError, read_facts, read_memory
from ray_cartridges.scoring import near_copy

DEV = REPO / "examples" / "dev_memories"
MEMORIES = {
    "demo": EXAMPLE_CHECKPOINT,
    "team_qa": DEV / "team_qa",
    "assistant_log": DEV / "assistant_log",
    "tool_agent": DEV / "tool_agent",
    "documents": DEV / "documents" / "corpus.md",
}


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def test_near_copy_catches_copies_and_leaves_paraphrases():
    held = "Which person is in charge of the budget meeting?"
    assert near_copy("Q: which person is in charge of the budget meeting", held)
    assert near_copy("Which person is in charge of the budget meetings?", held)
    assert not near_copy("Who leads the budget meeting?", held)


@pytest.mark.parametrize("name", list(MEMORIES))
def test_each_memory_holds_its_facts_and_its_prompts_never_the_heldout_phrasings(name):
    mem = read_memory(MEMORIES[name])
    facts = read_facts(MEMORIES[name])
    assert facts and len(facts) >= 30
    text = _norm(mem.render())
    for f in facts:
        assert _norm(f.answer.removeprefix("Correct. ").removeprefix("Incorrect. ")) in text, f.answer
        assert f.heldout and all(not near_copy(h, f.question or "") for h in f.heldout)
    # the demo's generation settings on this memory: every string a teacher prompt carries
    cfg = load_config(DistillConfig, REPO / "configs" / "demo.yaml", [f"generate.checkpoint_dir={MEMORIES[name]}"])
    prompts = build_prompts(mem, cfg.generate)
    assert prompts
    strings = {json.dumps(p.get("context")) for p in prompts} | {
        s for p in prompts for s in (p.get("user"), p.get("seed_prompt"), p.get("question_text")) if s
    }
    for f in facts:
        for h in f.heldout:
            assert not [s for s in strings if near_copy(s, h)], (name, h)


def test_the_generated_teacher_data_never_asks_a_heldout_phrasing(teacher_jsonl):
    """Teacher-written questions (self-study) included: the bundled teacher's data of the demo memory."""
    facts = read_facts(EXAMPLE_CHECKPOINT)
    users = [
        json.loads(line)["messages"][-2]["content"] for line in teacher_jsonl.read_text().splitlines() if line.strip()
    ]
    assert len(users) > 10
    leaks = [(u, h) for u in users for f in facts for h in f.heldout if near_copy(u, h)]
    assert leaks == []


def test_a_broken_facts_file_names_itself(tmp_path):
    (tmp_path / "facts.json").write_text('[{"entry": 0}]')
    with pytest.raises(CheckpointError, match="facts.json"):
        read_facts(tmp_path)
    assert read_facts(tmp_path / "none" / "deeper" / "x" / "y" / "z") is None


def test_a_corpus_is_chunked_by_its_sections_and_its_chunks_can_be_held_out(tmp_path):
    """Self-study reads a corpus in runs of whole Markdown sections (plain text: paragraphs), so chunks differ,
    never start inside a section, and some of them are held out for the fidelity reading."""
    from ray_cartridges.batching import heldout_keys

    mem = read_memory(MEMORIES["documents"])
    sections = mem.triples()
    assert len(sections) == sum(e.content.startswith("## ") for e in mem.entries)  # one per facility
    assert sections[0][0].content.startswith("# ") and all(s[-1].content[0] != "#" for s in sections)
    assert all(s[0].content.startswith("#") for s in sections)
    cfg = load_config(DistillConfig, REPO / "configs" / "demo.yaml", [f"generate.checkpoint_dir={mem.source}"])
    chunks = {p["split_key"] for p in build_prompts(mem, cfg.generate) if p["strategy"].startswith("self_study/")}
    assert len(chunks) > 6 and heldout_keys(sorted(chunks), 0.15, 0)
    plain = tmp_path / "notes.txt"
    plain.write_text("First paragraph.\n\nSecond one.\n\n# A heading last\n")
    assert [len(s) for s in read_memory(plain).triples()] == [2, 1]
    plain.write_text("First paragraph.\n\nSecond one.\n\nThird.\n")
    assert [len(s) for s in read_memory(plain).triples()] == [1, 1, 1]


def test_a_corpus_recites_each_section_by_its_heading_and_never_a_heldout_phrasing():
    from ray_cartridges.memory import section_title

    mem = read_memory(MEMORIES["documents"])
    overrides = [f"generate.checkpoint_dir={mem.source}"]  # the demo's recipe recites a corpus unasked
    cfg = load_config(DistillConfig, REPO / "configs" / "demo.yaml", overrides)
    recitals = [p for p in build_prompts(mem, cfg.generate) if p["strategy"].startswith("recite")]
    sections = mem.triples()
    per_section = cfg.generate.recite.samples_per_experience
    assert sorted(p["metadata"]["memory_entry"] for p in recitals) == sorted(list(range(len(sections))) * per_section)
    for p in recitals:
        i = p["metadata"]["memory_entry"]
        title = section_title(sections[i])
        assert title and "#" not in title and title in p["user"] and title in p["context"]
        assert p["split_key"] == f"recite-{i}"
    assert section_title(sections[0]) == sections[0][1].content.lstrip("# ")  # the section's, not the document's
    heldout = [h for f in read_facts(mem.source) for h in f.heldout]
    assert not [(p["user"], h) for p in recitals for h in heldout if near_copy(p["user"], h)]
