"""KVMemoryAgent / HistoryAgent: the same replies as PEFT, batching that changes nothing, fit checks."""

import pytest
import torch
from helpers import EXAMPLE_CHECKPOINT


@pytest.fixture(scope="module")
def cartridge_dir(tmp_path_factory, model, tokenizer, memory):
    from ray_cartridges.cartridge import CartridgeMeta, ModelShape, create_cartridge, save_cartridge
    from ray_cartridges.models import tokenizer_fingerprint

    pm = create_cartridge(model, num_tokens=64, method="text", tokenizer=tokenizer, text=memory.render())
    meta = CartridgeMeta("smollm2-135m-instruct", ModelShape.of(model), 64, 1, tokenizer_fingerprint(tokenizer))
    path = tmp_path_factory.mktemp("agent") / "cartridge"
    save_cartridge(pm, path, meta)
    return path


def _agent(path, model, tokenizer, **kw):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig

    cfg = KVMemoryAgentConfig(
        memory_config=KVCacheMemoryConfig(artifact=KVArtifact(id=str(path), source="local", force_redownload=False)),
        **kw,
    )
    return KVMemoryAgent(cfg, model=model, tokenizer=tokenizer)


QUESTIONS = ["Who is the station doctor?", "What is the cook's name?", "Where is the satellite phone?"]


def test_peft_loaded_cartridge_and_agent_give_the_same_greedy_reply(cartridge_dir, tokenizer):
    from peft import PeftModel

    from ray_cartridges.models import load_model

    agent = _agent(cartridge_dir, load_model("smollm2-135m-instruct"), tokenizer)
    peft = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), str(cartridge_dir))
    for q in QUESTIONS[:2]:
        msgs = [{"role": "user", "content": q}]
        ids = torch.tensor([agent.prompt_ids(msgs)])
        with torch.no_grad():
            out = peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        want = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert agent.chat(msgs, max_tokens=20) == want


def test_batched_conversations_equal_one_at_a_time(cartridge_dir, model, tokenizer):
    agent = _agent(cartridge_dir, model, tokenizer)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    from ray_cartridges.agent.decoding import SamplingParams

    batched = agent.complete(convs, SamplingParams(max_tokens=16))
    single = [agent.complete([c], SamplingParams(max_tokens=16))[0] for c in convs]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    # one cartridge serves the whole batch: every row of the cache starts with the same p tokens
    from ray_cartridges.agent.decoding import build_cache

    cache = build_cache(model, agent.prefix_kv(), 3)
    k0 = cache.layers[0].keys
    assert k0.shape[0] == 3 and torch.equal(k0[0], k0[2]) and torch.equal(k0[0], agent.prefix_kv()[0][0])


def test_stop_strings_and_sampling_options(cartridge_dir, model, tokenizer):
    agent = _agent(cartridge_dir, model, tokenizer)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    full = agent.chat(msgs, max_tokens=24)
    word = full.split()[2]
    cut = agent.chat(msgs, max_tokens=24, stop=[word])
    assert word not in cut and full.startswith(cut)
    from ray_cartridges.agent.decoding import SamplingParams

    a = agent.complete([msgs], SamplingParams(temperature=1.0, max_tokens=12, seed=3))
    b = agent.complete([msgs], SamplingParams(temperature=1.0, max_tokens=12, seed=3))
    assert a[0].token_ids == b[0].token_ids  # seeded sampling is reproducible


def test_history_agent_reads_the_memory_in_context(model, tokenizer):
    from ray_cartridges.agent import HistoryAgent, HistoryAgentConfig

    agent = HistoryAgent(HistoryAgentConfig(checkpoint_dir=str(EXAMPLE_CHECKPOINT)), model=model, tokenizer=tokenizer)
    ids = agent.prompt_ids([{"role": "user", "content": "Who is the station doctor?"}])
    text = tokenizer.decode(ids)
    assert "FEEDBACK: The station doctor is Dr. Amara Okafor." in text and text.count("<|im_start|>system") == 1
    assert "Okafor" in agent.chat([{"role": "user", "content": "Who is the station doctor?"}], max_tokens=24)


def test_cartridge_for_another_model_is_refused_by_the_agent(cartridge_dir, tokenizer):
    from helpers import tiny_llama

    from ray_cartridges.cartridge import CartridgeMismatchError

    with pytest.raises(CartridgeMismatchError, match="num_layers"):
        _agent(cartridge_dir, tiny_llama(), tokenizer)


def test_chat_command_answers_each_turn_with_the_whole_conversation(
    cartridge_dir, model, tokenizer, monkeypatch, capsys
):
    """`ray-cartridges chat`: each reply is the agent's reply to the conversation so far; an empty line quits."""
    import logging

    from ray_cartridges import cli

    for var, quiet in cli.CHAT_QUIET_ENV.items():  # what chat sets, undone after the test
        monkeypatch.setenv(var, quiet)
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    lines = iter([QUESTIONS[0], QUESTIONS[1], ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    argv = ["chat", "--cartridge", str(cartridge_dir), "--engine", "transformers", "--max-tokens", "12"]
    assert cli.main(argv) == 0
    replies = [line.removeprefix("agent> ") for line in capsys.readouterr().out.splitlines() if "agent> " in line]

    agent = _agent(cartridge_dir, model, tokenizer)
    history = [{"role": "user", "content": QUESTIONS[0]}]
    first = agent.chat(history, max_tokens=12)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": QUESTIONS[1]}]
    assert replies == [first, agent.chat(history, max_tokens=12)]
    assert replies[1] != agent.chat(history[-1:], max_tokens=12)  # the first turn was read: it changes the second reply
