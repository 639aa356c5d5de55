//! `infopo` with no subcommand: a synthetic Qwen-sized batch through the whole pipeline,
//! printed as per-turn and per-trajectory tables with the throughput.

use crate::timing::{median, time_compute};
use crate::{emit, Outcome};
use half::bf16;
use infopo_kernels::synth::{self, SynthSpec};
use infopo_kernels::{BackendKind, Params};
use std::fmt::Write as _;

/// Turns shown in the main job's table.
const SHOWN_TURNS: usize = 12;

pub fn run() -> Outcome {
    let spec = SynthSpec::default_job();
    let backend = infopo_kernels::open(BackendKind::Auto)?;
    eprintln!(
        "infopo: synthesising {} rows x {} vocab bf16 logits, {} GRPO groups x {} trajectories (seed {}) ...",
        spec.rows, spec.vocab, spec.groups, spec.trajectories_per_group, spec.seed
    );
    let data = synth::batch::<bf16>(spec);
    let batch = data.as_batch();
    let params = Params::default();
    // One call for the outputs (and warm-up), then timed calls.
    let out = backend.compute(&batch, &params)?;
    let times = time_compute(backend.as_ref(), &batch, &params, 0, 3)?;
    let med = median(&times);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "InfoPO main job: {} rows x {} vocab (bf16), {} turns, {} trajectories in {} groups; \
         estimator {}, beta {}, gate temperature {}",
        spec.rows,
        spec.vocab,
        data.turn_trajectory.len(),
        data.trajectory_group.len(),
        spec.groups,
        params.estimator.name(),
        params.beta,
        params.gate_temperature
    );
    let n = out.rows.len().max(1) as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let _ = writeln!(
        s,
        "rows: mean log-ratio {:.4}, mean KL {:.4}, mean entropy {:.4} nats\n",
        mean(&out.rows.log_ratio),
        mean(&out.rows.kl),
        mean(&out.rows.entropy_real)
    );

    let info = out.turn_info.as_deref().unwrap_or_default();
    if let Some(adv) = &out.advantages {
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>6} {:>7} {:>10} {:>11} {:>10} {:>11}",
            "turn", "traj", "rows", "credit", "info", "intrinsic", "norm", "bonus"
        );
        for (t, info_t) in info.iter().enumerate().take(SHOWN_TURNS) {
            let rows = data.turn_offsets[t + 1] - data.turn_offsets[t];
            let _ = writeln!(
                s,
                "{t:>5} {:>5} {rows:>6} {:>7} {:>10.5} {:>11.3e} {:>10.4} {:>11.3e}",
                data.turn_trajectory[t],
                data.turn_credit_tokens[t],
                info_t,
                adv.turn_intrinsic[t],
                adv.turn_intrinsic_norm[t],
                adv.turn_bonus[t]
            );
        }
        if info.len() > SHOWN_TURNS {
            let _ = writeln!(s, "    … ({} more turns)", info.len() - SHOWN_TURNS);
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>7} {:>6} {:>10} {:>9}",
            "traj", "group", "outcome", "tokens", "advantage", "gate"
        );
        for i in 0..adv.trajectory_advantage.len() {
            let _ = writeln!(
                s,
                "{i:>5} {:>5} {:>7.2} {:>6} {:>10.4} {:>9.3e}",
                data.trajectory_group[i],
                data.trajectory_outcome[i],
                data.trajectory_tokens[i],
                adv.trajectory_advantage[i],
                adv.trajectory_gate[i]
            );
        }
        let _ = writeln!(
            s,
            "\nbatch: outcome_std {:.6}, intrinsic_std {:.6}, magnitude_ratio {:.6}",
            adv.outcome_std, adv.intrinsic_std, adv.magnitude_ratio
        );
    }
    let bytes = batch.logit_bytes();
    let _ = writeln!(
        s,
        "throughput: {} backend, {:.1} MB of logits in {:.1} ms (median of {}) = {:.2} GB/s, {:.0} rows/s",
        backend.name(),
        bytes as f64 / 1e6,
        med * 1e3,
        times.len(),
        bytes as f64 / med / 1e9,
        spec.rows as f64 / med
    );
    emit(&s);
    Ok(())
}
