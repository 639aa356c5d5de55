#!/usr/bin/env python3
"""The crate's CPU path against PyTorch CPU eager, on the same data, in one run.

For each shape (N rows × V vocab, float32 logits) one synthetic batch (compare/common.py) is
written once to a temporary safetensors file; then
  (a) PyTorch eager float32, the per-row part as PyTorch code writes it: log_softmax of both,
      kl_div(log_target=True) summed over the vocabulary, gather of the target → log-ratio
      (`torch-rows`, the baseline of the goal), and the whole InfoPO pipeline in torch ops
      (`torch-pipeline`: rows + per-turn means + group statistics + gate + advantages);
  (b) the crate: `infopo bench --backend cpu --input FILE --json` (full pipeline: rows, turns,
      advantages; its own timing, same statistic: median after warm-up);
  (c) verification: `infopo compute --backend cpu FILE OUT` against PyTorch float32 (kl,
      log-ratio, lse) and against PyTorch float64 (every output tensor): max abs errors.
GB/s counts the logits read once: 2·N·V·4 bytes per call.

    PY="$(scripts/bench-env | tail -n1)"
    "$PY" compare/compare_cpu.py            # N=256, V ∈ {32000, 128256, 151936}
    "$PY" compare/compare_cpu.py --quick    # N=256, V=151936 only, fewer iterations

Writes results/<date>-<cpu>.{json,log,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

GOAL_SHAPE = (256, 151936)
GOAL_SPEEDUP = 4.0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="N (default 256)")
    ap.add_argument("--vocab", default="32000,128256,151936", help="comma-separated V list")
    ap.add_argument("--quick", action="store_true", help="only V=151936, 5 iterations")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--infopo", help="the infopo binary (default target/release/infopo, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release first")
    ap.add_argument("--no-pipeline", action="store_true", help="skip timing torch-pipeline")
    ap.add_argument("--out", help="results folder (default results/)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    return ap.parse_args()


def crate_bench(exe, path, rows, vocab, a, rep):
    """The crate's timing on the same file (`infopo bench --input`)."""
    base = [exe, "bench", "--backend", "cpu", "--json", "--iters", a.iters, "--warmup", a.warmup]
    rc, out, err = C.run_cli(base + ["--input", path], rep.log)
    data = "input file"
    if rc != 0:
        return {"status": f"failed (exit {rc}): {err.strip()[-300:]}"}
    j = C.last_json(out)
    if (j.get("rows"), j.get("vocab"), j.get("dtype")) != (rows, vocab, "f32"):
        rep.log(f"  ! the crate reports {j.get('rows')} x {j.get('vocab')} {j.get('dtype')}, "
                f"expected {rows} x {vocab} f32")
    return {"status": "ok", "median_ms": j["median_ms"], "min_ms": j["min_ms"], "iters": j.get("iters"),
            "gbps_reported": j.get("gbps"), "bytes_reported": j.get("bytes"), "backend": j.get("backend"),
            "data": data, "raw": j}


def verify(exe, path, batch, tmp, rep):
    out_path = Path(tmp) / "out.safetensors"
    rc, _, err = C.run_cli([exe, "compute", path, out_path, "--backend", "cpu"], rep.log)
    if rc != 0:
        return {"status": f"failed (exit {rc}): {err.strip()[-300:]}"}
    got = C.read_output(out_path)
    real, masked, t = batch[C.REAL], batch[C.MASKED], batch["targets"]
    kl, lr = C.torch_rows(real, masked, t)
    f32 = {"row_kl": kl, "row_log_ratio": lr,
           "row_lse_real": torch.logsumexp(real, -1), "row_lse_masked": torch.logsumexp(masked, -1)}
    ref = C.torch_reference(batch)
    vs32 = C.max_abs_errors(got, f32)
    vs64 = C.max_abs_errors(got, ref)
    torch32_vs64 = C.max_abs_errors(f32, ref)
    missing = sorted(set(ref) - set(got))
    rep.log(C.table(["tensor", "crate vs torch f32", "crate vs torch f64", "torch f32 vs f64"],
                    [[k, C.fmt(vs32.get(k), ".2e"), C.fmt(vs64.get(k), ".2e"), C.fmt(torch32_vs64.get(k), ".2e")]
                     for k in sorted(ref)]))
    if missing:
        rep.log(f"  ! missing from the crate's output: {', '.join(missing)}")
    return {"status": "ok", "vs_torch_f32": vs32, "vs_torch_f64": vs64, "torch_f32_vs_f64": torch32_vs64,
            "missing": missing,
            "max_abs_err_rows_vs_torch_f32": max((vs32[k] for k in ("row_kl", "row_log_ratio", "row_lse_real",
                                                                      "row_lse_masked") if k in vs32), default=None)}


