"""Figures of a study (PNG, matplotlib's Agg backend; matplotlib is imported on use)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from .analysis import Profile
from .conservation import ConservationReport

CURVE_TITLES = {
    "morf": "Deletion, most relevant first (MoRF): lower is better",
    "lerf": "Deletion, least relevant first (LeRF): higher is better",
    "morf_insert": "Insertion, most relevant first: higher is better",
    "lerf_insert": "Insertion, least relevant first: lower is better",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    return [(cmap(i % 20), "-" if i < 10 else "--") for i in range(n)]


def plot_flipping_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]], grid: np.ndarray, path: str, highlight: Sequence[str] = ("MambaLRP",)
) -> str:
    """Mean explained logit along each curve, one line per method (``{label: {curve: [K+1]}}``)."""
    plt = _pyplot()
    names = [c for c in CURVE_TITLES if any(c in v for v in curves.values())]
    cols = 2
    rows = (len(names) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(13, 4.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for (label, per), (color, style) in zip(curves.items(), _styles(len(curves))):
            if name in per:
                ax.plot(grid, per[name], style, color=color, label=label, lw=2.6 if label in highlight else 1.3)
        ax.set_title(CURVE_TITLES[name], fontsize=10)
        ax.set_xlabel("fraction of tokens replaced" if not name.endswith("insert") else "fraction of tokens inserted")
        ax.set_ylabel("explained logit (mean)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 6 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(scores: Mapping[str, Tuple[float, float]], path: str, title: str = "ΔA^F (mean ± SE)") -> str:
    """Horizontal bars with standard-error whiskers, best on top."""
    plt = _pyplot()
    items = sorted(scores.items(), key=lambda kv: kv[1][0])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.2))
    ax.barh(
        [k for k, _ in items],
        [v[0] for _, v in items],
        xerr=[0 if np.isnan(v[1]) else v[1] for _, v in items],
        color="#4c72b0",
        capsize=3,
    )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_conservation(reports: Mapping[str, ConservationReport], path: str) -> str:
    """Sum of relevance against the explained logit, one panel per method, with the diagonal."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(4.6 * len(reports), 4.4), squeeze=False)
    for ax, (label, rep) in zip(axes.flat, reports.items()):
        lo = float(min(rep.explained.min(), rep.total.min()))
        hi = float(max(rep.explained.max(), rep.total.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.scatter(rep.explained, rep.total, s=7, alpha=0.5)
        s = rep.summary()
        ax.set_title(f"{label}\nmedian |gap|/|logit| = {s['median_rel_gap']:.3g}, r = {s['pearson_r']:.3f}", fontsize=10)
        ax.set_xlabel("explained logit")
        ax.set_ylabel("sum of relevance")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_profiles(profiles: Mapping[str, Profile], path: str, title: str, max_distance: Optional[int] = None) -> str:
    """Mean normalised relevance against distance from the explained token (± SE bands)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for (label, p), (color, style) in zip(profiles.items(), _styles(len(profiles))):
        keep = p.count >= 5 if max_distance is None else (p.count >= 5) & (p.distance <= max_distance)
        d, m, se = p.distance[keep], p.mean[keep], np.nan_to_num(p.se[keep])
        ax.plot(d, m, style, color=color, label=label, marker="o", ms=2.5)
        ax.fill_between(d, m - se, m + se, color=color, alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("distance from the explained (last) token")
    ax.set_ylabel("relevance / sum |relevance| (mean)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_sums(names: Sequence[str], sums: np.ndarray, explained: np.ndarray, path: str) -> str:
    """Relevance summed at each layer against the explained logit (conservation across depth)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ratio = sums / np.where(np.abs(explained) > 1e-12, explained, np.nan)[None, :]
    ax.boxplot([r[~np.isnan(r)] for r in ratio], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [n.replace("backbone.", "") for n in names], rotation=30, fontsize=8)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.9), max(hi, 1.1))
    ax.set_ylabel("sum of relevance / explained logit")
    ax.set_title("MambaLRP relevance at each layer (1 = conserved)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
