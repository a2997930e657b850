"""``MambaLRP(model, cuda_graph=True)``: replayed CUDA graphs give the eager relevance.

The GPU tests (``-m gpu``) compare every replay with an eager pass of the same inputs
and targets (other ids, other targets, padding, inputs_embeds, weights changed in place
or moved), count recordings and replays, and check that the model comes back unchanged
and that a forward that synchronises with the CPU gets a clear error. The CPU tests cover
what runs before any graph: signatures, refused arguments, CPU inputs staying eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm, relative_delta, zero_biases
from test_api import assert_unchanged, snapshot
from torch import nn

from captum_mambalrp import MambaLRP, scan
from captum_mambalrp.attribution.cuda_graphs import signature
from captum_mambalrp.attribution.inputs import ForwardCall

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _ids(batch: int, length: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) <= tol


# ------------------------------------------------------------------ CPU


def test_signature_keys_shapes_and_plain_values_not_contents():
    a = ForwardCall((torch.zeros(2, 5, dtype=torch.long),), {"use_cache": False}, None, True)
    b = ForwardCall((torch.ones(2, 5, dtype=torch.long),), {"use_cache": False}, None, True)
    c = ForwardCall((torch.ones(2, 6, dtype=torch.long),), {"use_cache": False}, None, True)
    d = ForwardCall((torch.ones(2, 5, dtype=torch.long),), {"use_cache": True}, None, True)
    assert signature(a) == signature(b)
    assert signature(a) != signature(c)
    assert signature(a) != signature(d)


def test_signature_refuses_arguments_a_graph_cannot_take():
    call = ForwardCall((torch.zeros(1, 3, dtype=torch.long), [torch.zeros(1)]), {}, None, True)
    with pytest.raises(TypeError, match="cuda_graph=True.*list"):
        signature(call)


def test_cpu_inputs_stay_eager():
    model = make_lm("mamba", seed=1)
    ids = _ids(2, 9, 0)
    lrp = MambaLRP(model, cuda_graph=True)
    assert torch.equal(lrp.attribute(ids, target=3), MambaLRP(model).attribute(ids, target=3))
    assert len(lrp.cuda_graphs) == 0 and lrp.cuda_graphs.captures == 0


def test_cuda_graph_flag_must_be_bool():
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        MambaLRP(make_lm("mamba"), cuda_graph="yes")


# ------------------------------------------------------------------ GPU


def _backends():
    return [b for b in scan.available_backends("cuda") if b != "torch"]


@pytest.mark.parametrize("backend", ["triton", "mamba_ssm"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_replays_equal_eager_passes(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} backend not available")
    model = zero_biases(make_lm("mamba", hidden_size=32, state_size=16)).cuda()
    graphed, eager = MambaLRP(model, backend=backend, cuda_graph=True), MambaLRP(model, backend=backend)
    mask = torch.ones(3, 40, dtype=torch.long, device="cuda")
    mask[1, :7] = 0
    mask[2, 25:] = 0  # right padding
    before = snapshot(model)
    for seed, target in enumerate([5, None, (-2, 7), [1, 2, (0, None)], 5]):
        ids = _ids(3, 40, seed, "cuda")
        rel, delta = graphed.attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
        ref, ref_delta = eager.attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
        assert _close(rel, ref), (seed, target)
        assert _close(delta, ref_delta, 1e-3) or float((delta - ref_delta).abs().max()) < 1e-5
        explained = rel.sum(dim=1) + delta
        assert (relative_delta(delta, explained) <= 1e-4).all()
    assert graphed.cuda_graphs.captures == 1 and graphed.cuda_graphs.replays == 4
    assert_unchanged(model, before)
    # another shape: a second graph; the first one is still replayed afterwards
    graphed.attribute(_ids(1, 64, 9, "cuda"), target=2)
    ids = _ids(3, 40, 11, "cuda")
    assert _close(graphed.attribute(ids, target=4, attention_mask=mask), eager.attribute(ids, target=4, attention_mask=mask))
    assert graphed.cuda_graphs.captures == 2 and graphed.cuda_graphs.replays == 5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_replays_with_the_head_at_the_last_position():
    """Targets at the last position (the head run there only, ``logits_to_keep=1``) and an
    earlier one (the head everywhere) on the same shapes: two graphs, each replay equal to the
    eager pass."""
    model = zero_biases(make_lm("mamba", hidden_size=32, state_size=16)).cuda()
    graphed, eager = MambaLRP(model, cuda_graph=True), MambaLRP(model)
    mask = torch.ones(2, 40, dtype=torch.long, device="cuda")
    mask[1, :6] = 0  # left padding: the last position is real in both
    for seed, target in enumerate([5, (-1, 3), None, (10, 2), [1, (-1, 4)], (4, 4)]):
        ids = _ids(2, 40, seed, "cuda")
        rel = graphed.attribute(ids, target=target, attention_mask=mask)
        assert _close(rel, eager.attribute(ids, target=target, attention_mask=mask)), (seed, target)
    assert graphed.cuda_graphs.captures == 2 and graphed.cuda_graphs.replays == 4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_weights_changed_in_place_or_moved_are_seen():
    model = make_lm("mamba", hidden_size=32, state_size=16).cuda()
    graphed = MambaLRP(model, cuda_graph=True)
    ids = _ids(2, 33, 0, "cuda")
    graphed.attribute(ids, target=1)
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight.mul_(1.5)  # same storage: the graph reads it
    assert _close(graphed.attribute(ids, target=1), MambaLRP(model).attribute(ids, target=1))
    assert graphed.cuda_graphs.captures == 1
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 2)  # new storage: recorded again
    assert _close(graphed.attribute(ids, target=1), MambaLRP(model).attribute(ids, target=1))
    assert graphed.cuda_graphs.captures == 2 and len(graphed.cuda_graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_embeddings_input_and_mamba2():
    from test_mamba2 import make_mamba2

    model = make_mamba2(hidden_size=32, num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=16).cuda()
    graphed, eager = MambaLRP(model, backend="triton", cuda_graph=True), MambaLRP(model, backend="triton")
    emb = model.get_input_embeddings()
    for seed in range(3):
        x = emb(_ids(2, 48, seed, "cuda")).detach()
        assert _close(graphed.attribute(x, target=3), eager.attribute(x, target=3))
    assert graphed.cuda_graphs.captures == 1 and graphed.cuda_graphs.replays == 2


class _SyncingHead(nn.Module):
    """A model whose forward reads a value on the host: cannot be recorded."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids).logits
        if float(logits.abs().max()) > 1e9:  # a host synchronisation
            raise AssertionError
        return logits


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_unrecordable_model_gets_a_clear_error_and_comes_back_unchanged():
    model = _SyncingHead(make_lm("mamba", hidden_size=32, state_size=16)).cuda()
    before = snapshot(model)
    ids = _ids(1, 20, 0, "cuda")
    lrp = MambaLRP(model, cuda_graph=True)
    with pytest.raises(RuntimeError, match=r"(?s)cuda_graph=True: recording .* failed.*cuda_graph=False"):
        lrp.attribute(ids, target=1)
    assert_unchanged(model, before)
    assert torch.isfinite(MambaLRP(model).attribute(ids, target=1)).all()