def plot(results, speedups):
    plt = C.figure()
    if plt is None:
        return None
    shapes = sorted({(r["rows"], r["vocab"]) for r in results}, key=lambda s: (s[1], s[0]))
    impls = [i for i in ("torch-rows", "torch-pipeline", "crate-cpu") if any(r["impl"] == i for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        for ax, key in zip(axes, ("median_ms", "gbps")):
            pts = []
            for i, s in enumerate(shapes):
                r = next((r for r in results if r["impl"] == impl and (r["rows"], r["vocab"]) == s), None)
                if r and r.get(key) is not None:
                    pts.append((i + (j - (len(impls) - 1) / 2) * width, r[key], s))
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=impl)
            if key == "median_ms" and impl == "crate-cpu":
                for x, y, s in pts:
                    sp = speedups.get(f"{s[0]}x{s[1]}", {}).get("torch-rows")
                    if sp:
                        ax.annotate(f"{sp:.1f}×", (x, y), ha="center", va="bottom", fontsize=8)
    for ax, title in zip(axes, ("median time per call (ms, lower is better)", "logits read, GB/s (2·N·V·4 B / time)")):
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"N={n}\nV={v}" for n, v in shapes])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"infopo CPU vs PyTorch eager (f32) — {C.cpu_name()}, {torch.get_num_threads()} threads", fontsize=10)
    return fig


