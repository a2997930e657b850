"""Precision: float64 models give float64 relevance conserved to float64 rounding; bf16 models
explain their own score at least as faithfully (against a float64 truth) as transformers' own
bf16 forward computes it, and their relevance as faithfully as autograd's gradient x input through
that forward."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, zero_biases
from test_mamba2 import ids_for, make_mamba2

from captum_mambalrp import MambaLRP


# transformers' default ``residual_in_fp32=True`` rounds the residual stream to float32 even in a
# float64 model (the model's own computation, explained as it is): float64 models here turn it off.
def _check_float64(model, ids, target, plain_forward=True):
    """float64 relevance, ``|sum R - logit| <= 1e-10 max(|logit|, 1)`` with the logit of the
    attributed float64 pass, which is the model's own logit up to transformers' float32 norms."""
    model = model.double()
    relevance, delta = MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True)
    assert relevance.dtype == torch.float64 and delta.dtype == torch.float64
    total = relevance.sum(dim=tuple(range(1, relevance.dim())))
    logit = total + delta  # the explained score of the pass (delta = explained - sum R)
    scale = max(logit.abs().max().item(), 1.0)
    assert delta.abs().max() <= 1e-10 * scale
    if plain_forward:  # the pass explains the model's own logit (transformers' RMSNorms round to float32 inside)
        with torch.no_grad():
            own = model(ids)[:, -1, target]
        assert own.dtype == torch.float64
        assert (logit - own).abs().max() <= 1e-5 * scale
    # not float32 values stored as float64: rounding to float32 moves them
    assert (relevance - relevance.float().double()).abs().max() > 0


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_float64_mamba1_conserves_to_1e10(arch):
    # a classifier head: transformers' LM heads return float32 logits, which would round the score
    model = LastTokenClassifier(zero_biases(make_lm(arch, num_hidden_layers=3, residual_in_fp32=False)).backbone)
    _check_float64(model, ids_for(2, 21), target=1)


def test_float64_mamba2_conserves_to_1e10():
    model = LastTokenClassifier(make_mamba2(num_hidden_layers=3, residual_in_fp32=False).backbone)
    _check_float64(model, ids_for(2, 21), target=2)


def test_float64_lm_head_rounds_only_the_score_to_float32():
    """transformers' Mamba2 LM head casts its logits to float32 (``.float()``) in a float64 model
    (docs/usage.md): the relevance stays float64 and sums to the head's float64 logit, the
    explained score is that logit rounded to float32, and the two lie one float32 rounding apart."""
    model = make_mamba2(num_hidden_layers=3, residual_in_fp32=False).double().eval()
    ids = ids_for(2, 21)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        relevance, delta = MambaLRP(model).attribute(ids, target=2, return_convergence_delta=True)
    finally:
        handle.remove()
    head = seen[0][:, -1, 2]
    assert head.dtype == torch.float64 and relevance.dtype == torch.float64
    total = relevance.sum(dim=tuple(range(1, relevance.dim())))
    assert (total - head).abs().max() <= 1e-10 * max(head.abs().max().item(), 1.0)
    explained = total + delta
    assert torch.equal(explained.float().double(), explained)  # a float32 value
    assert ((explained - head).abs() <= 2**-24 * head.abs()).all() and (explained != head).any()


def test_float64_mamba_ssm_conserves_to_1e10():
    from test_mamba_ssm import make_ssm_lm

    for layer in ("Mamba1", "Mamba2"):
        model = make_ssm_lm(layer, residual_in_fp32=False)
        # mamba-ssm's own forward needs its Triton norm (CUDA): conservation against the pass's logit only
        _check_float64(model, ids_for(2, 13), target=3, plain_forward=False)


def _pooled_errors(arch, dtype, seeds=tuple(range(8)), layers=8, d_model=64, length=64):
    """Pooled over seeds, against MambaLRP's float64 pass (``benchmarks/precision.py``'s
    ``pooled_errors``): the score error of transformers' own forward in ``dtype`` and of MambaLRP's
    pass, the logits at every position, transformers' last hidden states and MambaLRP's relevance."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from precision import build, measure, pooled_errors

    rows = []
    for seed in seeds:
        model = build(arch, layers, d_model, seed, head_dim=16, state=16)
        ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(seed))
        rows.append(measure(model, ids, [dtype], 10))
    return pooled_errors(rows, dtype)


