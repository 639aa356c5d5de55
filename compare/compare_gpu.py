#!/usr/bin/env python3
"""The crate's CUDA kernels against PyTorch on one GPU, in one run.

Measured, on bf16 logits of shapes V ∈ {32000, 128256, 151936} × N ∈ {16, 64, 256, 4096}:
  copy          device-to-device `dst.copy_(src)` of a 1 GiB buffer: the memory system's
                sustainable bandwidth, counted as read + write (2·bytes / time);
  torch-eager   the whole InfoPO computation in torch ops as the paper's code does it
                (compare/common.py `torch_pipeline`: log_softmax of both in float32, gather,
                kl_div summed over V, per-turn segment means with index_add, group mean/std of
                outcomes and intrinsic values with index_add, the variance gate, advantages);
  torch-compile the same function under torch.compile (default mode; compile time excluded,
                reported separately);
  liger         log_softmax of both + Liger-Kernel's LigerKLDIVLoss(log_target=True) (Triton;
                reduction "sum": its public module gives no per-row values) + gather + the same
                epilogue in eager torch; only when liger_kernel imports;
  crate         `infopo bench --backend cuda --rows N --vocab V --dtype bf16 --json` (the binary
                is built elsewhere and passed with --infopo; its own timing, median after warm-up,
                on its own synthetic data of the same distribution).
The PyTorch timings use CUDA events around each call (median of --iters after --warmup) and
rotate among copies of the input whose total is ≥ 3× the L2 cache, so no call finds its input in
L2. GB/s counts the logits read once: 2·N·V·2 bytes / median time.

"The limit" for a kernel that only reads its input is taken as the copy bandwidth measured the
same way, 2·bytes/time (read + write): it is the rate at which this GPU's memory system moves
bytes in a plain streaming kernel. A read-only stream can be a few % faster than a copy (no
write turnarounds), so a fraction of copy bandwidth slightly above 1 is possible.

Verification (same data): one batch (default N=256, V=151936) is written to a safetensors file,
`infopo compute --backend cuda` runs on it, and every output is compared with torch-eager (float32
on the GPU) and with PyTorch in float64: max abs errors.

    python compare/compare_gpu.py --infopo target/release/infopo     # on the GPU machine
    python compare/compare_gpu.py --dry-run                            # CPU, tiny, no CUDA/Liger

Writes results/<date>-<gpu>.{json,log,png} (--dry-run: a temporary folder unless --out).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

IMPLS = ("torch-eager", "torch-compile", "liger", "crate")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--infopo", help="the infopo binary built with --features cuda (no crate timing without it)")
    ap.add_argument("--crate-backend", help="backend passed to infopo (default cuda; cpu with --dry-run)")
    ap.add_argument("--vocab", help="comma-separated V list (default 32000,128256,151936)")
    ap.add_argument("--rows", help="comma-separated N list (default 16,64,256,4096)")
    ap.add_argument("--iters", type=int, help="timed calls (default 20)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 5)")
    ap.add_argument("--verify-shape", help="NxV of the verification batch (default 256x151936)")
    ap.add_argument("--crate-input", action="store_true",
                    help="time the crate with `bench --input` on the same data (writes a file per shape)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--copy-mib", type=int, help="buffer of the copy bandwidth test (default 1024)")
    ap.add_argument("--mem-fraction", type=float, default=0.7,
                    help="skip a shape whose estimated footprint exceeds this fraction of free memory")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="skip the shapes left once this many seconds have passed (default 420)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the PyTorch parts on CPU at tiny sizes to check the script")
    ap.add_argument("--out", help="results folder (default results/; --dry-run: a temporary one)")
    a = ap.parse_args()
    # Defaults; --dry-run has its own (tiny) ones. Explicit options win in both cases.
    defaults = dict(vocab="32000,128256,151936", rows="16,64,256,4096", iters=20, warmup=5,
                    verify_shape="256x151936", copy_mib=1024)
    if a.dry_run:
        defaults.update(vocab="1000,4099", rows="4,16", iters=3, warmup=1, verify_shape="16x4099", copy_mib=64)
        a.no_liger = True
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.crate_backend = a.crate_backend or ("cpu" if a.dry_run else "cuda")
    return a


# --------------------------------------------------------------------------------------------


class Timer:
    """CUDA events with input rotation on a GPU; perf_counter on the CPU (dry run)."""

    def __init__(self, device, warmup, iters):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn, inputs):
        if self.device == "cuda":
            return C.time_cuda(fn, inputs, self.warmup, self.iters)
        k = len(inputs)
        box = [0]

        def step():
            fn(*inputs[box[0] % k])
            box[0] += 1

        return C.time_cpu(step, self.warmup, self.iters)


def copy_bandwidth(device, mib, timer, rep):
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    st = C.stats(timer(lambda s, d: d.copy_(s), [(src, dst), (dst, src)]))
    gbps = 2 * n / (st["median_ms"] / 1e3) / 1e9
    rep.log(f"copy: {mib} MiB dst.copy_(src): median {st['median_ms']:.3f} ms -> {gbps:.1f} GB/s read+write "
            f"(the limit used for fractions)")
    del src, dst
    return {"bytes": n, "median_ms": st["median_ms"], "min_ms": st["min_ms"], "rw_gbps": gbps,
            "definition": "2*bytes/median time of dst.copy_(src) on a device buffer (read + write)"}


def load_liger(rep):
    try:
        try:
            from liger_kernel.transformers import LigerKLDIVLoss
        except ImportError:
            from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        import liger_kernel

        ver = getattr(liger_kernel, "__version__", None)
        if ver is None:
            from importlib.metadata import version

            ver = version("liger-kernel")
        return LigerKLDIVLoss(reduction="sum", log_target=True), ver
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        rep.log(f"liger: not available ({type(e).__name__}: {e})")
        return None, None


def footprint(rows, vocab, copies):
    """Bytes a shape needs at most: the bf16 copies, float32 synth temporaries, and torch-eager's
    float32 intermediates (two log_softmax outputs and the elementwise kl_div)."""
    elems = rows * vocab
    return copies * 2 * elems * 2 + 3 * elems * 4 + 2 * min(elems, 1 << 26) * 4


def free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return 8 << 30


def cleanup(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------


def crate_bench(exe, a, rows, vocab, path, rep):
    cmd = [exe, "bench", "--backend", a.crate_backend, "--json", "--iters", a.iters, "--warmup", a.warmup]
    cmd += ["--input", path] if path else ["--rows", rows, "--vocab", vocab, "--dtype", "bf16"]
    rc, out, err = C.run_cli(cmd, rep.log)
    if rc != 0:
        return {"status": f"failed (exit {rc}): {err.strip()[-300:]}"}
    j = C.last_json(out)
    if (j.get("rows"), j.get("vocab"), j.get("dtype")) != (rows, vocab, "bf16"):
        rep.log(f"  ! the crate reports {j.get('rows')} x {j.get('vocab')} {j.get('dtype')}, "
                f"expected {rows} x {vocab} bf16")
    return {"status": "ok", "median_ms": j["median_ms"], "min_ms": j["min_ms"], "iters": j.get("iters"),
            "backend": j.get("backend"), "raw": j,
            "data": "input file (same data)" if path else "crate synthetic (same shape and distribution)"}


def verify(exe, a, device, rows, vocab, tmp, rep, compiled, liger):
    """One batch: torch-eager vs float64, torch-compile and liger vs torch-eager, and the crate's
    `compute` on the same file vs both."""
    rep.log(f"\n## verification on one batch: N={rows} V={vocab} bf16")
    batch = C.synth_batch(rows, vocab, torch.bfloat16, device, seed=7)
    lay = C.layout_to(batch, device)
    real, masked, t = batch[C.REAL], batch[C.MASKED], batch["targets"]
    res = {"rows": rows, "vocab": vocab, "dtype": "bf16", "backend": a.crate_backend}
    with torch.inference_mode():
        eager = {k: v.to("cpu", torch.float64) for k, v in C.torch_pipeline(real, masked, t, lay).items()}
        eager["row_lse_real"] = torch.logsumexp(real.float(), -1).to("cpu", torch.float64)
        eager["row_lse_masked"] = torch.logsumexp(masked.float(), -1).to("cpu", torch.float64)
        ref = C.torch_reference(batch, device)
        res["torch_eager_vs_f64"] = C.max_abs_errors(eager, ref)
        if compiled is not None:
            try:
                comp = {k: v.to("cpu", torch.float64) for k, v in compiled(real, masked, t, lay).items()}
                res["torch_compile_vs_eager"] = C.max_abs_errors(comp, eager)
            except Exception as e:  # noqa: BLE001
                res["torch_compile_vs_eager"] = f"failed: {type(e).__name__}: {e}"
        if liger is not None:
            lp = F.log_softmax(real, -1, dtype=torch.float32)
            lq = F.log_softmax(masked, -1, dtype=torch.float32)
            s = float(liger(lq, lp))
            res["liger_kl_sum_vs_eager"] = abs(s - float(eager["row_kl"].sum()))
    rows_out = []
    if exe:
        path = Path(tmp) / "verify.safetensors"
        out_path = Path(tmp) / "verify-out.safetensors"
        C.write_input(path, batch)
        rc, _, err = C.run_cli([exe, "compute", path, out_path, "--backend", a.crate_backend], rep.log)
        if rc == 0:
            got = C.read_output(out_path)
            res["crate_vs_torch_eager"] = C.max_abs_errors(got, eager)
            res["crate_vs_f64"] = C.max_abs_errors(got, ref)
            res["missing"] = sorted(set(ref) - set(got))
            res["status"] = "ok"
        else:
            res["status"] = f"crate failed (exit {rc}): {err.strip()[-300:]}"
        path.unlink(missing_ok=True)
    else:
        res["status"] = "no crate (--infopo not given)"
    for k in sorted(ref):
        rows_out.append([k, C.fmt(res.get("crate_vs_torch_eager", {}).get(k), ".2e"),
                         C.fmt(res.get("crate_vs_f64", {}).get(k), ".2e"),
                         C.fmt(res["torch_eager_vs_f64"].get(k), ".2e"),
                         C.fmt(res.get("torch_compile_vs_eager", {}).get(k) if isinstance(res.get("torch_compile_vs_eager"), dict) else None, ".2e")])
    rep.log(C.table(["tensor", "crate vs eager", "crate vs f64", "eager vs f64", "compile vs eager"], rows_out))
    if "liger_kl_sum_vs_eager" in res:
        rep.log(f"liger: |Σ kl − Σ kl(eager)| = {res['liger_kl_sum_vs_eager']:.3e}")
    rep.log(f"verification: {res['status']}")
    batch = real = masked = lay = None
    cleanup(device)
    return res


def plot(results, copy, device_name, rows_list, vocab_list, dry_run=False):
    plt = C.figure()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(rows_list), figsize=(4.2 * len(rows_list), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, n in zip(axes, rows_list):
        for impl in IMPLS:
            pts = sorted((r["vocab"], r["gbps"]) for r in results
                         if r["impl"] == impl and r["rows"] == n and r.get("gbps") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        if copy:
            ax.axhline(copy["rw_gbps"], ls="--", c="gray", lw=1, label="copy (read+write)")
        ax.set_title(f"N = {n} rows", fontsize=10)
        ax.set_xlabel("vocabulary V")
        ax.set_xticks(vocab_list)
        ax.set_xticklabels([f"{v // 1000}k" for v in vocab_list])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s (2·N·V·2 B / median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"InfoPO rewards, bf16 logits — {device_name}" + (" (dry run on CPU)" if dry_run else ""), fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------


def main():
    a = parse_args()
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch (use --dry-run to check the script on CPU)")
    t_start = time.perf_counter()
    env = C.env_info("gpu" if device == "cuda" else "gpu-dry-run")
    out_dir = a.out or (tempfile.mkdtemp(prefix="infopo-gpu-dry-run-") if a.dry_run else None)
    rep = C.Report(env, out_dir)
    exe = C.find_infopo(a.infopo) if a.infopo else None
    if exe:
        env["software"]["infopo"] = C.infopo_version(exe)
    rep.log(f"# infopo: {exe or 'not given (no crate timing)'}; crate backend {a.crate_backend}")
    liger, liger_ver = (None, None) if a.no_liger else load_liger(rep)
    if liger_ver:
        env["software"]["liger_kernel"] = liger_ver
    try:
        import triton

        env["software"]["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass

    timer = Timer(device, a.warmup, a.iters)
    copy = copy_bandwidth(device, a.copy_mib, timer, rep)
    l2 = C.l2_bytes()
    compiled, compile_error = None, None
    if not a.no_compile:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        compiled = torch.compile(C.torch_pipeline)

    def liger_pipeline(real, masked, t, lay):
        lp = F.log_softmax(real, -1, dtype=torch.float32)
        lq = F.log_softmax(masked, -1, dtype=torch.float32)
        kl_sum = liger(lq, lp)
        lr = (lp.gather(-1, t[:, None]) - lq.gather(-1, t[:, None])).squeeze(-1)
        out = C.torch_epilogue(lr, lay)
        out["kl_sum"] = kl_sum
        return out

    vocabs = [int(v) for v in a.vocab.split(",") if v.strip()]
    rows_list = [int(n) for n in a.rows.split(",") if n.strip()]
    results, speedups, notes = [], {}, {}
    compile_s = {}
    with tempfile.TemporaryDirectory(prefix="infopo-gpu-") as tmp:
        for vocab in vocabs:
            for rows in rows_list:
                nbytes = 2 * rows * vocab * 2
                k = C.n_copies(nbytes, max_bytes=int(0.25 * free_bytes(device)), l2=l2) if device == "cuda" else 1
                need = footprint(rows, vocab, k)
                key = f"{rows}x{vocab}"
                rep.log(f"\n## N={rows} V={vocab} bf16: {nbytes / 1e6:.1f} MB of logits per call, "
                        f"{k} input copies, ~{need / 2**30:.1f} GiB  [{time.perf_counter() - t_start:.0f} s]")
                msg = None
                if time.perf_counter() - t_start > a.budget_s:
                    msg = f"skipped: time budget of {a.budget_s:.0f} s spent (--budget-s)"
                elif need > a.mem_fraction * free_bytes(device):
                    msg = f"skipped: needs ~{need / 2**30:.1f} GiB, {free_bytes(device) / 2**30:.1f} GiB free"
                if msg:
                    rep.log("  " + msg)
                    for impl in IMPLS:
                        results.append({"impl": impl, "rows": rows, "vocab": vocab, "dtype": "bf16",
                                        "bytes": nbytes, "status": msg})
                    continue
                batch = C.synth_batch(rows, vocab, torch.bfloat16, device)
                lay = C.layout_to(batch, device)
                inputs = C.cuda_copies((batch[C.REAL], batch[C.MASKED], batch["targets"]), k) if k > 1 else \
                    [(batch[C.REAL], batch[C.MASKED], batch["targets"])]
                entries = {}

                def add(impl, st, **extra):
                    r = {"impl": impl, "rows": rows, "vocab": vocab, "dtype": "bf16", "bytes": nbytes,
                         "fits_l2": nbytes <= l2, **extra}
                    if st.get("status", "ok") == "ok":
                        r.update({kk: st[kk] for kk in ("median_ms", "min_ms", "iters")})
                        r["gbps"] = nbytes / (st["median_ms"] / 1e3) / 1e9
                        r["frac_copy"] = r["gbps"] / copy["rw_gbps"]
                        r["status"] = "ok"
                        rep.log(f"  {impl:<14} median {st['median_ms']:9.4f} ms  min {st['min_ms']:9.4f} ms  "
                                f"{r['gbps']:8.1f} GB/s  {100 * r['frac_copy']:5.1f}% of copy")
                        if "times_ms" in st:
                            rep.log(f"    times (ms): {st['times_ms']}")
                    else:
                        r["status"] = st["status"]
                        rep.log(f"  {impl:<14} {st['status']}")
                    results.append(r)
                    entries[impl] = r

                def run(impl, fn):
                    try:
                        with torch.inference_mode():
                            add(impl, C.stats(timer(fn, inputs)))
                    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                        add(impl, {"status": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"})

                run("torch-eager", lambda r, m, t: C.torch_pipeline(r, m, t, lay))
                if compiled is not None:
                    t0 = time.perf_counter()
                    try:
                        with torch.inference_mode():
                            compiled(*inputs[0], lay)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        compile_s[key] = time.perf_counter() - t0
                        rep.log(f"  torch-compile  first call (compile or cache hit) {compile_s[key]:.1f} s")
                        run("torch-compile", lambda r, m, t: compiled(r, m, t, lay))
                    except Exception as e:  # noqa: BLE001
                        compile_error = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                        add("torch-compile", {"status": compile_error})
                        compiled = None
                else:
                    add("torch-compile", {"status": compile_error or "skipped (--no-compile)"})
                if liger is not None:
                    run("liger", lambda r, m, t: liger_pipeline(r, m, t, lay))
                else:
                    add("liger", {"status": "skipped (liger_kernel not available)" if not a.no_liger
                                  else "skipped (--no-liger / dry run)"})

                path = None
                if exe and a.crate_input:
                    path = Path(tmp) / f"in-{key}.safetensors"
                    C.write_input(path, batch)
                inputs = batch = lay = None
                cleanup(device)
                if exe:
                    cb = crate_bench(exe, a, rows, vocab, path, rep)
                    add("crate", cb, **{kk: cb[kk] for kk in ("data", "raw", "backend") if kk in cb})
                else:
                    add("crate", {"status": "skipped (--infopo not given)"})
                if path:
                    path.unlink(missing_ok=True)

                crate = entries.get("crate")
                sp = {}
                if crate and crate["status"] == "ok":
                    for impl, r in entries.items():
                        if impl != "crate" and r["status"] == "ok":
                            sp[impl] = r["median_ms"] / crate["median_ms"]
                    rep.log("  crate speedup: " + ", ".join(f"{v:.2f}× over {kk}" for kk, v in sp.items()))
                speedups[key] = sp

        vr, vv = (int(x) for x in a.verify_shape.lower().split("x"))
        verification = [verify(exe, a, device, vr, vv, tmp, rep, compiled, liger)]

    # Summary.
    rep.log(f"\n## Summary: bf16, GB/s = 2·N·V·2 B / median; copy = {copy['rw_gbps']:.1f} GB/s (read+write)")
    head = ["N", "V", "impl", "median ms", "GB/s", "% copy", "crate speedup"]
    body = []
    for r in sorted(results, key=lambda r: (r["vocab"], r["rows"], IMPLS.index(r["impl"]))):
        sp = speedups.get(f"{r['rows']}x{r['vocab']}", {}).get(r["impl"])
        ok = r["status"] == "ok"
        body.append([r["rows"], r["vocab"], r["impl"], C.fmt(r.get("median_ms"), ".4f") if ok else r["status"][:40],
                     C.fmt(r.get("gbps"), ".1f"), C.fmt(100 * r["frac_copy"] if ok else None, ".1f"),
                     f"{sp:.2f}×" if sp else ""])
    rep.log(C.table(head, body))
    notes["crate_timing"] = ("infopo bench's own timing: wall clock around Backend::compute, median after warm-up, "
                             "on the crate's synthetic data (or the same file with --crate-input); whatever that call "
                             "includes (transfers, launches) is counted, and no L2 rotation is done, so shapes with "
                             "fits_l2 may read from L2")
    notes["torch_timing"] = "CUDA events around each call, inputs rotated over copies totalling >= 3x L2"
    notes["limit"] = copy["definition"]
    elapsed = time.perf_counter() - t_start
    rep.log(f"total time {elapsed:.0f} s")
    data = {
        "title": "InfoPO rewards on bf16 logits: infopo CUDA vs PyTorch eager, torch.compile, Liger-Kernel",
        "dry_run": a.dry_run,
        "unit_note": "GB/s = logits read once, 2·N·V·2 bytes / median time; % copy = GB/s / copy read+write GB/s",
        "copy": copy,
        "l2_bytes": l2,
        "results": [{kk: (C.clean(v) if isinstance(v, float) else v) for kk, v in r.items()} for r in results],
        "speedups": speedups,
        "compile_s": compile_s,
        "verification": verification,
        "notes": notes,
        "elapsed_s": elapsed,
    }
    rep.finish(data, plot(results, copy, env["device"], rows_list, vocabs, a.dry_run))


if __name__ == "__main__":
    main()
