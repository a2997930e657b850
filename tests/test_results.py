"""Saved attribution results: the file round-trips bit for bit, records where a result came
from, refuses what it cannot read, and feeds the terminal, the HTML page and the dashboard."""

from __future__ import annotations

import json
import re

import pytest
import torch

from captum_mambalrp import MambaLRP
from captum_mambalrp.cli import main
from captum_mambalrp.dashboard import load_result_views, render_page
from captum_mambalrp.dashboard.demo import make_demo_checkpoint
from captum_mambalrp.models import load_model_and_tokenizer
from captum_mambalrp.results import SCHEMA, AttributionResult, config_hash, load_results, records, save_results
from captum_mambalrp.text import explain_texts
from captum_mambalrp.visualization import captum_html

TEXTS = ["i feel so happy and loved today", "what a scary night"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    ckpt = make_demo_checkpoint(str(folder / "ckpt"))
    model, tokenizer = load_model_and_tokenizer(ckpt)
    lrp = MambaLRP(model)
    explanations = explain_texts(model, tokenizer, TEXTS, target="joy", lrp=lrp)
    results = [AttributionResult.from_explanation(e, model, lrp, model_name="demo", composite="mambalrp") for e in explanations]
    path = save_results(folder / "results.json", results)
    return model, tokenizer, explanations, results, path


def test_round_trip_bit_for_bit(saved):
    model, tokenizer, explanations, results, path = saved
    loaded = load_results(path)
    assert len(loaded) == 2
    for e, r, back in zip(explanations, results, loaded):
        assert back.relevance.dtype == torch.float32 and torch.equal(back.relevance, e.relevance.float())  # exact
        assert back.to_dict() == r.to_dict()
        assert back.tokens == e.tokens and back.text == e.text
        assert (back.target_index, back.target_name) == (1, "joy") and back.explained == e.explained and back.delta == e.delta
    ids = tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    assert torch.allclose(loaded[0].relevance, MambaLRP(model).attribute(ids, target=1)[0], atol=1e-6)  # what it says it is
    assert float(loaded[0].relevance.sum()) == pytest.approx(loaded[0].explained, abs=1e-5)  # bias-free: conservative


def test_provenance(saved):
    model, _, _, results, path = saved
    data = json.loads(open(path, encoding="utf-8").read())
    assert data["schema"] == SCHEMA and data["version"] == 1
    r = data["results"][0]
    assert r["model"]["name"] == "demo" and r["model"]["class"] == "MambaForLastTokenClassification"
    assert r["model"]["config_hash"] == config_hash(model) and re.fullmatch(r"[0-9a-f]{16}", r["model"]["config_hash"])
    assert r["rules"] == MambaLRP(model).rule_table() and any("ssm" in k for k in r["rules"])
    assert set(r["versions"]) == {"captum_mambalrp", "torch", "transformers", "captum", "python"}
    assert r["versions"]["torch"] == torch.__version__
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", r["created"])
    other = _config_variant(model)
    assert config_hash(other) != config_hash(model)


def _config_variant(model):
    import copy

    other = copy.deepcopy(model)
    other.config.state_size = model.config.state_size + 1
    return other


def test_refusals(tmp_path, saved):
    path = saved[-1]
    with pytest.raises(FileNotFoundError, match="no such results file"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="not a results file"):
        load_results(tmp_path / "text.json")
    (tmp_path / "other.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a captum-mambalrp results file"):
        load_results(tmp_path / "other.json")
    data = json.loads(open(path, encoding="utf-8").read())
    (tmp_path / "newer.json").write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(ValueError, match="schema version 2; this captum-mambalrp reads up to 1: upgrade"):
        load_results(tmp_path / "newer.json")
    del data["results"][1]["relevance"]
    (tmp_path / "broken.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="result 1: a result lacks the field 'relevance'"):
        load_results(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="one relevance value per token: 2 tokens, 1 values"):
        AttributionResult(tokens=["a", "b"], relevance=[1.0], target_index=0, target_name="x", explained=1.0)
    with pytest.raises(ValueError, match="no results to save"):
        save_results(tmp_path / "empty.json", [])


def test_saved_results_feed_the_visualisers(saved):
    _, _, explanations, _, path = saved
    loaded = load_results(path)
    line = loaded[0].heatmap(color=False)
    assert line.split()[0].startswith("i(") and len(line.split()) == len(loaded[0].tokens)
    page = captum_html(records(loaded))
    assert page.count("<mark") == sum(len(r.tokens) for r in loaded) and "joy" in page
    top = int(loaded[0].relevance.argmax())
    assert (
        f'<mark style="background-color:rgb(255, 0, 0);color:#fff" data-relevance="1" title="+1.000">{loaded[0].tokens[top]}'
        in page
    )


def test_dashboard_shows_a_saved_result(saved, tmp_path, capsys):
    path = saved[-1]
    views = load_result_views([path])
    assert [v["text"] for v in views] == TEXTS and views[0]["layers"] is None
    assert views[0]["methods"][0]["relevance"] == load_results(path)[0].relevance.tolist()
    assert views[0]["saved"]["model"] == "demo" and views[0]["words"][0] == ["i", [0]]
    out = tmp_path / "view.html"
    ckpt = make_demo_checkpoint(str(tmp_path / "ckpt"))
    assert main(["dashboard", "--model", ckpt, "--result", str(path), "--export", str(out), "--methods", ""]) == 0
    assert "dashboard with 2 text(s) written to" in capsys.readouterr().out
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', out.read_text(), re.S).group(1))
    assert [r["text"] for r in data["results"]] == TEXTS and data["results"][1]["saved"]["file"] == "results.json"
    page = render_page({"source": "x", "composite": "mambalrp", "layers": []}, views)
    assert "results.json" in page


def test_dashboard_saves_results_that_load_again(tmp_path):
    from captum_mambalrp.dashboard import DashboardApp, start_in_thread
    from captum_mambalrp.dashboard.demo import demo_explainer
    from captum_mambalrp.dashboard.loadtest import request

    explainer = demo_explainer(str(tmp_path / "demo"), ig_steps=4)
    server, url = start_in_thread(DashboardApp(explainer))
    try:
        status, body = request(url, "POST", "/api/explain", {"text": "<b>i</b> feel so happy", "methods": ["saliency"]})
        view = json.loads(body)
        status, body = request(url, "POST", "/api/save", {"results": [view]})
        assert status == 200 and b"<b>" not in body  # markup escaped in the file too (valid JSON all the same)
        (tmp_path / "saved.json").write_bytes(body)
        (kept,) = load_results(tmp_path / "saved.json")
        assert kept.tokens == view["tokens"] and kept.relevance.tolist() == view["methods"][0]["relevance"]
        assert kept.target_name == view["target"]["label"] and kept.explained == view["target"]["logit"]
        assert (
            kept.model["name"] == explainer.source and kept.rules == explainer.lrp.rule_table() and kept.composite == "mambalrp"
        )
        # a saved result shown again and saved again comes back as it was
        again = load_result_views([str(tmp_path / "saved.json")])
        status, body = request(url, "POST", "/api/save", {"results": again})
        assert status == 200 and json.loads(body)["results"][0] == kept.to_dict()
        for bad in ({"results": []}, {"results": [{"tokens": ["a"]}]}, {"results": "x"}):
            status, body = request(url, "POST", "/api/save", bad)
            assert status == 400 and json.loads(body)["error"].startswith(("Nothing to save", "Cannot save"))
    finally:
        server.shutdown()
        server.server_close()
