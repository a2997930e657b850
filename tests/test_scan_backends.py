"""Scan backends: dispatch, the Triton kernel (interpreter on CPU, compiled on CUDA),
mamba-ssm's kernels (CUDA), dtypes, and the memory bound of the relevance scan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import run_in_interpreter
from test_scan import rand, sequential_mamba1, sequential_ssd

import captum_mambalrp.scan as scan
from captum_mambalrp.kernels import triton_installed
from captum_mambalrp.scan import selective_scan, ssd_scan

HAS_TRITON = triton_installed()
CUDA = torch.cuda.is_available()


def mamba1_case(b=2, d=5, n=3, l=11, seed=0):
    x, B, C, D = rand(b, d, l, seed=seed + 1), rand(b, n, l, seed=seed + 2), rand(b, n, l, seed=seed + 3), rand(d, seed=seed + 4)
    delta = rand(b, d, l, seed=seed + 5).abs() * 0.3
    A = -rand(d, n, seed=seed + 6).abs() * 2
    return x, delta, A, B, C, D


def ssd_case(b=2, l=9, heads=4, p=3, n=5, groups=2, seed=0):
    x = rand(b, l, heads, p, seed=seed + 1)
    dt = rand(b, l, heads, seed=seed + 2).abs() * 0.3
    A = -rand(heads, seed=seed + 3).abs()
    return x, dt, A, rand(b, l, groups, n, seed=seed + 4), rand(b, l, groups, n, seed=seed + 5), rand(heads, seed=seed + 6)


def check_against_sequential(fn, sequential, args, backend, device="cpu", dtype=torch.float32, tol=1e-4):
    """Output and input gradient of ``fn(..., backend=backend)`` vs the float64 recurrence."""
    x, *rest = args
    ref = sequential(x, *rest)
    xr = x.to(device, dtype).requires_grad_(True)
    params = [t.to(device, torch.float32) for t in rest]
    with scan.record_backends() as used:
        y = fn(xr, *params, backend=backend)
    assert dict(used) == {backend: 1}
    assert y.dtype == torch.float32
    g = rand(*ref.shape, seed=99)
    (got,) = torch.autograd.grad(y, xr, g.to(device, torch.float32))
    assert got.dtype == dtype
    xs = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sequential(xs, *rest), xs, g)
    scale = ref.abs().max()
    assert (y.double().cpu() - ref).abs().max() <= tol * scale
    grad_tol = tol if dtype == torch.float32 else 8e-3  # the gradient is rounded to x's dtype
    assert (got.double().cpu() - expected).abs().max() <= grad_tol * expected.abs().max()


# ---------------------------------------------------------------- dispatch


def test_dispatch_on_cpu():
    assert scan.BACKENDS == ("auto", "torch", "triton", "mamba_ssm")
    assert scan.resolve_backend("auto", "cpu") == "torch"
    assert scan.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown scan backend"):
        scan.resolve_backend("cuda_magic", "cpu")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        scan.resolve_backend("mamba_ssm", "cpu")
    x, delta, A, B, C, D = (t.float() for t in mamba1_case())
    with scan.record_backends() as outer:
        with scan.record_backends() as used:
            selective_scan(x, delta, A, B, C, D)
            ssd_scan(*(t.float() for t in ssd_case()))
        selective_scan(x, delta, A, B, C, D)
    assert used == {"torch": 2}
    assert outer == {"torch": 3}  # nested recorders each count what ran inside them


def test_mambalrp_passes_backend_through():
    from conftest import make_lm

    from captum_mambalrp import MambaLRP

    model = make_lm("mamba")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with scan.record_backends() as used:
        MambaLRP(model, backend="torch").attribute(ids, target=3)
    assert used == {"torch": model.config.num_hidden_layers}
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        MambaLRP(model, backend="mamba_ssm").attribute(ids, target=3)


# ---------------------------------------------------------------- torch backend details


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_torch_scan_any_chunk(chunk):
    from captum_mambalrp.scan.linear_scan import relevance_scan

    x, delta, A, B, C, D = mamba1_case(l=23)
    ref = sequential_mamba1(x, delta, A, B, C, D)
    xr = x.float().requires_grad_(True)
    Bc, Cc = B.transpose(1, 2).unsqueeze(1).float(), C.transpose(1, 2).unsqueeze(1).float()
    y = relevance_scan(xr, delta.float(), A[:, None, :].float(), Bc, Cc, D[:, None].float(), chunk=chunk)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-4)
    y.backward(torch.ones_like(y))
    xs = x.clone().requires_grad_(True)
    sequential_mamba1(xs, delta, A, B, C, D).sum().backward()
    assert torch.allclose(xr.grad.double(), xs.grad, atol=1e-5, rtol=1e-4)


def test_torch_scan_low_precision_inputs_accumulate_in_float32():
    x, delta, A, B, C, D = mamba1_case(l=40)
    ref = sequential_mamba1(x.bfloat16().double(), delta, A, B, C, D)
    xr = x.bfloat16().requires_grad_(True)
    y = selective_scan(xr, delta.float(), A.float(), B.float(), C.float(), D.float())
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert xr.grad.dtype == torch.bfloat16


def test_torch_scan_leaves_inputs_untouched():
    x, delta, A, B, C, D = (t.float() for t in mamba1_case(l=30))
    copies = [t.clone() for t in (x, delta, A, B, C, D)]
    xr = x.clone().requires_grad_(True)
    selective_scan(xr, delta, A, B, C, D).sum().backward()
    for a, b in zip((xr.detach(), delta, A, B, C, D), copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- Triton (interpreter on CPU)

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from triton.runtime import interpreter

    # Triton's interpreter turns scalar arguments into 1-element arrays and calls int() on
    # them in range(...), which NumPy >= 2.4 refuses: read the element instead.
    original = interpreter._patch_lang_tensor
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched

    sys.path.insert(0, "tests")
    from captum_mambalrp.scan import selective_scan, ssd_scan, triton_scan
    triton_scan.BLOCK_T = 4  # several time tiles (and a ragged last one) at these tiny lengths
    from test_scan_backends import check_against_sequential, mamba1_case, ssd_case
    from test_scan import sequential_mamba1, sequential_ssd
    check_against_sequential(selective_scan, sequential_mamba1, mamba1_case(d=19, l=7), "triton")
    check_against_sequential(ssd_scan, sequential_ssd, ssd_case(l=6), "triton")
    x, delta, A, B, C, _ = mamba1_case(d=4, l=5)
    x = x.bfloat16().double()  # representable in bf16: the kernel sees the same input
    check_against_sequential(
        lambda x, d, A, B, C, backend: selective_scan(x, d, A, B, C, None, backend=backend),
        lambda x, d, A, B, C: sequential_mamba1(x, d, A, B, C, 0.0),
        (x, delta, A, B, C), "triton", dtype=torch.bfloat16,
    )
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_in_interpreter():
    """The Triton kernel (forward and adjoint; Mamba1, Mamba2 with groups, bf16 input,
    no D) against the float64 recurrence, run by Triton's interpreter on the CPU (in a
    fresh process: ``TRITON_INTERPRET`` must be set before triton is imported)."""
    run_in_interpreter(INTERPRETER_SCRIPT)


# ---------------------------------------------------------------- reversed adjoint


def _torch_forward(layout):
    """A forward-only scan in a kernel's layout, as mamba-ssm's kernels are called."""
    fn = selective_scan if layout == "mamba1" else ssd_scan

    def forward(x, dt, A, B, C, D):
        with torch.no_grad():
            return fn(x, dt, A, B, C, D, backend="torch")

    return forward


@pytest.mark.parametrize("layout", ["mamba1", "ssd"])
def test_reversed_adjoint_is_the_input_gradient(layout):
    """The backward pass the mamba_ssm backend uses (its forward kernel on the reversed
    problem) gives the float64 recurrence's dx, here with the torch scan as the kernel;
    one step size underflowed to zero stays finite."""
    from captum_mambalrp.scan.adjoint import ReversedAdjointScan

    if layout == "mamba1":
        x, dt, A, B, C, D = mamba1_case(d=6, n=4, l=23)
        dt[0, 2, 7] = 0.0
        sequential = sequential_mamba1
    else:
        x, dt, A, B, C, D = ssd_case(l=21, heads=4, p=3, n=5, groups=2)
        dt[1, 5, 2] = 0.0
        sequential = sequential_ssd
    xr = x.clone().requires_grad_(True)
    y = ReversedAdjointScan.apply(xr, dt, A, B, C, D, _torch_forward(layout), layout)
    g = rand(*y.shape, seed=7)
    (got,) = torch.autograd.grad(y, xr, g)
    xs = x.double().clone().requires_grad_(True)
    ref = sequential(xs, dt.double(), A.double(), B.double(), C.double(), D.double())
    (expected,) = torch.autograd.grad(ref, xs, g.double())
    assert torch.isfinite(got).all()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def _raw_forward():
    """A forward-only Mamba1 kernel taking the raw step and its bias, as mamba-ssm's
    ``selective_scan_fn(..., delta_bias=, delta_softplus=True)`` does (the torch scan on
    ``softplus(dt + bias)`` computed in float32, reading and writing the inputs' dtype)."""
    reads = []

    def forward(x, dt, A, B, C, D, dt_bias=None):
        reads.append((x.dtype, dt.dtype, B.dtype, dt_bias is not None))
        step = dt.float() if dt_bias is None else F.softplus(dt.float() + dt_bias[:, None])
        with torch.no_grad():
            return selective_scan(x.float(), step, A, B.float(), C.float(), D, backend="torch").to(x.dtype)

    return forward, reads


@pytest.mark.parametrize("kernel_dtype", [None, torch.bfloat16])
def test_raw_step_through_the_kernel(kernel_dtype, monkeypatch):
    """Mamba1's step handed to the kernel raw (``dt_proj``'s product) with its bias, as the model's
    own kernel takes it: the relevance scan (``relevance_scan_from(dt_bias=)``) gives the float64
    recurrence on ``softplus(dt + bias)`` in value and input gradient; no float32 step tensor is
    kept (the raw step is, in its own dtype); a bf16 kernel reads x, dt, B, C in bf16 and the
    reversed adjoint runs in float32 on the same constants; ``selective_scan(dt_bias=)`` on the
    torch backend computes the same. Steps far below and above softplus' threshold (20) included."""
    from captum_mambalrp.scan import adjoint

    x, _, A, B, C, D = (t.float() for t in mamba1_case(d=6, n=4, l=23))
    raw = rand(2, 6, 23, seed=11).float() * 3
    raw[0, 1, 4], raw[1, 2, 9] = -40.0, 25.0
    bias = rand(6, seed=12).float()
    if kernel_dtype is not None:
        raw, B, C = raw.bfloat16(), B.bfloat16().float(), C.bfloat16().float()
    kernel, reads = _raw_forward()
    xr = x.clone().requires_grad_(True)
    y = adjoint.relevance_scan_from(kernel, "mamba1", xr, raw, A, B, C, D, kernel_dtype, bias)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert raw.dtype in [t.dtype for t in saved if t.shape == raw.shape]
    assert not any(t.dtype == torch.float32 and t.shape == raw.shape for t in saved) or raw.dtype == torch.float32
    g = rand(*y.shape, seed=7).float()
    (got,) = torch.autograd.grad(y, xr, g)
    want_kernel = kernel_dtype or torch.float32
    assert reads[0] == (want_kernel, want_kernel, want_kernel, True) and reads[1][:3] == (torch.float32,) * 3
    step = F.softplus(raw.double() + bias.double()[:, None])
    xs = (x.bfloat16() if kernel_dtype else x).double().requires_grad_(True)
    ref = sequential_mamba1(xs, step, A.double(), B.double(), C.double(), D.double())
    (expected,) = torch.autograd.grad(ref, xs, g.double())
    tol = 2**-7 if kernel_dtype else 1e-5
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # float32 adjoint
    # the torch backend's form of the same call
    if kernel_dtype is not None:
        monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "model")
    x2 = x.clone().requires_grad_(True)
    y2 = selective_scan(x2, raw, A, B, C, D, backend="torch", model_dtype=kernel_dtype or torch.float32, dt_bias=bias)
    assert (y2.double() - ref).abs().max() <= tol * ref.abs().max()
    (got2,) = torch.autograd.grad(y2, x2, g)
    assert (got2 - got).abs().max() <= 1e-5 * got.abs().max()


