"""Precision of MambaLRP's bf16 / fp32 passes against a float64 truth (issue 14, goal 3).

For one random model (weights made in float64, then cast), per dtype:

- **truth**: MambaLRP on the float64 model (float64 throughout; relevance conserved to 1e-10),
  its explained score (the model's logit) and relevance per token;
- **transformers**: the model's own forward in that dtype (no grad): the logit's relative error
  against the truth, and the relative L2 error of its last hidden states (every token), the
  per-token output of the same computation;
- **transformers' gradient x input**: autograd through the same forward (a plain backward pass in
  that dtype), its per-token relative L2 error against the float64 value (computed by the
  package's ``"gradient"`` composite, equal to transformers' own to 1e-5): the
  baseline for the rounding of a backward pass;
- **MambaLRP**: the explained score's relative error, the relevance per token's relative L2
  error and its top-k tokens (by ``|R|``) in common with the truth's.

Goal 3: MambaLRP's errors <= transformers' (score vs logit, logits at every position; relevance vs
hidden states, and vs gradient x input).

    python benchmarks/precision.py --arch mamba2 --layers 16 --d-model 256 --length 512
    python benchmarks/precision.py --arch mamba2 --device cuda --layers 16 --d-model 1024 --length 4096 --out p.json
    python benchmarks/precision.py --arch mamba1 --layers 8 --d-model 64 --state 16 --length 64 --seeds $(seq 0 15) \
        --dtypes bfloat16 --split   # how much of each error is the rounded weights, how much the arithmetic

``--split`` separates the two sources of a bf16 error: the model with its weights rounded to bf16
is another function (its exact relevance and hidden states, computed in float64, already differ
from the truth), and the bf16 arithmetic adds its own error (against that rounded model in
float64). Only the second is the pass's to lower.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import mamba1_classifier, mamba2_classifier  # noqa: E402

from captum_mambalrp import MambaLRP  # noqa: E402
from captum_mambalrp.evaluation.analysis import layer_relevance  # noqa: E402
from captum_mambalrp.kernels.dispatch import CONV_OUTPUT_ENV  # noqa: E402
from captum_mambalrp.models.kernel_path import torch_path  # noqa: E402


def build(arch: str, layers: int, d_model: int, seed: int, head_dim: int, state: int) -> torch.nn.Module:
    """A random classifier (2 classes at the last token) in float64; weights by transformers' init."""
    if arch == "mamba2":
        heads = 2 * d_model // head_dim
        model = mamba2_classifier(
            layers, seed, hidden_size=d_model, num_heads=heads, head_dim=head_dim, state_size=state, vocab_size=1024
        )
    else:
        model = mamba1_classifier(layers, seed, hidden_size=d_model, state_size=state, vocab_size=1024)
    return model.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def topk_common(a: torch.Tensor, b: torch.Tensor, k: int) -> int:
    k = min(k, a.numel())
    return len(set(a.abs().topk(k).indices.tolist()) & set(b.abs().topk(k).indices.tolist()))


