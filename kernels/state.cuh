// The online row state of docs/contract.md §2, in base 2: every logit is multiplied by
// scale = log2(e)/temperature (folded into one FMA with the centring: x̂ = fma(x, scale, -m)),
// sums use exp2f, finalised values are multiplied by ln 2. The same merge as src/state.rs.
//
// NaN / +inf inputs are not compared per element: they make sum_real / sum_masked NaN (an
// element x = +inf raises the max to +inf and its own x̂ = inf - inf = NaN; a NaN gives
// w = NaN), which finalisation turns into codes 2 / 3. A -inf element has w = 0 and is
// harmless: every term w·(…) is selected only when w > 0, so 0·inf never appears, and
// y = -inf with finite x gives sum_diff = +inf (kl = +inf, the true value).
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

#define INFOPO_LN2 0.693147180559945309417232121458176568f

struct RowState {
    float max_real;     // m_real (base 2)
    float sum_real;     // Σ 2^{x̂}
    float max_masked;   // m_masked (base 2)
    float sum_masked;   // Σ 2^{ŷ}
    float sum_diff;     // Σ w (x̂ − ŷ)
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

// K re-expressed relative to the (not smaller) maxima mr, mm: the per-operand half of the
// contract's merge. A state with sum_real == 0 has no element with w > 0, so its centred sums
// are 0 and stay 0 (its δ may be huge); a factor α that underflows to 0 drops the centred
// terms instead of forming 0·inf. NaN sums propagate (NaN != 0, α·NaN = NaN).
__device__ __forceinline__ RowState state_rescaled(const RowState &k, float mr, float mm) {
    const float a = exp2f(k.max_real - mr);
    const float d = mr - k.max_real;
    const float e = mm - k.max_masked;
    const bool keep = (a > 0.0f) && (k.sum_real != 0.0f);
    RowState r;
    r.max_real = mr;
    r.max_masked = mm;
    r.sum_real = a * k.sum_real;
    r.sum_centered = keep ? a * (k.sum_centered - d * k.sum_real) : 0.0f;
    r.sum_diff = keep ? a * (k.sum_diff - (d - e) * k.sum_real) : 0.0f;
    r.sum_masked = exp2f(k.max_masked - mm) * k.sum_masked;
    return r;
}

// The associative merge (contract §2). Commutative bit for bit.
__device__ __forceinline__ RowState state_merge(const RowState &a, const RowState &b) {
    const float mr = fmaxf(a.max_real, b.max_real);
    const float mm = fmaxf(a.max_masked, b.max_masked);
    const RowState ra = state_rescaled(a, mr, mm);
    const RowState rb = state_rescaled(b, mr, mm);
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
    float vx = x[0], vy = y[0];
#pragma unroll
    for (int i = 1; i < K; ++i) {
        vx = fmaxf(vx, x[i]);
        vy = fmaxf(vy, y[i]);
    }
    // fmaxf ignores NaN; a max of -inf stays below -FLT_MAX so the maxima stay finite or +inf.
    const float mr = fmaxf(s.max_real, vx * scale);
    const float mm = fmaxf(s.max_masked, vy * scale);
    if (mr > s.max_real || mm > s.max_masked) s = state_rescaled(s, mr, mm);
#pragma unroll
    for (int i = 0; i < K; ++i) {
        const float xh = fmaf(x[i], scale, -mr);
        const float yh = fmaf(y[i], scale, -mm);
        const float w = exp2f(xh);
        s.sum_real += w;
        s.sum_masked += exp2f(yh);
        // Select the operand, not the product: one FSEL + one FFMA per sum instead of
        // FMUL + FSEL + FADD (w = 0 exactly when the select matters, so 0·0 is added).
        const bool live = w > 0.0f;
        s.sum_diff = fmaf(w, live ? xh - yh : 0.0f, s.sum_diff);
        s.sum_centered = fmaf(w, live ? xh : 0.0f, s.sum_centered);
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

// Butterfly over the 32 lanes; every lane ends with the same (bitwise) warp state, since the
// merge is commutative bit for bit. All 32 lanes must call it.
__device__ __forceinline__ RowState state_warp_merge(RowState s) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) s = state_merge(s, state_shfl_xor(s, m));
    return s;
}

// Block merge: warp butterflies, then warp 0 merges the per-warp states (lanes beyond the
// warp count hold the empty state). Every thread must call it; the result is valid in warp 0
// (all its lanes). `scratch` is __shared__ RowState[32].
__device__ __forceinline__ RowState state_block_merge(RowState s, RowState *scratch) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned warps = (blockDim.x + 31u) >> 5;
    s = state_warp_merge(s);
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? scratch[lane] : state_empty();
        s = state_warp_merge(s);
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
__device__ __forceinline__ unsigned state_finalize(const RowState &s, float xa, float ya, float scale,
                                                   RowValues &out) {
    const float l2r = log2f(s.sum_real);
    const float l2m = log2f(s.sum_masked);
    out.lse_real = (s.max_real + l2r) * INFOPO_LN2;
    out.lse_masked = (s.max_masked + l2m) * INFOPO_LN2;
    out.kl = (s.sum_diff / s.sum_real - l2r + l2m) * INFOPO_LN2;
    out.entropy_real = (l2r - s.sum_centered / s.sum_real) * INFOPO_LN2;
    out.log_ratio = ((fmaf(xa, scale, -s.max_real) - l2r) - (fmaf(ya, scale, -s.max_masked) - l2m)) * INFOPO_LN2;
    // isfinite via |v| < inf (NaN compares false): no per-element checks were needed.
    if (!(fabsf(s.sum_real) < INFINITY)) return INFOPO_ERR_REAL_NOT_FINITE;
    if (!(fabsf(s.sum_masked) < INFINITY)) return INFOPO_ERR_MASKED_NOT_FINITE;
    if (s.sum_real == 0.0f) return INFOPO_ERR_REAL_ALL_NEG_INF;
    if (s.sum_masked == 0.0f) return INFOPO_ERR_MASKED_ALL_NEG_INF;
    if (xa == -INFINITY) return INFOPO_ERR_REAL_TARGET_NEG_INF;
    if (ya == -INFINITY) return INFOPO_ERR_MASKED_TARGET_NEG_INF;
    return 0u;
}

#endif
