"""Rule objects: how relevance crosses one component of a Mamba model.

MambaLRP is computed as *modified gradient x input*: every component keeps its forward
value, but the computation graph is rewritten so that one backward pass carries LRP
relevance (divided by the activations) instead of the plain gradient. A rule decides
that rewrite for one kind of component:

========== ======================================== ==================================
kind       component                                MambaLRP rule
========== ======================================== ==================================
activation SiLU after the conv, SiLU on the gate   identity: ``x * (f(x)/x).detach()``
ssm        selective scan ``y = SSM(delta,A,B,C)(x)`` delta, A, B, C constant
gate       ``y * silu(z)``                          half: each factor gets ``R/2``
norm       RMSNorm, gated grouped RMSNorm           ``rsqrt(mean(x^2)+eps)`` constant
linear     ``nn.Linear``                            LRP-epsilon (or gamma)
conv       depthwise causal ``nn.Conv1d``           LRP-epsilon (or gamma)
attention  ``softmax(q k^T s + M) v`` (transformers) AttnLRP: q, k get 1/4, v 1/2
router     mixture-of-experts routing weights       constant (detached)
========== ======================================== ==================================

The MLPs of transformers and hybrids reuse ``activation`` (the identity rule on
``act(gate_proj(x))``) and ``gate`` (the half rule on ``act(.) * up_proj(x)``).

Every rule subclasses Captum's :class:`~captum.attr._utils.lrp_rules.PropagationRule`,
so ``module.rule = rule`` is accepted by Captum's own checks. Rules never change
weights (``_manipulate_weights`` is a no-op): the rewrite is functional and per call.
"""

from __future__ import annotations

from typing import Callable, ClassVar, FrozenSet, Tuple

import torch
from captum.attr._utils.lrp_rules import PropagationRule
from torch import Tensor, nn

ACTIVATION = "activation"
SSM = "ssm"
GATE = "gate"
NORM = "norm"
LINEAR = "linear"
CONV = "conv"
ATTENTION = "attention"
ROUTER = "router"
KINDS: Tuple[str, ...] = (ACTIVATION, SSM, GATE, NORM, LINEAR, CONV, ATTENTION, ROUTER)


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) := 1``: a denominator that is never zero."""
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + epsilon * sign


def with_gradient_of(value: Tensor, proxy: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient flows through ``proxy``.

    Returns ``proxy + (value - proxy).detach()``: forward value ``value``, backward
    ``d proxy``. Every rule in this package is an instance of this one trick.
    """
    return proxy + (value - proxy).detach()


class MambaRule(PropagationRule):
    """Base class of the rules of this package.

    Subclasses implement the methods of the kinds they list in ``kinds``:

    - ``activation(x, fn)`` returns ``fn(x)`` with the rule's gradient;
    - ``ssm_constants(delta, A, B, C)`` returns the scan parameters, detached or not;
    - ``gate(y, g)`` returns ``y * g`` with the rule's gradient;
    - ``norm_scale(scale)`` returns the normalising factor, detached or not;
    - ``linear(module, x, z)`` returns ``z = module(x)`` with the rule's gradient;
    - ``attention(query, key, value)`` returns the operands of ``softmax(q k^T) v`` with the
      rule's gradient (the attention itself is then computed by plain autograd);
    - ``routing(weights)`` returns a mixture-of-experts layer's routing weights, detached or not.
    """

    kinds: ClassVar[FrozenSet[str]] = frozenset()

    def _manipulate_weights(self, module: nn.Module, inputs: object, outputs: object) -> None:
        """Weights are never changed in place; rules act on the graph only."""

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    # Each kind's method; a rule that does not list the kind never gets called with it.
    def activation(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError

    def ssm_constants(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, ...]:
        raise NotImplementedError

    @property
    def ssm_is_linear(self) -> bool:
        """True when the scan parameters are constants (the scan is linear in x)."""
        return False

    def gate(self, y: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def norm_scale(self, scale: Tensor) -> Tensor:
        raise NotImplementedError

    #: True when :meth:`linear` reads only ``z`` (never ``module``'s weights or ``x``): the rule then
    #: applies unchanged to the output of a grouped or fused matrix product (MoE experts).
    linear_is_elementwise = False

    def linear(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        raise NotImplementedError

    def attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def routing(self, weights: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class GradientRule(MambaRule):
    """Plain gradient: the component is left as it is (Gradient x Input through it).

    Valid for every kind. Used for the ablations of the paper (one MambaLRP rule turned
    off at a time) and for the plain Gradient x Input baseline.
    """

    kinds = frozenset(KINDS)

    def activation(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)

    def ssm_constants(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, ...]:
        return delta, A, B, C

    def gate(self, y: Tensor, g: Tensor) -> Tensor:
        return y * g

    def norm_scale(self, scale: Tensor) -> Tensor:
        return scale

    linear_is_elementwise = True

    def linear(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        return z

    def attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return query, key, value

    def routing(self, weights: Tensor) -> Tensor:
        return weights
