// Variants of the row pass, chosen per launch by args.variant (kernels/args.h,
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
// RING: at the end of this file.
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

// ---------------------------------------------------------------------------------------------
// RING (every dtype, rows that share their offset mod 16): more bytes in flight without more
// registers. The chunk's 16-byte vectors [v0, v1) are cut into stages of blockDim.x vectors per
// tensor (stage g = chunk vectors g·nt .. g·nt + nt − 1), streamed through a shared-memory ring
// of STAGES slots (stage g in slot g mod STAGES) while the warps compute:
//  * sm_90 (BULK): thread 0 fills a slot with two cp.async.bulk (real, masked; nt·16 bytes each,
//    4 KiB at 256 threads) completing on the slot's mbarrier (arrive.expect_tx of both sizes,
//    then complete_tx); every thread waits on the mbarrier's phase (try_wait.parity) before
//    reading its vectors. After a trip's two stages are in registers, one __syncthreads, and
//    thread 0 refills their slots with stages g + STAGES: all STAGES slots are in flight while
//    the warps compute (4 × 8 KiB per block, 96 KiB per SM at 3 blocks, against the
//    baseline's ≤ 48 KiB of registers waiting on loads);
//  * sm_80–89 (!BULK): each thread copies its own vector of a stage with cp.async.cg (16 B),
//    one commit group per stage, and waits for it with wait_group(STAGES − 1); it only ever
//    reads back what it copied itself, so no barrier at all. 4 stages on sm_80 (164 KiB of
//    shared memory per SM), 3 on sm_86/89 (100 KiB: 4 × 33.6 KiB would leave 2 blocks per SM).
// Thread tid still gets vectors i = v0 + tid + 2k·nt and i + nt at trip k (stages 2k, 2k + 1),
// then at most one single vector, and the same scalar head and tail: the baseline's
// state_update calls on the same elements in the same order, so the same state bits.
// The emulator (kernels/emulator.h: copies, an mbarrier as a counter) runs the BULK path with
// 4 stages in even blocks and the cp.async path with 3 stages in odd blocks.

#define INFOPO_RING_VECS INFOPO_MAX_THREADS // vectors per tensor in one slot

