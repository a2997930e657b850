"""recompute="sequence": mixers run in pieces of the sequence with their state carried, blocks
recomputed from sparse checkpoints. Same relevance as keeping everything (it is the same
modified gradient), the model restored, and memory that scales with the piece, not the length."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, zero_biases
from kernel_helpers import run_in_interpreter
from test_api import assert_unchanged, snapshot
from test_mamba2 import ids_for, make_mamba2
from test_recompute_auto import spy_plans

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.adapters import recompute as rc
from captum_mambalrp.adapters.recompute import SequenceChunks
from captum_mambalrp.kernels import triton_installed

# chunk 1 and 7 do not divide the length 30; 64 is longer than it (one piece); stride / slots
# cover keeping every block input, one of three, and one recomputed stretch per block
SETTINGS = [
    SequenceChunks(chunk=7),
    SequenceChunks(chunk=1, stride=2, slots=1),
    SequenceChunks(chunk=16, stride=3, slots=2),
    SequenceChunks(chunk=64, stride=5, slots=1),
    SequenceChunks(chunk=9, stride=2, slots=1, host=True),  # kept block inputs copied to host memory
    "sequence",
]


def _left_padded(length=30):
    ids = ids_for(3, length, seed=2)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :9] = 0
    mask[2, : length - 4] = 0
    return ids, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_same_relevance_float32(arch):
    model = make_lm(arch, seed=13, num_hidden_layers=5)
    ids, mask = _left_padded()
    before = snapshot(model)
    kept, delta = MambaLRP(model, recompute=False).attribute(ids, target=4, attention_mask=mask, return_convergence_delta=True)
    for setting in SETTINGS:
        again, d2 = MambaLRP(model, recompute=setting).attribute(
            ids, target=4, attention_mask=mask, return_convergence_delta=True
        )
        assert _rel(again, kept) < 1e-5, setting
        assert (again[mask == 0] == 0).all()
        torch.testing.assert_close(d2, delta, atol=1e-6, rtol=1e-4)
        assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ["mamba", "falcon", "mamba2"])
def test_same_relevance_float64_and_conserved(arch):
    if arch == "mamba2":
        backbone = make_mamba2(num_hidden_layers=3, residual_in_fp32=False).backbone
    else:
        backbone = zero_biases(make_lm(arch, seed=3, num_hidden_layers=4, residual_in_fp32=False)).backbone
    model = LastTokenClassifier(backbone).double()  # float64 logits (transformers' LM heads return float32)
    ids, mask = _left_padded(23)
    kept, delta = MambaLRP(model, recompute=False).attribute(ids, target=1, attention_mask=mask, return_convergence_delta=True)
    assert kept.dtype == torch.float64
    for setting in (SequenceChunks(chunk=5, stride=2, slots=1), SequenceChunks(chunk=9)):
        again, d2 = MambaLRP(model, recompute=setting).attribute(
            ids, target=1, attention_mask=mask, return_convergence_delta=True
        )
        assert _rel(again, kept) < 1e-10
        scale = max(again.sum(1).abs().max().item(), 1.0)
        assert d2.abs().max() < 1e-10 * scale and delta.abs().max() < 1e-10 * scale


def test_every_recompute_mode_agrees_mamba1_and_mamba2():
    """Keep, recompute, offload and sequence agree, for Mamba1 and Mamba2 (groups, left padding)."""
    ids = ids_for(2, 21)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :6] = 0
    for model in (make_lm("mamba", seed=5, num_hidden_layers=3), make_mamba2(num_hidden_layers=3)):
        modes = (False, True, "offload", SequenceChunks(chunk=4, stride=2), SequenceChunks(chunk=1))
        results = [MambaLRP(model, recompute=m).attribute(ids, target=2, attention_mask=mask) for m in modes]
        for mode, r in zip(modes[1:], results[1:]):
            assert _rel(r, results[0]) < 1e-5, mode


@pytest.mark.parametrize("where", ["mixer.out_proj", "norm", "block"])
def test_relevance_read_inside_a_layer(where):
    """Read inside a mixer: the mixers are recomputed whole (they keep a graph); inside a block
    (its norm): no block recomputation; at a block's output: the chain restarts after it."""
    model = make_lm("falcon", seed=3, num_hidden_layers=3)
    ids = ids_for(1, 20)
    block = model.backbone.layers[1]
    layer = {"mixer.out_proj": block.mixer.out_proj, "norm": block.norm, "block": block}[where]
    kept = LayerMambaLRP(model, layer, recompute=False).attribute(ids, target=2)
    seq = LayerMambaLRP(model, layer, recompute=SequenceChunks(chunk=3, stride=2)).attribute(ids, target=2)
    assert kept.abs().sum() > 0
    torch.testing.assert_close(kept, seq, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("when", ["forward", "backward"])
def test_model_restored_when_an_exception_is_raised(when):
    """An error inside a piece (forward: the first run; backward: a recomputation) leaves the
    model as it was, the blocks' forwards included."""
    model = make_lm("falcon", seed=4, num_hidden_layers=3)
    ids = ids_for(1, 12)

    def explode(module, args, out):
        if when == "forward" or torch.is_grad_enabled():
            raise RuntimeError("boom in a piece")

    handle = model.backbone.layers[1].mixer.out_proj.register_forward_hook(explode)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom in a piece"):
        MambaLRP(model, recompute=SequenceChunks(chunk=5, stride=2)).attribute(ids, target=0)
    assert_unchanged(model, before)
    handle.remove()
    ok = MambaLRP(model, recompute=SequenceChunks(chunk=5, stride=2)).attribute(ids, target=0)
    torch.testing.assert_close(ok, MambaLRP(model, recompute=False).attribute(ids, target=0), atol=1e-6, rtol=1e-5)


def test_auto_chooses_sequence_below_the_recompute_estimate(monkeypatch):
    """With a (mocked) budget below what recomputation needs (the inputs of every mixer plus one
    working set), "auto" runs the pass in pieces sized from the budget, without warning (its own
    estimate fits); far below, it still chooses "sequence" and warns."""
    model = make_lm("mamba", num_hidden_layers=4)
    ids = ids_for(1, 128)  # one sequence: a batch over the budget would run in parts
    plans = spy_plans(monkeypatch)
    monkeypatch.setattr(rc, "MIN_SEQUENCE_CHUNK", 4)  # pieces of a few tokens at this toy size
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1)
    needed = _needed(model, ids)
    for budget, expected in ((needed["keep"] * 1.01, False), (needed["recompute"] * 0.999, rc.SEQUENCE)):
        plans.clear()
        monkeypatch.setattr(rc, "available_memory", lambda device, b=budget: b / rc.AUTO_MEMORY_FRACTION)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            relevance = MambaLRP(model).attribute(ids, target=1)
        plan = plans[0]
        assert plan.mode == expected, plan.needed
        assert _rel(relevance, kept) < 1e-5
    assert plan.chain_blocks == 4 and plan.sequence is not None
    assert plan.sequence.chunk < 64  # the budget cut the sequence into pieces
    assert plan.needed["sequence"] < plan.needed["recompute"]
    monkeypatch.setattr(rc, "available_memory", lambda device: 1.0)
    with pytest.warns(ResourceWarning, match="expect to run out of memory"):
        MambaLRP(model).attribute(ids, target=1)
    assert plans[-1].mode == rc.SEQUENCE


