"""The evaluation metrics themselves."""

import json

import pytest
import torch
from helpers import bundled_meta

from ray_cartridges.eval.metrics import kl_per_token
from ray_cartridges.scoring import score_answer


def test_kl_of_a_distribution_to_itself_is_zero_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(5, 100)
    assert torch.allclose(kl_per_token(a, a), torch.zeros(5), atol=1e-6)
    assert torch.allclose(kl_per_token(a, a + 3.0), torch.zeros(5), atol=1e-5)  # logits shift: same distribution
    b = torch.randn(5, 100)
    kl = kl_per_token(a, b)
    assert (kl > 0).all()
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(b, -1), torch.log_softmax(a, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(kl, ref, atol=1e-5)


def test_answer_scoring_on_known_cases():
    ref = "The station doctor is Dr. Amara Okafor."
    q = "Who is the station doctor?"
    assert score_answer("The station doctor is Dr. Amara Okafor.", ref, q)["exact"]
    good = score_answer("It's Dr. Amara Okafor, I believe.", ref, q)
    assert good["correct"] and not good["exact"] and good["key_recall"] == 1.0
    wrong = score_answer("The station doctor is Dr. Elena Martinez.", ref, q)
    assert not wrong["correct"] and wrong["key_recall"] < 0.5
    assert score_answer(
        "The padlock code is 7391.",
        "The fuel store padlock code is 7391.",
        "What is the code for the fuel store padlock?",
    )["correct"]
    assert not score_answer(
        "The code is 7390.", "The fuel store padlock code is 7391.", "What is the code for the fuel store padlock?"
    )["correct"]
    assert score_answer("anything", "", "")["correct"] is False


def test_perplexity_with_an_empty_effect_cartridge_matches_the_base_model(tiny_model, tokenizer):
    model = tiny_model  # mechanics: a random model reads as any other
    from ray_cartridges.eval.evaluate import perplexity

    text = "Bread dough needs time to rise before it is baked in a hot oven."
    base = perplexity(model, tokenizer, text)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    ref = float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert abs(base - ref) / ref < 1e-4


def test_text_cartridge_no_harm_equals_its_text_in_context(tiny_model, tokenizer):
    """The ICL reference of no harm: a cartridge made from a text (all of its tokens) must read unrelated text
    exactly as the model does with that text in context; a different prefix must not."""
    model = tiny_model  # mechanics: a random model reads as any other
    from ray_cartridges.cartridge import create_cartridge, layer_kv
    from ray_cartridges.eval.evaluate import no_harm, perplexity_after_text

    prefix = "The spare generator key is in the blue tin above the workbench in Hut B."
    text = "Bread dough needs time to rise before it is baked in a hot oven."
    p = len(tokenizer(prefix).input_ids)
    peft = create_cartridge(model, num_tokens=p, num_frozen_tokens=1, method="text", tokenizer=tokenizer, text=prefix)
    kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)]
    base_model = peft.get_base_model()
    harm = no_harm(base_model, tokenizer, kv, text, memory_text=prefix)
    assert harm["ppl_cartridge"] == __import__("pytest").approx(harm["ppl_icl"], rel=1e-4)
    assert harm["ratio"] == __import__("pytest").approx(harm["ppl_cartridge"] / harm["ppl_base"])
    other = perplexity_after_text(base_model, tokenizer, "Completely different words come first here.", text)
    assert abs(other - harm["ppl_cartridge"]) / harm["ppl_cartridge"] > 1e-3
    assert harm["paragraphs"] is None  # one paragraph: nothing more to read


