"""Prompt strategies: replay phrasings and the split keys that keep held-out experiences out of training."""

import os

import pytest
from helpers import EXAMPLE_CHECKPOINT, REPO

from ray_cartridges.batching import heldout_keys
from ray_cartridges.config import ConfigError, GenerateConfig, validate_config
from ray_cartridges.generate.strategies import build_prompts
from ray_cartridges.memory import read_memory


def _gen(fields: dict) -> GenerateConfig:
    """A generation config with the quiz off unless ``fields`` turn it on: each test here looks at its own strategy."""
    return validate_config(GenerateConfig, {"quiz": {"enabled": False}, **fields})


def _cfg(**replay):
    return _gen(
        {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "replay": replay, "self_study": {"num_samples": 8}},
    )


def test_replay_samples_are_distinct_phrasings_that_share_their_experience_key():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    questions = {f"entry-{i}": g[0].content for i, g in enumerate(memory.triples()) if g[0].type == "Observation"}
    prompts = build_prompts(memory, _cfg(mode="full_memory", samples_per_observation=3))
    replay = [p for p in prompts if p["strategy"].startswith("replay/")]
    assert len(replay) == 3 * len(questions)
    assert len({p["prompt_id"] for p in prompts}) == len(prompts)
    by_key: dict[str, list[dict]] = {}
    for p in replay:
        by_key.setdefault(p["split_key"], []).append(p)
    assert set(by_key) == set(questions)
    for key, group in by_key.items():
        users = sorted((p["metadata"]["sample"], p["user"]) for p in group)
        assert users[0] == (0, questions[key])  # sample 0 asks the Observation verbatim
        assert len({u for _, u in users}) == 3  # the others are other words, not duplicates
        assert all(questions[key] in u for _, u in users)  # ...of the same question
        # all phrasings of one experience fall on the same side of the train / held-out split
        held = heldout_keys([p["split_key"] for p in prompts], 0.3, 7)
        assert len({p["split_key"] in held for p in group}) == 1


def test_one_sample_per_observation_is_the_observation_itself():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    replay = [p for p in build_prompts(memory, _cfg()) if p["strategy"].startswith("replay/")]
    assert sorted(p["user"] for p in replay) == sorted(
        g[0].content for g in memory.triples() if g[0].type == "Observation"
    )


def test_unrelated_requests_are_answered_bare_and_train_the_student_toward_its_own_answers(model, tokenizer):
    """general/bare prompts: no memory in the teacher's prompt, which is then exactly the student's prompt, so
    the converted row's targets are the bare model's own distribution there (what the cartridge must not move)."""
    import torch

    from ray_cartridges.contracts import GENERAL_STRATEGY, SamplingParams
    from ray_cartridges.convert import convert_record
    from ray_cartridges.generate.engines import HFEngine
    from ray_cartridges.generate.strategies import general_requests
    from ray_cartridges.generate.teacher import run_prompts

    memory = read_memory(EXAMPLE_CHECKPOINT)
    cfg = _gen(
        {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "self_study": {"num_samples": 0}, "general": {"num_samples": 6}},
    )
    requests = general_requests(cfg)
    general = [p for p in build_prompts(memory, cfg) if p["strategy"] == GENERAL_STRATEGY]
    assert sorted(p["user"] for p in general) == sorted(requests[:6])
    assert all(p["context"] is None for p in general)  # no memory, no system prompt
    assert len({p["split_key"] for p in general}) == 6  # each request is its own split key
    assert not any(memory.entries[0].content in p["user"] for p in general)

    records, problems = run_prompts(
        HFEngine(model, tokenizer), general[:2], sampling=SamplingParams(max_tokens=8, top_logprobs=20)
    )
    assert not problems
    for rec, p in zip(records, general):
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        row = convert_record(rec, tokenizer, top_k=20, min_prob_mass=1.0)
        ids = row["input_ids"]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": p["user"]}], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert list(ids[: len(prompt)]) == list(prompt)  # the student reads what the teacher read
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), -1)
        # the targets are the bare model's own top-k at each answer position
        for pos, tid, tlp in zip(row["topk_pos"], row["topk_ids"], row["topk_logprobs"]):
            assert abs(float(logp[pos - 1, tid]) - float(tlp)) < 1e-3


def test_focused_replay_shows_the_teacher_a_window_that_holds_the_current_experience():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    groups = memory.triples()
    prompts = build_prompts(memory, _cfg(mode="focused", window_k=4, samples_per_observation=2))
    replay = [p for p in prompts if p["strategy"] == "replay/focused"]
    assert len(replay) == 2 * sum(g[0].type == "Observation" for g in groups)
    starts = set()
    for p in replay:
        gi = int(p["split_key"].split("-")[1])
        shown = [i for i, g in enumerate(groups) if g[0].render() in p["context"]]
        assert gi in shown and len(shown) == 4  # the current experience among window_k, not the whole memory
        assert shown == list(range(shown[0], shown[0] + 4))  # consecutive, in memory order
        starts.add(shown[0])
    assert len(starts) > 4  # windows slide, not one fixed window for everyone


