"""Mistakes a new user makes that used to pass without a word (found by following the README as a
stranger): a mistyped keyword, a padded batch without its mask, a float target, a layer given by
name; and the one-line message for a model without supported layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_lm, zero_biases
from test_mamba2 import ids_for, make_mamba2
from torch import nn

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.adapters import UnsupportedModelError, supported_layers
from captum_mambalrp.attribution.targets import plan_targets
from captum_mambalrp.models import load_model_and_tokenizer


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = load_model_and_tokenizer()
    enc = tokenizer(["i feel so happy and loved today", "what a scary night"], return_tensors="pt", padding=True)
    return model, enc


def untouched(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()) and all(
        "forward" not in m.__dict__ for m in model.modules()
    )


def test_a_mistyped_keyword_is_refused(embedded):
    """``attention_maks=`` behind the classifier's ``**kwargs`` used to be dropped, explaining the
    padding; a keyword close to one ``forward`` names, or to ``attribute``'s own, is refused."""
    model, enc = embedded
    lrp = MambaLRP(model)
    with pytest.raises(TypeError, match=r"has no parameter 'attention_maks'; did you mean 'attention_mask'\?"):
        lrp.attribute(enc["input_ids"], target="fear", attention_maks=enc["attention_mask"])
    with pytest.raises(TypeError, match=r"did you mean 'target'\?"):
        lrp.attribute(enc["input_ids"], targets=1, attention_mask=enc["attention_mask"])
    assert untouched(model)
    # a keyword unlike any named one still reaches a forward with **kwargs (transformers' extras)
    right = lrp.attribute(enc["input_ids"], target="fear", attention_mask=enc["attention_mask"])
    extra = lrp.attribute(enc["input_ids"], target="fear", attention_mask=enc["attention_mask"], output_attentions=False)
    assert torch.equal(right, extra)


def test_a_forward_without_kwargs_refuses_every_unknown_keyword(embedded):
    model, enc = embedded

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask=attention_mask).logits

    with pytest.raises(TypeError, match=r"Wrapper.forward has no parameter 'scale'; it takes input_ids, attention_mask"):
        MambaLRP(Wrapper()).attribute(enc["input_ids"], target=1, attention_mask=enc["attention_mask"], scale=2)


def test_padding_without_its_mask_warns(embedded):
    """Right-padded rows without ``attention_mask``: one warning naming the rows and the fix,
    pointing at the caller's line; none with the mask, for one row, or for unpadded rows."""
    model, enc = embedded
    ids = enc["input_ids"]
    assert int(ids[1, -1]) == model.config.pad_token_id and int(ids[0, -1]) != model.config.pad_token_id
    with pytest.warns(UserWarning, match=r"rows \[1\] of the inputs end with the pad token \(0\) but no attention_mask") as got:
        MambaLRP(model).attribute(ids, target="fear")
    assert got[0].filename == __file__
    with pytest.warns(UserWarning, match="no attention_mask"):
        LayerMambaLRP(model, model.backbone.layers[0]).attribute(ids.flip(1), target="fear")  # padded at the start
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MambaLRP(model).attribute(ids, target="fear", attention_mask=enc["attention_mask"])
        MambaLRP(model).attribute(ids[1:], target="fear")
        MambaLRP(model).attribute(ids[:, :4], target="fear")
        MambaLRP(model).attribute(ids[:, :5], target="fear")  # one pad token at the end: may be a text's own


@pytest.mark.parametrize(
    "target,message",
    [
        (1.5, "target 1.5 is a float"),
        (1.0, "target 1.0 is a float"),
        ([1, 2.5], "target 2.5 is a float"),
        ((-1, 2.0), "target 2.0 is a float"),
        ((0.5, 1), "target 0.5 is a float"),
        (torch.tensor([1.0, 2.0]), "float32 tensor: give class indices as integers"),
        (True, r"target class True is not an int: give a class index \(0..3\)"),
    ],
)
def test_a_float_target_is_refused(target, message):
    """``target=1.5`` was explained as class 1 (``int()``); floats are refused in one line."""
    with pytest.raises(ValueError, match=message):
        plan_targets((2, 5, 4), target)


def test_integer_targets_of_every_kind_still_work():
    import numpy as np

    for target in (1, np.int64(1), torch.tensor(1), [1, 1], torch.tensor([1, 1]), (-1, 1), (np.int64(-1), 1)):
        assert plan_targets((2, 5, 4), target).classes == [1, 1], target


