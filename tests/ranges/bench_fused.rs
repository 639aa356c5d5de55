//! `infopo bench --fused-linear`: what it computes (the library's fused path on the synthetic
//! inputs it names), what it measures (memory beyond the inputs, O(N·chunk) not O(N·V)) and
//! what it refuses.

use half::bf16;
use infopo_kernels::reference::score_hidden;
use infopo_kernels::synth::{hidden_inputs, HiddenSpec};
use infopo_kernels::Params;
use std::process::{Command, Output as Run};

fn infopo(args: &[&str]) -> Run {
    Command::new(env!("CARGO_BIN_EXE_infopo")).args(args).output().expect("run infopo")
}

fn stderr(run: &Run) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// The one JSON object `--json` prints.
fn json_of(run: &Run) -> String {
    assert!(run.status.success(), "{}", stderr(run));
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let json = lines[0].trim().to_string();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    json
}

/// The raw text of a scalar field.
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat).unwrap_or_else(|| panic!("no key {key} in {json}")) + pat.len();
    let rest = &json[start..];
    rest[..rest.find([',', '}']).expect("value ends")].trim()
}

fn number(json: &str, key: &str) -> f64 {
    field(json, key).parse().unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

/// A field holding an array of numbers.
fn numbers(json: &str, key: &str) -> Vec<f64> {
    let pat = format!("\"{key}\":[");
    let start = json.find(&pat).unwrap_or_else(|| panic!("no key {key} in {json}")) + pat.len();
    let rest = &json[start..];
    rest[..rest.find(']').expect("array ends")].split(',').map(|x| x.parse().expect("a number")).collect()
}

fn bench(backend: &str, rows: usize, hidden: usize, vocab: usize, chunk: usize, dtype: &str) -> String {
    let (rows, hidden, vocab, chunk) = (rows.to_string(), hidden.to_string(), vocab.to_string(), chunk.to_string());
    json_of(&infopo(&[
        "bench",
        "--fused-linear",
        "--backend",
        backend,
        "--rows",
        &rows,
        "--hidden",
        &hidden,
        "--vocab",
        &vocab,
        "--chunk",
        &chunk,
        "--dtype",
        dtype,
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
    ]))
}

#[test]
fn reports_the_library_fused_path_on_the_inputs_it_names() {
    let (rows, hidden, vocab, chunk) = (11, 48, 3001, 700);
    let json = bench("cpu", rows, hidden, vocab, chunk, "bf16");
    assert_eq!(field(&json, "path"), "\"fused-linear\"");
    assert_eq!(field(&json, "backend"), "\"cpu\"");
    assert_eq!(field(&json, "dtype"), "\"bf16\"");
    assert_eq!(number(&json, "rows") as usize, rows);
    assert_eq!(number(&json, "hidden") as usize, hidden);
    assert_eq!(number(&json, "vocab") as usize, vocab);
    assert_eq!(number(&json, "chunk") as usize, chunk);
    assert_eq!(number(&json, "iters"), 2.0);
    assert_eq!(numbers(&json, "times_ms").len(), 2);
    let (median, min) = (number(&json, "median_ms"), number(&json, "min_ms"));
    assert!(min > 0.0 && min <= median, "{json}");
    assert_eq!(number(&json, "input_bytes") as usize, (2 * rows * hidden + vocab * hidden) * 2 + rows * 8);

    // The values are the library's f64 fused path on synth::hidden_inputs with the seed it prints
    // (Rust prints f64 so that it parses back exactly).
    let seed = number(&json, "seed") as u64;
    let data = hidden_inputs::<bf16>(HiddenSpec { rows, hidden, vocab, seed });
    let want = score_hidden(0, &data.inputs(), &data.targets, &Params::default(), chunk).unwrap();
    let (kl, log_ratio) = (numbers(&json, "head_kl"), numbers(&json, "head_log_ratio"));
    assert_eq!(kl.len(), 8);
    for (i, w) in want.iter().take(8).enumerate() {
        assert_eq!(kl[i], w.kl, "row {i} kl");
        assert_eq!(log_ratio[i], w.log_ratio, "row {i} log-ratio");
    }
    assert_eq!(number(&json, "sum_kl"), want.iter().map(|v| v.kl).sum::<f64>());
    assert_eq!(number(&json, "sum_log_ratio"), want.iter().map(|v| v.log_ratio).sum::<f64>());
}

#[test]
fn emulated_fused_path_agrees_with_the_reference() {
    let (rows, hidden, vocab) = (9, 32, 1500);
    let cpu = bench("cpu", rows, hidden, vocab, 512, "f32");
    let emulated = bench("emulated", rows, hidden, vocab, 512, "f32");
    assert_eq!(field(&emulated, "backend"), "\"emulated\"");
    for key in ["head_kl", "head_log_ratio"] {
        for (e, c) in numbers(&emulated, key).iter().zip(numbers(&cpu, key)) {
            assert!((e - c).abs() <= 2e-4 + 2e-4 * c.abs(), "{key}: emulated {e}, cpu {c}");
        }
    }
    // Its chunk buffers are f32.
    assert_eq!(
        number(&emulated, "working_set_bytes") as usize,
        4 * (2 * rows * hidden + 512 * hidden + 2 * rows * 512)
    );
}

/// The point of the fused path: memory beyond the inputs grows with the chunk, not with V.
/// Both measures are checked: the heap the binary's allocator counts (exact) and, on Linux,
/// the resident set (VmHWM after a clear_refs reset).
#[test]
fn memory_beyond_the_inputs_is_the_chunk_not_the_vocabulary() {
    let (rows, hidden, vocab, chunk) = (64, 32, 100_000, 256);
    let json = bench("cpu", rows, hidden, vocab, chunk, "bf16");
    let working_set = 8 * (2 * rows * hidden + chunk * hidden + 2 * rows * chunk);
    assert_eq!(number(&json, "working_set_bytes") as usize, working_set);
    let logits = number(&json, "f32_logits_bytes") as usize;
    assert_eq!(logits, 2 * rows * vocab * 4);
    let heap = number(&json, "peak_heap_beyond_inputs_bytes") as usize;
    // The counting allocator sees at least the chunk buffers, and nothing near [N, V].
    assert!(heap >= working_set, "heap peak {heap} < the chunk buffers {working_set}");
    assert!(heap < logits / 8, "heap peak {heap} is not O(N·chunk): the f32 logits are {logits}");
    if cfg!(target_os = "linux") {
        let rss = number(&json, "peak_rss_beyond_inputs_bytes") as usize;
        assert!(rss < logits / 4, "resident peak {rss} is not O(N·chunk): the f32 logits are {logits}");
        let first = number(&json, "first_call_rss_beyond_inputs_bytes") as usize;
        assert!(first <= rss, "the peak is the max over calls, the first included");
    }
    // A chunk beyond V is V.
    let json = bench("cpu", 4, 16, 300, 5000, "f32");
    assert_eq!(number(&json, "chunk"), 300.0);
}

#[test]
fn text_output_names_time_and_memory() {
    let run = infopo(&[
        "bench",
        "--fused-linear",
        "--backend",
        "cpu",
        "--rows",
        "4",
        "--hidden",
        "16",
        "--vocab",
        "500",
        "--iters",
        "1",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    for needle in ["fused-linear", "median", "rows/s", "peak beyond the inputs", "heap"] {
        assert!(out.contains(needle), "`{needle}` not in {out}");
    }
}

#[test]
fn refuses_what_it_cannot_time() {
    // No CUDA backend in this build: a typed error, exit 2, not a timing of something else.
    // (A `cuda` build runs it where a GPU is, and says `cuda` is unavailable where none is.)
    if !cfg!(feature = "cuda") {
        let run =
            infopo(&["bench", "--fused-linear", "--backend", "cuda", "--rows", "2", "--hidden", "4", "--vocab", "9"]);
        assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
        let err = stderr(&run);
        assert!(err.contains("cuda") && err.contains("fused-linear"), "{err}");
    }
    // Inputs too large to allocate: exit 2 before any allocation.
    let run = infopo(&["bench", "--fused-linear", "--rows", "4294967295", "--hidden", "4294967295"]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("too large"), "{}", stderr(&run));
    // Usage errors (clap, exit 2).
    for args in [
        &["bench", "--hidden", "64"][..],
        &["bench", "--chunk", "64"],
        &["bench", "--fused-linear", "--chunk", "0"],
        &["bench", "--fused-linear", "--hidden", "0"],
        &["bench", "--fused-linear", "--rows-only"],
        &["bench", "--fused-linear", "--input", "x.safetensors"],
    ] {
        let run = infopo(args);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", stderr(&run));
    }
}
