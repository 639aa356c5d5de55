//! `infopo compute IN OUT`: every output of an input file, written atomically to OUT.

use crate::args::RunArgs;
use crate::timing::ms;
use crate::{emit, open, Outcome};
use infopo_kernels::io::{self, Input};
use std::path::Path;
use std::time::Instant;

pub fn run(input: &Path, output: &Path, pad_width: Option<u32>, run: &RunArgs) -> Outcome {
    let params = run.params();
    params.validate()?;
    let backend = open(run.backend)?;
    let mut data = io::read_any_input(input)?;
    match &mut data {
        Input::Logits(d) => d.pad_width = pad_width,
        Input::Hidden(d) => d.pad_width = pad_width,
    }
    let start = Instant::now();
    // The outputs, what the file holds, and its turn and trajectory counts.
    let (out, what, turns, trajectories) = match &data {
        Input::Logits(data) => {
            let batch = data.as_batch()?;
            let out = backend.compute(&batch, &params)?;
            let what = format!("{} rows x {} vocab ({})", data.rows, data.vocab, data.real.dtype());
            (out, what, batch.turns.map_or(0, |t| t.len()), batch.trajectories.map_or(0, |t| t.len()))
        }
        Input::Hidden(data) => {
            let batch = data.as_batch()?;
            let out = backend.compute_hidden(&batch, &params, run.chunk())?;
            let what = format!(
                "{} rows x {} hidden, lm_head {} vocab ({}, fused linear, chunks of {})",
                data.rows,
                data.hidden,
                data.vocab,
                data.real_hidden.dtype(),
                run.chunk().min(data.vocab)
            );
            (out, what, batch.turns.map_or(0, |t| t.len()), batch.trajectories.map_or(0, |t| t.len()))
        }
    };
    let elapsed = start.elapsed();
    io::write_output(output, &out)?;
    emit(&format!(
        "{}: {what}, {turns} turns, {trajectories} trajectories on {} in {:.1} ms -> {}\n",
        input.display(),
        backend.name(),
        ms(elapsed),
        output.display()
    ));
    Ok(())
}