def test_a_layer_by_its_dotted_name(embedded):
    """``LayerMambaLRP(model, "backbone.layers.0")`` reads the same relevance as the module itself;
    a name of no module is refused with the names there are."""
    model, enc = embedded
    ids, mask = enc["input_ids"], enc["attention_mask"]
    by_name = LayerMambaLRP(model, "backbone.layers.0").attribute(ids, target="joy", attention_mask=mask)
    by_module = LayerMambaLRP(model, model.backbone.layers[0]).attribute(ids, target="joy", attention_mask=mask)
    assert torch.equal(by_name, by_module)
    both = LayerMambaLRP(model, ["backbone.layers.0", model.backbone.layers[1]]).attribute(ids, target="joy", attention_mask=mask)
    assert isinstance(both, list) and torch.equal(both[0], by_module)
    with pytest.raises(ValueError, match=r"layer 'backbone.layer.0' names no module of the model; .*backbone.layers.0"):
        LayerMambaLRP(model, "backbone.layer.0")


def test_a_model_without_supported_layers_gets_a_short_line():
    with pytest.raises(UnsupportedModelError) as err:
        MambaLRP(nn.Linear(4, 2))
    message = str(err.value)
    assert len(message) < 300 and "\n" not in message
    assert "contains no supported Mamba mixer or attention layer" in message and "supported_layers()" in message
    labels = " ".join(supported_layers())
    for name in ("Mamba2", "Mamba3", "Jamba", "NemotronH", "Vision Mamba", "LlamaAttention"):
        assert name in labels, name


def test_the_embedded_model_loads_without_a_progress_bar(capfd):
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()  # the CLI's tests turn it off for the whole process
    logging.enable_progress_bar()
    try:
        load_model_and_tokenizer()
        assert "Loading weights" not in capfd.readouterr().err
        assert logging.is_progress_bar_enabled()  # put back for the user's own loads
    finally:
        if not was_on:
            logging.disable_progress_bar()


def test_labels_are_refused_in_one_line():
    """``labels=`` made the model compute its loss on the last position's logits alone (the
    ``logits_to_keep`` shortcut) and fail on a shape inside torch; it is refused, ``None`` passes."""
    model = make_mamba2().eval()
    ids = ids_for(2, 7)
    with pytest.raises(
        ValueError, match=r"^attribute\(labels=\.\.\.\): labels make the model compute its loss, .*; leave labels out$"
    ):
        MambaLRP(model).attribute(ids, target=1, labels=ids)
    assert untouched(model)
    assert torch.isfinite(MambaLRP(model).attribute(ids, target=1, labels=None)).all()


def test_a_hook_the_rules_skip_is_named_and_a_hook_they_call_is_honoured():
    """A user's hook on a Mamba2 mixer's gated norm, which the rules compute from its weight without
    calling it, changes ``model(...)`` (transformers' torch path calls the norm) but not the explained
    output: one warning names it and where it is computed, the explained score is the model's without
    the hook, and the model and the hook are left as they were. A hook on ``in_proj`` runs: the
    explained score is the hooked model's, and no warning."""
    model = make_mamba2().double().eval()
    ids = ids_for(1, 9)
    with torch.no_grad():
        plain = model(ids).logits
    norm = model.backbone.layers[0].mixer.norm
    handle = norm.register_forward_hook(lambda m, args, out: out * 0.5)
    try:
        with torch.no_grad():
            hooked = model(ids).logits
        assert not torch.allclose(hooked, plain)
        with pytest.warns(UserWarning) as caught:
            relevance, delta = MambaLRP(model).attribute(ids, target=1, return_convergence_delta=True)
        (message,) = [str(w.message) for w in caught if "has a hook" in str(w.message)]
        assert message.startswith(
            "backbone.layers.0.mixer.norm (MambaRMSNormGated) has a hook that did not run during attribution: inside "
            "backbone.layers.0.mixer MambaLRP's rules compute from weights without calling every module"
        )
        explained = (relevance.sum() + delta.sum()).item()
        assert abs(explained - plain[0, -1, 1].item()) <= 1e-6 * abs(plain[0, -1, 1].item())
        with torch.no_grad():
            assert torch.equal(model(ids).logits, hooked)
        assert list(norm._forward_hooks) == [handle.id]
    finally:
        handle.remove()
    assert untouched(model)
    proj = model.backbone.layers[1].mixer.in_proj
    handle = proj.register_forward_hook(lambda m, args, out: out * 0.5)
    try:
        with torch.no_grad():
            hooked_logit = model(ids).logits[0, -1, 1].item()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a hook that runs: no warning
            relevance, delta = MambaLRP(model).attribute(ids, target=1, return_convergence_delta=True)
        explained = (relevance.sum() + delta.sum()).item()
        assert abs(hooked_logit - plain[0, -1, 1].item()) > 1e-3 * abs(hooked_logit)
        assert abs(explained - hooked_logit) <= 1e-6 * abs(hooked_logit)
    finally:
        handle.remove()
    assert untouched(model)


