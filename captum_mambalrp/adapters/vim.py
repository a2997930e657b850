"""Vision Mamba's bidirectional mixer (Vim's "bimamba v2", ``if_divide_out``).

For ``hidden [b, l, d]`` the mixer runs two Mamba1 branches that share ``in_proj`` and
``out_proj``: the forward branch on the sequence, the backward branch (its own conv, x/dt
projections, ``A_b_log``, ``D_b``) on the flipped sequence::

    out = out_proj((M_f(hidden) + flip(M_b(flip(hidden)))) / 2)

where ``M`` is the Mamba1 mixer without its output projection (the gated scan output). Each
branch is :func:`.mamba1.mamba1_forward` with an identity ``out_proj``, so the rules are
those of Mamba1 in each direction; ``in_proj(flip(h)) = flip(in_proj(h))`` as the projection
acts per position, and the flips, the sum and the halving are linear (relevance is conserved).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from torch import Tensor, nn

from ..rules.composites import Composite
from .base import Adapter, Component, register
from .common import MixerRules, mixer_rules, rules_as_components
from .mamba1 import Mamba1Parts, mamba1_forward
from .patching import Patcher


def vim_branch_parts(mixer: Any) -> Tuple[Mamba1Parts, Mamba1Parts]:
    """The forward and the backward branch of a bidirectional mixer, as Mamba1 mixers
    without output projection (``out_proj`` is applied once, to their average)."""
    common = dict(
        in_proj=mixer.in_proj,
        out_proj=nn.Identity(),
        dt_rank=int(mixer.dt_rank),
        d_state=int(mixer.d_state),
        act=mixer.act.forward,
    )
    forward = Mamba1Parts(conv1d=mixer.conv1d, x_proj=mixer.x_proj, dt_proj=mixer.dt_proj, A_log=mixer.A_log, D=mixer.D, **common)
    backward = Mamba1Parts(
        conv1d=mixer.conv1d_b, x_proj=mixer.x_proj_b, dt_proj=mixer.dt_proj_b, A_log=mixer.A_b_log, D=mixer.D_b, **common
    )
    return forward, backward


def bimamba_forward(mixer: Any, rules: MixerRules, hidden: Tensor) -> Tensor:
    """``out_proj((M_f(h) + flip(M_b(flip(h)))) / 2)`` (no halving without ``if_divide_out``)."""
    forward, backward = vim_branch_parts(mixer)
    y = mamba1_forward(forward, rules, hidden) + mamba1_forward(backward, rules, hidden.flip(1)).flip(1)
    if mixer.if_divide_out:
        y = y / 2
    return mixer.out_proj(y)


class VimMixerAdapter(Adapter):
    label = "Vision Mamba bidirectional mixer (captum_mambalrp.models.vim)"

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ == "BiMambaMixer" and cls.__module__ == "captum_mambalrp.models.vim"

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "conv1d_b": module.conv1d_b, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        rules = mixer_rules(name, module.act, composite, backend)  # one rule set for both directions

        def forward(hidden_states: Tensor, *args, **kwargs) -> Tensor:
            return bimamba_forward(module, rules, hidden_states)

        patcher.replace_forward(module, forward)
        return rules_as_components(name, rules)


register(VimMixerAdapter())
