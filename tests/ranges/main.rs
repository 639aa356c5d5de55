//! Vocabulary ranges: partial row states over ranges of [0, V) merged on the host, the
//! kernel's merge mode (emulated), the fused hidden-state path that scores the vocabulary chunk
//! by chunk, and what `infopo bench --fused-linear` measures of it.
//!
//! `cargo test --test ranges [MODULE::]`

#[path = "../common/mod.rs"]
mod common;

mod bench_fused;
mod emulated_merge;
mod fused;
mod partial;
