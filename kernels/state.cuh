// The online row state of docs/contract.md §2, in base 2. The maxima are kept in RAW units (the
// logits as read, before the temperature), and every centred value is formed as
// x̂ = (x − m_raw)·scale with scale = log2(e)/temperature > 0: the difference is exact for
// bf16/f16 inputs (and exactly 0 at the row maximum, as PyTorch's x − max), then one rounding.
// Sums use exp2f, finalised values are multiplied by ln 2. The same merge as src/state.rs.
//
// Mask fills: a raw logit ≤ −2^100 counts as −inf and one ≥ +2^100 as +inf (contract §2), so a
// finfo(dtype).min fill gives exactly what −inf gives. Neither needs a per-element branch: a fill
// below the maximum has w = exp2(huge negative) = 0 like −inf, and the maxima tell finalisation
// whether a whole side (or the target) is a fill.
//
// NaN / +inf inputs are not compared per element: they make sum_real / sum_masked NaN (an
// element x = +inf raises the max to +inf and its own x̂ = (inf − inf)·scale = NaN; a NaN gives
// w = NaN), which finalisation turns into codes 2 / 3. A −inf element has w = 0 and is
// harmless: every term w·(…) is selected only when w > 0, so 0·inf never appears.
//
// +inf KL, independent of flush-to-zero: an element with x finite and y = −inf (a "gap": the
// masked policy gives zero mass to a token the real one can emit) sets sum_diff = +inf from the
// RAW comparison, not from w·(x̂ − ŷ), which is 0 when w flushes to 0 (real probability below
// 2^-126 with -ftz=true) or underflows. +inf is sticky: no finite term or merge removes it
// (state_rescaled keeps it even when it drops a state's centred sums), so kl = +inf on every
// launch shape wherever the gap sits relative to the maximum.
#ifndef INFOPO_STATE_CUH
#define INFOPO_STATE_CUH

// Row error codes, identical to `RowErrorKind` in src/error.rs, in priority order.
#define INFOPO_ERR_TARGET_OUT_OF_RANGE 1u
#define INFOPO_ERR_REAL_NOT_FINITE 2u
#define INFOPO_ERR_MASKED_NOT_FINITE 3u
#define INFOPO_ERR_REAL_ALL_NEG_INF 4u
#define INFOPO_ERR_MASKED_ALL_NEG_INF 5u
#define INFOPO_ERR_REAL_TARGET_NEG_INF 6u
#define INFOPO_ERR_MASKED_TARGET_NEG_INF 7u
// Not a row error: no row error, but the row's estimator is not finite (kl = +inf) and the batch
// has trajectories, so the turn's info would make the advantages NaN. Loses to every row error.
#define INFOPO_ERR_ESTIMATOR_NOT_FINITE 8u

// The error word is atomicMax of ~key: the smallest key wins. key = class·2^40 + row·16 + code,
// class 1 for code 8 (so any row error of the batch beats it), else 0; rows < 2^32. Decoded by
// src/launch.rs::decode_error_word.
__device__ __forceinline__ unsigned long long infopo_error_key(int64_t row, unsigned code) {
    const unsigned long long cls = code >= INFOPO_ERR_ESTIMATOR_NOT_FINITE ? (1ull << 40) : 0ull;
    return cls + (unsigned long long)row * 16ull + code;
}

// Raw logits at or beyond these count as ∓inf (mask fills such as finfo(bf16/f32).min).
#define INFOPO_NEG_LIMIT (-0x1p100f)
#define INFOPO_POS_LIMIT (0x1p100f)

#define INFOPO_LN2 0.693147180559945309417232121458176568f

struct RowState {
    float max_real;     // m_real, raw (unscaled) units
    float sum_real;     // Σ 2^{x̂}
    float max_masked;   // m_masked, raw units
    float sum_masked;   // Σ 2^{ŷ}
    float sum_diff;     // Σ w (x̂ − ŷ); +inf (sticky) once an element has x finite, y = −inf
    float sum_centered; // Σ w x̂
};

// The identity of the merge: maxima at the most negative finite float, sums 0.
__device__ __forceinline__ RowState state_empty() {
    RowState s;
    s.max_real = -FLT_MAX;
    s.sum_real = 0.0f;
    s.max_masked = -FLT_MAX;
    s.sum_masked = 0.0f;
    s.sum_diff = 0.0f;
    s.sum_centered = 0.0f;
    return s;
}

