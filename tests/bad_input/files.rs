//! Malformed input files: every one must be a typed `Error` from the `io` readers (the mapped
//! `read_any_input` and the copying `parse_any_input`), and from the CLI exit code 2 with one
//! line on stderr and no OUT (nor temporary file) left behind. A proptest feeds the readers,
//! and the CPU backend behind them, random corruptions of a valid file and random headers.

use crate::common;

use common::files::{
    entries, f32_bytes, i64_bytes, infopo, raw_batch, raw_hidden_batch, s, serialize, stderr, with, Raw,
    RawTensor as Tensor,
};
use infopo_kernels::io::{self, Input};
use infopo_kernels::{Backend, Cpu, Error, Params};
use proptest::prelude::*;
use safetensors::Dtype;
use std::path::Path;

/// The valid fused-linear file with hidden width D = 0 (every hidden tensor empty).
fn hidden_width_0() -> Raw {
    let empty = |rows| Some((Dtype::F32, vec![rows, 0], vec![]));
    let t = with(raw_hidden_batch(), "real_hidden", empty(6));
    let t = with(t, "masked_hidden", empty(6));
    with(t, "lm_head", empty(5))
}

/// A container from a header text and data bytes, as a hostile writer would make it.
fn container(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// What a file gives through the whole pipeline the CLI runs: read, view, compute on the CPU.
fn pipeline(bytes: &[u8]) -> infopo_kernels::Result<()> {
    pipeline_on(&Cpu, bytes)
}

fn pipeline_on(backend: &dyn Backend, bytes: &[u8]) -> infopo_kernels::Result<()> {
    let path = Path::new("fuzzed.safetensors");
    match io::parse_any_input(bytes, path)? {
        Input::Logits(b) => backend.compute(&b.as_batch()?, &Params::default()).map(drop),
        Input::Hidden(b) => backend.compute_hidden(&b.as_batch()?, &Params::default(), 3).map(drop),
    }
}

/// Both readers reject `bytes` with an error `expect` accepts whose message holds `needle`.
fn rejected(label: &str, bytes: &[u8], needle: &str, expect: impl Fn(&Error) -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let from_map = io::read_any_input(&path).map(drop).and_then(|()| pipeline(bytes));
    let from_bytes = pipeline(bytes);
    for (reader, result) in [("read_any_input", from_map), ("parse_any_input", from_bytes)] {
        let e = result.err().unwrap_or_else(|| panic!("{label}: {reader} accepted it"));
        assert!(expect(&e), "{label}: {reader}: unexpected error {e:?}");
        assert!(e.to_string().contains(needle), "{label}: {reader}: `{needle}` not in `{e}`");
    }
}

fn is_file(e: &Error) -> bool {
    matches!(e, Error::File { .. })
}

const NOT_SAFETENSORS: &str = "not a valid safetensors file";

#[test]
fn every_truncation_of_a_valid_file_is_a_file_error() {
    for tensors in [raw_batch(), raw_hidden_batch()] {
        let bytes = serialize(&tensors);
        pipeline(&bytes).expect("the uncut file is valid");
        for len in 0..bytes.len() {
            let e = pipeline(&bytes[..len]).err().unwrap_or_else(|| panic!("cut to {len} bytes: accepted"));
            assert!(is_file(&e) && e.to_string().contains(NOT_SAFETENSORS), "cut to {len}: {e:?}");
        }
        // The mapped reader on a few of them (each a file).
        for len in [0, 7, 8, 9, 40, bytes.len() / 2, bytes.len() - 1] {
            rejected(&format!("cut to {len}"), &bytes[..len], NOT_SAFETENSORS, is_file);
        }
        // Bytes after the last tensor's data.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 3]);
        rejected("trailing bytes", &longer, "truncated?", is_file);
    }
}

#[test]
fn broken_containers_are_file_errors() {
    let valid = serialize(&raw_batch());
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let with_len = |n: u64| {
        let mut b = valid.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        b
    };
    rejected("header length past the file", &with_len(valid.len() as u64), "header length is invalid", is_file);
    rejected("header length u64::MAX", &with_len(u64::MAX), "header length is invalid", is_file);
    rejected("header length 200 MB", &with_len(200 << 20), "header length is invalid", is_file);
    rejected("header length short of the JSON", &with_len(header_len as u64 - 5), NOT_SAFETENSORS, is_file);
    let mut not_utf8 = valid.clone();
    not_utf8[10] = 0xFF;
    rejected("header not UTF-8", &not_utf8, "not valid UTF-8", is_file);
    rejected("header not JSON", &container("hello, world", &[]), "not a valid tensor table", is_file);
    rejected("header a JSON array", &container("[1, 2, 3]", &[]), "not a valid tensor table", is_file);
    rejected(
        "an unknown dtype",
        &container(r#"{"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}}"#, &[0; 2]),
        NOT_SAFETENSORS,
        is_file,
    );
    rejected(
        "a negative shape",
        &container(r#"{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, &[0; 8]),
        NOT_SAFETENSORS,
        is_file,
    );
    let one = |offsets: &str, data: usize| {
        container(
            &format!(r#"{{"real_logits":{{"dtype":"F32","shape":[2,3],"data_offsets":{offsets}}}}}"#),
            &vec![0; data],
        )
    };
    rejected("offsets past the data", &one("[0,9999]", 24), "another byte count", is_file);
    rejected("offsets reversed", &one("[24,0]", 24), "invalid data offsets", is_file);
    rejected("offsets not from 0", &one("[4,28]", 28), "invalid data offsets", is_file);
    rejected("shape x dtype > bytes", &one("[0,20]", 20), "another byte count than its shape and dtype", is_file);
    rejected("shape x dtype < bytes", &one("[0,28]", 28), "another byte count than its shape and dtype", is_file);
    let overlapping = container(
        r#"{"real_logits":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"masked_logits":{"dtype":"F32","shape":[2,3],"data_offsets":[16,40]}}"#,
        &[0; 40],
    );
    rejected("overlapping offsets", &overlapping, "invalid data offsets", is_file);
    let huge =
        container(r#"{"real_logits":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, &[]);
    rejected("a shape that overflows", &huge, "overflows", is_file);
}

#[test]
fn valid_containers_with_bad_tensors() {
    let format = |e: &Error| matches!(e, Error::TensorFormat { .. });
    let shape = |e: &Error| matches!(e, Error::Shape { .. });
    let missing = |e: &Error| matches!(e, Error::MissingTensor { .. });
    let bad = |label: &str, tensors: Raw, needle: &str, expect: &dyn Fn(&Error) -> bool| {
        rejected(label, &serialize(&tensors), needle, expect)
    };
    let f64s = |n: usize| vec![0u8; 8 * n];
    bad(
        "F64 logits",
        with(
            with(raw_batch(), "real_logits", Some((Dtype::F64, vec![6, 5], f64s(30)))),
            "masked_logits",
            Some((Dtype::F64, vec![6, 5], f64s(30))),
        ),
        "dtype F64 is not supported",
        &format,
    );
    bad(
        "F32 targets",
        with(raw_batch(), "targets", Some((Dtype::F32, vec![6], vec![0; 24]))),
        "expected I32 or I64",
        &format,
    );
    bad("BOOL targets", with(raw_batch(), "targets", Some((Dtype::BOOL, vec![6], vec![0; 6]))), "dtype BOOL", &format);
    bad(
        "U64 targets past i64",
        with(
            raw_batch(),
            "targets",
            Some((Dtype::U64, vec![6], [u64::MAX; 6].iter().flat_map(|x| x.to_le_bytes()).collect())),
        ),
        "out of range",
        &format,
    );
    bad(
        "targets [6, 1]",
        with(raw_batch(), "targets", Some((Dtype::I64, vec![6, 1], i64_bytes(&[0; 6])))),
        "expected [N] = [6]",
        &shape,
    );
    bad(
        "logits of rank 3",
        with(
            with(raw_batch(), "real_logits", Some((Dtype::F32, vec![1, 6, 5], vec![0; 120]))),
            "masked_logits",
            Some((Dtype::F32, vec![1, 6, 5], vec![0; 120])),
        ),
        "expected [N, V]",
        &shape,
    );
    let i32s = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    bad(
        "negative turn offset",
        with(raw_batch(), "turn_offsets", Some((Dtype::I32, vec![4], i32s(&[0, -2, 4, 6])))),
        "entry 1 = -2 is negative",
        &format,
    );
    bad(
        "turn offset past u32",
        with(raw_batch(), "turn_offsets", Some((Dtype::I64, vec![4], i64_bytes(&[0, 2, 1 << 33, 6])))),
        "exceeds 2^32 - 1",
        &format,
    );
    bad(
        "turn offsets of rank 0",
        with(raw_batch(), "turn_offsets", Some((Dtype::I64, vec![], i64_bytes(&[0])))),
        "expected one dimension",
        &shape,
    );
    bad(
        "I64 outcomes",
        with(raw_batch(), "trajectory_outcome", Some((Dtype::I64, vec![2], i64_bytes(&[1, 0])))),
        "expected F32 or F64",
        &format,
    );
    bad(
        "a partial trajectory set",
        with(raw_batch(), "trajectory_tokens", None),
        "missing tensor `trajectory_tokens`",
        &missing,
    );
    bad(
        "credit starts of the wrong length",
        {
            let mut t = raw_batch();
            t.push(("turn_credit_start", Dtype::I64, vec![2], i64_bytes(&[0, 0])));
            t
        },
        "2 entries for 3 turns",
        &|e| matches!(e, Error::Turns { .. }),
    );
    let mut both = raw_hidden_batch();
    both.extend(raw_batch().into_iter().filter(|x| x.0.ends_with("_logits")));
    bad("both sets", both, "both logits", &is_file);
    bad(
        "a partial hidden set",
        with(raw_hidden_batch(), "masked_hidden", None),
        "missing tensor `masked_hidden`",
        &missing,
    );
    bad(
        "no logits, no hidden states",
        with(with(raw_batch(), "real_logits", None), "masked_logits", None),
        "neither logits",
        &is_file,
    );
    bad("only masked logits", with(raw_batch(), "real_logits", None), "missing tensor `real_logits`", &missing);
    // Empty tensors: zero rows are a valid (empty) batch; a zero vocabulary or hidden width is not.
    let empty_rows = vec![
        ("real_logits", Dtype::F32, vec![0, 5], vec![]),
        ("masked_logits", Dtype::F32, vec![0, 5], vec![]),
        ("targets", Dtype::I64, vec![0], vec![]),
    ];
    pipeline(&serialize(&empty_rows)).expect("zero rows are a valid batch");
    // Zero rows hold no bytes whatever the vocabulary: one of 2^62 token ids, with a layout,
    // is still an empty batch on both CPU-side backends.
    let mut huge_vocab: Raw = vec![
        ("real_logits", Dtype::BF16, vec![0, 1 << 62], vec![]),
        ("masked_logits", Dtype::BF16, vec![0, 1 << 62], vec![]),
        ("targets", Dtype::I64, vec![0], vec![]),
    ];
    huge_vocab.extend(raw_batch().into_iter().filter(|t| t.0.starts_with("traj")));
    huge_vocab.extend([
        ("turn_offsets", Dtype::I64, vec![2], i64_bytes(&[0, 0])),
        ("turn_trajectory", Dtype::I64, vec![1], i64_bytes(&[1])),
        ("turn_credit_tokens", Dtype::I64, vec![1], i64_bytes(&[2])),
    ]);
    let bytes = serialize(&huge_vocab);
    pipeline_on(&Cpu, &bytes).expect("cpu: zero rows of a huge vocabulary");
    pipeline_on(&infopo_kernels::emulated::Emulated::new(), &bytes).expect("emulated: zero rows of a huge vocabulary");
    bad(
        "vocabulary 0",
        vec![
            ("real_logits", Dtype::F32, vec![6, 0], vec![]),
            ("masked_logits", Dtype::F32, vec![6, 0], vec![]),
            ("targets", Dtype::I64, vec![6], i64_bytes(&[0; 6])),
        ],
        "vocabulary size is 0",
        &|e| matches!(e, Error::EmptyVocab),
    );
    let no_width = hidden_width_0();
    bad("hidden width 0", no_width, "hidden width D is 0", &shape);
    bad(
        "lm_head of 0 rows",
        with(raw_hidden_batch(), "lm_head", Some((Dtype::F32, vec![0, 4], vec![]))),
        "vocabulary size is 0",
        &|e| matches!(e, Error::EmptyVocab),
    );
}

// ---- The command line -------------------------------------------------------------------

/// `compute` and `verify` on a bad file: exit 2, one line on stderr holding `needle`, and the
/// folder unchanged (no OUT, no temporary file).
fn cli_rejects(label: &str, bytes: &[u8], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out.safetensors");
    let before = entries(dir.path());
    for args in [
        vec!["compute", s(&input), s(&output), "--backend", "cpu"],
        vec!["compute", s(&input), s(&output), "--backend", "emulated"],
        vec!["verify", s(&input), "--backend", "emulated"],
    ] {
        let run = infopo(&args);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{label}: {args:?}: {err}");
        assert!(err.starts_with("infopo: ") && err.trim_end().lines().count() == 1, "{label}: {err}");
        assert!(err.contains(needle), "{label}: `{needle}` not in {err}");
        assert!(!output.exists(), "{label}: OUT left behind");
        assert_eq!(entries(dir.path()), before, "{label}: a file was left behind");
    }
}

#[test]
fn cli_exits_2_on_every_kind_of_bad_file_and_writes_nothing() {
    let valid = serialize(&raw_batch());
    cli_rejects("cut short", &valid[..valid.len() - 9], NOT_SAFETENSORS);
    cli_rejects("only a header length", &valid[..8], NOT_SAFETENSORS);
    let mut huge_len = valid.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    cli_rejects("header length u64::MAX", &huge_len, "header length is invalid");
    cli_rejects("header not JSON", &container("{not json", &[]), "not a valid tensor table");
    let bad_size = container(r#"{"real_logits":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, &[0; 20]);
    cli_rejects("shape x dtype != bytes", &bad_size, "another byte count");
    let overlapping = container(
        r#"{"real_logits":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"masked_logits":{"dtype":"F32","shape":[2,3],"data_offsets":[16,40]}}"#,
        &[0; 40],
    );
    cli_rejects("overlapping offsets", &overlapping, "invalid data offsets");
    cli_rejects(
        "F32 targets",
        &serialize(&with(raw_batch(), "targets", Some((Dtype::F32, vec![6], vec![0; 24])))),
        "targets",
    );
    let no_width = hidden_width_0();
    cli_rejects("hidden width 0", &serialize(&no_width), "hidden width D is 0");
    cli_rejects(
        "vocabulary 0",
        &serialize(&[
            ("real_logits", Dtype::F32, vec![2, 0], vec![]),
            ("masked_logits", Dtype::F32, vec![2, 0], vec![]),
            ("targets", Dtype::I64, vec![2], i64_bytes(&[0; 2])),
        ]),
        "vocabulary size is 0",
    );
}

#[test]
fn cli_keeps_an_existing_out_when_the_input_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    std::fs::write(&input, b"garbage").unwrap();
    std::fs::write(&output, b"an older result").unwrap();
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert_eq!(std::fs::read(&output).unwrap(), b"an older result");
    assert_eq!(entries(dir.path()).len(), 2, "a temporary file was left behind");
}

#[test]
fn bench_chunk_with_a_logits_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.safetensors");
    let hidden = dir.path().join("hidden.safetensors");
    std::fs::write(&logits, serialize(&raw_batch())).unwrap();
    std::fs::write(&hidden, serialize(&raw_hidden_batch())).unwrap();
    let bench = |input: &Path, extra: &[&str]| {
        let mut args =
            vec!["bench", "--backend", "cpu", "--iters", "1", "--warmup", "0", "--json", "--input", s(input)];
        args.extend_from_slice(extra);
        infopo(&args)
    };
    let run = bench(&logits, &["--chunk", "3"]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("--chunk applies to hidden-state inputs") && err.contains("logits.safetensors"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Without --chunk the logits file is timed; with it, a hidden-state file uses the chunk.
    let run = bench(&logits, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = bench(&hidden, &["--chunk", "3"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("\"chunk\":3"), "{}", String::from_utf8_lossy(&run.stdout));
    let run = bench(&hidden, &[]);
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("\"chunk\":4096"),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    // A bad --input file is bad input for bench too.
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let run = bench(&garbage, &[]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains(NOT_SAFETENSORS) && stderr(&run).trim_end().lines().count() == 1, "{}", stderr(&run));
}

// ---- Random corruptions -----------------------------------------------------------------

/// Every tensor name an input file may hold.
const INPUT_NAMES: &[&str] = &[
    "real_logits",
    "masked_logits",
    "targets",
    "real_hidden",
    "masked_hidden",
    "lm_head",
    "turn_offsets",
    "turn_trajectory",
    "turn_credit_tokens",
    "trajectory_group",
    "trajectory_tokens",
    "trajectory_outcome",
    "turn_credit_start",
];

/// A JSON header of 1 to 4 entries named like the input tensors, with random dtypes, shapes
/// and offsets (often inconsistent with each other and with the data that follows).
fn random_header() -> impl Strategy<Value = (String, usize)> {
    let names = prop::sample::select([INPUT_NAMES, &["__metadata__"]].concat());
    let dtypes = prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I64", "I32", "U64", "U8", "BOOL", "X9"]);
    let entry = (names, dtypes, prop::collection::vec(0usize..5, 0..3), 0usize..64, 0usize..64);
    (prop::collection::vec(entry, 1..5), 0usize..160).prop_map(|(entries, data)| {
        let body: Vec<String> = entries
            .iter()
            .map(|(n, d, shape, a, b)| format!(r#""{n}":{{"dtype":"{d}","shape":{shape:?},"data_offsets":[{a},{b}]}}"#))
            .collect();
        (format!("{{{}}}", body.join(",")), data)
    })
}

/// A consistent container (offsets in order, byte counts matching shape × dtype) of 1 to 8
/// input-named tensors with random dtypes, small random shapes and random bytes, so that the
/// safetensors layer accepts it and the crate's own checks (sets, dtypes, shapes, values,
/// layouts, row data) are what decide.
fn random_container() -> impl Strategy<Value = Vec<u8>> {
    let names = prop::sample::select(INPUT_NAMES.to_vec());
    let dtypes = prop::sample::select(vec![
        ("F32", 4),
        ("F16", 2),
        ("BF16", 2),
        ("F64", 8),
        ("I64", 8),
        ("I32", 4),
        ("U32", 4),
        ("U64", 8),
        ("U8", 1),
    ]);
    let entry = (names, dtypes, prop::collection::vec(0usize..7, 0..3));
    (prop::collection::vec(entry, 1..9), any::<u64>()).prop_map(|(entries, seed)| {
        let mut header = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut end = 0;
        for (name, (dtype, size), shape) in entries {
            if !seen.insert(name) {
                continue;
            }
            let bytes = shape.iter().product::<usize>() * size;
            header.push(format!(
                r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{end},{}]}}"#,
                end + bytes
            ));
            end += bytes;
        }
        // Random bytes, with small values often (so some integer tensors hold plausible ids).
        let mut x = seed | 1;
        let data: Vec<u8> = (0..end)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (x >> 60) < 10 && i % 4 != 0 {
                    0
                } else {
                    (x >> 24) as u8 % if x & 1 == 0 { 4 } else { 255 }
                }
            })
            .collect();
        container(&format!("{{{}}}", header.join(",")), &data)
    })
}

/// A plausible input file from `seed`: the logits or the hidden set with targets, and often
/// turns, trajectories and credit starts, of small random sizes that mostly fit together, with
/// occasional faults (a wrong shape or dtype, a missing tensor, special float values, ids out of
/// range), so that every check of the readers and the backend is reached.
fn structured(seed: u64) -> Raw {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let rare = |rng: &mut StdRng| rng.gen_bool(0.08);
    let (n, v, d) = (rng.gen_range(0..5usize), rng.gen_range(0..6usize), rng.gen_range(0..4usize));
    // The mask fill f32::MIN goes into logits only. In hidden states it would make products
    // that overflow the kernel path's f32 chunk logits (to ±inf, or NaN beside an inf) but not
    // the reference's f64 ones: rows the two then reject with different codes, or only one of
    // them rejects. That is the documented f32-versus-f64 precision of the chunk GEMM, not a
    // validation difference, so hidden values stay far from overflow (±inf and NaN included).
    let float = |rng: &mut StdRng, shape: Vec<usize>, dtype: Dtype, hidden: bool| {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| match rng.gen_range(0..40) {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => f32::INFINITY,
                3 if hidden => -1e4,
                3 => f32::MIN,
                _ => rng.gen_range(-4.0..4.0),
            })
            .collect();
        let bytes: Vec<u8> = match dtype {
            Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F64 => values.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            _ => f32_bytes(&values),
        };
        (dtype, shape, bytes)
    };
    let ints = |rng: &mut StdRng, values: Vec<i64>| {
        let dtype = [Dtype::I64, Dtype::I32, Dtype::U32, Dtype::U64][rng.gen_range(0..4)];
        let bytes = match dtype {
            Dtype::I32 | Dtype::U32 => values.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
            _ => i64_bytes(&values),
        };
        (dtype, vec![values.len()], bytes)
    };
    let dtype = [Dtype::F32, Dtype::F16, Dtype::BF16][rng.gen_range(0..3)];
    let mut t: Vec<(&'static str, Tensor)> = Vec::new();
    if rng.gen_bool(0.5) {
        t.push(("real_logits", float(&mut rng, vec![n, v], dtype, false)));
        let masked_shape = if rare(&mut rng) { vec![n, v + 1] } else { vec![n, v] };
        let masked_dtype = if rare(&mut rng) { Dtype::F64 } else { dtype };
        t.push(("masked_logits", float(&mut rng, masked_shape, masked_dtype, false)));
    } else {
        t.push(("real_hidden", float(&mut rng, vec![n, d], dtype, true)));
        t.push(("masked_hidden", float(&mut rng, vec![n, d], dtype, true)));
        let head_shape = if rare(&mut rng) { vec![v, d + 1] } else { vec![v, d] };
        let head_dtype = if rare(&mut rng) { Dtype::F32 } else { dtype };
        t.push(("lm_head", float(&mut rng, head_shape, head_dtype, true)));
    }
    let extra = rare(&mut rng) as usize;
    let targets: Vec<i64> = (0..n + extra).map(|_| rng.gen_range(-1..=v as i64)).collect();
    t.push(("targets", ints(&mut rng, targets)));
    if rng.gen_bool(0.7) {
        let turns = rng.gen_range(0..4usize);
        let b = rng.gen_range(0..3usize);
        let mut offsets: Vec<i64> = (0..turns).map(|_| rng.gen_range(0..=n as i64)).collect();
        offsets.sort_unstable();
        offsets.insert(0, 0);
        let past_end = rare(&mut rng) as i64;
        offsets.push(n as i64 + past_end);
        let short = rare(&mut rng) as usize;
        offsets.truncate(turns + 1 - short);
        t.push(("turn_offsets", ints(&mut rng, offsets)));
        let trajectory: Vec<i64> = (0..turns).map(|_| rng.gen_range(0..=b as i64)).collect();
        t.push(("turn_trajectory", ints(&mut rng, trajectory)));
        let credit: Vec<i64> = (0..turns).map(|_| rng.gen_range(0..4)).collect();
        t.push(("turn_credit_tokens", ints(&mut rng, credit)));
        if rng.gen_bool(0.7) {
            let groups: Vec<i64> = (0..b).map(|_| rng.gen_range(0..2)).collect();
            t.push(("trajectory_group", ints(&mut rng, groups)));
            let tokens: Vec<i64> = (0..b).map(|_| rng.gen_range(0..9)).collect();
            t.push(("trajectory_tokens", ints(&mut rng, tokens)));
            let outcome_dtype = if rng.gen_bool(0.5) { Dtype::F32 } else { Dtype::F64 };
            let outcome = float(&mut rng, vec![b], outcome_dtype, false);
            t.push(("trajectory_outcome", outcome));
            if rng.gen_bool(0.5) {
                let starts: Vec<i64> = (0..turns).map(|_| rng.gen_range(0..6)).collect();
                t.push(("turn_credit_start", ints(&mut rng, starts)));
            }
        }
    }
    if rare(&mut rng) {
        let i = rng.gen_range(0..t.len());
        t.remove(i);
    }
    t.into_iter().map(|(name, (d, s, b))| (name, d, s, b)).collect()
}

proptest! {
    // 256 cases each (PROPTEST_CASES overrides, to hunt longer).
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Byte flips anywhere in a valid file (header, length or data): the readers and the CPU
    /// backend behind them return, Ok or Err, and never panic.
    #[test]
    fn flipped_bytes_never_panic(
        hidden in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = serialize(&if hidden { raw_hidden_batch() } else { raw_batch() });
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = pipeline(&bytes);
    }

    /// Truncated or extended files, and files whose header length is off: always an error,
    /// except where the file keeps its length and header (the tail of the data overwritten by
    /// as many 0x20 bytes: other values of the last tensor, `trajectory_outcome`, still valid).
    #[test]
    fn resized_files_never_panic(cut in any::<prop::sample::Index>(), extra in 0usize..16, len_delta in -16i64..16) {
        let original = serialize(&raw_batch()).len();
        let mut bytes = serialize(&raw_batch());
        let keep = cut.index(bytes.len() + 1);
        bytes.truncate(keep);
        bytes.extend(std::iter::repeat_n(0x20, extra));
        if bytes.len() >= 8 {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as i64 + len_delta;
            bytes[..8].copy_from_slice(&(n.max(0) as u64).to_le_bytes());
        }
        prop_assert!(pipeline(&bytes).is_err() || (bytes.len() == original && len_delta == 0));
    }

    /// Containers safetensors accepts, with random tensors: any outcome but a panic.
    #[test]
    fn random_tensors_never_panic(bytes in random_container()) {
        let _ = pipeline(&bytes);
    }

    /// Plausible files with occasional faults, through the readers and both CPU-side backends:
    /// never a panic, and the emulated kernel rejects exactly what the reference rejects, with
    /// the same message (what `infopo verify` requires of a backend).
    #[test]
    fn structured_random_files_never_panic(seed in any::<u64>()) {
        let bytes = serialize(&structured(seed));
        let cpu = pipeline_on(&Cpu, &bytes);
        let emulated = pipeline_on(&infopo_kernels::emulated::Emulated::new(), &bytes);
        match (&cpu, &emulated) {
            (Ok(()), Ok(())) => {}
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            _ => prop_assert!(false, "cpu {:?} but emulated {:?}", cpu, emulated),
        }
    }

    /// Random headers over random data: any outcome but a panic.
    #[test]
    fn random_headers_never_panic((header, data) in random_header(), seed in any::<u8>()) {
        let data: Vec<u8> = (0..data).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let _ = pipeline(&container(&header, &data));
    }
}
