"""A comparative attribution study, end to end and resumable.

For every batch of examples: one forward gives the explained class (the prediction at the
last real token) and its logit; every method then attributes it (timed, forward passes
counted), and the flipping curves are taken. Each (method, batch) is appended to
``results.jsonl`` as soon as it is done, so an interrupted study resumes where it stopped.
:meth:`Study.finalize` turns the records into ``per_example.csv``, ``summary.json``,
``summary.md`` (mean ± standard error per method and metric) and PNG figures
(:mod:`.summary`). Constructing a :class:`Study` only reads: files are written, or
discarded with ``overwrite``, by :meth:`Study.run`.

    study = Study(model, tokenizer, texts, labels, StudyConfig(methods=resolve_methods("all")), "out/")
    summary = study.run()
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..attribution.mamba_lrp import MambaLRP
from ..rules.base import ATTENTION
from .analysis import layer_relevance
from .distributed import Shard, barrier, fail_point, init_from_env, launched, progress_path, read_count, wait_for_all, write_count
from .methods import MethodOptions, build_method, reference_of, resolve_methods
from .perturbation import CURVES, Perturbation, flipping_scores, perturbation_curves
from .records import RunFolder, ShardedLines
from .scores import ForwardCounter, LastTokenScores, package_forward
from .summary import summarize

#: :class:`MethodOptions` fields that batch a computation without changing its numbers
BATCHING_ONLY = ("perturbations_per_eval", "ig_internal_batch_size", "smoothgrad_samples_per_pass", "chunk_channels")


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
        the examples are a prefix of one seeded permutation; the options that only batch the
        same computation, :data:`BATCHING_ONLY`, may change, e.g. lowered after running out of
        memory)."""
        out = asdict(self)
        out.pop("methods")
        out.pop("n_examples")
        for key in BATCHING_ONLY:
            out["options"].pop(key, None)
        return out


def select_examples(n_total: int, n: Optional[int], seed: int) -> List[int]:
    """The first ``n`` indices of a seeded permutation of ``range(n_total)`` (all for ``None``)."""
    order = np.random.default_rng(seed).permutation(n_total).tolist()
    return order if n is None else order[: min(n, n_total)]


