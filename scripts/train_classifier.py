#!/usr/bin/env python3
"""Train an Emotion classifier read at the last real token: Mamba1, Mamba2 or a hybrid.

    # the embedded default (CPU, 2 layers, 71 min on one core)
    python scripts/train_classifier.py --data DIR --out captum_mambalrp/default_model --epochs 8 --lr 4e-3 --init-range 0.1
    # the deep models of issue 15 (a GPU)
    python scripts/train_classifier.py --data DIR --preset mamba-130m --device cuda --amp --out runs/emotion-mamba-130m
    python scripts/train_classifier.py --data DIR --preset mamba2-130m --device cuda --amp --out runs/emotion-mamba2-130m
    python scripts/train_classifier.py --data DIR --preset hybrid-130m --device cuda --amp --out runs/emotion-hybrid-130m

``--arch mamba`` trains the paper's classifier (``MambaForLastTokenClassification``: a
``MambaModel`` and ``lm_head = Linear(hidden, 6)``). ``--arch mamba2`` (``Mamba2ForCausalLM``) and
``--arch hybrid`` (``BambaForCausalLM``: Mamba2 layers with attention at ``--attn-layers``) are
language models whose vocabulary holds one token per class (``[sadness]``, ..., at ids 0..5,
:func:`class_tokenizer`): trained with the cross-entropy of the class token at the last real
token, they classify by predicting it, and ``config.id2label = {0: "sadness", ...}`` names
those ids, so ``compare`` and MambaLRP explain them like the classifier (the explained class is
the predicted token, logits 0..5 the class scores).

Writes a transformers folder (config, weights, tokenizer) and ``metrics.json``: validation and
test accuracy (over the six classes), the seed, the exact command, the torch and transformers
versions and the git commit. ``--max-steps`` stops early (a smoke test of a configuration).
The data stays where it is: ``--data`` is required (a folder with train.txt, val.txt, test.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.datasets import EMOTION_LABELS, read_emotion  # noqa: E402
from captum_mambalrp.models.classifier import MambaForLastTokenClassification, last_real_index  # noqa: E402
from captum_mambalrp.models.tokenizer import build_word_tokenizer  # noqa: E402

#: shapes of the deep models (Mamba-130M: d_model 768, 24 layers, state 16, expand 2; Mamba2-130M:
#: state 128, head_dim 64; the hybrid: the Mamba2 shape with attention in every sixth layer). ``chunk``
#: is the SSD chunk of transformers' torch path: 64 instead of 256 pads a short text less (same function)
PRESETS: Dict[str, Dict[str, object]] = {
    "mamba-130m": dict(arch="mamba", hidden=768, layers=24, state=16, expand=2),
    "mamba2-130m": dict(arch="mamba2", hidden=768, layers=24, state=128, expand=2, head_dim=64, groups=1, chunk=64),
    "hybrid-130m": dict(
        arch="hybrid",
        hidden=768,
        layers=24,
        state=128,
        expand=2,
        head_dim=64,
        groups=1,
        attn_layers="5,11,17,23",
        attn_heads=12,
        chunk=64,
    ),
}


def batches(texts, labels, tokenizer, batch_size, shuffle, max_len, rng):
    """Length-bucketed, right-padded batches."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].split()))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in chunk])


def class_logits(model, ids, mask, class_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, 6]``: the logits at the last real token (of the class tokens for a language model)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    b, length = logits.shape[:2]
    last = logits[torch.arange(b, device=logits.device), last_real_index(mask, b, length, logits.device)].float()
    return last if class_ids is None else last[:, class_ids]