// K re-expressed relative to the (not smaller) raw maxima mr, mm: the per-operand half of the
// contract's merge. A state with sum_real == 0 has no element with w > 0, so its centred sums
// are 0 and stay 0 (its δ may be huge or +inf); a factor α that underflows to 0 drops the
// centred terms instead of forming 0·inf, except the sticky +inf of sum_diff (a gap). NaN sums
// propagate (NaN != 0, α·NaN = NaN). δ, η ≥ 0 are in scaled units; |raw| < 2^100 and
// scale ≤ log2(e)·1e3 keep them finite except against an empty side (−FLT_MAX), where α = 0.
__device__ __forceinline__ RowState state_rescaled(const RowState &k, float mr, float mm, float scale) {
    const float d = (mr - k.max_real) * scale;
    const float e = (mm - k.max_masked) * scale;
    const float a = exp2f(-d);
    const bool keep = (a > 0.0f) && (k.sum_real != 0.0f);
    RowState r;
    r.max_real = mr;
    r.max_masked = mm;
    r.sum_real = a * k.sum_real;
    r.sum_centered = keep ? a * (k.sum_centered - d * k.sum_real) : 0.0f;
    r.sum_diff = keep ? a * (k.sum_diff - (d - e) * k.sum_real) : (k.sum_diff == INFINITY ? INFINITY : 0.0f);
    r.sum_masked = exp2f(-e) * k.sum_masked;
    return r;
}

// The associative merge (contract §2). Commutative in exact arithmetic and, as written, bit for
// bit (each operand is rescaled by the same code, then the halves are added). On the GPU nvcc's
// default --fmad=true may contract a·k.sum + other into an FMA whose operands differ by lane, so
// the two partners of a butterfly step can end with different last bits: harmless, because only
// lane 0's state is ever used (state_block_merge, the split merge in infopo_body, finalisation),
// and that lane's merge order is fixed. The emulator (no contraction across statements) is exact.
__device__ __forceinline__ RowState state_merge(const RowState &a, const RowState &b, float scale) {
    const float mr = fmaxf(a.max_real, b.max_real);
    const float mm = fmaxf(a.max_masked, b.max_masked);
    const RowState ra = state_rescaled(a, mr, mm, scale);
    const RowState rb = state_rescaled(b, mr, mm, scale);
    RowState r;
    r.max_real = mr;
    r.max_masked = mm;
    r.sum_real = ra.sum_real + rb.sum_real;
    r.sum_masked = ra.sum_masked + rb.sum_masked;
    r.sum_diff = ra.sum_diff + rb.sum_diff;
    r.sum_centered = ra.sum_centered + rb.sum_centered;
    return r;
}

// Adds K raw (unscaled, already f32) element pairs: first the maxima of the K elements, one
// rescale of the running state only if a maximum rises, then 2 exp2 per pair.
template <int K>
__device__ __forceinline__ void state_update(RowState &s, const float (&x)[K], const float (&y)[K],
                                             float scale) {
    float vx = x[0], vy = y[0], ny = y[0];
#pragma unroll
    for (int i = 1; i < K; ++i) {
        vx = fmaxf(vx, x[i]);
        vy = fmaxf(vy, y[i]);
        ny = fminf(ny, y[i]);
    }
    // fmaxf ignores NaN; a max of -inf stays below -FLT_MAX so the maxima stay finite or +inf.
    const float mr = fmaxf(s.max_real, vx);
    const float mm = fmaxf(s.max_masked, vy);
    if (mr > s.max_real || mm > s.max_masked) s = state_rescaled(s, mr, mm, scale);
#pragma unroll
    for (int i = 0; i < K; ++i) {
        // Centre, then scale: x̂ is exactly 0 at the maximum (see the top of this file).
        const float xh = (x[i] - mr) * scale;
        const float yh = (y[i] - mm) * scale;
        const float w = exp2f(xh);
        s.sum_real += w;
        s.sum_masked += exp2f(yh);
        // Select the operand, not the product: one FSEL + one FFMA per sum instead of
        // FMUL + FSEL + FADD (w = 0 exactly when the select matters, so 0·0 is added).
        const bool live = w > 0.0f;
        s.sum_diff = fmaf(w, live ? xh - yh : 0.0f, s.sum_diff);
        s.sum_centered = fmaf(w, live ? xh : 0.0f, s.sum_centered);
    }
    // Gaps, on the raw values so that flushing w to 0 cannot hide them (NaN compares false and
    // is code 2 anyway). Only K elements with a masked −inf or fill pay for the per-element
    // test: one FMNMX per pair above instead of two compares and an OR.
    if (ny <= INFOPO_NEG_LIMIT) {
        bool gap = false;
#pragma unroll
        for (int i = 0; i < K; ++i) gap |= (x[i] > INFOPO_NEG_LIMIT) & (y[i] <= INFOPO_NEG_LIMIT);
        if (gap) s.sum_diff = INFINITY;
    }
}

