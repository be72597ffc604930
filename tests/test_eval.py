"""The evaluation metrics themselves."""

import torch

from ray_cartridges.eval.metrics import kl_per_token, score_answer


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


def test_perplexity_with_an_empty_effect_cartridge_matches_the_base_model(model, tokenizer):
    from ray_cartridges.eval.evaluate import perplexity

    text = "Bread dough needs time to rise before it is baked in a hot oven."
    base = perplexity(model, tokenizer, text)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    ref = float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert abs(base - ref) / ref < 1e-4
