"""Targets by class name (``config.id2label``) in the API: the same relevance as the index,
alone, per example and in ``(position, class)`` pairs; unknown names and models without
names give one clear error; a word is never read as a vocabulary id."""

from __future__ import annotations

import pytest
import torch
from conftest import LastTokenClassifier, make_lm

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.attribution.targets import class_names, plan_targets, resolve_class_names

NAMES = ["sadness", "joy", "fear"]


@pytest.fixture
def classifier():
    from conftest import make_config, randomize

    from captum_mambalrp.models import MambaForLastTokenClassification

    torch.manual_seed(0)
    config = make_config(num_labels=3, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = MambaForLastTokenClassification(config).eval()
    randomize(model)
    return model


def test_names_give_the_same_relevance_as_indices(classifier):
    ids = torch.randint(2, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second example
    lrp = MambaLRP(classifier)
    for by_name, by_index in [
        ("joy", 1),
        (["joy", "fear"], [1, 2]),
        ((-2, "sadness"), (-2, 0)),
        ([(0, "fear"), "joy"], [(0, 2), 1]),
        ("2", 2),
    ]:
        named = lrp.attribute(ids, target=by_name, attention_mask=mask)
        assert torch.equal(named, lrp.attribute(ids, target=by_index, attention_mask=mask)), by_name
    layer = classifier.backbone.layers[1]
    assert torch.equal(
        LayerMambaLRP(classifier, layer).attribute(ids, target="fear", attention_mask=mask),
        LayerMambaLRP(classifier, layer).attribute(ids, target=2, attention_mask=mask),
    )


def test_unknown_name_and_model_without_names(classifier):
    ids = torch.randint(2, 64, (1, 5))
    with pytest.raises(
        ValueError, match=r"^target 'happiness' is not a class of the model; its classes are: sadness, joy, fear$"
    ):
        MambaLRP(classifier).attribute(ids, target="happiness")
    assert resolve_class_names("JOY", classifier) == 1  # case is forgiven
    plain = LastTokenClassifier(make_lm(), n_classes=3)  # an LM backbone: no class names of its own
    lm = make_lm()
    assert class_names(lm) is None  # transformers' LABEL_0, LABEL_1 placeholders are not names
    for model in (plain, lm):
        with pytest.raises(ValueError, match="is a class name, but the model has no class names"):
            MambaLRP(model).attribute(ids, target="joy")


def test_plan_refuses_unresolved_names():
    with pytest.raises(ValueError, match="holds a class name: turn names into indices with resolve_class_names"):
        plan_targets((1, 4, 3), "joy")
    with pytest.raises(ValueError, match="holds a class name"):
        plan_targets((2, 3), ["joy", 1])


def test_explain_texts_reads_a_word_as_a_class_name():
    """explain_texts on a classifier: a string is a class name, never a vocabulary token."""
    from captum_mambalrp.models import load_model_and_tokenizer
    from captum_mambalrp.text import explain_texts

    model, tokenizer = load_model_and_tokenizer()
    (e,) = explain_texts(model, tokenizer, ["i feel happy"], target="fear")
    assert e.target_label == "fear" and e.target_index == 4
    assert "happy" in tokenizer.get_vocab()  # a single token: the old path explained vocabulary id 'happy'
    with pytest.raises(ValueError, match="^target 'happy' is not a class of the model; its classes are: sadness, joy, love"):
        explain_texts(model, tokenizer, ["i feel happy"], target="happy")  # 'happy' is a vocabulary word
