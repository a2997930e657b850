r"""Long-range test: does the model still use a decisive text far back in a long context?

The MambaLRP paper (Jafari et al., NeurIPS 2024, use cases) uses relevance to test claims about
Mamba's long-range abilities. Here the question is asked with needle-in-a-haystack inputs:

- a **needle** is a short example of the data set (at most ``needle_max_tokens`` tokens) that
  the model classifies correctly when it stands alone; its class is the needle's class;
- the **haystack** is filler text: with ``filler="other"`` (the default) examples whose gold
  label differs from the needle's, so the filler argues for other classes and the needle must
  win against it (without labels: any other example); with ``"any"`` any other example; with
  ``"token"`` one repeated neutral token (default the unknown token, ``[UNK]``), which carries
  no class evidence of its own. Texts are tokenized separately (each with a leading space, no
  special tokens) and concatenated;
- the input has exactly ``length`` tokens: the needle's last token sits ``distance`` tokens
  before the last token (``distance = 0``: the needle ends the input), with filler before
  and after it. One haystack per needle and length is drawn (seeded) and reused for every
  distance, so the curves change only by where the needle sits.

For every (length, distance) the model's **accuracy** (it predicts the needle's class at the
last token) and the **share of relevance on the needle** are reported, MambaLRP explaining the
needle class's logit:

    abs_share    = sum_{s in needle} |R_s| / sum_s |R_s|
    signed_share = sum_{s in needle} R_s / sum_s |R_s|     (in [-1, 1]: > 0 when the needle speaks for its class)

beside ``uniform = needle tokens / length``, the share of a model that spreads relevance
evenly. Means with standard errors over the needles.

Every batch holds inputs of one length (no padding). ``backend``, ``recompute`` and
``cuda_graph`` go to :class:`~captum_mambalrp.MambaLRP`, so long inputs on a GPU take the
package's long-sequence paths (``recompute=True`` keeps one mixer input per layer).

    from captum_mambalrp.evaluation.longrange import LongRangeConfig, LongRangeStudy
    summary = LongRangeStudy(model, tokenizer, texts, labels, LongRangeConfig(lengths=[256]), "out/").run()
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .bias import class_scores
from .records import JsonLines, RunFolder
from .stats import markdown_table, mean_se
from .study import select_examples

FILLERS = ("other", "any", "token")


@dataclass
class LongRangeConfig:
    """What a long-range test computes.

    lengths: input lengths in tokens.
    distances: distances of the needle's last token from the input's last token (``None``:
        ``n_distances`` points, 0 and then geometric up to the largest that fits each length).
    n_needles: needles (correctly classified short examples, a seeded choice).
    needle_max_tokens: the longest needle.
    filler: ``"other"``, ``"any"`` or ``"token"`` (see the module's docstring).
    filler_token: the token of ``filler="token"`` (default: the tokenizer's unknown token).
    batch_size: inputs per MambaLRP pass.
    composite / backend / recompute / cuda_graph: passed to :class:`~captum_mambalrp.MambaLRP`.
    """

    lengths: List[int] = field(default_factory=lambda: [256])
    distances: Optional[List[int]] = None
    n_distances: int = 8
    n_needles: int = 32
    needle_max_tokens: int = 24
    filler: str = "other"
    filler_token: Optional[int] = None
    seed: int = 0
    batch_size: int = 8
    composite: str = "mambalrp"
    backend: str = "auto"
    recompute: Union[bool, str] = "auto"
    cuda_graph: bool = False

    def check(self) -> None:
        """Raises ValueError on a setting out of range."""
        if self.filler not in FILLERS:
            raise ValueError(f"filler must be one of {', '.join(FILLERS)}; got {self.filler!r}")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"give lengths of at least 2 tokens; got {self.lengths}")
        if self.distances is not None and (not self.distances or min(self.distances) < 0):
            raise ValueError(f"distances must be 0 or more; got {self.distances}")
        for name in ("n_distances", "n_needles", "needle_max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")

    def identity(self) -> dict:
        """The settings every saved row depends on (lengths and distances may be added)."""
        return {k: getattr(self, k) for k in ("n_needles", "needle_max_tokens", "filler", "filler_token", "seed", "composite")}

    def distances_for(self, length: int, needle_tokens: int) -> List[int]:
        """The distances used at ``length`` when the longest needle has ``needle_tokens`` tokens
        (those at which every needle fits; none when the needle is longer than ``length``)."""
        room = length - needle_tokens
        if room < 0:
            return []
        if self.distances is not None:
            return sorted({d for d in self.distances if d <= room})
        return default_distances(room, self.n_distances)


def default_distances(room: int, n: int) -> List[int]:
    """``0`` and ``n - 1`` geometric steps up to ``room`` (rounded, distinct).

    >>> default_distances(200, 5)
    [0, 1, 6, 34, 200]
    """
    if room <= 0 or n <= 1:
        return [0]
    steps = np.unique(np.round(np.geomspace(1, room, n - 1)).astype(int)).tolist()
    return [0] + [int(s) for s in steps]


def place_needle(needle: Sequence[int], haystack: Sequence[int], length: int, distance: int) -> Tuple[List[int], int]:
    """``length`` token ids: ``haystack`` with ``needle`` inserted so that its last token is
    ``distance`` tokens before the end; returns the ids and the needle's first position.

    Raises:
        ValueError: the needle does not fit, or the haystack is too short.

    >>> place_needle([7, 8], [1, 2, 3, 4], 5, 1)
    ([1, 2, 7, 8, 3], 2)
    """
    n = len(needle)
    start = length - n - distance
    if start < 0 or distance < 0:
        raise ValueError(f"a needle of {n} tokens at distance {distance} does not fit into {length} tokens")
    if len(haystack) < length - n:
        raise ValueError(f"the haystack has {len(haystack)} tokens; {length - n} are needed")
    before, after = list(haystack[:start]), list(haystack[start : start + distance])
    return before + list(needle) + after, start


class LongRangeStudy:
    """The long-range test on a data set (``labels``: the needles' classes; without labels the
    model's prediction on the needle alone is its class).

    Args:
        model, tokenizer: a classifier MambaLRP accepts (in eval mode; run as given and left
            unchanged) and its tokenizer.
        texts, labels: where needles and filler come from.
        config: :class:`LongRangeConfig`.
        out_dir: where ``rows.jsonl`` (resumable), the tables and the plot go (``None``: memory only).
        class_names: names of the classes (for the tables).
        meta: free-form lines for the report.
        overwrite: discard rows in ``out_dir`` made with other settings.

    Raises:
        ValueError: bad settings, too few usable needles, or ``out_dir`` holding a test with
            other settings (without ``overwrite``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        labels: Optional[Sequence[int]],
        config: LongRangeConfig,
        out_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> None:
        config.check()
        if len(texts) < 2:
            raise ValueError("the long-range test needs at least two texts (a needle and filler)")
        self.model = model  # run as given (in eval mode for deterministic results); never changed
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.labels = None if labels is None else [int(v) for v in labels]
        self.config = config
        self.out = out_dir
        self.meta = dict(meta or {})
        self.class_names = list(class_names) if class_names is not None else None
        self.device = next(model.parameters()).device
        self._memory: List[dict] = []
        self.rows = JsonLines(os.path.join(out_dir, "rows.jsonl")) if out_dir else None
        identity = {**config.identity(), "n_texts": len(self.texts)}
        self.folder = RunFolder(out_dir, identity, "long-range test", overwrite) if out_dir else None
        self._ids: Dict[int, List[int]] = {}

    def token_ids(self, i: int) -> List[int]:
        """Token ids of text ``i`` (with a leading space, no special tokens), cached."""
        if i not in self._ids:
            self._ids[i] = list(self.tokenizer(" " + self.texts[i].strip(), add_special_tokens=False)["input_ids"])
        return self._ids[i]

    # ---- needles and haystacks ----------------------------------------------------------------
    def needles(self) -> List[dict]:
        """The needles: the first ``n_needles`` examples of a seeded order that have at most
        ``needle_max_tokens`` tokens and that the model classifies correctly alone (their class)."""
        cfg = self.config
        order = select_examples(len(self.texts), None, cfg.seed)
        found: List[dict] = []
        candidates = [i for i in order if 0 < len(self.token_ids(i)) <= cfg.needle_max_tokens]
        for k in range(0, len(candidates), 64):
            chunk = candidates[k : k + 64]
            for i, pred in zip(chunk, self._predict_alone(chunk)):
                cls = pred if self.labels is None else self.labels[i]
                if pred == cls:
                    found.append({"index": i, "class": cls, "tokens": len(self.token_ids(i))})
                if len(found) == cfg.n_needles:
                    return found
        if not found:
            raise ValueError(
                f"no usable needle: no text of at most {cfg.needle_max_tokens} tokens is classified correctly; "
                "raise needle_max_tokens (--needle-max-tokens)"
            )
        return found

    def _predict_alone(self, indices: Sequence[int]) -> List[int]:
        seqs = [self.token_ids(i) for i in indices]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s)
            mask[k, : len(s)] = 1
        return class_scores(self.model, ids.to(self.device), mask.to(self.device)).argmax(-1).tolist()

    def haystack(self, needle: dict, length: int) -> List[int]:
        """``length`` filler tokens for ``needle`` (seeded by the needle and the length)."""
        cfg = self.config
        if cfg.filler == "token":
            tok = cfg.filler_token
            if tok is None:
                tok = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else self.tokenizer.pad_token_id
            if tok is None:
                raise ValueError("the tokenizer has no unknown or padding token; give filler_token (--filler-token ID)")
            return [int(tok)] * length
        pool = [
            i
            for i in range(len(self.texts))
            if i != needle["index"] and (cfg.filler == "any" or self.labels is None or self.labels[i] != needle["class"])
        ]
        if not pool:
            raise ValueError("no filler text: every text has the needle's class; use filler='any' or 'token'")
        rng = np.random.default_rng([cfg.seed, needle["index"], length])
        out: List[int] = []
        order = rng.permutation(len(pool))
        k = 0
        while len(out) < length:
            out.extend(self.token_ids(pool[int(order[k % len(order)])]))
            k += 1
            if k > 10 * len(order) + length:  # only empty texts
                raise ValueError("the filler texts have no tokens")
        return out[:length]

    # ---- running ---------------------------------------------------------------------------------
    def run(self, progress: bool = True, figures: bool = True) -> dict:
        """Compute the missing (length, distance, needle) rows, then summarise (and write the
        files with ``out_dir``). Returns the summary: ``curves`` (one row per length and
        distance), ``needles``, ``config``, ``meta``."""
        from tqdm.auto import tqdm

        from ..attribution import MambaLRP

        cfg = self.config
        needles = self.needles()
        longest = max(n["tokens"] for n in needles)
        too_short = [length for length in cfg.lengths if not cfg.distances_for(length, longest)]
        if too_short:  # refused before anything is written to out_dir
            raise ValueError(
                f"lengths {too_short} are shorter than the longest needle ({longest} tokens): "
                f"give lengths above {longest} or a smaller needle_max_tokens (--needle-max-tokens)"
            )
        if self.folder is not None:
            self.folder.prepare(["rows.jsonl"], {"config": asdict(cfg), "meta": self.meta})
        done = {(r["length"], r["distance"], r["needle"]) for r in (self.rows.read() if self.rows is not None else self._memory)}
        jobs: List[Tuple[int, int, List[dict]]] = []
        for length in cfg.lengths:
            for d in cfg.distances_for(length, longest):
                todo = [n for n in needles if (length, d, n["index"]) not in done]
                for k in range(0, len(todo), cfg.batch_size):
                    jobs.append((length, d, todo[k : k + cfg.batch_size]))
        lrp = None
        bar = tqdm(total=sum(len(j[2]) for j in jobs), desc="longrange", unit="input", disable=not progress)
        for length, d, batch in jobs:
            if lrp is None:
                lrp = MambaLRP(
                    self.model, composite=cfg.composite, backend=cfg.backend, recompute=cfg.recompute, cuda_graph=cfg.cuda_graph
                )
            bar.set_postfix_str(f"L={length} d={d}")
            rows = self._batch(lrp, length, d, batch)
            if self.rows is not None:
                self.rows.append(rows)
            else:
                self._memory.extend(rows)
            bar.update(len(batch))
        bar.close()
        rows = self.rows.read() if self.rows is not None else self._memory
        keep = {n["index"] for n in needles}
        rows = [r for r in rows if r["needle"] in keep and r["length"] in cfg.lengths]
        summary = summarize_rows(rows)
        summary.update(
            config=asdict(cfg),
            meta=self.meta,
            needles=[{**n, "class_name": self._name(n["class"])} for n in needles],
            class_names=self.class_names,
        )
        if self.out:
            write_summary(self.out, summary, rows, figures)
        return summary

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)

    def _batch(self, lrp: Any, length: int, distance: int, batch: List[dict]) -> List[dict]:
        seqs, starts = [], []
        for n in batch:
            seq, start = place_needle(self.token_ids(n["index"]), self.haystack(n, length), length, distance)
            seqs.append(seq)
            starts.append(start)
        ids = torch.tensor(seqs, dtype=torch.long, device=self.device)
        target = [n["class"] for n in batch]
        scores = class_scores(self.model, ids, None)
        relevance, delta = lrp.attribute(ids, target=target, return_convergence_delta=True)
        relevance = relevance.detach().double().cpu()
        probs = scores.softmax(-1)
        out = []
        for k, n in enumerate(batch):
            r = relevance[k]
            total = float(r.abs().sum())
            s, e = starts[k], starts[k] + n["tokens"]
            out.append(
                {
                    "length": length,
                    "distance": distance,
                    "needle": n["index"],
                    "class": n["class"],
                    "needle_tokens": n["tokens"],
                    "start": s,
                    "pred": int(scores[k].argmax()),
                    "correct": int(scores[k].argmax()) == n["class"],
                    "prob": float(probs[k, n["class"]]),
                    "explained": float(scores[k, n["class"]]),
                    "delta": float(delta[k]),
                    "abs_share": float(r[s:e].abs().sum()) / total if total > 0 else math.nan,
                    "signed_share": float(r[s:e].sum()) / total if total > 0 else math.nan,
                    "uniform": n["tokens"] / length,
                }
            )
        return out


METRICS = ("correct", "abs_share", "signed_share", "prob", "explained")


def summarize_rows(rows: Sequence[dict]) -> dict:
    """Mean ± SE of accuracy, needle shares, needle-class probability and logit per
    (length, distance)."""
    groups: Dict[Tuple[int, int], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["distance"]), []).append(r)
    curves = []
    for (length, distance), rs in sorted(groups.items()):
        row: Dict[str, Any] = {"length": length, "distance": distance, "n": len(rs)}
        for m in METRICS:
            row["accuracy" if m == "correct" else m] = mean_se([float(r[m]) for r in rs])
        row["uniform"] = float(np.mean([r["uniform"] for r in rs]))
        row["mean_abs_delta"] = float(np.mean([abs(r["delta"]) for r in rs]))
        curves.append(row)
    return {"curves": curves}


def summary_markdown(summary: dict) -> str:
    """The curves as markdown tables, one per length."""
    cfg = summary["config"]
    lines = ["# Long-range test (needle in a haystack)", ""]
    for k, v in (summary.get("meta") or {}).items():
        lines.append(f"- {k}: {v}")
    needles = summary.get("needles") or []
    lines.append(
        f"- needles: {len(needles)} examples of at most {cfg['needle_max_tokens']} tokens classified correctly alone "
        f"(mean {np.mean([n['tokens'] for n in needles]) if needles else float('nan'):.1f} tokens); filler: {cfg['filler']}"
    )
    lines.append(
        "- explained: the needle class's logit at the last token (MambaLRP); "
        "distance: tokens from the needle's last token to the end"
    )
    lines.append("")
    header = ["length", "distance", "n", "accuracy", "|R| share on needle", "signed share", "uniform share", "p(needle class)"]

    def f(v: Tuple[float, float]) -> str:
        m, se = v
        return "n/a" if math.isnan(m) else (f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}")

    for length in sorted({c["length"] for c in summary["curves"]}):
        rows = [
            [
                str(length),
                str(c["distance"]),
                str(c["n"]),
                f(c["accuracy"]),
                f(c["abs_share"]),
                f(c["signed_share"]),
                f"{c['uniform']:.3f}",
                f(c["prob"]),
            ]
            for c in summary["curves"]
            if c["length"] == length
        ]
        lines += [f"## {length} tokens", "", markdown_table(header, rows), ""]
    if summary.get("figures"):
        lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in summary["figures"].items()] + [""]
    return "\n".join(lines)


