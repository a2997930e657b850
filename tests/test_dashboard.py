"""The dashboard without a browser: its numbers against the Python API, limits, the page,
the study folder, the HTTP server and the command line."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import FeatureAblation, InputXGradient, LayerIntegratedGradients

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.cli import main
from captum_mambalrp.dashboard import DashboardApp, InputError, Limits, load_study, render_page, start_in_thread
from captum_mambalrp.dashboard.demo import demo_explainer, make_demo_checkpoint
from captum_mambalrp.evaluation.scores import LastTokenScores

TEXT = "i feel so happy and loved today"


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    return demo_explainer(str(tmp_path_factory.mktemp("demo")), limits=Limits(max_chars=300, max_tokens=20), ig_steps=16)


def write_study(folder) -> None:
    """A study folder as ``compare --out`` writes it: summary table (CSV and Markdown), curves."""
    import matplotlib.pyplot as plt

    folder.mkdir(exist_ok=True)
    (folder / "summary.csv").write_text("method,dAF\nMambaLRP,1.5 ± 0.1\n<b>GxI</b>,0.4 ± 0.1\n")
    (folder / "summary.md").write_text("| method | dAF |\n|---|---|\n| MambaLRP | 1.5 |\n")
    (folder / "results.md").write_text("# notes\n\n| a | b |\n|:-:|--|\n| 1 | 2 |\n| 3 | 4 |\n")
    (folder / "per_example.csv").write_text("id,score\n" + "".join(f"{i},0.1\n" for i in range(50)))
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    fig.savefig(folder / "flipping_curves.png")
    plt.close(fig)
    (folder / "fake.png").write_text("not a png")


def test_values_match_the_python_api(explainer):
    model, tokenizer = explainer.model, explainer.tokenizer
    view = explainer.explain(TEXT)  # the default methods: Captum's InputXGradient, IG, occlusion of tokens
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    scores = LastTokenScores(model)(ids).detach()[0]
    target = int(scores.argmax())
    assert view["tokens"] == TEXT.split() and view["target"]["index"] == target
    assert view["prediction"]["label"] == model.config.id2label[target]
    assert view["target"]["logit"] == pytest.approx(float(scores[target]), abs=1e-5)
    rows = {m["key"]: torch.tensor(m["relevance"]) for m in view["methods"]}
    assert list(rows) == ["mambalrp", "input_x_gradient", "integrated_gradients", "feature_ablation"]
    lrp, delta = MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True)
    assert torch.allclose(rows["mambalrp"], lrp[0], atol=1e-6)
    assert view["delta"] == pytest.approx(float(delta[0]), abs=1e-6) and abs(view["delta"]) < 1e-5
    forward, pad = LastTokenScores(model), torch.full_like(ids, tokenizer.pad_token_id)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    gxi = InputXGradient(forward).attribute(embeds, target=target)[0].sum(-1)
    assert torch.allclose(rows["input_x_gradient"], gxi, atol=1e-6)
    ig = (
        LayerIntegratedGradients(forward, model.get_input_embeddings())
        .attribute(ids, baselines=pad, target=target, n_steps=16)[0]
        .sum(-1)
    )
    assert torch.allclose(rows["integrated_gradients"], ig, atol=1e-5)
    occ = FeatureAblation(forward).attribute(ids, baselines=pad, target=target, feature_mask=torch.arange(ids.shape[1])[None])[0]
    assert torch.allclose(rows["feature_ablation"], occ.float(), atol=1e-6)
    # relevance per layer: LayerMambaLRP at the embedding and every block, each summing to the logit
    layers = view["layers"]
    assert layers["names"] == ["embedding", "backbone.layers.0", "backbone.layers.1"]
    expected = LayerMambaLRP(model, [model.backbone.embeddings, *model.backbone.layers]).attribute(ids, target=target)
    for row, rel in zip(layers["relevance"], expected):
        assert torch.allclose(torch.tensor(row), rel[0].sum(-1), atol=1e-6)
    assert layers["totals"] == pytest.approx([view["target"]["logit"]] * 3, abs=1e-5)


def test_target_by_name_and_refusals(explainer):
    view = explainer.explain("i feel sad", target="fear", methods=[])
    assert view["target"]["label"] == "fear" and [m["key"] for m in view["methods"]] == ["mambalrp"]
    cases = [
        ("", "Type a text"),
        ("   ", "Type a text"),
        (None, "Type a text"),
        ("happy " * 100, "Input too long: 600 characters; the limit is 300 characters."),
        ("happy " * 25, "Input too long: 25 tokens; the limit is 20 tokens."),
    ]
    for text, message in cases:
        with pytest.raises(InputError, match=re.escape(message)) as err:
            explainer.explain(text)
        assert err.value.status == (413 if "too long" in message else 400)
    with pytest.raises(InputError, match="Unknown method"):
        explainer.explain("i feel", methods=["kernel_shapp"])
    with pytest.raises(InputError, match="Unknown target"):
        explainer.explain("i feel", target="<nope>")


def test_page_escapes_data_and_pins_its_script(explainer):
    evil = "</script><script>alert(1)</script><!--"
    page = render_page(explainer.info(), [{"text": evil}], mode="static", examples=[evil])
    assert "</script><script>alert" not in page and "<!--" not in page.split("<script id=")[1]
    data = re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["results"][0]["text"] == evil and json.loads(data)["mode"] == "static"
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "http://" not in page and "https://" not in page  # nothing to fetch from anywhere


def test_study_folder(tmp_path):
    write_study(tmp_path / "study")
    study = load_study(str(tmp_path / "study"))
    names = [t["name"] for t in study["tables"]]
    assert names == ["summary.csv", "results.md"]  # summary first; summary.md duplicates the CSV; no per-example
    assert study["tables"][0]["rows"][2] == ["<b>GxI</b>", "0.4 ± 0.1"]
    assert study["tables"][1]["rows"] == [["a", "b"], ["1", "2"], ["3", "4"]]
    assert [i["name"] for i in study["images"]] == ["flipping_curves.png"]
    assert study["images"][0]["src"].startswith("data:image/png;base64,iVBOR")
    with pytest.raises(FileNotFoundError):
        load_study(str(tmp_path / "missing"))


def _request(url: str, body=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_http_server(explainer):
    server, url = start_in_thread(DashboardApp(explainer, examples=["i feel"]))
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, headers, page = _request(url)
        assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
        assert b'"mode": "server"' in page
        status, _, body = _request(url + "api/explain", {"text": TEXT, "methods": ["saliency"]})
        view = json.loads(body)
        assert status == 200 and [m["key"] for m in view["methods"]] == ["mambalrp", "saliency"]
        status, _, body = _request(url + "api/explain", {"text": "happy " * 25})
        assert status == 413 and json.loads(body)["error"] == "Input too long: 25 tokens; the limit is 20 tokens."
        status, _, body = _request(url + "api/explain", b"x" * (70 * 1024))
        assert status == 413 and "Request too large" in json.loads(body)["error"]
        assert _request(url + "api/explain", b"{not json")[0] == 400
        assert _request(url + "api/explain", {"text": "i", "methods": "saliency"})[0] == 400
        assert _request(url + "api/info", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
        status, headers, html = _request(url + "api/export", {"results": [view]})
        assert status == 200 and "attachment" in headers["Content-Disposition"]
        assert b'"mode": "static"' in html and b"connect-src 'none'" in html
        assert _request(url + "api/export", {"results": []})[0] == 400
        assert _request(url + "nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_cli_export(tmp_path, capsys):
    ckpt = make_demo_checkpoint(str(tmp_path / "ckpt"))
    write_study(tmp_path / "study")
    out = tmp_path / "view.html"
    assert (
        main(
            [
                "dashboard",
                "--model",
                ckpt,
                "--export",
                str(out),
                "--text",
                "i feel so happy",
                "--text",
                "<script>x</script> sad",
                "--methods",
                "input_x_gradient",
                "--study",
                str(tmp_path / "study"),
            ]
        )
        == 0
    )
    assert "written to" in capsys.readouterr().out
    page = out.read_text()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [r["text"] for r in data["results"]] == ["i feel so happy", "<script>x</script> sad"]
    assert data["study"]["images"][0]["name"] == "flipping_curves.png"
    assert "<script>x</script>" not in page
