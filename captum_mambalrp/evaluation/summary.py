"""Writing a study's summary from its records: ``per_example.csv``, ``summary.json``,
``summary.md`` (mean ± standard error per method and metric, paired differences against
MambaLRP) and PNG figures. Reads only the files in the study folder, so a study computed
elsewhere (or by several processes) is summarised the same way.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .analysis import distance_profile, layer_profiles
from .conservation import ConservationReport
from .methods import method_label
from .perturbation import CURVES, Perturbation
from .records import ShardedLines
from .stats import fmt, markdown_table, mean_se, paired_difference

METRICS = ["dAF", "AOPC", "ABPC", "dAI", "A_morf", "A_lerf", "A_morf_insert", "A_lerf_insert"]
SCORES = ["dAF", "AOPC", "ABPC", "dAI"]  # the scores (higher is better) compared pairwise with MambaLRP
COSTS = ["seconds", "cpu_seconds", "forward_rows", "forward_calls"]
PROFILE_METHODS = [
    "mambalrp",
    "gxi",
    "lrp_ln",
    "integrated_gradients",
    "smoothgrad",
    "feature_ablation",
    "kernelshap",
    "mamba_attr",
    "attn_rollout",
    "implicit_attn",
    "implicit_attr",
]
REFERENCE = "mambalrp"


def _by_method(records: List[dict], methods: Sequence[str], keep: set) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {m: [] for m in methods}
    seen = set()
    for r in records:
        key = (r["method"], r["index"])
        if r["method"] in out and r["index"] in keep and key not in seen:
            seen.add(key)
            out[r["method"]].append(r)
    for m in out:
        out[m].sort(key=lambda r: r["index"])
    return {m: rs for m, rs in out.items() if rs}


def _label(method: str) -> str:
    return method_label(method)


def summarize(
    out_dir: str,
    methods: Sequence[str],
    perturbation: Perturbation,
    meta: Optional[dict] = None,
    figures: bool = True,
    indices: Optional[Sequence[int]] = None,
) -> dict:
    """Summary, CSV, markdown and figures from the records in ``out_dir`` (of the examples
    ``indices`` only, when given)."""
    meta = dict(meta or {})
    keep = None if indices is None else set(indices)
    examples = {r["index"]: r for r in ShardedLines(out_dir, "examples").read() if keep is None or r["index"] in keep}
    by_method = _by_method(ShardedLines(out_dir, "results").read(), methods, set(examples))
    _write_csv(os.path.join(out_dir, "per_example.csv"), by_method)
    table = {}
    for m, rs in by_method.items():
        table[m] = {
            "label": _label(m),
            "reference": rs[0].get("reference", "none"),
            "n": len(rs),
            **{k: mean_se([r.get(k, float("nan")) for r in rs]) for k in METRICS + COSTS},
        }
    paired = {}
    if REFERENCE in by_method:
        ref = {r["index"]: r for r in by_method[REFERENCE]}
        for m, rs in by_method.items():
            common = [r for r in rs if r["index"] in ref]
            paired[m] = {k: paired_difference([ref[r["index"]][k] for r in common], [r[k] for r in common]) for k in SCORES}
    labels = [e["label"] for e in examples.values() if e.get("label") is not None]
    accuracy = float(np.mean([e["pred"] == e["label"] for e in examples.values()])) if labels else None
    conservation = {
        m: ConservationReport(
            _label(m), np.array([r["explained"] for r in by_method[m]]), np.array([r["relevance_sum"] for r in by_method[m]])
        )
        for m in ("mambalrp", "mambalrp_cp", "gxi")
        if m in by_method
    }
    profiles = {
        _label(m): distance_profile([np.array(r["relevance"]) for r in by_method[m]]) for m in PROFILE_METHODS if m in by_method
    }
    layer_rows = list({r["index"]: r for r in ShardedLines(out_dir, "layers").read() if r["index"] in examples}.values())
    summary = {
        "meta": meta,
        "n_examples": len(examples),
        "accuracy_on_examples": accuracy,
        "perturbation": perturbation.as_dict(),
        "methods": table,
        "paired_vs_mambalrp": paired,
        "conservation": {m: rep.summary() for m, rep in conservation.items()},
        "distance_profiles": {k: p.as_dict() for k, p in profiles.items()},
    }
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            summary["figures_skipped"] = "matplotlib is not installed (pip install 'captum-mambalrp[viz]')"
            figures = False
    if figures:
        summary["figures"] = _figures(out_dir, by_method, perturbation, conservation, profiles, layer_rows, table)
    if layer_rows:
        summary["layers"] = _layer_summary(layer_rows)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(summary))
    return summary


def _write_csv(path: str, by_method: Dict[str, List[dict]]) -> None:
    cols = ["method", "index", "n_tokens", "label", "pred", "explained", "relevance_sum"] + METRICS + COSTS
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for rs in by_method.values():
            for r in rs:
                w.writerow([r.get(c) for c in cols])


def _layer_summary(rows: List[dict]) -> dict:
    """Mean relevance sum and median relative gap to the explained logit per layer (MambaLRP's;
    CP-LRP's too, ``*_cp``, when every row has it)."""
    names = rows[0]["names"]
    explained = np.array([r["explained"] for r in rows])
    out: Dict[str, Any] = {"names": names, "mean_explained": float(explained.mean())}
    keys = [("relevance", "")] + ([("relevance_cp", "_cp")] if all("relevance_cp" in r for r in rows) else [])
    for key, suffix in keys:
        sums = np.array([[sum(layer) for layer in r[key]] for r in rows]).T
        rel = np.abs(sums - explained[None]) / np.maximum(np.abs(explained[None]), 1e-12)
        out[f"median_rel_gap_per_layer{suffix}"] = np.median(rel, axis=1).tolist()
        out[f"mean_sum_per_layer{suffix}"] = sums.mean(1).tolist()
    return out


def _figures(out_dir, by_method, perturbation, conservation, profiles, layer_rows, table) -> Dict[str, str]:
    from .plots import plot_conservation, plot_flipping_curves, plot_layer_sums, plot_profiles, plot_scores  # matplotlib, lazily

    figures: Dict[str, str] = {}
    if by_method:
        grid = perturbation.grid().numpy()
        order = sorted(by_method, key=lambda m: -table[m]["dAF"][0])
        curves = {_label(m): {c: np.mean([r["curves"][c] for r in by_method[m]], axis=0) for c in CURVES} for m in order}
        figures["curves"] = plot_flipping_curves(
            curves, grid, os.path.join(out_dir, "flipping_curves.png"), highlight=(_label(REFERENCE),)
        )
        figures["scores"] = plot_scores({_label(m): table[m]["dAF"] for m in order}, os.path.join(out_dir, "scores_dAF.png"))
    if conservation:
        figures["conservation"] = plot_conservation(
            {r.method: r for r in conservation.values()}, os.path.join(out_dir, "conservation.png")
        )
    if profiles:
        figures["distance"] = plot_profiles(
            profiles,
            os.path.join(out_dir, "distance_profile.png"),
            "Relevance against distance from the explained token",
            max_distance=40,
        )
    if layer_rows:
        names = layer_rows[0]["names"]
        per_layer: Dict[str, Sequence[np.ndarray]] = {
            n.replace("backbone.", ""): [np.array(r["relevance"][k]) for r in layer_rows] for k, n in enumerate(names)
        }
        figures["layers"] = plot_profiles(
            layer_profiles(per_layer),
            os.path.join(out_dir, "layer_profile.png"),
            "MambaLRP relevance at each layer against distance",
            max_distance=40,
        )
        sums = np.array([[sum(layer) for layer in r["relevance"]] for r in layer_rows]).T
        figures["layer_sums"] = plot_layer_sums(
            names, sums, np.array([r["explained"] for r in layer_rows]), os.path.join(out_dir, "layer_sums.png")
        )
    return {k: os.path.basename(v) for k, v in figures.items()}


def summary_markdown(summary: dict) -> str:
    """The study's summary as markdown (tables, then the figures)."""
    meta, table, paired = summary["meta"], summary["methods"], summary["paired_vs_mambalrp"]
    p = summary["perturbation"]
    lines = ["# Attribution study", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    acc = summary.get("accuracy_on_examples")
    lines.append(f"- examples: {summary['n_examples']}" + (f" (model accuracy on them: {acc:.4f})" if acc is not None else ""))
    lines.append(
        f"- perturbation: {p['fraction_per_step']:g} of the tokens per step, removed tokens become "
        f"{p['replacement']}" + (f" (id {p['token_id']})" if p["replacement"] == "token" else "")
    )
    lines += ["", "## Faithfulness (mean ± standard error over examples)", ""]
    order = sorted(table, key=lambda m: -table[m]["dAF"][0])
    rows = [
        [
            table[m]["label"],
            table[m].get("reference", "none"),
            str(table[m]["n"]),
            *(fmt(*table[m][k]) for k in METRICS),
            f"{table[m]['seconds'][0] * 1000:.1f}",
            f"{table[m]['cpu_seconds'][0] * 1000:.1f}",
            f"{table[m]['forward_rows'][0]:.1f}",
        ]
        for m in order
    ]
    header = ["method", "reference", "n", "ΔA^F", "AOPC", "ABPC", "ΔA^I", "A(MoRF)", "A(LeRF)", "A_ins(MoRF)", "A_ins(LeRF)"]
    lines.append(markdown_table(header + ["ms / example", "CPU ms / example", "forwards / example"], rows))
    if paired:
        lines += ["", "## MambaLRP minus each method, paired over the same examples (mean ± SE)", ""]
        rows = [[table[m]["label"], *(fmt(*paired[m][k]) for k in SCORES)] for m in order if m in paired and m != REFERENCE]
        lines.append(markdown_table(["method", "ΔA^F", "AOPC", "ABPC", "ΔA^I"], rows))
    if REFERENCE in table and len(table) > 1:
        best_other = next(m for m in order if m != REFERENCE)
        d, se = paired[best_other]["dAF"]
        rank = order.index(REFERENCE) + 1
        lines += [
            "",
            f"MambaLRP ranks {rank} of {len(order)} by ΔA^F; against the best other method "
            f"({table[best_other]['label']}) its ΔA^F differs by {fmt(d, se)} (paired, same examples).",
        ]
    lines += [
        "",
        "ΔA^F = A(LeRF) − A(MoRF), ΔA^I = A_ins(MoRF) − A_ins(LeRF), AOPC = mean over the steps of the drop "
        "of the MoRF curve, ABPC = mean over the steps of LeRF − MoRF: higher is better for all four. A paired "
        "entry is the mean over the same examples of MambaLRP's score minus the method's (± SE): positive where "
        "MambaLRP is better. The reference column is the baseline input of the methods that take one "
        "(zero, mean embedding, token:ID). Cost: wall-clock "
        "and CPU time of `attribute` per example (batch time / batch size; CPU time counts all threads) and "
        "examples forwarded per example.",
        "",
    ]
    if summary.get("conservation"):
        lines += ["## Conservation", ""]
        rows = [
            [
                c["method"],
                str(c["n"]),
                f"{c['mean_abs_gap']:.4g}",
                f"{c['median_rel_gap']:.4g}",
                f"{c['max_rel_gap']:.4g}",
                f"{c['pearson_r']:.4f}",
            ]
            for c in summary["conservation"].values()
        ]
        lines.append(
            markdown_table(["method", "n", "mean abs(logit − ΣR)", "median relative gap", "max relative gap", "Pearson r"], rows)
        )
        lines.append("")
    if summary.get("layers"):
        lay = summary["layers"]
        header = ["layer", "mean ΣR", "median relative gap to the logit"]
        columns = [lay["mean_sum_per_layer"], lay["median_rel_gap_per_layer"]]
        if "mean_sum_per_layer_cp" in lay:
            header += ["mean ΣR, CP-LRP", "median relative gap, CP-LRP"]
            columns += [lay["mean_sum_per_layer_cp"], lay["median_rel_gap_per_layer_cp"]]
        rows = [
            [n] + [f"{v:.4f}" if j % 2 == 0 else f"{v:.4g}" for j, v in enumerate(vals)]
            for n, *vals in zip(lay["names"], *columns)
        ]
        title = "MambaLRP, and MambaLRP with CP-LRP attention" if "mean_sum_per_layer_cp" in lay else "MambaLRP"
        lines += [f"## Relevance per layer ({title})", "", markdown_table(header, rows), ""]
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in summary.get("figures", {}).items()]
    if summary.get("figures_skipped"):
        lines.append(f"No figures: {summary['figures_skipped']}.")
    lines.append("")
    return "\n".join(lines)