def test_paragraph_harm_is_the_mean_over_paragraphs_read_alone(tiny_model, tokenizer):
    model = tiny_model  # mechanics: a random model reads as any other
    import pytest

    from ray_cartridges.cartridge import create_cartridge, layer_kv
    from ray_cartridges.eval.evaluate import no_harm, perplexity, perplexity_after_text, perplexity_chat

    prefix = "The spare generator key is in the blue tin above the workbench in Hut B."
    paras = [
        "Bread dough needs time to rise before it is baked in a hot oven.",
        "A bicycle chain moves power from the pedals to the rear wheel.",
        "Old maps often show sea monsters in the empty parts of the ocean.",
    ]
    p = len(tokenizer(prefix).input_ids)
    peft = create_cartridge(model, num_tokens=p, num_frozen_tokens=1, method="text", tokenizer=tokenizer, text=prefix)
    kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)]
    m = peft.get_base_model()
    harm = no_harm(m, tokenizer, kv, "\n\n".join(paras) + "\n", memory_text=prefix)["paragraphs"]
    assert harm["count"] == 3
    raw = [perplexity(m, tokenizer, x, kv) / perplexity(m, tokenizer, x) for x in paras]
    chat = [perplexity_chat(m, tokenizer, x, kv) / perplexity_chat(m, tokenizer, x) for x in paras]
    chat_icl = [perplexity_chat(m, tokenizer, x, system=prefix) / perplexity_chat(m, tokenizer, x) for x in paras]
    assert harm["raw"]["ratio"] == pytest.approx(sum(raw) / 3, rel=1e-4)
    assert harm["chat"]["ratio"] == pytest.approx(sum(chat) / 3, rel=1e-4)
    assert harm["chat"]["ratio_icl"] == pytest.approx(sum(chat_icl) / 3, rel=1e-4)
    # a text cartridge reads each paragraph as its text in context does
    icl = [perplexity_after_text(m, tokenizer, prefix, x) / perplexity(m, tokenizer, x) for x in paras]
    assert harm["raw"]["ratio_icl"] == pytest.approx(sum(icl) / 3, rel=1e-4)
    assert harm["raw"]["ratio"] == pytest.approx(harm["raw"]["ratio_icl"], rel=1e-4)


def test_chat_perplexity_scores_only_the_answer_turn(tiny_model, tokenizer):
    """No harm as the agent reads it: the unrelated text is the assistant's turn of a chat; only its tokens
    (and the end-of-turn marker) are scored, the same tokens with and without a prefix."""
    model = tiny_model  # mechanics: a random model reads as any other
    from ray_cartridges.eval.evaluate import CHAT_REQUEST, perplexity_chat

    text = "Bread dough needs time to rise before it is baked in a hot oven."
    msgs = [{"role": "user", "content": CHAT_REQUEST}]
    pre = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": text}], tokenize=True, return_dict=False
    )
    ids = torch.tensor([list(full)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[len(pre) - 1 : -1], ids[0, len(pre) :])
    assert perplexity_chat(model, tokenizer, text) == __import__("pytest").approx(float(torch.exp(ref)), rel=1e-4)
    # a different request changes the context, not which tokens are scored
    other = perplexity_chat(model, tokenizer, text, request="Say something.")
    assert other != __import__("pytest").approx(float(torch.exp(ref)), rel=1e-4)


def test_no_harm_chunks_raw_chat_and_both(tokenizer):
    from ray_cartridges.train.no_harm import no_harm_chunks

    text = " ".join(f"word{i}" for i in range(400))
    raw = no_harm_chunks(tokenizer, text, 32, "raw")
    chat = no_harm_chunks(tokenizer, text, 32, "chat", system_prompt="Be brief.")
    both = no_harm_chunks(tokenizer, text, 32, "both")
    assert all(len(c) == 32 for c in raw) and len(chat) == len(raw) and len(both) == 2 * len(raw)
    assert both[0::2] == raw
    for r, c in zip(raw, chat):
        s = tokenizer.decode(c)
        assert tokenizer.decode(r) in s and "Be brief." in s and s.count("<|im_start|>") == 3
    assert "Be brief." not in tokenizer.decode(both[1])


def test_no_harm_targets_are_the_bare_models_top_k_made_on_first_use(tiny_model, tokenizer):
    model = tiny_model  # mechanics: a random model reads as any other
    import contextlib

    from ray_cartridges.cartridge import create_cartridge
    from ray_cartridges.train.no_harm import NoHarmTargets, no_harm_chunks

    prefix = "The station doctor is Dr. Amara Okafor. The supply boat comes on Thursdays at ten. " * 3
    pm = create_cartridge(model, num_tokens=24, method="text", tokenizer=tokenizer, text=prefix)
    text = "Bread dough needs time to rise. The baker kneads it until it is smooth, then leaves it warm. " * 6
    chunks = no_harm_chunks(tokenizer, text, 20, "raw")
    targets = NoHarmTargets(pm, chunks, torch.device("cpu"), 5, contextlib.nullcontext)
    x, ids, lp = targets.get(2)
    assert set(targets.cache) == {2}  # only what was asked for
    with torch.no_grad():
        bare = torch.log_softmax(model(torch.tensor([chunks[2]])).logits[0, :-1], -1).topk(5, -1)
        with_cart = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1]
    assert x.tolist() == [chunks[2]]
    assert torch.equal(ids, bare.indices) and torch.allclose(lp, bare.values, atol=1e-5)
    # the targets are the bare model's, not the cartridge-reading model's
    assert not torch.allclose(torch.log_softmax(with_cart, -1).gather(-1, ids), lp, atol=1e-2)
    assert targets.get(2)[1] is ids  # kept, not made again
    targets.compute_all()
    assert set(targets.cache) == set(range(len(chunks)))