@pytest.mark.parametrize("layout", ["mamba1", "ssd"])
def test_scan_inputs_in_the_model_dtype(layout, monkeypatch):
    """CAPTUM_MAMBALRP_SCAN_INPUTS=model: a bf16 model's relevance scan reads x, dt, B, C rounded
    to bf16. A kernel that reads and writes bf16 as mamba-ssm's does (emulated: the torch scan on
    the upcast inputs, its output rounded), run through ``relevance_scan_from(kernel_dtype=)``,
    equals the torch backend's rounded form in value and in the input gradient, which is the
    float32 adjoint of the rounded problem (not rounded itself); "compute" leaves the scan as it
    was, and a float32 model is never rounded."""
    from captum_mambalrp.scan import adjoint

    case = mamba1_case(d=6, n=4, l=23) if layout == "mamba1" else ssd_case(l=21, heads=4, p=3, n=5, groups=2)
    x, dt, A, B, C, D = (t.float() for t in case)
    inner = _torch_forward(layout)
    reads = []

    def bf16_kernel(x, dt, A, B, C, D):
        reads.append((x.dtype, dt.dtype, B.dtype, C.dtype))
        return inner(x.float(), dt.float(), A, B.float(), C.float(), D).to(x.dtype)

    fn = selective_scan if layout == "mamba1" else ssd_scan
    g = rand(*x.shape, seed=9).float()
    monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "model")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = adjoint.relevance_scan_from(bf16_kernel, layout, x1, dt, A, B, C, D, torch.bfloat16)
    y2 = fn(x2, dt, A, B, C, D, backend="torch", model_dtype=torch.bfloat16)
    assert reads == [(torch.bfloat16,) * 4] and y1.dtype == y2.dtype == torch.float32
    assert torch.equal(y1, y1.bfloat16().float())  # the kernel's bf16 output, upcast
    assert (y1 - y2).abs().max() <= 2**-8 * y2.abs().max()
    (d1,), (d2,) = torch.autograd.grad(y1, x1, g), torch.autograd.grad(y2, x2, g)
    assert reads[1] == (torch.float32,) * 4  # the reversed adjoint in float32
    assert not torch.equal(d1, d1.bfloat16().float())  # the gradient is not rounded
    assert (d1 - d2).abs().max() <= 1e-5 * d2.abs().max()
    # against the float32 scan of the rounded problem, written out
    xr = x.bfloat16().float().requires_grad_(True)
    ref = fn(xr, dt.bfloat16().float(), A, B.bfloat16().float(), C.bfloat16().float(), D, backend="torch")
    assert (y2 - ref).abs().max() <= 2**-8 * ref.abs().max()
    (dref,) = torch.autograd.grad(ref, xr, g)
    assert (d2 - dref).abs().max() <= 1e-5 * dref.abs().max()
    # "compute" and float32 models: not rounded
    assert scan.rounded_inputs(torch.float32) is None and scan.rounded_inputs(torch.bfloat16) is torch.bfloat16
    monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "compute")
    assert scan.rounded_inputs(torch.bfloat16) is None
    assert torch.equal(fn(x, dt, A, B, C, D, backend="torch", model_dtype=torch.bfloat16), fn(x, dt, A, B, C, D, backend="torch"))
    monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "fast")
    with pytest.raises(ValueError, match="CAPTUM_MAMBALRP_SCAN_INPUTS='fast': set it to 'auto', 'model' or 'compute'"):
        scan.rounded_inputs(torch.bfloat16)
    # the default, "auto": Mamba1's scan reads the model's dtype, SSD's the compute dtype
    monkeypatch.delenv(scan.SCAN_INPUTS_ENV)
    assert scan.rounded_inputs(torch.bfloat16) is torch.bfloat16 and scan.rounded_inputs(torch.float16, layout="mamba1")
    assert scan.rounded_inputs(torch.bfloat16, layout="ssd") is None and scan.rounded_inputs(torch.float32) is None


