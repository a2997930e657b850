#!/usr/bin/env python3
"""Train a Mamba text classifier on Emotion (class logit read at the last token).

    python scripts/train_classifier.py --out captum_mambalrp/default_model            # the embedded default (CPU)
    python scripts/train_classifier.py --hidden 768 --layers 24 --device cuda --out runs/emotion-130m

Writes a transformers folder (config, weights, tokenizer) and ``metrics.json`` with the
validation and test accuracy. The data stays where it is (``--data``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from captum_mambalrp.datasets import EMOTION_LABELS, default_emotion_dir, read_emotion  # noqa: E402
from captum_mambalrp.models.classifier import MambaForLastTokenClassification  # noqa: E402
from captum_mambalrp.models.tokenizer import build_word_tokenizer  # noqa: E402


def batches(texts, labels, tokenizer, batch_size, shuffle, max_len, rng):
    """Length-bucketed, right-padded batches."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].split()))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in chunk])


@torch.no_grad()
def accuracy(model, texts, labels, tokenizer, device, max_len):
    model.eval()
    correct = 0
    for ids, mask, y in batches(texts, labels, tokenizer, 256, False, max_len, None):
        probs = model.predict(ids.to(device), mask.to(device))
        correct += int((probs.argmax(-1).cpu() == y).sum())
    return correct / len(texts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=default_emotion_dir(), help="folder with train.txt, val.txt, test.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.data:
        p.error("no Emotion data found: pass --data DIR")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = read_emotion(os.path.join(args.data, "train.txt"))
    val = read_emotion(os.path.join(args.data, "val.txt"))
    test = read_emotion(os.path.join(args.data, "test.txt"))
    tokenizer = build_word_tokenizer(train[0], args.min_freq)

    from transformers import MambaConfig

    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        state_size=args.state,
        num_hidden_layers=args.layers,
        expand=args.expand,
        num_labels=len(EMOTION_LABELS),
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(EMOTION_LABELS)),
        label2id={l: i for i, l in enumerate(EMOTION_LABELS)},
        use_cache=False,
        tie_word_embeddings=False,
    )
    model = MambaForLastTokenClassification(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(train[0]) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    best, best_state, start = -1.0, None, time.time()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for ids, mask, y in batches(*train, tokenizer, args.batch, True, args.max_len, rng):
            loss = model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), labels=y.to(args.device)).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
        acc = accuracy(model, *val, tokenizer, args.device, args.max_len)
        print(
            f"epoch {epoch + 1}: train loss {total / len(train[0]):.4f}  val acc {acc:.4f}  ({time.time() - start:.0f}s)",
            flush=True,
        )
        if acc > best:
            best, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_acc = accuracy(model, *test, tokenizer, args.device, args.max_len)
    print(f"best val acc {best:.4f}  test acc {test_acc:.4f}")
    os.makedirs(args.out, exist_ok=True)
    model.eval().to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    metrics = {
        "val_accuracy": best,
        "test_accuracy": test_acc,
        "n_test": len(test[0]),
        "seconds": time.time() - start,
        "args": {k: v for k, v in vars(args).items() if k != "data"},
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    main()
