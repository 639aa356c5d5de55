#!/usr/bin/env python3
"""Peak memory (and time) of the fused path against PyTorch's materialised logits, same inputs, one run.

For each input dtype and vocabulary V, the inputs of `infopo bench --fused-linear` are rebuilt
here bit for bit (src/synth.rs `hidden_inputs`, seed 2026: SplitMix64 is counter-based, so NumPy
draws the same elements): real and masked hidden states [N, D], an lm_head [V, D], targets. Then:
  (a) PyTorch CPU eager, the materialised path as trainer code writes it:
      logits = h @ W.T (÷ τ, skipped at τ = 1) for the real and the masked hidden states, both kept;
      log_softmax of both in float32, kl_div(log_target=True) summed over V, the log-ratio of the
      target (compare/common.py `torch_rows`), under inference_mode;
  (b) the crate, `infopo bench --fused-linear --json` in a subprocess, for each vocabulary chunk
      size: the same inputs (it builds them from the same seed), the logits computed chunk by
      chunk and never stored.
Memory, the same way on both sides: after the inputs are built and touched, the peak resident
set size is reset (`echo 5 > /proc/self/clear_refs` sets VmHWM to VmRSS); after one call,
VmHWM − VmRSS-at-reset is the most resident memory the call added beyond the inputs (every
allocation, thread stack and library buffer). Every call is measured, the first (cold) one
included, and the largest value is reported. The crate also reports its heap peak (a counting
allocator) and its chunk buffers by construction. Time: median of the timed calls after warm-up
(perf_counter in both). That the two sides saw the same inputs is checked: the crate's row KL and
log-ratio of the first rows against PyTorch's, recomputed in float32 from the same tensors.

    PY="$(scripts/bench-env | tail -n1)"
    "$PY" compare/compare_fused.py                    # N=256, D=1024, V ∈ {32003, 151936}, f32
    "$PY" compare/compare_fused.py --dtype f32,bf16 --chunks 1024,4096,16384
    "$PY" compare/compare_fused.py --dry-run          # N=16, D=64, V=1000: checks the script

Writes results/<date>-<cpu>-fused-memory.{json,log} (or --out DIR). The goal (issue 9):
≥ 10× less peak memory beyond the inputs than PyTorch at N=256, D=1024, V=151936 on the CPU.
Timings are only meaningful on a quiet machine: the JSON records the load average around them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

GOAL_RATIO = 10.0
GOAL_SHAPE = (256, 1024, 151936)
SEED = 2026  # src/bin/infopo/bench/fused.rs SEED
MASKED_HIDDEN_NOISE = 0.3  # src/synth.rs
LM_HEAD_SCALE = 2.0  # src/synth.rs
CHECK_ROWS = 8
MIB = float(1 << 20)
NOTES = [
    "crate-cpu is the float64 reference (f64 chunk GEMMs with the `gemm` crate), not a speed path: "
    "its time against PyTorch's float32 is for scale only; the speed goal is the GPU's (issue 9 §3).",
    "The crate's peak is dominated by its lm_head chunk widened to f64 (chunk·D·8 bytes) and the two "
    "chunks of logits (2·N·chunk·8): it grows with the chunk, not with V.",
    "Why the max over calls, the first included: glibc keeps freed memory for reuse (its mmap threshold rises "
    "to the size of a freed block, up to 32 MiB), so a later call can reuse pages already counted in the "
    "resident set at the reset and appear to add nothing (see per_call_rss_beyond_inputs_mib in the JSON).",
]

# ---------------------------------------------------------------------------------------------
# src/synth.rs `hidden_inputs`, element by element in NumPy (uint64 arithmetic wraps like Rust's
# wrapping_*; every value is computed in float64, rounded to float32, then to the dtype).

GAMMA = np.uint64(0x9E3779B97F4A7C15)
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def counter_u64(key, index):
    """src/synth.rs `counter_u64`: SplitMix64's output at state key + (index + 1)·γ."""
    z = np.uint64(key) + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * GAMMA
    z = (z ^ (z >> np.uint64(30))) * M1
    z = (z ^ (z >> np.uint64(27))) * M2
    return z ^ (z >> np.uint64(31))


