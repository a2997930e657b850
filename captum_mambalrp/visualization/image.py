"""Image relevance through Captum's ``visualize_image_attr`` (Vision Mamba heatmaps), red for
the explained class and blue against it."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np
from torch import Tensor, nn


def to_hwc(x: Union[Tensor, np.ndarray]) -> np.ndarray:
    """``[H, W]``, ``[C, H, W]`` (or a batch of one) -> ``[H, W, C]`` float numpy, as Captum wants."""
    a = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"give one image, not a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        return np.transpose(a, (1, 2, 0))
    if a.ndim == 3:
        return a
    raise ValueError(f"expected an image or heatmap [H, W], [C, H, W] or [H, W, C]; got shape {a.shape}")


def display_image(image: Union[Tensor, np.ndarray]) -> np.ndarray:
    """An image ``[H, W, C]`` scaled into [0, 1] for display (min-max when outside)."""
    a = to_hwc(image)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


SIGN_CMAPS = {"positive": "Reds", "negative": "Blues", "absolute_value": "Purples"}


def image_attr_figure(
    heatmap: Union[Tensor, np.ndarray],
    image: Optional[Union[Tensor, np.ndarray]] = None,
    method: Optional[str] = None,
    sign: str = "all",
    title: Optional[str] = None,
    **kwargs: Any,
) -> Tuple[Any, Any]:
    """Captum's ``visualize_image_attr`` of a relevance heatmap at image resolution, in this
    package's colours: red for the explained class, blue against, white none
    (:func:`~captum_mambalrp.visualization.colors.relevance_cmap`; Captum's default is
    green/red), with a colour bar as the legend.

    ``heatmap`` is ``[H, W]``, ``[1, H, W]`` or pixel relevance ``[3, H, W]`` (Captum sums
    the channels); ``image`` (``[3, H, W]``, any range) is blended under it. ``sign``
    ``"positive"`` draws in reds, ``"negative"`` in blues, ``"absolute_value"`` in purples.
    Further keywords go to Captum (``cmap``, ``outlier_perc``, ``show_colorbar``, ...).

    Returns:
        ``(figure, axis)``.

    Raises:
        ValueError: a heatmap or image of another shape.
    """
    from captum.attr import visualization as viz

    from .colors import relevance_cmap

    method = method or ("blended_heat_map" if image is not None else "heat_map")
    original = display_image(image) if image is not None else None
    kwargs.setdefault("use_pyplot", False)
    kwargs.setdefault("cmap", relevance_cmap() if sign == "all" else SIGN_CMAPS.get(sign))
    kwargs.setdefault("show_colorbar", True)
    return viz.visualize_image_attr(to_hwc(heatmap), original, method=method, sign=sign, title=title, **kwargs)


def vim_heatmap(
    model: nn.Module, images: Tensor, target: Optional[int] = None, level: str = "patch", **lrp_kwargs: Any
) -> Tensor:
    """MambaLRP heatmaps ``[B, 1, H, W]`` of a Vision Mamba (``captum_mambalrp.models.vim``).

    ``level="patch"``: relevance per patch spread over its pixels (the patches' total is the
    explained logit minus the share of the learned class token and position embeddings, which
    are inputs of their own: ``attribute(..., return_convergence_delta=True)`` reports it);
    ``"pixel"``: the pixel relevance itself, summed over colour channels.
    """
    from ..attribution import MambaLRP
    from ..models.vim import patch_relevance, patch_relevance_to_image

    if level not in ("patch", "pixel"):
        raise ValueError(f"level must be 'patch' or 'pixel'; got {level!r}")
    relevance = MambaLRP(model, **lrp_kwargs).attribute(images, target=target)
    if level == "pixel":
        return relevance.sum(1, keepdim=True)
    return patch_relevance_to_image(patch_relevance(relevance, model), model)  # type: ignore[arg-type]


__all__ = ["SIGN_CMAPS", "display_image", "image_attr_figure", "to_hwc", "vim_heatmap"]