FUSED_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    import torch.nn.functional as F
    from captum_mambalrp.kernels import fused_kernels_enabled
    from captum_mambalrp.rules import HalfGateRule, IdentityActivationRule
    from captum_mambalrp.rules.gate import gate_with_activation
    from captum_mambalrp.rules.linear import epsilon_scaled
    from captum_mambalrp.scan import adjoint
    torch.manual_seed(0)

    sys.path.insert(0, "tests")
    from kernel_helpers import unfused  # the same call with the fused kernels off: the torch definitions

    # LRP-epsilon's backward factor
    g = torch.randn(5000)
    z = torch.randn(5000) * 1e-8
    z[:3] = torch.tensor([0.0, -1e-12, 3.0])
    assert fused_kernels_enabled(g, z) and not unfused(lambda: fused_kernels_enabled(g, z))
    assert torch.equal(epsilon_scaled(g, z, 1e-9), unfused(lambda: epsilon_scaled(g, z, 1e-9)))
    gb, zb = g.bfloat16(), z.bfloat16()
    got = epsilon_scaled(gb, zb, 1e-9)
    assert got.dtype == torch.bfloat16
    want = unfused(lambda: epsilon_scaled(gb.float(), zb.float(), 1e-9))
    assert ((got.float() - want).abs() <= 2 ** -7 * want.abs()).all()
    # permuted tensors of equal strides (read in place) and of different strides (copied)
    gt, zt = torch.randn(3, 40, 50).transpose(1, 2), torch.randn(3, 40, 50).transpose(1, 2)
    for zz in (zt, zt.contiguous()):
        got = epsilon_scaled(gt, zz, 1e-3)
        assert torch.equal(got, unfused(lambda: epsilon_scaled(gt, zz, 1e-3)))

    # the default gate, output and both gradients, strided inputs, both output layouts,
    # against the rule objects composed (HalfGateRule on IdentityActivationRule(SiLU))
    y = torch.randn(2, 37, 70, requires_grad=True)
    z = torch.randn(2, 70, 37).transpose(1, 2).requires_grad_(True)
    gy = torch.randn(2, 70, 37).transpose(1, 2)
    ref = HalfGateRule().gate(y, IdentityActivationRule().activation(z, F.silu))
    for transposed in (False, True):
        out = gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, z, F.silu, transposed)
        assert out.grad_fn is not None and "HalfSiluGate" in type(out.grad_fn).__name__
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
        for a, b in zip(torch.autograd.grad(out, (y, z), gy), torch.autograd.grad(ref, (y, z), gy, retain_graph=True)):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()

    # a bf16 model's gate input z beside the float32 scan output y: the kernel reads z as it is,
    # keeps it (no float32 copy) and returns its gradient in bf16, as the upcast z.to(float32) would
    y = torch.randn(2, 37, 70, requires_grad=True)
    zb = torch.randn(2, 70, 37).bfloat16().transpose(1, 2).requires_grad_(True)
    out = gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, zb, F.silu, True)
    assert "HalfSiluGate" in type(out.grad_fn).__name__
    kept = out.grad_fn.saved_tensors[1]
    assert kept.dtype == torch.bfloat16 and kept.untyped_storage().data_ptr() == zb.untyped_storage().data_ptr()
    ref = unfused(lambda: gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, zb, F.silu, True))
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
    (dy, dz), (dy_ref, dz_ref) = torch.autograd.grad(out, (y, zb), gy), torch.autograd.grad(ref, (y, zb), gy)
    assert dz.dtype == dz_ref.dtype == torch.bfloat16
    assert (dy - dy_ref).abs().max() <= 1e-6 * dy_ref.abs().max()
    assert ((dz.float() - dz_ref.float()).abs() <= 2 ** -7 * dz_ref.float().abs() + 1e-30).all()

    # the identity rule on SiLU of a bf16 conv output (a strided slice), computed in float32: the
    # kernel keeps the bf16 input itself (shared with what the conv's rule keeps), not a float32 factor
    from captum_mambalrp.rules.activation import activation_in
    conv_out = torch.randn(2, 70, 40).bfloat16().requires_grad_(True)
    xb = conv_out[..., :37]
    act = activation_in(IdentityActivationRule(), xb, F.silu, torch.float32)
    assert act.dtype == torch.float32 and "IdentitySiluUpcast" in type(act.grad_fn).__name__
    kept = act.grad_fn.saved_tensors[0]
    assert kept.dtype == torch.bfloat16 and kept.untyped_storage().data_ptr() == conv_out.untyped_storage().data_ptr()
    ref = unfused(lambda: activation_in(IdentityActivationRule(), xb, F.silu, torch.float32))
    assert "IdentitySiluUpcast" not in type(ref.grad_fn).__name__
    assert (act - ref).abs().max() <= 1e-6 * ref.abs().max()
    g = torch.randn(2, 70, 37)
    (got,), (want,) = torch.autograd.grad(act, conv_out, g), torch.autograd.grad(ref, conv_out, g)
    assert got.dtype == want.dtype == torch.bfloat16
    assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-30).all()
    # a float32 conv output (a float32 model, or CAPTUM_MAMBALRP_CONV_OUTPUT=compute): the same kernel
    # keeps it, not a float32 factor of its own; a float64 one takes the rule's own torch code
    conv32 = torch.randn(2, 70, 40, requires_grad=True)
    act32 = activation_in(IdentityActivationRule(), conv32[..., :37], F.silu, torch.float32)
    assert "IdentitySiluUpcast" in type(act32.grad_fn).__name__
    assert act32.grad_fn.saved_tensors[0].untyped_storage().data_ptr() == conv32.untyped_storage().data_ptr()
    ref32 = unfused(lambda: activation_in(IdentityActivationRule(), conv32[..., :37], F.silu, torch.float32))
    assert (act32 - ref32).abs().max() <= 1e-6 * ref32.abs().max()
    (got,), (want,) = torch.autograd.grad(act32, conv32, g), torch.autograd.grad(ref32, conv32, g)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    x64 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    act64 = activation_in(IdentityActivationRule(), x64, F.silu, torch.float64)
    assert "IdentitySiluUpcast" not in type(act64.grad_fn).__name__
    # the same pass also writing the copy in the model's dtype (what a bf16 Mamba1's x_proj reads):
    # the float32 result rounded (to nearest on the GPU, as torch's cast; Triton's interpreter
    # truncates: one bf16 step apart at most), and both outputs pass their gradients to the input
    from captum_mambalrp.rules.activation import activation_in_and_rounded
    act, low = activation_in_and_rounded(IdentityActivationRule(), xb, F.silu, torch.float32, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.grad_fn is act.grad_fn
    assert ((low.float() - act).abs() <= 2 ** -7 * act.abs()).all()
    ref, ref_low = unfused(lambda: activation_in_and_rounded(IdentityActivationRule(), xb, F.silu, torch.float32,
                                                             torch.bfloat16))  # fmt: skip
    assert "IdentitySiluUpcast" not in type(ref.grad_fn).__name__ and torch.equal(ref_low, ref.to(torch.bfloat16))
    assert (act - ref).abs().max() <= 1e-6 * ref.abs().max()
    g_low = torch.randn(2, 70, 37).bfloat16()
    for grads in ((g, None), (None, g_low), (g, g_low)):
        outs = [t for t, gr in zip((act, low), grads) if gr is not None]
        refs = [t for t, gr in zip((ref, ref_low), grads) if gr is not None]
        used = [gr for gr in grads if gr is not None]
        (got,) = torch.autograd.grad(outs, conv_out, used, retain_graph=True)
        (want,) = torch.autograd.grad(refs, conv_out, used, retain_graph=True)
        assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-30).all()
    same = activation_in_and_rounded(IdentityActivationRule(), conv32[..., :37], F.silu, torch.float32, torch.float32)
    assert same[0] is same[1]  # a float32 model: one tensor, no copy

    # the gate rounding its float32 result once to the model's dtype (a bf16 model's out_proj input):
    # the float32 gate's value rounded, and its gradients
    out = gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, zb, F.silu, True, torch.bfloat16)
    out32 = gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, zb, F.silu, True)
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    assert ((out.float() - out32).abs() <= 2 ** -7 * out32.abs()).all()  # rounded once (interpreter: truncated)
    plain = unfused(lambda: gate_with_activation(HalfGateRule(), IdentityActivationRule(), y, zb, F.silu, True,
                                                 torch.bfloat16))  # fmt: skip
    assert plain.dtype == torch.bfloat16 and (plain.float() - out.float()).abs().max() <= 2 ** -7 * out.float().abs().max()
    gb16 = gy.bfloat16()
    for a, b in zip(torch.autograd.grad(out, (y, zb), gb16), torch.autograd.grad(out32, (y, zb), gb16.float())):
        assert a.dtype == b.dtype and torch.equal(a, b)

    # the steps around the reversed scan, both layouts, D per channel / head / (head, p), none
    cases = [("mamba1", torch.randn(2, 6, 23), torch.rand(2, 6, 23), torch.randn(6)),
             ("ssd", torch.randn(2, 19, 4, 3), torch.rand(2, 19, 4), torch.randn(4)),
             ("ssd", torch.randn(2, 19, 4, 3), torch.rand(2, 19, 4), torch.randn(4, 3)),
             ("ssd", torch.randn(2, 19, 4, 3), torch.rand(2, 19, 4), None)]
    for layout, g, dt, D in cases:
        dt[0, 1, 2] = 0.0
        x_rev, dt_rev = adjoint.prepare(g, dt, layout)
        x_ref, dt_ref = adjoint.prepare_torch(g, dt, layout)
        assert torch.equal(dt_rev, dt_ref) and torch.equal(x_rev, x_ref), layout
        y_rev = torch.randn_like(g)
        got, want = adjoint.finish(y_rev, g, dt, D, layout), adjoint.finish_torch(y_rev, g, dt, D, layout)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), layout
    # Mamba1's raw step with its bias (softplus inside the kernels; float32 and bf16 raw steps,
    # values on both sides of softplus' threshold and far below zero)
    g, raw, bias, D = torch.randn(2, 6, 23), torch.randn(2, 6, 23) * 4, torch.randn(6), torch.randn(6)
    raw[0, 1, 3], raw[1, 4, 8], raw[0, 2, 0] = 30.0, -45.0, 19.9
    for r in (raw, raw.bfloat16()):
        x_rev, dt_rev = adjoint.prepare(g, r, "mamba1", bias)
        x_ref, dt_ref = adjoint.prepare_torch(g, r, "mamba1", bias)
        assert dt_rev.dtype == torch.float32 and ((dt_rev - dt_ref).abs() <= 1e-6 * dt_ref.abs()).all()
        assert ((x_rev - x_ref).abs() <= 1e-6 * x_ref.abs() + 1e-30).all()
        y_rev = torch.randn_like(g)
        got, want = adjoint.finish(y_rev, g, r, D, "mamba1", bias), adjoint.finish_torch(y_rev, g, r, D, "mamba1", bias)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()

    # the depthwise causal conv: value and input gradient against nn.Conv1d's, kernel sizes 2-4,
    # with and without bias, contiguous and transposed-view inputs (the mixers' layout), several
    # tiles and ragged last ones; bf16 to its rounding
    from captum_mambalrp.kernels import conv, dispatch
    conv.BLOCK_C, conv.BLOCK_T = 4, 8
    probe = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).requires_grad_(False)
    os.environ[dispatch.CONV_KERNEL_ENV] = "0"  # turned off: torch's convolution
    assert not dispatch.conv_applies(probe, torch.ones(1, 6, 5))
    del os.environ[dispatch.CONV_KERNEL_ENV]  # on by default
    assert dispatch.conv_applies(probe, torch.ones(1, 6, 5))
    assert not dispatch.conv_applies(probe.requires_grad_(True), torch.ones(1, 6, 5))  # trained weights
    for k in (2, 3, 4):
        for bias in (True, False):
            for transposed in (False, True):
                m = torch.nn.Conv1d(6, 6, k, groups=6, padding=k - 1, bias=bias).requires_grad_(False)
                x = torch.randn(2, 13, 12).transpose(1, 2)[:, :6] if transposed else torch.randn(2, 6, 13)
                x.requires_grad_(True)
                assert dispatch.conv_applies(m, x) and not unfused(lambda: dispatch.conv_applies(m, x))
                out, ref = conv.depthwise_causal_conv(m, x), m(x)
                assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-6 * ref.abs().max(), (k, bias)
                g = torch.randn_like(ref)
                (got,), (want,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
                assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (k, bias, transposed)
                assert got.stride(1) == 1 if transposed else got.is_contiguous()
    m = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).bfloat16().requires_grad_(False)
    x = torch.randn(1, 6, 11).bfloat16()
    want = m.float()(x.float())
    assert ((conv.depthwise_causal_conv(m.bfloat16(), x).float() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()
    # a bf16 mixer conv's output in float32, not rounded to bf16 (the default,
    # CAPTUM_MAMBALRP_CONV_OUTPUT=compute; the kernel and torch's path alike)
    xg = x.clone().requires_grad_(True)
    wide = conv.depthwise_causal_conv(m, xg, torch.float32)
    assert wide.dtype == torch.float32 and (wide - want).abs().max() <= 1e-6 * want.abs().max()
    g = torch.randn_like(wide)  # the input gradient: in x's dtype, the float32 correlation rounded once
    (got,) = torch.autograd.grad(wide, xg, g)
    (ref,) = torch.autograd.grad(m.float()(xg.float()), xg, g)
    m.bfloat16()
    assert got.dtype == torch.bfloat16 and ((got.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-6).all()
    os.environ.pop(dispatch.CONV_OUTPUT_ENV, None)  # the default: compute
    mixer_conv = dispatch.conv_forward(m, m.forward, in_mixer=True)
    for path in (lambda: mixer_conv(x), lambda: unfused(lambda: mixer_conv(x))):
        out = path()
        assert out.dtype == torch.float32 and (out - want).abs().max() <= 1e-6 * want.abs().max()
    assert dispatch.conv_forward(m, m.forward)(x).dtype == torch.bfloat16  # not a mixer's conv: its own dtype
    os.environ[dispatch.CONV_OUTPUT_ENV] = "model"
    assert mixer_conv(x).dtype == torch.bfloat16  # model: the input's dtype
    del os.environ[dispatch.CONV_OUTPUT_ENV]
    for other in (torch.nn.Conv1d(6, 6, 4, groups=6, padding=0), torch.nn.Conv1d(6, 6, 4, groups=3, padding=3),
                  torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)):  # not causal / not depthwise / weights trained
        assert not dispatch.conv_applies(other.requires_grad_(other.padding == (3,) and other.groups == 6), torch.ones(1, 6, 5))

    # a whole MambaLRP pass with every fused kernel (conv, gate, epsilon, reversed scan's steps
    # do not run on the torch backend) equals the one with none, and leaves the model as it was
    from transformers import MambaConfig, MambaForCausalLM
    from captum_mambalrp import MambaLRP
    torch.manual_seed(1)
    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2)).eval()
    ids = torch.randint(0, 50, (2, 9))
    calls = []
    kernel = conv.depthwise_causal_conv
    conv.depthwise_causal_conv = lambda m, x, *a: calls.append(m) or kernel(m, x, *a)
    fused = MambaLRP(model).attribute(ids, target=5)
    assert len(calls) == 2  # each layer's conv through the kernel
    plain = unfused(lambda: MambaLRP(model).attribute(ids, target=5))
    assert len(calls) == 2
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert all("forward" not in m.__dict__ for m in model.modules())
    # the same model in bf16: every fused kernel (the bf16-input gate and SiLU among them) against none
    model = model.bfloat16()
    fused = MambaLRP(model).attribute(ids, target=5)
    plain = unfused(lambda: MambaLRP(model).attribute(ids, target=5))
    assert fused.dtype == plain.dtype and (fused - plain).abs().max() <= 2e-2 * plain.abs().max()
    print("ok")
    """
)


def test_mixer_conv_output_in_float32_by_default(monkeypatch):
    """A mixer's depthwise conv, as installed (``kernels.dispatch.conv_forward``; torch's path on the
    CPU): by default (``CAPTUM_MAMBALRP_CONV_OUTPUT=compute``) a bf16 input gives the float32 sum of
    the bf16 values, not rounded back to bf16 (the models' fused conv-and-SiLU kernels keep it so),
    float32 and float64 inputs keep their dtype, and a whole bf16 pass reads the float32 conv
    output and conserves; with ``model`` the module's value in its dtype; another value is one
    clear error."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from captum_mambalrp import MambaLRP
    from captum_mambalrp.kernels import dispatch

    torch.manual_seed(0)
    m = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).requires_grad_(False).bfloat16()
    x = torch.randn(2, 6, 9).bfloat16()
    exact = torch.nn.functional.conv1d(x.double(), m.weight.double(), m.bias.double(), padding=3, groups=6)
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "model")
    assert torch.equal(dispatch.conv_forward(m, m.forward, in_mixer=True)(x), m(x))  # model: the module's own
    assert (m(x).double() - exact).abs().max() > 1e-4 * exact.abs().max()  # rounded to bf16
    monkeypatch.delenv(dispatch.CONV_OUTPUT_ENV)  # the default
    assert torch.equal(dispatch.conv_forward(m, m.forward)(x), m(x))  # not a mixer's conv: its own dtype
    xg = x.clone().requires_grad_(True)
    out = dispatch.conv_forward(m, m.forward, in_mixer=True)(xg)
    assert out.dtype == torch.float32 and (out.double() - exact).abs().max() <= 1e-6 * exact.abs().max()
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, xg, g)
    (ref,) = torch.autograd.grad(
        torch.nn.functional.conv1d(xg.double(), m.weight.double(), None, padding=3, groups=6), xg, g.double()
    )
    assert got.dtype == torch.bfloat16 and ((got.double() - ref.double()).abs() <= 2**-7 * ref.double().abs() + 1e-6).all()
    for dtype in (torch.float32, torch.float64):
        m, x = m.to(dtype), x.to(dtype)
        assert torch.equal(dispatch.conv_forward(m, m.forward, in_mixer=True)(x), m(x))

    model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8))
    model = model.eval().bfloat16()
    seen = []
    handles = [
        layer.mixer.conv1d.register_forward_hook(lambda mod, a, out: seen.append(out.dtype)) for layer in model.backbone.layers
    ]
    ids = torch.randint(0, 40, (1, 12))
    r, delta = MambaLRP(model).attribute(ids, target=3, return_convergence_delta=True)
    assert seen == [torch.float32, torch.float32]
    assert delta.abs().max() <= 1e-2 * r.float().abs().sum()  # conserved to bf16 rounding
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "model")
    seen.clear()
    rounded = MambaLRP(model).attribute(ids, target=3)
    assert seen == [torch.bfloat16, torch.bfloat16] and not torch.equal(rounded, r)
    for h in handles:
        h.remove()
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "fp32")
    with pytest.raises(ValueError, match=r"CAPTUM_MAMBALRP_CONV_OUTPUT='fp32': set it to 'compute' \(the default\) or 'model'"):
        MambaLRP(model).attribute(ids, target=3)
    assert all("forward" not in mod.__dict__ for mod in model.modules())  # the model as it was