# Random deep models amplify rounding: one explained score per model is a noisy sample (over 16
# seeds, 8 layers of d_model 64, the pooled bf16 score ratio ours / transformers' was 1.27 for
# Mamba1 and 0.83 for Mamba2; docs/benchmarks.md). The margin separates parity from the issue's
# failure (bf16 relevance that is mostly noise: 3x transformers' error and more).
MARGIN = 2.0
# The logits at every position (each a score the pass could explain: one sample per position) are
# the tighter check of the pass's forward: 1.02x (Mamba1) and 0.98x (Mamba2) transformers' error in
# bf16 on those 16 seeds, 1.00x / 0.99x on the 8 here, 1.01x / 0.99x in float32. One extra bf16
# rounding of Mamba2's scan output adds 4 % here (0.0202 -> 0.0210), under this margin; the score
# check above caught that one (0.0125 -> 0.0202). The margin holds the pass's forward at parity
# with room for another CPU's rounding order (per-seed ratios range 0.86-1.28).
LOGITS_MARGIN = 1.1
# The relevance against a plain backward pass in the same dtype (transformers' own gradient x input
# through its bf16 forward, against its float64 value): MambaLRP's backward pass rounds no more
# than autograd's does. On these 8 seeds the pooled ratio is 0.82 (Mamba1) and 0.34 (Mamba2)
# (0.84 / 0.36 over 16 seeds, docs/benchmarks.md); "at least as close" is the goal, no margin.
GXI_MARGIN = 1.0


def test_bf16_mamba2_is_as_faithful_as_transformers_bf16_forward():
    """Issue 14, goal 3 (CPU, 8 layers): in bf16, MambaLRP's explained score and relevance are at
    least as close to the float64 truth as transformers' own bf16 forward (score; last hidden
    states) and backward pass (gradient x input); in fp32 its score is as close as transformers'
    torch path."""
    bf16 = _pooled_errors("mamba2", "bfloat16")
    assert bf16["mambalrp_score"] <= MARGIN * bf16["transformers_score"], bf16
    assert bf16["mambalrp_logits"] <= LOGITS_MARGIN * bf16["transformers_logits"], bf16
    assert bf16["mambalrp_relevance"] <= MARGIN * bf16["transformers_hidden"], bf16
    assert bf16["mambalrp_relevance"] <= GXI_MARGIN * bf16["transformers_gxi"], bf16
    fp32 = _pooled_errors("mamba2", "float32", seeds=(0, 1, 2, 3))
    assert fp32["mambalrp_score"] <= MARGIN * fp32["transformers_score"], fp32
    assert fp32["mambalrp_logits"] <= LOGITS_MARGIN * fp32["transformers_logits"], fp32


def test_bf16_mamba1_is_as_faithful_as_transformers_bf16_forward_and_backward():
    """Mamba1's score, and its relevance against transformers' bf16 gradient x input (against the
    hidden states it measured 1.5x on these small models, 0.92x on 16-layer ones: reported, not
    asserted; a relevance is a backward pass's output, the hidden states a forward's)."""
    bf16 = _pooled_errors("mamba1", "bfloat16")
    assert bf16["mambalrp_score"] <= MARGIN * bf16["transformers_score"], bf16
    assert bf16["mambalrp_logits"] <= LOGITS_MARGIN * bf16["transformers_logits"], bf16
    assert bf16["mambalrp_relevance"] <= GXI_MARGIN * bf16["transformers_gxi"], bf16