def unit(bits):
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / float(1 << 53))


def counter_normal(key, index):
    index = np.asarray(index, dtype=np.uint64)
    u = 1.0 - unit(counter_u64(key, np.uint64(2) * index))
    v = unit(counter_u64(key, np.uint64(2) * index + np.uint64(1)))
    return np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * math.pi * v)


def stream_key(seed, stream):
    return int(counter_u64(seed, np.array([stream], dtype=np.uint64))[0])


def synth_hidden(rows, hidden, vocab, dtype, seed=SEED, step=1 << 20):
    """(real_hidden, masked_hidden, lm_head, targets) exactly as the crate builds them. The
    elements are independent (counter-based), so blocks of `step` are filled on a thread per core
    (NumPy releases the GIL inside its loops): the lm_head of N=4096, D=4096, V=151936 is 622M
    elements."""
    real_key, noise_key, head_key, target_key = (stream_key(seed, s) for s in range(4))

    def fill(n_elems, value):
        out = torch.empty(n_elems, dtype=dtype)

        def block(a):
            idx = np.arange(a, min(n_elems, a + step), dtype=np.uint64)
            out[a:a + len(idx)] = torch.from_numpy(value(idx).astype(np.float32)).to(dtype)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(block, range(0, n_elems, step)))
        return out

    n = rows * hidden
    real = fill(n, lambda i: counter_normal(real_key, i)).view(rows, hidden)
    masked = fill(n, lambda i: counter_normal(real_key, i) + MASKED_HIDDEN_NOISE * counter_normal(noise_key, i))
    head_std = LM_HEAD_SCALE / math.sqrt(max(hidden, 1))
    head = fill(vocab * hidden, lambda i: head_std * counter_normal(head_key, i)).view(vocab, hidden)
    targets = torch.from_numpy((unit(counter_u64(target_key, np.arange(rows, dtype=np.uint64))) * vocab).astype(np.int64))
    return real, masked.view(rows, hidden), head, targets


# ---------------------------------------------------------------------------------------------
# Memory: /proc/self/status and clear_refs (Linux)


