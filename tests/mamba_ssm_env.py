"""mamba-ssm's real module definitions on a machine that cannot install mamba-ssm (CPU).

mamba-ssm's Python modules import compiled CUDA extensions and Triton at import time, so
``pip install mamba-ssm`` fails on CPU and its modules cannot be imported as they are. The
classes themselves (``MambaLMHeadModel``, ``MixerModel``, ``Block``, ``Mamba``, ``Mamba2``,
``RMSNorm``) are plain ``nn.Module`` definitions, and MambaLRP's adapters take over every
forward that would call a kernel. So the CPU suite imports the real classes this way:

1. an installed ``mamba_ssm`` (a CUDA machine) is used as it is;
2. else the pure-Python ``mamba_ssm/`` package is read from the wheel in
   ``../shared/wheels/*/mamba_ssm-*.whl`` (or ``$MAMBA_SSM_SOURCE``: a wheel or an sdist),
   extracted into a temporary folder (nothing is copied into the repository);
3. else the sdist is fetched with ``pip download mamba-ssm`` (no build) and read the same way;
4. else the tests that need it are skipped, with the reason.

While importing, the compiled extension ``selective_scan_cuda`` is a stand-in module and,
when Triton is not installed, so is ``triton`` (decorators that return the function, a
``Config`` record): kernels are defined but never launched. Modules that probe for Triton
(torch's compiler, transformers' generation) are imported before. Right after the import the
stand-ins *and the extracted package* are removed from ``sys.modules`` and ``sys.path``: the
classes keep working, while nothing else can find a "mamba_ssm" (transformers binds
mamba-ssm's CUDA kernels into its Mamba models when it can import it, at their import).
The tests use the classes and functions through the namespace :func:`load_mamba_ssm` returns.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from typing import Dict, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "2.3.2.post1"
_STATE: Dict[str, object] = {}


class _Anything:
    """Whatever a kernel module's import-time code asks of Triton: attributes, calls, indexing."""

    def __getattr__(self, key: str) -> _Anything:
        if key.startswith("__"):
            raise AttributeError(key)
        return _Anything()

    def __call__(self, *args, **kwargs) -> _Anything:
        return _Anything()

    def __getitem__(self, key) -> _Anything:
        return _Anything()


class _StandIn(types.ModuleType):
    def __getattr__(self, key: str) -> _Anything:
        if key.startswith("__"):
            raise AttributeError(key)
        return _Anything()


class _Config:
    def __init__(self, kwargs=None, num_warps=4, num_stages=2, **rest) -> None:
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs or {}), num_warps, num_stages
        self.__dict__.update(rest)


class _Autotuned:
    def __init__(self, fn, configs) -> None:
        self.fn, self.configs = fn, list(configs)


def _triton_stand_ins() -> Dict[str, types.ModuleType]:
    def module(name: str, **attrs) -> types.ModuleType:
        m = _StandIn(name)
        m.__dict__.update(attrs)
        m.__path__ = []  # a package, so that submodules import
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        return m

    language, testing, runtime = module("triton.language"), module("triton.testing"), module("triton.runtime")
    triton = module(
        "triton",
        __version__="3.0.0",
        Config=_Config,
        language=language,
        testing=testing,
        runtime=runtime,
        jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f),
        autotune=lambda configs, key=None, **kw: lambda fn: _Autotuned(fn, configs),
        heuristics=lambda values: lambda fn: fn,
    )
    return {"triton": triton, "triton.language": language, "triton.testing": testing, "triton.runtime": runtime}


def _extract(archive: str, dest: str) -> str:
    """Write the ``mamba_ssm/`` package of a wheel or an sdist under ``dest``; return the folder to import from."""
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, [n for n in z.namelist() if n.startswith("mamba_ssm/") and n.endswith(".py")])
        return dest
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if "/mamba_ssm/" in m.name and m.name.endswith(".py") and m.isfile()]
        try:
            t.extractall(dest, members, filter="data")
        except TypeError:  # a Python without extraction filters
            t.extractall(dest, members)
    roots = {m.name.split("/mamba_ssm/")[0] for m in members}
    return os.path.join(dest, sorted(roots)[0])


