"""Teacher generation through Ray Data with the real vLLM CPU engine on the bundled model."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import EXAMPLE_CHECKPOINT, REPO

from ray_cartridges.config import GenerateConfig, validate_config
from ray_cartridges.flat_topk import read_flat_topk, validate_row

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

SMALL = {
    "checkpoint_dir": str(EXAMPLE_CHECKPOINT),
    "model_name": "smollm2-135m-instruct",
    "dtype": "fp32",
    "temperature": 0.0,
    "max_tokens": 24,
    "top_logprobs": 10,
    "min_prob_mass": 0.95,
    "max_samples": 8,
    "shard_size": 2,
    # answered from a chunk, scored by the teacher with the whole memory (vLLM prompt logprobs)
    # (score_engine auto: on CPU the transformers scorer beside the vLLM engine; the killed-run test uses vLLM's)
    # one of the first 8 prompts (in the second shard: the killed run is stopped while it is scored)
    "self_study": {"num_samples": 3, "answer_context": "chunk", "targets": "full_memory"},
    "history_instructions": "These are your earlier experiences; answer from them.",
    "quiz": {"enabled": False},  # its plain-text question writing is tested in test_strategies
    # no torch.compile warm-up: ~40 s instead of ~150 s per engine start on a 2-core CPU (3 starts here)
    "enforce_eager": True,
}


def _cfg(out, **kw):
    return validate_config(GenerateConfig, {**SMALL, "output_dir": str(out), **kw})


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker`` (every process a run started inherits it)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and marker in p.environ().values():
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _records(out):
    return [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, ray_cluster):
    """A vLLM generation (vLLM also scores the rescored answers: the GPU default) stopped with SIGTERM once its
    first shard is written, then re-run to the end: the run the other tests read, and what the stop left."""
    import yaml

    from ray_cartridges.generate.pipeline import run_generation

    root = tmp_path_factory.mktemp("gen_vllm")
    out = root / "out"
    cfg = {**SMALL, "output_dir": str(out), "engine": "vllm", "score_engine": "vllm"}
    (root / "gen.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "ray_cartridges.cli", "generate", "--config", str(root / "gen.yaml")]
    marker = f"killed-run-{os.getpid()}-{time.time()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_CARTRIDGES_TEST_MARK": marker}
    shm_before = _shm()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / "shards"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(shards.glob("shard-*.parquet")):
        time.sleep(0.5)
    stopped = {"running_when_stopped": proc.poll() is None}
    # SIGTERM to the run's process group, as a terminal's Ctrl-C or a scheduler does: the vLLM engine core
    # lives in the Ray actor's own group and must end with it, its shared memory removed
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 90
    while time.time() < deadline and _processes_with(marker):
        time.sleep(1)
    stopped["alive"] = _processes_with(marker)
    stopped["shm_left"] = _shm() - shm_before
    stopped["shards"] = {p.name: p.read_bytes() for p in shards.glob("shard-*.parquet")}
    stopped["dataset_written"] = (out / "dataset.jsonl").exists()
    summary = run_generation(validate_config(GenerateConfig, cfg), progress=False)
    return out, summary, stopped


def test_every_row_is_valid_flat_topk_aligned_with_the_template(vllm_run, tokenizer):
    out, summary, _ = vllm_run
    recs = {r["metadata"]["prompt_id"]: r for r in _records(out)}
    assert summary["rows"] == len(recs) >= 6
    assert {r["metadata"]["strategy"].split("/")[0] for r in recs.values()} <= {"replay", "self_study"}
    table = read_flat_topk(out / "shards")
    assert table.num_rows == len(recs)
    V = len(tokenizer)
    for row in table.to_pylist():
        validate_row(row, vocab_size=V)  # schema, ids in vocab, logprobs <= 0, positions in range
        rec = recs[json.loads(row["metadata"])["prompt_id"]]
        answer = rec["messages"][-1]["token_ids"]
        assert rec["type"] == "memory_distillation" and rec["system_prompt"] == rec["messages"][0]["content"]
        assert rec["metadata"]["teacher_model"] == "smollm2-135m-instruct"
        pos = np.asarray(row["topk_pos"])
        lps = np.asarray(row["topk_logprobs"])
        ids = np.asarray(row["topk_ids"])
        uniq = np.unique(pos)
        assert [row["input_ids"][p] for p in uniq] == answer  # chat-template alignment
        for j, p in enumerate(uniq):
            sel = pos == p
            assert np.all(np.diff(lps[sel]) <= 0)  # sorted
            mass = np.exp(lps[sel]).sum()
            assert mass <= 1.0 + 1e-4 and (sel.sum() == 10 or mass >= 0.95)
            if "answer_context" not in rec["metadata"]:  # (a rescored answer: another teacher's top-1)
                assert ids[sel][0] == answer[j]  # temperature 0: sampled token is the top-1
        for e, tid in zip(rec["messages"][-1]["logprobs"]["content"], answer):
            assert e["token_id"] == tid and len(e["top_logprobs"]) == 10
    # the whole memory as the teacher reads it (the configured instructions), for text init and `eval`
    memory_txt = (out / "memory.txt").read_text()
    assert SMALL["history_instructions"] in memory_txt
    assert all(SMALL["history_instructions"] in r["messages"][0]["content"] for r in recs.values())


def test_chunk_answers_carry_the_whole_memory_teachers_logprobs(vllm_run, model, tokenizer):
    """self_study.targets: full_memory (scored by vLLM's prompt logprobs here; transformers' scorer is checked
    against the same reference in test_strategies): each stored entry is the distribution of the teacher with the
    whole memory in context at that answer token (transformers fp32 reference, teacher forcing), not the chunk
    teacher's that wrote the answer."""
    import torch

    from ray_cartridges.generate.teacher import chat_ids

    out, _, _ = vllm_run
    memory_txt = (out / "memory.txt").read_text()
    recs = [r for r in _records(out) if r["metadata"]["strategy"].startswith("self_study")]
    assert recs and all(r["messages"][0]["content"] == memory_txt != r["metadata"]["answer_context"] for r in recs)
    worst = 0.0
    for r in recs:
        answer = r["messages"][-1]["token_ids"]
        for system, expect_close in ((memory_txt, True), (r["metadata"]["answer_context"], False)):
            prompt = chat_ids(tokenizer, system, r["messages"][1]["content"])
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
            lp = lp[len(prompt) - 1 : len(prompt) + len(answer) - 1]
            diff = max(
                abs(e["logprob"] - float(lp[j, t]))
                for j, (e, t) in enumerate(zip(r["messages"][-1]["logprobs"]["content"], answer))
            )
            if expect_close:
                worst = max(worst, diff)
                for j, e in enumerate(r["messages"][-1]["logprobs"]["content"]):
                    assert e["token_id"] == answer[j]
                    assert len({t["token_id"] for t in e["top_logprobs"]} & set(lp[j].topk(10).indices.tolist())) >= 8
            else:
                assert diff > 1e-2  # the chunk teacher reads the answer otherwise
    assert worst < 1e-3, worst


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, ray_cluster):
    """The same generation with the transformers reference engine."""
    from ray_cartridges.generate.pipeline import run_generation

    out = tmp_path_factory.mktemp("gen_hf")
    return out, run_generation(_cfg(out, engine="transformers"), progress=False)