def test_conv_output_compute_in_models(monkeypatch):
    """``CAPTUM_MAMBALRP_CONV_OUTPUT=compute`` (the default) reaches the mixers' convs only: a depthwise conv of the
    user's own after the backbone keeps its dtype (the layer after it reads bf16); a bf16 Mamba2
    pass and a sequence-chunked Falcon-Mamba pass conserve with it; ``recompute="auto"``'s estimate counts
    the wider conv output; recorded CUDA graphs are keyed by the package's settings."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaModel

    from captum_mambalrp import MambaLRP
    from captum_mambalrp.adapters.recompute import SequenceChunks, mixer_bytes_per_token
    from captum_mambalrp.kernels import dispatch

    class ConvHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = MambaModel(FalconMambaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8))
            self.conv = torch.nn.Conv1d(32, 32, 3, groups=32, padding=1)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
            h = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state
            return self.head(self.conv(h.to(self.conv.weight.dtype).transpose(1, 2)).transpose(1, 2))

    torch.manual_seed(0)
    ids = torch.randint(0, 40, (1, 16))
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "compute")
    own = ConvHead().eval().bfloat16()  # biases: relevance not conserved there, so the test is that it runs
    seen = []
    handle = own.conv.register_forward_hook(lambda mod, a, out: seen.append(out.dtype))
    r = MambaLRP(own).attribute(ids, target=3)
    handle.remove()
    assert seen == [torch.bfloat16] and torch.isfinite(r.float()).all()
    mamba2 = Mamba2ForCausalLM(Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8,
                                            num_heads=4, head_dim=16, n_groups=1, chunk_size=8))  # fmt: skip
    falcon = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8))
    for model, kwargs in ((mamba2, {}), (falcon, {"recompute": SequenceChunks(chunk=8)})):
        model = model.eval().bfloat16()
        r, delta = MambaLRP(model, **kwargs).attribute(ids, target=3, return_convergence_delta=True)
        assert delta.abs().max() <= 1e-2 * r.float().abs().sum()  # conserved to bf16 rounding
    mixer = model.backbone.layers[0].mixer
    wide = mixer_bytes_per_token(mixer, torch.bfloat16)["kept"]
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "model")
    assert wide - mixer_bytes_per_token(mixer, torch.bfloat16)["kept"] == 2 * mixer.conv1d.out_channels
    monkeypatch.delenv(dispatch.CONV_OUTPUT_ENV)
    assert mixer_bytes_per_token(mixer, torch.bfloat16)["kept"] == wide  # the default: compute
    explainer = MambaLRP(model)
    state = explainer._graph_state()
    monkeypatch.setenv(dispatch.CONV_OUTPUT_ENV, "model")
    assert explainer._graph_state() != state


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_kernels_in_interpreter():
    """The fused kernels (LRP-epsilon's backward factor, the default gate, the steps around the
    reversed scan, the depthwise causal conv) equal their torch definitions, and a whole pass with
    them equals one without, run by Triton's interpreter on the CPU (float32 to rounding; bf16 to
    its rounding)."""
    run_in_interpreter(FUSED_SCRIPT)


# ---------------------------------------------------------------- CUDA backends


def _cuda_backends():
    return [b for b in ("triton", "mamba_ssm") if CUDA and b in scan.available_backends("cuda")]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
@pytest.mark.parametrize("layout", ["mamba1", "ssd"])
def test_cuda_backend_matches_sequential(backend, layout):
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    if layout == "mamba1":
        check_against_sequential(selective_scan, sequential_mamba1, mamba1_case(d=70, n=16, l=300), backend, device="cuda")
    else:
        check_against_sequential(ssd_scan, sequential_ssd, ssd_case(l=300, heads=4, p=16, n=32, groups=2), backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_conv_kernel_equals_the_module(dtype, monkeypatch):
    """On CUDA the depthwise causal conv kernel gives nn.Conv1d's value and input gradient (the
    mixers' transposed-view input, lengths over several tiles; for bf16 also its float32 output),
    and a whole MambaLRP pass with it and the other fused kernels (for bf16: the bf16-input gate and
    SiLU) equals the pass with every fused kernel off, with the conv output in float32 (the default) and
    with ``CAPTUM_MAMBALRP_CONV_OUTPUT=model``."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from captum_mambalrp import MambaLRP
    from captum_mambalrp.kernels import conv

    monkeypatch.delenv("CAPTUM_MAMBALRP_CONV_KERNEL", raising=False)  # on by default
    torch.manual_seed(0)
    m = torch.nn.Conv1d(96, 96, 4, groups=96, padding=3).cuda().to(dtype).requires_grad_(False)
    x = torch.randn(2, 300, 192, device="cuda", dtype=dtype).transpose(1, 2)[:, :96].requires_grad_(True)
    out, ref = conv.depthwise_causal_conv(m, x), m(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out - ref).float().abs().max() <= tol * ref.float().abs().max()
    g = torch.randn_like(ref)
    (got,), (want,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    assert (got - want).float().abs().max() <= tol * want.float().abs().max()
    if dtype == torch.bfloat16:  # a mixer's conv in a bf16 model: float32 out, summed in float32, not rounded
        wide, exact = conv.depthwise_causal_conv(m, x, torch.float32), m.float()(x.float())
        assert wide.dtype == torch.float32 and (wide - exact).abs().max() <= 1e-6 * exact.abs().max()

    cfg = FalconMambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    model = FalconMambaForCausalLM(cfg).cuda().to(dtype).eval()
    ids = torch.randint(0, 64, (2, 200), device="cuda")
    monkeypatch.setenv("CAPTUM_MAMBALRP_CONV_OUTPUT", "model")  # the conv output in the model's dtype
    fused = MambaLRP(model).attribute(ids, target=3)
    monkeypatch.delenv("CAPTUM_MAMBALRP_CONV_OUTPUT")  # the default: float32 conv output (bf16), kernels vs torch too
    wide = MambaLRP(model).attribute(ids, target=3)
    monkeypatch.setenv("CAPTUM_MAMBALRP_FUSED", "0")
    monkeypatch.setenv("CAPTUM_MAMBALRP_CONV_KERNEL", "0")
    wide_plain = MambaLRP(model).attribute(ids, target=3)
    monkeypatch.setenv("CAPTUM_MAMBALRP_CONV_OUTPUT", "model")
    plain = MambaLRP(model).attribute(ids, target=3)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (fused - plain).abs().max() <= tol * plain.abs().max()
    assert (wide - wide_plain).abs().max() <= tol * wide_plain.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_backends_give_gradient_to_x_only_and_agree_with_torch():
    backends = _cuda_backends()
    if not backends:
        pytest.skip("no CUDA scan backend besides torch")
    case = [t.float().cuda() for t in mamba1_case(b=1, d=256, n=16, l=1000)]
    results = {}
    for backend in ["torch"] + backends:
        x = case[0].clone().requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in case[1:]]
        y = selective_scan(x, *params, backend=backend)
        y.backward(torch.ones_like(y))
        assert all(p.grad is None for p in params), backend
        results[backend] = (y.detach(), x.grad)
    y0, g0 = results["torch"]
    for backend in backends:
        y, g = results[backend]
        assert ((y - y0).norm() / y0.norm()).item() <= 1e-4, backend
        assert ((g - g0).norm() / g0.norm()).item() <= 1e-4, backend


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_cuda_raw_step_through_mamba_ssm(low, monkeypatch):
    """mamba-ssm's kernel taking the raw step with ``delta_bias`` and ``delta_softplus``, and the
    reversed scan's Triton steps computing the same softplus: value and input gradient equal the
    torch backend's on ``softplus(dt + bias)`` (float32: to 1e-4; bf16 kernel inputs: the torch
    backend's rounded form, to bf16 rounding of the output, the float32 adjoint to 1e-4)."""
    if "mamba_ssm" not in scan.available_backends("cuda"):
        pytest.skip("mamba_ssm not installed")
    x, _, A, B, C, D = (t.float().cuda() for t in mamba1_case(b=2, d=96, n=16, l=700))
    raw = (rand(2, 96, 700, seed=21).float() * 3).cuda()
    raw[0, 1, :5] = -40.0
    raw[1, 2, 5:9] = 25.0
    bias = rand(96, seed=22).float().cuda()
    if low is not None:
        monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "model")
        raw = raw.to(low)
    g = rand(2, 96, 700, seed=23).float().cuda()
    out = {}
    for backend in ("torch", "mamba_ssm"):
        xr = x.clone().requires_grad_(True)
        with scan.record_backends() as used:
            y = selective_scan(xr, raw, A, B, C, D, backend=backend, model_dtype=low or torch.float32, dt_bias=bias)
        assert dict(used) == {backend: 1}
        (dx,) = torch.autograd.grad(y, xr, g)
        out[backend] = (y, dx)
    (y0, d0), (y1, d1) = out["torch"], out["mamba_ssm"]
    assert ((y1 - y0).norm() / y0.norm()).item() <= (2**-7 if low else 1e-4)
    assert ((d1 - d0).norm() / d0.norm()).item() <= 1e-4


