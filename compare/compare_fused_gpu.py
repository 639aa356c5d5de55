#!/usr/bin/env python3
"""GPU: the fused path against PyTorch's materialised logits on the GPU, same inputs, one run.

Issue 9 §3 on a GPU: device memory one call adds beyond its inputs, and time. For each shape the
inputs of `infopo bench --fused-linear` (src/synth.rs `hidden_inputs`, seed 2026) are rebuilt
bit for bit (compare/compare_fused.py `synth_hidden`) and moved to the GPU once. Then, each side
timed with CUDA events around every call (median after warm-up, every sample in the JSON) and
memory-probed on every call, the first (cold) one included:
  torch-materialised  logits = h @ W.T for the real and the masked hidden states, both kept,
                      log_softmax of both in float32, kl_div(log_target=True) summed over V, the
                      log-ratio of the target (compare/common.py `torch_rows`), under inference_mode;
  torch-gemms         the two GEMMs h @ W.T alone (outputs in the input dtype): the floor any
                      materialising path pays (the crate's own GEMM floor, f32 outputs, is
                      benches/cuda.rs's, run by scripts/gpu-check);
  liger-flce-real     Liger-Kernel's fused linear cross-entropy on the real side only, when
                      `liger_kernel` imports — a different quantity (one softmax's CE, not the
                      paired KL), for scale;
  crate-cuda          `infopo bench --fused-linear --backend cuda --json` in a subprocess: the same
                      inputs uploaded once, CudaBackend::score_hidden_batch per call.
Memory: PyTorch's max_memory_allocated() after reset_peak_memory_stats() minus memory_allocated()
at the reset; the crate's stream-ordered pool's USED_MEM_HIGH after a reset minus its use at the
reset (src/bin/infopo/bench/device_memory.rs; null with the reason where the device has no
pools), both the largest over every call. The crate's first rows (KL, log-ratio) are checked
against PyTorch float32 on the same device tensors (abs err < 1e-3), else the run fails.

    "$PY" compare/compare_fused_gpu.py --infopo path/to/infopo      # the issue's three shapes
    "$PY" compare/compare_fused_gpu.py --dry-run [--infopo X]        # tiny, CPU torch, temp folder

Writes results/<date>-<gpu>-fused-gpu.{json,log} (or --out DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import compare_fused as F  # noqa: E402

MIB = float(1 << 20)
# N x D x V : dtype. The issue's memory shape (f32, bf16) and its time-goal shape.
SHAPES = "256x1024x151936:f32,256x1024x151936:bf16,4096x4096x151936:bf16"
TIME_GOAL_SHAPE = (4096, 4096, 151936, "bf16")
NOTES = [
    "torch-gemms keeps both outputs in the input dtype (bf16 for bf16): cheaper than the crate's f32 chunk "
    "logits; the ≤ 1.15× goal is against cuBLAS's two GEMMs with f32 outputs, benches/cuda.rs (criterion, "
    "scripts/gpu-check's bench-fused step).",
    "TF32 is off (torch.backends.cuda.matmul.allow_tf32 = False): the f32 GEMMs of every side run in full fp32, "
    "as the crate's cuBLAS calls (CUBLAS_COMPUTE_32F) do.",
    "CUDA events around each call include the host's submission gaps; both sides synchronise after every "
    "call (for the memory probe), so neither overlaps calls.",
    "Memory beyond the inputs counts what each side's allocator hands out (PyTorch's caching allocator; the "
    "crate's stream-ordered pool), not cuBLAS's workspace or the CUDA context; the crate's JSON also lists "
    "cuMemGetInfo's change per call (per_call_device_used_increase_bytes), which does count those.",
]


def parse_shapes(text):
    out = []
    for item in text.split(","):
        dims, _, dtype = item.strip().partition(":")
        n, d, v = (int(x) for x in dims.split("x"))
        out.append((n, d, v, dtype or "bf16"))
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help=f"NxDxV:dtype, comma-separated (default {SHAPES})")
    ap.add_argument("--chunk", type=int, default=4096, help="the crate's vocabulary chunk (default 4096)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls of each side (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2; still memory-probed)")
    ap.add_argument("--infopo", help="the infopo binary, built with --features cuda (default target/release/infopo)")
    ap.add_argument("--crate-backend", default=None, help="the crate's backend (default cuda; cpu with --dry-run)")
    ap.add_argument("--no-liger", action="store_true", help="skip Liger even when it imports")
    ap.add_argument("--out", help="results folder (default results/; a temp folder with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="16x64x1000 f32 and bf16, 1 call after 1 warm-up, PyTorch on the CPU when there is no GPU; "
                         "the crate only with --infopo")
    return ap.parse_args()


class Side:
    """Times and memory of one implementation: CUDA events and the caching allocator's peak on a
    GPU, perf_counter and no memory figure on the CPU (dry runs)."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def call(self, fn):
        """(result, ms, peak bytes beyond the allocation at the start or None)."""
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1e3, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end), torch.cuda.max_memory_allocated() - base


