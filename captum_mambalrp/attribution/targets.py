"""Which output value is explained: Captum's ``target`` for sequence and class outputs.

For an output with a sequence axis (``[B, L, C]`` logits):

- ``None``: the predicted class at the last real (non-padded) position;
- ``int`` (or a one-element tensor): that class at the last real position;
- ``(position, class)``: ``position`` counts real tokens only: ``0`` is the first real
  token, ``-1`` the last one, whatever the padding side;
- a list (or 1-D tensor) with one of the above per example.

For ``[B, C]`` outputs: ``None`` (the predicted class), an ``int`` or a list / tensor of
one class per example, as in Captum. ``[B]`` outputs take ``target=None``.

Class names: when the model's ``config.id2label`` names its classes, a class may be given
by name wherever a class index goes (``"joy"``, ``["joy", "fear"]``, ``(-1, "joy")``);
:func:`resolve_class_names` turns names into indices before anything runs. A numeric
string (``"3"``) is that index; a word is never read as a vocabulary id.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

TargetLike = Union[None, int, str, Tuple[int, Union[int, str]], Sequence, Tensor]


def class_names(model: object) -> Optional[List[str]]:
    """The model's class names in index order, from ``config.id2label``; ``None`` when it has
    none (no config, or only transformers' placeholder names ``LABEL_0``, ``LABEL_1``, ...).

    >>> from types import SimpleNamespace
    >>> class_names(SimpleNamespace(config=SimpleNamespace(id2label={0: "neg", 1: "pos"})))
    ['neg', 'pos']
    """
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        return None
    try:
        table = {int(k): str(v) for k, v in dict(id2label).items()}
    except (TypeError, ValueError):
        return None
    if sorted(table) != list(range(len(table))) or all(v == f"LABEL_{k}" for k, v in table.items()):
        return None
    return [table[i] for i in range(len(table))]


def resolve_class_names(target: TargetLike, model: object) -> TargetLike:
    """``target`` with every class name replaced by its index in ``config.id2label`` (names
    alone, in a list per example, or as the class of a ``(position, class)`` pair). Numeric
    strings become ints; ints, tensors and ``None`` pass unchanged.

    Returns:
        the target with indices only, ready for :func:`plan_targets`.

    Raises:
        ValueError: a name the model does not have (the message lists its classes), or a name
            for a model without class names.

    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(config=SimpleNamespace(id2label={0: "sadness", 1: "joy"}))
    >>> resolve_class_names(["joy", (0, "sadness"), 1, "0"], model)
    [1, (0, 0), 1, 0]
    """
    if isinstance(target, str):
        return _class_index(target, model)
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], str):
        return (target[0], _class_index(target[1], model))
    if isinstance(target, list) and any(isinstance(t, (str, tuple)) for t in target):
        return [resolve_class_names(t, model) if isinstance(t, (str, tuple)) else t for t in target]
    return target


def _class_index(name: str, model: object) -> int:
    text = name.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    names = class_names(model)
    if names is None:
        raise ValueError(
            f"target {name!r} is a class name, but the model has no class names (config.id2label); give a class index"
        )
    if text in names:
        return names.index(text)
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ValueError(f"target {name!r} is not a class of the model; its classes are: {', '.join(names)}")


def output_scores(output: object) -> Tensor:
    """The score tensor of a model output: ``.logits`` of a ``ModelOutput`` (else its
    first field, e.g. ``last_hidden_state``), the first element of a tuple, or the tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput without logits
        first = output.to_tuple()[0]
        if isinstance(first, Tensor):
            return first
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise TypeError(
        f"cannot find scores in a model output of type {type(output).__name__}: return a "
        "tensor, a tuple whose first element is one, or an object with `.logits`."
    )


def _per_example(target: TargetLike, batch: int) -> List[object]:
    if isinstance(target, str) or (isinstance(target, (list, tuple)) and any(isinstance(t, str) for t in target)):
        raise ValueError(f"target {target!r} holds a class name: turn names into indices with resolve_class_names(target, model)")
    if target is None or isinstance(target, (int, tuple)):
        return [target] * batch
    if not isinstance(target, (Tensor, list, Sequence)):
        return [_as_int(target)] * batch
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"target is a {target.dtype} tensor: give class indices as integers (e.g. target.long())")
        if target.numel() == 1:
            return [int(target.item())] * batch
        if target.dim() != 1:
            raise ValueError(f"a target tensor must be 1-D with one class per example; got shape {tuple(target.shape)}")
        target = target.tolist()
    target = [t if t is None or isinstance(t, tuple) else _as_int(t) for t in target]
    if len(target) != batch:
        raise ValueError(f"target has {len(target)} entries for a batch of {batch} examples; give one per example")
    return target


def _as_int(t: Any) -> object:
    if isinstance(t, bool):
        return t  # refused by the checks with their message
    if isinstance(t, numbers.Real) and not isinstance(t, numbers.Integral):  # python and numpy floats
        raise ValueError(f"target {t!r} is a float: give a class index as an int")
    try:
        return int(t)  # python, numpy and one-element torch integers
    except (TypeError, ValueError):
        return t