def test_fidelity_and_no_harm_with_a_shared_cache_match_fresh_readings(tiny_model, tokenizer):
    """A sweep shares the cartridge-independent readings between evaluations: same figures as without, and a
    second cartridge read through the same cache gets its own cartridge readings."""
    model = tiny_model  # mechanics: a random model reads as any other
    from ray_cartridges.cartridge import create_cartridge, layer_kv
    from ray_cartridges.eval.evaluate import fidelity, no_harm

    memory_text = "The spare generator key is in the blue tin above the workbench in Hut B."
    user, answer = "Where is the spare generator key?", "It is in the blue tin above the workbench."
    a_ids = tokenizer(answer).input_ids
    rec = {"messages": [{"content": memory_text}, {"content": user}, {"content": answer, "token_ids": a_ids}]}

    def kv_of(text):
        p = len(tokenizer(text).input_ids)
        peft = create_cartridge(model, num_tokens=p, num_frozen_tokens=1, method="text", tokenizer=tokenizer, text=text)
        return [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(peft)], peft.get_base_model()

    kv1, base = kv_of(memory_text)
    kv2, _ = kv_of("Dinner is served at half past six in the mess hall.")
    text = "Bread dough needs time to rise before it is baked in a hot oven."
    cache: dict = {}
    for kv in (kv1, kv2):
        fresh_f, fresh_h = fidelity(base, tokenizer, kv, [rec]), no_harm(base, tokenizer, kv, text, memory_text)
        cached_f, cached_h = (
            fidelity(base, tokenizer, kv, [rec], cache=cache),
            no_harm(base, tokenizer, kv, text, memory_text, cache=cache),
        )
        for k in ("kl_no_memory", "kl_cartridge", "icl_gap_closed"):
            assert cached_f[k] == __import__("pytest").approx(fresh_f[k], rel=1e-5, abs=1e-7)
        assert cached_h["ratio"] == __import__("pytest").approx(fresh_h["ratio"], rel=1e-5)
        assert cached_h["chat"]["ratio_icl"] == __import__("pytest").approx(fresh_h["chat"]["ratio_icl"], rel=1e-5)
    assert any(k[0] == "fidelity" for k in cache) and any(k[0] == "no_harm" for k in cache)
    assert fidelity(base, tokenizer, kv1, [rec], cache=cache)["kl_cartridge"] != __import__("pytest").approx(
        fidelity(base, tokenizer, kv2, [rec], cache=cache)["kl_cartridge"], rel=1e-3
    )


