import sys, time, os, io, warnings, cProfile, pstats, statistics
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
torch.backends.cuda.matmul.allow_tf32 = True
import gpu_scale
from captum_mambalrp import MambaLRP
from captum_mambalrp.kernels import dispatch

def med(fn, n=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

for shape in sys.argv[1:]:
    model = gpu_scale.build(shape, torch.bfloat16, 8)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    lrp = MambaLRP(model)
    print(f"== {shape} 8 layers L=4096")
    print("attr default ms", round(med(lambda: lrp.attribute(ids, target=1)), 2))
    lrp2 = MambaLRP(model, recompute=False); print("attr recompute=False ms", round(med(lambda: lrp2.attribute(ids, target=1)), 2))
    saved = dict(dispatch.NORM_KERNELS); dispatch.NORM_KERNELS.clear()
    print("attr no norm kernel ms", round(med(lambda: lrp.attribute(ids, target=1)), 2))
    dispatch.NORM_KERNELS.update(saved)
    os.environ["CAPTUM_MAMBALRP_FUSED"] = "0"
    print("attr no fused kernels ms", round(med(lambda: lrp.attribute(ids, target=1)), 2))
    del os.environ["CAPTUM_MAMBALRP_FUSED"]
    # CPU time alone: the attribution with the GPU work skipped is not possible; measure the
    # host time of one call without a final sync (launch-bound when it exceeds the GPU time)
    torch.cuda.synchronize(); t = time.perf_counter(); lrp.attribute(ids, target=1); host = time.perf_counter() - t
    torch.cuda.synchronize(); print("host time of one call ms (no final sync)", round(host * 1e3, 2), "then synced", round((time.perf_counter() - t) * 1e3, 2))
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lrp.attribute(ids, target=1)
    torch.cuda.set_sync_debug_mode(0)
    seen = {}
    import traceback
    for x in w:
        key = str(x.message)[:80] + f" @ {x.filename}:{x.lineno}"
        seen[key] = seen.get(key, 0) + 1
    print("synchronising calls:", sum(seen.values()))
    for k, v in sorted(seen.items(), key=lambda kv: -kv[1])[:12]: print("  ", v, k)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(3): lrp.attribute(ids, target=1)
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28); print(s.getvalue()[-9000:])
    del model, lrp; torch.cuda.empty_cache()