def _host(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The tensors on the CPU, detached (one copy each)."""
    return tuple(t.detach().cpu() for t in tensors)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _method_seed(seed: int, batch: int, method: str) -> int:
    return (seed * 1_000_003 + batch * 10_007 + zlib.crc32(method.encode())) % (2**31)


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
        self.model = model  # run in eval mode by run(); the user's modes come back afterwards
        self.tokenizer = tokenizer
        self.texts, self.labels = list(texts), None if labels is None else list(labels)
        self.config = config
        self.config.methods = resolve_methods(config.methods)
        self.out = out_dir
        self.meta = dict(meta or {})
        self.device = next(model.parameters()).device
        self.shard = Shard()
        self._open_records()
        self.overwrite = overwrite
        self._saved_methods = self._check_config()
        self.indices = select_examples(len(self.texts), config.n_examples, config.seed)
        self._attention: Optional[bool] = None  # whether the model has attention layers (see _has_attention)

    # ---- set-up and resuming -------------------------------------------------------------
    def _open_records(self) -> None:
        suffix = self.shard.suffix()
        self.results = ShardedLines(self.out, "results", suffix)
        self.examples = ShardedLines(self.out, "examples", suffix)
        self.layers = ShardedLines(self.out, "layers", suffix)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the summary: always, except on ranks other than 0 of a
        sharded run (``torchrun``)."""
        if self.shard.world > 1:
            return self.shard.is_main
        return not launched() or int(os.environ.get("RANK", "0")) == 0

    @property
    def config_path(self) -> str:
        return self.folder.config_path

    def _check_config(self) -> List[str]:
        """The methods of the study already in the folder (none for a fresh one).

        Raises:
            ValueError: the folder holds a study with other settings and ``overwrite`` is off.
        """
        identity = {**self.config.identity(), "n_texts": len(self.texts)}
        self.folder = RunFolder(self.out, identity, "study", self.overwrite)
        return list(self.folder.saved.get("methods", []))

    def prepare(self) -> None:
        """Create the folder and write ``config.json``. A fresh study (no ``config.json`` yet, or
        ``overwrite``) first discards records left there; only once: a later :meth:`run` of
        this object resumes. Under torchrun only rank 0 writes; :meth:`run` makes the other ranks wait
        for it (a barrier) before they write their progress counters."""
        if not self.shard.is_main:
            self.folder.fresh = False
            return
        stale = [os.path.basename(p) for records in (self.results, self.examples, self.layers) for p in records.paths()]
        if os.path.isdir(self.out):
            stale += [n for n in os.listdir(self.out) if n.startswith("progress.rank")]
        methods = self._saved_methods + [m for m in self.config.methods if m not in self._saved_methods]
        batching = {key: getattr(self.config.options, key) for key in BATCHING_ONLY}  # this run's, on record
        self.folder.prepare(stale, {"methods": methods, "meta": self.meta, "batching": batching})

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
        """Compute what is missing, then :meth:`finalize`; returns the summary.

        Under ``torchrun`` (several processes) each rank computes its share of the batches
        (:mod:`.distributed`) and rank 0 writes the summary, the same as one process would;
        every rank returns it. The model runs in eval mode (no dropout: every method sees the
        same function); each module's train/eval mode is restored afterwards.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            return self._run(progress, figures)
        finally:
            for module, training in modes:
                module.training = training

    def _run(self, progress: bool, figures: bool) -> dict:
        from tqdm.auto import tqdm

        self.shard = init_from_env(self.device)
        self._open_records()
        self.prepare()
        barrier(self.shard)  # rank 0 has discarded a fresh study's stale files (progress counters too) before any rank writes
        if self.shard.world > 1:  # this run's count starts at zero (a file may remain from a run that died)
            os.makedirs(self.out, exist_ok=True)
            write_count(progress_path(self.out, self.shard), 0)
        barrier(self.shard)
        done_results = {(r["method"], r["index"]) for r in self.results.read()}
        done_examples = {r["index"] for r in self.examples.read()}
        done_layers = {r["index"] for r in self.layers.read()}
        batches = self.batches()
        methods = self.config.methods
        mine = set(self.shard.take(list(range(len(batches)))))
        todo = [(b, m) for b, batch in enumerate(batches) for m in methods if any((m, i) not in done_results for i in batch)]
        total = sum(1 for b, m in todo for i in batches[b] if (m, i) not in done_results)  # (method, example) pairs, all ranks
        todo = [(b, m) for b, m in todo if b in mine]
        layer_todo = self.config.layer_analysis and any(i not in done_layers for i in self.indices)
        built: Dict[str, Any] = {}
        show = progress and self.shard.is_main
        bar = tqdm(total=total, desc="compare", unit="result", disable=not show)
        counter = progress_path(self.out, self.shard)
        count, items = 0, 0

        def poll() -> None:  # rank 0: every rank's finished (method, example) pairs
            if show and self.shard.world > 1:
                paths = [progress_path(self.out, self.shard, r) for r in range(self.shard.world)]
                n = sum(read_count(p) for p in paths)
                bar.update(n - bar.n)

        by_batch: Dict[int, List[str]] = {}
        for b, m in todo:
            by_batch.setdefault(b, []).append(m)
        # this rank's batches in a seeded random order (the numbers do not depend on it): a run
        # stopped early (a time limit) holds examples of every length, not the shortest ones
        order = sorted(mine)
        random.Random(self.config.seed).shuffle(order)
        with package_forward(self.model, self.config.package_scan):
            for b in order:
                batch = batches[b]
                need_layers = layer_todo and any(i not in done_layers for i in batch)
                if b not in by_batch and not need_layers and all(i in done_examples for i in batch):
                    continue
                ids, mask = self._encode(batch)
                target, explained = self._predict(ids, mask)
                rows = self._example_rows(batch, ids, mask, target, explained)
                self.examples.append([r for r in rows if r["index"] not in done_examples])
                for m in by_batch.get(b, []):
                    bar.set_postfix_str(m, refresh=False)
                    if m not in built:
                        built[m] = build_method(m, self.model, self.config.options)
                    missing = [i for i in batch if (m, i) not in done_results]
                    if len(missing) == len(batch):
                        self.results.append(self._evaluate_fitting(m, built[m], b, batch, ids, mask, target, explained))
                    else:  # a study grown from a smaller one: only what is missing
                        sub_ids, sub_mask = self._encode(missing)
                        self.results.append(
                            self._evaluate_fitting(m, built[m], b, missing, sub_ids, sub_mask, *self._predict(sub_ids, sub_mask))
                        )
                    count, items = count + len(missing), items + 1
                    if self.shard.world > 1:
                        write_count(counter, count)
                        poll()
                    else:
                        bar.update(len(missing))
                    fail_point(self.shard, items)
                if need_layers:
                    rows = self._layer_rows(batch, ids, mask, target)
                    self.layers.append([r for r in rows if r["index"] not in done_layers])
        wait_for_all(self.shard, poll)
        bar.close()
        if self.shard.is_main:
            summary = self.finalize(figures)
        barrier(self.shard)
        if not self.shard.is_main:
            with open(os.path.join(self.out, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
        return summary

    @torch.no_grad()
    def _predict(self, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        scores = LastTokenScores(self.model)(ids, mask)
        target = scores.argmax(-1)
        return target, scores[torch.arange(len(target), device=scores.device), target]

    def _example_rows(self, batch, ids, mask, target, explained) -> List[dict]:
        ids, mask, target, explained = _host(ids, mask, target, explained)  # one copy, not one sync per value
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

    def reference_text(self, name: str) -> str:
        """``"token:ID"`` with the token's text (``"token:0 [PAD]"``); other references as they are."""
        kind, _, tid = name.partition(":")
        if kind != "token" or not tid.isdigit():
            return name
        try:
            return f"{name} {self.tokenizer.convert_ids_to_tokens(int(tid))}"
        except Exception:  # a tokenizer without that id or method: the id alone
            return name

    def _evaluate_fitting(self, name, method, b, batch, ids, mask, target, explained) -> List[dict]:
        """:meth:`_evaluate`, and on running out of device memory the same in two halves of the
        batch (recursively, down to one example): a long GPU study then loses speed, not its
        run. Each half is seeded as the batch was, so random methods (SmoothGrad's noise,
        KernelShap's coalitions, Random) draw other samples than one batch would."""
        try:
            return self._evaluate(name, method, b, batch, ids, mask, target, explained)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        warnings.warn(
            f"{name}: out of device memory on {len(batch)} examples; running them in halves "
            "(lower --batch-size, --ig-internal-batch or --smoothgrad-per-pass to avoid it)",
            ResourceWarning,
            stacklevel=2,
        )
        parts = (slice(0, half), slice(half, len(batch)))
        return [
            row
            for part in parts
            for row in self._evaluate_fitting(name, method, b, batch[part], ids[part], mask[part], target[part], explained[part])
        ]

    def _evaluate(self, name, method, b, batch, ids, mask, target, explained) -> List[dict]:
        torch.manual_seed(_method_seed(self.config.seed, b, name))
        with ForwardCounter(self.model) as counter:
            _synchronize(ids.device)
            start, cpu = time.perf_counter(), time.process_time()
            relevance = method.attribute(ids, target, mask)
            _synchronize(ids.device)  # the time of the work, not of queueing it
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        generator = torch.Generator().manual_seed(self.config.seed + b)
        curves = perturbation_curves(self.model, ids, mask, relevance, target, self.config.perturbation, CURVES, generator)
        scores = flipping_scores(curves, self.config.perturbation)
        # everything read below comes to the host at once (per value it would be one device sync each)
        relevance, mask, target, explained = _host(relevance.detach().double(), mask, target, explained)
        curves = dict(zip(curves, _host(*curves.values())))
        scores = dict(zip(scores, _host(*scores.values())))
        n = len(batch)
        rows = []
        for k, i in enumerate(batch):
            r = relevance[k][mask[k].bool()]
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
                    "reference": self.reference_text(reference_of(method)),
                }
            )
        return rows

    def _has_attention(self) -> bool:
        """Whether the model has attention layers (a dry rule installation, once per study)."""
        if self._attention is None:
            lrp = MambaLRP(self.model)
            lrp.rule_table()
            installed = lrp.last_installation
            self._attention = installed is not None and any(c.kind == ATTENTION for c in installed.components)
        return self._attention

    def _layer_rows(self, batch, ids, mask, target) -> List[dict]:
        """MambaLRP's relevance at the embedding and after every block; with ``mambalrp_cp``
        among the methods and attention layers in the model also CP-LRP's (``relevance_cp``),
        whose attention layers conserve (without attention layers CP-LRP is MambaLRP)."""
        lr = layer_relevance(self.model, ids, mask, target.tolist())
        cp = None
        if "mambalrp_cp" in self.config.methods and self._has_attention():
            cp = _host(*layer_relevance(self.model, ids, mask, target.tolist(), "conservative").relevance)
        explained, mask = _host(lr.explained, mask)
        layers = _host(*lr.relevance)
        rows = []
        for k, i in enumerate(batch):
            real = mask[k].bool()
            row = {
                "index": i,
                "names": lr.names,
                "explained": float(explained[k]),
                "relevance": [[float(v) for v in layer[k][real]] for layer in layers],
            }
            if cp is not None:
                row["relevance_cp"] = [[float(v) for v in layer[k][real]] for layer in cp]
            rows.append(row)
        return rows

    # ---- summarising ---------------------------------------------------------------------
    def finalize(self, figures: bool = True) -> dict:
        """Write ``per_example.csv``, ``summary.json``, ``summary.md`` and (optionally) the figures."""
        return summarize(self.out, self.config.methods, self.config.perturbation, self.meta, figures, self.indices)