def test_self_study_answers_from_the_chunk_only_when_asked_to():
    memory = read_memory(EXAMPLE_CHECKPOINT)
    full = build_prompts(memory, _cfg())
    cfg = _gen(
        {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "self_study": {"num_samples": 8, "answer_context": "chunk"}},
    )
    chunk = build_prompts(memory, cfg)
    ss_full = [p for p in full if p["strategy"].startswith("self_study/")]
    ss_chunk = [p for p in chunk if p["strategy"].startswith("self_study/")]
    assert [p["question_context"] for p in ss_full] == [p["question_context"] for p in ss_chunk]
    assert all(p["context"] == memory.render() for p in ss_full)
    assert all(p["context"] == p["question_context"] != memory.render() for p in ss_chunk)


def test_chunk_answers_can_be_scored_by_the_teacher_with_the_whole_memory(model, tokenizer):
    """self_study.targets: full_memory: the answer is the one the chunk teacher writes, its targets are the whole
    memory teacher's distribution at each of its tokens (teacher forcing); the record says who read what."""
    import torch

    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.engines import HFEngine
    from ray_cartridges.generate.teacher import chat_ids, run_prompts

    memory = read_memory(EXAMPLE_CHECKPOINT)
    base = {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "replay": {"enabled": False}}
    ss = {"num_samples": 2, "answer_context": "chunk"}
    plain = build_prompts(memory, _gen({**base, "self_study": ss}))
    scored = build_prompts(memory, _gen({**base, "self_study": {**ss, "targets": "full_memory"}}))
    assert all("score_context" not in p for p in plain)
    assert all(p["score_context"] == memory.render() != p["context"] for p in scored)
    for p in plain + scored:  # the questions as written, so both runs answer the same ones
        p["user"] = "What do you know about " + ("the boats?" if p["prompt_id"].endswith("0") else "the station?")
    engine, sampling = HFEngine(model, tokenizer), SamplingParams(max_tokens=10, top_logprobs=5)
    ref, _ = run_prompts(engine, plain, sampling=sampling)
    got, problems = run_prompts(engine, scored, sampling=sampling)
    assert not problems and len(got) == len(ref) == 2
    for r, g, p in zip(ref, got, scored):
        answer = g["messages"][-1]["token_ids"]
        assert answer == r["messages"][-1]["token_ids"]  # written by the chunk teacher
        assert g["messages"][0]["content"] == memory.render() and g["metadata"]["answer_context"] == p["context"]
        prompt = chat_ids(tokenizer, memory.render(), p["user"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
        lp = lp[len(prompt) - 1 : len(prompt) + len(answer) - 1]
        entries = g["messages"][-1]["logprobs"]["content"]
        for j, e in enumerate(entries):
            assert e["token_id"] == answer[j] and abs(e["logprob"] - float(lp[j, answer[j]])) < 1e-4
            assert [t["token_id"] for t in e["top_logprobs"]] == lp[j].topk(5).indices.tolist()
        assert entries != r["messages"][-1]["logprobs"]["content"]  # another teacher's targets
    # scoring again reuses the engine's cached prefix, never past the prompt: the same entries
    again = engine.score([prompt], [answer], 5)[0]
    assert [e["logprob"] for e in again] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)


def test_unrelated_requests_get_their_own_answer_length_and_records_keep_prompt_order(model, tokenizer):
    """general.max_tokens: those answers run longer than the memory's; mixed lengths in one call keep the order."""
    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.engines import HFEngine
    from ray_cartridges.generate.teacher import run_prompts

    memory = read_memory(EXAMPLE_CHECKPOINT)
    cfg = _gen(
        {
            "checkpoint_dir": str(EXAMPLE_CHECKPOINT),
            "self_study": {"num_samples": 0},
            "general": {"num_samples": 3, "max_tokens": 12},
            "max_tokens": 3,
        },
    )
    prompts = build_prompts(memory, cfg)[:8]
    assert {p.get("max_tokens") for p in prompts} == {None, 12}  # both kinds among the first eight
    for p in prompts:  # short, unrelated requests cannot stop before 3 tokens: lengths tell the kinds apart
        p["context"] = None
    records, problems = run_prompts(
        HFEngine(model, tokenizer), prompts, sampling=SamplingParams(max_tokens=3, top_logprobs=20)
    )
    assert not problems and len(records) == len(prompts)
    for rec, p in zip(records, prompts):
        assert rec["metadata"]["prompt_id"] == p["prompt_id"] and rec["messages"][-2]["content"] == p["user"]
        n = len(rec["messages"][-1]["token_ids"])
        assert rec["metadata"]["sampling"]["max_tokens"] == (p.get("max_tokens") or 3)
        assert n == 3 if p.get("max_tokens") is None else 3 < n <= 12


def test_fact_answer_share_scores_replay_and_recital_answers_against_their_own_feedback():
    from ray_cartridges.generate.pipeline import fact_answer_share

    memory = read_memory(EXAMPLE_CHECKPOINT)
    facts = {
        g[0].content: (i, [e.content for e in g if e.type == "Feedback"][-1]) for i, g in enumerate(memory.triples())
    }
    (q0, (i0, fb0)), (q1, (i1, fb1)) = list(facts.items())[:2]

    def rec(entry, answer, strategy="replay/focused"):
        meta = {"memory_entry": entry, "strategy": strategy}
        return {"metadata": meta, "messages": [{"role": "user"}, {"role": "assistant", "content": answer}]}

    got = fact_answer_share(
        [
            rec(i0, fb0),  # states its own fact
            rec(i1, fb0),  # states another experience's fact: wrong for this one
            rec(i1, "I do not know."),
            rec(i0, "nothing", strategy="self_study/question"),  # not replay: not scored
        ],
        memory,
    )
    assert got == {"correct": 1, "answers": 3, "share": 1 / 3}
    assert fact_answer_share([rec(i0, fb0, strategy="general/bare")], memory) is None
    # recitals are scored on their own, against the fact of the experience they recite
    recitals = [rec(i0, fb0, "recite"), rec(i1, fb1, "recite"), rec(i1, fb0, "recite"), rec(i0, fb0)]
    assert fact_answer_share(recitals, memory, "recite") == {"correct": 2, "answers": 3, "share": 2 / 3}

    # a quiz answer is scored against the sentence its question was written from, the question's words aside
    def quiz(sentence, question, answer):
        meta = {"memory_entry": i0, "strategy": "quiz/sentence", "sentence": sentence}
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"metadata": meta, "messages": msgs}

    s = "The boat leaves from pier 4 at noon."
    quizzes = [
        quiz(s, "When does the boat leave?", "At noon, from pier 4."),
        quiz(s, "Where does the boat leave from at noon?", "From pier 4."),  # noon is the question's
        quiz(s, "When does the boat leave?", fb0),  # the experience's Feedback is not this sentence
    ]
    assert fact_answer_share(quizzes, memory, "quiz") == {"correct": 2, "answers": 3, "share": 2 / 3}


