#!/usr/bin/env python3
"""Rewrites the results section of docs/results.md from results/*.json.

The section is everything between the lines `<!-- results:begin -->` and `<!-- results:end -->`;
it is rebuilt from the result files alone (device, date, commit, numbers; nothing typed by hand),
newest first, with links to each run's PNG and raw log. Idempotent: running it twice changes
nothing the second time. Standard library only.

    python3 compare/render.py                 # rewrites docs/results.md
    python3 compare/render.py --check         # exit 1 if docs/results.md is not up to date
    python3 compare/render.py --readme X.md --results DIR --stdout

Links in the section (plots, logs, JSON, compare/README.md) are written relative to the folder of
the file it rewrites (`--readme`), so they stay valid wherever that file is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CPU_IMPLS = ("torch-rows", "torch-pipeline", "crate-cpu")
GPU_IMPLS = ("torch-eager", "torch-compile", "liger", "crate")
CRATE = {"cpu": "crate-cpu", "gpu": "crate"}
FUSED = "fused-memory"  # compare/compare_fused.py
FUSED_GPU = "fused-gpu"  # compare/compare_fused_gpu.py


def num(v, spec):
    return "—" if v is None else format(v, spec)


def ms(v):
    if v is None:
        return "—"
    return format(v, ".3f" if v < 10 else ".1f" if v < 1000 else ".0f")


def link(path, readme):
    return Path(os.path.relpath(path, readme.parent)).as_posix()


def header(doc, path, readme):
    commit = doc.get("commit", "unknown")
    short = commit[:10] + (" (uncommitted changes)" if doc.get("dirty") else "")
    sw = doc.get("software", {})
    host = doc.get("host", {})
    files = doc.get("files", {})
    parts = [f"`{doc.get('command', '?')}`", f"commit `{short}`"]
    parts += [f"{k} {sw[k]}" for k in ("torch", "triton", "liger_kernel") if sw.get(k)]
    if sw.get("infopo"):
        parts.append(f"{sw['infopo']}")
    if doc["kind"] in ("gpu", FUSED_GPU):
        gpu = doc.get("gpu", {})
        title = f"GPU: {gpu.get('name', doc.get('device'))} — {doc.get('date')}"
        dev = [f"driver {gpu['driver']}" if gpu.get("driver") else None,
               f"CUDA runtime {gpu['cuda_runtime']}" if gpu.get("cuda_runtime") else None,
               f"{gpu['memory_gib']} GiB" if gpu.get("memory_gib") else None, f"L2 {gpu.get('l2_bytes', 0) / 2**20:.0f} MiB" if gpu.get("l2_bytes") else None]
    else:
        title = f"CPU: {host.get('cpu', doc.get('device'))} — {doc.get('date')}"
        dev = [f"{host.get('cores')} cores", f"{host.get('torch_threads')} torch threads",
               f"load average {host['loadavg_1m']:g} at start" if host.get("loadavg_1m") is not None else None]
    links = []
    if files.get("png"):
        links.append(f"[plot]({link(path.parent / files['png'], readme)})")
    if files.get("log"):
        links.append(f"[raw log]({link(path.parent / files['log'], readme)})")
    links.append(f"[json]({link(path, readme)})")
    return [f"### {title}", "", " · ".join([p for p in dev if p] + parts), "", " · ".join(links), ""]


def shape_rows(doc, impls):
    """{(N, V, dtype): {impl: result}} in shape order."""
    table = {}
    for r in doc.get("results", []):
        table.setdefault((r["rows"], r["vocab"], r.get("dtype", "?")), {})[r["impl"]] = r
    present = [i for i in impls if any(i in v and v[i].get("status") == "ok" for v in table.values())]
    return dict(sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0]))), present


def cell(r, with_frac=False):
    if r is None:
        return "—"
    if r.get("status") != "ok":
        return "skipped" if str(r.get("status", "")).startswith("skipped") else "failed"
    s = f"{ms(r.get('median_ms'))} ms · {num(r.get('gbps'), '.1f')} GB/s"
    if with_frac and r.get("frac_copy") is not None:
        s += f" · {100 * r['frac_copy']:.0f}%"
    return s


def same_inputs_notes(doc):
    """The fused comparisons' check that the crate and PyTorch saw the same inputs, as a note."""
    checks = doc.get("checks", [])
    if not checks:
        return []
    same = sum(1 for c in checks if c.get("same_inputs"))
    worst = max(max(c["max_abs_err_kl"], c["max_abs_err_log_ratio"]) for c in checks)
    return [f"Same inputs on both sides: {same}/{len(checks)} crate runs match PyTorch float32 on the first "
            f"rows (max abs error of kl and log-ratio {worst:.1e})."]