def _find_archive(tmp: str) -> Tuple[Optional[str], str]:
    given = os.environ.get("MAMBA_SSM_SOURCE")
    if given:
        return given, f"$MAMBA_SSM_SOURCE={given}"
    wheels = sorted(glob.glob(os.path.join(REPO, "..", "shared", "wheels", "*", "mamba_ssm-*.whl")))
    if wheels:
        return wheels[-1], f"wheel {os.path.basename(wheels[-1])} (shared/wheels)"
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                f"mamba-ssm=={VERSION}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                tmp,
            ],
            check=True,
            capture_output=True,
            timeout=180,
            env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"},
        )
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"no mamba-ssm wheel in shared/wheels and `pip download mamba-ssm` failed ({type(err).__name__})"
    found = glob.glob(os.path.join(tmp, "mamba_ssm-*.tar.gz"))
    return (found[0], f"sdist {os.path.basename(found[0])} (pip download)") if found else (None, "pip download gave no sdist")


NAMES = {  # what the tests and the GPU check use, by module
    "mamba_ssm.models.mixer_seq_simple": ["MambaLMHeadModel", "MixerModel"],
    "mamba_ssm.models.config_mamba": ["MambaConfig"],
    "mamba_ssm.modules.block": ["Block"],
    "mamba_ssm.modules.mamba_simple": ["Mamba"],
    "mamba_ssm.modules.mamba2": ["Mamba2"],
    "mamba_ssm.modules.mamba2_simple": ["Mamba2Simple"],
    "mamba_ssm.modules.mamba3": ["Mamba3"],
    "mamba_ssm.modules.mha": ["MHA"],
    "mamba_ssm.modules.mlp": ["GatedMLP"],
    "mamba_ssm.ops.triton.layer_norm": ["RMSNorm"],
    "mamba_ssm.ops.triton.layernorm_gated": ["rms_norm_ref"],
    "mamba_ssm.ops.triton.ssd_combined": ["ssd_chunk_scan_combined_ref"],
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _namespace(how: str) -> types.SimpleNamespace:
    found = {"how": how}
    for module_name, names in NAMES.items():
        module = importlib.import_module(module_name)
        found.update({n: getattr(module, n) for n in names})
    return types.SimpleNamespace(**found)


def load_mamba_ssm() -> Tuple[Optional[types.SimpleNamespace], str]:
    """``(namespace of mamba-ssm's classes, how they were found)``, or ``(None, why not)``."""
    if "result" in _STATE:
        return _STATE["result"]  # type: ignore[return-value]
    if _installed("mamba_ssm"):  # a CUDA machine
        result: Tuple[Optional[types.SimpleNamespace], str] = (_namespace("installed mamba_ssm"), "installed mamba_ssm")
    else:
        result = _import_from_archive()
    _STATE["result"] = result
    return result


def _import_from_archive() -> Tuple[Optional[types.SimpleNamespace], str]:
    try:
        import einops  # noqa: F401
    except ImportError:
        return None, "mamba-ssm's modules need einops (pip install einops)"
    tmp = tempfile.mkdtemp(prefix="mamba_ssm_src_")
    archive, how = _find_archive(tmp)
    if archive is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, how
    root = _extract(archive, tmp)
    # modules that look for Triton once and remember: import them before any stand-in exists
    import torch._dynamo  # noqa: F401
    import transformers.generation  # noqa: F401
    from transformers.generation import GenerateDecoderOnlyOutput, TextStreamer  # noqa: F401

    stand_ins = {"selective_scan_cuda": types.ModuleType("selective_scan_cuda")}
    if not _installed("triton"):
        stand_ins.update(_triton_stand_ins())
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    sys.path.insert(0, root)
    how = f"{how}, kernels stubbed"
    try:
        return _namespace(how), how
    except Exception as err:  # a newer layout we do not know: skip with the reason
        return None, f"importing mamba_ssm from {how} failed: {type(err).__name__}: {err}"
    finally:  # the classes are loaded: their source files are no longer needed
        sys.path.remove(root)
        shutil.rmtree(tmp, ignore_errors=True)
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
