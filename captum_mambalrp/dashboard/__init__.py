"""A local comparison dashboard: MambaLRP next to Captum's methods, per layer, with studies.

    from captum_mambalrp.dashboard import Explainer, export_html
    explainer = Explainer(model, tokenizer)
    export_html(explainer, ["i feel so happy today"], "view.html")   # one offline file

``captum-mambalrp dashboard`` serves the same view (see :mod:`.server`); ``--result FILE``
shows saved results (:mod:`captum_mambalrp.results`) in it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .explain import DEFAULT_METHODS, Explainer, InputError, Limits, find_blocks
from .methods import comparison_methods
from .page import render_page
from .server import DashboardApp, make_server, start_in_thread
from .study import load_study
from .views import load_result_views, result_view, with_words

EXAMPLES = [
    "i feel so happy and loved today",
    "i am scared of the dark and feel so alone",
    "i feel angry and annoyed about this news",
    "i was surprised by the gift from my friend",
    "i feel sad and lonely tonight",
]


def export_html(
    explainer: Explainer,
    texts: Sequence[str],
    path: str,
    target: Optional[str] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    study: Optional[Dict[str, Any]] = None,
    results: Sequence[Dict[str, Any]] = (),
) -> List[Dict[str, Any]]:
    """Explain ``texts`` and write the view of them, after ``results`` (views already made,
    e.g. of saved results: :func:`load_result_views`), as one self-contained HTML file.

    Returns:
        the views written.
    """
    results = list(results) + [with_words(explainer.explain(t, target, methods)) for t in texts]
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_page(explainer.info(), results, mode="static", study=study))
    return results


__all__ = [
    "DEFAULT_METHODS",
    "DashboardApp",
    "EXAMPLES",
    "Explainer",
    "InputError",
    "Limits",
    "comparison_methods",
    "export_html",
    "find_blocks",
    "load_result_views",
    "load_study",
    "make_server",
    "render_page",
    "result_view",
    "start_in_thread",
    "with_words",
]
