"""A CPU model on a machine with mamba-ssm: the package's own calls of the model take transformers'
torch path (``models/kernel_path.py``).

mamba-ssm is not installed here, so the tests install its failure: every kernel wrapper of the
modeling modules (``use_kernel_func_from_hub_with_fallback``) is replaced by one that raises as
mamba-ssm's CUDA functions do on CPU tensors, keeping the torch definition as ``__wrapped__``, as
transformers' wrappers do. The failure was seen on the H200 (run 9 of docs/benchmarks_history.md).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import pytest
import torch
from conftest import make_config, make_lm, randomize, zero_biases

from captum_mambalrp.evaluation import MethodOptions, build_method
from captum_mambalrp.models import MambaForLastTokenClassification
from captum_mambalrp.models.kernel_path import kernel_wrapped, modeling_modules, off_cuda, torch_path

FAST = MethodOptions(reference_token_id=0, ig_steps=4, smoothgrad_samples=2, kernelshap_samples=30)
CUDA_ONLY = "Expected u.is_cuda() to be true, but got false."


def _cuda_only(torch_definition, module_name):
    """A wrapper like transformers' that calls a CUDA-only kernel whatever the device."""

    @functools.wraps(torch_definition)
    def kernel(*args, **kwargs):
        raise RuntimeError(CUDA_ONLY)

    kernel.__module__ = module_name
    return kernel


@pytest.fixture
def kernels_installed(monkeypatch):
    """transformers' Mamba, Mamba2 and FalconMamba modules as on a machine with mamba-ssm."""
    replaced = {}
    for name in ("mamba", "mamba2", "falcon_mamba"):
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        for attr, value in list(vars(mod).items()):
            if kernel_wrapped(value, mod):
                fake = _cuda_only(inspect.unwrap(value), mod.__name__)
                monkeypatch.setattr(mod, attr, fake)
                replaced[(mod, attr)] = fake
    assert len(replaced) >= 12, "transformers' kernel wrappers were not found: has their form changed?"
    return replaced


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    model = MambaForLastTokenClassification(make_config(num_labels=3)).eval()
    randomize(model)
    return zero_biases(model)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(2, 64, (2, 7))
    return ids, torch.ones_like(ids), torch.tensor([0, 2])


@pytest.mark.parametrize("name", ["kernelshap", "feature_ablation"])
def test_perturbation_methods_run_a_cpu_model_on_the_torch_path(classifier, kernels_installed, name):
    """KernelShap and occlusion call the model's own forward: with the kernels "installed" the
    plain call fails, the method's runs and gives what it gives without them; the module's
    attributes are the installed ones again after."""
    ids, mask, target = _batch()
    with pytest.raises(RuntimeError, match="is_cuda"):
        classifier(input_ids=ids, attention_mask=mask)
    torch.manual_seed(7)
    got = build_method(name, classifier, FAST).attribute(ids, target, mask)
    assert all(getattr(mod, attr) is fake for (mod, attr), fake in kernels_installed.items())
    with torch_path():
        torch.manual_seed(7)
        want = build_method(name, classifier, FAST).attribute(ids, target, mask)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0


def test_off_cuda_swaps_the_models_own_modules_and_restores_them_after_an_error(kernels_installed):
    """``off_cuda``: the modules defining the model's submodules (FalconMamba here, not Mamba), the
    torch definitions inside, the installed wrappers again after an exception."""
    model = make_lm("falcon")
    mods = modeling_modules(model)
    assert [m.__name__ for m in mods] == ["transformers.models.falcon_mamba.modeling_falcon_mamba"]
    ids = torch.randint(0, 64, (1, 9))
    with pytest.raises(RuntimeError, match="is_cuda"):
        model(ids)
    with pytest.raises(KeyError):
        with off_cuda(model) as swapped:
            assert swapped
            out = model(ids).logits
            mamba1 = importlib.import_module("transformers.models.mamba.modeling_mamba")
            assert any(getattr(mamba1, a) is f for (m, a), f in kernels_installed.items() if m is mamba1)
            raise KeyError("an error inside the block")
    assert torch.isfinite(out).all()
    assert all(getattr(mod, attr) is fake for (mod, attr), fake in kernels_installed.items())


def test_llm_explained_scores_on_the_cpu(kernels_installed):
    """``MambaLLMAttribution.explained_scores`` (the model's own forward) runs a CPU model and
    gives the logits of the torch path."""
    from captum_mambalrp.llm import MambaLLMAttribution

    model = make_lm("mamba")
    attr = MambaLLMAttribution.for_model(model, tokenizer=None)
    prompt, targets = torch.randint(0, 64, (1, 5)), torch.tensor([3, 4])
    scores = attr.explained_scores(prompt, targets)
    with torch_path():
        logits = model(torch.cat([prompt, targets[None]], dim=1)).logits[0]
    torch.testing.assert_close(scores, torch.stack([logits[4, 3], logits[5, 4]]).float())


def test_explain_texts_predicts_on_the_cpu(kernels_installed):
    """``explain_texts`` (the prediction is the model's own forward, the relevance the package's
    pass) on the embedded default model, a Mamba classifier on the CPU."""
    from captum_mambalrp.models import load_model_and_tokenizer
    from captum_mambalrp.text import explain_texts

    model, tokenizer = load_model_and_tokenizer()
    with pytest.raises(RuntimeError, match="is_cuda"):
        model(input_ids=tokenizer(["i feel happy"], return_tensors="pt")["input_ids"])
    (e,) = explain_texts(model, tokenizer, ["i feel happy"], target="joy")
    assert e.target_label == "joy" and torch.isfinite(torch.as_tensor(e.relevance)).all()


def test_overlapping_blocks_restore_when_the_last_leaves(kernels_installed):
    """Blocks that overlap out of order (two threads of a dashboard): the first to enter swaps,
    the last to leave restores; a block that leaves early leaves the other's torch path alone."""
    mod = importlib.import_module("transformers.models.mamba.modeling_mamba")
    names = [attr for (m, attr) in kernels_installed if m is mod]
    first, second = torch_path([mod]), torch_path([mod])
    assert first.__enter__() > 0
    assert second.__enter__() > 0
    first.__exit__(None, None, None)
    assert all(getattr(mod, a) is not kernels_installed[(mod, a)] for a in names)  # still the torch path
    second.__exit__(None, None, None)
    assert all(getattr(mod, a) is kernels_installed[(mod, a)] for a in names)
