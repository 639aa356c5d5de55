//! Bad input of every kind must be a typed `Error`, never a panic nor a silent `Ok`: library
//! entries (`api`), input files through the readers and the CLI (`files`), hand-built layouts
//! (`layout`). The candle entries' bad tensors are in `tests/candle` (feature `candle`).
//!
//! `cargo test --test bad_input [MODULE::]`

#[path = "../common/mod.rs"]
mod common;

mod api;
mod files;
mod layout;