def status_kib(field):
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class PeakRss:
    """Resident memory a section adds at its peak: VmHWM after − VmRSS at the reset."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.start_kib = status_kib("VmRSS")
        self.bytes = None
        return self

    def __exit__(self, *exc):
        self.bytes = (status_kib("VmHWM") - self.start_kib) * 1024
        return False


def clear_refs_works():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmHWM") is not None
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The PyTorch materialised path


def torch_materialised(real_h, masked_h, head, targets, tau=1.0):
    """Both [N, V] logit tensors materialised (÷ τ only when τ ≠ 1, the generous way), then the
    rows as compare/common.py `torch_rows` computes them (log_softmax in float32, KL, log-ratio)."""
    real = real_h @ head.T
    masked = masked_h @ head.T
    if tau != 1.0:
        real, masked = real / tau, masked / tau
    return C.torch_rows(real, masked, targets)


def torch_note(results):
    sizes = ", ".join(f"{r['peak_rss_beyond_inputs_mib'] / (r['rows'] * r['vocab'] * 4 / MIB):.1f}× at V={r['vocab']} {r['dtype']}"
                      for r in results if r["impl"] == "torch-materialised")
    return (f"PyTorch's peak in units of one float32 [N, V] tensor: {sizes} (in f32: both logit tensors, both "
            "log-softmaxes and kl_div(log_target=True)'s elementwise temporaries).")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="N (default 256)")
    ap.add_argument("--hidden", type=int, default=1024, help="D (default 1024)")
    ap.add_argument("--vocab", default="32003,151936", help="V, comma-separated (default 32003,151936)")
    ap.add_argument("--dtype", default="f32", help="input dtypes, comma-separated from f32,bf16,f16 (default f32)")
    ap.add_argument("--chunks", default="1024,4096,16384", help="the crate's vocabulary chunks (default 1024,4096,16384)")
    ap.add_argument("--backends", default="cpu", help="the crate's backends, comma-separated: cpu,emulated (default cpu; "
                    "emulated needs a binary built with --features emulator and is slow)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls of each side (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1; still memory-measured)")
    ap.add_argument("--infopo", help="the infopo binary (default target/release/infopo, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--out", help="results folder (default results/; a temp folder with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="N=16, D=64, V=1000, chunks 256,512, 1 call after 1 warm-up")
    return ap.parse_args()


def find_infopo(a, log):
    exe = C.find_infopo(a.infopo, a.build and "emulated" not in a.backends, log)
    if "emulated" in a.backends and not a.infopo:
        # The emulated kernel is compiled into the binary only with the `emulator` feature.
        log(f"$ cargo build --release --features emulator --bin infopo  (in {C.REPO})")
        if subprocess.run(["cargo", "build", "--release", "--features", "emulator", "--bin", "infopo"], cwd=C.REPO).returncode:
            raise SystemExit("cargo build --release --features emulator failed")
    return exe


def main():
    a = parse_args()
    if a.dry_run:
        a.rows, a.hidden, a.vocab, a.chunks, a.iters, a.warmup = 16, 64, "1000", "256,512", 1, 1
    vocabs = [int(v) for v in a.vocab.split(",")]
    dtypes = [d.strip() for d in a.dtype.split(",")]
    chunks = [int(c) for c in a.chunks.split(",")]
    a.backends = [b.strip() for b in a.backends.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    if not clear_refs_works():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): this benchmark needs Linux")
    env = C.env_info("fused-memory-dry-run" if a.dry_run else "fused-memory")
    env["host"]["loadavg_1m_before"] = env["host"].pop("loadavg_1m")
    dry_tmp = tempfile.TemporaryDirectory(prefix="infopo-fused-dry-run-") if a.dry_run and not a.out else None
    out_dir = a.out or (dry_tmp.name if dry_tmp else None)
    name = f"{env['date']}-{C.slug(env['device'])}-fused-memory" + ("-dry-run" if a.dry_run else "")
    rep = C.Report(env, out_dir, name=name)
    exe = find_infopo(a, rep.log)
    env["software"]["infopo"] = C.infopo_version(exe)
    rep.log(f"# infopo: {exe} ({env['software']['infopo']}); torch threads {torch.get_num_threads()}")
    rep.log("# memory: peak resident set beyond the inputs (clear_refs 5, then VmHWM − VmRSS at the reset), "
            "max over every call, the first included")

    results, checks = [], []
    N, D = a.rows, a.hidden
    for dname in dtypes:
        dtype = C.DTYPES[dname]
        for V in vocabs:
            rep.log(f"\n## N={N} D={D} V={V} {dname}")
            t0 = time.perf_counter()
            real_h, masked_h, head, targets = synth_hidden(N, D, V, dtype)
            input_bytes = sum(t.numel() * t.element_size() for t in (real_h, masked_h, head, targets))
            rep.log(f"inputs built in {time.perf_counter() - t0:.1f} s: {input_bytes / 1e6:.1f} MB")

            # (a) PyTorch: every call memory-measured, the timed ones timed.
            peaks, times = [], []
            with torch.inference_mode():
                for i in range(a.warmup + a.iters):
                    with PeakRss() as p:
                        s = time.perf_counter()
                        kl, lr = torch_materialised(real_h, masked_h, head, targets)
                        dt = time.perf_counter() - s
                    peaks.append(p.bytes)
                    label = "run" if i >= a.warmup else "warm-up"
                    rep.log(f"  {label} {i + 1}: torch-materialised {dt * 1e3:9.1f} ms, "
                            f"peak beyond inputs {p.bytes / MIB:8.1f} MiB")
                    if i >= a.warmup:
                        times.append(dt)
                    del kl, lr
                # The check: the first rows in float32 from the same tensors (outside any measurement).
                kl_ref, lr_ref = C.torch_rows(real_h[:CHECK_ROWS].float() @ head.float().T,
                                              masked_h[:CHECK_ROWS].float() @ head.float().T, targets[:CHECK_ROWS])
            st = C.stats(times)
            logits_bytes = 2 * N * V * 4
            torch_row = {"impl": "torch-materialised", "dtype": dname, "rows": N, "hidden": D, "vocab": V,
                         "chunk": None, "status": "ok", "median_ms": st["median_ms"], "min_ms": st["min_ms"],
                         "times_ms": st["times_ms"], "peak_rss_beyond_inputs_mib": max(peaks) / MIB,
                         "first_call_rss_beyond_inputs_mib": peaks[0] / MIB,
                         "per_call_rss_beyond_inputs_mib": [round(x / MIB, 2) for x in peaks],
                         "input_bytes": input_bytes, "f32_logits_mib": logits_bytes / MIB}
            results.append(torch_row)
            del real_h, masked_h, head

            # (b) the crate, one process per backend and chunk (it builds the same inputs itself).
            for backend in a.backends:
                for chunk in chunks:
                    cmd = [exe, "bench", "--fused-linear", "--backend", backend, "--rows", N, "--hidden", D,
                           "--vocab", V, "--dtype", dname, "--chunk", chunk, "--iters", a.iters,
                           "--warmup", a.warmup, "--json"]
                    rc, out, err = C.run_cli(cmd, rep.log, timeout=3600)
                    if rc != 0:
                        rep.log(f"  crate {backend} chunk {chunk}: failed (exit {rc})")
                        results.append({"impl": f"crate-{backend}", "dtype": dname, "rows": N, "hidden": D, "vocab": V,
                                        "chunk": chunk, "status": f"exit {rc}: {err.strip()[-200:]}"})
                        continue
                    j = C.last_json(out)
                    rss = j["peak_rss_beyond_inputs_bytes"]
                    row = {"impl": f"crate-{backend}", "dtype": dname, "rows": N, "hidden": D, "vocab": V,
                           "chunk": j["chunk"], "status": "ok", "median_ms": j["median_ms"], "min_ms": j["min_ms"],
                           "times_ms": j["times_ms"],
                           "peak_rss_beyond_inputs_mib": None if rss is None else rss / MIB,
                           "first_call_rss_beyond_inputs_mib": None if j["first_call_rss_beyond_inputs_bytes"] is None
                           else j["first_call_rss_beyond_inputs_bytes"] / MIB,
                           "peak_heap_beyond_inputs_mib": j["peak_heap_beyond_inputs_bytes"] / MIB,
                           "working_set_mib": j["working_set_bytes"] / MIB, "input_bytes": j["input_bytes"]}
                    if row["peak_rss_beyond_inputs_mib"]:
                        row["memory_ratio"] = torch_row["peak_rss_beyond_inputs_mib"] / row["peak_rss_beyond_inputs_mib"]
                    results.append(row)
                    # Same inputs? The crate's first rows against PyTorch float32 on the same tensors.
                    got_kl, got_lr = j["head_kl"], j["head_log_ratio"]
                    err_kl = max(abs(g - w) for g, w in zip(got_kl, kl_ref.tolist()))
                    err_lr = max(abs(g - w) for g, w in zip(got_lr, lr_ref.tolist()))
                    same = j["input_bytes"] == input_bytes and err_kl < 1e-3 and err_lr < 1e-3
                    checks.append({"impl": row["impl"], "dtype": dname, "vocab": V, "chunk": row["chunk"],
                                   "rows_checked": len(got_kl), "max_abs_err_kl": err_kl,
                                   "max_abs_err_log_ratio": err_lr, "same_inputs": same})
                    rep.log(f"  crate-{backend} chunk {row['chunk']}: median {C.fmt(row['median_ms'], '.1f')} ms, "
                            f"peak beyond inputs {C.fmt(row['peak_rss_beyond_inputs_mib'], '.1f')} MiB resident, "
                            f"{row['peak_heap_beyond_inputs_mib']:.1f} MiB heap; first {len(got_kl)} rows vs torch f32: "
                            f"kl {err_kl:.1e}, log-ratio {err_lr:.1e}{'' if same else '  <-- NOT THE SAME INPUTS'}")
            del targets, kl_ref, lr_ref

    env["host"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    rep.log(f"\n## Summary (peak resident memory beyond the inputs, max over calls; time median of {a.iters})")
    rep.log(C.table(["impl", "dtype", "V", "chunk", "peak MiB", "torch ÷ crate", "heap MiB", "median ms"],
                    [[r["impl"], r["dtype"], r["vocab"], r.get("chunk") or "—",
                      C.fmt(r.get("peak_rss_beyond_inputs_mib"), ".1f"),
                      f"{r['memory_ratio']:.1f}×" if r.get("memory_ratio") else "",
                      C.fmt(r.get("peak_heap_beyond_inputs_mib"), ".1f"), C.fmt(r.get("median_ms"), ".1f")]
                     for r in results if r["status"] == "ok"]))
    goal = None
    gN, gD, gV = GOAL_SHAPE
    at_goal = [r for r in results if r["status"] == "ok" and r.get("memory_ratio") and (r["rows"], r["hidden"], r["vocab"]) == GOAL_SHAPE
               and r["impl"] == "crate-cpu" and r["chunk"] == min(4096, gV)]
    if at_goal:
        r = at_goal[0]
        goal = {"shape": list(GOAL_SHAPE), "dtype": r["dtype"], "chunk": r["chunk"], "ratio": r["memory_ratio"],
                "target": GOAL_RATIO, "met": r["memory_ratio"] >= GOAL_RATIO,
                "baseline": "torch-materialised peak RSS beyond inputs"}
        rep.log(f"goal (≥ {GOAL_RATIO:g}× less peak memory beyond the inputs than PyTorch at N={gN}, D={gD}, V={gV}, "
                f"crate cpu, default chunk 4096): {r['memory_ratio']:.1f}× — {'met' if goal['met'] else 'NOT met'}")
    bad = [c for c in checks if not c["same_inputs"]]
    rep.log(f"same inputs: {len(checks) - len(bad)}/{len(checks)} crate runs agree with PyTorch on the first "
            f"{CHECK_ROWS} rows (abs err < 1e-3)")
    rep.log(f"load average (1 min): {env['host']['loadavg_1m_before']} before, {env['host']['loadavg_1m_after']} after")
    rep.finish({
        "title": "peak memory beyond the inputs: the fused path vs PyTorch's materialised logits",
        "dry_run": a.dry_run,
        "rows": N, "hidden": D, "vocabs": vocabs, "dtypes": dtypes, "chunks": chunks, "backends": a.backends,
        "iters": a.iters, "warmup": a.warmup, "seed": SEED,
        "inputs": "src/synth.rs hidden_inputs (seed 2026), rebuilt element by element in NumPy: the same tensors",
        "memory_method": "clear_refs 5 then VmHWM − VmRSS at the reset, per call; max over every call, the first included",
        "results": [{k: (C.clean(v) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "checks": checks,
        "goal": goal,
        "notes": NOTES + [torch_note(results)],
    })
    if dry_tmp:
        dry_tmp.cleanup()
    if bad:
        raise SystemExit(f"{len(bad)} crate runs did not see the same inputs as PyTorch")


if __name__ == "__main__":
    main()
