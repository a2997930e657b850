"""GPU check of MambaLRP on mamba-ssm's ``MambaLMHeadModel`` (Mamba1 and Mamba2 mixers).

For each mixer kind, the same random ``MambaLMHeadModel`` (fused add+norm, residual in fp32,
RMSNorm, relevance-carrying biases zero) is built once; then

- CPU: MambaLRP relevance of the predicted class at the last token, and its conservation
  ``max |delta| / |logit|``;
- GPU (needs CUDA and mamba-ssm installed): the model's **own** forward with its real kernels
  (Triton fused add+norm, the selective-scan / SSD kernels, causal-conv1d when installed)
  against the forward MambaLRP computes (max relative difference of the logits: the takeover
  computes the model's function), then MambaLRP relevance on the GPU with the default scan
  backend (``auto``: mamba-ssm's kernels when installed) and, as a control, the torch scan:
  conservation there, the max relative difference to the CPU relevance, and which scan
  backends ran.

Float32 throughout, TF32 off. Without CUDA the GPU half is skipped with a message and the
script exits 0 after the CPU half. Without an installed mamba-ssm (CPU machines) the module
definitions are read from the wheel in ../shared/wheels as the tests do (tests/mamba_ssm_env.py).

    python benchmarks/gpu_mamba_ssm_check.py --out gpu_mamba_ssm_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from captum_mambalrp import MambaLRP, scan  # noqa: E402
from captum_mambalrp.adapters import install_rules  # noqa: E402
from captum_mambalrp.rules import composite  # noqa: E402

# logits: the model's kernels may use TF32 inside Triton matmuls, so the forward check is looser
TOLERANCE = {"conservation": 1e-5, "relevance_cpu_vs_gpu": 1e-4, "forward_kernels_vs_takeover": 1e-2}


def mamba_ssm_classes():
    """``(MambaConfig, MambaLMHeadModel, how)`` from the installed package, else as the tests load them."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        return MambaConfig, MambaLMHeadModel, "installed mamba_ssm"
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from mamba_ssm_env import load_mamba_ssm

        found, how = load_mamba_ssm()
        if found is None:
            raise SystemExit(f"mamba-ssm is not available: {how}") from None
        return found.MambaConfig, found.MambaLMHeadModel, how


def build(classes, layer: str, seed: int, d_model: int, n_layer: int) -> torch.nn.Module:
    MambaConfig, MambaLMHeadModel = classes[:2]
    ssm_cfg: Dict[str, Any] = dict(layer=layer, d_state=16)
    if layer == "Mamba2":
        ssm_cfg.update(headdim=16, ngroups=2, chunk_size=64)
    config = MambaConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=256,
        ssm_cfg=ssm_cfg,
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        tie_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MambaLMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias") and "dt_proj" not in name and not name.endswith("dt_bias"):
                p.zero_()
    return model


def takeover_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        inst = install_rules(model, composite("gradient"))
        try:
            return model(ids).logits.float()
        finally:
            inst.patcher.restore()


def kernel_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward: its CUDA / Triton kernels."""
    with torch.no_grad():
        return model(ids).logits.float()


def relevance(model: torch.nn.Module, ids: torch.Tensor, targets: List[int], backend: str = "auto") -> Dict[str, Any]:
    """MambaLRP relevance with the given scan backend, its conservation, and which scan backends ran."""
    record = getattr(scan, "record_backends", None)
    context = record() if record is not None else contextlib.nullcontext({})
    start = time.perf_counter()
    with context as used:
        rel, delta = MambaLRP(model, backend=backend).attribute(ids, target=targets, return_convergence_delta=True)
        if rel.is_cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    explained = rel.sum(1) + delta
    return {
        "relevance": rel.cpu(),
        "backend": backend,
        "scans_by_backend": dict(used),
        "explained": explained.cpu().tolist(),
        "delta": delta.cpu().tolist(),
        "conservation": float((delta.abs() / explained.abs().clamp_min(1e-12)).max()),
        "seconds": seconds,
    }


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(classes, layer: str, args: argparse.Namespace, cuda: bool) -> Dict[str, Any]:
    model = build(classes, layer, args.seed, args.d_model, args.n_layer)
    ids = torch.randint(0, 256, (args.batch, args.length), generator=torch.Generator().manual_seed(args.seed))
    targets = takeover_logits(model, ids)[:, -1].argmax(-1).tolist()  # the predicted classes, fixed for both
    cpu = relevance(model, ids, targets)
    out: Dict[str, Any] = {"targets": targets, "cpu": {k: v for k, v in cpu.items() if k != "relevance"}}
    ok = cpu["conservation"] <= TOLERANCE["conservation"]
    if cuda:
        gpu_model = copy.deepcopy(model).cuda()
        ids_gpu = ids.cuda()
        out["forward_kernels_vs_takeover_max_rel_diff"] = rel_diff(
            takeover_logits(gpu_model, ids_gpu), kernel_logits(gpu_model, ids_gpu)
        )
        ok = ok and out["forward_kernels_vs_takeover_max_rel_diff"] <= TOLERANCE["forward_kernels_vs_takeover"]
        # the default scan backend (on CUDA: mamba-ssm's kernels when installed), and the torch one as a control
        for key, backend in (("gpu", "auto"), ("gpu_torch_scan", "torch")):
            gpu = relevance(gpu_model, ids_gpu, targets, backend)
            gpu["relevance_cpu_vs_gpu_max_rel_diff"] = rel_diff(gpu["relevance"], cpu["relevance"])
            out[key] = {k: v for k, v in gpu.items() if k != "relevance"}
            ok = ok and gpu["conservation"] <= TOLERANCE["conservation"]
            ok = ok and gpu["relevance_cpu_vs_gpu_max_rel_diff"] <= TOLERANCE["relevance_cpu_vs_gpu"]
    out["passed"] = bool(ok)
    return out


def environment(cuda: bool, how: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mamba_ssm": how,
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor(),
    }
    for package in ("mamba_ssm", "causal_conv1d", "triton", "transformers", "captum"):
        try:
            env[f"{package}_version"] = getattr(__import__(package), "__version__", "?")
        except ImportError:
            env[f"{package}_version"] = None
    return env


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--length", type=int, default=200, help="sequence length (several Mamba2 chunks)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    classes = mamba_ssm_classes()
    cuda = torch.cuda.is_available()
    result: Dict[str, Any] = {
        "command": " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "tolerance": TOLERANCE,
        "environment": environment(cuda, classes[2]),
        "models": {},
    }
    for layer in ("Mamba1", "Mamba2"):
        result["models"][layer] = check(classes, layer, args, cuda)
        r = result["models"][layer]
        print(f"{layer}: CPU conservation {r['cpu']['conservation']:.2e}")
        if cuda:
            print(
                f"  logits, model's kernels vs MambaLRP's forward: max rel diff "
                f"{r['forward_kernels_vs_takeover_max_rel_diff']:.2e}"
            )
            for key in ("gpu", "gpu_torch_scan"):
                g = r[key]
                print(
                    f"  GPU, scan backend {g['backend']} (ran: {g['scans_by_backend']}): conservation "
                    f"{g['conservation']:.2e}, relevance vs CPU max rel diff {g['relevance_cpu_vs_gpu_max_rel_diff']:.2e}"
                )
        print(f"  {'ok' if r['passed'] else 'FAILED'}")
    result["passed"] = all(r["passed"] for r in result["models"].values())
    if not cuda:
        result["gpu_half"] = "skipped: needs CUDA and mamba-ssm installed"
        print("CUDA is not available: the GPU half needs a CUDA machine with mamba-ssm installed; CPU half done.")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
