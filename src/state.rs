//! The online row state of `docs/contract.md` §2, in float64 and natural-log units.
//! `kernels/state.cuh` holds the same state, with the same field names, in f32 and base 2.
//!
//! A position whose x is finite but y = −∞ (the masked policy gives zero mass to a token the real
//! one can emit) makes `sum_diff` +∞, whatever its weight e^x̂ (which may underflow to 0), and
//! +∞ is sticky through every merge: `kl` = +∞ however the row is split.

use crate::error::RowErrorKind;

/// Raw logits at or below this count as −∞ (mask fills such as `finfo(bf16/f32).min`), contract §2.
pub const NEG_LIMIT: f64 = -1_267_650_600_228_229_401_496_703_205_376.0; // −2^100
/// Raw logits at or above this count as +∞ (a row error), contract §2.
pub const POS_LIMIT: f64 = 1_267_650_600_228_229_401_496_703_205_376.0; // 2^100

/// A raw logit as the contract reads it, divided by the temperature (`inv_t` = 1/τs): ±∞ at or
/// beyond ±2^100, NaN unchanged.
#[inline(always)]
pub fn scaled_logit(raw: f32, inv_t: f64) -> f64 {
    scaled_logit_f64(raw as f64, inv_t)
}

/// [`scaled_logit`] of a logit computed in f64 (e.g. a hidden state times the lm_head).
#[inline(always)]
pub fn scaled_logit_f64(x: f64, inv_t: f64) -> f64 {
    if x <= NEG_LIMIT {
        f64::NEG_INFINITY
    } else if x >= POS_LIMIT {
        f64::INFINITY
    } else {
        x * inv_t
    }
}

/// Six numbers that summarise any set of positions of one row pair.
/// With x̂ = x − max_real, ŷ = y − max_masked and w = e^x̂ over the positions seen:
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowState {
    /// max x
    pub max_real: f64,
    /// Σ e^x̂
    pub sum_real: f64,
    /// max y
    pub max_masked: f64,
    /// Σ e^ŷ
    pub sum_masked: f64,
    /// Σ w (x̂ − ŷ); +∞ once a position has x finite and y = −∞
    pub sum_diff: f64,
    /// Σ w x̂
    pub sum_centered: f64,
}

/// The per-row values of the contract, before rounding to the output dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowValues {
    pub lse_real: f64,
    pub lse_masked: f64,
    pub log_ratio: f64,
    pub kl: f64,
    pub entropy_real: f64,
}

/// x finite (or +∞) and y = −∞: the position makes `kl` +∞ (NaN x compares false).
#[inline(always)]
pub fn gap(x: f64, y: f64) -> bool {
    x > f64::NEG_INFINITY && y == f64::NEG_INFINITY
}

impl Default for RowState {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl RowState {
    /// The identity of [`RowState::merge`]: maxima at the most negative finite value (not −∞, so
    /// the shifts δ and η of the merge stay finite and no 0·∞ appears), sums 0.
    pub const EMPTY: RowState = RowState {
        max_real: f64::MIN,
        sum_real: 0.0,
        max_masked: f64::MIN,
        sum_masked: 0.0,
        sum_diff: 0.0,
        sum_centered: 0.0,
    };

    /// The state of one position with scaled logits x (real) and y (masked).
    pub fn single(x: f64, y: f64) -> RowState {
        let mut s = RowState::EMPTY;
        s.push(x, y);
        s
    }

    /// Adds one position (the element update of the contract) with scaled logits x, y (see
    /// [`scaled_logit`]).
    pub fn push(&mut self, x: f64, y: f64) {
        let mut one = RowState::EMPTY;
        one.max_real = x.max(f64::MIN);
        one.max_masked = y.max(f64::MIN);
        let xh = x - one.max_real;
        let yh = y - one.max_masked;
        let w = xh.exp();
        one.sum_real = w;
        one.sum_masked = yh.exp();
        one.sum_diff = if gap(x, y) {
            f64::INFINITY
        } else if w > 0.0 {
            w * (xh - yh)
        } else {
            0.0
        };
        one.sum_centered = if w > 0.0 { w * xh } else { 0.0 };
        // NaN and +inf must poison the sums (that is how they are detected).
        if x.is_nan() || x == f64::INFINITY {
            one.sum_real = f64::NAN;
        }
        if y.is_nan() || y == f64::INFINITY {
            one.sum_masked = f64::NAN;
        }
        *self = self.merge(&one);
    }

    /// The associative merge (contract §2).
    pub fn merge(&self, other: &RowState) -> RowState {
        let max_real = self.max_real.max(other.max_real);
        let max_masked = self.max_masked.max(other.max_masked);
        let mut r = RowState { max_real, max_masked, ..RowState::EMPTY };
        for k in [self, other] {
            let alpha = (k.max_real - max_real).exp();
            let delta = max_real - k.max_real;
            let eta = max_masked - k.max_masked;
            r.sum_real += alpha * k.sum_real;
            // A state with no weight, or one whose weight underflows against the new maximum,
            // adds no centred terms (never 0·∞), but keeps its sticky +∞ (a gap).
            if alpha > 0.0 && k.sum_real != 0.0 {
                r.sum_centered += alpha * (k.sum_centered - delta * k.sum_real);
                r.sum_diff += alpha * (k.sum_diff - (delta - eta) * k.sum_real);
            } else if k.sum_diff == f64::INFINITY {
                r.sum_diff = f64::INFINITY;
            }
            r.sum_masked += (k.max_masked - max_masked).exp() * k.sum_masked;
        }
        r
    }

    /// The row's values of a complete row state, or its row error in the contract's order
    /// after the target range (the caller's): NaN/+∞ real, masked, all −∞ real, masked, −∞
    /// target real, masked. x_a and y_a are the scaled target logits ([`scaled_logit`]).
    pub fn finish_checked(&self, x_target: f64, y_target: f64) -> Result<RowValues, RowErrorKind> {
        if !self.sum_real.is_finite() {
            return Err(RowErrorKind::RealNotFinite);
        }
        if !self.sum_masked.is_finite() {
            return Err(RowErrorKind::MaskedNotFinite);
        }
        if self.sum_real == 0.0 {
            return Err(RowErrorKind::RealAllNegInf);
        }
        if self.sum_masked == 0.0 {
            return Err(RowErrorKind::MaskedAllNegInf);
        }
        if x_target == f64::NEG_INFINITY {
            return Err(RowErrorKind::RealTargetNegInf);
        }
        if y_target == f64::NEG_INFINITY {
            return Err(RowErrorKind::MaskedTargetNegInf);
        }
        Ok(self.finish(x_target, y_target))
    }

    /// The row's values given the scaled target logits x_a and y_a (contract §2).
    pub fn finish(&self, x_target: f64, y_target: f64) -> RowValues {
        let ln_real = self.sum_real.ln();
        let ln_masked = self.sum_masked.ln();
        RowValues {
            lse_real: self.max_real + ln_real,
            lse_masked: self.max_masked + ln_masked,
            log_ratio: (x_target - self.max_real - ln_real) - (y_target - self.max_masked - ln_masked),
            kl: self.sum_diff / self.sum_real - ln_real + ln_masked,
            entropy_real: ln_real - self.sum_centered / self.sum_real,
        }
    }
}