# ---------------------------------------------------------------- memory bound


MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, torch
    from captum_mambalrp.scan import selective_scan
    torch.set_num_threads(1)

    def peak_rss_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    b, d, n, l = 1, 256, 64, 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, l, generator=g).requires_grad_(True)
    delta = torch.rand(b, d, l, generator=g) * 0.1
    A = -torch.rand(d, n, generator=g)
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    D = torch.randn(d, generator=g)
    selective_scan(x[..., :64], delta[..., :64], A, B[..., :64], C[..., :64], D).sum().backward()  # warm-up
    x.grad = None
    gc.collect(); reset_peak(); base = peak_rss_mib()
    selective_scan(x, delta, A, B, C, D).sum().backward()
    scan_peak = peak_rss_mib() - base
    gc.collect(); reset_peak(); base = peak_rss_mib()
    full = torch.ones(b, d, l, n)  # what a B x D x L x N tensor costs
    full_peak = peak_rss_mib() - base
    print(json.dumps({"scan_mib": scan_peak, "full_mib": full_peak, "x_mib": x.numel() * 4 / 2**20}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_long_sequence_memory_stays_linear():
    """L = 4096: the scan's peak extra memory (forward and backward) stays far below one
    ``b x d x l x n`` tensor (measured as the peak RSS of a fresh process, reset before each probe)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert out.returncode == 0, out.stderr
    import json

    m = json.loads(out.stdout.strip().splitlines()[-1])
    full = 4096 * 256 * 64 * 4 / 2**20  # 256 MiB
    assert m["full_mib"] >= 0.9 * full  # the probe sees such a tensor
    assert m["scan_mib"] <= 0.25 * full, m  # forward + backward at O(x): a few x-sized tensors (4 MiB each)


def test_fused_gate_table_names_rule_classes():
    """The dispatch tables key rule types by qualified name (kernels/ never imports rules/): each
    key names an existing rule class, and the default composite's gate pair and conv activation
    rule are in the tables."""
    import importlib

    from captum_mambalrp.kernels.dispatch import GATE_KERNELS, rule_key
    from captum_mambalrp.rules import composite
    from captum_mambalrp.rules.base import MambaRule

    for key in GATE_KERNELS:
        for name in key:
            module, _, cls = name.rpartition(".")
            assert issubclass(getattr(importlib.import_module(module), cls), MambaRule), name
    rules = composite("mambalrp")
    gate, act = rules.rule_for("x.gate", "gate", None), rules.rule_for("x.gate_act", "activation", None)
    assert (rule_key(gate), rule_key(act)) in GATE_KERNELS
    from captum_mambalrp.kernels.dispatch import ACTIVATION_KERNELS

    for name in ACTIVATION_KERNELS:  # the same for the activation table, and the conv's SiLU rule
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), MambaRule), name
    assert rule_key(rules.rule_for("x.conv_act", "activation", None)) in ACTIVATION_KERNELS


def test_auto_prefers_mamba_ssm_ssd_for_low_precision_models(monkeypatch):
    """``"auto"`` on CUDA: SSD of a float32 model takes the torch chunked form, of a bf16/fp16
    model mamba-ssm's kernels (when installed); ``ssd_scan`` picks the order from ``model_dtype``."""
    monkeypatch.setattr(scan, "available_backends", lambda device=None: ["torch", "triton", "mamba_ssm"])
    assert scan.resolve_backend("auto", "cuda", "ssd") == "torch"
    assert scan.resolve_backend("auto", "cuda", "ssd_low") == "mamba_ssm"
    assert scan.resolve_backend("auto", "cpu", "ssd_low") == "torch"
    seen = []
    monkeypatch.setattr(scan, "_pick", lambda backend, x, linear, layout, **kw: seen.append(layout) or "torch")
    x, dt, A, B, C, _ = (t.float() for t in ssd_case())
    for dtype in (torch.float32, torch.bfloat16, None):
        ssd_scan(x, dt, A, B, C, linear=True, model_dtype=dtype)
    assert seen == ["ssd", "ssd_low", "ssd"]


def test_mamba_ssm_is_left_where_its_32_bit_offsets_would_overflow(monkeypatch):
    """mamba-ssm's kernels address in 32 bits (state-spaces/mamba#1015, #884): a scan whose inputs
    or kernel buffers reach 2^31 elements runs on the next backend of ``auto``'s order (Mamba1: our
    Triton kernel; SSD of a bf16 model: the torch form), and an explicit ``"mamba_ssm"`` says so.
    Shapes of the 7B-class goals, on the meta device (no memory)."""
    from captum_mambalrp.scan import mamba_ssm_backend

    monkeypatch.setattr(scan, "available_backends", lambda device=None: ["torch", "triton", "mamba_ssm"])
    monkeypatch.setattr(
        scan, "resolve_backend", lambda backend, device, layout: "mamba_ssm" if backend in ("auto", "mamba_ssm") else backend
    )

    def meta(*shape):
        return torch.empty(shape, device="meta")

    def ssd(b, length, h, p, g, n, dt=None):
        return meta(b, length, h, p), meta(b, length, h) if dt is None else dt, meta(b, length, g, n), meta(b, length, g, n)

    def mamba1(b, d, length, n):
        return meta(b, d, length), meta(b, d, length), meta(b, n, length), meta(b, n, length)

    # Nemotron-H-8B's mixer at 131072 tokens: dt contiguous fits, dt as a view of in_proj's output
    # (18816 columns, as transformers hands it to the kernel) does not
    contiguous = ssd(1, 131072, 128, 64, 8, 128)
    in_proj = meta(1, 131072, 18816)
    viewed = ssd(1, 131072, 128, 64, 8, 128, dt=in_proj[..., -128:])
    assert mamba_ssm_backend.offsets_fit("ssd", *contiguous) and not mamba_ssm_backend.offsets_fit("ssd", *viewed)
    # Mamba2-2.7B: 131072 tokens fit; 2^19 tokens in a batch of 2 overflow its chunk states
    assert mamba_ssm_backend.offsets_fit("ssd", *ssd(1, 131072, 80, 64, 1, 128))
    assert not mamba_ssm_backend.offsets_fit("ssd", *ssd(2, 2**19, 80, 64, 1, 128))
    # Falcon-Mamba-7B: x of 8192 channels fits to 2^18 tokens (2^31 elements, the last at offset
    # 2^31 - 1), not 2^19
    assert mamba_ssm_backend.offsets_fit("mamba1", *mamba1(1, 8192, 2**18, 16))
    assert not mamba_ssm_backend.offsets_fit("mamba1", *mamba1(1, 8192, 2**19, 16))
    # the dispatch: auto moves on silently, an explicit choice with a warning
    big1, big2 = mamba1(1, 8192, 2**19, 16), ssd(2, 2**19, 80, 64, 1, 128)
    assert scan._pick("auto", big1[0], True, "mamba1", operands=big1) == "triton"
    assert scan._pick("auto", big2[0], True, "ssd_low", operands=big2) == "torch"
    assert scan._pick("auto", contiguous[0], True, "ssd_low", operands=contiguous) == "mamba_ssm"
    with pytest.warns(ResourceWarning, match=r"past mamba-ssm's 32-bit offsets .* on 'triton' instead"):
        assert scan._pick("mamba_ssm", big1[0], True, "mamba1", operands=big1) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("arch", ["falcon_mamba", "mamba2"])
def test_cuda_scan_inputs_in_the_model_dtype(arch, monkeypatch):
    """A bf16 model on CUDA with CAPTUM_MAMBALRP_SCAN_INPUTS=model: mamba-ssm's kernels reading
    bf16 give the torch backend's rounded form (to bf16 rounding of the kernels' outputs), and the
    relevance stays near the "compute" pass's."""
    if "mamba_ssm" not in scan.available_backends("cuda"):
        pytest.skip("mamba_ssm not installed")
    import transformers

    from captum_mambalrp import MambaLRP

    torch.manual_seed(0)
    if arch == "falcon_mamba":
        cfg = transformers.FalconMambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
        model = transformers.FalconMambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(
            vocab_size=64, hidden_size=64, num_hidden_layers=2, expand=2, state_size=16, head_dim=16, num_heads=8, n_groups=1
        )
        model = transformers.Mamba2ForCausalLM(cfg)
    model = model.cuda().bfloat16().eval()
    ids = torch.randint(0, 64, (2, 300), device="cuda")
    monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "model")
    with scan.record_backends() as used:
        fast = MambaLRP(model, backend="mamba_ssm").attribute(ids, target=3)
    assert used["mamba_ssm"] == 2
    torch_form = MambaLRP(model, backend="torch").attribute(ids, target=3)
    monkeypatch.setenv(scan.SCAN_INPUTS_ENV, "compute")
    compute = MambaLRP(model, backend="mamba_ssm").attribute(ids, target=3)
    scale = compute.float().abs().max()
    assert (fast - torch_form).float().abs().max() <= 3e-2 * scale
    assert (fast - compute).float().abs().max() <= 1e-1 * scale
