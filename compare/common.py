"""Shared pieces of the benchmark scripts in compare/.

- `synth_batch`: synthetic, realistic InfoPO batches in torch (the same distribution and layout
  as `src/synth.rs`, not the same numbers);
- `write_input` / `read_output`: the CLI's safetensors files (names from `src/io.rs`);
- `torch_rows`, `torch_pipeline`: the PyTorch formulation the crate is compared with;
- `env_info`: git commit, device, driver, software versions;
- `time_cpu`, `time_cuda`, `cuda_copies`: timing (median of timed runs after warm-up;
  on a GPU with CUDA events, rotating among input copies whose total exceeds the L2 cache);
- `Report`: the raw log (tee of everything printed), the JSON and the PNG in results/.

Runs on CPU-only machines (nothing here imports CUDA-only packages).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
SCHEMA = 1

# Tensor names of the CLI's input file (src/io.rs reads `real` and `masked`).
REAL, MASKED = "real_logits", "masked_logits"

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


# --------------------------------------------------------------------------------------------
# Synthetic data


def synth_logits(rows, vocab, dtype=torch.float32, device="cpu", seed=2026, chunk_elems=1 << 26):
    """Logits like a language model's (src/synth.rs `logits_pair`): a normal background of std 2,
    1-4 strongly preferred tokens per row (boost 8-12, the largest first); the masked run is the real one plus
    N(0, 0.3²) noise with each peak's boost scaled by U(0.5, 1.5). Targets are the first (top)
    peak with probability 0.8, otherwise uniform. Generated in row chunks (in float32, then cast) so that
    large batches fit next to their float32 temporaries."""
    gen = torch.Generator(device=device).manual_seed(seed)
    real = torch.empty(rows, vocab, dtype=dtype, device=device)
    masked = torch.empty(rows, vocab, dtype=dtype, device=device)
    step = max(1, chunk_elems // max(vocab, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = torch.randn(r1 - r0, vocab, generator=gen, device=device).mul_(2.0)
        y = torch.randn(r1 - r0, vocab, generator=gen, device=device).mul_(0.3).add_(x)
        real[r0:r1] = x
        masked[r0:r1] = y
        del x, y
    # Peaks: up to 4 per row, the first always present. Added in float32 on the gathered values.
    g = torch.Generator().manual_seed(seed + 1)
    n_peaks = torch.randint(1, 5, (rows,), generator=g)
    pos = torch.randint(0, vocab, (rows, 4), generator=g)
    # Sorted so that the first peak, the usual target, is the top one.
    boost = (8.0 + 4.0 * torch.rand(rows, 4, generator=g)).sort(dim=1, descending=True).values
    keep = 0.5 + torch.rand(rows, 4, generator=g)
    active = torch.arange(4)[None, :] < n_peaks[:, None]
    r_idx = torch.arange(rows)[:, None].expand(rows, 4)[active].to(device)
    c_idx = pos[active].to(device)
    b = boost[active].to(device)
    for t, scale in ((real, b), (masked, b * keep[active].to(device))):
        # Duplicated positions within a row: accumulate, as repeated additions would.
        flat = r_idx * vocab + c_idx
        uniq, inv = torch.unique(flat, return_inverse=True)
        add = torch.zeros(uniq.numel(), dtype=torch.float32, device=device).index_add_(0, inv, scale)
        view = t.view(-1)
        view[uniq] = (view[uniq].float() + add).to(t.dtype)
    first = pos[:, 0]
    uniform = torch.randint(0, vocab, (rows,), generator=g)
    targets = torch.where(torch.rand(rows, generator=g) < 0.8, first, uniform).to(torch.int64)
    return real, masked, targets.to(device)


def synth_layout(rows, groups=4, per_group=8, seed=2026):
    """Turns over the rows and trajectories in GRPO groups, like src/synth.rs `batch`: binary
    outcomes with success rates 0.5, 1, 0.25, 0 by group (two groups all-equal: gate open);
    1-4 scored turns per trajectory, rows cut at random (some turns empty); 16-215 credit tokens
    per turn; trajectory tokens = its credits + 32-287. Returns int64/float64 CPU tensors."""
    rng = np.random.default_rng(seed)
    n_traj = max(1, groups * per_group)
    group = np.arange(n_traj) // max(1, per_group)
    rate = np.array([0.5, 1.0, 0.25, 0.0])[group % 4]
    outcome = (rng.random(n_traj) < rate).astype(np.float64)
    turn_traj = np.repeat(np.arange(n_traj), 1 + rng.integers(0, 4, n_traj))
    t = len(turn_traj)
    cuts = np.sort(rng.integers(0, rows + 1, max(0, t - 1)))
    offsets = np.concatenate([[0], cuts, [rows]])
    credit = 16 + rng.integers(0, 200, t)
    tokens = np.bincount(turn_traj, weights=credit, minlength=n_traj).astype(np.int64)
    tokens += 32 + rng.integers(0, 256, n_traj)
    i64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return {
        "turn_offsets": i64(offsets),
        "turn_trajectory": i64(turn_traj),
        "turn_credit_tokens": i64(credit),
        "trajectory_group": i64(group),
        "trajectory_tokens": i64(tokens),
        "trajectory_outcome": torch.from_numpy(outcome),
    }


def synth_batch(rows, vocab, dtype=torch.float32, device="cpu", seed=2026):
    """A whole batch: `real`, `masked` [N, V] of `dtype` and `targets` on `device`; the turn and
    trajectory tensors (int64, outcome float64) on the CPU."""
    real, masked, targets = synth_logits(rows, vocab, dtype, device, seed)
    batch = {REAL: real, MASKED: masked, "targets": targets}
    batch.update(synth_layout(rows, seed=seed))
    return batch


def write_input(path, batch):
    """Writes a batch as the CLI's input file (safetensors; logits keep their dtype)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in batch.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # a GPU host without the package: the format is simple enough
        _st_save(tensors, path)
        return
    save_file(tensors, str(path))


