"""Explaining text end to end: tokenize, attribute, and label the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attribution import MambaLRP
from .attribution.targets import class_names, output_scores, resolve_class_names, select_targets
from .models.kernel_path import call_off_cuda

MAX_CHARS = 2000  # the longest text the dashboard (and the CLI) accept by default: longer ones take seconds on a CPU


@dataclass
class TextExplanation:
    """The relevance of each token of one text for one explained logit."""

    text: str
    tokens: List[str]
    relevance: Tensor  # [L], float32
    pred_label: str
    pred_prob: float
    target_label: str
    target_index: int
    position: int
    explained: float
    delta: float

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "relevance": [float(v) for v in self.relevance],
            "pred_label": self.pred_label,
            "pred_prob": self.pred_prob,
            "target_label": self.target_label,
            "target_index": self.target_index,
            "position": self.position,
            "explained_logit": self.explained,
            "delta": self.delta,
        }


def label_names(model: nn.Module, tokenizer, n: int) -> List[str]:
    """Class names from ``config.id2label`` for classifiers, decoded tokens for LMs."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if len(id2label) == n:
        return [str(id2label[i]) for i in range(n)]
    return [tokenizer.decode([i]) for i in range(n)]


def resolve_target(target: Union[None, int, str], labels: Sequence[str], tokenizer) -> Optional[int]:
    """An int class from a class name, a token string or an int (``None`` stays)."""
    if target is None or isinstance(target, int):
        return target
    if target in labels:
        return list(labels).index(target)
    if str(target).lstrip("-").isdigit():
        return int(target)
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    raise ValueError(f"target {target!r} is neither a class name ({', '.join(labels[:8])}...) nor a single token")


def explain_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    target: Union[None, int, str] = None,
    lrp: Optional[MambaLRP] = None,
    max_length: int = 4096,
) -> List[TextExplanation]:
    """MambaLRP relevance for each text (one padded batch), labelled for display."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("give at least one non-empty text")
    lrp = lrp or MambaLRP(model)
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    with torch.no_grad():
        scores = output_scores(call_off_cuda(model, input_ids=ids, attention_mask=mask)).float()
    labels = label_names(model, tokenizer, scores.shape[-1])
    if isinstance(target, str) and class_names(model) is not None:  # a classifier: names only, never a token
        target = resolve_class_names(target, model)  # type: ignore[assignment]
    target_id = resolve_target(target, labels, tokenizer)
    _, index = select_targets(scores, target_id, mask if scores.dim() == 3 else None)
    relevance, delta = lrp.attribute(ids, target=target_id, attention_mask=mask, return_convergence_delta=True)
    out = []
    for i, text in enumerate(texts):
        real = mask[i].bool()
        pos, cls = index[i] if len(index[i]) == 2 else (-1, index[i][0])
        row = scores[i, pos] if scores.dim() == 3 else scores[i]
        probs = row.softmax(-1)
        pred = int(row.argmax())
        out.append(
            TextExplanation(
                text=text,
                tokens=tokenizer.convert_ids_to_tokens(ids[i][real].tolist()),
                relevance=relevance[i][real].cpu(),
                pred_label=labels[pred],
                pred_prob=float(probs[pred]),
                target_label=labels[cls],
                target_index=cls,
                position=int(pos),
                explained=float(row[cls]),
                delta=float(delta[i]),
            )
        )
    return out


def records(explanations: Sequence[TextExplanation], words: Union[bool, str] = False):
    """Captum ``VisualizationDataRecord`` s for explanations (one call, ready for
    :func:`captum_mambalrp.visualization.visualize_text` or Captum's ``visualize_text``).
    ``words=True`` merges subword pieces into words (summed relevance)."""
    from .visualization import text_records

    return text_records(
        [e.relevance for e in explanations],
        [e.tokens for e in explanations],
        pred_class=[e.pred_label for e in explanations],
        pred_prob=[e.pred_prob for e in explanations],
        attr_class=[e.target_label for e in explanations],
        explained=[e.explained for e in explanations],
        delta=[e.delta for e in explanations],
        words=words,
    )


def legend(color: bool = True) -> str:
    """The colour legend of :func:`captum_mambalrp.visualization.terminal_heatmap`, one line
    to print under it (red: for the explained class, blue: against it, white: none).

    Returns:
        the line, with 24-bit ANSI colour swatches or, ``color=False``, in words.

    >>> legend(color=False)
    'legend: red = for the explained class (+), white = none, blue = against it (-)'
    """
    from .visualization.colors import legend as _legend

    return _legend(color)
