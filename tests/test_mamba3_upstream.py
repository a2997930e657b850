"""``reference_mamba3`` (tests/test_mamba3.py) against mamba-ssm's own decode path, on the CPU.

``tests/test_mamba3.py`` checks MambaLRP's Mamba3 against a step-by-step recurrence its authors wrote;
this file anchors that recurrence to mamba-ssm's code. It runs mamba-ssm's ``Mamba3.step`` (its
``_preprocess``, rotary call, decode call and ``_postprocess``) token by token with its inference
cache, as mamba-ssm's ``tests/ops/cute/test_mamba3_mimo_step.py`` does, with the three GPU kernels it
calls replaced by the pure-torch references mamba-ssm ships next to them:

* ``mamba3_step_fn`` (CuTe DSL) -> ``selective_state_update_fused_ref_v2``
  (``mamba_ssm/ops/cute/mamba3/mamba3_step_fn.py``, the reference that file's own check compares the
  kernel with, in float64); the module imports ``cutlass`` and ``cuda.bindings`` at the top, so the
  function is read from mamba-ssm's source with ``ast`` and run alone (it uses only ``torch``);
* ``apply_rotary_qk_inference_fwd`` (Triton) -> ``apply_rotary_qk_inference_reference``
  (``mamba_ssm/ops/triton/mamba3/mamba3_mimo_rotary_step.py``);
* ``rmsnorm_fn`` (Triton, behind ``B_norm``, ``C_norm`` and the output norm) -> ``rms_norm_ref``
  (``mamba_ssm/ops/triton/layernorm_gated.py``).

Each variant runs in float64 and in float32. In float64 the two sides differ only where mamba-ssm
itself rounds to float32: ``_preprocess`` casts ``dd_A`` before the softplus (~1e-9 of the output here)
and, with the output norm, ``_postprocess`` casts ``y`` and ``z`` (~1e-7). MIMO with the output norm
does not run in float64 at all (``_postprocess``'s ``einsum`` of the float32 ``z`` with the float64
``mimo_z`` refuses mixed dtypes), so it runs in float32 only. ``ngroups > 1`` (tests/test_mamba3.py's
``siso_full_rope_groups``) is not compared: ``_preprocess`` widens B and C from ``num_bc_heads`` to
``nheads`` with ``expand``, which refuses a group dimension other than 1.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import tempfile
from contextlib import contextmanager

import pytest
import torch
from mamba_ssm_env import _extract, _find_archive, load_mamba_ssm
from test_mamba3 import Host, make_mamba3, reference_mamba3

from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite

STEP_FN = "mamba_ssm/ops/cute/mamba3/mamba3_step_fn.py"
_FOUND = {}


def _upstream_function(relpath: str, name: str):
    """A top-level function of mamba-ssm's source file ``relpath``, compiled alone (its module cannot be imported here)."""
    key = (relpath, name)
    if key in _FOUND:
        return _FOUND[key]
    found, how = load_mamba_ssm()
    if found is None:
        pytest.skip(f"mamba-ssm's module definitions are not available: {how}")
    with tempfile.TemporaryDirectory(prefix="mamba_ssm_src_") as tmp:
        if how == "installed mamba_ssm":
            root = os.path.dirname(importlib.util.find_spec("mamba_ssm").submodule_search_locations[0])
        else:
            archive, where = _find_archive(tmp)
            if archive is None:
                pytest.skip(f"mamba-ssm's sources are not available: {where}")
            root = _extract(archive, tmp)
        with open(os.path.join(root, relpath), encoding="utf-8") as f:
            source = f.read()
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name]
    scope = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), os.path.join("mamba_ssm", relpath), "exec"), scope)
    _FOUND[key] = scope[name]
    return scope[name]


