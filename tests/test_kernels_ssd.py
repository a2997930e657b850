"""SSD's chunk outputs in Triton (``scan/triton_ssd.py``; ``CAPTUM_MAMBALRP_SSD_KERNEL=0`` turns it
off) against the float64 step-by-step recurrence and against the torch form it replaces
(``scan/ssd_chunked.ssd_chunked``): in Triton's interpreter on the CPU, and compiled on CUDA; and a
whole Mamba2 pass with it against the pass without it."""

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
    triton_ssd = importlib.import_module("captum_mambalrp.scan.triton_ssd")

    def recurrence(x, dt, A, B, C, D):  # float64, one step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t
        x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
        b, L, heads, p = x.shape
        hg = heads // B.shape[2]
        Bh, Ch = B.repeat_interleave(hg, dim=2), C.repeat_interleave(hg, dim=2)  # [b, L, h, n]
        h = torch.zeros(b, heads, p, B.shape[3], dtype=torch.float64, device=x.device)
        ys = []
        for t in range(L):
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
            ys.append((h * Ch[:, t, :, None]).sum(-1))
        y = torch.stack(ys, 1)
        if D is not None:
            y = y + D.double().reshape(heads, -1) * x
        return y

    def with_kernel(on, fn):
        return with_env(ssd_chunked.SSD_KERNEL_ENV, "1" if on else "0", fn)

    def counting():
        calls, kernel = [], triton_ssd.chunk_outputs
        triton_ssd.chunk_outputs = lambda *a: calls.append("outputs") or kernel(*a)
        def restore():
            triton_ssd.chunk_outputs = kernel
        return calls, restore

    def check_ssd(device):
        calls, restore = counting()
        torch.manual_seed(0)
        # (b, L, heads, p, groups, n, chunk, D): a remainder chunk, one chunk, a chunk shorter than
        # a tile and not a power of two, p and n below 16 and above one tile, D per head / channel
        cases = [(2, 100, 4, 3, 2, 5, 16, "head"), (1, 64, 2, 16, 1, 16, 64, None), (1, 150, 6, 20, 3, 80, 64, "channel"),
                 (1, 37, 2, 8, 1, 8, 12, "head"), (1, 1, 2, 4, 1, 4, 64, "head"), (1, 70, 2, 80, 2, 16, 32, "channel")]
        for b, L, heads, p, groups, n, chunk, d_kind in cases:
            x, dt = torch.randn(b, L, heads, p, device=device), torch.rand(b, L, heads, device=device) * 0.5
            A = -torch.rand(heads, device=device) * 2
            B, C = torch.randn(b, L, groups, n, device=device), torch.randn(b, L, groups, n, device=device)
            D = {None: None, "head": torch.randn(heads, device=device), "channel": torch.randn(heads, p, device=device)}[d_kind]
            want = recurrence(x, dt, A, B, C, D)
            n_calls = len(calls)
            got = with_kernel(True, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D, chunk=chunk))
            torch_form = with_kernel(False, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D, chunk=chunk))
            assert calls[n_calls:] == ["outputs"], (L, chunk)
            assert got.dtype == torch.float32 and got.shape == (b, L, heads, p) and got.is_contiguous()
            scale = want.abs().max()
            assert (got.double() - want).abs().max() <= 1e-5 * scale, (L, chunk, d_kind)
            assert (got - torch_form).abs().max() <= 1e-5 * scale, (L, chunk, d_kind)
        # strided views (x and dt inside wider tensors, x's channels at stride 2, B and C interleaved
        # with a group stride other than n and C's state entries at stride 2) and bf16 inputs, read as they are
        b, L, heads, p, groups, n = 2, 130, 4, 8, 2, 16
        wide = torch.randn(b, L, 2 * heads * p + 7, device=device)
        x = wide[..., 3 : 3 + 2 * heads * p].unflatten(-1, (heads, 2 * p))[..., ::2]
        dt = torch.rand(b, L, heads + 2, device=device)[..., 1 : heads + 1] * 0.5
        A, D = -torch.rand(heads, device=device) * 2, torch.randn(heads, device=device)
        BC = torch.randn(b, L, 2, groups, 2 * n + 3, device=device)
        B, C = BC[:, :, 0, :, :n], BC[:, :, 1, :, 3::2]
        assert x.stride(-1) == 2 and B.stride(2) != n and C.stride(-1) == 2
        for inputs in ((x, dt, B, C), tuple(t.bfloat16() for t in (x, dt, B, C))):
            xi, dti, Bi, Ci = inputs
            want = recurrence(xi, dti, A, Bi, Ci, D)
            got = with_kernel(True, lambda: ssd_chunked.ssd_chunked(xi, dti, A, Bi, Ci, D))
            assert got.dtype == torch.float32 and calls[-1:] == ["outputs"]
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), xi.dtype
        # where it must not run: turned off, float64, the differentiable form, a gradient to record
        n_calls = len(calls)
        with_kernel(False, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D))
        x64 = (x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
        got64 = with_kernel(True, lambda: ssd_chunked.ssd_chunked(*x64))
        assert got64.dtype == torch.float64 and (got64 - recurrence(*x64)).abs().max() <= 1e-10 * got64.abs().max()
        for A_or_D in ("A", "D"):  # a gradient to record in a constant: the torch form, which refuses it
            needs = {"A": A, "D": D, A_or_D: (A if A_or_D == "A" else D).clone().requires_grad_(True)}
            assert not ssd_chunked._ssd_kernel_applies(x, dt, B, C, torch.float32, False, 64, (needs["A"], needs["D"]))
        empty = with_kernel(True, lambda: ssd_chunked.ssd_chunked(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D))
        assert empty.shape == (b, 0, heads, p)
        long_chunks = with_kernel(True, lambda: ssd_chunked.ssd_chunked(x, dt, A, B, C, D, chunk=128))
        assert (long_chunks.double() - recurrence(x, dt, A, B, C, D)).abs().max() <= 1e-5 * long_chunks.abs().max()
        needs_grad = x.clone().requires_grad_(True)
        y = with_kernel(True, lambda: ssd_chunked.ssd_chunked(needs_grad, dt, A, B, C, None, differentiable=True))
        y.sum().backward()
        assert needs_grad.grad is not None
        assert not ssd_chunked._ssd_kernel_applies(needs_grad, dt, B, C, torch.float32, False)
        assert len(calls) == n_calls
        restore()

    def check_pass(device):
        # a whole Mamba2 pass (several chunks per sequence) with the kernel equals it without it;
        # the model is left as it was
        from transformers import Mamba2Config, Mamba2ForCausalLM
        from captum_mambalrp import MambaLRP
        torch.manual_seed(2)
        cfg = Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4,
                           head_dim=16, n_groups=2, expand=2, chunk_size=8)
        model = Mamba2ForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 50, (2, 150), device=device)  # 3 chunks of the relevance scan's 64 steps
        calls, restore = counting()
        lrp = MambaLRP(model, backend="torch")
        on = with_kernel(True, lambda: lrp.attribute(ids, target=5))
        restore()
        assert calls.count("outputs") == 2 * 2  # each layer's scan and its reversed adjoint
        off = with_kernel(False, lambda: lrp.attribute(ids, target=5))
        assert (on - off).abs().max() <= 1e-5 * off.abs().max()
        assert all("forward" not in m.__dict__ for m in model.modules())
    """
)

INTERPRETER_SCRIPT = CHECK + textwrap.dedent(
    """
    check_ssd("cpu")
    check_pass("cpu")
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_ssd_kernel_in_interpreter():
    """The kernel's result equals the float64 recurrence and the torch form to float32
    rounding: chunks with a remainder, a chunk not a power of two, state and channel counts below
    and above one tile, D per head and per channel, strided views (channels, state entries and
    groups at strides of their own) and bf16 inputs; they do not run when turned off, for float64,
    for the differentiable form, where a gradient would be recorded (in A and D too), for chunks
    longer than they take or empty inputs (the torch form does, correctly); a whole Mamba2 pass with
    them equals it without them.
    Run by Triton's interpreter on the CPU."""
    run_in_interpreter(INTERPRETER_SCRIPT)


