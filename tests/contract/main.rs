//! The contract (`docs/contract.md`) on each backend: the float64 CPU reference against the
//! independent naive oracle of `tests/common`, the emulated kernel through the shared kernel
//! bodies of `tests/common/kernel.rs`, and the library API a trainer meets. The GPU runs the
//! same bodies in `tests/gpu`.
//!
//! `cargo test --test contract [MODULE::]` (proptest regressions of `cpu_reference`:
//! `tests/proptest-regressions/cpu_reference.txt`, where proptest looks for a module beside a
//! `main.rs`).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod cpu_reference;
mod emulated_kernel;
mod emulated_numerics;
mod kernel_variants;
