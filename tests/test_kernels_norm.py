"""The RMSNorm kernel under the constant-factor norm rule (``kernels/norm.py``) against its torch
definition (``adapters/norms.grouped_rms_norm`` with the fused kernels off): in Triton's
interpreter on the CPU, and compiled on CUDA; and a whole Mamba2 pass with it (and the fused gate
the Mamba2 mixer now takes) against the pass without any fused kernel."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_helpers import run_in_interpreter

from captum_mambalrp.kernels import triton_installed

HAS_TRITON = triton_installed()
CUDA = torch.cuda.is_available()

# shared by the interpreter script and the CUDA test: (x dtype, weight dtype, out dtype, group, channels)
CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from captum_mambalrp.adapters.norms import grouped_rms_norm, rms_norm
    from captum_mambalrp.kernels import dispatch
    from captum_mambalrp.rules import ConstantNormRule, GradientRule

    sys.path.insert(0, "tests")
    from kernel_helpers import unfused  # the same call with the fused kernels off: the torch definitions

    def ulp(dtype):  # one unit in the last place at 1.0
        return torch.finfo(dtype).eps

    def check_norm(device):
        dispatch.NORM_KERNEL_MIN_ELEMENTS, min_elements = 0, dispatch.NORM_KERNEL_MIN_ELEMENTS  # tiny tensors here
        rule, calls = ConstantNormRule(), []
        kernel = dispatch.NORM_KERNELS[dispatch.rule_key(rule)]
        dispatch.NORM_KERNELS[dispatch.rule_key(rule)] = (kernel[0], lambda *a: calls.append(1) or kernel[1](*a))
        torch.manual_seed(0)
        cases = [  # Mamba2's gated norm (float32 in, the model's bf16 out), a bf16 block norm, no weight,
                   # a float32 weight on bf16, one wide group over several of the kernel's blocks
            (torch.float32, torch.bfloat16, torch.bfloat16, 24, 72), (torch.bfloat16, torch.bfloat16, None, 72, 72),
            (torch.float32, None, None, 8, 24), (torch.bfloat16, torch.float32, None, 36, 72),
            (torch.float32, torch.float32, None, 3000, 3000), (torch.float16, torch.float16, torch.float32, 16, 32),
        ]
        for xd, wd, od, gs, c in cases:
            base = torch.randn(2, 7, c + 5, device=device) * 3  # rows strided: a slice of a wider tensor
            x = base[..., 2 : 2 + c].to(xd).requires_grad_(True)
            w = None if wd is None else (torch.rand(c, device=device) + 0.5).to(wd)
            f = lambda: grouped_rms_norm(x, w, 1e-5, gs, rule, out_dtype=od)
            n = len(calls)
            got, want = f(), unfused(f)
            assert len(calls) == n + 1 and got.dtype == want.dtype and got.shape == want.shape, (xd, wd, od)
            # the factor differs in its last bits, which can flip a rounding to x's or the output's dtype
            tol = max(ulp(xd), ulp(want.dtype)) * want.abs().max().float()
            assert (got.float() - want.float()).abs().max() <= 2 * tol, (xd, wd, od, gs)
            g = torch.randn(got.shape, device=device).to(got.dtype)
            (gx,), (wx,) = torch.autograd.grad(got, x, g), unfused(lambda: torch.autograd.grad(f(), x, g))
            assert gx.dtype == wx.dtype == xd and gx.shape == x.shape
            assert (gx.float() - wx.float()).abs().max() <= 2 * ulp(xd) * wx.abs().max().float(), (xd, wd, od, gs)
        # plain RMSNorm is one group
        x = torch.randn(3, 40, device=device)
        assert (rms_norm(x, None, None, rule) - unfused(lambda: rms_norm(x, None, None, rule))).abs().max() <= 1e-6 * 4
        # where the kernel must not run: other rules, a bias, a weight that wants its gradient
        n = len(calls)
        w = torch.ones(40, device=device)
        grouped_rms_norm(x, w, 1e-5, 8, GradientRule())
        grouped_rms_norm(x, w, 1e-5, 8, rule, bias=torch.zeros(40, device=device))
        grouped_rms_norm(x, w.requires_grad_(True), 1e-5, 8, rule)
        dispatch.NORM_KERNEL_MIN_ELEMENTS = x.numel() + 1  # and tensors too small to repay a Triton launch
        grouped_rms_norm(x, None, 1e-5, 8, rule)
        assert len(calls) == n
        dispatch.NORM_KERNEL_MIN_ELEMENTS = 0
        grouped_rms_norm(x, None, 1e-5, 8, rule)
        assert len(calls) == n + 1
        dispatch.NORM_KERNELS[dispatch.rule_key(rule)] = kernel
        dispatch.NORM_KERNEL_MIN_ELEMENTS = min_elements

    def check_mamba2_pass(device):
        # a Mamba2 pass with the fused gate and norm (and the other fused kernels) equals the pass
        # with none, float32 and bf16; the model is left as it was
        from transformers import Mamba2Config, Mamba2ForCausalLM
        from captum_mambalrp import MambaLRP
        from captum_mambalrp.kernels import norm
        dispatch.NORM_KERNEL_MIN_ELEMENTS, min_elements = 0, dispatch.NORM_KERNEL_MIN_ELEMENTS
        calls = []
        kernel = norm.constant_rms_norm
        norm.constant_rms_norm = lambda *a: calls.append(1) or kernel(*a)
        torch.manual_seed(1)
        cfg = Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4,
                           head_dim=16, n_groups=2, expand=2, chunk_size=8)
        model = Mamba2ForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 50, (2, 11), device=device)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            model = model.to(dtype)
            n = len(calls)
            fused = MambaLRP(model).attribute(ids, target=5)
            assert len(calls) - n == 2 * 2 + 1  # each layer's block norm and gated norm, the final norm
            plain = unfused(lambda: MambaLRP(model).attribute(ids, target=5))
            assert fused.dtype == plain.dtype and (fused - plain).abs().max() <= tol * plain.abs().max(), dtype
            assert all("forward" not in m.__dict__ for m in model.modules())
        norm.constant_rms_norm = kernel
        dispatch.NORM_KERNEL_MIN_ELEMENTS = min_elements
    """
)