def test_ssd_kernel_is_on_by_default_and_off_with_zero(monkeypatch):
    """The kernel runs where fused kernels may unless ``CAPTUM_MAMBALRP_SSD_KERNEL=0``; not on
    plain CPU tensors (no interpreter), nor for a float64 computation."""
    import importlib

    ssd_chunked = importlib.import_module("captum_mambalrp.scan.ssd_chunked")
    monkeypatch.delenv(ssd_chunked.SSD_KERNEL_ENV, raising=False)
    x = torch.ones(1, 3, 2, 4)
    dt, B = torch.ones(1, 3, 2), torch.ones(1, 3, 1, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ssd_chunked._ssd_kernel_applies(x, dt, B, B, torch.float32, False)  # CPU tensors, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused kernels allowed on CPU tensors
    assert ssd_chunked._ssd_kernel_applies(x, dt, B, B, torch.float32, False) == HAS_TRITON
    assert not ssd_chunked._ssd_kernel_applies(x, dt, B, B, torch.float64, False)
    assert not ssd_chunked._ssd_kernel_applies(x, dt, B, B, torch.float32, True)
    monkeypatch.setenv(ssd_chunked.SSD_KERNEL_ENV, "0")
    assert not ssd_chunked._ssd_kernel_applies(x, dt, B, B, torch.float32, False)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_ssd_kernel_products_follow_torchs_tf32_setting():
    """The kernel's float32 products run in TF32 exactly where torch's float32 matmuls may (the
    torch form's products follow that setting too)."""
    from captum_mambalrp.scan import triton_ssd

    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert triton_ssd._precision() == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_ssd._precision() == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_cuda_ssd_kernel_equals_the_recurrence():
    """The same checks compiled on CUDA (IEEE float32 products: the bounds are float32's)."""
    scope: dict = {}
    exec(CHECK, scope)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        scope["check_ssd"]("cuda")
        scope["check_pass"]("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