// One lane exchange of a whole state. On the GPU: six 32-bit shuffles. The emulator exchanges
// any trivially copyable value with one warp barrier (same semantics, far fewer barriers), the
// one place where the kernel source knows it is emulated.
__device__ __forceinline__ RowState state_shfl_xor(const RowState &s, int m) {
#ifdef INFOPO_EMULATOR
    return __shfl_xor_sync(0xffffffffu, s, m);
#else
    RowState o;
    o.max_real = __shfl_xor_sync(0xffffffffu, s.max_real, m);
    o.sum_real = __shfl_xor_sync(0xffffffffu, s.sum_real, m);
    o.max_masked = __shfl_xor_sync(0xffffffffu, s.max_masked, m);
    o.sum_masked = __shfl_xor_sync(0xffffffffu, s.sum_masked, m);
    o.sum_diff = __shfl_xor_sync(0xffffffffu, s.sum_diff, m);
    o.sum_centered = __shfl_xor_sync(0xffffffffu, s.sum_centered, m);
    return o;
#endif
}

// Butterfly over the 32 lanes; every lane ends with the warp's state (bitwise the same in the
// emulator; on the GPU possibly not in the last bits, see state_merge: callers use lane 0's).
// All 32 lanes must call it.
__device__ __forceinline__ RowState state_warp_merge(RowState s, float scale) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) s = state_merge(s, state_shfl_xor(s, m), scale);
    return s;
}

// Block merge: warp butterflies, then warp 0 merges the per-warp states (lanes beyond the
// warp count hold the empty state). Every thread must call it; the result is valid in warp 0
// (lane 0's is the one used). `scratch` is __shared__ RowState[32].
__device__ __forceinline__ RowState state_block_merge(RowState s, RowState *scratch, float scale) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned warps = (blockDim.x + 31u) >> 5;
    s = state_warp_merge(s, scale);
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? scratch[lane] : state_empty();
        s = state_warp_merge(s, scale);
    }
    __syncthreads(); // scratch may be reused
    return s;
}

// Row outputs in natural-log units.
struct RowValues {
    float lse_real, lse_masked, log_ratio, kl, entropy_real;
};

// Finalises a complete row state given the raw (unscaled) target logits. Returns the row's
// error code (0 = none) in contract priority order, target range (code 1) being the caller's.
// A target that is the maximum of its side has x̂_a = (x_a − m)·scale = 0 exactly; with the
// other tokens far below, sum = 1 exactly and log_ratio is exactly 0.
__device__ __forceinline__ unsigned state_finalize(const RowState &s, float xa, float ya, float scale,
                                                   RowValues &out) {
    const float l2r = log2f(s.sum_real);
    const float l2m = log2f(s.sum_masked);
    out.lse_real = fmaf(s.max_real, scale, l2r) * INFOPO_LN2;
    out.lse_masked = fmaf(s.max_masked, scale, l2m) * INFOPO_LN2;
    out.kl = (s.sum_diff / s.sum_real - l2r + l2m) * INFOPO_LN2;
    out.entropy_real = (l2r - s.sum_centered / s.sum_real) * INFOPO_LN2;
    const float xha = (xa - s.max_real) * scale, yha = (ya - s.max_masked) * scale;
    out.log_ratio = ((xha - l2r) - (yha - l2m)) * INFOPO_LN2;
    // isfinite via |v| < inf (NaN compares false): no per-element checks were needed. A side
    // whose maximum is a fill (≤ −2^100) has only fills and −inf: "every logit is −inf".
    if (!(fabsf(s.sum_real) < INFINITY) || s.max_real >= INFOPO_POS_LIMIT) return INFOPO_ERR_REAL_NOT_FINITE;
    if (!(fabsf(s.sum_masked) < INFINITY) || s.max_masked >= INFOPO_POS_LIMIT) return INFOPO_ERR_MASKED_NOT_FINITE;
    if (s.sum_real == 0.0f || s.max_real <= INFOPO_NEG_LIMIT) return INFOPO_ERR_REAL_ALL_NEG_INF;
    if (s.sum_masked == 0.0f || s.max_masked <= INFOPO_NEG_LIMIT) return INFOPO_ERR_MASKED_ALL_NEG_INF;
    if (xa <= INFOPO_NEG_LIMIT) return INFOPO_ERR_REAL_TARGET_NEG_INF;
    if (ya <= INFOPO_NEG_LIMIT) return INFOPO_ERR_MASKED_TARGET_NEG_INF;
    return 0u;
}

#endif