def _needed(model, ids):
    """The plan's estimates for ``ids`` (keep, recompute, sequence), by the documented formulas."""
    mixers = [layer.mixer for layer in model.backbone.layers]
    plan = rc.RecomputePlan(mixers, budget=1e15, chain_blocks=len(mixers))
    plan.choose(torch.zeros(ids.shape + (model.config.hidden_size,)))
    return plan.needed


def _saved_bytes(model, ids, setting):
    """Bytes saved for backward during the forward pass outside the mixers, and the largest total
    saved by one run of a mixer (whole, or one piece of it: from its in_proj to its out_proj),
    forward or backward pass."""
    forward_bytes, buckets, inside = [0], [0], [False]
    mixers = [layer.mixer for layer in model.backbone.layers]

    def enter(module, args):
        buckets.append(0)
        inside[0] = True

    def leave(module, args, out):
        inside[0] = False

    handles = [m.in_proj.register_forward_pre_hook(enter) for m in mixers]
    handles += [m.out_proj.register_forward_hook(leave) for m in mixers]

    def pack(t):
        size = t.numel() * t.element_size()
        if inside[0]:
            buckets[-1] += size
        elif torch._C._current_graph_task_id() == -1:
            forward_bytes[0] += size
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            MambaLRP(model, recompute=setting).attribute(ids, target=1)
    finally:
        for h in handles:
            h.remove()
    return forward_bytes[0], max(buckets)