def test_fidelity_measures_against_the_given_teacher_context_not_the_generating_one(tiny_model, tokenizer):
    """Focused replay and chunk-answered self-study are generated by a teacher that read part of the memory;
    fidelity measures against the teacher with the whole memory in context when it is given."""
    model = tiny_model  # mechanics: a random model reads as any other
    import pytest

    from ray_cartridges.eval.evaluate import fidelity

    memory_text = "The station doctor is Dr. Amara Okafor. The supply boat arrives every Thursday at 10 am."
    part = "The supply boat arrives every Thursday at 10 am."
    user, answer = "Who is the station doctor?", "The station doctor is Dr. Amara Okafor."
    a_ids = tokenizer(answer).input_ids

    def rec(system):
        return {"messages": [{"content": system}, {"content": user}, {"content": answer, "token_ids": a_ids}]}

    whole = fidelity(model, tokenizer, None, [rec(memory_text)])
    partial = fidelity(model, tokenizer, None, [rec(part)])
    overridden = fidelity(model, tokenizer, None, [rec(part)], teacher_context=memory_text)
    assert overridden["kl_no_memory"] == pytest.approx(whole["kl_no_memory"], rel=1e-4)
    assert partial["kl_no_memory"] != pytest.approx(whole["kl_no_memory"], rel=1e-2)
    # no cartridge: the "cartridge" reading is the bare student, the same as no memory
    assert overridden["kl_cartridge"] == pytest.approx(overridden["kl_no_memory"], rel=1e-4)


def test_evaluation_reads_the_memory_as_generate_rendered_it(
    tmp_path, tiny_model_dir, tokenizer, memory, teacher_jsonl
):
    """The memory.txt that `generate` writes beside the dataset (here with a custom history_template) is the
    in-context reference of fidelity and no harm, not the memory re-rendered with the default template.
    (Student: the tiny random Llama; what is checked is which text each reading reads.)"""
    import dataclasses

    import pytest

    from ray_cartridges.agent.kv_memory import KVCacheMemory
    from ray_cartridges.batching import heldout_keys
    from ray_cartridges.cartridge import create_cartridge, save_cartridge
    from ray_cartridges.eval.evaluate import evaluate_cartridge, fidelity, perplexity_after_text

    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.jsonl").write_text(teacher_jsonl.read_text())
    custom = memory.render(template="Notes kept by the agent:\n{experiences}\n\n{system_prompt}")
    assert custom != memory.render()
    (data / "memory.txt").write_text(custom)
    from ray_cartridges.models import load_model

    model = load_model(str(tiny_model_dir))
    pm = create_cartridge(model, num_tokens=16, method="text", tokenizer=tokenizer, text=memory.render())
    meta = dataclasses.replace(bundled_meta(model, tokenizer, 16), model_name=str(tiny_model_dir))
    save_cartridge(pm, tmp_path / "c", meta)
    text = "Bread dough needs time to rise before the baker shapes it."
    ev = evaluate_cartridge(
        tmp_path / "c",
        data / "dataset.jsonl",
        memory,
        eval_fraction=0.1,
        split_seed=0,
        max_questions=1,
        max_tokens=2,
        unrelated_text=text,
        engine="transformers",
    )
    assert ev["memory_context"] == str(data / "memory.txt")
    assert ev["no_harm"]["ppl_icl"] == pytest.approx(perplexity_after_text(model, tokenizer, custom, text), rel=1e-4)
    assert ev["no_harm"]["ppl_icl"] != pytest.approx(
        perplexity_after_text(model, tokenizer, memory.render(), text), rel=1e-3
    )
    records = [json.loads(line) for line in teacher_jsonl.read_text().splitlines()]
    held = heldout_keys([r["metadata"]["split_key"] for r in records], 0.1, 0)
    held_records = [r for r in records if r["metadata"]["split_key"] in held]
    kv = KVCacheMemory.from_dir(tmp_path / "c").kv
    ref = fidelity(model, tokenizer, kv, held_records, teacher_context=custom)
    assert ev["fidelity"]["kl_no_memory"] == pytest.approx(ref["kl_no_memory"], rel=1e-4)