def read_output(path):
    """Reads an output file of `infopo compute` into float64 CPU tensors."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        loaded = _st_load(path)
    else:
        loaded = load_file(str(path))
    return {k: v.to(torch.float64) for k, v in loaded.items()}


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def _st_save(tensors, path):
    """Minimal safetensors writer (8-byte little-endian header length, JSON header, data)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def _st_load(path):
    """Minimal safetensors reader (the counterpart of `_st_save`)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    by_name = {v: k for k, v in _ST_DTYPES.items()}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        dt = by_name[meta["dtype"]]
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        out[name] = t.reshape(meta["shape"])
    return out


# --------------------------------------------------------------------------------------------
# The PyTorch formulation


def torch_rows(real, masked, targets, dtype=torch.float32):
    """The per-row part as PyTorch code writes it: log_softmax of both (computed in `dtype`),
    KL(p_real ‖ p_masked) = kl_div(log q, log p, log_target=True) summed over the vocabulary, and
    the teacher-forced log-ratio log p[a] − log q[a]."""
    lp = F.log_softmax(real, dim=-1, dtype=dtype)
    lq = F.log_softmax(masked, dim=-1, dtype=dtype)
    kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    t = targets[:, None]
    log_ratio = (lp.gather(-1, t) - lq.gather(-1, t)).squeeze(-1)
    return kl, log_ratio


def layout_to(batch, device, acc=torch.float32):
    """The small turn/trajectory tensors on `device`, prepared once (outside any timing): dense
    group ids (the contract allows sparse ones) and the row → turn map as its counts."""
    g = batch["trajectory_group"]
    _, dense = torch.unique(g, return_inverse=True)
    off = batch["turn_offsets"]
    return {
        "counts": (off[1:] - off[:-1]).to(device),
        "turn_trajectory": batch["turn_trajectory"].to(device),
        "credit": batch["turn_credit_tokens"].to(device, acc),
        "group": dense.to(device),
        "n_groups": int(dense.max()) + 1 if dense.numel() else 0,
        "tokens": batch["trajectory_tokens"].to(device, acc),
        "outcome": batch["trajectory_outcome"].to(device, acc),
    }


def _group_stats(values, weights, index, n, acc):
    """Weighted count, mean and unbiased std per group with index_add (no host syncs)."""
    w_sum = torch.zeros(n, dtype=acc, device=values.device).index_add_(0, index, weights)
    mean = torch.zeros(n, dtype=acc, device=values.device).index_add_(0, index, weights * values)
    mean = mean / w_sum.clamp(min=1e-30)
    dev = values - mean[index]
    m2 = torch.zeros(n, dtype=acc, device=values.device).index_add_(0, index, weights * dev * dev)
    std = (m2 / (w_sum - 1).clamp(min=1e-30)).sqrt()
    return w_sum, mean, std


def torch_pipeline(real, masked, targets, lay, beta=0.1, tau=0.05, eps=1e-6, acc=torch.float32):
    """The whole InfoPO computation (docs/contract.md, estimator log-ratio, normalize on) in plain
    torch ops, as the paper's code does it: log_softmax of both, gather, kl_div; per-turn segment
    means with index_add; group mean/std of outcomes and of the credit-weighted intrinsic pool
    with index_add; the variance gate; batch statistics. No host synchronisation, so it runs
    asynchronously and under torch.compile without graph breaks."""
    row_dtype = torch.float64 if acc == torch.float64 else torch.float32
    kl, log_ratio = torch_rows(real, masked, targets, row_dtype)
    out = torch_epilogue(log_ratio, lay, beta, tau, eps, acc)
    out["row_kl"] = kl
    out["row_log_ratio"] = log_ratio
    return out


def torch_epilogue(log_ratio, lay, beta=0.1, tau=0.05, eps=1e-6, acc=torch.float32):
    """Everything after the rows (turns, groups, gate, advantages) from the per-row log-ratio."""
    dev = log_ratio.device
    counts, turn_traj = lay["counts"], lay["turn_trajectory"]
    n_turns = counts.numel()
    row_turn = torch.repeat_interleave(
        torch.arange(n_turns, device=dev), counts, output_size=log_ratio.shape[0]
    )
    info_sum = torch.zeros(n_turns, dtype=acc, device=dev).index_add_(0, row_turn, log_ratio.to(acc))
    info = info_sum / counts.clamp(min=1).to(acc)
    intrinsic = info / lay["credit"]

    # Outcome statistics per group; a group of one: mean 0, std 1.
    group, n_groups = lay["group"], lay["n_groups"]
    outcome = lay["outcome"]
    n_g, mu_g, sd_g = _group_stats(outcome, torch.ones_like(outcome), group, n_groups, acc)
    single = n_g <= 1
    mu_g = torch.where(single, torch.zeros_like(mu_g), mu_g)
    sd_g = torch.where(single, torch.ones_like(sd_g), sd_g)
    advantage = (outcome - mu_g[group]) / (sd_g[group] + eps)
    gate = torch.sigmoid(-sd_g[group] / tau)

    # Intrinsic normalisation per group over the credit-weighted pool of non-zero values.
    turn_group = group[turn_traj]
    nz = intrinsic != 0
    w = torch.where(nz, lay["credit"], torch.zeros_like(intrinsic))
    w_p, mu_p, sd_p = _group_stats(intrinsic, w, turn_group, n_groups, acc)
    one = w_p <= 1
    sd_p = torch.where(one, torch.ones_like(sd_p), sd_p)
    norm = torch.where(nz, (intrinsic - mu_p[turn_group]) / (sd_p[turn_group] + eps), torch.zeros_like(intrinsic))

    # Batch statistics over all response tokens.
    tokens, credit = lay["tokens"], lay["credit"]
    m = tokens.sum()
    a_mean = (tokens * advantage).sum() / m
    outcome_std = ((tokens * (advantage - a_mean) ** 2).sum() / (m - 1)).sqrt() + eps
    i_mean = (credit * norm).sum() / m
    i_m2 = (credit * (norm - i_mean) ** 2).sum() + (m - credit.sum()) * i_mean**2
    intrinsic_std = (i_m2 / (m - 1)).sqrt() + eps
    ratio = torch.clamp(torch.clamp(outcome_std, min=1.0) / intrinsic_std, max=1.0)
    bonus = beta * gate[turn_traj] * ratio * norm
    return {
        "turn_info": info,
        "turn_intrinsic": intrinsic,
        "turn_intrinsic_norm": norm,
        "turn_bonus": bonus,
        "trajectory_advantage": advantage,
        "trajectory_gate": gate,
        "outcome_std": outcome_std.reshape(1),
        "intrinsic_std": intrinsic_std.reshape(1),
        "magnitude_ratio": ratio.reshape(1),
    }


def torch_reference(batch, device="cpu"):
    """Every output of `infopo compute` from PyTorch in float64 (the verification reference)."""
    real = batch[REAL].to(device, torch.float64)
    masked = batch[MASKED].to(device, torch.float64)
    lay = layout_to(batch, device, acc=torch.float64)
    out = torch_pipeline(real, masked, batch["targets"].to(device), lay, acc=torch.float64)
    out["row_lse_real"] = torch.logsumexp(real, -1)
    out["row_lse_masked"] = torch.logsumexp(masked, -1)
    lp = real - out["row_lse_real"][:, None]
    out["row_entropy_real"] = -(lp.exp() * lp).sum(-1)
    return {k: v.to("cpu", torch.float64) for k, v in out.items()}


def max_abs_errors(got, want, names=None):
    """{name: max |got − want|} over the tensors both have (NaN if either has a NaN)."""
    res = {}
    for k in names or sorted(want):
        if k not in got or k not in want:
            continue
        a, b = got[k].to(torch.float64).flatten(), want[k].to(torch.float64).flatten()
        if a.shape != b.shape:
            res[k] = float("nan")
            continue
        res[k] = float((a - b).abs().max()) if a.numel() else 0.0
    return res


# --------------------------------------------------------------------------------------------
# Environment


def _run(cmd, cwd=None):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit():
    """(commit, dirty): HEAD of the repository and whether the tree has uncommitted changes."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO) or "unknown"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
    return commit, bool(status)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info():
    """Name, driver, memory and L2 of GPU 0 from nvidia-smi and torch; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    info = {
        "name": p.name,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "sm_count": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "l2_bytes": int(getattr(p, "L2_cache_size", 50 * 2**20)),
        "cuda_runtime": torch.version.cuda,
    }
    q = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
              "--format=csv,noheader", "-i", "0"])
    if q:
        parts = [s.strip() for s in q.split(",")]
        info["driver"] = parts[1] if len(parts) > 1 else None
        info["nvidia_smi"] = q
    return info


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unknown"


def env_info(kind):
    """Everything a result file records about where and what ran."""
    commit, dirty = git_commit()
    info = {
        "kind": kind,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "host": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }
    gpu = gpu_info()
    if gpu:
        info["gpu"] = gpu
    info["device"] = gpu["name"] if gpu and kind == "gpu" else info["host"]["cpu"]
    return info


# --------------------------------------------------------------------------------------------
# Timing


def stats(times_s):
    """Median and min in ms of a list of seconds."""
    return {"median_ms": statistics.median(times_s) * 1e3, "min_ms": min(times_s) * 1e3,
            "iters": len(times_s), "times_ms": [round(t * 1e3, 4) for t in times_s]}


def time_cpu(fn, warmup=2, iters=10):
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones (perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def l2_bytes():
    if torch.cuda.is_available():
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    return 50 * 2**20


def n_copies(bytes_per_copy, max_bytes=None, l2=None):
    """How many copies of an input to rotate among so that consecutive timed calls never find
    their input in L2: total ≥ 3·L2 and at least 2 copies, capped by `max_bytes`."""
    l2 = l2 or l2_bytes()
    k = max(2, math.ceil(3 * l2 / max(bytes_per_copy, 1)))
    if max_bytes:
        k = max(1, min(k, max_bytes // max(bytes_per_copy, 1)))
    return k


def cuda_copies(tensors, k):
    """`k` independent device copies of a tuple of tensors (the first is the given one)."""
    out = [tuple(tensors)]
    for _ in range(k - 1):
        out.append(tuple(t.clone() for t in tensors))
    return out


def time_cuda(fn, inputs, warmup=3, iters=20):
    """Seconds of each timed call of fn(*inputs[i % len(inputs)]) measured with CUDA events
    around the call (the GPU time of everything it launches), after `warmup` untimed calls.
    Rotating among the copies in `inputs` keeps every call's input out of L2."""
    k = len(inputs)
    for i in range(warmup):
        fn(*inputs[i % k])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        args = inputs[(warmup + i) % k]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