def test_vllm_matches_transformers_reference(vllm_run, hf_run):
    out, _, _ = vllm_run
    ref_out, _ = hf_run
    # replay prompts only: self-study questions are sampled, so both engines must answer the same questions
    ours = {r["metadata"]["prompt_id"]: r for r in _records(out) if r["metadata"]["strategy"].startswith("replay")}
    ref = {r["metadata"]["prompt_id"]: r for r in _records(ref_out) if r["metadata"]["strategy"].startswith("replay")}
    assert ours.keys() == ref.keys() and ours
    worst = 0.0
    for pid, r in ours.items():
        a, b = r["messages"][-1], ref[pid]["messages"][-1]
        assert a["token_ids"] == b["token_ids"], pid
        for ea, eb in zip(a["logprobs"]["content"], b["logprobs"]["content"]):
            ta = {t["token_id"]: t["logprob"] for t in ea["top_logprobs"]}
            tb = {t["token_id"]: t["logprob"] for t in eb["top_logprobs"]}
            common = ta.keys() & tb.keys()
            assert len(common) >= 8  # near-ties at the tail may swap the last entries
            worst = max(worst, max(abs(ta[t] - tb[t]) for t in common))
    assert worst < 1e-3, worst


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(vllm_run, hf_run):
    """Stopped mid-generation (the fixture), the run leaves no process and no shared memory behind and no
    dataset; re-run, it keeps the finished shards byte for byte, writes the rest, duplicates nothing, and its
    replay answers are the transformers reference teacher's, every one (sampled self-study questions differ
    between engines; their rows are checked in the tests above)."""
    out, _, stopped = vllm_run
    assert stopped["running_when_stopped"], "generation finished before it could be stopped"
    assert stopped["alive"] == [], "processes of the stopped run are still alive"
    assert stopped["shm_left"] == set(), "the stopped run left shared memory behind"
    assert 1 <= len(stopped["shards"]) < 4 and not stopped["dataset_written"]
    shards = out / "shards"
    assert all((shards / n).read_bytes() == data for n, data in stopped["shards"].items())
    got = _records(out)
    ids = [r["metadata"]["prompt_id"] for r in got]
    assert len(ids) == len(set(ids)) and read_flat_topk(shards).num_rows == len(got)

    def replay(records):
        return {
            r["metadata"]["prompt_id"]: r["messages"][-1]["token_ids"]
            for r in records
            if r["metadata"]["strategy"].startswith("replay")
        }

    assert replay(got) and replay(got) == replay(_records(hf_run[0]))  # none lost, none repeated, the same answers
    assert not list(shards.glob(".*"))  # no temporary files left behind