def main():
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        vocabs, a.iters = [151936], min(a.iters, 5)
    else:
        vocabs = [int(v) for v in a.vocab.split(",") if v.strip()]
    env = C.env_info("cpu")
    rep = C.Report(env, a.out)
    exe = C.find_infopo(a.infopo, a.build, rep.log)
    env["software"]["infopo"] = C.infopo_version(exe)
    rep.log(f"# infopo: {exe} ({env['software']['infopo']}); torch threads {torch.get_num_threads()}")

    results, verifications, speedups = [], [], {}
    with tempfile.TemporaryDirectory(prefix="infopo-bench-") as tmp:
        for vocab in vocabs:
            rows = a.rows
            nbytes = 2 * rows * vocab * 4
            rep.log(f"\n## N={rows} V={vocab} f32: {nbytes / 1e6:.1f} MB of logits per call")
            batch = C.synth_batch(rows, vocab, torch.float32, "cpu")
            path = Path(tmp) / f"in-{rows}x{vocab}.safetensors"
            C.write_input(path, batch)
            real, masked, t = batch[C.REAL], batch[C.MASKED], batch["targets"]
            lay = C.layout_to(batch, "cpu")
            entries = {}

            def add(impl, st, **extra):
                r = {"impl": impl, "rows": rows, "vocab": vocab, "dtype": "f32", "bytes": nbytes, **extra}
                if st.get("status", "ok") == "ok":
                    r.update({k: st[k] for k in ("median_ms", "min_ms", "iters")})
                    r["gbps"] = nbytes / (st["median_ms"] / 1e3) / 1e9
                    r["status"] = "ok"
                    rep.log(f"  {impl:<15} median {st['median_ms']:9.2f} ms  min {st['min_ms']:9.2f} ms  {r['gbps']:6.2f} GB/s")
                else:
                    r["status"] = st["status"]
                    rep.log(f"  {impl:<15} {st['status']}")
                if "times_ms" in st:
                    rep.log(f"    times (ms): {st['times_ms']}")
                results.append(r)
                entries[impl] = r

            with torch.inference_mode():
                add("torch-rows", C.stats(C.time_cpu(lambda: C.torch_rows(real, masked, t), a.warmup, a.iters)))
                if not a.no_pipeline:
                    add("torch-pipeline", C.stats(C.time_cpu(lambda: C.torch_pipeline(real, masked, t, lay),
                                                             a.warmup, a.iters)))
            cb = crate_bench(exe, path, rows, vocab, a, rep)
            add("crate-cpu", cb, **{k: cb[k] for k in ("data", "raw") if k in cb})

            crate = entries.get("crate-cpu")
            sp = {}
            if crate and crate["status"] == "ok":
                for impl, r in entries.items():
                    if impl != "crate-cpu" and r["status"] == "ok":
                        sp[impl] = r["median_ms"] / crate["median_ms"]
            speedups[f"{rows}x{vocab}"] = sp
            if sp:
                rep.log("  crate speedup: " + ", ".join(f"{v:.2f}× over {k}" for k, v in sp.items()))

            rep.log("  verification (infopo compute --backend cpu on the same file):")
            with torch.inference_mode():
                v = verify(exe, path, batch, tmp, rep)
            v.update({"rows": rows, "vocab": vocab, "dtype": "f32", "backend": "cpu"})
            verifications.append(v)
            batch = real = masked = lay = None
            path.unlink()

    # Summary table.
    rep.log("\n## Summary (median of timed calls; GB/s = 2·N·V·4 B / median)")
    head = ["N", "V", "impl", "median ms", "min ms", "GB/s", "crate speedup"]
    body = []
    for r in results:
        sp = speedups.get(f"{r['rows']}x{r['vocab']}", {}).get(r["impl"])
        body.append([r["rows"], r["vocab"], r["impl"], C.fmt(r.get("median_ms"), ".2f"), C.fmt(r.get("min_ms"), ".2f"),
                     C.fmt(r.get("gbps"), ".2f"), f"{sp:.2f}×" if sp else ("—" if r["impl"] != "crate-cpu" else "")])
    rep.log(C.table(head, body))
    for v in verifications:
        if v["status"] == "ok":
            rep.log(f"verification N={v['rows']} V={v['vocab']}: max abs err of kl/log-ratio/lse vs torch f32 "
                    f"{C.fmt(v['max_abs_err_rows_vs_torch_f32'], '.2e')}")
        else:
            rep.log(f"verification N={v['rows']} V={v['vocab']}: {v['status']}")
    goal = speedups.get(f"{GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}", {}).get("torch-rows")
    goal_line = None
    if goal is not None:
        goal_line = {"shape": list(GOAL_SHAPE), "speedup": goal, "target": GOAL_SPEEDUP, "met": goal >= GOAL_SPEEDUP}
        rep.log(f"goal (crate ≥ {GOAL_SPEEDUP:g}× PyTorch eager at N={GOAL_SHAPE[0]} V={GOAL_SHAPE[1]} f32): "
                f"{goal:.2f}× — {'met' if goal >= GOAL_SPEEDUP else 'NOT met'}")

    data = {
        "title": "infopo CPU vs PyTorch CPU eager (float32)",
        "unit_note": "GB/s = logits read once, 2·N·V·4 bytes / median time",
        "results": [{k: (C.clean(v) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "speedups": speedups,
        "verification": verifications,
        "goal": goal_line,
    }
    rep.finish(data, plot(results, speedups))


if __name__ == "__main__":
    main()