def render_fused(doc, path, readme):
    """A `compare_fused.py` result: peak memory beyond the inputs (and time), PyTorch's
    materialised logits against the crate's fused path per chunk size."""
    out = header(doc, path, readme)
    out[0] = out[0].replace("### CPU: ", "### CPU, fused path (hidden states × lm_head): ", 1)
    host = doc.get("host", {})
    load = [host.get("loadavg_1m_before"), host.get("loadavg_1m_after")]
    out += [f"Peak resident memory one call adds beyond its inputs ({doc.get('memory_method', '?')}); "
            f"time: median of {doc.get('iters')} timed calls (load average {num(load[0], 'g')} before, "
            f"{num(load[1], 'g')} after). Inputs: {doc.get('inputs', '?')}.", ""]
    cols = ["N", "D", "V", "dtype", "impl", "chunk", "peak beyond inputs", "PyTorch ÷ crate", "crate heap", "median"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join("---:" for _ in cols) + "|")
    for r in doc.get("results", []):
        if r.get("status") != "ok":
            out.append(f"| {r['rows']} | {r['hidden']} | {r['vocab']} | {r['dtype']} | {r['impl']} | "
                       f"{r.get('chunk') or '—'} | failed | — | — | — |")
            continue
        mib = lambda v: "—" if v is None else f"{v:.1f} MiB"  # noqa: E731
        ratio = r.get("memory_ratio")
        out.append(f"| {r['rows']} | {r['hidden']} | {r['vocab']} | {r['dtype']} | {r['impl']} | "
                   f"{r.get('chunk') or '—'} | {mib(r.get('peak_rss_beyond_inputs_mib'))} | "
                   f"{'**' + format(ratio, '.1f') + '×**' if ratio else '—'} | "
                   f"{mib(r.get('peak_heap_beyond_inputs_mib'))} | {ms(r.get('median_ms'))} ms |")
    out.append("")
    notes = []
    goal = doc.get("goal")
    if goal:
        n, d, v = goal["shape"]
        notes.append(f"Goal (≥ {goal['target']:g}× less peak memory beyond the inputs than PyTorch at N={n}, D={d}, "
                     f"V={v}, chunk {goal['chunk']}): **{goal['ratio']:.1f}× — {'met' if goal['met'] else 'not met'}**.")
    notes += same_inputs_notes(doc)
    notes += doc.get("notes", [])
    out += [f"- {n}" for n in notes]
    out.append("")
    return out


def render_fused_gpu(doc, path, readme):
    """A `compare_fused_gpu.py` result: device memory one call adds beyond its inputs and time,
    PyTorch's materialised logits (and its GEMMs alone, and Liger's fused linear CE where
    installed) against the crate's fused path on the GPU."""
    out = header(doc, path, readme)
    out[0] = out[0].replace("### GPU: ", "### GPU, fused path (hidden states × lm_head): ", 1)
    out += [f"Peak device memory one call adds beyond its inputs ({doc.get('memory_method', '?')}); time: median "
            f"of {doc.get('iters')} calls timed with CUDA events after {doc.get('warmup')} warm-up. "
            f"Inputs: {doc.get('inputs', '?')}.", ""]
    cols = ["N", "D", "V", "dtype", "impl", "chunk", "peak beyond inputs", "PyTorch ÷ crate", "median", "crate ÷ PyTorch"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join("---:" for _ in cols) + "|")
    mib = lambda v: "—" if v is None else f"{v:.1f} MiB"  # noqa: E731
    for r in doc.get("results", []):
        lead = f"| {r['rows']} | {r['hidden']} | {r['vocab']} | {r['dtype']} | {r['impl']} | {r.get('chunk') or '—'} |"
        if r.get("status") != "ok":
            out.append(f"{lead} {'skipped' if str(r.get('status', '')).startswith('skipped') else 'failed'} | — | — | — |")
            continue
        peak = r.get("peak_beyond_inputs_mib")
        memory = mib(peak) if peak is not None or not r.get("device_pool_unavailable") else "unavailable"
        ratio, speed = r.get("memory_ratio"), r.get("time_vs_torch")
        out.append(f"{lead} {memory} | {'**' + format(ratio, '.1f') + '×**' if ratio else '—'} | "
                   f"{ms(r.get('median_ms'))} ms | {format(speed, '.2f') + '×' if speed else '—'} |")
    out.append("")
    notes = []
    goal = doc.get("time_goal")
    if goal:
        n, d, v, dt = goal["shape"]
        times = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        notes.append(f"At N={n}, D={d}, V={v} {dt} the crate takes {ms(goal.get('crate_median_ms'))} ms: "
                     f"{times(goal.get('vs_torch_materialised'))} PyTorch's materialised path, "
                     f"{times(goal.get('vs_torch_gemms'))} its two GEMMs alone ({goal.get('note', '')}).")
    unavailable = {r["device_pool_unavailable"] for r in doc.get("results", []) if r.get("device_pool_unavailable")}
    notes += [f"Crate memory unavailable: {why}." for why in sorted(unavailable)]
    notes += same_inputs_notes(doc)
    notes += doc.get("notes", [])
    out += [f"- {n}" for n in notes]
    out.append("")
    return out