def test_a_changed_strategy_setting_regenerates_only_that_strategys_answers(hf_run, tmp_path):
    """Every shard is renamed by a self-study setting (prompts of all strategies share shards), but the replay
    answers are taken from the earlier shards, not written again; a conversion setting re-answers nothing."""
    import shutil

    from ray_cartridges.generate.pipeline import run_generation

    first_out, first = hf_run
    out = tmp_path / "rerun"
    shutil.copytree(first_out, out)
    # mark one replay record in the earlier shards: it comes back marked only if it was reused, not re-answered
    marked = None
    for f in sorted((out / "shards").glob("shard-*.jsonl")):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        for r in recs:
            if marked is None and r["metadata"]["strategy"].startswith("replay"):
                r["metadata"]["marker"] = "from the earlier shard"
                marked = r["metadata"]["prompt_id"]
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert marked
    old_shards = {p.name for p in (out / "shards").iterdir()}

    study = {**SMALL["self_study"], "question_temperature": 0.5}
    summary = run_generation(_cfg(out, engine="transformers", self_study=study), progress=False)
    got = _records(out)
    is_study = [r["metadata"]["strategy"].startswith("self_study") for r in got]
    assert 0 < sum(is_study) < len(got)
    assert summary["rows_reused_now"] == len(got) - sum(is_study)
    assert summary["rows_generated_now"] == sum(is_study)
    assert summary["shards_generated_now"] == summary["shards"]  # every shard renamed, none answered whole
    by_id = {r["metadata"]["prompt_id"]: r for r in got}
    assert len(by_id) == len(got)
    assert by_id[marked]["metadata"]["marker"] == "from the earlier shard"
    before = {r["metadata"]["prompt_id"]: r for r in _records(first_out)}
    for pid, r in by_id.items():
        if r["metadata"]["strategy"].startswith("replay"):
            assert r["messages"] == before[pid]["messages"], pid
    shards = out / "shards"
    assert not old_shards & {p.name for p in shards.iterdir()}  # the earlier config's shards are gone
    assert read_flat_topk(shards).num_rows == len(got)

    # a conversion setting: every shard rebuilt from the records, no prompt answered again
    entries = read_flat_topk(shards).column("topk_ids").combine_chunks().flatten()
    again = run_generation(_cfg(out, engine="transformers", self_study=study, min_prob_mass=0.5), progress=False)
    assert again["rows_generated_now"] == 0 and again["rows_reused_now"] == len(got) == again["rows"]
    assert [r["messages"] for r in _records(out)] == [r["messages"] for r in got]
    fewer = read_flat_topk(shards)
    assert fewer.num_rows == len(got)
    assert len(fewer.column("topk_ids").combine_chunks().flatten()) < len(entries)  # converted again, cut sooner


def test_more_teacher_actors_than_a_local_cluster_holds_is_a_clear_error(tmp_path, ray_cluster):
    """A fixed pool of vLLM actors waits for all of them: 3 actors of 1 CPU on the suite's 2-CPU cluster (which
    nothing can grow) stop before any engine starts, saying what is missing; nothing is written as a shard."""
    from ray_cartridges.generate.pipeline import run_generation

    with pytest.raises(ValueError, match=r"generation with num_threads=3 needs CPU 3 \(the cluster has 2\)"):
        run_generation(_cfg(tmp_path / "out", num_threads=3, shard_size=1), progress=False)
    assert not list((tmp_path / "out").rglob("shard-*"))


def test_the_engine_gets_the_resolved_block_size(monkeypatch):
    """The teacher's block size reaches vLLM's engine arguments (the CPU engine's own default, 128 tokens, would
    reuse no shared prompt start shorter than that); unset, vLLM chooses."""
    import vllm
    from vllm.platforms import current_platform

    from ray_cartridges.generate.engines import VLLMEngine

    seen = []

    class Recorder:
        def __init__(self, **kw):
            seen.append(kw)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm, "LLM", Recorder)
    VLLMEngine("m", dtype="fp32", block_size=32)
    VLLMEngine("m", dtype="fp32")
    assert seen[0]["block_size"] == 32 and "block_size" not in seen[1]
    assert seen[0]["enable_prefix_caching"]
    if current_platform.is_cpu():  # the CPU engine's own settings kept beside it
        assert seen[0]["enable_chunked_prefill"] is False
