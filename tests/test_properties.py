"""Property tests (hypothesis) over random configurations of every supported architecture.

For each drawn case (architecture, layers, width, state size, conv width, expansion, lengths
from 1, batch, padding side, dtype) one model is built and checked for (12 architectures:
transformers Mamba, FalconMamba, Mamba2, mamba-ssm's Mamba1 and Mamba2 LM, Vision Mamba, and
the six transformers hybrids; 64 cases per run, about 45 s on a loaded 2-core machine):

- **conservation**: bias-free models, ``|sum R - explained| <= tol(dtype) * max(|explained|, 1)``;
  bf16 models are also compared, loosely, with the float32 model of the same weights;
- **padding and batch invariance**: a padded batch's relevance on each example's real tokens
  equals that example's relevance alone (unpadded), and is zero on the pads;
- **the model restored bit for bit**: state_dict tensors ``torch.equal``, forward methods,
  hook dicts, training flags, ``requires_grad``, grads, ``module.rule``.

A new architecture is one entry in ``ARCHS``: how to build it from a drawn ``Sizes`` (or
``sizes=False`` for fixed-size models), which composite explains it, and whether its forward
takes an ``attention_mask``. The example budget is fixed (``derandomize=True``), so CI
runs the same cases every time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import pytest
import torch
from conftest import make_lm, zero_biases
from test_api import assert_unchanged, snapshot
from torch import nn

from captum_mambalrp import LayerMambaLRP, MambaLRP

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    layers: int
    hidden: int  # a multiple of 4
    state: int
    conv: int
    expand: int


@dataclasses.dataclass(frozen=True)
class Arch:
    """How to build one architecture for the properties."""

    build: Callable[[Sizes, int], nn.Module]  # (sizes, seed) -> a bias-free model in float32, eval mode
    masks: bool = True  # its forward takes attention_mask (padding is checked)
    composite: str = "mambalrp"
    sizes: bool = True  # built from the drawn sizes (else fixed: only lengths, batch, padding, dtype vary)
    dtypes: tuple = ("float32", "float64", "bfloat16")
    available: Callable[[], Optional[str]] = lambda: None  # why it cannot be built here, or None
    examples: int = 8  # hypothesis examples per run
    images: bool = False  # inputs are images [3, S, S] (S from the built model), not token ids
    # where relevance is conserved, when not at the inputs: a module whose *input* holds it all
    conserved_at: Optional[Callable[[nn.Module], nn.Module]] = None


def _mamba(arch: str) -> Callable[[Sizes, int], nn.Module]:
    def build(s: Sizes, seed: int) -> nn.Module:
        return zero_biases(
            make_lm(
                arch,
                seed,
                num_hidden_layers=s.layers,
                hidden_size=s.hidden,
                state_size=s.state,
                conv_kernel=s.conv,
                expand=s.expand,
                time_step_rank=max(1, s.hidden // 4),
            )
        )

    return build


def _mamba2(s: Sizes, seed: int) -> nn.Module:
    from test_mamba2 import make_mamba2

    head_dim = 4
    heads = s.hidden * s.expand // head_dim
    return make_mamba2(
        seed,
        num_hidden_layers=s.layers,
        hidden_size=s.hidden,
        state_size=s.state,
        conv_kernel=s.conv,
        expand=s.expand,
        num_heads=heads,
        head_dim=head_dim,
        n_groups=2 if heads % 2 == 0 else 1,
        chunk_size=4,
    )


def _mamba_ssm_missing() -> Optional[str]:
    from mamba_ssm_env import load_mamba_ssm

    found, how = load_mamba_ssm()
    return None if found is not None else how


def _mamba_ssm(layer: str) -> Callable[[Sizes, int], nn.Module]:
    def build(s: Sizes, seed: int) -> nn.Module:
        from test_mamba_ssm import make_ssm_lm

        extra = dict(headdim=4, chunk_size=4, ngroups=1) if layer == "Mamba2" else {}
        return make_ssm_lm(
            layer, seed, d_model=s.hidden, n_layer=s.layers, d_state=s.state, d_conv=s.conv, expand=s.expand, **extra
        )

    return build


ARCHS: Dict[str, Arch] = {
    "mamba": Arch(_mamba("mamba")),
    "falcon_mamba": Arch(_mamba("falcon")),
    "mamba2": Arch(_mamba2),
    # mamba-ssm's MambaLMHeadModel (its real module definitions on CPU, tests/mamba_ssm_env.py): no attention_mask
    "mamba_ssm_mamba1": Arch(_mamba_ssm("Mamba1"), masks=False, available=_mamba_ssm_missing),
    "mamba_ssm_mamba2": Arch(_mamba_ssm("Mamba2"), masks=False, available=_mamba_ssm_missing),
}


def _hybrid(family: str) -> Callable[[Sizes, int], nn.Module]:
    def build(s: Sizes, seed: int) -> nn.Module:
        from test_hybrids import build as build_hybrid

        return build_hybrid(family, seed)

    return build


def _hybrid_missing(family: str) -> Callable[[], Optional[str]]:
    def why() -> Optional[str]:
        import transformers
        from test_hybrids import FAMILIES

        model_cls = FAMILIES[family][0]
        return None if hasattr(transformers, model_cls) else f"{model_cls} is not in transformers {transformers.__version__}"

    return why


def _vim(s: Sizes, seed: int) -> nn.Module:
    from test_vim import make_vim

    # sequence length: the image side in 8-pixel patches is the drawn conv width - 1 (1 to 9 patches, plus the class token)
    side = 8 * (s.conv - 1)
    return make_vim(seed, img_size=side, patch_size=8, stride=8, depth=s.layers, embed_dim=2 * s.hidden, d_state=s.state)


# Vision Mamba: the class token and position embeddings are learned inputs (like biases), so the
# score is conserved at the sequence the blocks read (tests/test_vim.py), not at the pixels
ARCHS["vision_mamba"] = Arch(
    _vim, masks=False, images=True, dtypes=("float32", "float64"), examples=6, conserved_at=lambda m: m.layers[0]
)

# transformers' hybrids (attention, MLP, MoE and SSM layers; tests/test_hybrids.py builds them at fixed tiny sizes)
for _family in ("jamba", "bamba", "zamba2", "nemotron_h", "granite", "falcon_h1"):
    ARCHS[f"hybrid_{_family}"] = Arch(
        _hybrid(_family),
        composite="conservative",
        sizes=False,
        dtypes=("float32", "float64"),
        available=_hybrid_missing(_family),
        examples=2,
    )

# conservation: |sum R - explained| <= TOL * max(|explained|, 1); invariance: atol/rtol on relevance
CONSERVATION = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 5e-2}
INVARIANCE = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 2e-2}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
COUNTS: Dict[str, int] = {}  # cases run per architecture


@dataclasses.dataclass
class Case:
    arch: str
    sizes: Sizes
    lengths: List[int]
    pads: List[int]  # extra padding per example beyond the longest
    side: str
    dtype: str
    seed: int
    target: int


@st.composite
def cases(draw, name: str) -> Case:
    arch = ARCHS[name]
    sizes = Sizes(
        layers=draw(st.integers(1, 3)),
        hidden=draw(st.sampled_from([4, 8, 16])),
        state=draw(st.integers(1, 4)),
        conv=draw(st.integers(2, 4)),
        expand=draw(st.sampled_from([1, 2])),
    )
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch))
    pads = draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch))
    return Case(
        arch=name,
        sizes=sizes,
        lengths=lengths,
        pads=pads,
        side=draw(st.sampled_from(["left", "right"])),
        dtype=draw(st.sampled_from(arch.dtypes)),
        seed=draw(st.integers(0, 2**16)),
        target=draw(st.integers(0, VOCAB - 1)),
    )


def build(case: Case) -> nn.Module:
    return ARCHS[case.arch].build(case.sizes, case.seed)


def padded(seqs: List[torch.Tensor], extra: List[int], side: str):
    """Sequences of different lengths in one batch, padded on ``side`` (token 0, mask 0)."""
    length = max(len(s) + e for s, e in zip(seqs, extra))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return ids, mask


def check_case(case: Case) -> None:
    arch = ARCHS[case.arch]
    model = build(case).to(DTYPES[case.dtype])
    COUNTS[case.arch] = COUNTS.get(case.arch, 0) + 1
    g = torch.Generator().manual_seed(case.seed)
    if arch.images:
        side = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 8 * (case.sizes.conv - 1)
        seqs = [torch.randn(3, side, side, generator=g, dtype=DTYPES[case.dtype]) for _ in case.lengths]
    else:
        seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in case.lengths]
    before = snapshot(model)
    lrp = MambaLRP(model, composite=arch.composite)
    classes = model.head.out_features if arch.images else VOCAB

    # conservation, each example alone
    alone = []
    conserving = None if arch.conserved_at is None else LayerMambaLRP(model, arch.conserved_at(model), composite=arch.composite)
    for s in seqs:
        relevance, delta = lrp.attribute(s[None], target=case.target % classes, return_convergence_delta=True)
        explained = relevance.sum() + delta
        if conserving is not None:
            at_layer, delta = conserving.attribute(
                s[None], target=case.target % classes, attribute_to_layer_input=True, return_convergence_delta=True
            )
            assert torch.allclose(at_layer.sum() + delta, explained, rtol=1e-5, atol=1e-6)  # the same score explained
        assert torch.isfinite(relevance).all()
        assert delta.abs().max() <= CONSERVATION[case.dtype] * max(explained.abs().max().item(), 1.0), (delta, explained)
        alone.append(relevance[0])
    atol = rtol = INVARIANCE[case.dtype]
    scale = max(max(a.abs().max().item() for a in alone), 1e-3)

    # padding and batch invariance
    if arch.masks:
        ids, mask = padded(seqs, case.pads, case.side)
        batched = lrp.attribute(ids, target=case.target, attention_mask=mask)
        assert (batched[mask == 0] == 0).all()
        for i, a in enumerate(alone):
            assert torch.allclose(batched[i][mask[i] == 1], a, atol=atol * scale, rtol=rtol), (i, batched[i], a)
    else:  # no mask: a batch of equal lengths
        n = min(len(s) for s in seqs)
        batched = lrp.attribute(torch.stack([s[:n] for s in seqs]), target=case.target % classes)
        for i, s in enumerate(seqs):
            one = lrp.attribute(s[None, :n], target=case.target % classes)[0]
            assert torch.allclose(batched[i], one, atol=atol * scale, rtol=rtol)

    # bf16: loosely the float32 model's relevance
    if case.dtype == "bfloat16":
        reference = build(case)
        for s, a in zip(seqs, alone):
            r32 = MambaLRP(reference, composite=arch.composite).attribute(
                s[None].float() if arch.images else s[None], target=case.target % classes
            )[0]
            assert (a - r32).abs().max() <= 0.1 * r32.abs().max() + 5e-2, (a, r32)

    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(ARCHS))
def test_properties(name):
    """A fixed budget of random cases per architecture (derandomized: the same cases every run)."""
    arch = ARCHS[name]
    why = arch.available()
    if why is not None:
        pytest.skip(f"{name} cannot be built here: {why}")

    @settings(
        max_examples=arch.examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases(name))
    def run(case):
        check_case(case)

    COUNTS[name] = 0
    run()
    assert COUNTS[name] >= arch.examples
    print(f"{name}: {COUNTS[name]} property cases")