def _real_positions(mask: Optional[Tensor], batch: int, length: int) -> List[List[int]]:
    if mask is None:
        return [list(range(length))] * batch
    return [torch.nonzero(mask[i], as_tuple=False).flatten().tolist() for i in range(batch)]


@dataclass
class TargetPlan:
    """What to explain, fixed before the forward pass: per example a position (``[B, L, C]``
    outputs) and a class (``-1``: the predicted one, chosen on the device)."""

    kind: int  # number of dimensions of the scores: 1, 2 or 3
    positions: List[int]
    classes: List[int]

    def tensors(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        return (
            torch.tensor(self.positions, dtype=torch.long, device=device),
            torch.tensor(self.classes, dtype=torch.long, device=device),
        )

    def index(self, chosen: Tensor) -> List[Tuple[int, ...]]:
        """``(position, class)`` (``[B, L, C]``), ``(class,)`` (``[B, C]``) or ``()`` per example."""
        if self.kind == 1:
            return [()] * len(self.positions)
        cls = chosen.tolist()
        return [(p, c) for p, c in zip(self.positions, cls)] if self.kind == 3 else [(c,) for c in cls]


def plan_targets(shape: Sequence[int], target: TargetLike, mask: Optional[Tensor] = None) -> TargetPlan:
    """Check ``target`` against the scores' shape (and the mask) and fix what it selects."""
    batch = shape[0]
    if len(shape) == 1:
        if target is not None:
            raise ValueError("the model returns one score per example; call attribute with target=None")
        return TargetPlan(1, [0] * batch, [0] * batch)
    if len(shape) == 2:
        classes = []
        for t in _per_example(target, batch):
            if t is None:
                t = -1
            elif isinstance(t, tuple) or isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"target {t!r} is not a class index; outputs of shape [B, C] take one int per example")
            else:
                _check_class(t, shape[1])
            classes.append(t)
        return TargetPlan(2, [0] * batch, classes)
    if len(shape) == 3:
        length, n_classes = shape[1], shape[2]
        real = _real_positions(mask, batch, length)
        positions, classes = [], []
        for i, t in enumerate(_per_example(target, batch)):
            position, cls = (-1, t) if not isinstance(t, tuple) else _pair(t)
            if len(real[i]) == 0:
                raise ValueError(f"example {i} has no real token (its attention mask is all zeros)")
            if not -len(real[i]) <= position < len(real[i]):
                raise IndexError(
                    f"target position {position} is out of range for example {i}, which has "
                    f"{len(real[i])} real tokens (positions count real tokens; -1 is the last)"
                )
            if cls is not None:
                _check_class(cls, n_classes)  # type: ignore[arg-type]
            positions.append(real[i][position])
            classes.append(-1 if cls is None else cls)  # type: ignore[arg-type]
        return TargetPlan(3, positions, classes)
    raise ValueError(f"model output of shape {tuple(shape)} is not supported; expected [B], [B, C] or [B, L, C]")


def pick_scores(scores: Tensor, positions: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor]:
    """The explained score per example (``[B]``, differentiable) and the class explained,
    without a host synchronisation (so a CUDA graph can hold it): ``classes < 0`` takes the
    predicted class at the position."""
    if scores.dim() == 1:
        return scores, classes
    rows = torch.arange(scores.shape[0], device=scores.device)
    at = scores if scores.dim() == 2 else scores[rows, positions]
    chosen = torch.where(classes >= 0, classes, at.detach().argmax(dim=-1))
    return at[rows, chosen], chosen


class TargetSelector:
    """``scores -> explained [B]`` for :func:`~captum_mambalrp.attribution.engine.relevance_pass`;
    keeps the plan it made (``.plan``), so a CUDA graph can be set up from it."""

    def __init__(self, target: TargetLike, mask: Optional[Tensor] = None) -> None:
        self.target, self.mask = target, mask
        self.plan: Optional[TargetPlan] = None

    def __call__(self, scores: Tensor) -> Tensor:
        self.plan = plan_targets(scores.shape, self.target, self.mask)
        return pick_scores(scores, *self.plan.tensors(scores.device))[0]


def select_targets(scores: Tensor, target: TargetLike, mask: Optional[Tensor] = None) -> Tuple[Tensor, List[Tuple[int, ...]]]:
    """The explained score per example (``[B]``, differentiable) and its index per example."""
    plan = plan_targets(scores.shape, target, mask)
    explained, chosen = pick_scores(scores, *plan.tensors(scores.device))
    return explained, plan.index(chosen)


def _pair(t: tuple) -> Tuple[int, Optional[int]]:
    if len(t) != 2:
        raise ValueError(f"a tuple target must be (position, class); got {t!r}")
    position, cls = _as_int(t[0]), (None if t[1] is None else _as_int(t[1]))
    if not isinstance(position, int) or isinstance(position, bool):
        raise ValueError(f"target position {t[0]!r} in {t!r} is not an int")
    return position, cls  # type: ignore[return-value]


def _check_class(cls: int, classes: int) -> None:
    if not isinstance(cls, int) or isinstance(cls, bool):
        raise ValueError(f"target class {cls!r} is not an int: give a class index (0..{classes - 1}) or a class name")
    if not 0 <= cls < classes:
        raise IndexError(f"target class {cls} is out of range: the model has {classes} output classes (0..{classes - 1})")
