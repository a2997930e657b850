"""Vision Mamba (Vim; Zhu et al., ICML 2024), compact, with the public checkpoints' names.

The architecture of the released Vim checkpoints
(``vim_{tiny,small,base}_patch16[_stride8]_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``)::

    tokens = patch_embed.proj(image)                    # Conv2d, [B, N, D] after flattening
    x      = insert cls_token at N // 2, add pos_embed  # the middle class token; [B, N + 1, D]
    for each layer: residual = residual + hidden (hidden at the first);
                    hidden = layers.i.mixer(layers.i.norm(residual))   # RMSNorm, bidirectional mixer
    out    = head(norm_f(residual + hidden)[:, N // 2]) # the class token's features -> class scores

Parameter names are those of the checkpoints (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``layers.N.mixer.{in_proj, conv1d, conv1d_b, x_proj, x_proj_b, dt_proj,
dt_proj_b, A_log, A_b_log, D, D_b, out_proj}``, ``layers.N.norm``, ``norm_f``, ``head``), so
``load_vim_checkpoint(model, "vim_t_midclstok_76p1acc.pth")`` loads a downloaded state dict.
The forward is for inference (no drop path, no random token order); the fused Triton
add+norm of the original computes the same sums in float32 (``residual_in_fp32``).

Relevance: ``MambaLRP(model).attribute(images, target=c)`` returns pixel relevance
``[B, 3, H, W]`` (the conv rule at ``patch_embed.proj``); :func:`patch_relevance` sums it per
patch, :func:`patch_relevance_to_image` spreads patch relevance back over the image.
"""

from __future__ import annotations

import math
import pickle
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.mamba1 import MixerRules
from ..adapters.norms import rms_norm
from ..adapters.vim import bimamba_forward
from ..rules.base import GradientRule

__all__ = [
    "VIM_VARIANTS",
    "BiMambaMixer",
    "VisionMamba",
    "load_vim_checkpoint",
    "patch_relevance",
    "patch_relevance_to_image",
    "vision_mamba",
]

_PLAIN = GradientRule()
#: every component as it is: the plain forward goes through the same computation as MambaLRP's
PLAIN_RULES = MixerRules(conv_act=_PLAIN, gate_act=_PLAIN, ssm=_PLAIN, gate=_PLAIN)