def test_recitals_cover_every_experience_from_a_window_that_holds_it_under_their_own_split_keys():
    from ray_cartridges.generate.strategies import RECITE_REQUESTS

    memory = read_memory(EXAMPLE_CHECKPOINT)
    groups = memory.triples()
    base = {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "self_study": {"num_samples": 8}}
    without = build_prompts(memory, _gen(base))
    cfg = _gen({**base, "recite": {"enabled": True, "samples_per_experience": 2}})
    prompts = build_prompts(memory, cfg)
    recite = [p for p in prompts if p["strategy"] == "recite"]
    # the other strategies' prompts (their random windows and questions) are unchanged by enabling recitals
    assert {p["prompt_id"]: p for p in prompts if p["strategy"] != "recite"} == {p["prompt_id"]: p for p in without}
    assert sorted((p["metadata"]["memory_entry"], p["metadata"]["sample"]) for p in recite) == [
        (i, s) for i in range(len(groups)) for s in range(2)
    ]
    for p in recite:
        gi = p["metadata"]["memory_entry"]
        shown = [i for i, g in enumerate(groups) if g[0].render() in p["context"]]
        assert shown == [gi]  # window_k 1 (the default): only the recited experience
        assert p["user"] == RECITE_REQUESTS[p["metadata"]["sample"]]
        assert p["split_key"] == f"recite-{gi}"  # a kind of its own: held out independently of replay
    held = heldout_keys([p["split_key"] for p in prompts], 0.15, 0)
    assert any(k.startswith("recite-") for k in held) and any(k.startswith("entry-") for k in held)

    wide = _gen({**base, "recite": {"enabled": True, "window_k": 3, "requests": ["Tell."]}})
    for p in [p for p in build_prompts(memory, wide) if p["strategy"] == "recite"]:
        shown = [i for i, g in enumerate(groups) if g[0].render() in p["context"]]
        assert p["metadata"]["memory_entry"] in shown and len(shown) == 3 and p["user"] == "Tell."


