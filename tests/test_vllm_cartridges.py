"""Cartridges inside vLLM (KV connector): the same answers as vLLM on the text and as the transformers reference,
many cartridges in one batch, prefix-cache reuse, fit checks. The gate for vLLM upgrades."""

import shutil

import pytest
import torch
from helpers import BUNDLED, bundled_meta, tiny_llama

pytestmark = pytest.mark.timeout(900)

QUESTIONS = ["Who is the station doctor?", "What is the cook's name?", "Where is the satellite phone?"]


def _text_cartridge(path, model, tokenizer, text, p=64):
    from ray_cartridges.cartridge import create_cartridge, save_cartridge

    pm = create_cartridge(model, num_tokens=p, method="text", tokenizer=tokenizer, text=text)
    save_cartridge(pm, path, bundled_meta(model, tokenizer, p))
    return path


@pytest.fixture(scope="module")
def cartridges(tmp_path_factory, model, tokenizer, memory):
    """Three text cartridges of different texts and a perturbed copy of the first."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("vllm_carts")
    text = memory.render()
    words = text.split()
    out = {
        "a": _text_cartridge(root / "a", model, tokenizer, text),
        "b": _text_cartridge(root / "b", model, tokenizer, " ".join(words[200:])),
        "c": _text_cartridge(root / "c", model, tokenizer, " ".join(words[400:])),
    }
    shutil.copytree(out["a"], root / "noisy")
    w = load_file(root / "noisy" / "adapter_model.safetensors")["prompt_embeddings"]
    gen = torch.Generator().manual_seed(0)
    noisy = w + 2.0 * w.std() * torch.randn(w.shape, generator=gen)
    save_file({"prompt_embeddings": noisy.contiguous()}, str(root / "noisy" / "adapter_model.safetensors"))
    out["noisy"] = root / "noisy"
    return out


@pytest.fixture(scope="module")
def engine():
    """One engine for the module; at the end, ``shutdown`` must end every process it started."""
    import psutil

    from ray_cartridges.vllm_cartridges import CartridgeLLM

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    eng = CartridgeLLM(BUNDLED, dtype="fp32", block_size=32, enforce_eager=True, max_model_len=2048)
    # multiprocessing's resource tracker is the process's own, shared by whatever it starts: not the engine's
    started = [
        p
        for p in me.children(recursive=True)
        if p.pid not in before and not any("resource_tracker" in a for a in p.cmdline())
    ]
    yield eng
    eng.shutdown()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert started and not alive, f"vLLM processes left after shutdown: {alive}"


def _ids(tokenizer, q):
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )


def _max_lp_diff(a, b):
    return max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a.logprobs, b.logprobs))


def test_text_cartridge_in_vllm_equals_vllm_on_the_text_and_the_transformers_reference(
    engine, cartridges, model, tokenizer, memory
):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.agent.decoding import SamplingParams
    from ray_cartridges.cartridge import init_token_ids

    cart = engine.add_cartridge("a", cartridges["a"])
    text_ids = init_token_ids(tokenizer, memory.render(), 64)[0].tolist()
    sp = SamplingParams(max_tokens=24, top_logprobs=5)
    qs = [_ids(tokenizer, q) for q in QUESTIONS]
    via_cartridge = engine.generate([(cart, q) for q in qs], sp)
    on_text = engine.generate([(None, text_ids + q) for q in qs], sp)
    cfg = KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(cartridges["a"]))), engine="transformers")
    reference = KVMemoryAgent(cfg, model=model, tokenizer=tokenizer).complete(
        [[{"role": "user", "content": q}] for q in QUESTIONS], sp
    )
    for c, t, r in zip(via_cartridge, on_text, reference):
        assert len(c.token_ids) >= 4
        assert c.token_ids == t.token_ids == r.token_ids
        assert _max_lp_diff(c, t) < 1e-3 and _max_lp_diff(c, r) < 1e-3
        assert c.text == r.text


def test_a_perturbed_cartridge_changes_the_answer_from_its_first_token(engine, cartridges, tokenizer):
    from ray_cartridges.agent.decoding import SamplingParams

    a, noisy = engine.add_cartridge("a", cartridges["a"]), engine.add_cartridge("noisy", cartridges["noisy"])
    assert a.cache_salt != noisy.cache_salt  # same placeholders, other content: never one prefix-cache entry
    sp = SamplingParams(max_tokens=8, top_logprobs=5)
    q = _ids(tokenizer, QUESTIONS[0])
    x, y = engine.generate([(a, q), (noisy, q)], sp)
    assert x.token_ids != y.token_ids
    assert abs(x.logprobs[0]["logprob"] - y.logprobs[0]["logprob"]) > 1e-2 or x.token_ids[0] != y.token_ids[0]


def test_three_cartridges_and_a_plain_request_in_one_batch_equal_their_single_runs(engine, cartridges, tokenizer):
    from ray_cartridges.agent.decoding import SamplingParams

    carts = [engine.add_cartridge(n, cartridges[n]) for n in ("a", "b", "c")]
    q = _ids(tokenizer, QUESTIONS[1])
    reqs = [(c, q) for c in carts] + [(None, q)]
    sp = SamplingParams(max_tokens=16, top_logprobs=3)
    batch = engine.generate(reqs, sp)
    single = [engine.generate([r], sp)[0] for r in reqs]
    assert len({tuple(b.token_ids) for b in batch}) >= 2  # the cartridges are what differs
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids and _max_lp_diff(b, s) < 1e-3
    # every cartridge request went through the connector; the plain one did not
    assert [b.cartridge_tokens_loaded is not None for b in batch] == [True, True, True, False]


def test_a_cartridges_second_request_loads_nothing(engine, cartridges, tokenizer):
    from ray_cartridges.agent.decoding import SamplingParams
    from ray_cartridges.vllm_cartridges.engine import vllm_prompt, vllm_sampling

    cart = engine.add_cartridge("c-again", cartridges["c"])  # another name: another salt, a cold cache
    sp = SamplingParams(max_tokens=4)
    first = engine.generate([(cart, _ids(tokenizer, QUESTIONS[0]))], sp)[0]
    second = engine.generate([(cart, _ids(tokenizer, QUESTIONS[2]))], sp)[0]
    assert first.cartridge_tokens_loaded == 64 and second.cartridge_tokens_loaded == 0
    # a placeholder prompt is only ever built with its cartridge's salt and transfer params
    prompt, params = vllm_prompt(cart, [5, 6]), vllm_sampling(sp, cart)
    assert prompt["prompt_token_ids"][:64] == [0] * 64 and prompt["cache_salt"] == cart.cache_salt
    assert params.extra_args["kv_transfer_params"]["cartridge"]["sha256"] == cart.params.sha256
    assert "cache_salt" not in vllm_prompt(None, [5, 6]) and vllm_sampling(sp, None).extra_args is None


def test_a_cartridge_made_for_another_model_or_broken_is_refused(engine, tmp_path, tokenizer):
    from ray_cartridges.cartridge import (
        CartridgeMeta,
        CartridgeMismatchError,
        ModelShape,
        create_cartridge,
        save_cartridge,
    )
    from ray_cartridges.vllm_cartridges import UnknownCartridge

    tiny = tiny_llama()
    pm = create_cartridge(tiny, num_tokens=8)
    save_cartridge(pm, tmp_path / "tiny", CartridgeMeta("tiny", ModelShape.of(tiny), 8, 1))
    with pytest.raises(CartridgeMismatchError) as err:
        engine.add_cartridge("tiny", tmp_path / "tiny")
    for field in ("num_layers", "num_kv_heads", "head_dim"):
        assert field in str(err.value)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        engine.add_cartridge("gone", tmp_path / "missing")
    with pytest.raises(UnknownCartridge):
        engine.cartridges.get("never-added")


def test_vllm_agents_share_one_engine_and_the_history_agent_uses_its_prefix_cache(engine, cartridges):
    from helpers import EXAMPLE_CHECKPOINT

    from ray_cartridges.agent import (
        HistoryAgent,
        HistoryAgentConfig,
        KVArtifact,
        KVCacheMemoryConfig,
        KVMemoryAgent,
        KVMemoryAgentConfig,
    )

    agent = KVMemoryAgent(KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(cartridges["a"])))), engine=engine)
    assert (
        agent.model is None and agent.num_tokens == 64 and agent.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
    )
    icl = HistoryAgent(HistoryAgentConfig(checkpoint_dir=str(EXAMPLE_CHECKPOINT)), engine=engine)
    assert "Okafor" in icl.chat([{"role": "user", "content": "Who is the station doctor?"}], max_tokens=24)


def test_recall_on_vllm_gives_the_answers_of_the_transformers_reference(engine, cartridges, model, tokenizer, memory):
    from ray_cartridges.agent.kv_memory import KVCacheMemory
    from ray_cartridges.eval.evaluate import _recall_agents, recall
    from ray_cartridges.memory import memory_questions

    mem = KVCacheMemory.from_dir(cartridges["a"], model=model, tokenizer=tokenizer)
    qs = memory_questions(memory)[:3]
    context = memory.context()  # the whole memory as the teacher reads it (the system layout)
    got = {}
    for name, cache in (("vllm", {"vllm_engine": engine}), ("transformers", {})):
        agents = {k: make() for k, make in _recall_agents(mem, memory, context, name, cache).items()}
        got[name] = recall(agents, qs, max_tokens=16)
    for agent in ("no_memory", "icl", "cartridge"):
        assert [a["answer"] for a in got["vllm"][agent]["answers"]] == [
            a["answer"] for a in got["transformers"][agent]["answers"]
        ], agent
    assert got["vllm"]["icl"]["answers"] != got["vllm"]["no_memory"]["answers"]


def test_a_serve_config_with_a_cartridge_that_cannot_load_fails_before_the_engine_starts(cartridges, tmp_path):
    import shutil

    from ray_cartridges.config.serve import ServeConfig
    from ray_cartridges.serve.engine import ServeEngine

    broken = tmp_path / "broken"
    shutil.copytree(cartridges["a"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for cart, why in (
        (broken, rf"cartridge 'x' \({broken}\) cannot be served: {weights}: cannot read the cartridge weights"),
        (tmp_path / "missing", rf"cartridge 'x' \({tmp_path / 'missing'}\): cartridge directory not found"),
    ):
        cfg = ServeConfig(cartridges={"ok": str(cartridges["a"]), "x": str(cart)})
        with pytest.raises(ValueError, match=why):
            ServeEngine(cfg)
