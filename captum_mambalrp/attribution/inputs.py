"""Checking what the user passes to ``attribute`` and building the forward call."""

from __future__ import annotations

import difflib
import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


@dataclass
class ForwardCall:
    """How to call the model: positional args, keyword args, the mask, the input kind, and
    whether the call computes the output head at the last position only (:func:`last_logits_only`)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    mask: Optional[Tensor] = None
    token_ids: bool = True
    last_logits: bool = False

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    @property
    def target_mask(self) -> Optional[Tensor]:
        """The mask that target positions count real tokens against: none where the scores hold
        the last position only."""
        return None if self.last_logits else self.mask


#: keywords through which a causal LM computes its output head at the last positions only:
#: transformers' ``logits_to_keep`` (``num_logits_to_keep`` before 4.50), mamba-ssm's ``num_last_tokens``
LAST_LOGITS_KWARGS = ("logits_to_keep", "num_logits_to_keep", "num_last_tokens")


def _at_last_position(target: Any) -> bool:
    """Does ``target`` explain the last real position of every example (a class, the predicted
    one, ``(-1, class)``, or a list / 1-D tensor of those)?"""
    if target is None or isinstance(target, (int, Tensor)):
        return True
    if isinstance(target, tuple):
        return len(target) == 2 and isinstance(target[0], int) and target[0] == -1
    if isinstance(target, list):
        return all(_at_last_position(t) and not isinstance(t, list) for t in target)
    return False


def last_logits_only(model: nn.Module, call: ForwardCall, target: Any) -> ForwardCall:
    """``call`` with the model's output head computed at the last position only, where that is
    all ``target`` explains (:func:`_at_last_position`), the last position is real in every
    example (no mask, or left padding) and the model's forward names one of
    :data:`LAST_LOGITS_KWARGS` that the call does not set: the relevance is the same (the head
    acts per position; the other positions' logits do not reach the explained score), and the
    ``[B, L, vocab]`` logits and their gradient are never made (at 32768 tokens and a vocabulary
    of 131072, 8 GiB each in bf16)."""
    if call.last_logits or (call.mask is not None and not bool(call.mask[:, -1].all())) or not _at_last_position(target):
        return call
    params = _parameters(model)
    name = next((n for n in LAST_LOGITS_KWARGS if n in params), None)
    bound = list(params)[: len(call.args)] if call.args else []
    if name is None or name in bound or any(n in call.kwargs for n in LAST_LOGITS_KWARGS):
        return call
    return replace(call, kwargs={**call.kwargs, name: 1}, last_logits=True)


def _parameters(model: nn.Module) -> Dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _accepts(params: Dict[str, inspect.Parameter], name: str) -> bool:
    """Does ``forward`` name this parameter? (A bare ``**kwargs`` does not count.)"""
    return name in params


#: ``attribute``'s own keywords: a keyword close to one of them is a typo, not a model argument
ATTRIBUTE_KEYWORDS = ("target", "additional_forward_args", "return_convergence_delta", "verbose", "attention_mask")


def inputs_from_keywords(inputs: Any, forward_kwargs: Dict[str, Any]) -> Any:
    """``attribute(**enc, target=...)``: the ``input_ids`` (or ``inputs_embeds``) keyword, taken out
    of ``forward_kwargs``, as the inputs when none are given positionally.

    Raises:
        TypeError: no inputs at all, both keywords, or inputs given twice.
    """
    for key in ("input_ids", "inputs_embeds"):  # an explicit None is no input (and would clash with the inputs)
        if key in forward_kwargs and forward_kwargs[key] is None:
            del forward_kwargs[key]
    given = [k for k in ("input_ids", "inputs_embeds") if k in forward_kwargs]
    if inputs is None:
        if len(given) != 1:
            raise TypeError(
                "give input_ids or inputs_embeds, not both"
                if given
                else "attribute() needs inputs: token ids [B, L] (or input_ids=...) or embeddings [B, L, H] "
                "(or inputs_embeds=...)"
            )
        return forward_kwargs.pop(given[0])
    if given:
        raise TypeError(f"inputs given twice, positionally and as {given[0]}=...: pass them once")
    return inputs


#: the model's keywords that make it compute its training loss, which is not what is explained
LOSS_KEYWORDS = ("labels",)


def check_no_loss(kwargs: Dict[str, Any], positional: List[str], extra: Tuple[Any, ...]) -> None:
    """Refuse ``labels`` (a keyword or Captum's ``additional_forward_args``), unless ``None``: the
    model would compute its loss, which is not the explained output, and with the last position's
    logits alone (:func:`last_logits_only`) fail on a shape deep inside torch.

    Raises:
        ValueError: the keyword, and to leave it out.
    """
    for key in LOSS_KEYWORDS:
        value = kwargs.get(key, extra[positional.index(key)] if key in positional else None)
        if value is not None:
            raise ValueError(
                f"attribute({key}=...): {key} make the model compute its loss, which MambaLRP does not explain "
                f"(target= chooses the explained output); leave {key} out"
            )


def check_keywords(model: nn.Module, params: Dict[str, inspect.Parameter], kwargs: Dict[str, Any]) -> None:
    """Refuse a keyword for the model that ``forward`` does not name where it looks like a typo
    of one it names or of ``attribute``'s own (``attention_maks=``, ``targets=``): behind a
    ``**kwargs`` it would be dropped without a word. Other unnamed keywords pass (a transformers
    model takes many through ``**kwargs``); a ``forward`` without ``**kwargs`` refuses them all.

    Raises:
        TypeError: the keyword, and what was probably meant.

    >>> identity = nn.Identity()
    >>> check_keywords(identity, _parameters(identity), {"inptu": 1})
    Traceback (most recent call last):
    ...
    TypeError: attribute(inptu=...): Identity.forward has no parameter 'inptu'; did you mean 'input'?
    """
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values()) or not params
    for key in kwargs:
        if key in named:
            continue
        close = difflib.get_close_matches(key, named + list(ATTRIBUTE_KEYWORDS), n=1, cutoff=0.8)
        if close or not open_ended:
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(named) or 'no keywords'}"
            raise TypeError(f"attribute({key}=...): {type(model).__name__}.forward has no parameter {key!r}; {hint}")


def warn_unmasked_padding(model: nn.Module, ids: Tensor) -> None:
    """Warn when token ids ``[B, L]`` look padded (some rows, not all, end or start with the
    model's ``config.pad_token_id``, at least one of them with two or more: one token can be a
    text's own) and no attention mask came with them: each row's last position would then be
    explained even where it is padding."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if not isinstance(pad, int) or ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[1] < 2:
        return
    for side, ends in (("end", ids[:, -2:]), ("start", ids[:, :2])):
        padded = ends[:, -1 if side == "end" else 0] == pad
        run_of_two = (ends == pad).all(dim=1)
        if bool(padded.any()) and not bool(padded.all()) and bool(run_of_two.any()):
            rows = padded.nonzero().flatten().tolist()
            shown = str(rows) if len(rows) <= 8 else f"{rows[:8]}..."
            warnings.warn(
                f"rows {shown} of the inputs {side} with the pad token ({pad}) but no attention_mask was given: "
                "their padding is read as text and, at the end, explained; pass attention_mask=enc['attention_mask']",
                stacklevel=caller_level(),
            )
            return


def caller_level() -> int:
    """``warnings.warn``'s ``stacklevel`` of the first frame outside this package and Captum (the
    user's ``attribute`` call, through Captum's and our wrappers)."""
    frame: Optional[Any] = sys._getframe(1)
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("captum_mambalrp.", "captum.")):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _takes_use_cache(model: nn.Module, params: Dict[str, inspect.Parameter]) -> bool:
    """Does ``forward`` take ``use_cache``: by name, or through the ``**kwargs`` of a transformers
    model whose config has it (GraniteMoeHybrid's causal LM hands it on to its model, which builds
    a cache by default: a layer given a cache is not recomputed)?"""
    if _accepts(params, "use_cache"):
        return True
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return open_ended and isinstance(model, PreTrainedModel) and getattr(model.config, "use_cache", None) is not None


def check_inputs(inputs: Tensor, embedding: Optional[nn.Embedding]) -> bool:
    """Validate ``inputs``; True for token ids ``[B, L]``, False for embeddings ``[B, L, H]`` (or images
    ``[B, C, H, W]`` for a model without token embedding)."""
    if isinstance(inputs, Mapping):  # a tokenizer's BatchEncoding, a dict
        raise TypeError(
            f"inputs is a {type(inputs).__name__} (a tokenizer's output?): pass enc['input_ids'] and "
            "attention_mask=enc['attention_mask'], or attribute(**enc, target=...)"
        )
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a torch.Tensor of token ids [B, L] or embeddings [B, L, H]; got {type(inputs).__name__}: "
            "make one with tokenizer(texts, return_tensors='pt') or torch.tensor(...)"
        )
    if inputs.dim() == 1 and not inputs.is_floating_point():
        raise TypeError(
            f"inputs of shape {tuple(inputs.shape)} are one sequence without a batch dimension: pass ids.unsqueeze(0) "
            "(token ids are [B, L])"
        )
    if inputs.dim() == 2 and inputs.is_floating_point():
        raise TypeError(
            f"inputs is a floating-point tensor of shape {tuple(inputs.shape)}, where token ids are expected: "
            "pass token ids as an integer tensor (input_ids.long()), or embeddings as a float tensor [B, L, H]."
        )
    if inputs.dim() == 2 and not inputs.dtype.is_complex and inputs.dtype != torch.bool:
        token_ids = True
    elif inputs.dim() == 3 and inputs.is_floating_point():
        token_ids = False
    elif inputs.dim() == 4 and inputs.is_floating_point() and embedding is None:
        token_ids = False  # images [B, C, H, W] of a vision model (Vision Mamba)
    else:
        raise TypeError(
            f"inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype} are not supported: pass token ids "
            "(integer [B, L]), embeddings (float [B, L, H]) or, for a vision model, images (float [B, C, H, W])."
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs hold no example (batch size 0)")
    if inputs.shape[1] == 0:
        raise ValueError("inputs hold an empty sequence (length 0): give at least one token per example")
    if embedding is not None:
        if token_ids:
            low, high = int(inputs.min()), int(inputs.max())
            if low < 0 or high >= embedding.num_embeddings:
                raise IndexError(
                    f"token ids range over [{low}, {high}] but the embedding has {embedding.num_embeddings} "
                    "entries: ids must lie in [0, vocab_size)."
                )
        elif inputs.shape[-1] != embedding.embedding_dim:
            raise ValueError(f"embeddings have hidden size {inputs.shape[-1]} but the model's is {embedding.embedding_dim}")
    return token_ids


def check_mask(mask: Tensor, inputs: Tensor) -> Tensor:
    """Validate an attention mask against ``inputs``: ``[B, L]`` of zeros and ones, each row one
    block of real tokens (padding at the left, the right or both ends, never in between).

    Returns:
        ``mask``, unchanged.

    Raises:
        TypeError, ValueError: (one line, naming the fix) not a tensor, a wrong shape, values
            other than 0/1, a row without a real token, padding between real tokens.

    >>> import torch
    >>> check_mask(torch.tensor([[1, 0, 1]]), torch.zeros(1, 3))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: attention_mask row 0 has padding between real tokens ([1, 0, 1]): padding must be contiguous ...
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor [B, L]; got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(inputs.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the inputs have batch and length "
            f"{tuple(inputs.shape[:2])}: give one 0/1 entry per token, shape [B, L]."
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"examples {empty} have no real token (their attention_mask rows are all zero)")
    real = mask != 0
    runs = real[:, :1].sum(dim=1) + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)  # blocks of real tokens per row
    holes = (runs > 1).nonzero().flatten().tolist()
    if holes:
        row = [int(v) for v in mask[holes[0]].tolist()]
        shown = str(row) if len(row) <= 12 else f"{row[:12]}..."
        raise ValueError(
            f"attention_mask row {holes[0]} has padding between real tokens ({shown}): padding must be contiguous "
            "at the left or right end of each row (one block of 1s); remove the padding in the middle "
            "(e.g. re-pad with tokenizer.padding_side = 'left' or 'right')"
        )
    return mask


def build_call(
    model: nn.Module,
    inputs: Tensor,
    token_ids: bool,
    additional_forward_args: Any,
    attention_mask: Optional[Tensor],
    forward_kwargs: Dict[str, Any],
) -> ForwardCall:
    """Bind inputs, Captum's ``additional_forward_args`` and keywords to ``model.forward``."""
    params = _parameters(model)
    extra: Tuple[Any, ...]
    if additional_forward_args is None:
        extra = ()
    elif isinstance(additional_forward_args, tuple):
        extra = additional_forward_args
    else:
        extra = (additional_forward_args,)
    check_keywords(model, params, forward_kwargs)
    kwargs = dict(forward_kwargs)
    names = list(params)
    # find the attention mask among the positional extras (Captum passes them positionally)
    positional = names[1 : 1 + len(extra)]
    check_no_loss(kwargs, positional, extra)
    if "inputs_embeds" in positional and extra[positional.index("inputs_embeds")] is not None:
        k = positional.index("inputs_embeds")
        raise ValueError(
            f"additional_forward_args[{k}] would reach {type(model).__name__}.forward as inputs_embeds (its parameter "
            f"{k + 2}; Captum passes them by position) beside the inputs; pass an attention mask as attention_mask=..."
        )
    if attention_mask is None and "attention_mask" in positional:
        attention_mask = extra[positional.index("attention_mask")]
    if attention_mask is None and "attention_mask" in kwargs:
        attention_mask = kwargs["attention_mask"]
    elif attention_mask is not None and "attention_mask" not in positional and _accepts(params, "attention_mask"):
        kwargs["attention_mask"] = attention_mask
    mask = None if attention_mask is None else check_mask(attention_mask, inputs)
    if mask is None and token_ids:
        warn_unmasked_padding(model, inputs)
    if _takes_use_cache(model, params) and "use_cache" not in kwargs and "use_cache" not in positional:
        kwargs["use_cache"] = False
    if token_ids or not _accepts(params, "inputs_embeds"):
        return ForwardCall((inputs, *extra), kwargs, mask, token_ids)
    kwargs.update(zip(positional, extra))
    return ForwardCall((), {"inputs_embeds": inputs, **kwargs}, mask, token_ids)
