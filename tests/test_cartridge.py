import pytest
import torch
from helpers import bundled_meta, tiny_llama

from ray_cartridges.cartridge import (
    CartridgeMeta,
    CartridgeMismatchError,
    ModelShape,
    create_cartridge,
    encoder,
    layer_kv,
    load_cache_pt,
    load_cartridge,
    save_cartridge,
)

TEXT = (
    "The lighthouse keeper logged the ships every evening. A red ketch named Albatross anchored in the bay "
    "on Tuesday, and a grey trawler left before dawn. The keeper wrote that the fog horn was repaired. "
) * 3


def _meta(model, tok, p, frozen):
    return bundled_meta(model, tok, p, frozen)


@torch.no_grad()
def test_text_init_reproduces_base_logits_on_T_plus_q(model, tokenizer):
    p = 48
    t_ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :p]
    q_ids = tokenizer(" Which ship anchored in the bay? The Albatross.", return_tensors="pt").input_ids
    base = model(torch.cat([t_ids, q_ids], dim=1)).logits[:, p:]  # [1, q, V]
    pm = create_cartridge(model, num_tokens=p, num_frozen_tokens=1, method="text", tokenizer=tokenizer, text=TEXT)
    out = pm(input_ids=q_ids, attention_mask=torch.ones_like(q_ids)).logits
    assert (out - base).abs().max() < 1e-3
    # and the cartridge matters: without it the logits are far away
    plain = model(q_ids).logits
    assert (plain - base).abs().max() > 1.0


def test_only_trainable_tokens_get_gradients(model, tokenizer):
    pm = create_cartridge(model, num_tokens=16, num_frozen_tokens=2, method="random", seed=1)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.trainable_embedding"]
    enc = encoder(pm)
    assert enc.frozen_embedding.shape[0] == 2 and enc.trainable_embedding.shape[0] == 14
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert enc.trainable_embedding.grad is not None and enc.trainable_embedding.grad.abs().sum() > 0


def test_random_init_is_seeded_and_on_model_scale(model, tokenizer):
    a = encoder(create_cartridge(model, num_tokens=8, method="random", seed=3)).weight.detach().clone()
    b = encoder(create_cartridge(model, num_tokens=8, method="random", seed=3)).weight.detach().clone()
    c = encoder(create_cartridge(model, num_tokens=8, method="random", seed=4)).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # KV of real tokens, not N(0, 1): same scale as a text-initialised cartridge
    ref = encoder(create_cartridge(model, num_tokens=8, method="text", tokenizer=tokenizer, text=TEXT)).weight.detach()
    ratio = float(a.std() / ref.std())
    assert 0.5 < ratio < 2.0


def test_text_shorter_than_p_is_a_clear_error(model, tokenizer):
    with pytest.raises(ValueError, match="fewer than kv_cache.num_tokens"):
        create_cartridge(model, num_tokens=500, method="text", tokenizer=tokenizer, text="too short")


@torch.no_grad()
def test_save_load_bit_exact_and_peft_equals_project_loader(tmp_path, model, tokenizer):
    from peft import PeftModel

    from ray_cartridges.models import load_model

    pm = create_cartridge(model, num_tokens=24, num_frozen_tokens=1, method="text", tokenizer=tokenizer, text=TEXT)
    with torch.no_grad():
        encoder(pm).trainable_embedding.add_(0.01 * torch.randn_like(encoder(pm).trainable_embedding))
    w = encoder(pm).weight.detach().clone()
    save_cartridge(pm, tmp_path / "c", _meta(model, tokenizer, 24, 1), export_pt="cache-final.pt")
    ids = tokenizer("Which ship anchored?", return_tensors="pt").input_ids
    ref = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    ours = load_cartridge(load_model("smollm2-135m-instruct"), tmp_path / "c", tokenizer)
    assert torch.equal(encoder(ours).weight, w)  # bit-exact
    peft = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), str(tmp_path / "c"))
    a = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    b = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(a, b)
    assert torch.allclose(a, ref, atol=1e-5)

    cache = load_cache_pt(tmp_path / "c" / "cache-final.pt")  # weights_only=True inside
    kv = layer_kv(pm)
    assert len(cache["trainable_keys"]) == len(kv)
    for i, (k, v) in enumerate(kv):
        assert torch.equal(cache["frozen_keys"][i][0], k[:, :1])
        assert torch.equal(cache["trainable_keys"][i][0], k[:, 1:])
        assert torch.equal(cache["trainable_values"][i][0], v[:, 1:])
        assert cache["trainable_keys"][i].shape == (
            1,
            ModelShape.of(model).num_kv_heads,
            23,
            ModelShape.of(model).head_dim,
        )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(layers=3), "num_layers"),
        (dict(kv_heads=1), "num_kv_heads"),
        (dict(head_dim=8), "head_dim"),
        (dict(vocab=1000), "vocab_size"),
    ],
)
def test_cartridge_for_another_model_is_refused(tmp_path, kwargs, field):
    src = tiny_llama()
    pm = create_cartridge(src, num_tokens=4, method="random")
    meta = CartridgeMeta(model_name="tiny", shape=ModelShape.of(src), num_tokens=4, num_frozen_tokens=1)
    save_cartridge(pm, tmp_path / "c", meta)
    other = tiny_llama(**kwargs)
    with pytest.raises(CartridgeMismatchError) as e:
        load_cartridge(other, tmp_path / "c")
    assert field in str(e.value) and "tiny" in str(e.value)


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer):
    src = tiny_llama()
    pm = create_cartridge(src, num_tokens=4, method="random")
    meta = CartridgeMeta(
        model_name="tiny", shape=ModelShape.of(src), num_tokens=4, num_frozen_tokens=1, tokenizer_fingerprint="0" * 16
    )
    save_cartridge(pm, tmp_path / "c", meta)
    with pytest.raises(CartridgeMismatchError, match="tokenizer fingerprint"):
        load_cartridge(tiny_llama(), tmp_path / "c", tokenizer)
