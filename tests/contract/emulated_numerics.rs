//! The emulated kernel on the numerics that must not depend on the backend or the launch shape
//! (exact zeros, +∞ KL of tiny-probability gaps, mask fills, non-finite turns, the temperature
//! range), through the shared bodies of `tests/common/kernel.rs`.

use crate::common;

use common::kernel;
use infopo_kernels::emulated::Emulated;

#[test]
fn peaked_rows_give_exact_zero_log_ratio() {
    kernel::peaked_rows_give_exact_zero_log_ratio(&Emulated::new());
}

#[test]
fn tiny_probability_gap_gives_infinite_kl() {
    kernel::tiny_probability_gap_gives_infinite_kl(&Emulated::new());
}

#[test]
fn mask_fills_count_as_infinities() {
    kernel::mask_fills_count_as_infinities(&Emulated::new());
}

#[test]
fn non_finite_turn_info_is_an_error() {
    kernel::non_finite_turn_info_is_an_error(&Emulated::new());
}

#[test]
fn temperature_outside_its_range_is_a_parameter_error() {
    kernel::temperature_outside_its_range_is_a_parameter_error(&Emulated::new());
}
