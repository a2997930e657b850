"""``recompute=True`` and ``recompute="offload"`` on each hybrid (Bamba, Falcon-H1, GraniteMoeHybrid,
Jamba, Nemotron-H, Zamba2; tiny configs of ``tests/test_hybrids.py``): the relevance and delta
equal those of ``recompute=False``, the relevance sums to the model's own logit, and the layers
did run again in the backward pass (their linear layers called twice per pass)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_api import assert_unchanged, snapshot
from test_hybrids import FAMILIES, build, left_padded
from torch import nn

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite


def linear_calls(model: nn.Module, names):
    """Forward calls of every ``nn.Linear`` inside the modules ``names``, by module (a ``Counter``
    filled by hooks) and the hooks' handles."""
    calls: Counter = Counter()
    linears = {id(m): m for name in names for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_hook(lambda mod, a, out, key=key: calls.update([key])) for key, m in linears.items()]
    return calls, handles


def recomputed_parts(model: nn.Module):
    """``(mixers, attention / MLP / expert layers)`` that a recomputing pass wraps, by name."""
    inst = install_rules(model, composite("conservative"), recompute=True)
    inst.patcher.restore()
    return inst.mixers, inst.recomputed_layers


def attribute(model, ids, mask, recompute, names):
    """Relevance, delta and the linear calls of one pass, per module, in ``names``."""
    calls, handles = linear_calls(model, names)
    try:
        # no use_cache=False here: MambaLRP passes it, also to GraniteMoeHybridForCausalLM, whose
        # forward takes it through **kwargs (a cache handed to its attention would keep that layer
        # from being recomputed)
        relevance, delta = MambaLRP(model, composite="conservative", recompute=recompute).attribute(
            ids, target=3, attention_mask=mask, return_convergence_delta=True
        )
    finally:
        for handle in handles:
            handle.remove()
    return relevance, delta, calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recompute_and_offload_equal_keeping(family):
    """Per hybrid, left-padded batch: ``True`` and ``"offload"`` give the relevance and delta of
    ``recompute=False`` (to 1e-6), which conserves the logit (1e-5 relative) and is zero on the
    pads; each SSM mixer's linear layers run twice with either mode (recomputed), and with ``True``
    so do those of every attention, MLP and expert layer."""
    model = build(family, seed=31)
    mixers, layers = recomputed_parts(model)
    assert mixers and layers
    ids, mask = left_padded(2, 13, [0, 4], seed=31)
    with torch.no_grad():
        logit = model(ids, attention_mask=mask).logits[:, -1, 3]
    before = snapshot(model)
    kept, kept_delta, once = attribute(model, ids, mask, False, [*mixers, *layers])
    assert ((kept.sum(1) - logit).abs() <= 1e-5 * logit.abs().clamp_min(0.1)).all(), (kept.sum(1), logit)
    assert (kept[mask == 0] == 0).all()
    mixer_linears = {id(m) for name in mixers for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)}
    for recompute in (True, "offload"):
        relevance, delta, calls = attribute(model, ids, mask, recompute, [*mixers, *layers])
        torch.testing.assert_close(relevance, kept, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta, kept_delta, atol=1e-6, rtol=1e-5)
        checked = set(once) if recompute is True else mixer_linears
        assert all(calls[key] == 2 * once[key] for key in checked), (recompute, calls, once)
    assert_unchanged(model, before)


def test_offload_recomputes_the_hybrid_layers():
    """``"offload"`` recomputes a hybrid's attention, MLP and expert layers whole, as every mode
    but ``False`` does (docs/scaling.md, "Hybrids"): their linear layers run twice per pass."""
    model = build("bamba", seed=32)
    _, layers = recomputed_parts(model)
    ids, mask = left_padded(2, 9, [0, 3], seed=32)
    _, _, once = attribute(model, ids, mask, False, layers)
    _, _, calls = attribute(model, ids, mask, "offload", layers)
    assert once and {key: 2 * n for key, n in once.items()} == dict(calls), (once, calls)
