"""SSD's chunk-end recurrence as one Triton kernel (``scan/triton_decay.py``, on by default, off
with ``CAPTUM_MAMBALRP_DECAY_KERNEL=0``) against the float64 step-by-step recurrence and against the
torch form it replaces (``scan/ssd_chunked.decay_scan_``): in Triton's interpreter on the CPU,
and compiled on CUDA; and a whole Mamba2 pass with it against the pass without it."""

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
    import importlib
    import sys
    import torch

    sys.path.insert(0, "tests")
    from kernel_helpers import with_env

    ssd_chunked = importlib.import_module("captum_mambalrp.scan.ssd_chunked")  # the package exports a function of that name
    triton_decay = importlib.import_module("captum_mambalrp.scan.triton_decay")

    def recurrence(u, decay):  # float64, one step at a time
        d, out = decay.double().expand(u.shape), u.double().clone()
        for t in range(1, u.shape[1]):
            out[:, t] += d[:, t] * out[:, t - 1]
        return out

    def with_kernel(on, fn):
        return with_env(ssd_chunked.DECAY_KERNEL_ENV, "1" if on else "0", fn)

    def check_decay(device):
        calls, kernel = [], triton_decay.decay_scan_
        triton_decay.decay_scan_ = lambda u, d: calls.append(u.shape) or kernel(u, d)
        torch.manual_seed(0)
        cases = [  # ssd_chunked's states [b, chunks, g, n, h, p] with the decay per (g, h); one tile and
                   # a remainder; steps past the kernel's tiles; no other axes; a decay shared by the batch
            ((2, 37, 2, 5, 3, 4), (2, 37, 2, 1, 3, 1)), ((1, 300, 7), (1, 300, 1)), ((3, 16, 1), (3, 16, 1)),
            ((3, 17), (3, 17)), ((2, 33, 4, 5), (1, 33, 4, 1)), ((1, 5, 600), (1, 5, 600)),
        ]
        for shape, dshape in cases:
            u = torch.randn(shape, device=device)
            decay = torch.rand(dshape, device=device)
            want = recurrence(u, decay)
            got = with_kernel(True, lambda: ssd_chunked.decay_scan_(u.clone(), decay))
            torch_form = with_kernel(False, lambda: ssd_chunked.decay_scan_(u.clone(), decay))
            assert calls and calls[-1] == u.shape, shape
            scale = want.abs().max()
            assert (got.double() - want).abs().max() <= 1e-6 * scale, shape
            assert (got - torch_form).abs().max() <= 1e-6 * scale, shape
        # a u whose other axes are not at stride 1: solved on a copy, written back in place
        u = torch.randn(2, 20, 6, 4, device=device).transpose(2, 3)
        decay = torch.rand(2, 20, 4, 1, device=device)
        want = recurrence(u, decay)
        out = u.clone()
        assert with_kernel(True, lambda: ssd_chunked.decay_scan_(out, decay)) is out
        assert (out.double() - want).abs().max() <= 1e-6 * want.abs().max()
        # where it must not run: turned off, one step, float64, too many axes (the torch form, correct)
        n = len(calls)
        def both(*shape, dtype=torch.float32):
            return torch.randn(shape, device=device, dtype=dtype), torch.rand(shape, device=device, dtype=dtype)
        with_kernel(False, lambda: ssd_chunked.decay_scan_(*both(2, 9)))
        with_kernel(True, lambda: ssd_chunked.decay_scan_(*both(2, 1, 3)))
        u64, d64 = both(2, 9, 3, dtype=torch.float64)
        got64 = with_kernel(True, lambda: ssd_chunked.decay_scan_(u64.clone(), d64))
        assert (got64 - recurrence(u64, d64)).abs().max() < 1e-12
        with_kernel(True, lambda: ssd_chunked.decay_scan_(*both(1, 4, 1, 1, 1, 1, 2)))
        assert len(calls) == n
        # and the kernel itself refuses them with one line
        for (u_bad, d_bad), message in ((both(2, 9, 3, dtype=torch.float64), "float32"), (both(2, 9, 1, 1, 1, 1, 1), "axes"),
                                        ((torch.randn(2, 9, 3, device=device), torch.rand(2, 9, 4, device=device)), "broadcast")):
            try:
                kernel(u_bad, d_bad)
            except ValueError as e:
                assert message in str(e), e
            else:
                raise AssertionError(message)
        triton_decay.decay_scan_ = kernel
        return calls

    def check_ssd_and_pass(device):
        # the chunked SSD scan and a whole Mamba2 pass (several chunks per sequence) with the kernel
        # equal them without it; the model is left as it was
        from transformers import Mamba2Config, Mamba2ForCausalLM
        from captum_mambalrp import MambaLRP
        torch.manual_seed(2)
        b, L, h, p, g, n = 2, 300, 4, 3, 2, 5
        x, dt = torch.randn(b, L, h, p, device=device), torch.rand(b, L, h, device=device) * 0.3
        A, D = -torch.rand(h, device=device), torch.randn(h, device=device)
        B, C = torch.randn(b, L, g, n, device=device), torch.randn(b, L, g, n, device=device)
        on = with_kernel(True, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D, chunk=16))
        off = with_kernel(False, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D, chunk=16))
        assert (on - off).abs().max() <= 1e-5 * off.abs().max()
        cfg = Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4,
                           head_dim=16, n_groups=2, expand=2, chunk_size=8)
        model = Mamba2ForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 50, (2, 200), device=device)  # 4 chunks of the relevance scan's 64 steps
        calls, kernel = [], triton_decay.decay_scan_
        triton_decay.decay_scan_ = lambda u, d: calls.append(1) or kernel(u, d)
        lrp = MambaLRP(model, backend="torch")
        on = with_kernel(True, lambda: lrp.attribute(ids, target=5))
        triton_decay.decay_scan_ = kernel
        assert len(calls) == 2 * 2  # each layer's scan forward and its reversed adjoint
        off = with_kernel(False, lambda: lrp.attribute(ids, target=5))
        assert (on - off).abs().max() <= 1e-5 * off.abs().max()
        assert all("forward" not in m.__dict__ for m in model.modules())
    """
)

INTERPRETER_SCRIPT = CHECK + textwrap.dedent(
    """
    check_decay("cpu")
    check_ssd_and_pass("cpu")
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decay_kernel_in_interpreter():
    """The kernel's result equals the float64 recurrence and the torch form to float32 rounding,
    for SSD's state layout, tiles with a remainder, a decay broadcast over the batch and a ``u``
    whose other axes are strided (solved on a copy, written back in place); it does not run when
    turned off, for one step, float64 or too many axes (the torch form does, correctly); it
    refuses those inputs itself with a ``ValueError``; the chunked SSD scan and a whole Mamba2
    pass with it equal them without it. Run by Triton's interpreter on the CPU."""
    run_in_interpreter(INTERPRETER_SCRIPT)


