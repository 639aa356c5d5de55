//! The contract's math in float64 (`docs/contract.md`), with no backend: the row state and the
//! row pass ([`row`]), vocabulary ranges and their merge ([`range`]), the walk over vocabulary
//! chunks of the fused path ([`chunks`]) and the one host epilogue ([`epilogue`]) every backend
//! and adapter that finishes on the host calls.

pub(crate) mod chunks;
pub(crate) mod epilogue;
pub(crate) mod range;
pub(crate) mod row;
