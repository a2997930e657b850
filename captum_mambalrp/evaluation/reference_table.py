"""The reference x replacement table: every method that has a reference is run with each
reference (zero embedding, mean embedding, tokens such as ``[UNK]`` and ``[PAD]``) and judged
under each replacement of the flipping curves, so that each method is also judged against the
perturbation that matches its own reference ("matched").

One :class:`~.study.Study` per replacement, in ``OUT/replacement-<kind>/`` (each resumable, and
sharded like any study under ``torchrun``); methods without a reference run once per study, a
method with one as the variants ``name@ref`` (:func:`~.methods.resolve_methods`).
:func:`write_reference_table` reads the studies' summaries and writes
``reference_table.json`` and ``reference_table.md``.

    >>> expand_methods(["mambalrp", "integrated_gradients"], ["zero", "mean"])
    ['mambalrp', 'integrated_gradients@zero', 'integrated_gradients@mean']
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from .base import Reference
from .distributed import barrier
from .methods import METHODS, method_label, resolve_methods, split_variant
from .perturbation import REPLACEMENTS, Perturbation
from .stats import fmt, markdown_table
from .study import Study, StudyConfig
from .summary import REFERENCE

SCORE_LABELS = {"dAF": "ΔA^F", "AOPC": "AOPC", "ABPC": "ABPC", "dAI": "ΔA^I"}


def expand_methods(methods: Sequence[str], references: Sequence[str]) -> List[str]:
    """``methods`` with each method that has a reference replaced by its ``name@ref`` variants.

    Returns:
        Method keys, each once.
    """
    out: List[str] = []
    for key in resolve_methods(list(methods)):
        name, ref = split_variant(key)
        variants = [key] if ref is not None or METHODS[name].reference is None else [f"{name}@{r}" for r in references]
        out += [v for v in variants if v not in out]
    return out


def default_references(tokenizer: Any) -> List[str]:
    """``zero``, ``mean`` and the tokenizer's unknown and padding tokens (``token:ID``), each once."""
    refs = ["zero", "mean"]
    for attr in ("unk_token_id", "pad_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int) and f"token:{tid}" not in refs:
            refs.append(f"token:{tid}")
    return refs


def study_folder(out_dir: str, replacement: str) -> str:
    """Where the study of one replacement lives."""
    return os.path.join(out_dir, f"replacement-{replacement}")


def run_reference_table(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Optional[Sequence[int]],
    config: StudyConfig,
    out_dir: str,
    references: Optional[Sequence[str]] = None,
    replacements: Sequence[str] = REPLACEMENTS,
    meta: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    progress: bool = True,
    figures: bool = True,
) -> dict:
    """Run the study once per replacement with every reference, then :func:`write_reference_table`.

    ``config.perturbation`` gives the fraction per step and the replacement token (for
    ``"token"``); its replacement kind is set per study.

    Returns:
        The table (as written to ``reference_table.json``).

    Raises:
        ValueError: an unknown reference or replacement.
    """
    references = list(references or default_references(tokenizer))
    for r in references:
        Reference.parse(r)
    unknown = [r for r in replacements if r not in REPLACEMENTS]
    if unknown:
        raise ValueError(f"unknown replacements {unknown}; choose among {REPLACEMENTS}")
    methods = expand_methods(config.methods, references)
    study = None
    for kind in replacements:
        sub = replace(config, methods=list(methods), perturbation=replace(config.perturbation, replacement=kind))
        sub_meta = {**(meta or {}), "reference table": f"replacement {kind}, references {', '.join(references)}"}
        study = Study(model, tokenizer, texts, labels, sub, study_folder(out_dir, kind), meta=sub_meta, overwrite=overwrite)
        study.run(progress=progress, figures=figures)
    if study is not None and not study.is_main:  # a rank of a sharded run: rank 0 writes the table
        barrier(study.shard)
        with open(os.path.join(out_dir, "reference_table.json"), encoding="utf-8") as f:
            return json.load(f)
    table = write_reference_table(out_dir, replacements, references, config.perturbation)
    if study is not None:
        barrier(study.shard)
    return table


def matched_reference(replacement: str, perturbation: Perturbation) -> str:
    """The reference that matches a replacement (``token`` -> ``token:ID`` of the replacement token)."""
    return replace(perturbation, replacement=replacement).as_reference().name


def write_reference_table(
    out_dir: str, replacements: Sequence[str], references: Sequence[str], perturbation: Perturbation
) -> dict:
    """``reference_table.json`` and ``.md`` from the studies' ``summary.json`` files.

    Returns:
        ``{"replacements", "references", "matched", "rows": {method key: {replacement: {score: [mean, se],
        "paired": {score: [mean, se]}}}}}``.
    """
    summaries = {}
    for kind in replacements:
        with open(os.path.join(study_folder(out_dir, kind), "summary.json"), encoding="utf-8") as f:
            summaries[kind] = json.load(f)
    matched = {kind: matched_reference(kind, perturbation) for kind in replacements}
    rows: Dict[str, Dict[str, Any]] = {}
    for kind, summary in summaries.items():
        for m, row in summary["methods"].items():
            paired = summary.get("paired_vs_mambalrp", {}).get(m, {})
            rows.setdefault(m, {})[kind] = {
                **{k: row[k] for k in SCORE_LABELS if k in row},
                "n": row["n"],
                "seconds": row["seconds"],
                "paired": paired,
            }
    table = {"replacements": list(replacements), "references": list(references), "matched": matched, "rows": rows}
    with open(os.path.join(out_dir, "reference_table.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out_dir, "reference_table.md"), "w", encoding="utf-8") as f:
        f.write(reference_table_markdown(table))
    return table


def _fmt2(pair: Sequence[float]) -> str:
    return fmt(pair[0], pair[1], digits=2)


def _matched_rows(table: dict, kind: str) -> Dict[str, dict]:
    """Per method (variants folded): its row under ``kind`` with the reference that matches ``kind``."""
    out = {}
    for key, per_kind in table["rows"].items():
        name, ref = split_variant(key)
        if kind in per_kind and (ref is None or ref == table["matched"][kind]):
            out[name] = per_kind[kind]
    return out


def reference_table_markdown(table: dict) -> str:
    """The two tables: every method with matched references per replacement (ΔA^F, rank, paired
    difference; AOPC and ABPC), then every reference of every method under every replacement."""
    kinds = table["replacements"]
    lines = ["# Matched references: reference x replacement", ""]
    lines.append(
        "Matched: a method with a reference uses the one that equals the replacement ("
        + ", ".join(f"{k}: {table['matched'][k]}" for k in kinds)
        + "). Mean ± SE over examples; rank by ΔA^F among the methods; MambaLRP − method paired over the same "
        "examples (positive: MambaLRP better)."
    )
    lines.append("")
    per_kind = {k: _matched_rows(table, k) for k in kinds}
    names = list(dict.fromkeys(n for k in kinds for n in per_kind[k]))
    ranks = {k: {n: i + 1 for i, n in enumerate(sorted(per_kind[k], key=lambda n: -per_kind[k][n]["dAF"][0]))} for k in kinds}
    first = kinds[0]
    names.sort(key=lambda n: ranks[first].get(n, len(names) + 1))
    header = ["method"]
    for k in kinds:
        header += [f"{k}: ΔA^F (rank)", f"{k}: MambaLRP − method"]
    rows = []
    for n in names:
        row = [method_label(n)]
        for k in kinds:
            r = per_kind[k].get(n)
            if r is None:
                row += ["n/a", "n/a"]
                continue
            row.append(f"{_fmt2(r['dAF'])} ({ranks[k][n]})")
            row.append("0" if n == REFERENCE else _fmt2(r["paired"].get("dAF", [float("nan")] * 2)))
        rows.append(row)
    lines += [markdown_table(header, rows), ""]
    for score in ("AOPC", "ABPC"):
        lines += [f"### {score}, matched references (mean ± SE; MambaLRP − method paired)", ""]
        rows = []
        for n in names:
            row = [method_label(n)]
            for k in kinds:
                r = per_kind[k].get(n)
                if r is None or score not in r:
                    row += ["n/a", "n/a"]
                    continue
                row.append(_fmt2(r[score]))
                row.append("0" if n == REFERENCE else _fmt2(r["paired"].get(score, [float("nan")] * 2)))
            rows.append(row)
        lines += [markdown_table(["method"] + [f"{k}{s}" for k in kinds for s in ("", ": paired")], rows), ""]
    lines += ["## Every reference under every replacement (ΔA^F ± SE; * = matched)", ""]
    header = ["method", "reference"] + [f"replacement {k}" for k in kinds]
    rows = []
    for key, per in table["rows"].items():
        name, ref = split_variant(key)
        if ref is None:
            continue
        cells = [_fmt2(per[k]["dAF"]) + (" *" if table["matched"][k] == ref else "") if k in per else "n/a" for k in kinds]
        rows.append([method_label(name), ref, *cells])
    lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)
