"""A comparative attribution study, end to end and resumable.

For every batch of examples: one forward gives the explained class (the prediction at the
last real token) and its logit; every method then attributes it (timed, forward passes
counted), and the flipping curves are taken. Each (method, batch) is appended to
``results.jsonl`` as soon as it is done, so an interrupted study resumes where it stopped.
:meth:`Study.finalize` turns the records into ``per_example.csv``, ``summary.json``,
``summary.md`` (mean ± standard error per method and metric) and PNG figures.

    study = Study(model, tokenizer, texts, labels, StudyConfig(methods=resolve_methods("all")), "out/")
    summary = study.run()
"""

from __future__ import annotations

import csv
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .analysis import distance_profile, layer_profiles, layer_relevance
from .conservation import ConservationReport
from .methods import METHODS, MethodOptions, build_method, resolve_methods
from .perturbation import CURVES, Perturbation, flipping_scores, perturbation_curves
from .scores import ForwardCounter, LastTokenScores, package_forward
from .stats import fmt, markdown_table, mean_se, paired_difference

METRICS = ["dAF", "A_morf", "A_lerf", "dAI", "A_morf_insert", "A_lerf_insert"]
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
]
REFERENCE = "mambalrp"


@dataclass
class StudyConfig:
    """What a study computes. A study resumes only with the same settings, except that
    methods may be added and ``n_examples`` changed. ``package_scan`` runs every
    method and every curve through the package's scan (:func:`~.scores.package_forward`:
    the same function, faster on the CPU) instead of the model's own implementation."""

    methods: List[str] = field(default_factory=lambda: resolve_methods("all"))
    n_examples: Optional[int] = 500
    batch_size: int = 16
    seed: int = 0
    max_length: int = 128
    perturbation: Perturbation = field(default_factory=Perturbation)
    options: MethodOptions = field(default_factory=MethodOptions)
    layer_analysis: bool = True
    package_scan: bool = True

    def identity(self) -> dict:
        """The settings a resumed study must share (methods and ``n_examples`` may grow:
        the examples are a prefix of one seeded permutation)."""
        out = asdict(self)
        out.pop("methods")
        out.pop("n_examples")
        return out


def select_examples(n_total: int, n: Optional[int], seed: int) -> List[int]:
    """The first ``n`` indices of a seeded permutation of ``range(n_total)`` (all for ``None``)."""
    order = np.random.default_rng(seed).permutation(n_total).tolist()
    return order if n is None else order[: min(n, n_total)]


def _method_seed(seed: int, batch: int, method: str) -> int:
    return (seed * 1_000_003 + batch * 10_007 + zlib.crc32(method.encode())) % (2**31)


