"""The set-up scripts pick the right Python and fail in one line; the Insights virtualenv is
checked (and a broken one recognised) before the browser tests use it.

The full install in a fresh virtualenv is what CI runs (``.ci/run``: a fresh venv, then
``bash scripts/test.sh``); these tests cover the decisions around it, quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

from captum_mambalrp.insights import make_venv, venv_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"


def python_env(**env):
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "python_env.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_a_usable_python_is_used_as_it_is():
    """A virtualenv's, conda's or pyenv's Python (not managed by the system) is used directly."""
    done = python_env(PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert os.path.samefile(done.stdout.strip(), sys.executable)


def _system_managed(python: str) -> bool:
    if not os.path.isfile(python):
        return False
    marker = "os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))"
    code = f"import os, sys, sysconfig; print(int(sys.prefix == sys.base_prefix and {marker}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() == "1"


@pytest.mark.skipif(not _system_managed(SYSTEM_PYTHON), reason="no system-managed (PEP 668) /usr/bin/python3 here")
def test_a_system_managed_python_gets_a_virtualenv(tmp_path):
    """Debian's /usr/bin/python3 refuses `pip install` (PEP 668): the scripts make a virtualenv from it
    and use that; a second call reuses it."""
    venv = tmp_path / "venv"
    done = python_env(PYTHON=SYSTEM_PYTHON, MAMBALRP_VENV=str(venv))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(venv / "bin" / "python")
    assert "managed by the system (PEP 668)" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    again = python_env(PYTHON=SYSTEM_PYTHON, MAMBALRP_VENV=str(venv))
    assert again.stdout == done.stdout and again.stderr == ""


@pytest.mark.parametrize("script", ["python_env.sh", "setup.sh", "setup_browser.sh", "test.sh"])
def test_no_python_fails_in_one_line(script):
    done = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "no-such-python3"},
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "setup: error: no Python interpreter 'no-such-python3' on PATH; install Python 3.11+ or set PYTHON=/path/to/python3"
    )


def test_an_old_python_fails_in_one_line(tmp_path):
    """A Python older than transformers 5.23 supports (3.11) is named before pip resolves anything."""
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(0o755)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "python_env.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(old)},
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        f"setup: error: '{old}' is Python 3.10; captum-mambalrp needs Python 3.11+ (transformers 5.23+ does); "
        "set PYTHON=/path/to/python3.11"
    )


def test_a_broken_insights_venv_is_recognised(tmp_path):
    """The failure of issue 11: an Insights venv that cannot import torch (made with
    --system-site-packages inside a virtualenv, it saw the base interpreter, which had no torch)."""
    assert venv_problem(str(tmp_path / "none")) == f"no virtualenv at {tmp_path / 'none'}"
    broken = tmp_path / "broken"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(broken)], check=True)
    # a venv without system site-packages and without the parent .pth: it sees no torch, no captum
    problem = venv_problem(str(broken))
    assert problem is not None and problem.startswith(f"{broken}/bin/python: ") and "Error" in problem
    assert "\n" not in problem


def test_the_make_venv_command_fails_in_one_line(tmp_path, capsys):
    """`python -m captum_mambalrp.insights --make-venv DIR` (what setup_browser.sh runs): one line and exit 1."""
    from captum_mambalrp.insights import main

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert main(["--make-venv", str(blocked / "venv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m captum_mambalrp.insights: error: making the Insights virtualenv ")
    assert len(err.strip().splitlines()) == 1


def test_the_insights_venv_links_the_creating_environment(tmp_path, monkeypatch):
    """The venv's .pth names this environment's site-packages (not the base interpreter's only), and
    the source .pth names this checkout; pip's installs stubbed (CI makes a real one, test_insights)."""
    import captum_mambalrp.insights as insights

    calls = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "pip" in cmd:
            calls.append(cmd)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(insights.subprocess, "run", run)
    monkeypatch.setattr(insights, "venv_problem", lambda path: None if calls else "missing")
    python = make_venv(str(tmp_path / "iv"))
    site = real_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True)
    site = site.stdout.strip()
    parent = open(os.path.join(site, "_captum_mambalrp_parent_env.pth")).read()
    assert f"site.addsitedir({sysconfig.get_paths()['purelib']!r})" in parent
    assert open(os.path.join(site, "captum_mambalrp_source.pth")).read().strip() == REPO
    assert [c[c.index("install") + 2 :] for c in calls] == [list(r) for r in insights.VENV_REQUIREMENTS]
    # and it imports this environment's torch
    done = real_run([python, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True)
    import torch

    assert done.returncode == 0 and os.path.samefile(done.stdout.strip(), torch.__file__)