@contextmanager
def upstream_references(mixer):
    """``mixer.step`` with mamba-ssm's GPU kernels swapped for mamba-ssm's pure-torch references."""
    fused_ref = _upstream_function(STEP_FN, "selective_state_update_fused_ref_v2")
    step_env = type(mixer).step.__globals__
    rotary_env = step_env["apply_rotary_qk_inference_fwd"].__globals__
    norm_env = type(mixer.B_norm).forward.__globals__
    rotary_ref, rms_norm_ref = rotary_env["apply_rotary_qk_inference_reference"], norm_env["rms_norm_ref"]

    def rotary(q, k, angle_state, angle_proj, dt, bias_q=None, bias_k=None, conjugate=False, inplace=False, rotate_pairwise=True):
        return rotary_ref(q, k, angle_state, angle_proj, dt, bias_q, bias_k, conjugate=conjugate, rotate_pairwise=rotate_pairwise)

    def step_fn(state, Bstate, Xstate, A, B, C, D, x, dt, trap, xproj, outproj, state_out, out, z=None, zproj=None, **kernel):
        y, new_state = fused_ref(state, A, B, C, xproj, x, zproj, z, dt, Bstate, Xstate, trap, D, outproj, torch.float64)
        (state if state_out is None else state_out).copy_(new_state)
        out.copy_(y)

    def rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return rms_norm_ref(x, weight, bias, z, eps, group_size, norm_before_gate, upcast=x.dtype != torch.float64)

    patches = [(step_env, "mamba3_step_fn", step_fn), (step_env, "apply_rotary_qk_inference_fwd", rotary)]
    patches.append((norm_env, "rmsnorm_fn", rmsnorm))
    saved = [(env, key, env[key]) for env, key, _ in patches]
    try:
        for env, key, value in patches:
            env[key] = value
        yield
    finally:
        for env, key, value in saved:
            env[key] = value


def upstream_decode(mixer, u):
    """mamba-ssm's ``Mamba3.step`` over ``u`` token by token, states carried as its own test carries them."""
    b, length, _ = u.shape
    R = mixer.mimo_rank
    state = (
        torch.zeros(b, mixer.nheads, mixer.num_rope_angles, dtype=u.dtype),  # float32 in allocate_inference_cache
        torch.zeros(b, mixer.nheads, mixer.headdim, mixer.d_state, dtype=u.dtype),  # float32 there too
        torch.zeros(b, R, mixer.nheads, mixer.d_state, dtype=u.dtype),
        torch.zeros(b, mixer.nheads, mixer.headdim, dtype=u.dtype),
    )
    outs = []
    with upstream_references(mixer):
        for t in range(length):
            out, *state = mixer.step(u[:, t], *state)
            outs.append(out)
    return torch.stack(outs, dim=1)


VARIANTS = {  # tests/test_mamba3.py's variants that mamba-ssm's step can run (one B/C group)
    "siso": dict(),
    "siso_outproj_norm": dict(is_outproj_norm=True),
    "siso_full_rope": dict(rope_fraction=1.0),
    "mimo": dict(mimo=True),
    "mimo_outproj_norm": dict(mimo=True, is_outproj_norm=True, mimo_rank=3),
    "mimo_full_rope": dict(mimo=True, rope_fraction=1.0),
}
# largest |difference| / max |output| allowed; measured: float64 <= 5e-9 (9e-8 with the output norm), float32 <= 5e-7
CASES = [(v, torch.float64, 1e-6 if "norm" in v else 1e-7) for v in VARIANTS if v != "mimo_outproj_norm"]
CASES += [(v, torch.float32, 2e-6) for v in VARIANTS]


@pytest.mark.parametrize("variant, dtype, tol", CASES, ids=[f"{v}-{str(d)[6:]}" for v, d, _ in CASES])
def test_reference_and_package_equal_mamba_ssm_decode(variant, dtype, tol):
    """``reference_mamba3`` and MambaLRP's forward (rules installed) equal mamba-ssm's ``step`` over 12 tokens."""
    mixer = make_mamba3(seed=5, **VARIANTS[variant]).to(dtype)
    u = torch.randn(2, 12, mixer.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        upstream = upstream_decode(mixer, u)
        ours = reference_mamba3(mixer, u)
        inst = install_rules(Host(mixer), composite("mambalrp"))
        try:
            package = mixer(u)
        finally:
            inst.patcher.restore()
    assert upstream.dtype == ours.dtype == package.dtype == dtype
    scale = float(upstream.abs().max())
    assert scale > 0.1
    for name, got in (("reference_mamba3", ours), ("package forward", package)):
        err = float((got - upstream).abs().max()) / scale
        assert err < tol, f"{name}: max |difference| / max |output| = {err:.2e}"
