"""Flipping metrics on hand-built models whose answers are known in closed form."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from captum_mambalrp.evaluation import Perturbation, flipping_scores, perturbation_curves
from captum_mambalrp.evaluation.analysis import distance_profile
from captum_mambalrp.evaluation.perturbation import area, removal_ranks, removed_counts
from captum_mambalrp.evaluation.scores import ForwardCounter
from captum_mambalrp.evaluation.stats import mean_se, paired_difference


class TokenSum(nn.Module):
    """``logits = [s, -s]`` with ``s = sum_t w[id_t]`` over real tokens: a linear function of
    token indicators (embedding size 1 holds ``w``)."""

    def __init__(self, weights) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(weights), 1)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor(weights, dtype=torch.float32)[:, None])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        m = torch.ones(e.shape[:2]) if attention_mask is None else attention_mask.float()
        s = (e[..., 0] * m).sum(1)
        return torch.stack([s, -s], dim=-1)


W = [0.0, 3.0, -1.0, 2.0, 0.0]  # id 0 is the neutral token (weight 0)


def curves_for(relevance, ids=((1, 2, 3, 4),), mask=None, fraction=0.25, **kw):
    model = TokenSum(W)
    ids = torch.tensor(ids)
    return perturbation_curves(
        model,
        ids,
        mask,
        torch.tensor(relevance, dtype=torch.float32),
        torch.zeros(len(ids), dtype=torch.long),
        Perturbation(fraction, kw.pop("replacement", "token"), kw.pop("token_id", 0)),
        **kw,
    )


def test_hand_computed_curves_and_scores():
    # tokens weigh [3, -1, 2, 0]; relevance = the true contributions
    config = Perturbation(0.25, "token", 0)
    curves = curves_for([[3.0, -1.0, 2.0, 0.0]])
    assert curves["morf"][0].tolist() == [4, 1, -1, -1, 0]  # remove 3, 2, 0, -1
    assert curves["lerf"][0].tolist() == [4, 5, 5, 3, 0]  # remove -1, 0, 2, 3
    assert curves["morf_insert"][0].tolist() == [0, 3, 5, 5, 4]
    assert curves["lerf_insert"][0].tolist() == [0, -1, -1, 1, 4]
    s = flipping_scores(curves, config)
    assert s["A_morf"].item() == pytest.approx(0.25)
    assert s["A_lerf"].item() == pytest.approx(3.75)
    assert s["dAF"].item() == pytest.approx(3.5)
    assert s["dAI"].item() == pytest.approx(3.5)


def test_true_contributions_give_the_best_order():
    """For a linear model, ordering by the true contributions maximises dAF over all orders."""
    config = Perturbation(0.25, "token", 0)
    truth = [3.0, -1.0, 2.0, 0.0]
    best = flipping_scores(curves_for([truth]), config)["dAF"].item()
    for perm in itertools.permutations(range(4)):
        rel = [float(4 - perm.index(i)) for i in range(4)]  # an arbitrary strict order
        assert flipping_scores(curves_for([rel]), config)["dAF"].item() <= best + 1e-9
    reverse = flipping_scores(curves_for([[-v for v in truth]]), config)["dAF"].item()
    assert reverse == pytest.approx(-best)


class SeenInputs(TokenSum):
    """TokenSum squashed (so that scores do not add up) that records every input row it sees."""

    def __init__(self, weights) -> None:
        super().__init__(weights)
        self.seen: list = []

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        self.seen += [tuple(row.flatten().tolist()) for row in inputs_embeds]
        return torch.tanh(super().forward(input_ids, attention_mask, inputs_embeds))


def step_by_step_curves(model, ids, relevance, target, config, generator=None):
    """The curves one step at a time, all four at each step (the definition, unbatched)."""
    from captum_mambalrp.evaluation.perturbation import CURVES, replacement_vector

    real = torch.ones_like(ids, dtype=torch.bool)
    ranks = {True: removal_ranks(relevance, real, True, generator), False: removal_ranks(relevance, real, False, generator)}
    counts = removed_counts(real.sum(1), config)
    embeds = model.get_input_embeddings()(ids)
    fill = replacement_vector(model.get_input_embeddings(), config)
    out = {c: torch.empty(len(ids), config.steps + 1, dtype=torch.float64) for c in CURVES}
    for k in range(config.steps + 1):
        for c in CURVES:
            first = ranks[c.startswith("morf")] < counts[k][:, None]
            swap = first if not c.endswith("_insert") else real & ~first
            x = torch.where(swap[..., None], fill, embeds)
            out[c][:, k] = model(inputs_embeds=x)[torch.arange(len(ids)), target].double()
    return out


def test_each_distinct_input_is_forwarded_once():
    torch.manual_seed(0)
    weights = torch.randn(51).tolist()
    ids = torch.arange(1, 51).reshape(5, 10)  # every token distinct: rows differ between examples
    relevance, target = torch.randn(5, 10), torch.tensor([0, 1, 0, 1, 1])
    config = Perturbation(0.1, "token", 0)
    model = SeenInputs(weights)
    with ForwardCounter(model) as fc:
        curves = perturbation_curves(model, ids, None, relevance, target, config, generator=torch.Generator().manual_seed(3))
    # each example's inputs are forwarded once (only the fully replaced input is the same for
    # all five examples): fewer rows than 4 curves x 11 steps
    assert len(model.seen) == fc.count.rows == len(set(model.seen)) + 4 < 4 * 11 * 5
    assert fc.count.calls == -(-fc.count.rows // (4 * 5))  # rows per forward: 4 curves x the batch
    reference = step_by_step_curves(SeenInputs(weights), ids, relevance, target, config, torch.Generator().manual_seed(3))
    for name, curve in reference.items():
        assert torch.allclose(curves[name], curve, atol=1e-6), name
    # the insertion curves revisit the deletion curves' inputs in reverse (10 tokens: whole
    # tokens per step, so no count rounds half-way)
    assert torch.allclose(curves["morf_insert"], curves["lerf"].flip(-1), atol=1e-6)


def test_padding_is_ignored():
    rel = [[3.0, -1.0, 2.0, 0.0, 9.0, 9.0]]
    padded = curves_for(rel, ids=((1, 2, 3, 4, 0, 0),), mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    plain = curves_for([[3.0, -1.0, 2.0, 0.0]])
    for k in plain:
        assert torch.equal(padded[k], plain[k])


@pytest.mark.parametrize("replacement, removed_value", [("zero", 0.0), ("mean", sum(W) / len(W)), ("token", 2.0)])
def test_replacements(replacement, removed_value):
    curves = curves_for([[3.0, -1.0, 2.0, 0.0]], replacement=replacement, token_id=3)
    assert curves["morf"][0, -1].item() == pytest.approx(4 * removed_value)  # everything replaced
    assert curves["morf"][0, 1].item() == pytest.approx(4 - 3 + removed_value)  # the 3 replaced


def test_step_counts_and_area():
    config = Perturbation(0.5)
    assert config.grid().tolist() == [0.0, 0.5, 1.0]
    assert removed_counts(torch.tensor([1, 3, 4]), config).tolist() == [[0, 0, 0], [1, 2, 2], [1, 3, 4]]
    assert Perturbation(0.3).grid().tolist() == pytest.approx([0, 0.3, 0.6, 0.9, 1.0])
    assert area(torch.tensor([1.0, 1.0, 1.0]), config.grid()).item() == pytest.approx(1.0)
    assert area(torch.tensor([0.0, 1.0, 0.0]), config.grid()).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Perturbation(0.0)
    with pytest.raises(ValueError):
        Perturbation(0.1, "delete")


def test_ties_and_padding_in_ranks():
    rel = torch.tensor([[1.0, 1.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    ranks = removal_ranks(rel, mask, True)
    assert ranks.tolist() == [[1, 2, 0, 3]]  # ties by position, padding last
    assert removal_ranks(rel, mask, False).tolist() == [[0, 1, 2, 3]]
    g = torch.Generator().manual_seed(0)
    seen = {tuple(removal_ranks(rel, mask, True, g)[0].tolist()) for _ in range(20)}
    assert seen <= {(1, 2, 0, 3), (2, 1, 0, 3)} and len(seen) == 2  # random tie-breaking


def test_distance_profile_normalises_and_reindexes():
    p = distance_profile([[1.0, 3.0], [0.0, -2.0, 2.0]])
    # distance 0 is the last token: 3/4 and 2/4; distance 1: 1/4 and -2/4; distance 2: 0
    assert p.mean.tolist() == pytest.approx([0.625, -0.125, 0.0])
    assert p.count.tolist() == [2, 2, 1]


def test_mean_se_and_paired():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    d, dse = paired_difference([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])
    assert d == pytest.approx(1.0) and dse == pytest.approx(0.0)


def test_aopc_and_abpc_by_hand():
    """AOPC = mean_k (s_0 - s_k^MoRF); ABPC = mean_k (s_k^LeRF - s_k^MoRF) (three points, f = 0.5)."""
    curves = {"morf": torch.tensor([[2.0, 0.0, -1.0]]), "lerf": torch.tensor([[2.0, 2.0, -1.0]])}
    scores = flipping_scores(curves, Perturbation(0.5))
    assert float(scores["AOPC"][0]) == pytest.approx((0 + 2 + 3) / 3)
    assert float(scores["ABPC"][0]) == pytest.approx((0 + 2 + 0) / 3)
    assert float(scores["dAF"][0]) == pytest.approx(0.5 * (0 + 2) / 2 + 0.5 * (2 + 0) / 2)
