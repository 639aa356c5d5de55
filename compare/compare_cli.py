#!/usr/bin/env python3
"""The whole `infopo compute` process against PyTorch CPU eager's compute alone, same file, one run.

One synthetic batch (compare/common.py; default N=1024 rows × V=151936, bf16, with turns and GRPO
groups) is written once to a temporary safetensors file. Then, alternating run by run so both
see the same machine state:
  (a) the crate: the whole `infopo compute --backend cpu FILE OUT` process, timed from spawn to
      exit (perf_counter), with its peak RSS, user and system time (GNU time's, when installed,
      see `run_process`); it maps the file,
      computes every output (rows, turns, advantages) and writes OUT atomically. The compute time
      it prints itself is recorded too;
  (b) PyTorch CPU eager, compute alone on tensors already in memory (loaded from the same file
      before timing): `torch-rows` (log_softmax of both in float32, kl_div(log_target=True)
      summed over V, gather of the target → log-ratio; the baseline of the goal) and
      `torch-pipeline` (the whole InfoPO computation in torch ops).
The goal: the whole process ≥ 4× faster than torch-rows (ratio = torch median / process median).
The crate's row outputs are checked against torch-rows (max abs error of row_kl, row_log_ratio).

    PY="$(scripts/bench-env | tail -n1)"
    "$PY" compare/compare_cli.py                 # N=1024, V=151936, bf16, 5 runs after 1 warm-up
    "$PY" compare/compare_cli.py --dry-run       # N=16, V=1000, 2 runs, results to a temp folder

Writes results/<date>-<cpu>-cli.{json,log} (or --out DIR). Timings are only meaningful on
an otherwise idle machine (the JSON records the 1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

GOAL_SPEEDUP = 4.0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="N (default 1024)")
    ap.add_argument("--vocab", type=int, default=151936, help="V (default 151936)")
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16", help="logit dtype (default bf16)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each side (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first (default 1)")
    ap.add_argument("--backend", default="cpu", help="infopo --backend (default cpu)")
    ap.add_argument("--infopo", help="the infopo binary (default target/release/infopo, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release first")
    ap.add_argument("--no-pipeline", action="store_true", help="skip timing torch-pipeline")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--out", help="results folder (default results/; a temp folder with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script: N=16, V=1000, 2 runs, results to a temp folder unless --out")
    return ap.parse_args()


GNU_TIME = Path("/usr/bin/time")


def run_process(cmd, tmp):
    """Runs `cmd` to completion: (seconds from spawn to exit, exit code, stdout, stderr, usage)
    with usage = {maxrss_kb, user_s, sys_s, source}. Linux charges a child's peak RSS with the
    memory of the process that spawned it (exec keeps the old image's high-water mark), so the
    peak RSS of a child of this large Python process would be wrong: when GNU time is installed
    the command runs under it (a small process, whose child's usage it reports) instead."""
    out_path, err_path, usage_path = (Path(tmp) / n for n in ("stdout.txt", "stderr.txt", "usage.txt"))
    wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", usage_path] if GNU_TIME.exists() else []
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in wrapped + cmd], stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen from waiting
    if wrapped:
        last = usage_path.read_text().strip().splitlines()[-1].split()
        usage = {"maxrss_kb": int(last[0]), "user_s": float(last[1]), "sys_s": float(last[2]), "source": "GNU time"}
    else:
        usage = {"maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
                 "source": "wait4 (peak RSS an upper bound: may include this Python process)"}
    return seconds, p.returncode, out_path.read_text(), err_path.read_text(), usage


COMPUTE_MS = re.compile(r" in ([0-9.]+) ms -> ")


def main():
    a = parse_args()
    if a.dry_run:
        a.rows, a.vocab, a.runs, a.warmup = 16, 1000, 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    env = C.env_info("cli-dry-run" if a.dry_run else "cli")
    env["host"]["loadavg_1m_before"] = env["host"].pop("loadavg_1m")
    dry_tmp = tempfile.TemporaryDirectory(prefix="infopo-cli-dry-run-") if a.dry_run and not a.out else None
    out_dir = a.out or (dry_tmp.name if dry_tmp else None)
    name = f"{env['date']}-{C.slug(env['device'])}-cli" + ("-dry-run" if a.dry_run else "")
    rep = C.Report(env, out_dir, name=name)
    exe = C.find_infopo(a.infopo, a.build, rep.log)
    env["software"]["infopo"] = C.infopo_version(exe)
    rep.log(f"# infopo: {exe} ({env['software']['infopo']}); torch threads {torch.get_num_threads()}")

    dtype = C.DTYPES[a.dtype]
    rows, vocab = a.rows, a.vocab
    with tempfile.TemporaryDirectory(prefix="infopo-cli-") as tmp:
        path, out_path = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        C.write_input(path, C.synth_batch(rows, vocab, dtype, "cpu"))
        size = path.stat().st_size
        rep.log(f"\n## N={rows} V={vocab} {a.dtype}: {path.name} is {size / 1e6:.1f} MB")
        # PyTorch's inputs come from the same file, loaded before any timing.
        try:
            from safetensors.torch import load_file
        except ImportError:
            batch = C._st_load(path)
        else:
            batch = load_file(str(path))
        real, masked, t = batch[C.REAL], batch[C.MASKED], batch["targets"]
        lay = C.layout_to(batch, "cpu")

        cmd = [exe, "compute", "--backend", a.backend, path, out_path]
        torch_fns = {"torch-rows": lambda: C.torch_rows(real, masked, t)}
        if not a.no_pipeline:
            torch_fns["torch-pipeline"] = lambda: C.torch_pipeline(real, masked, t, lay)
        proc = {"wall_s": [], "maxrss_kb": [], "user_s": [], "sys_s": [], "compute_ms": [], "usage_source": None}
        torch_s = {k: [] for k in torch_fns}
        rep.log("$ " + " ".join(str(c) for c in cmd))
        for i in range(a.warmup + a.runs):
            timed = i >= a.warmup
            seconds, rc, out, err, usage = run_process(cmd, tmp)
            for line in (out + err).strip().splitlines():
                rep.log("  | " + line)
            if rc != 0:
                raise SystemExit(f"infopo compute failed (exit {rc}): {err.strip()[-300:]}")
            m = COMPUTE_MS.search(out)
            label = "run" if timed else "warm-up"
            rep.log(f"  {label} {i + 1}: infopo process {seconds * 1e3:9.1f} ms wall, max RSS "
                    f"{usage['maxrss_kb'] / 1024:.0f} MiB, user {usage['user_s']:.2f} s, sys {usage['sys_s']:.2f} s")
            with torch.inference_mode():
                for impl, fn in torch_fns.items():
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    rep.log(f"  {label} {i + 1}: {impl:<15} {dt * 1e3:9.1f} ms")
                    if timed:
                        torch_s[impl].append(dt)
            if timed:
                proc["wall_s"].append(seconds)
                proc["maxrss_kb"].append(usage["maxrss_kb"])
                proc["user_s"].append(usage["user_s"])
                proc["sys_s"].append(usage["sys_s"])
                proc["usage_source"] = usage["source"]
                proc["compute_ms"].append(float(m.group(1)) if m else None)

        # The crate's row outputs of the last run against torch-rows.
        got = C.read_output(out_path)
        with torch.inference_mode():
            kl, lr = C.torch_rows(real, masked, t)
        errors = C.max_abs_errors(got, {"row_kl": kl, "row_log_ratio": lr})
        rep.log("verification (crate vs torch-rows f32, max abs err): "
                + ", ".join(f"{k} {C.fmt(v, '.2e')}" for k, v in errors.items()))
        batch = real = masked = lay = None

    med = statistics.median
    process = {
        "impl": "infopo-compute-process", "backend": a.backend,
        "median_ms": med(proc["wall_s"]) * 1e3, "min_ms": min(proc["wall_s"]) * 1e3,
        "times_ms": [round(s * 1e3, 3) for s in proc["wall_s"]],
        "maxrss_mib": max(proc["maxrss_kb"]) / 1024,
        "user_s_median": med(proc["user_s"]), "sys_s_median": med(proc["sys_s"]),
        "compute_ms_reported": proc["compute_ms"], "usage_source": proc["usage_source"],
    }
    results = [process]
    for impl, times in torch_fns.items():
        s = C.stats(torch_s[impl])
        results.append({"impl": impl, "median_ms": s["median_ms"], "min_ms": s["min_ms"], "times_ms": s["times_ms"]})
    ratios = {r["impl"]: r["median_ms"] / process["median_ms"] for r in results[1:]}
    rep.log(f"\n## Summary: N={rows} V={vocab} {a.dtype}, {a.runs} runs after {a.warmup} warm-up, medians")
    rep.log(C.table(["impl", "median ms", "min ms", "process ÷"],
                    [[r["impl"], C.fmt(r["median_ms"], ".1f"), C.fmt(r["min_ms"], ".1f"),
                      f"{ratios[r['impl']]:.2f}×" if r["impl"] in ratios else ""] for r in results]))
    rep.log(f"infopo process: max RSS {process['maxrss_mib']:.0f} MiB (file {size / 2**20:.0f} MiB), "
            f"user {process['user_s_median']:.2f} s, sys {process['sys_s_median']:.2f} s (medians)")
    speedup = ratios["torch-rows"]
    goal = {"shape": [rows, vocab], "dtype": a.dtype, "speedup": speedup, "target": GOAL_SPEEDUP,
            "met": speedup >= GOAL_SPEEDUP, "baseline": "torch-rows"}
    rep.log(f"goal (whole infopo compute process ≥ {GOAL_SPEEDUP:g}× torch-rows compute alone): "
            f"{speedup:.2f}× — {'met' if goal['met'] else 'NOT met'}"
            + (" (dry run: not meaningful)" if a.dry_run else ""))
    env["host"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    rep.finish({
        "title": "the whole infopo compute process vs PyTorch CPU eager compute alone",
        "dry_run": a.dry_run,
        "rows": rows, "vocab": vocab, "dtype": a.dtype, "file_bytes": size, "runs": a.runs, "warmup": a.warmup,
        "results": [{k: (C.clean(v) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "ratios": ratios,
        "verification": {"max_abs_err_vs_torch_rows": {k: C.clean(v) for k, v in errors.items()}},
        "goal": goal,
    })
    if dry_tmp:
        dry_tmp.cleanup()


if __name__ == "__main__":
    main()