def render_doc(doc, path, readme):
    kind = doc["kind"]
    if kind == FUSED:
        return render_fused(doc, path, readme)
    if kind == FUSED_GPU:
        return render_fused_gpu(doc, path, readme)
    impls = GPU_IMPLS if kind == "gpu" else CPU_IMPLS
    crate = CRATE[kind]
    table, present = shape_rows(doc, impls)
    out = header(doc, path, readme)
    if kind == "gpu" and doc.get("copy"):
        c = doc["copy"]
        out += [f"Copy bandwidth (`dst.copy_(src)`, {c['bytes'] / 2**20:.0f} MiB, read + write): "
                f"**{c['rw_gbps']:.0f} GB/s** — the limit; percentages are GB/s ÷ this.", ""]
    out.append(doc.get("unit_note", "") + ("; median of timed calls." if doc.get("unit_note") else ""))
    out.append("")
    peers = [i for i in present if i != crate]
    cols = ["N", "V", "dtype"] + present + [f"speedup vs {p}" for p in peers]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join("---:" for _ in cols) + "|")
    for (n, v, dt), row in table.items():
        cells = [str(n), str(v), dt] + [cell(row.get(i), kind == "gpu") for i in present]
        sp = doc.get("speedups", {}).get(f"{n}x{v}", {})
        cells += [f"{sp[p]:.2f}×" if sp.get(p) else "—" for p in peers]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    notes = []
    goal = doc.get("goal")
    if goal:
        notes.append(f"Goal (crate ≥ {goal['target']:g}× PyTorch eager at N={goal['shape'][0]}, "
                     f"V={goal['shape'][1]}): **{goal['speedup']:.2f}× — {'met' if goal['met'] else 'not met'}**.")
    for v in doc.get("verification", []):
        errs = v.get("vs_torch_f32") or v.get("crate_vs_torch_eager")
        ref = "PyTorch f32" if "vs_torch_f32" in v else "PyTorch eager (f32)"
        if v.get("status") == "ok" and errs:
            keys = [k for k in ("row_kl", "row_log_ratio", "row_lse_real", "row_lse_masked") if k in errs]
            worst = max((errs[k] for k in keys if errs[k] is not None), default=None)
            f64 = v.get("vs_torch_f64") or v.get("crate_vs_f64") or {}
            all64 = max((x for x in f64.values() if x is not None), default=None)
            notes.append(f"Verification (N={v['rows']}, V={v['vocab']}, {v.get('dtype')}, backend {v.get('backend')}, "
                         f"same data): max abs error of kl / log-ratio / lse vs {ref} {num(worst, '.1e')}; "
                         f"of every output vs PyTorch float64 {num(all64, '.1e')}.")
        else:
            notes.append(f"Verification (N={v.get('rows')}, V={v.get('vocab')}): {v.get('status')}.")
    crate_rows = [r for r in doc.get("results", []) if r["impl"] == crate and r.get("status") == "ok"]
    data = sorted({r.get("data") for r in crate_rows if r.get("data")})
    if data:
        notes.append("Crate timed on: " + "; ".join(data) + ".")
    if kind == "gpu" and any(r.get("fits_l2") for r in crate_rows):
        notes.append("Shapes whose logits fit in L2 may be served from L2 in the crate's own timing "
                     "(it does not rotate inputs).")
    out += [f"- {n}" for n in notes]
    out.append("")
    return out


def load(results_dir):
    docs = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"render: skipping {p}: {e}", file=sys.stderr)
            continue
        if doc.get("dry_run") or doc.get("kind") not in (*CRATE, FUSED, FUSED_GPU) or "results" not in doc:
            print(f"render: skipping {p.name} (not a CPU/GPU/fused comparison)", file=sys.stderr)
            continue
        docs.append((p, doc))
    # Newest first; GPU before CPU on the same day.
    docs.sort(key=lambda pd: (pd[1].get("timestamp", ""), pd[1]["kind"] in ("gpu", FUSED_GPU), pd[0].name), reverse=True)
    return docs


def section(results_dir, readme):
    docs = load(results_dir)
    lines = [BEGIN, "<!-- generated by compare/render.py from results/*.json; edits here are overwritten -->", ""]
    if not docs:
        lines += ["No benchmark results yet: see [compare/README.md](" + link(REPO / "compare" / "README.md", readme) + ").", ""]
    for p, doc in docs:
        lines += render_doc(doc, p, readme)
    lines.append(END)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=str(REPO / "docs" / "results.md"),
                    help="the Markdown file whose results section is rewritten (default docs/results.md)")
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    ap.add_argument("--stdout", action="store_true", help="print the section instead of writing")
    a = ap.parse_args()
    readme = Path(a.readme).resolve()
    new_section = section(a.results, readme)
    if a.stdout:
        print(new_section)
        return 0
    if not readme.exists():
        print(f"render: {readme} does not exist", file=sys.stderr)
        return 2
    text = readme.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        print(f"render: {readme} has no {BEGIN} ... {END} section; add the two lines where the results go",
              file=sys.stderr)
        return 2
    new = text[:i] + new_section + text[j + len(END):]
    if new == text:
        print(f"render: {readme.name} is up to date", file=sys.stderr)
        return 0
    if a.check:
        print(f"render: {readme.name} is out of date; run python3 compare/render.py", file=sys.stderr)
        return 1
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
    print(f"render: rewrote the results section of {readme.name} ({len(load(a.results))} result files)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
