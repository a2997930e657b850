"""MambaLRP inside Captum's LLM attribution: which prompt tokens drove each generated token.

:class:`MambaLLMAttribution` is a :class:`captum.attr.LLMGradientAttribution` whose
explained quantity is chosen with ``attr_target``:

- ``"logit"`` (default): the logit of each generated token. MambaLRP is conservative for
  it: the relevance of all tokens before the generated one (prompt and earlier generated
  tokens) sums to that logit, exactly when the model has no biases.
- ``"log_prob"``: Captum's choice, ``log p(token)``. The log-softmax is differentiated as
  it is, so the relevance then sums to ``logit - sum_c p_c * logit_c`` (the logit minus
  its probability-weighted mean), which is ``log p + H(p)``, not ``log p``: tokens that
  raise *competing* logits get negative relevance.

    from captum.attr import TextTokenInput
    from captum_mambalrp.llm import MambaLLMAttribution

    llm_attr = MambaLLMAttribution.for_model(model, tokenizer)   # attr_target="logit"
    result = llm_attr.attribute(TextTokenInput("the cat sat", tokenizer), target="on the mat")
    result.plot_token_attr(show=True)   # rows: generated tokens, columns: prompt tokens
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Optional, Union

import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution
from captum.attr._core.llm_attr import GradientForwardFunc
from torch import Tensor, nn

from .attribution import LayerMambaLRP, find_embedding
from .attribution.targets import output_scores
from .models.kernel_path import call_off_cuda, off_cuda

AttrTarget = Literal["logit", "log_prob"]
ATTR_TARGETS = ("logit", "log_prob")


def _token_scores(logits: Tensor, token: Union[int, Tensor], attr_target: str) -> Tensor:
    """The explained score of ``token`` from next-token logits ``[..., V]``."""
    if attr_target == "log_prob":
        logits = torch.log_softmax(logits.float(), dim=-1)
    return logits[..., token]


class TokenScoreFunc(GradientForwardFunc):
    """Captum's forward wrapper for LLM gradient attribution, explaining the logit or the
    log-probability of the current target token (Captum's own explains the log-probability)."""

    def __init__(self, attr: LLMGradientAttribution, attr_target: str) -> None:
        super().__init__(attr)
        self.attr_target = attr_target

    def forward(self, perturbed_tensor: Tensor, inp: Any, target_tokens: Tensor, cur_target_idx: int) -> Tensor:
        ids = self.attr._format_model_input(inp.to_model_input(perturbed_tensor))["input_ids"]
        if cur_target_idx:
            done = target_tokens[:cur_target_idx].unsqueeze(0).expand(ids.size(0), -1).to(ids.device)
            ids = torch.cat([ids, done], dim=1)
        logits = output_scores(call_off_cuda(self.model, ids))[:, -1]
        return _token_scores(logits, target_tokens[cur_target_idx], self.attr_target)


class MambaLLMAttributionResult(LLMAttributionResult):
    """Captum's result plus what conservation needs.

    ``token_attr`` / ``seq_attr`` / ``plot_token_attr`` are Captum's (prompt tokens only).
    ``generated_attr[i, j]`` is the relevance of generated token ``j < i`` for generated
    token ``i`` (Captum drops it), ``explained[i]`` the explained score of generated token
    ``i`` and ``delta[i] = explained[i] - (all relevance for token i)`` (skipped prompt
    tokens included).
    """

    def __init__(
        self, base: LLMAttributionResult, generated_attr: Tensor, explained: Tensor, delta: Tensor, attr_target: str
    ) -> None:
        super().__init__(
            seq_attr=base.seq_attr, token_attr=base.token_attr, input_tokens=base.input_tokens, output_tokens=base.output_tokens
        )
        self.generated_attr = generated_attr
        self.explained = explained
        self.delta = delta
        self.attr_target = attr_target

    def _get_plot_color_map(self) -> Any:
        """The package's colours for ``plot_token_attr`` (red: for the generated token, blue:
        against, white: none; Captum's own map is red for negative, green for positive)."""
        from .visualization.colors import relevance_cmap

        return relevance_cmap()

    def plot_seq_attr(self, show: bool = False) -> Any:
        """Captum's bar plot of ``seq_attr`` in the package's colours: red bars for positive
        relevance, blue for negative (Captum draws positive blue, negative red).

        Returns:
            ``(figure, axis)``, or None with ``show=True``.
        """
        from .visualization.colors import rgb

        fig, ax = super().plot_seq_attr(show=False)
        positive, negative = (tuple(c / 255 for c in rgb(v)) for v in (1.0, -1.0))
        for bar in ax.patches:
            bar.set_color(positive if bar.get_height() > 0 else negative)
        if show:
            import matplotlib.pyplot as plt

            plt.show()
            return None
        return fig, ax


class MambaLLMAttribution(LLMGradientAttribution):
    """:class:`captum.attr.LLMGradientAttribution` explaining the logit (conservative with
    MambaLRP) or the log-probability of each generated token.

    ``attr_method`` is any method Captum accepts here; with :class:`LayerMambaLRP` on the
    token embedding (see :meth:`for_model`) the result is MambaLRP relevance.
    """

    def __init__(self, attr_method: Any, tokenizer: Any, attr_target: AttrTarget = "logit") -> None:
        if attr_target not in ATTR_TARGETS:
            raise ValueError(f"attr_target must be one of {ATTR_TARGETS}; got {attr_target!r}")
        super().__init__(attr_method, tokenizer)
        self.attr_target = attr_target
        self.attr_method.forward_func = TokenScoreFunc(self, attr_target)
        self._calls: List[Tensor] = []
        self._target_ids = torch.empty(0, dtype=torch.long)
        inner = self.attr_method.attribute
        self.attr_method.attribute = self._recording(inner)  # type: ignore[method-assign]

    @classmethod
    def for_model(
        cls, model: nn.Module, tokenizer: Any, attr_target: AttrTarget = "logit", composite: str = "mambalrp", **lrp_kwargs: Any
    ) -> MambaLLMAttribution:
        """MambaLRP (``LayerMambaLRP`` at the token embedding) for a Mamba language model."""
        embedding = find_embedding(model)
        if embedding is None:
            raise ValueError("cannot find the token embedding of the model (get_input_embeddings())")
        return cls(LayerMambaLRP(model, embedding, composite=composite, **lrp_kwargs), tokenizer, attr_target)

    def _recording(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """Keep each full attribution (prompt and generated tokens) that Captum then cuts."""

        def attribute(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self._calls.append(out.detach().reshape(out.shape[0], out.shape[1], -1).sum(-1)[0].float().cpu())
            return out

        return attribute

    def attribute(  # type: ignore[override]
        self,
        inp: Any,
        target: Union[str, Tensor, None] = None,
        gen_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> MambaLLMAttributionResult:
        """Captum's ``attribute`` (same arguments), returning a :class:`MambaLLMAttributionResult`."""
        self._calls = []
        base = super().attribute(inp, target=target, gen_args=gen_args, **kwargs)
        calls, self._calls = self._calls, []
        n_out, n_in = len(base.output_tokens), len(calls[0])
        generated = torch.zeros(n_out, n_out)
        for i, full in enumerate(calls):
            generated[i, :i] = full[n_in:]
        prompt = self._format_model_input(inp.to_model_input())["input_ids"]
        explained = self.explained_scores(prompt, self._target_ids)
        totals = torch.stack([c.sum() for c in calls])
        return MambaLLMAttributionResult(base, generated, explained, explained - totals, self.attr_target)

    def _get_target_tokens(
        self, inp: Any, target: Union[str, Tensor, None] = None, gen_args: Optional[Dict[str, Any]] = None
    ) -> Tensor:
        """Captum's (generate when no target is given), remembered for the explained scores."""
        with off_cuda(self.model):  # generation on the CPU: transformers' torch path
            tokens = super()._get_target_tokens(inp, target, gen_args)
        self._target_ids = tokens.detach().reshape(-1).cpu()
        return tokens

    @torch.no_grad()
    def explained_scores(self, prompt_ids: Tensor, target_ids: Tensor) -> Tensor:
        """The explained score of each target token after the prompt, in one forward pass."""
        target_ids = target_ids.to(prompt_ids.device).reshape(1, -1)
        ids = torch.cat([prompt_ids, target_ids], dim=1)
        logits = output_scores(call_off_cuda(self.model, ids))[0].float()
        start = prompt_ids.shape[1] - 1
        rows = logits[start : start + target_ids.shape[1]]
        return torch.stack([_token_scores(rows[i], int(t), self.attr_target) for i, t in enumerate(target_ids[0])]).cpu()
