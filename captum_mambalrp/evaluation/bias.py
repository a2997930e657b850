r"""Bias discovery: which words drive each class across a data set, whether that is more
than chance, and whether the model's behaviour backs it.

The paper (Jafari et al., NeurIPS 2024, use cases) uses MambaLRP to uncover biases: relevance
aggregated over a whole data set shows which tokens (and which groups of tokens, such as
gendered words) a model relies on for each class. :class:`BiasStudy` does that in four steps.

1. **Explain** every example with MambaLRP (batched, resumable): the explained class ``c``
   of an example is its *predicted* class (``explain="pred"``, the default: the model's own
   reasons for what it does) or its *gold label* (``explain="label"``: what speaks for the
   right answer, wrong predictions included).
2. **Aggregate** per unit: a unit is a word (``unit="word"``; subword pieces merged by
   :func:`captum_mambalrp.visualization.words.word_groups`, a word's relevance the **sum** of
   its pieces', so the total is kept) or a token (``unit="token"``). Words are compared
   lower-cased with punctuation stripped at both ends (:func:`normalize_word`). For a unit
   ``w`` and an example ``e``, ``R_w(e)`` is the sum of the relevance of ``w``'s occurrences
   in ``e``. Per class ``c`` (``E_c``: the examples explained as ``c``, ``n_c = |E_c|``):

   - frequency ``N_wc``: examples of ``E_c`` that contain ``w`` (and ``occurrences``);
   - mean relevance ``m_wc = (1/N_wc) sum_{e in E_c, w in e} R_w(e)`` (with its standard error);
   - contribution ``S_wc / n_c`` with ``S_wc = sum_{e in E_c} R_w(e)``: what ``w`` adds to
     the class's logit on an average example of the class.

   The ranked table of a class lists the units with ``N_wc >= min_freq`` by ``m_wc``
   (highest first: the units that most drive the class; lowest: the units that speak most
   against it); the tokenizer's special tokens (``[UNK]``, ``[PAD]``, ...) are left out. A
   user-given **group** of words (``"he,his,him,himself"``) is a unit of its own whose
   ``R_g(e)`` sums all its words in ``e``.
3. **Significance** by a permutation test over examples. The null hypothesis: a unit's
   relevance does not depend on the class, i.e. the class labels are exchangeable between
   examples. The statistic is ``S_wc`` (equivalently the contribution): the sum of ``w``'s
   relevance over the ``n_c`` examples of class ``c``; under the null, ``E_c`` is a random set
   of ``n_c`` examples. With ``K`` seeded permutations of the class labels,
   ``p = (1 + #{k: S_wc^(k) >= S_wc}) / (1 + K)`` (one-sided: "``w`` drives ``c``"; large when
   ``w`` is frequent in ``c`` *and* relevant there). The smallest attainable p is
   ``1 / (1 + K)``. Every unit-class pair of the ranked tables is a test; ``q`` is the
   Benjamini-Hochberg adjusted p over all of them (control of the false discovery rate);
   groups form a family of their own. Read ``q < alpha`` as "significant"; for a
   Bonferroni bound compare ``p`` with ``alpha / n_tests`` (reported), which needs
   ``K >= n_tests / alpha``.
4. **Counterfactual** for two aligned groups (word ``i`` of one <-> word ``i`` of the other):
   every text with a word of either group has them swapped (whole words, case kept), and the
   model is run again: the change of the explained class's logit and the fraction of
   predictions that flip say whether the relevance finding matters for the model's behaviour.

    from captum_mambalrp.evaluation.bias import BiasConfig, BiasStudy
    config = BiasConfig(groups=["he,his,him,himself", "she,her,her,herself"])
    report = BiasStudy(model, tokenizer, texts, labels, config, "out/").run()
    report["classes"]["joy"]["top"][0]["unit"]     # the word that most drives "joy"
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .records import JsonLines, RunFolder
from .scores import LastTokenScores, package_forward
from .stats import markdown_table, mean_se
from .study import select_examples

EXPLAIN = ("pred", "label")
UNITS = ("word", "token")
_MARKERS = ("Ġ", "▁", "##", "Ċ")
_SPECIAL = re.compile(r"^(<[^<>\s]+>|\[[A-Za-z_]+\]|<\|[^|]+\|>)$")


# ---- words and groups ----------------------------------------------------------------------
def normalize_word(word: str) -> str:
    """How units are compared: lower-cased, subword markers (``Ġ``, ``▁``, ``##``) and
    punctuation stripped at both ends (a unit of punctuation only, and a special token such
    as ``[UNK]``, is kept as it is).

    >>> normalize_word("Happy!"), normalize_word("Ġhe"), normalize_word("..."), normalize_word("[UNK]")
    ('happy', 'he', '...', '[UNK]')
    """
    if _SPECIAL.match(word):
        return word
    w = word
    for m in _MARKERS:
        if w.startswith(m):
            w = w[len(m) :]
    w = w.lower()
    stripped = w.strip(string.punctuation + "“”‘’«»")
    return stripped or w or word


@dataclass
class TokenGroup:
    """A named group of words (compared with :func:`normalize_word`)."""

    name: str
    words: List[str]


def parse_group(spec: Union[str, TokenGroup]) -> TokenGroup:
    """A group from ``"w1,w2,..."`` (named by its words) or ``"name:w1,w2,..."``.

    Returns:
        the :class:`TokenGroup`.

    Raises:
        ValueError: no word in the group.

    >>> parse_group("male:he,his , him")
    TokenGroup(name='male', words=['he', 'his', 'him'])
    """
    if isinstance(spec, TokenGroup):
        return spec
    name, sep, rest = spec.partition(":")
    body = rest if sep else spec
    words = [normalize_word(w.strip()) for w in body.split(",") if w.strip()]
    if not words:
        raise ValueError(f"group {spec!r} has no words; write it as 'w1,w2,...' or 'name:w1,w2,...'")
    return TokenGroup(name.strip() if sep and name.strip() else ",".join(words), words)


def swap_map(a: TokenGroup, b: TokenGroup) -> Dict[str, str]:
    """Word ``i`` of ``a`` <-> word ``i`` of ``b`` (a word listed twice maps as it first appears).

    Raises:
        ValueError: the groups differ in length (they must be aligned lists).

    >>> swap_map(TokenGroup("m", ["he", "him"]), TokenGroup("f", ["she", "her"]))
    {'he': 'she', 'him': 'her', 'she': 'he', 'her': 'him'}
    """
    if len(a.words) != len(b.words):
        raise ValueError(
            f"groups {a.name!r} ({len(a.words)} words) and {b.name!r} ({len(b.words)} words) cannot be swapped: "
            "give aligned lists of the same length (word i of one <-> word i of the other)"
        )
    mapping: Dict[str, str] = {}
    for x, y in zip(a.words, b.words):
        mapping.setdefault(x, y)
    for x, y in zip(a.words, b.words):
        mapping.setdefault(y, x)
    return mapping


def swap_words(text: str, mapping: Dict[str, str]) -> Tuple[str, int]:
    """``text`` with every whole word of ``mapping`` replaced (case-insensitive; an upper-case
    or capitalised word stays so). Returns the new text and the number of words swapped.

    >>> swap_words("He said his dog likes her.", {"he": "she", "his": "her", "she": "he", "her": "his"})
    ('She said her dog likes his.', 3)
    """
    if not mapping:
        return text, 0
    keys = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w'])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w'])", re.IGNORECASE)
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        word = m.group(0)
        new = mapping[word.lower()]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new[:1].upper() + new[1:] if word[:1].isupper() else new

    return pattern.sub(repl, text), count


def unit_relevance(tokens: Sequence[str], relevance: Sequence[float], unit: str = "word") -> Tuple[List[str], List[float]]:
    """The units of one example and their relevance: words (subword pieces summed, see
    :func:`~captum_mambalrp.visualization.words.word_groups`) or tokens, named by
    :func:`normalize_word`.

    Raises:
        ValueError: an unknown ``unit`` or lengths that differ.

    >>> unit_relevance(["Ġthe", "Ġun", "happy", "Ġday"], [0.5, 1.0, 2.0, -0.5])
    (['the', 'unhappy', 'day'], [0.5, 3.0, -0.5])
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    if len(tokens) != len(relevance):
        raise ValueError(f"{len(tokens)} tokens but {len(relevance)} relevance values")
    if unit == "token":
        return [normalize_word(t) for t in tokens], [float(v) for v in relevance]
    from ..visualization.words import word_groups

    values = np.asarray(relevance, dtype=np.float64)
    groups = word_groups(list(tokens))
    return [normalize_word(w) for w, _ in groups], [float(values[index].sum()) for _, index in groups]


# ---- statistics ------------------------------------------------------------------------------
def benjamini_hochberg(pvalues: Union[Sequence[float], np.ndarray]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the order given.

    >>> benjamini_hochberg([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.04, 0.04]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    return out


@dataclass
class UnitStats:
    """Per unit ``w`` and class ``c`` (arrays ``[W, C]``): ``sums`` ``S_wc``, ``squares`` (sum of
    ``R_w(e)^2``), ``examples`` ``N_wc``, ``occurrences``; ``class_sizes`` ``n_c`` ``[C]``."""

    units: List[str]
    sums: np.ndarray
    squares: np.ndarray
    examples: np.ndarray
    occurrences: np.ndarray
    class_sizes: np.ndarray

    def mean(self) -> np.ndarray:
        """``m_wc``: mean relevance over the class's examples that contain the unit (nan if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.examples

    def se(self) -> np.ndarray:
        """Standard error of :meth:`mean` (nan for fewer than two examples)."""
        n = self.examples
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.maximum(self.squares - self.sums**2 / n, 0.0) / (n - 1)
            return np.where(n > 1, np.sqrt(var / n), np.nan)

    def contribution(self) -> np.ndarray:
        """``S_wc / n_c``: the unit's relevance per example of the class."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.class_sizes[None]


@dataclass
class Pairs:
    """Sparse (unit, example) pairs: ``R_w(e)`` and the occurrence count."""

    unit: np.ndarray
    example: np.ndarray
    value: np.ndarray
    count: np.ndarray


def unit_pairs(
    records: Sequence[dict], groups: Sequence[TokenGroup] = (), exclude: Collection[str] = ()
) -> Tuple[List[str], Pairs, Pairs]:
    """The units of ``records`` (each with ``units`` and ``relevance``) and their (unit, example)
    pairs, but for the units in ``exclude``; then the pairs of the ``groups`` (unit ``k`` = group ``k``)."""
    index: Dict[str, int] = {}
    u, e, v, n = [], [], [], []
    gu, ge, gv, gn = [], [], [], []
    lookup = [set(g.words) for g in groups]
    for k, r in enumerate(records):
        per: Dict[str, List[float]] = {}
        for name, rel in zip(r["units"], r["relevance"]):
            per.setdefault(name, []).append(rel)
        for name, rels in per.items():
            if name in exclude:
                continue
            u.append(index.setdefault(name, len(index)))
            e.append(k)
            v.append(sum(rels))
            n.append(len(rels))
        for g, words in enumerate(lookup):
            rels = [x for name, xs in per.items() if name in words for x in xs]
            if rels:
                gu.append(g)
                ge.append(k)
                gv.append(sum(rels))
                gn.append(len(rels))

    def pack(a, b, c, d) -> Pairs:
        return Pairs(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), np.asarray(c, dtype=np.float64), np.asarray(d))

    return list(index), pack(u, e, v, n), pack(gu, ge, gv, gn)


def unit_stats(units: List[str], pairs: Pairs, classes: np.ndarray, n_classes: int) -> UnitStats:
    """:class:`UnitStats` of ``pairs`` with ``classes[e]`` the explained class of example ``e``."""
    size = len(units) * n_classes
    key = pairs.unit * n_classes + classes[pairs.example]

    def count(weights):
        return np.bincount(key, weights=weights, minlength=size).reshape(len(units), n_classes)

    return UnitStats(
        units,
        count(pairs.value),
        count(pairs.value**2),
        count(None).astype(np.int64),
        count(pairs.count.astype(np.float64)).astype(np.int64),
        np.bincount(classes, minlength=n_classes),
    )


def permutation_pvalues(
    pairs: Pairs,
    classes: np.ndarray,
    n_units: int,
    n_classes: int,
    tested: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    chunk: int = 50,
) -> np.ndarray:
    """One-sided permutation p-values of ``S_wc`` (the unit's relevance summed over the class's
    examples) under exchangeable class labels; nan where ``tested[w, c]`` is false.

    ``p = (1 + #{k: S^(k) >= S}) / (1 + n_permutations)``, the class labels of all examples
    permuted together (``numpy.random.default_rng(seed)``), so the tests share permutations.

    Returns:
        ``[n_units, n_classes]`` p-values.

    Raises:
        ValueError: ``n_permutations < 1``.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1; got {n_permutations}")
    p = np.full((n_units, n_classes), np.nan)
    units = np.flatnonzero(tested.any(1))
    if len(units) == 0:
        return p
    keep = np.isin(pairs.unit, units)
    remap = np.full(n_units, -1, dtype=np.int64)
    remap[units] = np.arange(len(units))
    u, e, v = remap[pairs.unit[keep]], pairs.example[keep], pairs.value[keep]
    size = len(units) * n_classes
    observed = np.bincount(u * n_classes + classes[e], weights=v, minlength=size)
    tol = 1e-9 * np.maximum(np.abs(observed), 1e-12)
    exceed = np.zeros(size)
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_permutations:
        k = min(chunk, n_permutations - done)
        perm = np.stack([rng.permutation(classes) for _ in range(k)])  # [k, n_examples]
        key = (np.arange(k)[:, None] * size + (u * n_classes)[None] + perm[:, e]).ravel()
        sums = np.bincount(key, weights=np.tile(v, k), minlength=k * size).reshape(k, size)
        exceed += (sums >= observed[None] - tol[None]).sum(0)
        done += k
    values = ((1 + exceed) / (1 + n_permutations)).reshape(len(units), n_classes)
    p[units] = np.where(tested[units], values, np.nan)
    return p


# ---- configuration and running -------------------------------------------------------------------
@dataclass
class BiasConfig:
    """What a bias study computes.

    explain: ``"pred"`` (explain and group by the predicted class) or ``"label"`` (the gold label).
    unit: ``"word"`` (subword pieces merged) or ``"token"``.
    groups: token groups (``"w1,w2"`` or ``"name:w1,w2"``); the first two, when aligned, are
        swapped for the counterfactual.
    min_freq: a unit enters a class's table when it occurs in at least this many of its examples.
    top: rows per class in the ranked tables.
    n_permutations / seed: the permutation test (``seed`` also picks the examples).
    alpha: the level at which a q-value is marked significant.
    n_examples: a seeded random subset (``None``: all).
    batch_size / max_length: batching and truncation of the texts.
    composite / backend / recompute: passed to :class:`~captum_mambalrp.MambaLRP`.
    counterfactual: run the group swap.
    """

    explain: str = "pred"
    unit: str = "word"
    groups: List[str] = field(default_factory=list)
    min_freq: int = 5
    top: int = 10
    n_permutations: int = 1000
    seed: int = 0
    alpha: float = 0.05
    n_examples: Optional[int] = None
    batch_size: int = 32
    max_length: int = 128
    composite: str = "mambalrp"
    backend: str = "auto"
    recompute: Union[bool, str] = "auto"
    counterfactual: bool = True

    def check(self) -> None:
        """Raises ValueError on a setting out of range."""
        if self.explain not in EXPLAIN:
            raise ValueError(f"explain must be one of {', '.join(EXPLAIN)}; got {self.explain!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}; got {self.unit!r}")
        for name in ("min_freq", "top", "n_permutations", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be at least 1 (or None for all); got {self.n_examples}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1); got {self.alpha}")

    def identity(self) -> dict:
        """The settings the saved explanations depend on (the rest only changes the tables)."""
        return {k: getattr(self, k) for k in ("explain", "unit", "seed", "max_length", "composite")}


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def class_scores(model: nn.Module, ids: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The model's class scores at the last real token ``[B, C]`` (through the package's scan
    on the CPU, :func:`~.scores.package_forward`: the same function, faster)."""
    with package_forward(model):
        return LastTokenScores(model)(ids, mask).float()


class BiasStudy:
    """Bias discovery on ``texts`` (``labels``: class indices, needed for ``explain="label"``).

    Args:
        model: a classifier MambaLRP accepts (class scores ``[B, C]`` or ``[B, L, C]`` read at
            the last real token), in eval mode (``from_pretrained`` gives that); it is run as
            given and left unchanged.
        tokenizer: its tokenizer (a fast tokenizer names the pieces that are merged into words).
        texts, labels: the data set.
        config: :class:`BiasConfig`.
        out_dir: where the explanations (``records.jsonl``, resumable) and the tables go;
            ``None`` keeps everything in memory.
        class_names: names of the classes (default: the model's ``config.id2label``, else indices).
        meta: free-form lines for the report (model, data).
        overwrite: discard explanations in ``out_dir`` made with other settings.

    Raises:
        ValueError: bad settings, labels missing for ``explain="label"``, or ``out_dir`` holding
            a study with other settings (without ``overwrite``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        labels: Optional[Sequence[int]],
        config: BiasConfig,
        out_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> None:
        config.check()
        if not texts:
            raise ValueError("the data set has no texts")
        if config.explain == "label" and labels is None:
            raise ValueError("explain='label' needs labels; give them or use explain='pred'")
        self.model = model  # run as given (in eval mode for deterministic results); never changed
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.labels = None if labels is None else [int(v) for v in labels]
        self.config = config
        self.groups = [parse_group(g) for g in config.groups]
        if config.counterfactual and len(self.groups) >= 2:
            swap_map(self.groups[0], self.groups[1])  # fail early on unaligned groups
        self.out = out_dir
        self.meta = dict(meta or {})
        self.class_names = list(class_names) if class_names is not None else None
        self.device = next(model.parameters()).device
        self.indices = select_examples(len(self.texts), config.n_examples, config.seed)
        self._memory: List[dict] = []
        self.records = JsonLines(os.path.join(out_dir, "records.jsonl")) if out_dir else None
        identity = {**config.identity(), "n_texts": len(self.texts)}
        self.folder = RunFolder(out_dir, identity, "bias study", overwrite) if out_dir else None

    # ---- explaining ------------------------------------------------------------------------
    def explain(self, progress: bool = True) -> List[dict]:
        """Explain the selected examples not explained yet; returns the records of all of them,
        in the order of :attr:`indices` (one dict per example: ``index``, ``units``,
        ``relevance``, ``class``, ``pred``, ``label``, ``explained``, ``delta``)."""
        from tqdm.auto import tqdm

        from ..attribution import MambaLRP

        if self.folder is not None:
            self.folder.prepare(["records.jsonl"], {"config": asdict(self.config), "meta": self.meta})
        done = {r["index"]: r for r in (self.records.read() if self.records is not None else self._memory)}
        todo = [i for i in self.indices if i not in done]
        if todo:
            lengths = {
                i: len(self.tokenizer(self.texts[i], truncation=True, max_length=self.config.max_length)["input_ids"])
                for i in todo
            }
            ordered = sorted(todo, key=lambda i: (lengths[i], i))
            size = self.config.batch_size
            batches = [ordered[k : k + size] for k in range(0, len(ordered), size)]
            lrp = MambaLRP(
                self.model, composite=self.config.composite, backend=self.config.backend, recompute=self.config.recompute
            )
            bar = tqdm(total=len(todo), desc="bias", unit="example", disable=not progress)
            for batch in batches:
                rows = self._explain_batch(lrp, batch)
                if self.records is not None:
                    self.records.append(rows)
                else:
                    self._memory.extend(rows)
                done.update({r["index"]: r for r in rows})
                bar.update(len(batch))
            bar.close()
        return [done[i] for i in self.indices]

    def _explain_batch(self, lrp: Any, batch: List[int]) -> List[dict]:
        ids, mask = _encode(self.tokenizer, [self.texts[i] for i in batch], self.config.max_length, self.device)
        scores = class_scores(self.model, ids, mask)
        pred = scores.argmax(-1)
        if self.config.explain == "label":
            assert self.labels is not None
            target = torch.tensor([self.labels[i] for i in batch], device=scores.device)
            if int(target.max()) >= scores.shape[-1] or int(target.min()) < 0:
                raise ValueError(f"a label is out of range for a model with {scores.shape[-1]} classes")
        else:
            target = pred
        relevance, delta = lrp.attribute(ids, target=target.tolist(), attention_mask=mask, return_convergence_delta=True)
        rows = []
        for k, i in enumerate(batch):
            real = mask[k].bool()
            tokens = self.tokenizer.convert_ids_to_tokens(ids[k][real].tolist())
            units, rel = unit_relevance(tokens, relevance[k][real].double().cpu().tolist(), self.config.unit)
            rows.append(
                {
                    "index": i,
                    "units": units,
                    "relevance": rel,
                    "class": int(target[k]),
                    "pred": int(pred[k]),
                    "label": None if self.labels is None else self.labels[i],
                    "explained": float(scores[k, target[k]]),
                    "delta": float(delta[k]),
                }
            )
        return rows

    # ---- the counterfactual --------------------------------------------------------------
    def counterfactual(self, records: Sequence[dict]) -> Optional[dict]:
        """Swap the first two groups in every text that has a word of either; the change of the
        explained class's logit and the predictions that flip (``None`` with fewer than two groups)."""
        if len(self.groups) < 2 or not self.config.counterfactual:
            return None
        a, b = self.groups[0], self.groups[1]
        mapping = swap_map(a, b)
        find_a, find_b = {w: w for w in a.words}, {w: w for w in b.words}
        rows = []
        for r in records:
            text = self.texts[r["index"]]
            swapped, n = swap_words(text, mapping)
            if n == 0:
                continue
            has_a, has_b = swap_words(text, find_a)[1] > 0, swap_words(text, find_b)[1] > 0
            direction = "both" if has_a and has_b else f"{a.name} -> {b.name}" if has_a else f"{b.name} -> {a.name}"
            rows.append({"index": r["index"], "class": r["class"], "direction": direction, "text": swapped, "swaps": n})
        size = self.config.batch_size
        for k in range(0, len(rows), size):
            chunk = rows[k : k + size]
            before = class_scores(
                self.model, *_encode(self.tokenizer, [self.texts[r["index"]] for r in chunk], self.config.max_length, self.device)
            )
            after = class_scores(
                self.model, *_encode(self.tokenizer, [r["text"] for r in chunk], self.config.max_length, self.device)
            )
            for j, r in enumerate(chunk):
                c = r["class"]
                r.update(
                    logit_before=float(before[j, c]),
                    logit_after=float(after[j, c]),
                    delta_logit=float(after[j, c] - before[j, c]),
                    pred_before=int(before[j].argmax()),
                    pred_after=int(after[j].argmax()),
                )
                r["flipped"] = r["pred_before"] != r["pred_after"]
        return {"groups": [a.name, b.name], "mapping": mapping, "rows": rows, "summary": counterfactual_summary(rows)}

    # ---- everything ----------------------------------------------------------------------
    def run(self, progress: bool = True, figures: bool = True) -> dict:
        """Explain what is missing, aggregate, test, run the counterfactual and (with ``out_dir``)
        write ``bias.json``, ``bias.md``, ``units.csv``, ``groups.csv``, ``counterfactual.csv``
        and ``top_units.png``.

        Returns:
            the report (as written to ``bias.json``): ``classes`` ``{name: {"n", "top",
            "against"}}``, ``groups``, ``counterfactual``, ``tests``, ``config``, ``meta``.
        """
        records = self.explain(progress)
        n_classes = self._n_classes(records)
        names = self.class_names or [str(c) for c in range(n_classes)]
        if len(names) < n_classes:
            raise ValueError(f"{len(names)} class names for {n_classes} classes")
        report = aggregate(records, names, self.groups, self.config, exclude=special_units(self.tokenizer))
        report["counterfactual"] = _public_counterfactual(self.counterfactual(records), names)
        report["meta"] = self.meta
        report["n_examples"] = len(records)
        labelled = [r for r in records if r.get("label") is not None]
        report["accuracy_on_examples"] = float(np.mean([r["pred"] == r["label"] for r in labelled])) if labelled else None
        report["conservation"] = {
            "mean_abs_delta": float(np.mean([abs(r["delta"]) for r in records])),
            "mean_abs_explained": float(np.mean([abs(r["explained"]) for r in records])),
        }
        if self.out:
            write_report(self.out, report, figures)
        return report

    def _n_classes(self, records: Sequence[dict]) -> int:
        from ..attribution.targets import class_names

        if self.class_names is not None:
            return len(self.class_names)
        names = class_names(self.model)
        found = max(r["class"] for r in records) + 1
        if names and len(names) >= found:
            self.class_names = names
            return len(names)
        return found


def counterfactual_summary(rows: Sequence[dict]) -> dict:
    """Mean change of the explained logit (± SE) and fraction of predictions flipped (± SE),
    over all swapped texts and per direction."""

    def summary(rs: Sequence[dict]) -> dict:
        return {
            "n": len(rs),
            "delta_logit": mean_se([r["delta_logit"] for r in rs]),
            "flipped": mean_se([float(r["flipped"]) for r in rs]),
        }

    out = {"all": summary(rows)}
    for d in sorted({r["direction"] for r in rows}):
        out[d] = summary([r for r in rows if r["direction"] == d])
    return out


def _public_counterfactual(cf: Optional[dict], names: Sequence[str]) -> Optional[dict]:
    if cf is None:
        return None
    transitions: Dict[str, int] = {}
    for r in cf["rows"]:
        if r["flipped"]:
            key = f"{names[r['pred_before']]} -> {names[r['pred_after']]}"
            transitions[key] = transitions.get(key, 0) + 1
    return {**cf, "transitions": dict(sorted(transitions.items(), key=lambda kv: -kv[1]))}


def special_units(tokenizer: Any) -> List[str]:
    """The tokenizer's special tokens (``[UNK]``, ``[PAD]``, ``<|endoftext|>``, ...) as units
    (:func:`normalize_word`): markers of the tokenizer, not words of the texts.

    >>> from types import SimpleNamespace
    >>> special_units(SimpleNamespace(all_special_tokens=["[UNK]", "[PAD]"]))
    ['[PAD]', '[UNK]']
    """
    tokens = getattr(tokenizer, "all_special_tokens", None) or []
    return sorted({normalize_word(str(t)) for t in tokens} | {str(t) for t in tokens})


def _row(stats: UnitStats, w: int, c: int, p: np.ndarray, q: np.ndarray) -> dict:
    mean, se = stats.mean(), stats.se()
    return {
        "unit": stats.units[w],
        "mean": float(mean[w, c]),
        "se": None if math.isnan(se[w, c]) else float(se[w, c]),
        "examples": int(stats.examples[w, c]),
        "occurrences": int(stats.occurrences[w, c]),
        "share_of_class": float(stats.examples[w, c] / max(stats.class_sizes[c], 1)),
        "contribution": float(stats.contribution()[w, c]),
        "p": None if math.isnan(p[w, c]) else float(p[w, c]),
        "q": None if math.isnan(q[w, c]) else float(q[w, c]),
    }


def aggregate(
    records: Sequence[dict],
    class_names: Sequence[str],
    groups: Sequence[TokenGroup],
    config: BiasConfig,
    exclude: Collection[str] = (),
) -> dict:
    """The tables of a bias study from its explanation records (see the module's docstring);
    the units in ``exclude`` (the tokenizer's special tokens, :func:`special_units`) are left
    out of the tables and the tests.

    Returns:
        ``{"classes": {name: {"n", "top", "against"}}, "groups": {name: {"words", "classes": {class: row}}},
        "tests": {...}, "config": {...}, "rows": [every tested unit-class row]}``.
    """
    n_classes = len(class_names)
    classes = np.asarray([r["class"] for r in records], dtype=np.int64)
    units, pairs, group_pairs = unit_pairs(records, groups, set(exclude))
    stats = unit_stats(units, pairs, classes, n_classes)
    tested = stats.examples >= config.min_freq
    p = permutation_pvalues(pairs, classes, len(units), n_classes, tested, config.n_permutations, config.seed)
    q = np.full_like(p, np.nan)
    q[tested] = benjamini_hochberg(p[tested])
    mean = stats.mean()
    out_classes: Dict[str, dict] = {}
    all_rows = []
    for c, name in enumerate(class_names):
        ws = np.flatnonzero(tested[:, c])
        rows = [_row(stats, int(w), c, p, q) for w in ws]
        for r in rows:
            all_rows.append({"class": name, **r})
        by_mean = sorted(range(len(ws)), key=lambda k: (-mean[ws[k], c], units[ws[k]]))
        out_classes[name] = {
            "n": int(stats.class_sizes[c]),
            "top": [rows[k] for k in by_mean[: config.top]],
            "against": [rows[k] for k in by_mean[::-1][: config.top] if rows[k]["mean"] < 0],
        }
    out_groups: Dict[str, dict] = {}
    n_group_tests = 0
    if groups:
        gstats = unit_stats([g.name for g in groups], group_pairs, classes, n_classes)
        gtested = gstats.examples >= 1
        gp = permutation_pvalues(group_pairs, classes, len(groups), n_classes, gtested, config.n_permutations, config.seed + 1)
        gq = np.full_like(gp, np.nan)
        gq[gtested] = benjamini_hochberg(gp[gtested])
        n_group_tests = int(gtested.sum())
        for g, group in enumerate(groups):
            out_groups[group.name] = {
                "words": group.words,
                "classes": {name: _row(gstats, g, c, gp, gq) for c, name in enumerate(class_names)},
            }
    n_tests = int(tested.sum())
    return {
        "config": asdict(config),
        "excluded_units": sorted(set(exclude)),
        "classes": out_classes,
        "groups": out_groups,
        "rows": all_rows,
        "tests": {
            "n_tests": n_tests,
            "n_group_tests": n_group_tests,
            "n_permutations": config.n_permutations,
            "smallest_p": 1.0 / (1 + config.n_permutations),
            "bonferroni_threshold": config.alpha / n_tests if n_tests else None,
            "alpha": config.alpha,
        },
    }


# ---- writing ---------------------------------------------------------------------------------
def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _p(v: Optional[float]) -> str:
    return "n/a" if v is None else (f"{v:.2g}" if v < 0.01 else f"{v:.3f}")


def report_markdown(report: dict) -> str:
    """The report as markdown: the ranked tables per class, the groups, the counterfactual."""
    cfg, tests = report["config"], report["tests"]
    lines = ["# Bias discovery with MambaLRP", ""]
    for k, v in (report.get("meta") or {}).items():
        lines.append(f"- {k}: {v}")
    acc = report.get("accuracy_on_examples")
    lines.append(
        f"- examples: {report.get('n_examples', '?')}" + (f" (model accuracy on them: {acc:.4f})" if acc is not None else "")
    )
    lines.append(
        f"- explained class: the {'predicted class' if cfg['explain'] == 'pred' else 'gold label'}; units: "
        f"{'words (subword pieces summed)' if cfg['unit'] == 'word' else 'tokens'}; a unit enters a class's table "
        f"when it occurs in at least {cfg['min_freq']} of its examples"
    )
    if report.get("excluded_units"):
        lines.append("- left out: the tokenizer's special tokens " + ", ".join(f"`{u}`" for u in report["excluded_units"]))
    lines.append(
        f"- significance: one-sided permutation test over examples, {tests['n_permutations']} permutations "
        f"(smallest p {tests['smallest_p']:.2g}); q = Benjamini-Hochberg over {tests['n_tests']} tests; "
        + (f"Bonferroni level {tests['bonferroni_threshold']:.2g}" if tests.get("bonferroni_threshold") else "")
    )
    lines.append("")
    header = ["class", "rank", "unit", "mean R ± SE", "examples", "share of class", "R per class example", "p", "q"]
    for name, cls in report["classes"].items():
        lines += [f"## {name} ({cls['n']} examples)", ""]
        if not cls["top"]:
            lines += [f"No unit occurs in {cfg['min_freq']} of its examples.", ""]
            continue
        rows = [
            [
                name,
                str(k + 1),
                f"`{r['unit']}`",
                _num(r["mean"]) + ("" if r["se"] is None else f" ± {r['se']:.3f}"),
                str(r["examples"]),
                f"{r['share_of_class']:.2f}",
                _num(r["contribution"]),
                _p(r["p"]),
                _p(r["q"]) + (" *" if r["q"] is not None and r["q"] < cfg["alpha"] else ""),
            ]
            for k, r in enumerate(cls["top"])
        ]
        lines += [markdown_table(header, rows), ""]
        against = [r for r in cls["against"][:5] if f"{r['mean']:.3f}" != "-0.000"]  # negative to the digits shown
        if against:
            lines.append(
                "Most against it: " + ", ".join(f"`{r['unit']}` {r['mean']:+.3f} ({r['examples']})" for r in against) + "."
            )
        else:
            lines.append(
                f"Most against it: none (no {cfg['unit']} in {cfg['min_freq']} or more of its examples has a mean "
                "relevance below -0.0005)."
            )
        lines.append("")
    if report.get("groups"):
        lines += ["## Groups", ""]
        names = list(report["classes"])
        gnames = list(report["groups"])
        head = ["class"] + [f"{g}: mean R (examples), p" for g in gnames]
        rows = []
        for c in names:
            row = [c]
            for g in gnames:
                r = report["groups"][g]["classes"][c]
                row.append("n/a (0)" if r["examples"] == 0 else f"{r['mean']:+.3f} ({r['examples']}), p {_p(r['p'])}")
            rows.append(row)
        lines += [markdown_table(head, rows), ""]
        lines += ["Words: " + "; ".join(f"{g} = {', '.join(report['groups'][g]['words'])}" for g in gnames), ""]
    cf = report.get("counterfactual")
    if cf:
        a, b = cf["groups"]
        lines += [f"## Counterfactual: {a} <-> {b}", ""]
        rows = []
        for key, s in cf["summary"].items():
            d, dse = s["delta_logit"]
            f, fse = s["flipped"]
            rows.append(
                [
                    key,
                    str(s["n"]),
                    _num(d) + ("" if math.isnan(dse) else f" ± {dse:.3f}"),
                    _num(f) + ("" if math.isnan(fse) else f" ± {fse:.3f}"),
                ]
            )
        lines += [markdown_table(["swapped texts", "n", "change of the explained logit", "predictions flipped"], rows), ""]
        if cf.get("transitions"):
            lines.append("Flips: " + ", ".join(f"{k} ({v})" for k, v in list(cf["transitions"].items())[:8]) + ".")
            lines.append("")
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in report["figures"].items()] + [""]
    return "\n".join(lines)


def plot_top_units(report: dict, path: str, top: int = 10) -> str:
    """Bars of each class's top units by mean relevance (red: for the class, blue: against it;
    ``*``: q below alpha), one panel per class."""
    from ..visualization.colors import rgb
    from .plots import _pyplot

    plt = _pyplot()
    classes = list(report["classes"].items())
    cols = min(3, max(1, len(classes)))
    rows_n = (len(classes) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 0.32 * top * rows_n + 1.2 * rows_n), squeeze=False)
    alpha = report["config"]["alpha"]
    red, blue = [v / 255 for v in rgb(1.0)], [v / 255 for v in rgb(-1.0)]
    for ax, (name, cls) in zip(axes.flat, classes):
        rows = cls["top"][:top][::-1]
        ax.barh(
            range(len(rows)),
            [r["mean"] for r in rows],
            xerr=[r["se"] or 0.0 for r in rows],
            color=[red if r["mean"] >= 0 else blue for r in rows],
            ecolor="#555",
        )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["unit"] + (" *" if r["q"] is not None and r["q"] < alpha else "") for r in rows], fontsize=9)
        ax.axvline(0, color="#888", lw=0.8)
        ax.set_title(f"{name} (n={cls['n']})", fontsize=10)
        ax.set_xlabel("mean relevance when present", fontsize=8)
    for ax in list(axes.flat)[len(classes) :]:
        ax.axis("off")
    fig.suptitle("Units that most drive each class (red: for the class; * significant)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str, report: dict, figures: bool = True) -> dict:
    """Write ``units.csv`` (every tested unit-class pair), ``groups.csv``, ``counterfactual.csv``
    (every swapped text), ``top_units.png``, ``bias.json`` (the report without those two per-row
    tables) and ``bias.md`` into ``out_dir``; returns the report."""
    os.makedirs(out_dir, exist_ok=True)
    cols = ["class", "unit", "mean", "se", "examples", "occurrences", "share_of_class", "contribution", "p", "q"]
    with open(os.path.join(out_dir, "units.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in sorted(report["rows"], key=lambda r: (r["class"], -r["mean"])):
            w.writerow([r[c] for c in cols])
    if report.get("groups"):
        with open(os.path.join(out_dir, "groups.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["group"] + cols)
            for g, group in report["groups"].items():
                for c, r in group["classes"].items():
                    w.writerow([g, c] + [r[k] for k in cols[1:]])
    cf = report.get("counterfactual")
    if cf:
        keys = [
            "index",
            "direction",
            "swaps",
            "class",
            "logit_before",
            "logit_after",
            "delta_logit",
            "pred_before",
            "pred_after",
            "flipped",
            "text",
        ]
        with open(os.path.join(out_dir, "counterfactual.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in cf["rows"]:
                w.writerow([r[k] for k in keys])
    if figures:
        report["figures"] = {
            "top_units": os.path.basename(plot_top_units(report, os.path.join(out_dir, "top_units.png"), report["config"]["top"]))
        }
    compact = {k: v for k, v in report.items() if k != "rows"}  # the rows are units.csv and counterfactual.csv
    if cf:
        compact["counterfactual"] = {k: v for k, v in cf.items() if k != "rows"}
    with open(os.path.join(out_dir, "bias.json"), "w", encoding="utf-8") as f:
        json.dump(compact, f, indent=1)
    with open(os.path.join(out_dir, "bias.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(report))
    return report


__all__ = [
    "BiasConfig",
    "BiasStudy",
    "TokenGroup",
    "aggregate",
    "benjamini_hochberg",
    "counterfactual_summary",
    "normalize_word",
    "parse_group",
    "permutation_pvalues",
    "plot_top_units",
    "report_markdown",
    "swap_map",
    "swap_words",
    "unit_relevance",
    "write_report",
]