def test_float64_gradient_x_input_of_the_package_is_transformers():
    """``benchmarks/precision.py`` takes the float64 gradient x input (the truth of its baseline
    column) from the package's ``"gradient"`` composite: per token it equals autograd through
    transformers' own float64 forward to the float32 rounding inside transformers' RMSNorms and
    residual stream (1e-5 of the largest, where the bf16 errors it measures are 1e-2), Mamba1 and
    Mamba2."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from precision import build, gradient_x_input, per_token

    for arch in ("mamba1", "mamba2"):
        model = build(arch, 3, 32, 0, head_dim=16, state=16)
        ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(1))
        theirs = gradient_x_input(model, ids, 1)
        ours = per_token(MambaLRP(model, composite="gradient").attribute(ids, target=1))
        assert theirs is not None and ours.dtype == torch.float64
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), arch


def test_torch_path_unwraps_transformers_kernel_functions():
    """``models.kernel_path.torch_path`` (``benchmarks/precision.py``'s float64 truth on a machine
    with mamba-ssm, where transformers would call its kernels): every kernel wrapper of
    transformers' Mamba modules is its torch definition inside, the wrapper again after; the
    float64 hidden states are the same."""
    import importlib

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from precision import hidden_states

    from captum_mambalrp.models.kernel_path import kernel_wrapped as _kernel_wrapped
    from captum_mambalrp.models.kernel_path import torch_path

    modules = [importlib.import_module(f"transformers.models.{n}.modeling_{n}") for n in ("mamba", "mamba2", "falcon_mamba")]
    before = [dict(vars(m)) for m in modules]
    wrapped = [[k for k, v in vars(m).items() if _kernel_wrapped(v, m)] for m in modules]
    assert all(len(names) >= 4 for names in wrapped), wrapped  # the scan, conv and decode functions
    model = make_mamba2(seed=3).double()
    ids = ids_for(1, 20)
    plain = hidden_states(model, ids)
    with torch_path():
        for m, names in zip(modules, wrapped):
            assert all(not hasattr(getattr(m, k), "__wrapped__") for k in names), names
        inside = model.backbone(input_ids=ids, use_cache=False).last_hidden_state
    assert all(vars(m)[k] is b[k] for m, b, names in zip(modules, before, wrapped) for k in names)
    assert plain is not None and torch.equal(plain, inside)


def test_precision_benchmark_reports_the_score_the_pass_explains(monkeypatch):
    """``benchmarks/precision.py``'s MambaLRP score is the logit the bf16 pass computes (``sum R +
    delta``, the convergence delta being ``explained - sum R``), not ``sum R`` nor ``sum R - delta``;
    with ``conv_compare`` its ``conv_compute`` columns are those of a pass with
    ``CAPTUM_MAMBALRP_CONV_OUTPUT=compute`` (the variable as it was afterwards)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from precision import build, measure, pooled_errors

    from captum_mambalrp.kernels.dispatch import CONV_OUTPUT_ENV

    model = build("mamba1", 4, 64, 0, head_dim=16, state=16)
    ids = torch.randint(0, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(CONV_OUTPUT_ENV, "model")  # the baseline rounds the conv output
    res = measure(model, ids, ["bfloat16", "float32"], 10, conv_compare=True)
    assert os.environ[CONV_OUTPUT_ENV] == "model" and "conv_compute" not in res["float32"]
    row = res["bfloat16"]
    wide = row["conv_compute"]  # measured with CAPTUM_MAMBALRP_CONV_OUTPUT=compute
    monkeypatch.delenv(CONV_OUTPUT_ENV)  # the default: compute
    r, delta = MambaLRP(copy.deepcopy(model).to(torch.bfloat16)).attribute(ids, target=1, return_convergence_delta=True)
    assert wide["mambalrp_score"] == float((r.double().sum() + delta.double().sum()).item())
    assert wide["mambalrp_score"] != row["mambalrp_score"]  # the float32 conv output changes the pass
    assert set(wide) >= {"goal3_score", "goal3_logits", "goal3_relevance_gxi"}
    pooled = pooled_errors([res], "bfloat16", "conv_compute")
    assert pooled["transformers_score"] == pooled_errors([res], "bfloat16")["transformers_score"]
    assert pooled["mambalrp_relevance"] == wide["mambalrp_relevance_relL2"]
    low = copy.deepcopy(model).to(torch.bfloat16)
    logits = []
    monkeypatch.setenv(CONV_OUTPUT_ENV, "model")  # as the row's pass ran
    handle = low.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0, -1, 1].double().item()))
    try:
        MambaLRP(low).attribute(ids, target=1)
    finally:
        handle.remove()
    delta = row["mambalrp_delta"]
    assert abs(delta) > 1e-4 * abs(logits[-1])  # a bf16 pass: sum R and the explained score differ
    assert abs(row["mambalrp_score"] - logits[-1]) <= 1e-6 * max(abs(logits[-1]), 1.0)


