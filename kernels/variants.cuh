// Variants of the row pass (issue 16), chosen per launch by args.variant (kernels/args.h,
// INFOPO_VARIANT_*; src/launch.rs::KernelVariant). Included by kernels/infopo.cu only, after
// row_vectors: no include guard on purpose (kernels/emulator.cpp compiles infopo.cu once per
// team namespace, and each copy needs its own definitions).
//
// PACKED (bf16, rows that share their offset mod 16): each 32-bit word (two bf16) is clamped
// with max.NaN.bf16x2(w, −2^100): −inf becomes −2^100, the fill the contract already treats as
// −inf (state.cuh), NaN stays NaN, everything above −2^100 is unchanged. No x̂ is then −inf
// (|x̂| ≤ 2^100·scale + |m|·scale, finite), so w·x̂ is never 0·inf and the baseline's
// `live` select (FSETP + 2 FSEL per pair) goes; the maxima and the masked minimum are taken
// on packed words (max.bf16x2 / min.bf16x2: 1 instruction per 2 elements) and only the last
// pair is unpacked. Same state bits as the baseline on every row without a row error: the
// clamp changes only elements ≤ −2^100, whose w is 0 either way (a w·(x̂ − ŷ) term then adds
// 0·finite = 0 instead of a selected 0), the gap test reads the same booleans on clamped
// values (x > −2^100 and y ≤ −2^100 are unchanged by the clamp), NaN / +inf still make the
// side's sum NaN. A side made only of −inf / fills now has maximum −2^100 instead of −FLT_MAX:
// state_finalize reports it as "all −inf" (max ≤ −2^100) as it does for a finfo.min fill.
//
// PACKED_BUMP: PACKED with the loop run as a 32-bit trip count over two bumped pointers, and a
// fast path with blockDim.x = 256 known at compile time (strides are immediates).
//
// WAVES is host-only (src/launch.rs::launch_shape): the kernel runs the baseline.