def test_saved_memory_scales_with_the_piece_not_the_length():
    """Counted with saved-tensor hooks: under "sequence" one mixer piece saves the same at 64
    and 256 tokens (pieces of 16), where a mixer kept whole saves 4x as much at 256; and outside
    the mixers the forward pass keeps no more for 6 blocks than for 2 (blocks recomputed)."""
    small, large = ids_for(1, 64), ids_for(1, 256)
    model = make_lm("falcon", num_hidden_layers=2)
    seq = SequenceChunks(chunk=16, stride=2, slots=1)
    _, piece_small = _saved_bytes(model, small, seq)
    _, piece_large = _saved_bytes(model, large, seq)
    _, whole_small = _saved_bytes(model, small, False)
    _, whole_large = _saved_bytes(model, large, False)
    assert 0 < piece_large == piece_small
    assert whole_large > 3.5 * whole_small and whole_large > 10 * piece_large
    deep = make_lm("falcon", num_hidden_layers=6)
    fwd_shallow, _ = _saved_bytes(model, large, seq)
    fwd_deep, _ = _saved_bytes(deep, large, seq)
    fwd_deep_recompute, _ = _saved_bytes(deep, large, True)
    assert fwd_deep == fwd_shallow
    assert fwd_deep_recompute > fwd_deep + 4 * 256 * 16 * 4  # at least one more float32 [L, d] per block
    print(
        f"saved bytes: piece {piece_large} (L 64 and 256); whole mixer {whole_small} (L 64) {whole_large} (L 256); "
        f"forward outside mixers, 6 blocks, L 256: sequence {fwd_deep}, recompute=True {fwd_deep_recompute}"
    )