class _JsonLines:
    """Append-only JSON lines; a line cut short by an interruption is skipped on reading."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not text:
            return
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


class Study:
    """A study of ``config.methods`` on ``texts`` (``labels`` optional) written to ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        labels: Optional[Sequence[int]],
        config: StudyConfig,
        out_dir: str,
        meta: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.texts, self.labels = list(texts), None if labels is None else list(labels)
        self.config = config
        self.config.methods = resolve_methods(config.methods)
        self.out = out_dir
        self.meta = dict(meta or {})
        self.device = next(model.parameters()).device
        os.makedirs(out_dir, exist_ok=True)
        self.results = _JsonLines(os.path.join(out_dir, "results.jsonl"))
        self.examples = _JsonLines(os.path.join(out_dir, "examples.jsonl"))
        self.layers = _JsonLines(os.path.join(out_dir, "layers.jsonl"))
        self._check_config(overwrite)
        self.indices = select_examples(len(self.texts), config.n_examples, config.seed)

    # ---- set-up and resuming -------------------------------------------------------------
    def _check_config(self, overwrite: bool) -> None:
        path = os.path.join(self.out, "config.json")
        identity = {**self.config.identity(), "n_texts": len(self.texts)}
        if os.path.exists(path) and not overwrite:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("identity") != json.loads(json.dumps(identity)):
                raise ValueError(
                    f"{self.out} holds a study with other settings ({path}); use another output folder "
                    "or overwrite=True (--overwrite) to start afresh"
                )
            methods = saved.get("methods", []) + [m for m in self.config.methods if m not in saved.get("methods", [])]
        else:
            for p in (self.results.path, self.examples.path, self.layers.path):
                if os.path.exists(p):
                    os.remove(p)
            methods = self.config.methods
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"identity": identity, "methods": methods, "meta": self.meta}, f, indent=1)

    def batches(self) -> List[List[int]]:
        """Length-sorted batches of the selected examples (less padding, same for every run)."""
        lengths = {
            i: len(self.tokenizer(self.texts[i], truncation=True, max_length=self.config.max_length)["input_ids"])
            for i in self.indices
        }
        ordered = sorted(self.indices, key=lambda i: (lengths[i], i))
        size = self.config.batch_size
        return [ordered[k : k + size] for k in range(0, len(ordered), size)]

    def _encode(self, batch: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            [self.texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True, max_length=self.config.max_length
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ---- running -------------------------------------------------------------------------
    def run(self, progress: bool = True, figures: bool = True) -> dict:
        """Compute what is missing, then :meth:`finalize`; returns the summary."""
        from tqdm.auto import tqdm

        done_results = {(r["method"], r["index"]) for r in self.results.read()}
        done_examples = {r["index"] for r in self.examples.read()}
        done_layers = {r["index"] for r in self.layers.read()}
        batches = self.batches()
        methods = self.config.methods
        todo = [(b, m) for b, batch in enumerate(batches) for m in methods if any((m, i) not in done_results for i in batch)]
        layer_todo = self.config.layer_analysis and any(i not in done_layers for i in self.indices)
        built: Dict[str, Any] = {}
        bar = tqdm(total=len(todo), desc="compare", unit="method-batch", disable=not progress)
        by_batch: Dict[int, List[str]] = {}
        for b, m in todo:
            by_batch.setdefault(b, []).append(m)
        with package_forward(self.model, self.config.package_scan):
            for b, batch in enumerate(batches):
                need_layers = layer_todo and any(i not in done_layers for i in batch)
                if b not in by_batch and not need_layers and all(i in done_examples for i in batch):
                    continue
                ids, mask = self._encode(batch)
                target, explained = self._predict(ids, mask)
                rows = self._example_rows(batch, ids, mask, target, explained)
                self.examples.append([r for r in rows if r["index"] not in done_examples])
                for m in by_batch.get(b, []):
                    bar.set_postfix_str(m)
                    if m not in built:
                        built[m] = build_method(m, self.model, self.config.options)
                    missing = [i for i in batch if (m, i) not in done_results]
                    if len(missing) == len(batch):
                        self.results.append(self._evaluate(m, built[m], b, batch, ids, mask, target, explained))
                    else:  # a study grown from a smaller one: only what is missing
                        sub_ids, sub_mask = self._encode(missing)
                        self.results.append(
                            self._evaluate(m, built[m], b, missing, sub_ids, sub_mask, *self._predict(sub_ids, sub_mask))
                        )
                    bar.update(1)
                if need_layers:
                    rows = self._layer_rows(batch, ids, mask, target)
                    self.layers.append([r for r in rows if r["index"] not in done_layers])
        bar.close()
        return self.finalize(figures)

    @torch.no_grad()
    def _predict(self, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        scores = LastTokenScores(self.model)(ids, mask)
        target = scores.argmax(-1)
        return target, scores[torch.arange(len(target), device=scores.device), target]

    def _example_rows(self, batch, ids, mask, target, explained) -> List[dict]:
        rows = []
        for k, i in enumerate(batch):
            real = ids[k][mask[k].bool()].tolist()
            rows.append(
                {
                    "index": i,
                    "text": self.texts[i],
                    "tokens": self.tokenizer.convert_ids_to_tokens(real),
                    "label": None if self.labels is None else int(self.labels[i]),
                    "pred": int(target[k]),
                    "explained": float(explained[k]),
                }
            )
        return rows

    def _evaluate(self, name, method, b, batch, ids, mask, target, explained) -> List[dict]:
        torch.manual_seed(_method_seed(self.config.seed, b, name))
        with ForwardCounter(self.model) as counter:
            start, cpu = time.perf_counter(), time.process_time()
            relevance = method.attribute(ids, target, mask)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        generator = torch.Generator().manual_seed(self.config.seed + b)
        curves = perturbation_curves(self.model, ids, mask, relevance, target, self.config.perturbation, CURVES, generator)
        scores = flipping_scores(curves, self.config.perturbation)
        n = len(batch)
        rows = []
        for k, i in enumerate(batch):
            r = relevance[k][mask[k].bool()].double().cpu()
            rows.append(
                {
                    "method": name,
                    "index": i,
                    "batch": b,
                    "n_tokens": int(mask[k].sum()),
                    "label": None if self.labels is None else int(self.labels[i]),
                    "pred": int(target[k]),
                    "explained": float(explained[k]),
                    "relevance": [float(v) for v in r],
                    "relevance_sum": float(r.sum()),
                    "curves": {c: [float(v) for v in curves[c][k]] for c in curves},
                    **{key: float(v[k]) for key, v in scores.items()},
                    "seconds": seconds / n,
                    "cpu_seconds": cpu / n,
                    "forward_rows": counter.count.rows / n,
                    "forward_calls": counter.count.calls / n,
                }
            )
        return rows

    def _layer_rows(self, batch, ids, mask, target) -> List[dict]:
        lr = layer_relevance(self.model, ids, mask, target.tolist())
        rows = []
        for k, i in enumerate(batch):
            real = mask[k].bool()
            rows.append(
                {
                    "index": i,
                    "names": lr.names,
                    "explained": float(lr.explained[k]),
                    "relevance": [[float(v) for v in layer[k][real]] for layer in lr.relevance],
                }
            )
        return rows

    # ---- summarising ---------------------------------------------------------------------
    def finalize(self, figures: bool = True) -> dict:
        """Write ``per_example.csv``, ``summary.json``, ``summary.md`` and (optionally) the figures."""
        return summarize(self.out, self.config.methods, self.config.perturbation, self.meta, figures, self.indices)


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
    return METHODS[method].label if method in METHODS else method


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
    from . import plots

    meta = dict(meta or {})
    keep = None if indices is None else set(indices)
    examples = {
        r["index"]: r for r in _JsonLines(os.path.join(out_dir, "examples.jsonl")).read() if keep is None or r["index"] in keep
    }
    by_method = _by_method(_JsonLines(os.path.join(out_dir, "results.jsonl")).read(), methods, set(examples))
    _write_csv(os.path.join(out_dir, "per_example.csv"), by_method)
    table = {}
    for m, rs in by_method.items():
        table[m] = {
            "label": _label(m),
            "n": len(rs),
            **{k: mean_se([r.get(k, float("nan")) for r in rs]) for k in METRICS + COSTS},
        }
    paired = {}
    if REFERENCE in by_method:
        ref = {r["index"]: r for r in by_method[REFERENCE]}
        for m, rs in by_method.items():
            common = [r for r in rs if r["index"] in ref]
            paired[m] = {
                k: paired_difference([ref[r["index"]][k] for r in common], [r[k] for r in common]) for k in ("dAF", "dAI")
            }
    labels = [e["label"] for e in examples.values() if e.get("label") is not None]
    accuracy = float(np.mean([e["pred"] == e["label"] for e in examples.values()])) if labels else None
    conservation = {
        m: ConservationReport(
            _label(m), np.array([r["explained"] for r in by_method[m]]), np.array([r["relevance_sum"] for r in by_method[m]])
        )
        for m in ("mambalrp", "gxi")
        if m in by_method
    }
    profiles = {
        _label(m): distance_profile([np.array(r["relevance"]) for r in by_method[m]]) for m in PROFILE_METHODS if m in by_method
    }
    layer_rows = list(
        {r["index"]: r for r in _JsonLines(os.path.join(out_dir, "layers.jsonl")).read() if r["index"] in examples}.values()
    )
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
        summary["figures"] = _figures(out_dir, by_method, perturbation, conservation, profiles, layer_rows, table, plots)
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
    names = rows[0]["names"]
    sums = np.array([[sum(layer) for layer in r["relevance"]] for r in rows]).T
    explained = np.array([r["explained"] for r in rows])
    rel = np.abs(sums - explained[None]) / np.maximum(np.abs(explained[None]), 1e-12)
    return {
        "names": names,
        "median_rel_gap_per_layer": np.median(rel, axis=1).tolist(),
        "mean_sum_per_layer": sums.mean(1).tolist(),
        "mean_explained": float(explained.mean()),
    }


def _figures(out_dir, by_method, perturbation, conservation, profiles, layer_rows, table, plots) -> Dict[str, str]:
    figures: Dict[str, str] = {}
    if by_method:
        grid = perturbation.grid().numpy()
        order = sorted(by_method, key=lambda m: -table[m]["dAF"][0])
        curves = {_label(m): {c: np.mean([r["curves"][c] for r in by_method[m]], axis=0) for c in CURVES} for m in order}
        figures["curves"] = plots.plot_flipping_curves(
            curves, grid, os.path.join(out_dir, "flipping_curves.png"), highlight=(_label(REFERENCE),)
        )
        figures["scores"] = plots.plot_scores(
            {_label(m): table[m]["dAF"] for m in order}, os.path.join(out_dir, "scores_dAF.png")
        )
    if conservation:
        figures["conservation"] = plots.plot_conservation(
            {r.method: r for r in conservation.values()}, os.path.join(out_dir, "conservation.png")
        )
    if profiles:
        figures["distance"] = plots.plot_profiles(
            profiles,
            os.path.join(out_dir, "distance_profile.png"),
            "Relevance against distance from the explained token",
            max_distance=40,
        )
    if layer_rows:
        names = layer_rows[0]["names"]
        per_layer = {n.replace("backbone.", ""): [np.array(r["relevance"][k]) for r in layer_rows] for k, n in enumerate(names)}
        figures["layers"] = plots.plot_profiles(
            layer_profiles(per_layer),
            os.path.join(out_dir, "layer_profile.png"),
            "MambaLRP relevance at each layer against distance",
            max_distance=40,
        )
        sums = np.array([[sum(layer) for layer in r["relevance"]] for r in layer_rows]).T
        figures["layer_sums"] = plots.plot_layer_sums(
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
            str(table[m]["n"]),
            *(fmt(*table[m][k]) for k in METRICS),
            fmt(*paired[m]["dAF"]) if m in paired else "n/a",
            f"{table[m]['seconds'][0] * 1000:.1f}",
            f"{table[m]['cpu_seconds'][0] * 1000:.1f}",
            f"{table[m]['forward_rows'][0]:.1f}",
        ]
        for m in order
    ]
    lines.append(
        markdown_table(
            [
                "method",
                "n",
                "ΔA^F",
                "A(MoRF)",
                "A(LeRF)",
                "ΔA^I",
                "A_ins(MoRF)",
                "A_ins(LeRF)",
                "ΔA^F of MambaLRP minus this",
                "ms / example",
                "CPU ms / example",
                "forwards / example",
            ],
            rows,
        )
    )
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
        "ΔA^F = A(LeRF) − A(MoRF) and ΔA^I = A_ins(MoRF) − A_ins(LeRF): higher is better. The paired "
        "column is the mean over the same examples of MambaLRP's ΔA^F minus the method's (± SE). Cost: wall-clock "
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
        rows = [
            [n, f"{s:.4f}", f"{g:.4g}"]
            for n, s, g in zip(lay["names"], lay["mean_sum_per_layer"], lay["median_rel_gap_per_layer"])
        ]
        lines += [
            "## Relevance per layer (MambaLRP)",
            "",
            markdown_table(["layer", "mean ΣR", "median relative gap to the logit"], rows),
            "",
        ]
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in summary.get("figures", {}).items()]
    if summary.get("figures_skipped"):
        lines.append(f"No figures: {summary['figures_skipped']}.")
    lines.append("")
    return "\n".join(lines)
