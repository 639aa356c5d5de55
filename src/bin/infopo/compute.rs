//! `infopo compute IN OUT`: every output of an input file, written atomically to OUT.

use crate::args::RunArgs;
use crate::timing::ms;
use crate::{emit, open, Outcome};
use infopo_kernels::io;
use std::path::Path;
use std::time::Instant;

pub fn run(input: &Path, output: &Path, run: &RunArgs) -> Outcome {
    let params = run.params();
    params.validate()?;
    let backend = open(run.backend)?;
    let data = io::read_input(input)?;
    let batch = data.as_batch()?;
    let start = Instant::now();
    let out = backend.compute(&batch, &params)?;
    let elapsed = start.elapsed();
    io::write_output(output, &out)?;
    emit(&format!(
        "{}: {} rows x {} vocab ({}), {} turns, {} trajectories on {} in {:.1} ms -> {}\n",
        input.display(),
        data.rows,
        data.vocab,
        data.real.dtype(),
        batch.turns.map_or(0, |t| t.len()),
        batch.trajectories.map_or(0, |t| t.len()),
        backend.name(),
        ms(elapsed),
        output.display()
    ));
    Ok(())
}