def test_recitals_of_a_sections_own_text_are_read_by_the_teacher_not_written(tiny_model, tokenizer):
    """recite.answers: text: a corpus section's answer is its own paragraphs (not its headings) and the end of
    the turn; its targets are the teacher's distribution at each of those tokens with the section in context.
    Mixed with written answers in one call, the records keep the prompts' order."""
    import torch

    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.engines import HFEngine
    from ray_cartridges.generate.teacher import chat_ids, run_prompts

    corpus = REPO / "examples" / "dev_memories" / "documents" / "corpus.md"
    memory, groups = read_memory(corpus), read_memory(corpus).triples()
    cfg = _gen(
        {
            "checkpoint_dir": str(corpus),
            "replay": {"enabled": False},
            "self_study": {"num_samples": 0},
            "recite": {"enabled": True, "answers": "text"},
            "general": {"num_samples": 4},
        },
    )
    prompts = build_prompts(memory, cfg)
    recite = [p for p in prompts if p["strategy"] == "recite/text"]
    assert sorted(p["metadata"]["memory_entry"] for p in recite) == list(range(len(groups)))
    for p in recite:
        body = [e.content for e in groups[p["metadata"]["memory_entry"]] if not e.content.startswith("#")]
        assert p["answer"] == "\n\n".join(body) and body and body[0] in p["context"]
    picked = prompts[:6]
    assert {"answer" in p for p in picked} == {True, False}
    records, problems = run_prompts(
        HFEngine(tiny_model, tokenizer), picked, sampling=SamplingParams(max_tokens=3, top_logprobs=5)
    )
    assert not problems and [r["metadata"]["prompt_id"] for r in records] == [p["prompt_id"] for p in picked]
    for rec, p in zip(records, picked):
        ids, entries = rec["messages"][-1]["token_ids"], rec["messages"][-1]["logprobs"]["content"]
        if "answer" not in p:
            assert len(ids) <= 3
            continue
        assert ids == tokenizer.encode(p["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        assert rec["messages"][-1]["content"] == p["answer"]
        prompt = chat_ids(tokenizer, p["context"], p["user"])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(torch.tensor([prompt + ids])).logits[0].float(), -1)
        lp = lp[len(prompt) - 1 : len(prompt) + len(ids) - 1]
        assert len(entries) == len(ids)
        for j, e in enumerate(entries):
            assert e["token_id"] == ids[j] and abs(e["logprob"] - float(lp[j, ids[j]])) < 1e-4
            assert [t["token_id"] for t in e["top_logprobs"]] == lp[j].topk(5).indices.tolist()


def test_shard_names_change_with_what_changes_a_shards_content_only():
    """A re-run resumes a shard only when its content would be the same: the teacher's numerics (dtype, vLLM's
    eager mode) and sampling rename shards; where the output goes, how many actors write it, do not."""
    from ray_cartridges.generate.pipeline import _named_settings, shard_names

    cfg = _cfg(mode="focused")
    prompts = build_prompts(read_memory(EXAMPLE_CHECKPOINT), cfg)
    shards = [prompts[i : i + 16] for i in range(0, len(prompts), 16)]
    base = shard_names(shards, cfg)
    assert len(set(base)) == len(base)
    for same in ({"output_dir": "elsewhere"}, {"num_threads": 4}, {"actor_num_cpus": 2.0}):
        assert shard_names(shards, cfg.model_copy(update=same)) == base, same
    others = (
        {"enforce_eager": True},
        {"dtype": "bf16"},
        {"temperature": 0.7},
        {"top_logprobs": 10},
        {"block_size": 64},
    )
    for other in (*others, {"deterministic": True}):
        renamed = shard_names(shards, cfg.model_copy(update=other))
        assert all(a != b for a, b in zip(renamed, base)), other
        assert [n.split("-")[1] for n in renamed] == [n.split("-")[1] for n in base]  # same shard numbers
    # what scores another teacher's targets names only the shards that hold such answers
    assert shard_names(shards, cfg.model_copy(update={"score_engine": "vllm"})) == base  # none here
    chunk_scored = {"answer_context": "chunk", "targets": "full_memory"}
    scored = cfg.model_copy(update={"self_study": cfg.self_study.model_copy(update=chunk_scored)})
    sprompts = build_prompts(read_memory(EXAMPLE_CHECKPOINT), scored)
    sshards = [sprompts[i : i + 4] for i in range(0, len(sprompts), 4)]
    has = ["score_context" in str(shard) for shard in sshards]
    assert any(has) and not all(has)
    by_vllm = shard_names(sshards, scored.model_copy(update={"score_engine": "vllm"}))
    by_hf = shard_names(sshards, scored.model_copy(update={"score_engine": "transformers"}))
    assert [a != b for a, b in zip(by_vllm, by_hf)] == has
    # a teacher laid out otherwise writes other prompts: their shards are others too
    chat = cfg.model_copy(update={"memory_layout": "history_chat"})
    chat_shards = [
        p[i : i + 16] for p in [build_prompts(read_memory(EXAMPLE_CHECKPOINT), chat)] for i in range(0, len(p), 16)
    ]
    assert not set(shard_names(chat_shards, chat)) & set(base)
    # a field that came later, at its default, is left out of the names: data written before it keeps them
    assert "answers" not in _named_settings(cfg, set())["recite"] and "deterministic" not in _named_settings(cfg, set())
    assert "block_size" not in _named_settings(cfg.model_copy(update={"block_size": None}), set())  # vLLM's choice
    text = cfg.model_copy(update={"recite": cfg.recite.model_copy(update={"answers": "text"})})
    assert _named_settings(text, set())["recite"]["answers"] == "text"
    # the quiz section is named only where it is on (off, its other settings rename nothing)
    quiz_off = cfg.model_copy(update={"quiz": cfg.quiz.model_copy(update={"questions_per_sentence": 5})})
    assert shard_names(shards, quiz_off) == base and "quiz" not in _named_settings(cfg, set())
    quiz_on = cfg.model_copy(update={"quiz": cfg.quiz.model_copy(update={"enabled": True})})
    assert all(a != b for a, b in zip(shard_names(shards, quiz_on), base))


def test_an_in_process_teacher_runs_its_engine_in_the_actors_process_with_the_nodes_threads(monkeypatch):
    """In process (deterministic on GPUs, always on CPU) vLLM spawns no engine core: on CPU with the threads its
    worker would bind, not the one OpenMP thread Ray gives a 1-CPU actor; the user's own settings win."""
    from ray_cartridges.engine_env import LIFELINE_ENV, engine_actor_env

    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for gpu in (False, True):
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_actor_env(gpu)
        env = engine_actor_env(gpu, in_process=True)
        assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env[LIFELINE_ENV] == "1"
        assert env.get("OMP_NUM_THREADS") == (None if gpu else str(os.cpu_count()))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert engine_actor_env(False, in_process=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" in engine_actor_env(False) and "VLLM_CPU_KVCACHE_SPACE" not in engine_actor_env(
        True
    )


def test_prompt_keys_follow_each_prompts_own_strategy_and_index_earlier_records(tmp_path):
    import json

    from ray_cartridges.generate.actor import read_earlier
    from ray_cartridges.generate.pipeline import earlier_records, prompt_keys

    cfg = _gen(
        {"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "self_study": {"num_samples": 4}, "recite": {"enabled": True}},
    )
    prompts = build_prompts(read_memory(EXAMPLE_CHECKPOINT), cfg)
    family = [p["strategy"].split("/")[0] for p in prompts]
    assert {"replay", "self_study", "recite"} <= set(family)
    keys = prompt_keys(prompts, cfg)
    assert len(set(keys)) == len(keys)

    def changed(**update):
        return [a != b for a, b in zip(keys, prompt_keys(prompts, cfg.model_copy(update=update)))]

    # a strategy's setting re-keys its own prompts only; the teacher's sampling re-keys all; conversion none
    study = cfg.self_study.model_copy(update={"question_temperature": 0.3})
    assert changed(self_study=study) == [f == "self_study" for f in family]
    assert not any(changed(quiz=cfg.quiz.model_copy(update={"enabled": True, "window_k": 2})))  # no quiz prompt
    assert all(changed(temperature=0.7)) and all(changed(model_name="other"))
    assert not any(changed(min_prob_mass=0.5, student_system_prompt="Hi.", shard_size=3, num_threads=4))

    # the index points at each wanted record's line; a record changed since is not read back under its key
    shards = tmp_path / "shards"
    shards.mkdir()
    recs = [
        {"messages": [{"role": "user", "content": f"q{i}"}], "metadata": {"prompt_key": k}}
        for i, k in enumerate(keys[:5])
    ]
    (shards / "shard-00000-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:3]))
    (shards / "shard-00001-b.jsonl").write_text(json.dumps({"metadata": {}}) + "\n" + json.dumps(recs[3]) + "\n")
    (shards / "other.jsonl").write_text(json.dumps(recs[4]) + "\n")  # not a shard
    where = earlier_records(shards, set(keys[1:5]))
    assert set(where) == set(keys[1:4])
    assert read_earlier(where) == {k: r for k, r in zip(keys[1:4], recs[1:4])}
    text = (shards / "shard-00000-a.jsonl").read_text()
    (shards / "shard-00000-a.jsonl").write_text(text.replace(keys[2], "0" * 16))
    assert set(read_earlier(where)) == {keys[1], keys[3]}
    assert earlier_records(shards, set()) == {}


def test_a_self_study_prompt_without_a_usable_question_is_a_rejection_not_a_record(tokenizer):
    """The question writer's empty output: the prompt is rejected with its reason, the others answered."""
    from ray_cartridges.contracts import Rejection, SamplingParams
    from ray_cartridges.generate.records import logprob_entry
    from ray_cartridges.generate.teacher import run_prompts

    class Writer:  # writes the scripted text for each question request, "ok" for each answer
        def __init__(self, questions):
            self.tokenizer, self.questions = tokenizer, list(questions)

        def complete(self, prompts, sampling, seeds):
            if sampling.max_tokens == 64:  # the question writer's call
                texts = [self.questions.pop(0) for _ in prompts]
            else:
                texts = ["ok"] * len(prompts)
            ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            return [(i, [logprob_entry(tokenizer, t, 0.0, [(t, 0.0)]) for t in i]) for i in ids]

    base = {"strategy": "self_study/fact", "context": "memory", "user": None, "split_key": "chunk-0-1"}
    prompts = [
        {**base, "prompt_id": "a", "question_context": "memory", "seed_prompt": "Ask.", "metadata": {}},
        {**base, "prompt_id": "b", "question_context": "memory", "seed_prompt": "Ask.", "metadata": {}},
    ]
    engine = Writer(["   \n", "Question: What is kept?"])
    records, rejected = run_prompts(engine, prompts, sampling=SamplingParams(max_tokens=4, top_logprobs=1))
    assert rejected == [Rejection("a", "no_question", "the teacher wrote no usable question")]
    assert [r["metadata"]["prompt_id"] for r in records] == ["b"]
    assert records[0]["messages"][-2]["content"] == "What is kept?"


def test_the_engine_context_fits_the_longest_request_and_a_prompt_that_cannot_fit_is_named(tokenizer):
    from ray_cartridges.generate.teacher import chat_ids, fit_engine_context

    memory = read_memory(REPO / "examples" / "dev_memories" / "documents" / "corpus.md")
    cfg = _gen({"checkpoint_dir": str(memory.source), "replay": {"mode": "full_memory"}, "max_tokens": 96})
    prompts = build_prompts(memory, cfg)
    fitted = fit_engine_context(cfg, prompts, memory.source).max_model_len
    longest = max(len(chat_ids(tokenizer, p["context"], p["user"] or "")) for p in prompts)
    assert longest > 4096  # the documents do not fit the old fixed context of 4096
    assert longest + 96 <= fitted < longest + 96 + 64 + 8 + 256 and fitted % 256 == 0
    # a short memory keeps the floor: the shard names of data made with the old fixed context stay the same
    demo = read_memory(EXAMPLE_CHECKPOINT)
    assert fit_engine_context(_cfg(), build_prompts(demo, _cfg()), demo.source).max_model_len == 4096
    # a context set too small, and a memory past the model's own context, are errors naming the file and the field
    with pytest.raises(ConfigError, match=r"corpus\.md: .* more than generate\.max_model_len=4096"):
        fit_engine_context(cfg.model_copy(update={"max_model_len": 4096}), prompts, memory.source)
    twice = [{**p, "context": p["context"] + "\n\n" + p["context"]} for p in prompts[:3]]
    with pytest.raises(ConfigError, match=r"corpus\.md: .* more than smollm2-135m-instruct's context of 8192"):
        fit_engine_context(cfg, twice, memory.source)


def test_recitals_follow_the_memory_kind_by_default_and_name_shards_as_the_setting_they_resolve_to():
    """recite.enabled: auto recites a corpus's sections and none of an agent's experiences; a run resolves it
    before naming shards, so data written with the explicit setting is found again (and kept by earlier runs)."""
    from ray_cartridges.generate.pipeline import shard_names
    from ray_cartridges.generate.strategies import for_memory

    corpus = REPO / "examples" / "dev_memories" / "documents" / "corpus.md"
    for source, on in ((EXAMPLE_CHECKPOINT, False), (corpus, True)):
        memory = read_memory(source)
        auto = _gen({"checkpoint_dir": str(source), "self_study": {"num_samples": 4}})
        assert auto.recite.enabled == "auto"
        explicit = auto.model_copy(update={"recite": auto.recite.model_copy(update={"enabled": on})})
        prompts = build_prompts(memory, auto)
        assert prompts == build_prompts(memory, explicit)
        recitals = [p for p in prompts if p["strategy"].startswith("recite")]
        assert len(recitals) == (len(memory.triples()) if on else 0)
        shards = [prompts[i : i + 8] for i in range(0, len(prompts), 8)]
        assert shard_names(shards, for_memory(auto, memory)) == shard_names(shards, explicit)
    # with nothing else to generate, auto is not refused up front: a corpus would still recite
    only = {"checkpoint_dir": str(corpus), "replay": {"enabled": False}, "self_study": {"enabled": False}}
    assert build_prompts(read_memory(corpus), _gen(only))
    with pytest.raises(ValueError, match="nothing to generate"):
        _gen({**only, "recite": {"enabled": False}})


def test_self_study_count_follows_the_memorys_units_by_default_and_names_shards_as_it_resolves():
    """self_study.num_samples: auto writes per_unit conversations per unit (an experience, a corpus section), so a
    memory with more units gets more; the run resolves it before naming shards, as an explicit count would."""
    from ray_cartridges.generate.pipeline import shard_names
    from ray_cartridges.generate.strategies import for_memory

    log = REPO / "examples" / "dev_memories" / "assistant_log"
    counts = {}
    for source in (EXAMPLE_CHECKPOINT, log):
        memory = read_memory(source)
        auto = _gen({"checkpoint_dir": str(source), "self_study": {"per_unit": 1.5}})
        assert auto.self_study.num_samples == "auto"
        n = round(1.5 * len(memory.triples()))
        explicit = _gen({"checkpoint_dir": str(source), "self_study": {"num_samples": n}})
        prompts = build_prompts(memory, auto)
        assert prompts == build_prompts(memory, explicit)
        counts[source] = sum(p["strategy"].startswith("self_study") for p in prompts)
        assert counts[source] == n
        shards = [prompts[i : i + 8] for i in range(0, len(prompts), 8)]
        assert shard_names(shards, for_memory(auto, memory)) == shard_names(shards, for_memory(explicit, memory))
    assert counts[log] > counts[EXAMPLE_CHECKPOINT]  # the log has more experiences than the demo
    with pytest.raises(ConfigError, match="num_samples"):
        _gen({"checkpoint_dir": str(log), "self_study": {"num_samples": -1}})


def test_auto_replay_windows_hold_about_the_token_budget_on_short_and_long_experiences(tokenizer):
    """replay.window_k: auto shows the teacher as many experiences as hold window_tokens tokens of the memory's
    median experience: more of the demo's short experiences than of a tool agent's long ones, about the same text
    in both; the run resolves it before naming shards, as the explicit count would."""
    import statistics

    from ray_cartridges.generate.pipeline import shard_names
    from ray_cartridges.generate.strategies import for_memory
    from ray_cartridges.memory import unit_text

    tools = REPO / "examples" / "dev_memories" / "tool_agent"
    shown_sizes = {}
    for source in (EXAMPLE_CHECKPOINT, tools):
        memory = read_memory(source)
        groups = memory.triples()
        auto = _cfg(mode="focused", window_k="auto", window_tokens=300)
        k = for_memory(auto, memory, tokenizer).replay.window_k
        explicit = _cfg(mode="focused", window_k=k)
        prompts = build_prompts(memory, auto)
        assert prompts == build_prompts(memory, explicit)
        shards = [prompts[i : i + 8] for i in range(0, len(prompts), 8)]
        assert shard_names(shards, for_memory(auto, memory, tokenizer)) == shard_names(
            shards, for_memory(explicit, memory)
        )
        windows = []
        for p in prompts:
            if p["strategy"] == "replay/focused":
                shown = [g for g in groups if g[0].render() in p["context"]]
                assert len(shown) == k
                windows.append(sum(len(tokenizer(unit_text(g, False)).input_ids) for g in shown))
        shown_sizes[source] = (k, statistics.median(windows))
    (k_demo, demo_tokens), (k_tools, tool_tokens) = shown_sizes[EXAMPLE_CHECKPOINT], shown_sizes[tools]
    assert k_demo > k_tools >= 1
    for tokens in (demo_tokens, tool_tokens):
        assert 0.6 * 300 <= tokens <= 1.5 * 300, shown_sizes
    one = _cfg(mode="focused", window_k="auto", window_tokens=1)  # never less than the experience asked about
    assert for_memory(one, read_memory(tools), tokenizer).replay.window_k == 1
    with pytest.raises(ConfigError, match="window_k"):
        _cfg(window_k=0)


def test_sentences_of_a_unit_are_its_whole_sentences_also_inside_a_tool_result():
    from ray_cartridges.memory import MemoryEntry, unit_sentences

    tool = '{"log": "INFO  queue depth 12, consumers 4", "message": "The vault is led by Ann Berg. Ask her first!"}'
    group = [
        MemoryEntry("Observation", "Task: Who leads the backup vault?", 0),
        MemoryEntry("Action", 'search_docs(query="vault")', 1),
        MemoryEntry("Feedback", tool, 2),
        MemoryEntry("Feedback", "Thanks!", 3),
    ]
    assert unit_sentences(group, False) == ["Who leads the backup vault?", "The vault is led by Ann Berg."]
    assert unit_sentences(group, False, min_chars=5) == [
        "Who leads the backup vault?",
        "The vault is led by Ann Berg.",
        "Ask her first!",
        "Thanks!",
    ]
    section = [
        MemoryEntry("Observation", "## Opening hours of the hall.", 0),
        MemoryEntry("Observation", "It opens at 9 am daily.", 1),
    ]
    assert unit_sentences(section, True) == ["It opens at 9 am daily."]
    # a title's or an initial's period does not end the sentence: the quiz asks about the whole fact
    titled = [MemoryEntry("Feedback", "The station doctor is Dr. Amara Okafor. Ask J. Berg or Ms. Lee. It was no.", 0)]
    assert unit_sentences(titled, False, min_chars=5) == [
        "The station doctor is Dr. Amara Okafor.",
        "Ask J. Berg or Ms. Lee.",
        "It was no.",
    ]


def test_quiz_asks_about_each_distinct_sentence_from_a_window_that_holds_its_unit():
    """Every distinct sentence of the memory (a tool result's message included, its log lines not) is asked
    questions_per_sentence times, each through the worked examples; the teacher answers from a window of window_k
    experiences that holds the sentence's first unit; the quiz leaves the other strategies' prompts as they were."""
    from ray_cartridges.generate.strategies import QUIZ_EXAMPLES, quiz_question_text
    from ray_cartridges.memory import unit_sentences

    ckpt = REPO / "examples" / "dev_memories" / "tool_agent"
    memory = read_memory(ckpt)
    groups = memory.triples()
    base = {"checkpoint_dir": str(ckpt), "self_study": {"num_samples": 8}}
    without = build_prompts(memory, _gen(base))
    cfg = _gen({**base, "quiz": {"enabled": True, "questions_per_sentence": 2, "window_k": 3}})
    prompts = build_prompts(memory, cfg)
    quiz = [p for p in prompts if p["strategy"] == "quiz/sentence"]
    assert {p["prompt_id"]: p for p in prompts if p not in quiz} == {p["prompt_id"]: p for p in without}
    first = {}
    for gi, g in enumerate(groups):
        for sentence in unit_sentences(g, False):
            first.setdefault(sentence, gi)
    asked = sorted(p["metadata"]["sentence"] for p in quiz)
    assert asked == sorted(s for s in first for _ in range(2))
    assert "The backup vault is led by Liam O'Connor." in first and not [s for s in first if "INFO" in s]
    assert len({p["prompt_id"] for p in quiz}) == len(quiz)
    for p in quiz:
        sentence, gi = p["metadata"]["sentence"], p["metadata"]["memory_entry"]
        assert gi == first[sentence] and p["split_key"] == f"quiz-{gi}" and p["user"] is None
        assert "answer" not in p  # answers: auto is the teacher's own answer for an agent's experiences
        assert p["question_text"] == quiz_question_text(sentence)
        assert p["question_text"].endswith(f"Sentence: {sentence}\nQuestion:")
        assert all(q in p["question_text"] for _, q in QUIZ_EXAMPLES)
        shown = [i for i, g in enumerate(groups) if g[0].render() in p["context"]]
        assert gi in shown and len(shown) == 3


def test_a_corpus_quiz_answers_with_the_sentence_read_by_the_teacher_after_its_written_question(tokenizer):
    """quiz.answers: auto on a document corpus: each question (written by the teacher) is answered with the
    sentence it asks about, which the teacher reads with the window in context (scored, not written); an agent's
    quiz keeps its prompt keys, as if the field did not exist."""
    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.pipeline import prompt_keys
    from ray_cartridges.generate.records import logprob_entry
    from ray_cartridges.generate.strategies import for_memory
    from ray_cartridges.generate.teacher import chat_ids, run_prompts

    corpus = REPO / "examples" / "dev_memories" / "documents" / "corpus.md"
    memory = read_memory(corpus)
    base = {"checkpoint_dir": str(corpus), "self_study": {"num_samples": 0}, "quiz": {"enabled": True}}
    quiz = [p for p in build_prompts(memory, _gen(base)) if p["strategy"].startswith("quiz/")]
    assert quiz and {p["strategy"] for p in quiz} == {"quiz/text"}
    assert all(p["answer"] == p["metadata"]["sentence"] and p["user"] is None for p in quiz)
    taught = _gen({**base, "quiz": {"enabled": True, "answers": "teacher"}})
    asked = [p for p in build_prompts(memory, taught) if p["strategy"].startswith("quiz/")]
    assert {p["strategy"] for p in asked} == {"quiz/sentence"} and not [p for p in asked if "answer" in p]

    agent = read_memory(EXAMPLE_CHECKPOINT)
    auto = _gen({"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "quiz": {"enabled": True}})
    explicit = _gen({"checkpoint_dir": str(EXAMPLE_CHECKPOINT), "quiz": {"enabled": True, "answers": "teacher"}})
    prompts = build_prompts(agent, auto)
    assert prompts == build_prompts(agent, explicit)
    assert prompt_keys(prompts, for_memory(auto, agent)) == prompt_keys(prompts, for_memory(explicit, agent))

    calls = []

    class Teacher:
        def __init__(self):
            self.tokenizer = tokenizer

        def complete(self, prompts, sampling, seeds):
            calls.append(("complete", prompts))
            ids = tokenizer("Who runs the centre?", add_special_tokens=False).input_ids
            return [(ids, []) for _ in prompts]

        def score(self, prompts, answers, top_logprobs):
            calls.append(("score", prompts, answers))
            return [[logprob_entry(tokenizer, t, -0.5, [(t, -0.5)]) for t in a] for a in answers]

    records, rejected = run_prompts(Teacher(), quiz[:2], sampling=SamplingParams(max_tokens=4, top_logprobs=1))
    assert not rejected and [c[0] for c in calls] == ["complete", "score"]  # the answer is read, never written
    assert calls[1][1] == [chat_ids(tokenizer, p["context"], "Who runs the centre?") for p in quiz[:2]]
    for rec, p in zip(records, quiz[:2]):
        ids = tokenizer.encode(p["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        assert rec["messages"][-2]["content"] == "Who runs the centre?"
        assert rec["messages"][-1]["content"] == p["answer"] and rec["messages"][-1]["token_ids"] == ids


def test_quiz_questions_continue_their_plain_text_at_their_own_temperature(tokenizer):
    """A quiz question is written by continuing its plain text (no chat template) at the quiz's temperature; a
    self-study question from its chat at the question writer's; each prompt is then answered with its question."""
    from ray_cartridges.contracts import SamplingParams
    from ray_cartridges.generate.records import logprob_entry
    from ray_cartridges.generate.teacher import chat_ids, run_prompts

    calls = []

    class Writer:
        def __init__(self):
            self.tokenizer = tokenizer

        def complete(self, prompts, sampling, seeds):
            calls.append((prompts, sampling.temperature, sampling.max_tokens))
            text = "Who keeps the key?\nSentence: more" if sampling.max_tokens == 64 else "Ann."
            ids = tokenizer(text, add_special_tokens=False).input_ids
            return [(ids, [logprob_entry(tokenizer, t, 0.0, [(t, 0.0)]) for t in ids]) for _ in prompts]

    quiz = {"prompt_id": "q", "strategy": "quiz/sentence", "context": "memory", "user": None, "split_key": "quiz-0"}
    quiz |= {"question_text": "Sentence: Ann keeps the key.\nQuestion:", "question_temperature": 0.3, "metadata": {}}
    study = {"prompt_id": "s", "strategy": "self_study/question", "context": "memory", "user": None}
    study |= {"split_key": "chunk-0-1", "question_context": "chunk", "seed_prompt": "Ask.", "metadata": {}}
    qs = SamplingParams(temperature=0.8, max_tokens=64)
    records, rejected = run_prompts(
        Writer(), [quiz, study], sampling=SamplingParams(max_tokens=4), question_sampling=qs
    )
    assert not rejected
    written = {t: p for p, t, n in calls if n == 64}
    assert written == {0.3: [tokenizer.encode(quiz["question_text"])], 0.8: [chat_ids(tokenizer, "chunk", "Ask.")]}
    assert [r["messages"][-2]["content"] for r in records] == ["Who keeps the key?"] * 2
    answered = [p for p, t, n in calls if n == 4]
    assert answered == [[chat_ids(tokenizer, "memory", "Who keeps the key?")] * 2]


def test_the_generation_summary_says_how_many_shards_a_rerun_kept():
    from ray_cartridges.generate.pipeline import format_summary

    base = {"rows": 10, "rows_generated_now": 0, "rows_reused_now": 0, "rejected_now": 0, "answer_tokens": 90}
    paths = {"dataset_jsonl": "d.jsonl", "parquet_shards": "shards"}
    rerun = format_summary({**base, **paths, "shards": 3, "shards_generated_now": 0})
    assert "shards: 3, of which 3 were already written and are kept as they are" in rerun
    fresh = format_summary({**base, **paths, "rows_generated_now": 10, "shards": 3, "shards_generated_now": 3})
    assert "already written" not in fresh and "10 generated now" in fresh


def test_a_killed_in_process_engine_leaves_no_openmp_file():
    """A process whose CPU engine runs in process (a teacher actor) and is then SIGKILLed, as Ray ends an actor,
    leaves no Intel OpenMP registration file in /dev/shm: its watcher removes it."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = (
        "import os, signal\n"
        "from ray_cartridges.engine_env import set_engine_env\n"
        "open(f'/dev/shm/__KMP_REGISTERED_LIB_{os.getpid()}_0', 'w').close()\n"
        "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
        "set_engine_env(cpu=True)\n"
        "print(os.getpid(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == -9, out.stderr
    left = Path(f"/dev/shm/__KMP_REGISTERED_LIB_{out.stdout.strip()}_0")
    deadline = time.time() + 10
    while left.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not left.exists()
