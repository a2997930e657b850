"""The evaluation package's structure: no import cycle, one find_blocks for every supported
layout (hybrids included), one reference-token fallback, constructors that write nothing."""

from __future__ import annotations

import ast
import os

import torch
from conftest import make_config, make_lm
from torch import nn

import captum_mambalrp.evaluation as evaluation
from captum_mambalrp.evaluation import Study, StudyConfig, find_blocks
from captum_mambalrp.evaluation.perturbation import reference_token_id

PACKAGE = os.path.dirname(evaluation.__file__)


def _local_imports(path: str) -> set:
    """Modules of the evaluation package imported at module level by ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module.split(".")[0] if node.module else "")
    return out


def test_evaluation_modules_form_no_import_cycle():
    graph = {f[:-3]: _local_imports(os.path.join(PACKAGE, f)) for f in os.listdir(PACKAGE) if f.endswith(".py")}
    graph.pop("__init__")
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(stack + [nxt])}"
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert "methods" not in graph["hidden_attention"] and "base" in graph["hidden_attention"]


def test_find_blocks_mamba1_mamba2_and_a_hybrid_layer_list():
    from transformers import Mamba2Config, Mamba2Model
    from transformers.models.mamba.modeling_mamba import MambaBlock

    lm = make_lm()
    assert [n for n, _ in find_blocks(lm)] == ["backbone.layers.0", "backbone.layers.1"]
    m2 = Mamba2Model(Mamba2Config(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=3, num_heads=4, head_dim=8))
    assert [n for n, _ in find_blocks(m2)] == ["layers.0", "layers.1", "layers.2"]

    class Attention(nn.Module):  # an attention layer of a hybrid: no Mamba mixer inside
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.MultiheadAttention(16, 2)

    class Hybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(16, 2)])  # a ModuleList before the layers
            self.model = nn.Module()
            cfg = make_config()
            self.model.layers = nn.ModuleList([MambaBlock(cfg, 0), Attention(), MambaBlock(cfg, 1)])

    hybrid = Hybrid()
    assert [n for n, _ in find_blocks(hybrid)] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert [n for n, _ in find_blocks(hybrid, mamba_only=True)] == ["model.layers.0", "model.layers.2"]
    assert find_blocks(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))) == []


def test_dashboard_and_compare_share_find_blocks_and_the_reference_token():
    from captum_mambalrp.dashboard import explain

    assert explain.find_blocks is find_blocks and explain.reference_token_id is reference_token_id

    class Tok:
        pad_token_id = None
        unk_token_id = 3

    assert reference_token_id(Tok()) == 3
    Tok.pad_token_id = 5
    assert reference_token_id(Tok()) == 5
    assert reference_token_id(object()) == 0


def test_constructing_a_study_writes_and_deletes_nothing(tmp_path):
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["a b c"], min_freq=1)
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.jsonl").write_text('{"method": "x", "index": 0}\n')
    lm = make_lm(vocab_size=len(tok))
    Study(lm, tok, ["a b", "c"], None, StudyConfig(methods=["random"]), str(out), overwrite=True)
    assert os.listdir(out) == ["results.jsonl"]
    assert torch.is_tensor(lm.backbone.embeddings.weight)