def test_layer_reads_that_cannot_be_made_say_where_to_read():
    """An embedding's input (token ids) and a module the rules compute without calling it (a
    mixer's ``act``) used to fail as "did not run in the forward pass"; each now names why and where
    to read instead, and the model is left as it was."""
    model = make_mamba2().eval()
    ids = ids_for(1, 6)
    with pytest.raises(
        ValueError, match=r"the input of Embedding holds no floating-point tensor .*\(attribute_to_layer_input=False\)$"
    ):
        LayerMambaLRP(model, "backbone.embeddings").attribute(ids, target=1, attribute_to_layer_input=True)
    with pytest.raises(
        ValueError,
        match=r"^backbone\.layers\.0\.mixer\.act \(\w+\) did not run in MambaLRP's forward pass: "
        r"inside backbone\.layers\.0\.mixer ",
    ):
        LayerMambaLRP(model, "backbone.layers.0.mixer.act").attribute(ids, target=1)
    assert untouched(model)
    relevance = LayerMambaLRP(model, "backbone.embeddings").attribute(ids, target=1)
    assert relevance.shape == (1, 6, 16) and torch.isfinite(relevance).all()


def test_a_mask_captum_passes_by_position_onto_inputs_embeds_is_refused():
    """Captum passes ``additional_forward_args`` by position: ``MambaForCausalLM`` takes
    ``attention_mask`` second and uses the mask; ``Mamba2ForCausalLM`` takes ``inputs_embeds`` there,
    where transformers' own error ("exactly one of input_ids or inputs_embeds") named no cause."""
    ids = ids_for(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model = make_mamba2().eval()
    with pytest.raises(
        ValueError,
        match=r"^additional_forward_args\[0\] would reach Mamba2ForCausalLM\.forward as inputs_embeds .*attention_mask=\.\.\.$",
    ):
        MambaLRP(model).attribute(ids, target=1, additional_forward_args=(mask,))
    assert untouched(model)
    keyword = MambaLRP(model).attribute(ids, target=1, attention_mask=mask)
    assert (keyword[0, :2] == 0).all() and torch.isfinite(keyword).all()
    mamba = zero_biases(make_lm("mamba", num_hidden_layers=2)).eval()
    by_position = MambaLRP(mamba).attribute(ids, target=1, additional_forward_args=(mask,))
    assert torch.equal(by_position, MambaLRP(mamba).attribute(ids, target=1, attention_mask=mask))
    assert (by_position[0, :2] == 0).all()


def test_a_tokenizers_output_works_spread_and_gets_a_hint_whole(embedded):
    """``attribute(**enc, target=...)`` takes ``input_ids`` (and the mask) from the tokenizer's
    output, as transformers models do; ``enc`` itself, a list and ``[L]`` ids get a line with the fix."""
    model, enc = embedded
    lrp = MambaLRP(model)
    spread = lrp.attribute(**enc, target="joy")
    assert torch.equal(spread, lrp.attribute(enc["input_ids"], target="joy", attention_mask=enc["attention_mask"]))
    layer = LayerMambaLRP(model, "backbone.layers.0")
    by_name = layer.attribute(enc["input_ids"], target="joy", attention_mask=enc["attention_mask"])
    assert torch.equal(layer.attribute(**enc, target="joy"), by_name)
    with pytest.raises(TypeError, match=r"^inputs is a BatchEncoding .*: pass enc\['input_ids'\] and attention_mask="):
        lrp.attribute(enc, target="joy")
    with pytest.raises(TypeError, match=r"got list: make one with tokenizer\(texts, return_tensors='pt'\)"):
        lrp.attribute(enc["input_ids"][0].tolist(), target="joy")
    with pytest.raises(TypeError, match=r"one sequence without a batch dimension: pass ids\.unsqueeze\(0\)"):
        lrp.attribute(enc["input_ids"][0], target="joy")
    with pytest.raises(TypeError, match=r"^attribute\(\) needs inputs: token ids"):
        lrp.attribute(target="joy")
    with pytest.raises(TypeError, match=r"^inputs given twice, positionally and as input_ids="):
        lrp.attribute(enc["input_ids"], target="joy", input_ids=enc["input_ids"])
    assert untouched(model)


def test_embeddings_with_an_extra_on_inputs_embeds_and_an_explicit_none_input_ids():
    """Embeddings as the inputs and an extra that lands on ``inputs_embeds`` would have replaced the
    user's embeddings without a word: refused too; ``input_ids=None`` beside positional ids is no
    second input (it clashed with them as "multiple values")."""
    model = make_mamba2().eval()
    ids = ids_for(2, 7)
    embeds = model.get_input_embeddings()(ids).detach()
    with pytest.raises(
        ValueError, match=r"^additional_forward_args\[0\] would reach Mamba2ForCausalLM\.forward as inputs_embeds"
    ):
        MambaLRP(model).attribute(embeds, target=1, additional_forward_args=(embeds * 2,))
    assert untouched(model)
    assert torch.equal(MambaLRP(model).attribute(ids, target=1, input_ids=None), MambaLRP(model).attribute(ids, target=1))


def test_layer_input_given_as_a_keyword_is_read():
    """Hybrid blocks call their mixer as ``mamba(hidden_states=...)``: relevance at the mixer's input
    (``attribute_to_layer_input=True``) is read from that keyword, and equals the relevance at the
    norm's output that feeds it (the same tensor, used by the mixer alone)."""
    from test_hybrids import build
    from test_hybrids import ids_for as hybrid_ids

    model = build("bamba")
    ids = hybrid_ids(2, 9)
    at_input = LayerMambaLRP(model, "model.layers.0.mamba").attribute(ids, target=3, attribute_to_layer_input=True)
    at_norm = LayerMambaLRP(model, "model.layers.0.input_layernorm").attribute(ids, target=3)
    assert at_input.shape == at_norm.shape and at_input.abs().sum() > 0
    torch.testing.assert_close(at_input, at_norm, rtol=1e-5, atol=1e-7)
    assert untouched(model)


def test_no_warning_for_a_hook_the_models_own_code_skips_too():
    """transformers' Mamba mixer reads ``dt_proj`` as a weight and never calls ``act``: hooks there
    (a user recording every linear layer) run in neither ``model(...)`` nor the pass, so no warning;
    the relevance is the one without hooks."""
    model = zero_biases(make_lm("mamba", num_hidden_layers=2)).eval()
    ids = ids_for(1, 8)
    plain = MambaLRP(model).attribute(ids, target=1)
    seen = []
    mixer = model.backbone.layers[0].mixer
    handles = [m.register_forward_hook(lambda m, args, out: seen.append(m)) for m in (mixer.dt_proj, mixer.act)]
    try:
        with torch.no_grad():
            model(ids)
        assert seen == []  # the model's own forward calls neither
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hooked = MambaLRP(model).attribute(ids, target=1)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(hooked, plain) and seen == []
    assert untouched(model)


def test_a_layer_input_among_several_keywords_is_not_guessed():
    """A module called with several floating-point keywords, none ``hidden_states``: which is its
    input is unclear, so relevance at its input is refused with the names (it used to read the first
    tensor keyword); with one floating-point keyword, that one is read."""
    from captum_mambalrp.rules import GradientRule

    class Gate(nn.Module):
        def forward(self, x, scale=None):
            return x if scale is None else x * scale

    class Outer(nn.Module):
        def __init__(self, two):
            super().__init__()
            self.lm, self.gate, self.two = make_mamba2().eval(), Gate(), two
            self.gate.rule = GradientRule()  # a module of the user's own: plain gradient through it

        def forward(self, input_ids):
            logits = self.lm(input_ids).logits
            return self.gate(x=logits, scale=torch.full_like(logits, 2.0)) if self.two else self.gate(x=logits)

    ids = ids_for(1, 6)
    two = Outer(two=True)
    with pytest.raises(ValueError, match=r"^the input of Gate came as keywords \['x', 'scale'\], none named hidden_states"):
        LayerMambaLRP(two, "gate").attribute(ids, target=1, attribute_to_layer_input=True)
    assert untouched(two)
    one = Outer(two=False)
    read = LayerMambaLRP(one, "gate").attribute(ids, target=1, attribute_to_layer_input=True)
    assert torch.equal(read, LayerMambaLRP(one, "lm.lm_head").attribute(ids, target=1))  # the same tensor


def test_a_layer_input_is_the_first_positional_argument_alone():
    """``gate(x, scale)`` with a ``[3]`` scale: the input is ``x``; the scale used to be read too and
    its zeros added to ``x``'s relevance, which raised on the shapes."""
    from captum_mambalrp.rules import GradientRule

    class Gate(nn.Module):
        def forward(self, x, scale):
            return x * scale.mean()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.gate = make_mamba2().eval(), Gate()
            self.gate.rule = GradientRule()

        def forward(self, input_ids):
            logits = self.lm(input_ids).logits
            return self.gate(logits, torch.full((3,), 2.0))

    model = Outer()
    ids = ids_for(1, 6)
    read = LayerMambaLRP(model, "gate").attribute(ids, target=1, attribute_to_layer_input=True)
    assert torch.equal(read, LayerMambaLRP(model, "lm.lm_head").attribute(ids, target=1))
    assert untouched(model)