#: the released architectures (all 24 layers, d_state 16, 224 x 224 images, 16 x 16 patches)
VIM_VARIANTS = {
    "vim_tiny_patch16_224": dict(embed_dim=192),
    "vim_tiny_patch16_stride8_224": dict(embed_dim=192, stride=8),
    "vim_small_patch16_224": dict(embed_dim=384),
    "vim_small_patch16_stride8_224": dict(embed_dim=384, stride=8),
    "vim_base_patch16_224": dict(embed_dim=768),
}


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class RMSNorm(nn.Module):
    """``w * x * rsqrt(mean(x^2) + eps)`` (mamba-ssm's RMSNorm: a weight, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, _PLAIN)


class PatchEmbed(nn.Module):
    """``Conv2d(channels, dim, patch, stride)``, flattened to ``[B, N, dim]``."""

    def __init__(
        self, img_size: Tuple[int, int], patch_size: Tuple[int, int], stride: Tuple[int, int], channels: int, dim: int
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.stride = img_size, patch_size, stride
        self.grid_size = tuple((img_size[i] - patch_size[i]) // stride[i] + 1 for i in range(2))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"images of size {tuple(images.shape[-2:])}, but this Vim takes {self.img_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer ("bimamba v2"): see :mod:`captum_mambalrp.adapters.vim`."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        conv_bias: bool = True,
        bias: bool = False,
        if_divide_out: bool = True,
    ) -> None:
        super().__init__()
        self.d_inner, self.d_state = expand * dim, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.if_divide_out = if_divide_out
        self.act = nn.SiLU()
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)
        for suffix in ("", "_b"):
            self.add_module(
                "conv1d" + suffix,
                nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias),
            )
            self.add_module("x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module("dt_proj" + suffix, _dt_proj(self.dt_rank, self.d_inner))
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        self.A_log, self.A_b_log = nn.Parameter(A_log.clone()), nn.Parameter(A_log.clone())
        self.D, self.D_b = nn.Parameter(torch.ones(self.d_inner)), nn.Parameter(torch.ones(self.d_inner))

    def forward(self, hidden: Tensor) -> Tensor:
        return bimamba_forward(self, PLAIN_RULES, hidden)


def _dt_proj(rank: int, d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> nn.Linear:
    """Mamba's initialisation: ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``."""
    proj = nn.Linear(rank, d_inner)
    with torch.no_grad():
        proj.weight.uniform_(-(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return proj


class VimBlock(nn.Module):
    """``residual += hidden; hidden = mixer(norm(residual))``, returning both."""

    def __init__(self, dim: int, mixer: BiMambaMixer, eps: float, residual_in_fp32: bool) -> None:
        super().__init__()
        self.mixer, self.norm, self.residual_in_fp32 = mixer, RMSNorm(dim, eps), residual_in_fp32

    def forward(self, hidden: Tensor, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + hidden
        hidden = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return self.mixer(hidden), residual


class VisionMamba(nn.Module):
    """Vim with the middle class token, absolute position embedding and bimamba v2 mixers."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        stride: Union[int, Tuple[int, int]] = 16,
        depth: int = 24,
        embed_dim: int = 192,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        channels: int = 3,
        num_classes: int = 1000,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        if_divide_out: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(_pair(img_size), _pair(patch_size), _pair(stride), channels, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.layers = nn.ModuleList(
            VimBlock(
                embed_dim,
                BiMambaMixer(embed_dim, d_state, d_conv, expand, dt_rank, if_divide_out=if_divide_out),
                norm_epsilon,
                residual_in_fp32,
            )
            for _ in range(depth)
        )
        self.norm_f = RMSNorm(embed_dim, norm_epsilon)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def token_position(self) -> int:
        """Where the class token sits: the middle of the patch sequence."""
        return self.patch_embed.num_patches // 2

    def forward_features(self, images: Tensor) -> Tensor:
        """The class token's features ``[B, D]``."""
        x = self.patch_embed(images)
        pos = self.token_position
        x = torch.cat([x[:, :pos], self.cls_token.expand(x.shape[0], -1, -1), x[:, pos:]], dim=1) + self.pos_embed
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))[:, pos]

    def forward(self, images: Tensor) -> Tensor:
        """Class scores ``[B, num_classes]``."""
        return self.head(self.forward_features(images))


def vision_mamba(variant: str = "vim_tiny_patch16_224", **overrides) -> VisionMamba:
    """A Vim of a released architecture (names as in :data:`VIM_VARIANTS`, or Vim's own long
    names such as ``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``)."""
    key = variant.split("_bimambav2")[0]
    if key not in VIM_VARIANTS:
        raise ValueError(f"unknown Vim variant {variant!r}; covered: {sorted(VIM_VARIANTS)}")
    return VisionMamba(**{**VIM_VARIANTS[key], **overrides})


def load_vim_checkpoint(model: VisionMamba, checkpoint: Union[str, Mapping[str, Tensor]], trusted: bool = False) -> VisionMamba:
    """Load a Vim state dict (a path, or a mapping; Vim's ``{"model": state_dict, ...}`` files too),
    strictly. Files are read with ``weights_only=True`` unless ``trusted`` (training checkpoints
    that also pickle their ``args`` need it)."""
    loaded: object = checkpoint
    if isinstance(checkpoint, str):
        try:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{checkpoint} holds more than tensors (e.g. training arguments); if you trust the "
                "file, call load_vim_checkpoint(..., trusted=True)"
            ) from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"a Vim checkpoint is a state dict (or {{'model': state_dict}}); got {type(loaded).__name__}")
    state = loaded.get("model", loaded)
    model.load_state_dict(state, strict=True)
    return model


def patch_relevance(relevance: Tensor, model: VisionMamba) -> Tensor:
    """Pixel relevance ``[B, C, H, W]`` summed per patch: ``[B, N]`` in token order
    (non-overlapping patches only; for ``stride < patch_size`` read relevance at the patch
    embedding instead: ``LayerMambaLRP(model, model.patch_embed)`` gives ``[B, N, D]``)."""
    embed = model.patch_embed
    if embed.stride != embed.patch_size:
        raise ValueError(
            "patches overlap (stride < patch_size): use LayerMambaLRP(model, model.patch_embed) "
            "and sum over the last axis for patch relevance"
        )
    gh, gw = embed.grid_size
    (ph, pw) = embed.patch_size
    cropped = relevance.sum(1)[:, : gh * ph, : gw * pw]
    return cropped.reshape(-1, gh, ph, gw, pw).sum((2, 4)).flatten(1)


def patch_relevance_to_image(relevance: Tensor, model: VisionMamba) -> Tensor:
    """Patch relevance ``[B, N]`` (or ``[B, gh, gw]``) spread evenly over each patch's pixels:
    a heatmap ``[B, 1, H, W]`` at image resolution whose sum is the patches' sum (overlapping
    patches add up). ``heat[0].permute(1, 2, 0).numpy()`` goes to Captum's ``visualize_image_attr``."""
    embed = model.patch_embed
    grid = relevance.reshape(relevance.shape[0], 1, *embed.grid_size).float()
    ph, pw = embed.patch_size
    kernel = torch.full((1, 1, ph, pw), 1.0 / (ph * pw), dtype=grid.dtype, device=grid.device)
    heat = F.conv_transpose2d(grid, kernel, stride=embed.stride)
    H, W = embed.img_size
    return F.pad(heat, (0, W - heat.shape[-1], 0, H - heat.shape[-2]))
