"""The identity rule on SiLU of a Mamba2 mixer's conv output, fused with the slice, transpose,
padding mask and split into x and the SSM rule's constants B, C
(``kernels/elementwise.identity_silu_split``, dispatched by ``kernels.dispatch.fused_split_activation``):
against the torch steps it replaces, in Triton's interpreter on the CPU, and compiled on CUDA; whole
Mamba2 passes with it against passes without it (whole sequences, sequence pieces, left padding)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_helpers import run_in_interpreter

from captum_mambalrp.kernels import triton_installed

HAS_TRITON = triton_installed()
CUDA = torch.cuda.is_available()

CHECK = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from captum_mambalrp.adapters.common import mask_padding
    from captum_mambalrp.kernels import dispatch, elementwise
    from captum_mambalrp.rules import GradientRule, IdentityActivationRule

    sys.path.insert(0, "tests")
    from kernel_helpers import unfused, with_env  # unfused: the same call with the fused kernels off

    def torch_steps(conv, start, length, d_x, mask=None):
        act = IdentityActivationRule().activation(conv[..., start : start + length].float(), F.silu).transpose(1, 2)
        act = mask_padding(act, mask)
        return act[..., :d_x], act[..., d_x:]

    def check_kernel(device):
        torch.manual_seed(0)
        # (channels, steps, start, length, d_x, dtype, transposed storage, padding mask): whole-sequence
        # and piece offsets, ragged tiles, a bf16 conv output, a conv output stored [b, steps, channels],
        # left padding (an integer mask, as users pass it)
        cases = [(70, 40, 0, 37, 50, torch.float32, False, False), (70, 40, 3, 37, 50, torch.float32, False, True),
                 (33, 100, 2, 90, 1, torch.float32, True, False), (70, 40, 0, 37, 64, torch.bfloat16, False, True)]
        for channels, steps, start, length, d_x, dtype, transposed, padded in cases:
            shape = (2, steps, channels) if transposed else (2, channels, steps)
            base = torch.randn(shape, device=device)
            conv = (base.transpose(1, 2) if transposed else base).to(dtype).requires_grad_(True)
            mask = None
            if padded:
                mask = torch.ones(2, length, dtype=torch.long, device=device)
                mask[0, :7] = 0
            split = dispatch.fused_split_activation(IdentityActivationRule(), conv, start, length, d_x, True, torch.float32, mask)
            assert split is not None
            x, rest = split
            x_ref, rest_ref = torch_steps(conv, start, length, d_x, mask)
            assert x.dtype == rest.dtype == torch.float32 and x.is_contiguous() and rest.is_contiguous()
            assert x.shape == x_ref.shape and rest.shape == rest_ref.shape
            assert (x - x_ref).abs().max() <= 1e-6 * x_ref.abs().max()
            assert (rest - rest_ref).abs().max() <= 1e-6 * rest_ref.abs().max()
            assert not rest.requires_grad  # B and C: constants, no gradient
            g = torch.randn_like(x_ref)
            (got,), (want,) = torch.autograd.grad(x, conv, g), torch.autograd.grad(x_ref, conv, g)
            assert got.dtype == want.dtype == dtype and got.shape == conv.shape
            bound = (2 ** -7 if dtype == torch.bfloat16 else 1e-6) * want.float().abs().max()
            assert (got.float() - want.float()).abs().max() <= bound, (channels, start, d_x)
            assert (got[:, d_x:] == 0).all() and (got[..., :start] == 0).all() and (got[..., start + length :] == 0).all()
            if padded:
                assert (x[0, :7] == 0).all() and (got[0, :, start : start + 7] == 0).all()
        # where it does not apply: another rule, an epsilon, another activation, a float64 computation
        conv = torch.randn(1, 8, 10, device=device)
        identity, f32 = IdentityActivationRule(), torch.float32
        for rule, silu, dtype in ((GradientRule(), True, f32), (IdentityActivationRule(1e-6), True, f32),
                                  (identity, False, f32), (identity, True, torch.float64)):
            assert dispatch.fused_split_activation(rule, conv, 0, 7, 4, silu, dtype) is None
        split_of_conv = lambda: dispatch.fused_split_activation(identity, conv, 0, 7, 4, True, f32)
        assert unfused(split_of_conv) is None
        assert with_env(dispatch.SPLIT_KERNEL_ENV, "0", split_of_conv) is None  # this kernel alone turned off
        try:  # a mask that is not [b, length]: one line, not a read past its end
            elementwise.identity_silu_split(conv, 0, 7, 4, f32, torch.ones(1, 9, device=device))
        except ValueError as e:
            assert "padding mask of shape (1, 9)" in str(e), e
        else:
            raise AssertionError("a mask of the wrong shape was taken")

    def check_pass(device):
        # whole Mamba2 passes with the kernel equal the passes without it: whole sequences, pieces of
        # the sequence (the conv window reaching into the previous piece), left padding, bf16
        from transformers import Mamba2Config, Mamba2ForCausalLM
        from captum_mambalrp import MambaLRP
        from captum_mambalrp.adapters.recompute import SequenceChunks
        torch.manual_seed(3)
        cfg = Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4,
                           head_dim=16, n_groups=2, expand=2, chunk_size=8)
        model = Mamba2ForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 50, (2, 40), device=device)
        calls, kernel = [], elementwise.identity_silu_split
        elementwise.identity_silu_split = lambda *a: calls.append(a[1]) or kernel(*a)
        try:
            for recompute in (False, SequenceChunks(chunk=16)):
                calls.clear()
                fused = MambaLRP(model, recompute=recompute).attribute(ids, target=5)
                assert len(calls) >= 2 and (recompute is False or any(start > 0 for start in calls)), calls
                plain = unfused(lambda: MambaLRP(model, recompute=recompute).attribute(ids, target=5))
                assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max(), recompute
            calls.clear()
            mask = torch.ones_like(ids)
            mask[0, :5] = 0
            masked = MambaLRP(model).attribute(ids, target=5, attention_mask=mask)
            assert calls
            assert (masked - unfused(lambda: MambaLRP(model).attribute(ids, target=5, attention_mask=mask))).abs().max() <= (
                1e-5 * masked.abs().max())
            calls.clear()  # B needs its gradient (the SSM rule's ablation on B): the torch steps
            ablation = MambaLRP(model, composite="no_ssm_rule_b").attribute(ids, target=5)
            assert not calls
            plain = unfused(lambda: MambaLRP(model, composite="no_ssm_rule_b").attribute(ids, target=5))
            assert (ablation - plain).abs().max() <= 1e-5 * plain.abs().max()
            low = model.bfloat16()
            fused = MambaLRP(low).attribute(ids, target=5)
            assert calls
            plain = unfused(lambda: MambaLRP(low).attribute(ids, target=5))
            assert (fused - plain).abs().max() <= 2e-2 * plain.abs().max()
        finally:
            elementwise.identity_silu_split = kernel
        assert all("forward" not in m.__dict__ for m in model.modules())
    """
)

INTERPRETER_SCRIPT = CHECK + textwrap.dedent(
    """
    check_kernel("cpu")
    check_pass("cpu")
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_silu_split_kernel_in_interpreter():
    """Forward values (x and the constants), the input gradient of the whole conv output (zero past
    x's channels and outside the mixer's steps), for whole-sequence and piece offsets, bf16 and a
    transposed conv output and a padding mask, equal the torch steps; the dispatch refuses other
    rules, an epsilon, another activation and float64; whole Mamba2 passes (sequence pieces, left
    padding, bf16) equal passes without it. Run by Triton's interpreter on the CPU."""
    run_in_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_cuda_silu_split_kernel_equals_the_torch_steps():
    """The same checks compiled on CUDA."""
    scope: dict = {}
    exec(CHECK, scope)
    scope["check_kernel"]("cuda")
    scope["check_pass"]("cuda")