def measure(side, name, fn, a, log, shape_row):
    """warm-up + iters calls of fn(); a result row."""
    times, peaks = [], []
    try:
        for i in range(a.warmup + a.iters):
            out, ms, peak = side.call(fn)
            del out
            peaks.append(peak)
            if i >= a.warmup:
                times.append(ms)
            log(f"  {'run' if i >= a.warmup else 'warm-up'} {i + 1}: {name} {ms:9.3f} ms"
                + ("" if peak is None else f", peak beyond inputs {peak / MIB:9.1f} MiB"))
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        log(f"  {name}: out of memory ({str(e).splitlines()[0]})")
        return dict(shape_row, impl=name, status="skipped: out of memory")
    except Exception as e:  # noqa: BLE001 (a peer that fails is recorded, not fatal)
        log(f"  {name}: failed: {type(e).__name__}: {e}")
        return dict(shape_row, impl=name, status=f"failed: {type(e).__name__}: {str(e)[:200]}")
    st = C.stats([t / 1e3 for t in times])
    measured = [p for p in peaks if p is not None]
    return dict(shape_row, impl=name, status="ok", median_ms=st["median_ms"], min_ms=st["min_ms"],
                times_ms=st["times_ms"], peak_beyond_inputs_mib=max(measured) / MIB if measured else None,
                first_call_beyond_inputs_mib=measured[0] / MIB if measured else None,
                per_call_beyond_inputs_mib=[round(p / MIB, 2) for p in measured] or None)


def liger_peer(a, log):
    """Liger's fused linear cross-entropy module, or None (and the reason, logged)."""
    if a.no_liger:
        return None, "skipped (--no-liger)"
    try:
        import liger_kernel
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001
        log(f"# liger_kernel: not installed ({type(e).__name__}: {e})")
        return None, "not installed"
    version = getattr(liger_kernel, "__version__", "unknown")
    log(f"# liger_kernel {version}: liger-flce-real is its fused linear cross-entropy on the real side only")
    return LigerFusedLinearCrossEntropyLoss(reduction="sum"), version


