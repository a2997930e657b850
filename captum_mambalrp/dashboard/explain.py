"""One dashboard view of one text: MambaLRP, the chosen Captum methods, relevance per layer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..attribution import LayerMambaLRP, MambaLRP, find_embedding
from ..attribution.targets import class_names
from ..evaluation.analysis import find_blocks
from ..evaluation.methods import MethodOptions
from ..evaluation.perturbation import reference_token_id
from ..evaluation.scores import LastTokenScores
from ..text import MAX_CHARS, TextExplanation, explain_texts, label_names
from .methods import DEFAULT_METHODS, MethodRunner, comparison_methods

MAX_LABELS_SHOWN = 100


class InputError(ValueError):
    """An input the dashboard refuses (empty, too long, unknown method or target); the
    message is shown to the user as it is, ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """The largest input accepted, in characters and in tokens."""

    max_chars: int = MAX_CHARS
    max_tokens: int = 256


def _floats(values: Tensor) -> List[float]:
    return [float(v) for v in values.detach().float().cpu().reshape(-1)]


class Explainer:
    """Explains texts with a model for the dashboard; every answer is plain JSON data."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        source: str = "model",
        composite: str = "mambalrp",
        limits: Optional[Limits] = None,
        ig_steps: int = 50,
        options: Optional[MethodOptions] = None,
    ) -> None:
        self.model, self.tokenizer, self.source = model.eval(), tokenizer, source
        self.limits = limits or Limits()
        # the baselines as in the studies: the padding token as reference
        options = options or MethodOptions(reference_token_id=reference_token_id(tokenizer), ig_steps=ig_steps)
        self.runner = MethodRunner(model, options)
        self.composite = composite
        self.lrp = MambaLRP(model, composite=composite)
        embedding = find_embedding(model)
        if embedding is None:
            raise ValueError("the dashboard needs the model's token embedding: give a model with get_input_embeddings()")
        self.embedding = embedding
        self.blocks = find_blocks(model)
        self.layer_lrp = LayerMambaLRP(model, [self.embedding, *[b for _, b in self.blocks]], composite=composite)
        with torch.no_grad():
            probe = self.tokenizer(["a"], return_tensors="pt")["input_ids"]
            n = LastTokenScores(model)(probe).shape[-1]
        self.n_classes = n
        self.labels = label_names(model, tokenizer, n) if n <= MAX_LABELS_SHOWN else []

    def info(self) -> Dict[str, Any]:
        """What the page needs to know about the model and the limits."""
        methods = comparison_methods()
        return {
            "source": self.source,
            "composite": self.composite,
            "labels": self.labels,
            "classes": self.n_classes,
            "methods": [{"key": m.key, "name": m.name, "description": m.description} for m in methods.values()],
            "default_methods": list(DEFAULT_METHODS),
            "max_chars": self.limits.max_chars,
            "max_tokens": self.limits.max_tokens,
            "layers": ["embedding"] + [n for n, _ in self.blocks],
        }

    def check(self, text: Any) -> str:
        """The text if the dashboard accepts it, else :class:`InputError` with the reason."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("Type a text to explain.")
        if len(text) > self.limits.max_chars:
            raise InputError(f"Input too long: {len(text)} characters; the limit is {self.limits.max_chars} characters.", 413)
        n = len(self.tokenizer(text)["input_ids"])
        if n > self.limits.max_tokens:
            raise InputError(f"Input too long: {n} tokens; the limit is {self.limits.max_tokens} tokens.", 413)
        return text

    def _target(self, target: Union[None, int, str]) -> Union[None, int, str]:
        if target in (None, "", "predicted"):
            return None
        if isinstance(target, str) and target in self.labels:
            return target
        names = class_names(self.model)  # a language model's class tokens named by config.id2label
        if isinstance(target, str) and names and target in names:
            return names.index(target)
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < self.n_classes:
            return target
        raise InputError(f"Unknown target {str(target)[:40]!r}: pick one of the model's classes.")

    def explain(
        self, text: str, target: Union[None, int, str] = None, methods: Sequence[str] = DEFAULT_METHODS
    ) -> Dict[str, Any]:
        """The full view of one text (raises :class:`InputError` for a refused input)."""
        text = self.check(text)
        methods = list(dict.fromkeys(methods))
        available = comparison_methods()
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise InputError(f"Unknown method {str(unknown[0])[:40]!r}; available: {', '.join(available)}.")
        start = time.perf_counter()
        e = explain_texts(self.model, self.tokenizer, [text], target=self._target(target), lrp=self.lrp)[0]
        lrp_seconds = time.perf_counter() - start
        ids = self.tokenizer([text], return_tensors="pt")["input_ids"].to(next(self.model.parameters()).device)
        rows = [
            self._row(
                "mambalrp",
                "MambaLRP",
                "LRP rules for Mamba (conservative), one forward and one backward",
                e.relevance,
                e.explained,
                lrp_seconds,
            )
        ]
        rows[0]["delta"] = e.delta  # Captum's convergence delta (the explained score of the relevance pass)
        for key in methods:
            m = available[key]
            start = time.perf_counter()
            relevance = self.runner.relevance(key, ids, e.target_index)
            rows.append(self._row(m.key, m.name, m.description, relevance, e.explained, time.perf_counter() - start))
        return {
            "text": text,
            "tokens": list(e.tokens),
            "prediction": {"label": e.pred_label, "prob": e.pred_prob},
            "top": self._top(ids),
            "target": {"label": e.target_label, "index": e.target_index, "logit": e.explained, "position": e.position},
            "delta": e.delta,
            "methods": rows,
            "layers": self._layers(ids, e),
        }

    def _row(self, key: str, name: str, description: str, relevance: Tensor, explained: float, seconds: float) -> Dict[str, Any]:
        total = float(relevance.sum())
        return {
            "key": key,
            "name": name,
            "description": description,
            "relevance": _floats(relevance),
            "sum": total,
            "delta": explained - total,
            "seconds": seconds,
        }

    def _layers(self, ids: Tensor, e: TextExplanation) -> Dict[str, Any]:
        relevances, deltas = self.layer_lrp.attribute(ids, target=e.target_index, return_convergence_delta=True)
        per_token = [r[0].reshape(r.shape[1], -1).sum(-1) for r in relevances]
        return {
            "names": ["embedding"] + [n for n, _ in self.blocks],
            "relevance": [_floats(r) for r in per_token],
            "totals": [float(r.sum()) for r in per_token],
            "deltas": [float(d[0]) for d in deltas],
        }

    @torch.no_grad()
    def _top(self, ids: Tensor, k: int = 5) -> List[Dict[str, Any]]:
        probs = LastTokenScores(self.model)(ids)[0].softmax(-1)
        values, index = probs.topk(min(k, probs.shape[-1]))
        return [{"label": self._label(int(i)), "prob": float(v)} for v, i in zip(values, index)]

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels else self.tokenizer.decode([index])