#ifndef INFOPO_EMULATOR
__device__ __forceinline__ unsigned infopo_smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void infopo_cp_async16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(infopo_smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void infopo_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void infopo_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// sm_90 only (mbarrier transactions, cp.async.bulk): declared on every arch, where the BULK
// template is parsed but never instantiated; the instructions are emitted for sm_90 only.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define INFOPO_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define INFOPO_SM90_ASM(...) ((void)0)
#endif
__device__ __forceinline__ void infopo_mbar_init(uint64_t *bar, unsigned count) {
    INFOPO_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(infopo_smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void infopo_mbar_inval(uint64_t *bar) {
    INFOPO_SM90_ASM("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(infopo_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void infopo_fence_mbar_init() { INFOPO_SM90_ASM("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void infopo_fence_proxy_async() { INFOPO_SM90_ASM("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void infopo_mbar_arrive_expect_tx(uint64_t *bar, unsigned bytes) {
    INFOPO_SM90_ASM("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}" ::"r"(
                        infopo_smem_addr(bar)),
                    "r"(bytes)
                    : "memory");
}
__device__ __forceinline__ bool infopo_mbar_try_wait(uint64_t *bar, unsigned parity) {
    unsigned done = 1u;
    INFOPO_SM90_ASM("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                    : "=r"(done)
                    : "r"(infopo_smem_addr(bar)), "r"(parity)
                    : "memory");
    return done != 0u;
}
__device__ __forceinline__ void infopo_bulk_copy(void *dst, const void *src, unsigned bytes, uint64_t *bar) {
    INFOPO_SM90_ASM("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                        infopo_smem_addr(dst)),
                    "l"(src), "r"(bytes), "r"(infopo_smem_addr(bar))
                    : "memory");
}
#undef INFOPO_SM90_ASM
#define INFOPO_SPIN_PAUSE() ((void)0)
#else
#define INFOPO_SPIN_PAUSE() std::this_thread::yield()
#endif

template <int STAGES, bool BULK>
__device__ __forceinline__ void ring_wait(uint64_t *bar, unsigned parity) {
    if constexpr (BULK) {
        while (!infopo_mbar_try_wait(bar, parity)) INFOPO_SPIN_PAUSE();
    } else {
        (void)bar, (void)parity;
        infopo_cp_async_wait<STAGES - 1>();
    }
}

// Issues stage g (chunk vectors g·nt .. min(g·nt + nt, n) − 1) into slot `slot`. BULK: thread 0
// only, nothing when the stage is past the chunk. !BULK: every thread, its own vector, and one
// commit group per call even when empty (wait_group counts groups).
template <bool BULK>
__device__ __forceinline__ void ring_issue(uint4 (*slot)[INFOPO_RING_VECS], uint64_t *bar, const uint4 *xv,
                                           const uint4 *yv, int64_t n, int64_t nt, int64_t g) {
    const int64_t start = g * nt;
    if constexpr (BULK) {
        if (start >= n) return;
        const unsigned bytes = (unsigned)(min64(nt, n - start) * 16);
        infopo_mbar_arrive_expect_tx(bar, 2u * bytes);
        infopo_bulk_copy(slot[0], xv + start, bytes, bar);
        infopo_bulk_copy(slot[1], yv + start, bytes, bar);
    } else {
        (void)bar;
        const int64_t i = start + threadIdx.x;
        if (i < n) {
            infopo_cp_async16(&slot[0][threadIdx.x], xv + i);
            infopo_cp_async16(&slot[1][threadIdx.x], yv + i);
        }
        infopo_cp_async_commit();
    }
}

template <typename T, int STAGES, bool BULK>
__device__ __forceinline__ void row_vectors_ring(RowState &s, const T *__restrict__ xr, const T *__restrict__ yr,
                                                 int64_t V_, int64_t S, int64_t split, float scale) {
    __shared__ uint4 ring[STAGES][2][INFOPO_RING_VECS];
    __shared__ uint64_t full[STAGES];
    constexpr int E = (int)(sizeof(uint4) / sizeof(T));
    const int64_t tid = threadIdx.x, nt = blockDim.x;
    const unsigned o = (unsigned)((uintptr_t)xr % 16u);
    const int64_t head = min64(V_, o ? (int64_t)((16u - o) / sizeof(T)) : 0);
    const int64_t nvec = (V_ - head) / E;
    const int64_t tail0 = head + nvec * E;
    const int64_t per = (nvec + S - 1) / S;
    const int64_t v0 = min64(split * per, nvec), v1 = min64(v0 + per, nvec);
    if (split == 0 && tid < head) update_scalar<T>(s, xr, yr, tid, scale);
    const uint4 *xv = reinterpret_cast<const uint4 *>(xr + head) + v0;
    const uint4 *yv = reinterpret_cast<const uint4 *>(yr + head) + v0;
    const int64_t n = v1 - v0; // block-uniform, as everything that decides a barrier below
    if (n > 0) {
        if constexpr (BULK) {
            if (tid == 0) {
                for (int k = 0; k < STAGES; ++k) infopo_mbar_init(&full[k], 1u);
                infopo_fence_mbar_init();
                for (int k = 0; k < STAGES; ++k) ring_issue<true>(ring[k], &full[k], xv, yv, n, nt, k);
            }
            __syncthreads(); // the mbarriers are initialised
        } else {
            for (int k = 0; k < STAGES; ++k) ring_issue<false>(ring[k], &full[k], xv, yv, n, nt, k);
        }
        int slot = 0;         // slot of the next stage to read
        unsigned parity = 0u; // its mbarrier phase
        int64_t g = 0;        // the next stage
        const int64_t trips = n / (2 * nt);
        for (int64_t k = 0; k < trips; ++k, g += 2) {
            const int sa = slot;
            ring_wait<STAGES, BULK>(&full[sa], parity);
            const uint4 x0 = ring[sa][0][tid], y0 = ring[sa][1][tid];
            if constexpr (!BULK) ring_issue<false>(ring[sa], &full[sa], xv, yv, n, nt, g + STAGES);
            if (++slot == STAGES) slot = 0, parity ^= 1u;
            const int sb = slot;
            ring_wait<STAGES, BULK>(&full[sb], parity);
            const uint4 x1 = ring[sb][0][tid], y1 = ring[sb][1][tid];
            if constexpr (!BULK) ring_issue<false>(ring[sb], &full[sb], xv, yv, n, nt, g + 1 + STAGES);
            if (++slot == STAGES) slot = 0, parity ^= 1u;
            if constexpr (BULK) {
                __syncthreads(); // every thread has both stages in registers: refill their slots
                if (tid == 0) {
                    infopo_fence_proxy_async();
                    ring_issue<true>(ring[sa], &full[sa], xv, yv, n, nt, g + STAGES);
                    ring_issue<true>(ring[sb], &full[sb], xv, yv, n, nt, g + 1 + STAGES);
                }
            }
            float x[2 * E], y[2 * E];
            unpack_vec<T>(x0, x);
            unpack_vec<T>(x1, x + E);
            unpack_vec<T>(y0, y);
            unpack_vec<T>(y1, y + E);
            state_update<2 * E>(s, x, y, scale);
        }
        if (2 * trips * nt < n) { // the last, partial trip: a pair, a single vector or nothing
            const int64_t i = 2 * trips * nt + tid;
            const bool second = i + nt < n, first = i < n;
            if constexpr (BULK) {
                ring_wait<STAGES, BULK>(&full[slot], parity);
                if ((2 * trips + 1) * nt < n) {
                    const int sb = slot + 1 == STAGES ? 0 : slot + 1;
                    ring_wait<STAGES, BULK>(&full[sb], sb == 0 ? parity ^ 1u : parity);
                }
            } else {
                infopo_cp_async_wait<0>();
            }
            if (second) {
                const int sb = slot + 1 == STAGES ? 0 : slot + 1;
                const uint4 x0 = ring[slot][0][tid], y0 = ring[slot][1][tid];
                const uint4 x1 = ring[sb][0][tid], y1 = ring[sb][1][tid];
                float x[2 * E], y[2 * E];
                unpack_vec<T>(x0, x);
                unpack_vec<T>(x1, x + E);
                unpack_vec<T>(y0, y);
                unpack_vec<T>(y1, y + E);
                state_update<2 * E>(s, x, y, scale);
            } else if (first) {
                const uint4 x0 = ring[slot][0][tid], y0 = ring[slot][1][tid];
                float x[E], y[E];
                unpack_vec<T>(x0, x);
                unpack_vec<T>(y0, y);
                state_update<E>(s, x, y, scale);
            }
        }
        if constexpr (BULK) {
            __syncthreads(); // every stage was waited for and read: the slots and mbarriers are free
            if (tid == 0)
                for (int k = 0; k < STAGES; ++k) infopo_mbar_inval(&full[k]);
        }
    }
    if (split == S - 1 && tid < V_ - tail0) update_scalar<T>(s, xr, yr, tail0 + tid, scale);
}

// The ring for this arch (see above); the emulator runs both paths.
template <typename T>
__device__ __forceinline__ void row_vectors_ring_arch(RowState &s, const T *__restrict__ xr, const T *__restrict__ yr,
                                                      int64_t V_, int64_t S, int64_t split, float scale) {
#if defined(INFOPO_EMULATOR)
    if ((blockIdx.x & 1u) == 0u)
        row_vectors_ring<T, 4, true>(s, xr, yr, V_, S, split, scale);
    else
        row_vectors_ring<T, 3, false>(s, xr, yr, V_, S, split, scale);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    row_vectors_ring<T, 4, true>(s, xr, yr, V_, S, split, scale);
#elif __CUDA_ARCH__ == 800
    row_vectors_ring<T, 4, false>(s, xr, yr, V_, S, split, scale);
#else
    row_vectors_ring<T, 3, false>(s, xr, yr, V_, S, split, scale);
#endif
}
