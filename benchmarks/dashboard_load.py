"""The dashboard under load: requests from concurrent clients on 127.0.0.1, latency and memory.

Starts the dashboard's server in this process on a free loopback port with a tiny random
demo classifier (``captum_mambalrp.dashboard.demo``: 2 layers, hidden size 16), or the
embedded Emotion model with ``--model default``, warms it up, then sends ``--requests``
requests from ``--clients`` threads (of every five: three ``POST /api/explain`` of a text with
MambaLRP and its per-layer relevance, one page, one ``/api/info``). Explanations run one at
a time (the server serialises them). Prints the statuses, p50 / p95 / max latency and the
process's RSS before and after; the last line is the summary.

    python3 benchmarks/dashboard_load.py                       # 500 requests, 16 clients
    python3 benchmarks/dashboard_load.py --requests 2000 --methods input_x_gradient
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=48)
    parser.add_argument("--methods", default="", help="methods shown beside MambaLRP (comma-separated registry keys)")
    parser.add_argument("--model", default="demo", help="'demo' (tiny random classifier) or 'default' (the embedded model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from captum_mambalrp.dashboard import DashboardApp, Explainer, start_in_thread
    from captum_mambalrp.dashboard.demo import DEMO_TEXTS, demo_explainer
    from captum_mambalrp.dashboard.loadtest import rss_mib, run_load

    if args.model == "demo":
        explainer = demo_explainer(tempfile.mkdtemp(prefix="mambalrp-demo-"))
    else:
        from captum_mambalrp.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(None if args.model == "default" else args.model)
        explainer = Explainer(model, tokenizer, source=args.model)
    server, url = start_in_thread(DashboardApp(explainer))
    methods = [m for m in args.methods.split(",") if m]
    try:
        warm = run_load(url, DEMO_TEXTS, requests=args.warmup, clients=args.clients, methods=methods)
        print(f"warm-up: {warm.summary()}")
        before = rss_mib()
        report = run_load(url, DEMO_TEXTS, requests=args.requests, clients=args.clients, methods=methods)
        after = rss_mib()
    finally:
        server.shutdown()
        server.server_close()
    for failure in report.failures[:10]:
        print("failure:", failure)
    rss = f"RSS {before:.0f} -> {after:.0f} MiB" if before is not None and after is not None else "RSS unknown"
    print(f"model: {args.model}, methods: MambaLRP{''.join(', ' + m for m in methods)}, torch threads: {args.threads}")
    print(f"dashboard load: {report.summary()}; {rss}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
