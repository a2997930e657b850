"""The scans against a plain sequential recurrence (float64, one step at a time)."""

from __future__ import annotations

import pytest
import torch

from captum_mambalrp.scan import selective_scan, ssd_scan


def sequential_mamba1(x, delta, A, B, C, D):
    b, d, l = x.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * x[:, :, t])
    return torch.stack(ys, -1)


def sequential_ssd(x, dt, A, B, C, D):
    b, l, heads, p = x.shape
    rep = heads // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    h = torch.zeros(b, heads, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(l):
        h = (
            torch.exp(dt[:, t, :, None, None] * A[None, :, None, None]) * h
            + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        )
        ys.append((h * Ch[:, t, :, None, :]).sum(-1) + D[None, :, None] * x[:, t])
    return torch.stack(ys, 1)


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# float32 inputs: float32 scan (to float32 rounding); float64 inputs stay float64 (to float64 rounding)
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-11)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l", [1, 7, 64, 65, 200])
def test_mamba1_scan_and_input_gradient(l, dtype):
    b, d, n = 2, 5, 3
    x, B, C, D = rand(b, d, l, seed=1), rand(b, n, l, seed=2), rand(b, n, l, seed=3), rand(d, seed=4)
    delta = rand(b, d, l, seed=5).abs() * 0.3
    A = -rand(d, n, seed=6).abs() * 2
    ref = sequential_mamba1(x, delta, A, B, C, D)
    xr = x.to(dtype).requires_grad_(True)
    y = selective_scan(xr, *(t.to(dtype) for t in (delta, A, B, C, D)), linear=True)
    assert y.dtype == dtype
    atol, rtol = TOL[dtype]
    assert torch.allclose(y.double(), ref, atol=atol, rtol=rtol)
    g = rand(b, d, l, seed=7)
    (got,) = torch.autograd.grad(y, xr, g.to(dtype))
    assert got.dtype == dtype
    xs = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sequential_mamba1(xs, delta, A, B, C, D), xs, g)
    assert torch.allclose(got.double(), expected, atol=10 * atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups,l", [(1, 9), (2, 70), (4, 130)])
def test_ssd_scan_and_input_gradient(groups, l, dtype):
    b, heads, p, n = 2, 4, 3, 5
    x = rand(b, l, heads, p, seed=1)
    dt = rand(b, l, heads, seed=2).abs() * 0.3
    A = -rand(heads, seed=3).abs()
    B, C, D = rand(b, l, groups, n, seed=4), rand(b, l, groups, n, seed=5), rand(heads, seed=6)
    ref = sequential_ssd(x, dt, A, B, C, D)
    xr = x.to(dtype).requires_grad_(True)
    y = ssd_scan(xr, *(t.to(dtype) for t in (dt, A, B, C, D)), linear=True)
    assert y.dtype == dtype
    atol, rtol = TOL[dtype]
    assert torch.allclose(y.double(), ref, atol=atol, rtol=rtol)
    g = rand(b, l, heads, p, seed=7)
    (got,) = torch.autograd.grad(y, xr, g.to(dtype))
    assert got.dtype == dtype
    xs = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sequential_ssd(xs, dt, A, B, C, D), xs, g)
    assert torch.allclose(got.double(), expected, atol=10 * atol, rtol=rtol)


def test_differentiable_scan_gives_parameter_gradients():
    b, d, n, l = 1, 3, 2, 10
    delta = (rand(b, d, l, seed=1).abs() * 0.3).requires_grad_(True)
    B = rand(b, n, l, seed=2).requires_grad_(True)
    y = selective_scan(rand(b, d, l, seed=3), delta, -rand(d, n, seed=4).abs(), B, rand(b, n, l, seed=5), None, linear=False)
    gd, gB = torch.autograd.grad(y.sum(), (delta, B))
    assert gd.abs().sum() > 0 and gB.abs().sum() > 0
    y_lin = selective_scan(rand(b, d, l, seed=3), delta, -rand(d, n, seed=4).abs(), B, rand(b, n, l, seed=5), None)
    assert not y_lin.requires_grad  # constants: no graph to the parameters


