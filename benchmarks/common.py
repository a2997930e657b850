"""Shared pieces of the benchmark scripts: the benchmark models, timing, memory probes, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

# Mamba-130M shape (state-spaces/mamba-130m): 24 layers, d_model 768, d_inner 1536, state 16.
MAMBA1_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2, conv_kernel=4, num_labels=2)
# Mamba2-130M-like (transformers Mamba2Config): 24 layers, hidden 768, expand 2, head_dim 64, state 128, 1 group.
MAMBA2_130M = dict(
    vocab_size=50280,
    hidden_size=768,
    state_size=128,
    num_hidden_layers=24,
    expand=2,
    head_dim=64,
    num_heads=24,
    n_groups=1,
    conv_kernel=4,
    chunk_size=256,
    num_labels=2,
)


def mamba1_classifier(layers: int = 24, seed: int = 0, **overrides: Any) -> nn.Module:
    """The paper's classifier (last-token 2-class head) at Mamba-130M shape, random weights."""
    from transformers import MambaConfig

    from captum_mambalrp.models import MambaForLastTokenClassification

    torch.manual_seed(seed)
    cfg = MambaConfig(**{**MAMBA1_130M, "num_hidden_layers": layers, **overrides})
    return MambaForLastTokenClassification(cfg).eval()


class Mamba2LastToken(nn.Module):
    """``Mamba2Model`` + a 2-class ``lm_head`` at every position (read at the last token)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import Mamba2Model

        self.backbone = Mamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, 2, bias=False)
        self.config = config

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, use_cache=None):
        h = self.backbone(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        out = self.lm_head(h.to(self.lm_head.weight.dtype))
        return out if out.dtype == torch.float64 else out.float()  # float64 models keep float64 scores


def mamba2_classifier(layers: int = 24, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import Mamba2Config

    torch.manual_seed(seed)
    cfg = Mamba2Config(**{**MAMBA2_130M, "num_hidden_layers": layers, **overrides})
    return Mamba2LastToken(cfg).eval()


@contextlib.contextmanager
def perturbed_weights(model: nn.Module, scale: float = 1e-7, seed: int = 0) -> Iterator[None]:
    """Every parameter times ``1 + scale * N(0, 1)`` (restored afterwards): how far relevance
    moves under such a change is the float32 rounding floor of a deep random model, against
    which agreement between implementations is judged."""
    g = torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    """The median seconds of ``fn()`` over ``repeats`` calls after one warm-up, timed by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: int = 0) -> Dict[str, float]:
    """Best and median wall time of ``fn`` (seconds) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"best_s": times[0], "median_s": times[len(times) // 2], "repeats": repeats}


def rss_peak_reset() -> bool:
    """Reset this process's peak RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_mib() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_now_mib() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for name in ("transformers", "captum", "triton", "mamba_ssm", "causal_conv1d", "numpy"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except Exception:  # noqa: BLE001 - absent or broken: just not reported
            out[name] = "absent"
    out["cpu"] = platform.processor() or platform.machine()
    out["cpu_count"] = str(os.cpu_count())
    out["torch_threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    try:
        out["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return out


def write_results(path: Optional[str], results: Dict[str, Any], quiet: bool = False) -> None:
    """Write ``results`` as JSON (``.json``) and its rows as CSV (same name, ``.csv``)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    rows: List[Dict[str, Any]] = results.get("rows", [])
    if rows:
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(os.path.splitext(path)[0] + ".csv", "w") as f:
            f.write(",".join(keys) + "\n")
            for r in rows:
                f.write(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + "\n")
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)


def print_ratios(ratios: List[Dict[str, Any]]) -> None:
    """The ratio rows, last in a benchmark's output: value, goal, and whether it was met."""
    print("\n# ratios (one run)")
    for r in ratios:
        v = r["value"]
        v = f"{v:.4g}" if isinstance(v, float) else v
        print(f"RATIO {r['name']}: {v}  (goal {r['goal']}){'' if r['ok'] is None else ('  OK' if r['ok'] else '  MISSED')}")


class RecomputeSpy:
    """What ``recompute="auto"`` decided, read from the pass itself: the first pass's plan after
    construction or :meth:`reset` (``.plan``, ``.mode``) and the sequences per part of a batch
    run in parts (``.part_size``; ``0``: not even one sequence keeps everything, so the batch runs
    whole; ``None`` when no batch was sized). Patches
    ``RecomputePlan.choose`` and ``RecomputePlan.kept_batch`` for the rest of the process."""

    def __init__(self) -> None:
        from captum_mambalrp.adapters import recompute

        self.plan: Any = None
        self.mode: Any = None
        self.part_size: Optional[int] = None
        choose, kept_batch = recompute.RecomputePlan.choose, recompute.RecomputePlan.kept_batch
        spy = self

        def choose_spy(plan: Any, hidden: Any) -> Any:
            mode = choose(plan, hidden)
            if spy.plan is None:
                spy.plan, spy.mode = plan, mode
            return mode

        def kept_batch_spy(plan: Any, *args: Any, **kwargs: Any) -> int:
            spy.part_size = kept_batch(plan, *args, **kwargs)
            return spy.part_size

        recompute.RecomputePlan.choose = choose_spy  # type: ignore[method-assign]
        recompute.RecomputePlan.kept_batch = kept_batch_spy  # type: ignore[method-assign]

    def reset(self) -> None:
        self.plan, self.mode, self.part_size = None, None, None

    def summary(self) -> Dict[str, Any]:
        """The decision as plain values (for a JSON row)."""
        plan = self.plan
        if plan is None:
            return {"mode": None, "part_size": self.part_size}
        return {
            "mode": str(self.mode),
            "part_size": self.part_size,
            "output_mixers": plan.output_mixers,  # None: all (in "projection" mode)
            "projection_mixers": plan.projection_mixers,
            "product_layers": plan.product_layers,
            "layers": len(plan.layer_products),
            "sequence_settings": None if plan.sequence is None else str(plan.sequence),
            "estimate_gib": {k: round(v / 2**30, 2) for k, v in plan.needed.items()},
        }