# --------------------------------------------------------------------------------------------
# The crate's CLI


def find_infopo(explicit=None, build=False, log=print):
    """Path of the `infopo` binary: `explicit`, else target/release/infopo (built with
    `cargo build --release` when missing or when `build`)."""
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise SystemExit(f"--infopo {p}: no such file")
        return p
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    exe = target / "release" / "infopo"
    if build or not exe.exists():
        if not shutil.which("cargo"):
            raise SystemExit(f"{exe} is missing and cargo is not installed; pass --infopo PATH")
        log(f"$ cargo build --release  (in {REPO})")
        r = subprocess.run(["cargo", "build", "--release", "--bin", "infopo"], cwd=REPO)
        if r.returncode != 0 or not exe.exists():
            raise SystemExit("cargo build --release failed")
    return exe


def run_cli(args, log=print, timeout=1800):
    """Runs the CLI, logging the command and its output; returns (returncode, stdout, stderr)."""
    log("$ " + " ".join(str(a) for a in args))
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    for stream in (r.stdout, r.stderr):
        for line in stream.strip().splitlines():
            log("  | " + line)
    return r.returncode, r.stdout, r.stderr


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def infopo_version(exe):
    return _run([str(exe), "--version"])


# --------------------------------------------------------------------------------------------
# Results