@pytest.mark.parametrize("length,chunk", [(1, 4), (37, 4), (300, 3), (2000, 4), (2000, 64)])
def test_ssd_chunked_matrix_form_matches_the_recurrence(length, chunk):
    """The torch backend's SSD kernel (chunks in matrix form; chunk ends through
    ``decay_scan``, recursively when there are more chunks than one block holds), against the
    float64 recurrence: chunk and block boundaries, padding, groups, D per head and per channel."""
    from captum_mambalrp.scan.ssd_chunked import ssd_chunked

    b, heads, p, n, groups = 2, 4, 3, 5, 2
    x = rand(b, length, heads, p, seed=1)
    dt = rand(b, length, heads, seed=2).abs() * 0.3
    A = -rand(heads, seed=3).abs()
    B, C = rand(b, length, groups, n, seed=4), rand(b, length, groups, n, seed=5)
    for D in (rand(heads, seed=6), rand(heads, p, seed=7)):
        ref = sequential_ssd(x, dt, A, B, C, D if D.dim() == 1 else torch.zeros(heads))
        if D.dim() == 2:
            ref = ref + D * x
        y = ssd_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), D.float(), chunk=chunk)
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("length", [1, 2, 3, 17, 700])
def test_decay_scan_is_the_first_order_recurrence(length):
    from captum_mambalrp.scan.ssd_chunked import decay_scan_

    u, a = rand(2, length, 3, 4, seed=1).float(), -rand(2, length, 3, 1, seed=2).abs().float()
    s, expected = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for t in range(length):
        s = torch.exp(a[:, t].double()) * s + u[:, t].double()
        expected.append(s)
    got = decay_scan_(u.clone(), torch.exp(a))  # blocks of sqrt(length), and a remainder
    assert (got.double() - torch.stack(expected, 1)).abs().max() <= 1e-5 * u.abs().max()


@pytest.mark.parametrize("length,chunk,d_per_channel", [(9, 4, False), (70, 16, True), (130, 64, False)])
def test_differentiable_ssd_gradients_in_every_input_equal_the_recurrence(length, chunk, d_per_channel):
    """``ssd_scan(..., linear=False)``: the chunked form out of place under autograd. Its output
    and its gradients in x, dt, A, B, C and D equal those of the float64 step-by-step recurrence
    (chunk boundaries, groups, D per head or per channel), and nothing is computed in place."""
    from captum_mambalrp.scan.ssd_chunked import ssd_chunked

    b, heads, p, n, groups = 2, 4, 3, 5, 2
    inputs = [
        rand(b, length, heads, p, seed=1),
        rand(b, length, heads, seed=2).abs() * 0.3,
        -rand(heads, seed=3).abs(),
        rand(b, length, groups, n, seed=4),
        rand(b, length, groups, n, seed=5),
        rand(heads, p, seed=6) if d_per_channel else rand(heads, seed=6),
    ]

    def recurrence(x, dt, A, B, C, D):
        y = sequential_ssd(x, dt, A, B, C, torch.zeros(heads, dtype=x.dtype) if d_per_channel else D)
        return y + D * x if d_per_channel else y

    g = rand(b, length, heads, p, seed=7)
    ref_in = [t.clone().requires_grad_(True) for t in inputs]
    ref = recurrence(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    got_in = [t.clone().requires_grad_(True) for t in inputs]
    got = ssd_chunked(*got_in, chunk=chunk, differentiable=True)
    assert got.dtype == torch.float64 and (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    for name, a, e in zip("x dt A B C D".split(), torch.autograd.grad(got, got_in, g), ref_grads):
        assert (a - e).abs().max() <= 1e-9 * e.abs().max(), name
    # the scan's entry point takes this path for linear=False (float32 inputs: float32 rounding)
    via_scan = ssd_scan(*(t.float() for t in inputs), linear=False)
    assert (via_scan.double() - ref.detach()).abs().max() <= 1e-5 * ref.abs().max()