def lm_loss(model, ids, mask, y, class_ids: Optional[torch.Tensor], every_position: bool = False) -> torch.Tensor:
    """Cross-entropy of the class at the last real token (over the whole vocabulary for a
    language model, so that its prediction is a class token). ``every_position``: the mean over
    every real token instead (each prefix labelled with its text's class; the model is still read
    at the last token), a denser training signal for deep models trained from scratch."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    b, length = logits.shape[:2]
    target = y if class_ids is None else class_ids[y]
    if every_position:
        per_token = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), target.repeat_interleave(length), reduction="none"
        ).view(b, length)
        real = mask.to(per_token.dtype)
        return ((per_token * real).sum(1) / real.sum(1).clamp_min(1)).mean()
    last = logits[torch.arange(b, device=logits.device), last_real_index(mask, b, length, logits.device)].float()
    return torch.nn.functional.cross_entropy(last, target)


@torch.no_grad()
def accuracy(model, texts, labels, tokenizer, device, max_len, class_ids) -> float:
    model.eval()
    correct = 0
    for ids, mask, y in batches(texts, labels, tokenizer, 256, False, max_len, None):
        scores = class_logits(model, ids.to(device), mask.to(device), class_ids)
        correct += int((scores.argmax(-1).cpu() == y).sum())
    return correct / len(texts)


def class_tokenizer(tokenizer):
    """The word tokenizer with one token per class (``[sadness]``, ...) at ids 0..5 and every
    other token moved up by six: the language model's logits 0..5 are then the class scores,
    and ``config.id2label = {0: "sadness", ...}`` names them as for a classifier (the
    evaluation maps label names to indices through it). The class tokens are never produced
    from text (the pre-tokenizer splits off the brackets).

    >>> from captum_mambalrp.models.tokenizer import build_word_tokenizer
    >>> tok = class_tokenizer(build_word_tokenizer(["i feel sad", "i feel sad"]))
    >>> tok.convert_tokens_to_ids(["[sadness]", "[surprise]", "[PAD]"]), tok("feel")["input_ids"] == [tok.get_vocab()["feel"]]
    ([0, 5, 6], True)
    """
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    names = [f"[{name}]" for name in EMOTION_LABELS]
    vocab = {t: i + len(names) for t, i in tokenizer.get_vocab().items()}
    vocab.update({t: i for i, t in enumerate(names)})
    core = tokenizer.backend_tokenizer
    core.model = models.WordLevel(vocab=vocab, unk_token=tokenizer.unk_token)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token, padding_side="right"
    )


def build_model(args, tokenizer) -> tuple:
    """The model and, for a language model, the class token ids."""
    common = dict(pad_token_id=tokenizer.pad_token_id, use_cache=False, tie_word_embeddings=False)
    # the std of the normal init of embeddings and linear layers: transformers' Mamba and Mamba2
    # configs default to 0.1, which from scratch at 24 layers gives residual streams of RMS ~100
    # (Mamba1) and a last-token state that depends mostly on the first tokens; 0.02 is Bamba's
    # default and GPT-2's (docs/results.md, "Deeper models")
    common["initializer_range"] = args.init_range
    if args.rescale_residual:  # out_proj scaled by 1/sqrt(layers) at init (GPT-2's rule; transformers' flag)
        common["rescale_prenorm_residual"] = True
    if args.arch == "mamba":
        from transformers import MambaConfig

        config = MambaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            state_size=args.state,
            num_hidden_layers=args.layers,
            expand=args.expand,
            num_labels=len(EMOTION_LABELS),
            id2label=dict(enumerate(EMOTION_LABELS)),
            label2id={name: i for i, name in enumerate(EMOTION_LABELS)},
            **common,
        )
        return MambaForLastTokenClassification(config), None
    class_ids = tokenizer.convert_tokens_to_ids([f"[{name}]" for name in EMOTION_LABELS])
    if class_ids != list(range(len(EMOTION_LABELS))):
        raise ValueError("a language-model classifier needs the class tokens at ids 0..5 (class_tokenizer)")
    labels = dict(id2label={t: n for t, n in zip(class_ids, EMOTION_LABELS)}, label2id=dict(zip(EMOTION_LABELS, class_ids)))
    inner = args.expand * args.hidden
    if inner % args.head_dim:
        raise SystemExit(f"--expand x --hidden ({inner}) must be a multiple of --head-dim ({args.head_dim})")
    if args.arch == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        config = Mamba2Config(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            state_size=args.state,
            num_hidden_layers=args.layers,
            expand=args.expand,
            head_dim=args.head_dim,
            num_heads=inner // args.head_dim,
            n_groups=args.groups,
            **({"chunk_size": args.chunk} if args.chunk else {}),
            **labels,
            **common,
        )
        return Mamba2ForCausalLM(config), torch.tensor(class_ids)
    from transformers import BambaConfig, BambaForCausalLM

    attn = [int(i) for i in args.attn_layers.split(",") if i.strip()]
    if any(not 0 <= i < args.layers for i in attn):
        raise SystemExit(f"--attn-layers {args.attn_layers} must lie in 0..{args.layers - 1}")
    config = BambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.attn_heads,
        num_key_value_heads=args.attn_heads,
        intermediate_size=args.mlp or 2 * args.hidden,
        attn_layer_indices=attn,
        mamba_expand=args.expand,
        mamba_n_heads=inner // args.head_dim,
        mamba_d_head=args.head_dim,
        mamba_n_groups=args.groups,
        mamba_d_state=args.state,
        **({"mamba_chunk_size": args.chunk} if args.chunk else {}),
        **labels,
        **common,
    )
    return BambaForCausalLM(config), torch.tensor(class_ids)


def budget_lr(step: int, total: int, warmup: float = 0.1) -> float:
    """The learning-rate factor of a ``--time-budget`` run: linear warm-up over ``warmup`` of
    ``total`` steps, then a cosine down to zero at ``total``.

    >>> budget_lr(0, 100), budget_lr(10, 100), round(budget_lr(55, 100), 3), budget_lr(100, 100)
    (0.1, 1.0, 0.5, 0.0)
    """
    import math

    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))


def fit_steps(done: int, seconds: float, budget: float, elapsed: Optional[float] = None) -> int:
    """How many steps fit into ``budget`` seconds when ``done`` steps took ``seconds`` of
    training and ``elapsed`` seconds have passed in all (training and validation; default
    ``seconds``).

    >>> fit_steps(20, 2.0, 60), fit_steps(100, 10.0, 60, elapsed=20.0)
    (600, 500)
    """
    elapsed = seconds if elapsed is None else elapsed
    return max(done, done + int((budget - elapsed) * done / max(seconds, 1e-9)))


def refit_points(first: int = 20) -> Iterator[int]:
    """Steps at which a ``--time-budget`` run re-fits its step count: 20, 40, 80, ... (the first
    steps are slow, with warm-up and, with several runs on one GPU, their start-up side by side;
    on 2026-12-02 a fit at step 20 alone ended a hybrid's 360 s run after 254 s).

    >>> import itertools; list(itertools.islice(refit_points(), 4))
    [20, 40, 80, 160]
    """
    step = first
    while True:
        yield step
        step *= 2


def fused_path_unusable(arch: str) -> bool:
    """Would transformers' Mamba1 in train mode call mamba-ssm's fused ``mamba_inner_fn``, which
    needs causal-conv1d, without it? (mamba-ssm installed, causal-conv1d not.) Mamba has no
    dropout, so such a run trains in eval mode: transformers then takes mamba-ssm's
    ``selective_scan_fn`` (same function, same gradients)."""
    import importlib.util

    found = importlib.util.find_spec
    return arch == "mamba" and found("mamba_ssm") is not None and found("causal_conv1d") is None


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train.txt, val.txt, test.txt (TEXT;LABEL lines)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a deep model's shape (flags given override it)")
    p.add_argument("--arch", choices=["mamba", "mamba2", "hybrid"], default=None, help="default: mamba")
    p.add_argument("--hidden", type=int, default=None, help="d_model (default 128)")
    p.add_argument("--layers", type=int, default=None, help="depth (default 2)")
    p.add_argument("--state", type=int, default=None, help="SSM state size (default 16)")
    p.add_argument("--expand", type=int, default=None, help="inner width / d_model (default 2)")
    p.add_argument("--head-dim", type=int, default=None, help="Mamba2 head size (default 32)")
    p.add_argument("--groups", type=int, default=None, help="Mamba2 B/C groups (default 1)")
    p.add_argument("--attn-layers", default=None, help="hybrid: comma list of attention layer indices (default: the last)")
    p.add_argument("--attn-heads", type=int, default=None, help="hybrid: attention heads (default 4)")
    p.add_argument("--mlp", type=int, default=0, help="hybrid: MLP width (default 2 x d_model)")
    p.add_argument("--chunk", type=int, default=None, help="Mamba2/hybrid: SSD chunk size (default: transformers' 256)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds of training: after 20 steps the step count is cut to what fits (the learning-rate "
        "schedule, warm-up then cosine, follows the cut); 0: the epochs (one-cycle schedule)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU); weights stay float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--every-position",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train on the class at every real token (each prefix), not only the last; the model is still read at the last "
        "(default: the last token only)",
    )
    p.add_argument("--rescale-residual", action="store_true", help="Mamba1/Mamba2: out_proj scaled by 1/sqrt(layers) at init")
    p.add_argument(
        "--init-range",
        type=float,
        default=0.02,
        help="std of the normal init of embeddings and linear layers (transformers' Mamba/Mamba2 default: 0.1)",
    )
    p.add_argument("--eval-every", type=int, default=0, help="also print the validation accuracy every N steps (0: per epoch)")
    args = p.parse_args(argv)
    defaults = dict(
        arch="mamba", hidden=128, layers=2, state=16, expand=2, head_dim=32, groups=1, attn_layers=None, attn_heads=4, chunk=0
    )
    preset = PRESETS.get(args.preset or "", {})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if args.attn_layers is None:
        args.attn_layers = str(args.layers - 1)
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    for split in ("train", "val", "test"):
        if not os.path.isfile(os.path.join(args.data, f"{split}.txt")):
            raise SystemExit(f"no {split}.txt in --data {args.data}: give the Emotion folder (train.txt, val.txt, test.txt)")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = random.Random(args.seed)
    train = read_emotion(os.path.join(args.data, "train.txt"))
    val = read_emotion(os.path.join(args.data, "val.txt"))
    test = read_emotion(os.path.join(args.data, "test.txt"))
    tokenizer = build_word_tokenizer(train[0], args.min_freq)
    if args.arch != "mamba":
        tokenizer = class_tokenizer(tokenizer)
    model, class_ids = build_model(args, tokenizer)
    model = model.to(args.device)
    class_ids = None if class_ids is None else class_ids.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {args.layers} layers, d_model {args.hidden}, {n_params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    per_epoch = (len(train[0]) + args.batch - 1) // args.batch
    steps = args.epochs * per_epoch if not args.max_steps else min(args.max_steps, args.epochs * per_epoch)
    plan = {"steps": steps}  # the step count the schedule follows (cut by --time-budget)
    if args.time_budget or steps < 20:  # OneCycleLR needs a warm-up of at least 2 steps (10 %)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: budget_lr(s, plan["steps"]))
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.amp)
    best, best_state, start, step = -1.0, None, time.time(), 0
    can_run, validating, refits = steps, 0.0, refit_points()  # validating: seconds spent on validation
    refit = next(refits)
    train_mode = not fused_path_unusable(args.arch)
    if not train_mode:
        print("mamba-ssm without causal-conv1d: training in eval mode (no dropout in Mamba; selective_scan_fn)", flush=True)
    for epoch in range(args.epochs):
        model.train(train_mode)
        total, seen = 0.0, 0
        for ids, mask, y in batches(*train, tokenizer, args.batch, True, args.max_len, rng):
            with autocast:
                loss = lm_loss(
                    model, ids.to(args.device), mask.to(args.device), y.to(args.device), class_ids, args.every_position
                )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, seen, step = total + float(loss.detach()) * len(y), seen + len(y), step + 1
            if args.time_budget and step == refit and (step == 20 or step < 0.3 * steps):
                # re-fitted while the schedule is early (its warm-up is the first 10 %)
                elapsed = time.time() - start
                plan["steps"] = steps = min(can_run, fit_steps(step, elapsed - validating, args.time_budget, elapsed))
                print(f"--time-budget {args.time_budget:.0f}s: {steps} steps (fitted at step {step})", flush=True)
                refit = next(refits)
            if args.eval_every and step % args.eval_every == 0:
                t_val = time.time()
                acc = accuracy(model, *val, tokenizer, args.device, args.max_len, class_ids)
                model.train(train_mode)
                validating += time.time() - t_val
                took = time.time() - start
                print(f"step {step}: loss {float(loss.detach()):.4f}  val acc {acc:.4f}  ({took:.0f}s)", flush=True)
            if step >= steps:
                break
        t_val = time.time()
        acc = accuracy(model, *val, tokenizer, args.device, args.max_len, class_ids)
        validating += time.time() - t_val
        loss_mean = total / max(seen, 1)
        print(f"epoch {epoch + 1}: train loss {loss_mean:.4f}  val acc {acc:.4f}  ({time.time() - start:.0f}s)", flush=True)
        if acc > best:
            best, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step >= steps:
            break
    model.load_state_dict(best_state)
    test_acc = accuracy(model, *test, tokenizer, args.device, args.max_len, class_ids)
    print(f"best val acc {best:.4f}  test acc {test_acc:.4f}")
    os.makedirs(args.out, exist_ok=True)
    model.eval().to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    import transformers

    metrics = {
        "val_accuracy": best,
        "test_accuracy": test_acc,
        "n_test": len(test[0]),
        "seconds": time.time() - start,
        "steps": step,
        "parameters": n_params,
        "seed": args.seed,
        "command": command,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "train_mode": "train" if train_mode else "eval (mamba-ssm without causal-conv1d; Mamba has no dropout)",
        "args": {k: v for k, v in vars(args).items() if k != "data"},
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