#ifndef INFOPO_EMULATOR
// sm_80+ (the fatbin's oldest arch is sm_80). The emulator defines the same functions
// (kernels/emulator.h), bit-exact to these PTX instructions.
__device__ __forceinline__ unsigned infopo_bf16x2_max(unsigned a, unsigned b) {
    unsigned r;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ unsigned infopo_bf16x2_min(unsigned a, unsigned b) {
    unsigned r;
    asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ unsigned infopo_bf16x2_max_nan(unsigned a, unsigned b) {
    unsigned r;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
#endif

template <typename T> struct IsBf16 {
    static constexpr bool value = false;
};
template <> struct IsBf16<__nv_bfloat16> {
    static constexpr bool value = true;
};

#define INFOPO_BF16X2_NEG_LIMIT 0xf180f180u // (−2^100, −2^100): sign 1, exponent 227, mantissa 0

__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// state_update on W packed bf16x2 words per side (2W element pairs), see the top of this file.
template <int W>
__device__ __forceinline__ void state_update_bf16x2(RowState &s, unsigned (&xw)[W], unsigned (&yw)[W], float scale) {
#pragma unroll
    for (int i = 0; i < W; ++i) {
        xw[i] = infopo_bf16x2_max_nan(xw[i], INFOPO_BF16X2_NEG_LIMIT);
        yw[i] = infopo_bf16x2_max_nan(yw[i], INFOPO_BF16X2_NEG_LIMIT);
    }
    unsigned px = xw[0], py = yw[0], pn = yw[0];
#pragma unroll
    for (int i = 1; i < W; ++i) {
        px = infopo_bf16x2_max(px, xw[i]);
        py = infopo_bf16x2_max(py, yw[i]);
        pn = infopo_bf16x2_min(pn, yw[i]);
    }
    // NaN halves are ignored by max/min.bf16x2 as by fmaxf / fminf: the same maxima.
    const float vx = fmaxf(bf16_lo(px), bf16_hi(px));
    const float vy = fmaxf(bf16_lo(py), bf16_hi(py));
    const float ny = fminf(bf16_lo(pn), bf16_hi(pn));
    const float mr = fmaxf(s.max_real, vx);
    const float mm = fmaxf(s.max_masked, vy);
    if (mr > s.max_real || mm > s.max_masked) s = state_rescaled(s, mr, mm, scale);
#pragma unroll
    for (int i = 0; i < 2 * W; ++i) {
        const float x = (i & 1) ? bf16_hi(xw[i >> 1]) : bf16_lo(xw[i >> 1]);
        const float y = (i & 1) ? bf16_hi(yw[i >> 1]) : bf16_lo(yw[i >> 1]);
        const float xh = (x - mr) * scale;
        const float yh = (y - mm) * scale;
        const float w = exp2f(xh);
        s.sum_real += w;
        s.sum_masked += exp2f(yh);
        // x̂, ŷ are finite (clamped inputs) unless the row holds NaN / +inf, which makes its
        // sums NaN anyway (codes 2 / 3): no select.
        s.sum_diff = fmaf(w, xh - yh, s.sum_diff);
        s.sum_centered = fmaf(w, xh, s.sum_centered);
    }
    if (ny <= INFOPO_NEG_LIMIT) {
        bool gap = false;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            gap |= (bf16_lo(xw[i]) > INFOPO_NEG_LIMIT) & (bf16_lo(yw[i]) <= INFOPO_NEG_LIMIT);
            gap |= (bf16_hi(xw[i]) > INFOPO_NEG_LIMIT) & (bf16_hi(yw[i]) <= INFOPO_NEG_LIMIT);
        }
        if (gap) s.sum_diff = INFINITY;
    }
}

template <typename V> __device__ __forceinline__ void words_at(const V &v, unsigned *w) {
    unsigned t[Words<V>::N];
    Words<V>::get(v, t);
#pragma unroll
    for (int i = 0; i < Words<V>::N; ++i) w[i] = t[i];
}

// row_vectors (kernels/infopo.cu) for bf16 rows with the packed update. BUMP: the vector loop
// as a 32-bit trip count over bumped pointers; NT > 0: blockDim.x == NT known at compile time.
template <typename V, bool BUMP, int NT>
__device__ __forceinline__ void row_vectors_bf16x2(RowState &s, const __nv_bfloat16 *__restrict__ xr,
                                                   const __nv_bfloat16 *__restrict__ yr, int64_t V_, int64_t S,
                                                   int64_t split, float scale) {
    typedef __nv_bfloat16 T;
    constexpr int E = (int)(sizeof(V) / sizeof(T));
    constexpr int N = Words<V>::N;
    const int64_t tid = threadIdx.x, nt = NT > 0 ? (int64_t)NT : (int64_t)blockDim.x;
    const unsigned o = (unsigned)((uintptr_t)xr % sizeof(V));
    const int64_t head = min64(V_, o ? (int64_t)((sizeof(V) - o) / sizeof(T)) : 0);
    const int64_t nvec = (V_ - head) / E;
    const int64_t tail0 = head + nvec * E;
    const int64_t per = (nvec + S - 1) / S;
    const int64_t v0 = min64(split * per, nvec), v1 = min64(v0 + per, nvec);
    if (split == 0 && tid < head) update_scalar<T>(s, xr, yr, tid, scale);
    const V *__restrict__ xv = reinterpret_cast<const V *>(xr + head);
    const V *__restrict__ yv = reinterpret_cast<const V *>(yr + head);
    int64_t i = v0 + tid;
    if constexpr (BUMP) {
        if (i + nt < v1) {
            // Iterations of the baseline loop (i, i + 2nt, ... while i + nt < v1). Fits 32 bits
            // for any row below 2^37 vectors.
            const unsigned trips = (unsigned)((v1 - i + nt - 1) / (2 * nt));
            const V *__restrict__ px = xv + i;
            const V *__restrict__ py = yv + i;
            for (unsigned k = trips; k != 0u; --k) {
                const V x0 = px[0], x1 = px[nt], y0 = py[0], y1 = py[nt];
                px += 2 * nt;
                py += 2 * nt;
                unsigned xw[2 * N], yw[2 * N];
                words_at(x0, xw);
                words_at(x1, xw + N);
                words_at(y0, yw);
                words_at(y1, yw + N);
                state_update_bf16x2<2 * N>(s, xw, yw, scale);
            }
            i += (int64_t)trips * 2 * nt;
        }
    } else {
        for (; i + nt < v1; i += 2 * nt) {
            const V x0 = xv[i], x1 = xv[i + nt], y0 = yv[i], y1 = yv[i + nt];
            unsigned xw[2 * N], yw[2 * N];
            words_at(x0, xw);
            words_at(x1, xw + N);
            words_at(y0, yw);
            words_at(y1, yw + N);
            state_update_bf16x2<2 * N>(s, xw, yw, scale);
        }
    }
    if (i < v1) {
        const V x0 = xv[i], y0 = yv[i];
        unsigned xw[N], yw[N];
        words_at(x0, xw);
        words_at(y0, yw);
        state_update_bf16x2<N>(s, xw, yw, scale);
    }
    if (split == S - 1 && tid < V_ - tail0) update_scalar<T>(s, xr, yr, tail0 + tid, scale);
}

// The 16-byte path of row_chunk by variant. Returns false when the variant does not apply
// (not bf16, or a variant without a row pass of its own): the caller runs the baseline.
template <typename T>
__device__ __forceinline__ bool row_vectors_variant(unsigned variant, RowState &s, const T *__restrict__ xr,
                                                    const T *__restrict__ yr, int64_t V_, int64_t S, int64_t split,
                                                    float scale) {
    if constexpr (IsBf16<T>::value) {
        if (variant == INFOPO_VARIANT_PACKED) {
            row_vectors_bf16x2<uint4, false, 0>(s, xr, yr, V_, S, split, scale);
            return true;
        }
        if (variant == INFOPO_VARIANT_PACKED_BUMP) {
            if (blockDim.x == 256u)
                row_vectors_bf16x2<uint4, true, 256>(s, xr, yr, V_, S, split, scale);
            else
                row_vectors_bf16x2<uint4, true, 0>(s, xr, yr, V_, S, split, scale);
            return true;
        }
    }
    (void)variant, (void)s, (void)xr, (void)yr, (void)V_, (void)S, (void)split, (void)scale;
    return false;
}