def test_a_prefix_read_once_gives_the_logits_of_reading_it_again(tiny_model, tokenizer):
    """The memory in context is read once and continued from (fidelity teacher, no-harm ICL): the logits after
    it are those of reading the whole row; a row that does not start with it is read whole."""
    model = tiny_model  # mechanics: a random model reads as any other
    from ray_cartridges.chat import chat_template_ids
    from ray_cartridges.eval.evaluate import _read_after, _system_prefix

    store: dict = {}
    memory = "OBSERVATION: Where is the spare key?\nACTION: I asked.\nFEEDBACK: The spare key is in the blue tin."
    read = _system_prefix(model, tokenizer, memory, store)
    assert _system_prefix(model, tokenizer, memory, store) is read  # once per store
    user = {"role": "user", "content": "Where is the spare key?"}
    ids = (
        chat_template_ids(tokenizer, [{"role": "system", "content": memory}, user]) + tokenizer("In the tin.").input_ids
    )
    with torch.no_grad():
        logits, n = _read_after(model, ids, read)
        ref = model(torch.tensor([ids])).logits[0]
        assert n == len(read.ids) > 20
        assert torch.allclose(logits, ref[n:], atol=1e-4)
        other = chat_template_ids(tokenizer, [user])
        logits, n = _read_after(model, other, read)
        assert n == 0 and torch.allclose(logits, model(torch.tensor([other])).logits[0], atol=1e-5)


def test_the_kl_teacher_reads_a_memory_laid_out_in_turns_as_the_record_kept_it(tokenizer):
    """A record whose teacher read the memory as chat turns (``teacher_messages``) is scored against that
    prompt, the same as handing fidelity the whole memory as those turns; its system message alone is another."""
    from helpers import tiny_llama

    from ray_cartridges.eval.evaluate import fidelity
    from ray_cartridges.generate.records import make_record
    from ray_cartridges.memory import MemoryContext

    model = tiny_llama(vocab=len(tokenizer), seed=3)
    kv = [(torch.randn(2, 4, 16), torch.randn(2, 4, 16)) for _ in range(2)]
    ctx = MemoryContext(
        (
            ("system", "You help."),
            ("user", "Where is the key?"),
            ("assistant", "In the shed?"),
            ("user", "No: the tin."),
        )
    )
    answer = tokenizer("It is in the tin.").input_ids
    rec = make_record(
        tokenizer,
        context=ctx.to_json(),
        user="Where is the key?",
        answer_ids=answer,
        entries=[{}] * len(answer),
        metadata={},
    )
    assert rec["teacher_messages"][1:4] == [{"role": r, "content": c} for r, c in ctx.messages[1:]]
    own = fidelity(model, tokenizer, kv, [rec])
    given = fidelity(model, tokenizer, kv, [rec], teacher_context=ctx)
    assert own["kl_no_memory"] == pytest.approx(given["kl_no_memory"], rel=1e-4)
    assert own["kl_cartridge"] == pytest.approx(given["kl_cartridge"], rel=1e-4)
    system_only = fidelity(model, tokenizer, kv, [{k: v for k, v in rec.items() if k != "teacher_messages"}])
    assert system_only["kl_no_memory"] != pytest.approx(own["kl_no_memory"], rel=1e-3)


