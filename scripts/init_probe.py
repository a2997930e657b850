#!/usr/bin/env python3
"""How a deep model built from a config behaves at initialization (docs/results.md, "Deeper
models"): the residual stream's RMS after blocks 1, 12 and 24, and how the last token's final
state depends on the tokens before it (the share of its gradient norm on each position).

    python scripts/init_probe.py            # Mamba1, Mamba2 at std 0.1 and 0.02; Bamba at 0.02

24 layers, d_model 768, 24 random tokens, seed 0; CPU, about a minute.
"""

from __future__ import annotations

import torch
from transformers import BambaConfig, BambaModel, Mamba2Config, Mamba2Model, MambaConfig, MambaModel

LENGTH, LAYERS, HIDDEN = 24, 24, 768


def probe(model, length: int = LENGTH) -> dict:
    rms = {}
    layers = len(model.layers)
    for i in (0, layers // 2 - 1, layers - 1):

        def keep(module, args, out, i=i):
            out = out[0] if isinstance(out, tuple) else out
            rms[i + 1] = float(out.detach().float().pow(2).mean().sqrt())

        model.layers[i].register_forward_hook(keep)
    ids = torch.randint(10, 100, (1, length), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    last = model(inputs_embeds=emb).last_hidden_state[0, -1]
    (grad,) = torch.autograd.grad(last.norm(), emb)
    share = grad[0].norm(dim=-1)
    share = share / share.sum()
    return dict(
        embedding_rms=float(emb.detach().pow(2).mean().sqrt()),
        block_rms=rms,
        share_last4=float(share[-4:].sum()),
        share_first_half=float(share[: length // 2].sum()),
    )


def models():
    for std in (0.1, 0.02):
        yield (
            "Mamba1",
            std,
            lambda s=std: MambaModel(
                MambaConfig(
                    vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=16, expand=2, initializer_range=s
                )
            ),
        )
        yield (
            "Mamba2",
            std,
            lambda s=std: Mamba2Model(
                Mamba2Config(
                    vocab_size=100,
                    hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS,
                    state_size=128,
                    head_dim=64,
                    num_heads=2 * HIDDEN // 64,
                    expand=2,
                    chunk_size=64,
                    initializer_range=s,
                )
            ),
        )
    yield (
        "Bamba",
        0.02,
        lambda: BambaModel(
            BambaConfig(
                vocab_size=100,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=12,
                num_key_value_heads=12,
                intermediate_size=2 * HIDDEN,
                attn_layer_indices=[5, 11, 17, 23],
                mamba_expand=2,
                mamba_n_heads=2 * HIDDEN // 64,
                mamba_d_head=64,
                mamba_d_state=128,
                mamba_chunk_size=64,
                initializer_range=0.02,
            )
        ),
    )


def main() -> None:
    print("| model | init std | embedding RMS | RMS after blocks 1 / 12 / 24 | gradient share: last 4 / first 12 tokens |")
    print("| :--- | ---: | ---: | :--- | :--- |")
    for name, std, build in models():
        torch.manual_seed(0)
        r = probe(build())
        blocks = " / ".join(f"{v:.3g}" for _, v in sorted(r["block_rms"].items()))
        print(f"| {name} | {std} | {r['embedding_rms']:.3f} | {blocks} | {r['share_last4']:.2f} / {r['share_first_half']:.2f} |")


if __name__ == "__main__":
    main()