def test_settings_are_checked():
    with pytest.raises(ValueError, match="positive int"):
        SequenceChunks(chunk=0)
    assert rc.check_recompute(SequenceChunks(stride=2)) == SequenceChunks(stride=2)
    assert rc.check_recompute("sequence") == "sequence"


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched
    from captum_mambalrp.scan import selective_scan, selective_scan_state, ssd_scan, ssd_scan_state, triton_scan
    triton_scan.BLOCK_T = 4
    torch.manual_seed(0)
    b, d, n, L = 2, 5, 3, 11
    x, dt = torch.randn(b, d, L), torch.rand(b, d, L)
    A, B, C, D = -torch.rand(d, n), torch.randn(b, n, L), torch.randn(b, n, L), torch.randn(d)
    g = torch.randn(b, d, L)
    out = {}
    for backend in ("torch", "triton"):
        xr = x.clone().requires_grad_(True)
        ys, h = [], None
        for s, e in [(0, 5), (5, 6), (6, 11)]:
            piece = (xr[..., s:e], dt[..., s:e], A, B[..., s:e], C[..., s:e], D)
            y, h = selective_scan_state(*piece, h, backend=backend)
            ys.append(y)
        loss = (torch.cat(ys, -1) * g).sum() + (0.3 * h).sum()
        out[backend] = (torch.cat(ys, -1).detach(), h.detach(), torch.autograd.grad(loss, xr)[0])
    whole = selective_scan(x, dt, A, B, C, D, backend="torch")
    assert torch.allclose(out["torch"][0], whole, atol=1e-5)
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    # SSD layout: 4 heads of 3 channels in 2 groups, state 5
    x, dt, A = torch.randn(2, L, 4, 3), torch.rand(2, L, 4), -torch.rand(4)
    B, C, D = torch.randn(2, L, 2, 5), torch.randn(2, L, 2, 5), torch.randn(4)
    g = torch.randn(2, L, 4, 3)
    for backend in ("torch", "triton"):
        xr = x.clone().requires_grad_(True)
        ys, h = [], None
        for s, e in [(0, 5), (5, 6), (6, 11)]:
            y, h = ssd_scan_state(xr[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, h, backend=backend)
            ys.append(y)
        loss = (torch.cat(ys, 1) * g).sum() + (0.3 * h).sum()
        out[backend] = (torch.cat(ys, 1).detach(), h.detach(), torch.autograd.grad(loss, xr)[0])
    assert torch.allclose(out["torch"][0], ssd_scan(x, dt, A, B, C, D, backend="torch"), atol=1e-5)
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    print("ok")
    """
)


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_triton_scan_carries_the_state_in_the_interpreter():
    """Our Triton kernel from a carried state (forward) and from the last state's gradient
    (adjoint, giving the start state's gradient), pieces of 5, 1 and 5 steps against the torch
    backend, Mamba1 and SSD (groups) layouts, in Triton's interpreter on the CPU."""
    run_in_interpreter(INTERPRETER_SCRIPT)


def test_mamba_ssm_backend_falls_back_for_pieces(monkeypatch):
    """mamba-ssm's Mamba1 kernel takes no start state: a piece asks for it and runs elsewhere
    (triton when installed, else torch), as the recorded backends say."""
    from captum_mambalrp import scan

    monkeypatch.setattr(scan, "resolve_backend", lambda backend, device=None, layout="mamba1": "mamba_ssm")
    x = torch.randn(1, 3, 4)
    with scan.record_backends() as used:
        name = scan._pick("mamba_ssm", x, True, "mamba1", stateful=True)
    assert name in ("triton", "torch") and used[name] == 1 and used["mamba_ssm"] == 0


def test_backward_on_another_thread_still_runs_in_pieces(monkeypatch):
    """On CUDA the autograd engine runs the backward pass on its device thread, where the pass's
    plan (a context variable) is not set: the recomputed blocks must still run their mixers in
    pieces (not whole, through torch's checkpoint). Simulated here by running each block's
    backward on a fresh thread."""
    import threading

    original = rc._ChainLink.backward

    def on_a_thread(ctx, grad):
        out = {}

        def work():
            try:
                out["value"] = original(ctx, grad)
            except BaseException as e:  # pragma: no cover - re-raised below
                out["error"] = e

        t = threading.Thread(target=work)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    whole = []
    real_checkpoint = rc.checkpoint
    monkeypatch.setattr(rc._ChainLink, "backward", staticmethod(on_a_thread))
    monkeypatch.setattr(rc, "checkpoint", lambda *a, **k: whole.append(1) or real_checkpoint(*a, **k))
    model = make_lm("falcon", seed=2, num_hidden_layers=3)
    ids = ids_for(1, 64)
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1)
    # "auto" with a budget below recomputation's need: the mode and the pieces' size live in the plan
    monkeypatch.setattr(rc, "MIN_SEQUENCE_CHUNK", 4)
    budget = 0.999 * _needed(model, ids)["recompute"]
    monkeypatch.setattr(rc, "available_memory", lambda device: budget / rc.AUTO_MEMORY_FRACTION)
    pieces = []
    real_in_pieces = rc.in_pieces
    monkeypatch.setattr(rc, "in_pieces", lambda *a: pieces.append(torch.is_grad_enabled()) or real_in_pieces(*a))
    seq = MambaLRP(model).attribute(ids, target=1)
    assert _rel(seq, kept) < 1e-5
    assert not whole  # no mixer was recomputed whole
    assert pieces.count(True) == 3  # each block's mixer, run with a graph in the block's backward pass