def _band(ax: Any, x: np.ndarray, cs: Sequence[dict], key: str, **style: Any) -> None:
    """``key``'s mean against ``x`` with a band of one standard error."""
    m = np.array([c[key][0] for c in cs])
    se = np.nan_to_num(np.array([c[key][1] for c in cs]))
    line = ax.plot(x, m, "o-", ms=3, **style)[0]
    ax.fill_between(x, m - se, m + se, color=line.get_color(), alpha=0.15)


def _distance_axes(axes: Sequence[Any], titles: Sequence[str]) -> None:
    """Distance from the end on a symlog axis, titles, grids."""
    from matplotlib.ticker import ScalarFormatter

    for ax, title in zip(axes, titles):
        ax.set_xscale("symlog", linthresh=1)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("distance of the needle from the end (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)


def plot_curves(summary: dict, path: str) -> str:
    """Accuracy and the needle's share of relevance against distance, one curve per length."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lengths = sorted({c["length"] for c in summary["curves"]})
    cmap = plt.get_cmap("viridis")
    for k, length in enumerate(lengths):
        cs = [c for c in summary["curves"] if c["length"] == length]
        x = np.array([c["distance"] for c in cs])
        color = cmap(k / max(1, len(lengths) - 1) * 0.85)
        for ax, key in zip(axes, ("accuracy", "abs_share", "signed_share")):
            _band(ax, x, cs, key, color=color, label=f"{length} tokens")
        axes[1].plot(x, [c["uniform"] for c in cs], ":", color=color, lw=1)
    titles = (
        "accuracy (predicts the needle's class)",
        "share of |relevance| on the needle (dotted: uniform)",
        "signed relevance on the needle / sum |R|",
    )
    _distance_axes(axes, titles)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_models(summaries: Dict[str, dict], path: str, length: Optional[int] = None) -> str:
    """Several models' long-range curves at one length, side by side: accuracy and the needle's
    share of ``|R|`` against distance, one curve per model (``summaries``: label -> a summary
    as :func:`summarize_rows` returns it or ``longrange.json`` holds it).

    ``length`` defaults to the longest length that every summary has.

    Returns:
        ``path``.

    Raises:
        ValueError: no summaries, or no length common to all of them (or ``length`` missing in one).
    """
    if not summaries:
        raise ValueError("plot_models needs at least one summary")
    common = set.intersection(*({c["length"] for c in s["curves"]} for s in summaries.values()))
    if length is None:
        if not common:
            raise ValueError("the summaries share no length; pass length= one that each has")
        length = max(common)
    elif length not in common:
        raise ValueError(f"length {length} is not in every summary (common lengths: {sorted(common)})")
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for k, (label, summary) in enumerate(summaries.items()):
        cs = sorted((c for c in summary["curves"] if c["length"] == length), key=lambda c: c["distance"])
        x = np.array([c["distance"] for c in cs])
        for ax, key in zip(axes, ("accuracy", "abs_share")):
            _band(ax, x, cs, key, color=f"C{k}", label=label)
    axes[1].plot(x, [c["uniform"] for c in cs], ":", color="grey", lw=1, label="uniform share")
    titles = (f"accuracy (predicts the needle's class), {length} tokens", f"share of |relevance| on the needle, {length} tokens")
    _distance_axes(axes, titles)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(out_dir: str, summary: dict, rows: Sequence[dict], figures: bool = True) -> dict:
    """Write ``longrange.csv`` (one row per length and distance), ``per_input.csv``,
    ``longrange.json``, ``longrange.md`` and ``longrange.png``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "longrange.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        keys = ["accuracy", "abs_share", "signed_share", "prob", "explained"]
        w.writerow(["length", "distance", "n"] + [f"{k}{s}" for k in keys for s in ("", "_se")] + ["uniform", "mean_abs_delta"])
        for c in summary["curves"]:
            w.writerow(
                [c["length"], c["distance"], c["n"]] + [v for k in keys for v in c[k]] + [c["uniform"], c["mean_abs_delta"]]
            )
    cols = [
        "length",
        "distance",
        "needle",
        "class",
        "needle_tokens",
        "start",
        "pred",
        "correct",
        "prob",
        "explained",
        "delta",
        "abs_share",
        "signed_share",
    ]
    with open(os.path.join(out_dir, "per_input.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in sorted(rows, key=lambda r: (r["length"], r["distance"], r["needle"])):
            w.writerow([r[c] for c in cols])
    if figures and summary["curves"]:
        summary["figures"] = {"curves": os.path.basename(plot_curves(summary, os.path.join(out_dir, "longrange.png")))}
    with open(os.path.join(out_dir, "longrange.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "longrange.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(summary))
    return summary


__all__ = [
    "FILLERS",
    "LongRangeConfig",
    "LongRangeStudy",
    "default_distances",
    "place_needle",
    "plot_curves",
    "summarize_rows",
    "summary_markdown",
    "write_summary",
]
