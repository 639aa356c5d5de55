//! `infopo_kernels::candle` (feature `candle`): candle tensors in and out (`adapter`), and
//! every bad tensor as a typed error (`bad_input`).
//!
//! `cargo test --features candle --test candle [MODULE::]`

mod adapter;
mod bad_input;