INTERPRETER_SCRIPT = CHECK + textwrap.dedent(
    """
    check_norm("cpu")
    check_mamba2_pass("cpu")
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_norm_kernel_in_interpreter():
    """The kernel's value and input gradient equal the torch definition's to one or two units
    in the last place of their dtype (the factor's reduction order differs), for grouped and plain
    norms, strided rows, weights in the input's dtype or another, and an output dtype asked for;
    it does not run for other rules, a bias or a weight that wants its gradient; a whole Mamba2
    pass with it equals the pass without fused kernels. Run by Triton's interpreter on the CPU."""
    run_in_interpreter(INTERPRETER_SCRIPT)


def test_norm_table_names_rule_classes():
    """The norm table keys rule types by qualified name (kernels/ never imports rules/): each key
    names a rule class, and the default composite's norm rule is in it."""
    import importlib

    from captum_mambalrp.kernels.dispatch import NORM_KERNELS, rule_key
    from captum_mambalrp.rules import composite
    from captum_mambalrp.rules.base import MambaRule

    for name in NORM_KERNELS:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), MambaRule), name
    assert rule_key(composite("mambalrp").rule_for("x.norm", "norm", None)) in NORM_KERNELS


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_cuda_norm_kernel_equals_the_torch_definition():
    """The same checks compiled on CUDA."""
    scope: dict = {}
    exec(CHECK, scope)
    scope["check_norm"]("cuda")
    scope["check_mamba2_pass"]("cuda")