class Report:
    """Collects the raw log (everything `log` prints, tee'd to `<name>.log.tmp` as it goes) and
    writes `<date>-<device>.{json,log,png}` atomically at the end."""

    def __init__(self, env, out_dir=None, name=None):
        self.env = env
        self.out_dir = Path(out_dir) if out_dir else RESULTS
        self.out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "-dry-run" if env["kind"].endswith("dry-run") else ""
        self.name = name or f"{env['date']}-{slug(env['device'])}{suffix}"
        self.base = self.out_dir / self.name
        self._log_tmp = open(f"{self.base}.log.tmp", "w")
        self.log(f"# {env['command']}")
        self.log(f"# {env['timestamp']}  commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
        self.log(f"# device: {env['device']}")
        if "gpu" in env:
            self.log(f"# gpu: {json.dumps(env['gpu'])}")
        self.log(f"# host: {json.dumps(env['host'])}")
        self.log(f"# software: {json.dumps(env['software'])}")

    def log(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self._log_tmp.write(line + "\n")
        self._log_tmp.flush()

    def paths(self):
        return {ext: Path(f"{self.base}.{ext}") for ext in ("json", "log", "png")}

    def finish(self, data, figure=None):
        """Writes the JSON (env + data), the PNG (a matplotlib figure) and the log."""
        p = self.paths()
        doc = dict(self.env)
        doc["schema"] = SCHEMA
        doc.update(data)
        doc["files"] = {"log": p["log"].name, "png": p["png"].name if figure is not None else None}
        if figure is not None:
            tmp = f"{p['png']}.tmp"
            figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
            os.replace(tmp, p["png"])
        tmp = f"{p['json']}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, p["json"])
        self.log(f"# wrote {p['json']}" + (f", {p['png'].name}" if figure is not None else "") + f", {p['log'].name}")
        self._log_tmp.close()
        os.replace(f"{self.base}.log.tmp", p["log"])
        return p


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def clean(v):
    """A JSON-safe float (None for NaN/inf)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def table(headers, rows):
    """A plain-text table with right-aligned columns."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def figure():
    """A matplotlib pyplot module with the non-interactive backend (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (scripts/bench-env installs it)", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
