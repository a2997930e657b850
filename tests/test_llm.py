"""MambaLRP in Captum's LLM attribution: the logit variant conserves, the log-prob one is Captum's."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from conftest import make_lm, zero_biases

from captum_mambalrp import LayerMambaLRP
from captum_mambalrp.llm import MambaLLMAttribution, MambaLLMAttributionResult
from captum_mambalrp.models.tokenizer import build_word_tokenizer

WORDS = "the cat sat on mat a dog ran in park and big small red blue"


@pytest.fixture(scope="module")
def tiny_lm():
    tokenizer = build_word_tokenizer([WORDS], min_freq=1)
    model = zero_biases(make_lm("mamba", seed=3, vocab_size=len(tokenizer)))
    return model, tokenizer


def logits_after(model, tokenizer, prompt: str, continuation: str):
    """Next-token logits before each continuation token ``[n, V]``, and the continuation ids ``[n]``."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0]
    return logits[len(p) - 1 : len(p) - 1 + len(c)], torch.tensor(c)


def test_accepted_by_captum_and_plots(tiny_lm):
    model, tokenizer = tiny_lm
    llm_attr = MambaLLMAttribution.for_model(model, tokenizer)
    assert isinstance(llm_attr, LLMGradientAttribution)
    LLMGradientAttribution(LayerMambaLRP(model, model.backbone.embeddings), tokenizer)  # plain Captum accepts it
    result = llm_attr.attribute(
        TextTokenInput("the cat sat on the", tokenizer), gen_args={"max_new_tokens": 3, "do_sample": False}
    )
    assert isinstance(result, LLMAttributionResult) and isinstance(result, MambaLLMAttributionResult)
    assert result.input_tokens == ["the", "cat", "sat", "on", "the"]
    assert result.token_attr.shape == (3, 5) and len(result.output_tokens) == 3
    fig, ax = result.plot_token_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == result.input_tokens
    assert len(ax.get_yticklabels()) == 3


def test_logit_variant_conserves(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, continuation = "a big dog ran in the", "park and the cat"
    result = MambaLLMAttribution.for_model(model, tokenizer, attr_target="logit").attribute(
        TextTokenInput(prompt, tokenizer), target=continuation
    )
    logits, ids = logits_after(model, tokenizer, prompt, continuation)
    target_logits = logits[torch.arange(len(ids)), ids]
    assert torch.allclose(result.explained, target_logits, atol=1e-6)
    total = result.token_attr.sum(1) + result.generated_attr.sum(1)
    assert torch.allclose(total, target_logits, rtol=1e-5, atol=1e-5)
    assert (result.delta.abs() <= 1e-5 * target_logits.abs().clamp_min(1e-3)).all()
    assert torch.equal(result.generated_attr.triu(), torch.zeros(len(ids), len(ids)))  # only earlier tokens


def test_log_prob_variant_is_captums_quantity(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, continuation = "the red cat sat on", "the mat"
    inp = TextTokenInput(prompt, tokenizer)
    ours = MambaLLMAttribution.for_model(model, tokenizer, attr_target="log_prob").attribute(inp, target=continuation)
    captums = LLMGradientAttribution(LayerMambaLRP(model, model.backbone.embeddings), tokenizer).attribute(
        inp, target=continuation
    )
    assert torch.allclose(ours.token_attr, captums.token_attr, atol=1e-6)
    logits, ids = logits_after(model, tokenizer, prompt, continuation)
    logp = logits.log_softmax(-1)
    assert torch.allclose(ours.explained, logp[torch.arange(len(ids)), ids], atol=1e-6)
    # what the relevance sums to: the logit minus its probability-weighted mean, not log p
    total = ours.token_attr.sum(1) + ours.generated_attr.sum(1)
    expected = logits[torch.arange(len(ids)), ids] - (logp.exp() * logits).sum(-1)
    assert torch.allclose(total, expected, rtol=1e-4, atol=1e-5)
    assert (ours.delta.abs() > 1e-2).all()


def test_skipped_tokens_still_count_in_delta(tiny_lm):
    model, tokenizer = tiny_lm
    inp = TextTokenInput("the cat sat on the", tokenizer, skip_tokens=["the"])
    result = MambaLLMAttribution.for_model(model, tokenizer).attribute(inp, target="mat")
    assert result.input_tokens == ["cat", "sat", "on"] and result.token_attr.shape == (1, 3)
    assert abs(float(result.delta[0])) <= 1e-5 * max(1e-3, abs(float(result.explained[0])))


def test_rejects_unknown_attr_target(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="attr_target"):
        MambaLLMAttribution.for_model(model, tokenizer, attr_target="prob")