def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The backbone's last hidden states as transformers computes them: a float64 model (the
    truth) on its torch path, where no kernel may round it or refuse it; another dtype as the model
    runs (its kernels where installed). None if that cannot run here."""
    path = torch_path() if next(model.parameters()).dtype == torch.float64 else contextlib.nullcontext()
    with torch.no_grad():
        try:
            with path:
                return model.backbone(input_ids=ids, use_cache=False).last_hidden_state
        except Exception as e:  # noqa: BLE001
            print(f"no float64 hidden states: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None


def gradient_x_input(model: torch.nn.Module, ids: torch.Tensor, target: int) -> Optional[torch.Tensor]:
    """Gradient x input per token of the target logit at the last position, by autograd through
    transformers' own forward (float64: its torch path; another dtype as the model runs, its kernels
    where installed): what a plain backward pass in that dtype gives, the baseline for the rounding
    of MambaLRP's own backward pass. None if that cannot run here."""
    path = torch_path() if next(model.parameters()).dtype == torch.float64 else contextlib.nullcontext()
    try:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with path:
            out = model(inputs_embeds=emb)
            logit = torch.as_tensor(out if torch.is_tensor(out) else out.logits)[0, -1, target]
            (grad,) = torch.autograd.grad(logit, emb)  # no .grad left on the model's parameters
    except Exception as e:  # noqa: BLE001
        print(f"no gradient x input: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    return (emb.detach().double() * grad.double()).sum(-1)[0]


def block_outputs(model: torch.nn.Module, run) -> List[torch.Tensor]:
    """Every backbone block's output (float64 copies) while ``run()`` runs ``model``."""
    got: List[torch.Tensor] = []

    def hook(module, args, out):
        got.append((out[0] if isinstance(out, tuple) else out).detach().double().clone())

    handles = [layer.register_forward_hook(hook) for layer in model.backbone.layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return got


def head_logits(model: torch.nn.Module, run) -> torch.Tensor:
    """The logits at every position (float64 copy) that ``model.lm_head`` computes while ``run()``
    runs: in a MambaLRP pass, the scores it could explain at any position."""
    got: List[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: got.append(out.detach().double().clone()))
    try:
        run()
    finally:
        handle.remove()
    return got[-1]


def per_token(r: torch.Tensor) -> torch.Tensor:
    return r[0].sum(-1) if r.dim() == 3 else r[0]


@contextlib.contextmanager
def setting(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` inside the block, as it was after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def explain(
    model: torch.nn.Module,
    ids: torch.Tensor,
    target: int,
    k: int,
    truth_score: float,
    truth_rel: torch.Tensor,
    logits64: torch.Tensor,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """MambaLRP on ``model`` against the float64 truth: its relevance and the ``mambalrp_*`` columns
    (the logits at every position its pass computes, the explained score, the relevance per token,
    its top-k tokens in common, its conservation)."""
    found: List[Any] = []
    logits = head_logits(
        model, lambda: found.append(MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True))
    )
    r, delta = found[0]
    score = float((r.double().sum() + delta.double().sum()).item())  # the score the pass explains
    return r, {
        "mambalrp_logits_relL2": rel(logits, logits64),
        "mambalrp_score": score,
        "mambalrp_score_err": abs(score - truth_score) / max(abs(truth_score), 1e-12),
        "mambalrp_relevance_relL2": rel(per_token(r), truth_rel),
        f"mambalrp_top{k}_common": topk_common(per_token(r), truth_rel, k),
        "mambalrp_conservation": float(delta.abs().max() / max(abs(score), 1e-12)),
        "mambalrp_delta": float(delta.double().sum()),  # explained score - sum(R), signed
    }


def goals(ours: Dict[str, Any], theirs: Dict[str, Any]) -> Dict[str, Any]:
    """Goal 3's comparisons of MambaLRP's columns (``ours``) with transformers' (``theirs``): None
    where transformers' column could not be computed."""
    hidden, gxi = theirs["transformers_hidden_relL2"], theirs["transformers_gxi_relL2"]
    return {
        "goal3_score": ours["mambalrp_score_err"] <= theirs["transformers_score_err"],
        "goal3_logits": ours["mambalrp_logits_relL2"] <= theirs["transformers_logits_relL2"],
        "goal3_relevance": None if hidden is None else ours["mambalrp_relevance_relL2"] <= hidden,
        "goal3_relevance_gxi": None if gxi is None else ours["mambalrp_relevance_relL2"] <= gxi,
    }


def measure(
    model64: torch.nn.Module,
    ids: torch.Tensor,
    dtypes: List[str],
    k: int,
    per_layer: bool = False,
    split: bool = False,
    conv_compare: bool = False,
) -> Dict[str, Any]:
    """The truth, then one row per dtype (see the module's docstring); with ``conv_compare`` a bf16 /
    fp16 row also holds ``"conv_compute"``: MambaLRP's columns on the same model with
    ``CAPTUM_MAMBALRP_CONV_OUTPUT=compute``."""
    target = 1
    blocks64 = block_outputs(model64, lambda: MambaLRP(model64).attribute(ids, target=target)) if per_layer else []
    # the convergence delta is ``explained score - sum(R)``: the explained score is sum(R) + delta
    found: List[Any] = []
    logits64 = head_logits(
        model64, lambda: found.append(MambaLRP(model64).attribute(ids, target=target, return_convergence_delta=True))
    )
    r64, d64 = found[0]
    truth_score = float((r64.sum() + d64.sum()).item())
    truth_rel = per_token(r64)
    truth_hidden = hidden_states(model64, ids)
    # the float64 gradient x input by the package's plain-gradient pass (its vectorised scans: on a GPU
    # transformers' float64 torch path steps through the sequence, minutes per model); equal to
    # transformers' own float64 value to its RMSNorms' and residual stream's float32 rounding
    # (tests/test_precision.py)
    truth_gxi = per_token(MambaLRP(model64, composite="gradient").attribute(ids, target=target))
    out: Dict[str, Any] = {"truth_score": truth_score, "truth_conservation": float(d64.abs().max())}
    out["conv_output"] = os.environ.get("CAPTUM_MAMBALRP_CONV_OUTPUT", "default")
    for name in dtypes:
        dtype = getattr(torch, name)
        model = copy.deepcopy(model64).to(dtype)
        with torch.no_grad():
            scores = model(ids)
            logit = float((scores if torch.is_tensor(scores) else scores.logits)[0, -1, target])
        hid = hidden_states(model, ids)
        gxi = gradient_x_input(model, ids, target)
        r, row = explain(model, ids, target, k, truth_score, truth_rel, logits64)
        row = {
            "transformers_logit": logit,
            "transformers_score_err": abs(logit - truth_score) / max(abs(truth_score), 1e-12),
            "transformers_hidden_relL2": None if truth_hidden is None else rel(hid, truth_hidden),
            # the logits at every position (every score the pass could explain): one sample per
            # position where the score above is one per model
            "transformers_logits_relL2": rel(torch.as_tensor(scores if torch.is_tensor(scores) else scores.logits), logits64),
            # a plain backward pass through transformers' own forward in this dtype: gradient x input
            # against its float64 value, the baseline for the relevance (a backward pass's rounding too)
            "transformers_gxi_relL2": None if truth_gxi is None or gxi is None else rel(gxi, truth_gxi),
            **row,
        }
        if conv_compare and dtype in (torch.bfloat16, torch.float16):  # the same model, the conv output in float32
            with setting(CONV_OUTPUT_ENV, "compute"):
                row["conv_compute"] = explain(model, ids, target, k, truth_score, truth_rel, logits64)[1]
        if split:  # the error in two parts, through the model with rounded weights computed in float64
            rounded = copy.deepcopy(model64).to(dtype).to(torch.float64)
            r_w = per_token(MambaLRP(rounded).attribute(ids, target=target))
            h_w = hidden_states(rounded, ids)
            row["weights_relL2"] = [rel(h_w, truth_hidden), rel(r_w, truth_rel)]  # rounded weights, exact arithmetic
            row["arithmetic_relL2"] = [rel(hid, h_w), rel(per_token(r), r_w)]  # dtype arithmetic, same weights
            # the arithmetic's error of the relevance per token at the embedding and after each block
            exact, low = (layer_relevance(m, ids, None, [target]) for m in (rounded, model))
            row["arithmetic_layers"] = {n: rel(a[0], b[0]) for n, a, b in zip(low.names, low.relevance, exact.relevance)}
            del rounded
        if per_layer:  # each block's output against the float64 truth: transformers' forward / MambaLRP's pass
            ours = block_outputs(model, lambda m=model: MambaLRP(m).attribute(ids, target=target))
            with torch.no_grad():
                theirs = block_outputs(model, lambda m=model: m(ids))
            row["blocks_relL2"] = [[rel(t, b64), rel(o, b64)] for t, o, b64 in zip(theirs, ours, blocks64)]
        for ours in (row, row.get("conv_compute")):
            if ours is not None:
                ours.update(goals(ours, row))
        out[name] = row
        del model
    return out


def pooled_errors(rows: List[Dict[str, Any]], name: str, variant: str = "") -> Dict[str, float]:
    """Over the seeds' rows of :func:`measure` for dtype ``name``, transformers' / MambaLRP's: the
    explained score's error pooled (``|scores - truths| / |truths|`` over the seeds' vectors), and the
    mean relative L2 error of the logits at every position, of the hidden states / relevance and of
    transformers' gradient x input (nan where some seed could not compute a column: transformers'
    float64 hidden states). ``variant``: MambaLRP's columns from that sub-row (``"conv_compute"``)."""
    truth = torch.tensor([r["truth_score"] for r in rows], dtype=torch.float64)
    norm = truth.norm().clamp_min(1e-300)

    def column(r: Dict[str, Any], key: str) -> Any:
        return (r[name][variant] if variant and key.startswith("mambalrp") else r[name])[key]

    out = {}
    for key, col in (("transformers_score", "transformers_logit"), ("mambalrp_score", "mambalrp_score")):
        out[key] = float((torch.tensor([column(r, col) for r in rows], dtype=torch.float64) - truth).norm() / norm)
    for key, col in (
        ("transformers_logits", "transformers_logits_relL2"),
        ("mambalrp_logits", "mambalrp_logits_relL2"),
        ("transformers_hidden", "transformers_hidden_relL2"),
        ("transformers_gxi", "transformers_gxi_relL2"),
        ("mambalrp_relevance", "mambalrp_relevance_relL2"),
    ):
        values = [column(r, col) for r in rows]
        out[key] = sum(values) / len(values) if None not in values else float("nan")
    return out


def rows_as_shipped(paths: List[str], shape: str, name: str) -> List[Dict[str, Any]]:
    """The ``precision`` rows of ``shape`` that carry dtype ``name`` in the JSONL files ``paths``
    (``gpu_scale.py precision --out``), each as the pass ships now: a ``--conv-output compare`` row's
    MambaLRP columns are its ``conv_compute`` sub-row's. A row written before run 12 without that
    option ran the conv output rounded (the default then): pass only files of runs 12 and later, or
    compare rows. Raises ``ValueError`` when the rows differ in shape (layers, d_model, length) or
    repeat a seed, which would weigh one model twice."""
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("part") == "precision" and r.get("shape") == shape and name in r:
                    sub = r[name].get("conv_compute", {})
                    rows.append({**r, name: {**r[name], **sub}})
    if not rows:
        raise ValueError(f"no precision rows of shape {shape!r} with dtype {name!r} in {paths}")
    sizes = {(r["layers"], r["hidden"], r["length"]) for r in rows}
    if len(sizes) > 1:
        raise ValueError(f"rows of different sizes (layers, d_model, length) {sorted(sizes)}: pool one size at a time")
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seed repeated in {seeds}: each model once (pass each run's file once)")
    return rows


def pooled(rows: List[Dict[str, Any]], name: str, variant: str = "") -> str:
    """:func:`pooled_errors` as one line."""
    e = pooled_errors(rows, name, variant)
    label = f"{name} {variant}".strip()
    return (
        f"{label}, over {len(rows)} seeds (transformers / MambaLRP): score pooled {e['transformers_score']:.3e} / "
        f"{e['mambalrp_score']:.3e}; logits at every position {e['transformers_logits']:.3e} / {e['mambalrp_logits']:.3e}; "
        f"hidden states / relevance {e['transformers_hidden']:.3e} / {e['mambalrp_relevance']:.3e}; "
        f"gradient x input (transformers) / relevance {e['transformers_gxi']:.3e} / {e['mambalrp_relevance']:.3e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["mamba1", "mamba2"], default="mamba2")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--state", type=int, default=128, help="state size (Mamba2-2.7B: 128; Mamba1 models: 16)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--per-layer", action="store_true", help="also every block's output error: transformers' / MambaLRP's")
    p.add_argument(
        "--split",
        action="store_true",
        help="split each error (hidden states / relevance) into the weights' rounding to the dtype (computed in "
        "float64) and the dtype's arithmetic (against the rounded model in float64); means over the seeds at the end",
    )
    p.add_argument(
        "--conv-compare",
        action="store_true",
        help="bf16 / fp16: the rows with CAPTUM_MAMBALRP_CONV_OUTPUT=model (unless set), MambaLRP's columns also "
        "with compute (the default), same model (conv_compute)",
    )
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.conv_compare:  # the baseline rounds the conv output to the model's dtype, unless set otherwise
        os.environ.setdefault(CONV_OUTPUT_ENV, "model")
    rows = []
    for seed in a.seeds:
        model = build(a.arch, a.layers, a.d_model, seed, a.head_dim, a.state).to(a.device)
        ids = torch.randint(0, 1024, (1, a.length), generator=torch.Generator().manual_seed(seed)).to(a.device)
        res = measure(model, ids, a.dtypes.split(","), a.topk, a.per_layer, a.split, a.conv_compare)
        res.update(arch=a.arch, layers=a.layers, d_model=a.d_model, length=a.length, seed=seed, device=a.device)
        rows.append(res)
        for name in a.dtypes.split(","):
            r = res[name]
            print(
                f"{a.arch} {a.layers}x{a.d_model} L={a.length} seed={seed} {name}: "
                f"score err transformers {r['transformers_score_err']:.2e} / MambaLRP {r['mambalrp_score_err']:.2e}; "
                f"logits at every position {r['transformers_logits_relL2']:.2e} / {r['mambalrp_logits_relL2']:.2e}; "
                f"relL2 hidden (transformers) {r['transformers_hidden_relL2'] or float('nan'):.2e} / relevance (MambaLRP) "
                f"{r['mambalrp_relevance_relL2']:.2e}; gradient x input (transformers) "
                f"{r['transformers_gxi_relL2'] or float('nan'):.2e}; top-{a.topk} common {r[f'mambalrp_top{a.topk}_common']}; "
                f"goal 3 score {'met' if r['goal3_score'] else 'MISSED'}, "
                f"relevance {'met' if r['goal3_relevance'] else 'MISSED'}",
                flush=True,
            )
            if a.per_layer:
                blocks = " ".join(f"{i}: {t:.1e} / {o:.1e}" for i, (t, o) in enumerate(r["blocks_relL2"]))
                print(f"  block outputs, rel. L2 to float64 (transformers / MambaLRP): {blocks}", flush=True)
            if a.split:
                (wh, wr), (ah, ar) = r["weights_relL2"], r["arithmetic_relL2"]
                print(
                    f"  rounded weights: hidden {wh:.2e} / relevance {wr:.2e}; arithmetic: hidden {ah:.2e} / relevance {ar:.2e}"
                )
    if a.split:
        for name in a.dtypes.split(","):
            layers = rows[0][name]["arithmetic_layers"]
            means = {n: sum(r[name]["arithmetic_layers"][n] for r in rows) / len(rows) for n in layers}
            by_layer = " ".join(f"{n} {v:.1e}" for n, v in means.items())
            print(f"{name}, the arithmetic's relevance error by layer (mean): {by_layer}")
            mean = torch.tensor([[*r[name]["weights_relL2"], *r[name]["arithmetic_relL2"]] for r in rows]).mean(0).tolist()
            totals = [[r[name]["transformers_hidden_relL2"], r[name]["mambalrp_relevance_relL2"]] for r in rows]
            total = torch.tensor(totals).mean(0)
            print(
                f"{name}, mean over {len(rows)} seeds (hidden states / relevance): total {total[0]:.2e} / {total[1]:.2e}; "
                f"rounded weights alone {mean[0]:.2e} / {mean[1]:.2e}; arithmetic alone {mean[2]:.2e} / {mean[3]:.2e}"
            )
    for name in a.dtypes.split(","):
        print(pooled(rows, name))
        if "conv_compute" in rows[0][name]:
            print(pooled(rows, name, "conv_compute"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