def test_fidelity_of_a_mix_of_strategies_reads_each_kind_as_it_reads_alone(tiny_model, tokenizer):
    """A held-out set of replay and recital records: each strategy family's reading is the reading of its
    records alone, and the whole is their token-weighted mean (runs that add recitals compare on the rest)."""
    import pytest

    from ray_cartridges.eval.evaluate import fidelity

    memory_text = "The station doctor is Dr. Amara Okafor. The supply boat arrives every Thursday at 10 am."

    def rec(user, answer, strategy):
        ids = tokenizer(answer).input_ids
        msgs = [{"content": memory_text}, {"content": user}, {"content": answer, "token_ids": ids}]
        return {"messages": msgs, "metadata": {"strategy": strategy}}

    replay = [rec("Who is the station doctor?", "Dr. Amara Okafor.", "replay/focused")]
    recite = [
        rec("What does the text say?", memory_text, "recite/text"),
        rec("When does the boat come?", "Every Thursday at 10 am.", "recite"),
    ]
    whole = fidelity(tiny_model, tokenizer, None, replay + recite)
    alone = {
        "replay": fidelity(tiny_model, tokenizer, None, replay),
        "recite": fidelity(tiny_model, tokenizer, None, recite),
    }
    assert set(whole["by_strategy"]) == {"replay", "recite"} and "by_strategy" not in alone["replay"]
    for family, reading in alone.items():
        for k in ("kl_no_memory", "tokens", "conversations"):
            assert whole["by_strategy"][family][k] == pytest.approx(reading[k], rel=1e-5)
    tokens = sum(r["tokens"] for r in alone.values())
    assert whole["tokens"] == tokens and whole["conversations"] == 3
    mixed = sum(r["kl_no_memory"] * r["tokens"] for r in alone.values()) / tokens
    assert whole["kl_no_memory"] == pytest.approx(mixed, rel=1e-5)
    assert alone["replay"]["kl_no_memory"] != pytest.approx(alone["recite"]["kl_no_memory"], rel=1e-2)


def test_recall_on_a_facts_value_needs_the_value_and_not_the_references_other_words():
    from helpers import EXAMPLE_CHECKPOINT, REPO

    from ray_cartridges.memory import read_facts
    from ray_cartridges.scoring import score_answer

    ref, q = "My physio appointment takes place in Room 4C.", "In which room is my physio appointment held?"
    right, echo = "It is held in Room 4C.", "It takes place in a room."
    assert not score_answer(right, ref, q)["correct"] and score_answer(right, ref, q, value="Room 4C")["correct"]
    assert not score_answer(echo, ref, q, value="Room 4C")["correct"]
    ref, q = "My pottery class starts at 9:40 am.", "When does my pottery class begin?"
    assert not score_answer("It begins at 11:30 am.", ref, q, value="9:40 am")["correct"]
    assert score_answer("At 9:40 am.", ref, q, value="9:40 am")["correct"]
    ref, q = "The access code for my Spanish course is 7153.", "Which code opens my Spanish course?"
    assert score_answer("The access code for it.", ref, q)["correct"]  # the old rule's false hit
    assert not score_answer("The access code for it.", ref, q, value="7153")["correct"]
    dev = REPO / "examples" / "dev_memories"
    for ckpt in (EXAMPLE_CHECKPOINT, dev / "team_qa", dev / "assistant_log", dev / "tool_agent", dev / "documents"):
        for f in read_facts(ckpt):  # a value is the answer's own words, so the answer itself scores right
            assert f.value and score_answer(f.answer, f.answer, f.heldout[0], value=f.value)["correct"], f


def test_eval_defaults_to_the_split_the_cartridge_was_trained_without(tmp_path, capsys):
    """`ray-cartridges eval` holds out what the cartridge's training held out (its distillation_config.yaml);
    another split given on the command line is used, with a warning that it holds rows the cartridge trained on."""
    from ray_cartridges.cli import eval_split
    from ray_cartridges.config.train import InputDatasetConfig

    cart = tmp_path / "cartridge"
    cart.mkdir()
    (cart / "distillation_config.yaml").write_text(
        "input_dataset:\n  local_path: data\n  eval_fraction: 0.3\n  split_seed: 5\n"
    )
    assert eval_split(str(cart), None, None) == (0.3, 5)
    assert eval_split(str(cart), 0.3, 5) == (0.3, 5) and capsys.readouterr().err == ""
    assert eval_split(str(cart), 0.1, None) == (0.1, 5)
    err = capsys.readouterr().err
    assert "eval_fraction=0.3, split_seed=5" in err and "include rows it was trained on" in err

    imported = tmp_path / "imported"  # no training config beside it: the training defaults, no warning
    imported.mkdir()
    fields = InputDatasetConfig.model_fields
    assert eval_split(str(imported), None, None) == (fields["eval_fraction"].default, fields["split_seed"].default)
    assert eval_split(str(imported), 0.2, 1) == (0.2, 1) and capsys.readouterr().err == ""
