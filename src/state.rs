//! The online row state of `docs/contract.md` §2, in float64 and natural-log units.
//! `kernels/state.cuh` holds the same state, with the same field names, in f32 and base 2.

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
    /// Σ w (x̂ − ŷ)
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

    /// Adds one position (the element update of the contract).
    pub fn push(&mut self, x: f64, y: f64) {
        let mut one = RowState::EMPTY;
        one.max_real = x.max(f64::MIN);
        one.max_masked = y.max(f64::MIN);
        let xh = x - one.max_real;
        let yh = y - one.max_masked;
        let w = xh.exp();
        one.sum_real = w;
        one.sum_masked = yh.exp();
        one.sum_diff = if w > 0.0 { w * (xh - yh) } else { 0.0 };
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
            r.sum_centered += alpha * (k.sum_centered - delta * k.sum_real);
            r.sum_diff += alpha * (k.sum_diff - (delta - eta) * k.sum_real);
            r.sum_masked += (k.max_masked - max_masked).exp() * k.sum_masked;
        }
        r
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