def test_decay_kernel_is_on_by_default_and_off_with_zero(monkeypatch):
    """The kernel runs where fused kernels may unless ``CAPTUM_MAMBALRP_DECAY_KERNEL=0``; not on
    plain CPU tensors (no interpreter)."""
    import importlib

    ssd_chunked = importlib.import_module("captum_mambalrp.scan.ssd_chunked")
    monkeypatch.delenv(ssd_chunked.DECAY_KERNEL_ENV, raising=False)
    u = torch.ones(1, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ssd_chunked._decay_kernel_applies(u, u)  # CPU tensors, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused kernels allowed on CPU tensors
    assert ssd_chunked._decay_kernel_applies(u, u) == HAS_TRITON
    assert not ssd_chunked._decay_kernel_applies(u.double(), u.double())
    needs_grad = u.clone().requires_grad_(True)  # autograd would not see the kernel's in-place writes
    assert not ssd_chunked._decay_kernel_applies(needs_grad, u)
    with torch.no_grad():
        assert ssd_chunked._decay_kernel_applies(needs_grad, u) == HAS_TRITON
    monkeypatch.setenv(ssd_chunked.DECAY_KERNEL_ENV, "0")
    assert not ssd_chunked._decay_kernel_applies(u, u)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_cuda_decay_kernel_equals_the_recurrence():
    """The same checks compiled on CUDA."""
    scope: dict = {}
    exec(CHECK, scope)
    scope["check_decay"]("cuda")
    scope["check_ssd_and_pass"]("cuda")