def test_pooling_saved_rows_takes_the_shipped_pass_and_refuses_double_counting(tmp_path):
    """``gpu_scale.py pool`` (``precision.rows_as_shipped``): a ``--conv-output compare`` row counts
    with its ``conv_compute`` columns (the default since run 12), a plain row as it is; the pooled
    score is ``|scores - truths| / |truths|`` over the models of every file; a seed given twice or
    rows of two sizes are refused, as is a shape with no rows."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from precision import pooled_errors, rows_as_shipped

    def row(seed, truth, theirs, ours, compute=None, length=4096):
        cols = {"transformers_logit": theirs, "mambalrp_score": ours, "transformers_logits_relL2": 0.2}
        cols.update(mambalrp_logits_relL2=0.3, transformers_hidden_relL2=0.1, transformers_gxi_relL2=0.4)
        cols.update(mambalrp_relevance_relL2=0.25)
        if compute is not None:
            cols["conv_compute"] = {"mambalrp_score": compute, "mambalrp_relevance_relL2": 0.05}
        meta = {"part": "precision", "shape": "falcon7b", "layers": 16, "hidden": 1024, "length": length}
        return json.dumps({"truth_score": truth, "bfloat16": cols, "seed": seed, **meta})

    old = tmp_path / "run12.jsonl"
    old.write_text(row(0, 1.0, 1.1, 1.5, compute=1.0) + "\n" + json.dumps({"part": "precision_pooled"}) + "\n")
    new = tmp_path / "run13.jsonl"
    new.write_text(row(1, -2.0, -2.2, -2.1) + "\n")
    rows = rows_as_shipped([str(old), str(new)], "falcon7b", "bfloat16")
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["bfloat16"]["mambalrp_score"] == 1.0 and rows[0]["bfloat16"]["mambalrp_relevance_relL2"] == 0.05
    pooled = pooled_errors(rows, "bfloat16")
    assert abs(pooled["mambalrp_score"] - 0.1 / 5**0.5) < 1e-12  # errors (0, 0.1) over truths (1, -2)
    assert abs(pooled["transformers_score"] - (0.1**2 + 0.2**2) ** 0.5 / 5**0.5) < 1e-12
    assert abs(pooled["mambalrp_relevance"] - 0.15) < 1e-12
    with pytest.raises(ValueError, match="seed repeated"):
        rows_as_shipped([str(old), str(old)], "falcon7b", "bfloat16")
    other = tmp_path / "long.jsonl"
    other.write_text(row(2, 1.0, 1.0, 1.0, length=8192) + "\n")
    with pytest.raises(ValueError, match="different sizes"):
        rows_as_shipped([str(new), str(other)], "falcon7b", "bfloat16")
    with pytest.raises(ValueError, match="no precision rows of shape 'mamba2_2p7b'"):
        rows_as_shipped([str(new)], "mamba2_2p7b", "bfloat16")
