//! The emulated kernel (kernels/infopo.cu compiled as host C++, feature `emulator`) through the
//! shared kernel test bodies of `tests/common/kernel.rs` (tolerances documented there), against
//! the naive float64 oracle of `tests/common/mod.rs`.

use crate::common;

use common::kernel;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::Dtype;

#[test]
fn small_vocabularies_every_dtype() {
    kernel::small_vocabularies_every_dtype(&Emulated::new());
}

#[test]
fn random_shapes_match_oracle() {
    kernel::random_shapes_match_oracle(&Emulated::new(), 32);
}

#[test]
fn vocab_1000() {
    kernel::vocab_1000(&Emulated::new());
}

#[test]
fn split_vocabulary_large_v() {
    let e = Emulated::new();
    // The point of these shapes on the (emulated) H100: rows split over blocks.
    for v in [50257usize, 151936] {
        for n in [1usize, 3] {
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                let shape = e.shape(n, v, dtype);
                assert!(shape.splits > 1, "{dtype} N={n} V={v}: {shape:?}");
            }
        }
    }
    kernel::split_vocabulary_large_v(&e);
}

#[test]
fn neg_inf_entries_and_infinite_kl() {
    kernel::neg_inf_entries_and_infinite_kl(&Emulated::new());
}

#[test]
fn huge_logits_and_temperature() {
    kernel::huge_logits_and_temperature(&Emulated::new());
}

#[test]
fn real_and_masked_with_different_alignment() {
    kernel::real_and_masked_with_different_alignment(&Emulated::new());
}

#[test]
fn bitwise_deterministic() {
    let e = Emulated::new();
    assert!(e.shape(3, 50257, Dtype::BF16).splits > 1, "the determinism check should cover the split path");
    kernel::bitwise_deterministic(&e);
}

#[test]
fn every_row_error_code_with_priority() {
    kernel::every_row_error_code_with_priority(&Emulated::new());
}

#[test]
fn epilogue_matches_oracle() {
    kernel::epilogue_matches_oracle(&Emulated::new());
}

#[test]
fn micro_batches_match_one_batch() {
    kernel::micro_batches_match_one_batch(&Emulated::new());
}

#[test]
fn turns_without_trajectories_and_empty_turns() {
    kernel::turns_without_trajectories_and_empty_turns(&Emulated::new());
}

#[test]
fn validation_errors_are_typed() {
    kernel::validation_errors_are_typed(&Emulated::new());
}

#[test]
fn token_advantages_match_oracle() {
    kernel::token_advantages_match_oracle(&Emulated::new(), 12);
}

#[test]
fn ablation_edge_cases() {
    kernel::ablation_edge_cases(&Emulated::new());
}

#[test]
fn intrinsic_gate_matches_oracle() {
    kernel::intrinsic_gate_matches_oracle(&Emulated::new());
}

#[test]
fn bad_credit_spans_are_typed() {
    kernel::bad_credit_spans_are_typed(&Emulated::new());
}
