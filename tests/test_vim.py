"""Vision Mamba: the model definition (checkpoint names, forward), pixel and patch relevance,
conservation down to the token sequence, heatmaps, and the model-unchanged guarantees."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_delta
from test_api import assert_unchanged, snapshot
from vim_reference import reference

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.models.vim import (
    VIM_VARIANTS,
    VisionMamba,
    load_vim_checkpoint,
    patch_relevance,
    patch_relevance_to_image,
    vision_mamba,
)


def make_vim(
    seed: int = 0, bias_free: bool = True, img_size=32, patch_size=8, stride=8, depth=2, embed_dim=16, d_state=4, num_classes=5
) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(
        img_size=img_size,
        patch_size=patch_size,
        stride=stride,
        depth=depth,
        embed_dim=embed_dim,
        d_state=d_state,
        num_classes=num_classes,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".D") or name.endswith(".D_b"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif bias_free and name.endswith("bias") and "dt_proj" not in name:
                p.zero_()
    return model


def images_for(batch, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def checkpoint_keys(depth: int):
    """The keys of a released Vim checkpoint (``checkpoint["model"]``), for ``depth`` layers."""
    mixer = [
        "A_log",
        "A_b_log",
        "D",
        "D_b",
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "conv1d_b.weight",
        "conv1d_b.bias",
        "x_proj.weight",
        "x_proj_b.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "dt_proj_b.weight",
        "dt_proj_b.bias",
        "out_proj.weight",
    ]
    keys = {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "cls_token",
        "pos_embed",
        "norm_f.weight",
        "head.weight",
        "head.bias",
    }
    for i in range(depth):
        keys |= {f"layers.{i}.mixer.{k}" for k in mixer} | {f"layers.{i}.norm.weight"}
    return keys


def test_parameter_names_and_shapes_are_vims(tmp_path):
    model = vision_mamba("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", depth=2)
    state = model.state_dict()
    assert set(state) == checkpoint_keys(2)
    assert state["pos_embed"].shape == (1, 197, 384) and state["cls_token"].shape == (1, 1, 384)
    assert state["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert state["layers.0.mixer.in_proj.weight"].shape == (1536, 384)
    assert state["layers.0.mixer.x_proj_b.weight"].shape == (24 + 32, 768)  # dt_rank ceil(384/16), 2 * d_state
    assert state["layers.0.mixer.A_b_log"].shape == (768, 16)
    assert state["head.weight"].shape == (1000, 384)
    # a Vim checkpoint file ({"model": state_dict}) loads strictly into a fresh model
    torch.save({"model": state, "epoch": 300}, tmp_path / "vim.pth")
    fresh = load_vim_checkpoint(vision_mamba("vim_small_patch16_224", depth=2), str(tmp_path / "vim.pth"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    import argparse

    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "training.pth")
    with pytest.raises(ValueError, match="trusted=True"):
        load_vim_checkpoint(vision_mamba("vim_small_patch16_224", depth=2), str(tmp_path / "training.pth"))
    load_vim_checkpoint(fresh, str(tmp_path / "training.pth"), trusted=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_vim_checkpoint(vision_mamba("vim_small_patch16_224", depth=3), state)


@pytest.mark.parametrize("variant", sorted(VIM_VARIANTS))
def test_variants(variant):
    model = vision_mamba(variant, depth=1)
    expected_dim = {"tiny": 192, "small": 384, "base": 768}[variant.split("_")[1]]
    assert model.embed_dim == expected_dim
    assert model.patch_embed.grid_size == ((27, 27) if "stride8" in variant else (14, 14))
    with pytest.raises(ValueError, match="unknown Vim variant"):
        vision_mamba("vim_huge_patch14_224")


@pytest.mark.parametrize("size,stride", [(32, 8), (16, 4)])
def test_forward_and_relevance_match_the_independent_reference(size, stride):
    model = make_vim(seed=stride, img_size=size, stride=stride)
    images = images_for(2, size, seed=stride)
    _, plain_logits = reference(model, images, cls=1, lrp=False)
    assert torch.allclose(model(images), plain_logits, atol=1e-5, rtol=1e-5)
    expected, logits = reference(model, images, cls=1)
    relevance, delta = MambaLRP(model).attribute(images, target=1, return_convergence_delta=True)
    assert relevance.shape == images.shape
    assert torch.allclose(relevance, expected, rtol=1e-4, atol=1e-5 * expected.abs().max()), (relevance - expected).abs().max()
    assert torch.allclose(relevance.sum((1, 2, 3)) + delta, logits[:, 1], atol=1e-5)


# image, patch, stride, depth, dim, state, batch
SHAPES = [(16, 8, 8, 1, 8, 2, 1), (32, 8, 8, 2, 16, 4, 3), (16, 8, 4, 3, 24, 8, 2), (48, 16, 16, 2, 32, 16, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "img{}p{}s{}L{}d{}n{}b{}".format(*s))
def test_conservation_down_to_the_token_sequence(shape):
    """The class score's relevance is conserved from the final residual sum down to the sequence the blocks
    read (patch tokens + class token + position embeddings). The pixels hold the patch tokens'
    part, so ``attribute``'s delta is exactly what the class token and the position embeddings
    hold (they are learned inputs, like biases)."""
    size, patch, stride, depth, dim, state, batch = shape
    model = make_vim(seed=size + depth, img_size=size, patch_size=patch, stride=stride, depth=depth, embed_dim=dim, d_state=state)
    images = images_for(batch, size, seed=size)
    logits = model(images).detach()
    target = logits.argmax(-1)
    explained = logits[torch.arange(batch), target]
    pixels, delta = MambaLRP(model).attribute(images, target=target, return_convergence_delta=True)
    sequence = LayerMambaLRP(model, model.layers[0]).attribute(images, target=target, attribute_to_layer_input=True)
    tokens = LayerMambaLRP(model, model.patch_embed).attribute(images, target=target)
    final = LayerMambaLRP(model, model.norm_f).attribute(images, target=target, attribute_to_layer_input=True)
    for relevance in (sequence, final):
        assert (relative_delta(relevance.sum((1, 2)) - explained, explained) <= 1e-5).all()
    assert torch.allclose(pixels.sum((1, 2, 3)), tokens.sum((1, 2)), atol=1e-6, rtol=1e-5)  # the conv rule, no bias
    assert torch.allclose(delta, sequence.sum((1, 2)) - tokens.sum((1, 2)), atol=1e-5, rtol=1e-4)


def test_without_position_embeddings_the_delta_is_the_class_tokens_relevance():
    model = make_vim(seed=3)
    with torch.no_grad():
        model.pos_embed.zero_()
    images = images_for(2, seed=3)
    _, delta = MambaLRP(model).attribute(images, target=2, return_convergence_delta=True)
    sequence = LayerMambaLRP(model, model.layers[0]).attribute(images, target=2, attribute_to_layer_input=True)
    assert torch.allclose(delta, sequence[:, model.token_position].sum(-1), atol=1e-6, rtol=1e-4)


def test_batch_equals_single_examples():
    model = make_vim(seed=4, bias_free=False)
    images = images_for(3, seed=4)
    lrp = MambaLRP(model)
    batched = lrp.attribute(images, target=[0, 3, 4])
    for i, t in enumerate([0, 3, 4]):
        assert torch.allclose(batched[i], lrp.attribute(images[i : i + 1], target=t)[0], atol=1e-7, rtol=1e-4)


def test_model_comes_back_unchanged():
    model = make_vim(seed=5, bias_free=False)
    model.head.weight.grad = torch.randn_like(model.head.weight)
    before = snapshot(model)
    images = images_for(2, seed=5)
    with torch.no_grad():
        logits = model(images)
    MambaLRP(model).attribute(images, target=1)
    LayerMambaLRP(model, model.patch_embed).attribute(images, target=1)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(images), logits)


def test_gradient_x_input_does_not_conserve():
    model = make_vim(seed=6, depth=3)
    images = images_for(3, seed=6)
    seq = {}
    handle = model.layers[0].register_forward_pre_hook(lambda m, args: seq.setdefault("x", args[0]))
    try:
        logit = model(images)[:, 1]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logit.sum(), seq["x"])
    gxi = (seq["x"] * grad).sum((1, 2)).detach()
    assert (relative_delta(logit.detach() - gxi, logit.detach()) > 1e-2).all()
    plain = LayerMambaLRP(model, model.layers[0], composite="gradient").attribute(images, target=1, attribute_to_layer_input=True)
    assert torch.allclose(plain.sum((1, 2)), gxi, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size,stride", [(32, 8), (16, 4)])
def test_patch_relevance_and_heatmap(size, stride):
    model = make_vim(seed=7, img_size=size, stride=stride)
    images = images_for(2, size, seed=7)
    pixels = MambaLRP(model).attribute(images, target=2)
    tokens = LayerMambaLRP(model, model.patch_embed).attribute(images, target=2).sum(-1)  # [B, N]
    if stride == 8:
        assert torch.allclose(patch_relevance(pixels, model), tokens, atol=1e-7, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="overlap"):
            patch_relevance(pixels, model)
    heat = patch_relevance_to_image(tokens, model)
    assert heat.shape == (2, 1, size, size)
    assert torch.allclose(heat.sum((1, 2, 3)), tokens.sum(1), atol=1e-6, rtol=1e-5)
    if stride == 8:  # each patch's pixels share its relevance evenly
        assert torch.allclose(heat[0, 0, :8, :8], tokens[0, 0].expand(8, 8) / 64)


def test_heatmap_goes_to_captums_visualize_image_attr():
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import visualization as viz

    model = make_vim(seed=8)
    images = images_for(1, seed=8)
    pixels = MambaLRP(model).attribute(images, target=0)
    heat = patch_relevance_to_image(patch_relevance(pixels, model), model)
    for attr in (heat[0], pixels[0]):
        fig, _ = viz.visualize_image_attr(
            attr.permute(1, 2, 0).numpy(),
            images[0].permute(1, 2, 0).numpy(),
            method="blended_heat_map",
            sign="all",
            use_pyplot=False,
        )
        assert fig is not None


def test_wrong_image_size_is_a_clear_error():
    model = make_vim()
    with pytest.raises(ValueError, match="images of size"):
        MambaLRP(model).attribute(images_for(1, size=24), target=0)