def main():
    a = parse_args()
    shapes = parse_shapes(a.shapes)
    gpu = torch.cuda.is_available()
    if a.dry_run:
        shapes, a.iters, a.warmup = [(16, 64, 1000, "f32"), (16, 64, 1000, "bf16")], 1, 1
        a.chunk = min(a.chunk, 256)
    elif not gpu:
        raise SystemExit("no CUDA device: this comparison needs a GPU (--dry-run checks the script on the CPU)")
    device = torch.device("cuda" if gpu else "cpu")
    backend = a.crate_backend or ("cuda" if gpu or not a.dry_run else "cpu")
    # The check's reference and the f32 paths in full fp32 (no TF32), like the crate's cuBLAS calls.
    torch.backends.cuda.matmul.allow_tf32 = False
    kind = "fused-gpu" + ("-dry-run" if a.dry_run else "")
    env = C.env_info(kind)
    env["device"] = env["gpu"]["name"] if gpu else env["host"]["cpu"]
    dry_tmp = None
    if a.dry_run and not a.out:
        import tempfile
        dry_tmp = tempfile.TemporaryDirectory(prefix="infopo-fused-gpu-dry-run-")
    name = f"{env['date']}-{C.slug(env['device'])}-fused-gpu" + ("-dry-run" if a.dry_run else "")
    rep = C.Report(env, a.out or (dry_tmp.name if dry_tmp else None), name=name)
    exe = None
    if a.infopo or not a.dry_run:
        exe = C.find_infopo(a.infopo, False, rep.log)
        env["software"]["infopo"] = C.infopo_version(exe)
        rep.log(f"# infopo: {exe} ({env['software']['infopo']}), backend {backend}, chunk {a.chunk}")
    else:
        rep.log("# dry run without --infopo: the crate is not run")
    liger, liger_version = liger_peer(a, rep.log)
    env["software"]["liger_kernel"] = liger_version
    side = Side(device)

    results, checks = [], []
    for N, D, V, dname in shapes:
        dtype = C.DTYPES[dname]
        shape_row = {"rows": N, "hidden": D, "vocab": V, "dtype": dname}
        rep.log(f"\n## N={N} D={D} V={V} {dname}")
        t0 = time.perf_counter()
        real_h, masked_h, head, targets = F.synth_hidden(N, D, V, dtype)
        input_bytes = sum(t.numel() * t.element_size() for t in (real_h, masked_h, head, targets))
        real_h, masked_h, head, targets = (t.to(device) for t in (real_h, masked_h, head, targets))
        rep.log(f"inputs built and moved to {device} in {time.perf_counter() - t0:.1f} s: {input_bytes / 1e6:.1f} MB")

        with torch.inference_mode():
            torch_row = measure(side, "torch-materialised", lambda: F.torch_materialised(real_h, masked_h, head, targets),
                                a, rep.log, shape_row)
            results.append(dict(torch_row, input_bytes=input_bytes, f32_logits_mib=2 * N * V * 4 / MIB))
            results.append(measure(side, "torch-gemms", lambda: (real_h @ head.T, masked_h @ head.T), a, rep.log,
                                   shape_row))
            # The check: the first rows in float32 from the same device tensors.
            k = min(F.CHECK_ROWS, N)
            kl_ref, lr_ref = C.torch_rows(real_h[:k].float() @ head.float().T, masked_h[:k].float() @ head.float().T,
                                          targets[:k])
            kl_ref, lr_ref = kl_ref.cpu().tolist(), lr_ref.cpu().tolist()
            if torch_row["status"] == "ok":
                kl_t, lr_t = F.torch_materialised(real_h[:k], masked_h[:k], head, targets[:k])
                rep.log(f"  torch-materialised vs float32 logits, first {k} rows: kl "
                        f"{max(abs(x - y) for x, y in zip(kl_t.cpu().tolist(), kl_ref)):.1e}, log-ratio "
                        f"{max(abs(x - y) for x, y in zip(lr_t.cpu().tolist(), lr_ref)):.1e} (logits in {dname})")
        if liger is not None:
            with torch.no_grad():
                results.append(measure(side, "liger-flce-real", lambda: liger(head, real_h, targets), a, rep.log,
                                       shape_row))
        del real_h, masked_h, head, targets
        if gpu:
            torch.cuda.empty_cache()  # the crate's process gets the memory back

        if exe is None:
            continue
        cmd = [exe, "bench", "--fused-linear", "--backend", backend, "--rows", N, "--hidden", D, "--vocab", V,
               "--dtype", dname, "--chunk", a.chunk, "--iters", a.iters, "--warmup", a.warmup, "--json"]
        rc, out, err = C.run_cli(cmd, rep.log, timeout=1800)
        impl = f"crate-{backend}"
        if rc != 0:
            rep.log(f"  {impl}: failed (exit {rc})")
            results.append(dict(shape_row, impl=impl, chunk=a.chunk, status=f"exit {rc}: {err.strip()[-200:]}"))
            continue
        j = C.last_json(out)
        if backend == "cuda":
            peak = j["peak_device_pool_beyond_inputs_bytes"]
            per_call = j["per_call_device_pool_beyond_inputs_bytes"]
            memory = {"peak_beyond_inputs_mib": None if peak is None else peak / MIB,
                      "first_call_beyond_inputs_mib": None if not per_call else per_call[0] / MIB,
                      "per_call_beyond_inputs_mib": None if per_call is None else [round(p / MIB, 2) for p in per_call],
                      "device_pool_unavailable": j["device_pool_unavailable"],
                      "per_call_device_used_increase_mib": [round(b / MIB, 2)
                                                            for b in j["per_call_device_used_increase_bytes"]],
                      "wall_ms": j["wall_ms"]}
        else:  # a dry run on the CPU: the host's peak resident set
            rss = j["peak_rss_beyond_inputs_bytes"]
            memory = {"peak_beyond_inputs_mib": None if rss is None else rss / MIB}
        row = dict(shape_row, impl=impl, chunk=j["chunk"], status="ok", median_ms=j["median_ms"], min_ms=j["min_ms"],
                   times_ms=j["times_ms"], working_set_mib=j["working_set_bytes"] / MIB, input_bytes=j["input_bytes"],
                   **memory)
        if torch_row.get("peak_beyond_inputs_mib") and row["peak_beyond_inputs_mib"]:
            row["memory_ratio"] = torch_row["peak_beyond_inputs_mib"] / row["peak_beyond_inputs_mib"]
        if torch_row.get("median_ms"):
            row["time_vs_torch"] = row["median_ms"] / torch_row["median_ms"]
        gemms = next((r for r in results if r["impl"] == "torch-gemms" and r["status"] == "ok"
                      and (r["rows"], r["hidden"], r["vocab"], r["dtype"]) == (N, D, V, dname)), None)
        if gemms:
            row["time_vs_torch_gemms"] = row["median_ms"] / gemms["median_ms"]
        results.append(row)
        err_kl = max(abs(g - w) for g, w in zip(j["head_kl"], kl_ref))
        err_lr = max(abs(g - w) for g, w in zip(j["head_log_ratio"], lr_ref))
        same = j["input_bytes"] == input_bytes and err_kl < 1e-3 and err_lr < 1e-3
        checks.append({"impl": impl, "dtype": dname, "rows": N, "hidden": D, "vocab": V, "chunk": row["chunk"],
                       "rows_checked": len(j["head_kl"]), "max_abs_err_kl": err_kl, "max_abs_err_log_ratio": err_lr,
                       "same_inputs": same})
        rep.log(f"  {impl} chunk {row['chunk']}: median {C.fmt(row['median_ms'], '.3f')} ms, peak beyond inputs "
                f"{C.fmt(row['peak_beyond_inputs_mib'], '.1f')} MiB (by construction {row['working_set_mib']:.1f} MiB)"
                f"{'' if row.get('device_pool_unavailable') is None else ' — pool unavailable: ' + row['device_pool_unavailable']}"
                f"; first {len(j['head_kl'])} rows vs torch f32: kl {err_kl:.1e}, log-ratio {err_lr:.1e}"
                f"{'' if same else '  <-- NOT THE SAME INPUTS'}")

    rep.log("\n## Summary (peak memory beyond the inputs, max over calls; time: median of CUDA-event samples)")
    rep.log(C.table(["impl", "N", "D", "V", "dtype", "peak MiB", "torch ÷ crate", "median ms", "crate ÷ torch"],
                    [[r["impl"], r["rows"], r["hidden"], r["vocab"], r["dtype"], C.fmt(r.get("peak_beyond_inputs_mib"), ".1f"),
                      f"{r['memory_ratio']:.1f}×" if r.get("memory_ratio") else "", C.fmt(r.get("median_ms"), ".3f"),
                      f"{r['time_vs_torch']:.2f}×" if r.get("time_vs_torch") else ""]
                     for r in results if r["status"] == "ok"]))
    time_goal = None
    at_goal = [r for r in results if r["status"] == "ok" and r["impl"].startswith("crate-")
               and (r["rows"], r["hidden"], r["vocab"], r["dtype"]) == TIME_GOAL_SHAPE]
    if at_goal:
        r = at_goal[0]
        time_goal = {"shape": list(TIME_GOAL_SHAPE), "crate_median_ms": r["median_ms"],
                     "vs_torch_materialised": r.get("time_vs_torch"), "vs_torch_gemms": r.get("time_vs_torch_gemms"),
                     "note": "the goal (≤ 1.15× cuBLAS's two GEMMs alone) is judged by benches/cuda.rs; "
                             "vs_torch_gemms is against bf16-output GEMMs"}
        rep.log(f"time at N=4096, D=4096, V=151936 bf16: crate {r['median_ms']:.2f} ms = "
                f"{C.fmt(r.get('time_vs_torch'), '.2f')}× torch-materialised, "
                f"{C.fmt(r.get('time_vs_torch_gemms'), '.2f')}× torch's two GEMMs alone")
    bad = [c for c in checks if not c["same_inputs"]]
    rep.log(f"same inputs: {len(checks) - len(bad)}/{len(checks)} crate runs agree with PyTorch float32 on the first "
            f"{F.CHECK_ROWS} rows (abs err < 1e-3)")
    rep.finish({
        "title": "the fused path on the GPU vs PyTorch's materialised logits: device memory beyond the inputs and time",
        "dry_run": a.dry_run,
        "shapes": [list(s) for s in shapes], "chunk": a.chunk, "iters": a.iters, "warmup": a.warmup, "seed": F.SEED,
        "crate_backend": backend,
        "inputs": "src/synth.rs hidden_inputs (seed 2026), rebuilt element by element in NumPy: the same tensors",
        "memory_method": ("PyTorch: max_memory_allocated() after reset_peak_memory_stats() minus memory_allocated() at "
                          "the reset; crate: its stream-ordered pool's USED_MEM_HIGH after a reset minus USED_MEM_CURRENT "
                          "at the reset; per call, max over every call, the first included"),
        "results": [{k: (C.clean(v) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "checks": checks,
        "time_goal": time_goal,
        "notes": NOTES,
    })
    if dry_tmp:
        dry_tmp.cleanup()
    if bad:
        raise SystemExit(f"{len(bad)} crate runs did not see the same inputs as PyTorch")


if __name__ == "__main__":
    main()
