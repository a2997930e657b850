#!/usr/bin/env python3
"""Several models' long-range results in one figure (accuracy and the needle's share of |R|
against distance at one length), from the folders ``captum-mambalrp longrange`` wrote.

    python scripts/plot_longrange.py --out docs/img/deep_longrange_8192.png --length 8192 \\
        "Mamba1=docs/results/2026-12-02/deep/mamba-130m/longrange" \\
        "Mamba2=docs/results/2026-12-02/deep/mamba2-130m/longrange" \\
        "Bamba hybrid=docs/results/2026-12-02/deep/hybrid-130m/longrange"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.evaluation.longrange import plot_models  # noqa: E402


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER (a longrange output folder with longrange.json)")
    p.add_argument("--out", required=True, help="the figure (png)")
    p.add_argument("--length", type=int, default=None, help="input length (default: the longest that every run has)")
    args = p.parse_args(argv)
    summaries = {}
    for run in args.runs:
        label, sep, folder = run.partition("=")
        if not sep:
            raise SystemExit(f"{run!r}: give LABEL=FOLDER")
        path = os.path.join(folder, "longrange.json")
        if not os.path.isfile(path):
            raise SystemExit(f"no longrange.json in {folder}: give a folder that `captum-mambalrp longrange --out` wrote")
        with open(path, encoding="utf-8") as f:
            summaries[label] = json.load(f)
    try:
        out = plot_models(summaries, args.out, args.length)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(out)
    return out


if __name__ == "__main__":
    main()
