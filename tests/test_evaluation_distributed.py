"""Sharded studies: ``torchrun`` (gloo, 2 processes) gives exactly the one-process study, and a
run where one rank dies resumes to the same result."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from test_evaluation_study import tiny  # noqa: F401  (the fixture: a tiny checkpoint and data)

from captum_mambalrp.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"seconds", "cpu_seconds"}  # wall-clock costs: the only numbers allowed to differ


def study_args(ckpt, data, out):
    return ["compare", "--model", ckpt, "--data", data, "--methods", "mambalrp,gxi,feature_ablation,random"] + [
        "--examples",
        "6",
        "--batch-size",
        "2",
        "--fraction",
        "0.5",
        "--out",
        out,
        "--no-figures",
        "--threads",
        "1",
    ]


def torchrun(args, env_extra=None, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "captum_mambalrp"]
    return subprocess.run(cmd + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def records(out):
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("results") and name.endswith(".jsonl"):
            rows += [json.loads(line) for line in open(os.path.join(out, name)) if line.strip()]
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows), key=lambda r: (r["method"], r["index"]))


def summary(out):
    s = json.load(open(os.path.join(out, "summary.json")))
    for row in s["methods"].values():
        for k in TIMING:
            row.pop(k)
    return s


def table(out):
    with open(os.path.join(out, "per_example.csv")) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):  # noqa: F811
    ckpt, data = tiny
    out = str(tmp_path_factory.mktemp("single") / "study")
    assert main(study_args(ckpt, data, out) + ["--no-progress"]) == 0
    return out


def test_two_process_torchrun_equals_one_process(tiny, single, tmp_path):  # noqa: F811
    ckpt, data = tiny
    out = str(tmp_path / "sharded")
    done = torchrun(study_args(ckpt, data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {n for n in os.listdir(out) if n.startswith("results")} == {"results.rank0.jsonl", "results.rank1.jsonl"}
    assert records(out) == records(single) and len(records(out)) == 4 * 6
    assert summary(out) == summary(single) and table(out) == table(single)
    assert done.stdout.count("# Attribution study") == 1  # rank 0 prints the summary, once
    assert "24/24" in done.stderr  # rank 0's bar counted both ranks' (method, example) pairs


def test_a_run_with_a_dead_rank_resumes_to_the_same_study(tiny, single, tmp_path):  # noqa: F811
    ckpt, data = tiny
    out = str(tmp_path / "resumed")
    died = torchrun(study_args(ckpt, data, out) + ["--no-progress"], {"CAPTUM_MAMBALRP_FAIL_AFTER": "1:2"})
    assert died.returncode != 0 and "rank 1: exiting after 2 items" in died.stderr
    left = records(out)
    assert 2 * 2 <= len(left) < 4 * 6  # rank 1's two finished items (2 examples each) stayed on disk
    again = torchrun(study_args(ckpt, data, out) + ["--no-progress"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(out) == records(single) and summary(out) == summary(single) and table(out) == table(single)


def test_ranks_that_share_a_gpu_meet_over_gloo():
    """NCCL refuses two ranks on one GPU: more local ranks than GPUs (or a CPU model) use gloo."""
    from captum_mambalrp.evaluation.distributed import backend_for

    assert backend_for("cuda", 2, 2) == "nccl" and backend_for("cuda", 1, 8) == "nccl"
    assert backend_for("cuda", 3, 1) == "gloo" and backend_for("cpu", 1, 0) == "gloo"
