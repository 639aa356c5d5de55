//! `infopo`: the command-line front end of infopo-kernels.
//!
//! - `infopo` with no arguments runs the main job: a synthetic InfoPO batch of Qwen-sized bf16
//!   logits through the whole pipeline on the best backend available, printed as tables.
//! - `infopo compute IN OUT`, `infopo verify IN`, `infopo bench`: see `--help` and `docs/cli.md`.
//!
//! Exit codes: 0 success, 1 verification failed, 2 bad input or usage (one line on stderr);
//! the mapping from errors to codes is [`Failure`] and `main`, here and nowhere else.
//!
//! One file per subcommand: `compute.rs`, `verify.rs`, `bench.rs`, `main_job.rs` (no
//! subcommand); `args.rs` holds the options they share, `timing.rs` the timing helpers.

mod args;
mod bench;
mod compute;
#[cfg(feature = "cuda")]
mod device_timer;
mod main_job;
mod timing;
mod verify;

use args::{BackendArg, BenchArgs, RunArgs};
use clap::{Parser, Subcommand};
use infopo_kernels::Backend;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "infopo",
    version,
    about = "InfoPO turn-level rewards and advantages from paired logits (or hidden states and an lm_head)",
    long_about = "InfoPO turn-level rewards and advantages from paired logits, or from paired hidden \
        states and the lm_head weight (fused linear: the logits are never stored).\n\n\
        With no subcommand, runs the main job: a synthetic batch of 1024 rows of Qwen-sized \
        (151936) bf16 logits in 4 GRPO groups through the full pipeline on the best backend \
        available, and prints per-turn and per-trajectory tables and the throughput.\n\n\
        Exit codes: 0 success, 1 verification failed, 2 bad input or usage."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute every output of an input file and write them to OUT (safetensors, F32).
    Compute {
        /// Input safetensors file: real and masked logits, or real and masked hidden states and
        /// the lm_head weight (fused linear); targets; optional turns and trajectories.
        input: PathBuf,
        /// Output safetensors file, written atomically.
        output: PathBuf,
        /// Also write the padded [B, L] token output `token_advantage_padded` with rows of this
        /// width L: trajectory i's agent tokens from column `trajectory_pad_offset[i]` (a file
        /// tensor; 0 without it), zeros elsewhere. Needs `turn_credit_start`.
        #[arg(long)]
        pad_width: Option<u32>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a backend and the CPU reference on a file and compare every output tensor.
    Verify {
        /// Input safetensors file (logits, or hidden states and an lm_head).
        input: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Time the full pipeline (rows, turns, advantages) on synthetic data.
    Bench(BenchArgs),
}

/// What a failed command reports: one line on stderr and an exit code.
#[derive(Debug)]
enum Failure {
    /// Bad input, usage or an unavailable backend: exit 2.
    Input(String),
    /// Verification failed: exit 1.
    Verify(String),
}

impl From<infopo_kernels::Error> for Failure {
    fn from(e: infopo_kernels::Error) -> Self {
        Failure::Input(e.to_string())
    }
}

type Outcome = std::result::Result<(), Failure>;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2 (and 0 for --help / --version).
    let cli = Cli::parse();
    let result = match cli.command {
        None => main_job::run(),
        Some(Command::Compute { input, output, pad_width, run }) => compute::run(&input, &output, pad_width, &run),
        Some(Command::Verify { input, run }) => verify::run(&input, &run),
        Some(Command::Bench(args)) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            eprintln!("infopo: {}", one_line(&msg));
            ExitCode::from(2)
        }
        Err(Failure::Verify(msg)) => {
            eprintln!("infopo: {}", one_line(&msg));
            ExitCode::from(1)
        }
    }
}

fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes to stdout, ignoring a closed pipe (`infopo | head`).
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn open(arg: BackendArg) -> Result<Box<dyn Backend>, Failure> {
    Ok(infopo_kernels::open(arg.kind())?)
}
