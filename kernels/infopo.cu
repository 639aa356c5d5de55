// The fused InfoPO kernel: ONE launch computes every row of docs/contract.md §2 (split over
// blocks when rows are few), the per-turn means of §3 and, on the last launch of a batch, the
// group/trajectory/batch epilogue of §4. Compiled by nvcc (feature `cuda`) or, unchanged, as
// host C++ against kernels/emulator.h (feature `emulator`).
//
// Grid: work items item = row * splits + split, item = blockIdx.x, blockIdx.x + gridDim.x, ...
// (grid = rows * splits normally; the loop only matters above 2^31 - 1 items).
// Block: blockDim.x threads, a multiple of 32, at most 256.
//
// Partial-state mode (state_out != NULL, src/partial.rs): the same row pass over a vocabulary
// range of every row (rows row_stride apart), writing each row's state instead of its values.
//
// Merge mode (entry point infopo_merge, any logit dtype): no logits; each row's state is the
// fold of P partial-state outputs (ranges tiling the vocabulary, e.g. all-gathered shards or the
// chunks of the fused hidden-state path), then the same finalisation, turns and epilogue.
//
// Determinism: every reduction has a fixed shape given (n_rows, vocab, splits, blockDim,
// row alignment); no float atomics; split partials are merged in split order by the block
// that draws the last ticket of the row; the epilogue runs in one block in fixed orders.
#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#else
#include "emulator.h"
#endif
#include <cfloat>
#include <stdint.h>

#include "args.h"
#include "state.cuh"

#define INFOPO_MAX_THREADS 256
// 3 resident blocks of 256 threads per SM: a budget of 85 registers (65536 / 768); ptxas uses 76
// (bf16), 79 (f16) and 72 (f32) on sm_90, at most 79 on sm_80..89 (scripts/kernel-report), no
// spills;
// 768 threads x 4 x 16-byte loads keep ~48 KiB in flight per SM.
#define INFOPO_MIN_BLOCKS 3

// ---------------------------------------------------------------------------------------------
// Element types: how 32-bit words of a vector unpack into f32, and the scalar conversion.

template <typename T> struct Elem;

template <> struct Elem<float> {
    static __device__ __forceinline__ float load(const float *p) { return *p; }
    template <int N> static __device__ __forceinline__ void unpack(const unsigned (&w)[N], float *o) {
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = __uint_as_float(w[i]);
    }
};

__device__ __forceinline__ float half_lo(unsigned w) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float half_hi(unsigned w) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }

template <> struct Elem<__half> {
    static __device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
    template <int N> static __device__ __forceinline__ void unpack(const unsigned (&w)[N], float *o) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            o[2 * i] = half_lo(w[i]);
            o[2 * i + 1] = half_hi(w[i]);
        }
    }
};

// bf16 -> f32 is a 16-bit shift: no conversion instruction needed.
template <> struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
    template <int N> static __device__ __forceinline__ void unpack(const unsigned (&w)[N], float *o) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            o[2 * i] = __uint_as_float(w[i] << 16);
            o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};

// Vector loads: 16 bytes when real and masked rows share their offset mod 16, else 8 or 4 bytes
// when they share it mod 8 or mod 4 (e.g. the two halves of one [2N, V] tensor with N·V odd
// rows apart), as 32-bit words.
struct alignas(8) Vec8 {
    unsigned x, y;
};

template <typename V> struct Words;
template <> struct Words<uint4> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void get(const uint4 &v, unsigned (&w)[4]) { w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; }
};
template <> struct Words<Vec8> {
    static constexpr int N = 2;
    static __device__ __forceinline__ void get(const Vec8 &v, unsigned (&w)[2]) { w[0] = v.x; w[1] = v.y; }
};
template <> struct Words<unsigned> {
    static constexpr int N = 1;
    static __device__ __forceinline__ void get(const unsigned &v, unsigned (&w)[1]) { w[0] = v; }
};

template <typename T, typename V>
__device__ __forceinline__ void unpack_vec(const V &v, float *o) {
    unsigned w[Words<V>::N];
    Words<V>::get(v, w);
    Elem<T>::unpack(w, o);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ void update_scalar(RowState &s, const T *xr, const T *yr, int64_t j, float scale) {
    const float x[1] = {Elem<T>::load(xr + j)};
    const float y[1] = {Elem<T>::load(yr + j)};
    state_update<1>(s, x, y, scale);
}

// This thread's part of chunk `split` of row pair (xr, yr) by vectors of type V, given that both
// rows have the same offset modulo sizeof(V): a scalar head up to the vector boundary
// (split 0), the vectors split into `splits` contiguous ranges, a scalar tail (last split).
// Threads stride the vectors (coalesced) two at a time, so four vector loads are in flight
// per thread.
template <typename T, typename V>
__device__ __forceinline__ void row_vectors(RowState &s, const T *__restrict__ xr, const T *__restrict__ yr,
                                            int64_t V_, int64_t S, int64_t split, float scale) {
    constexpr int E = (int)(sizeof(V) / sizeof(T)); // elements per vector
    const int64_t tid = threadIdx.x, nt = blockDim.x;
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
    for (; i + nt < v1; i += 2 * nt) {
        const V x0 = xv[i], x1 = xv[i + nt], y0 = yv[i], y1 = yv[i + nt];
        float x[2 * E], y[2 * E];
        unpack_vec<T>(x0, x);
        unpack_vec<T>(x1, x + E);
        unpack_vec<T>(y0, y);
        unpack_vec<T>(y1, y + E);
        state_update<2 * E>(s, x, y, scale);
    }
    if (i < v1) {
        const V x0 = xv[i], y0 = yv[i];
        float x[E], y[E];
        unpack_vec<T>(x0, x);
        unpack_vec<T>(y0, y);
        state_update<E>(s, x, y, scale);
    }
    if (split == S - 1 && tid < V_ - tail0) update_scalar<T>(s, xr, yr, tail0 + tid, scale);
}

#include "variants.cuh" // the row pass's variants (args.variant), built on row_vectors' pieces

// This thread's state over its part of chunk `split` of row `row`: 16-, 8- or 4-byte vectors
// (row_vectors) by the largest alignment the real and masked rows share; 2-byte scalar loads
// over contiguous element ranges (still coalesced) only when f16/bf16 rows differ mod 4.
template <typename T, unsigned VARIANT>
__device__ __forceinline__ RowState row_chunk(const InfopoArgs &a, int64_t row, int64_t split) {
    const int64_t V = a.vocab, S = a.splits;
    const float scale = a.scale;
    const int64_t stride = a.row_stride ? a.row_stride : V; // partial-state mode: a column range
    const T *__restrict__ xr = static_cast<const T *>(a.real) + row * stride;
    const T *__restrict__ yr = static_cast<const T *>(a.masked) + row * stride;
    RowState s = state_empty();

    const unsigned d = (unsigned)(((uintptr_t)xr ^ (uintptr_t)yr) & 15u);
    if (d == 0u) {
        if constexpr (VARIANT == INFOPO_VARIANT_RING)
            row_vectors_ring_arch<T>(s, xr, yr, V, S, split, scale);
        else if (!row_vectors_variant<T>(VARIANT, s, xr, yr, V, S, split, scale))
            row_vectors<T, uint4>(s, xr, yr, V, S, split, scale);
    } else if ((d & 7u) == 0u) {
        row_vectors<T, Vec8>(s, xr, yr, V, S, split, scale);
    } else if (sizeof(T) < 4 && (d & 3u) == 0u) {
        row_vectors<T, unsigned>(s, xr, yr, V, S, split, scale);
    } else {
        const int64_t tid = threadIdx.x, nt = blockDim.x;
        const int64_t per = (V + S - 1) / S;
        const int64_t e0 = min64(split * per, V), e1 = min64(e0 + per, V);
        for (int64_t j = e0 + tid; j < e1; j += nt) update_scalar<T>(s, xr, yr, j, scale);
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// Epilogue (float64, one block, fixed orders).

struct Moments {
    double n, mean, m2; // weight, mean, Σ w (v − mean)²
};

__device__ __forceinline__ Moments moments_empty() {
    Moments m;
    m.n = 0.0;
    m.mean = 0.0;
    m.m2 = 0.0;
    return m;
}

__device__ __forceinline__ Moments moments_one(double w, double v) {
    Moments m;
    m.n = w;
    m.mean = v;
    m.m2 = 0.0;
    return m;
}

// Chan et al. pairwise merge; `a` is the left (earlier) operand.
__device__ __forceinline__ Moments moments_merge(const Moments &a, const Moments &b) {
    if (b.n == 0.0) return a;
    if (a.n == 0.0) return b;
    Moments r;
    r.n = a.n + b.n;
    const double d = b.mean - a.mean;
    r.mean = a.mean + d * (b.n / r.n);
    r.m2 = a.m2 + b.m2 + d * d * (a.n * (b.n / r.n));
    return r;
}

// Ordered butterfly: at each step the lower lane's value is the left operand, so both partners
// compute the same merge and every lane ends with the same bits. Lane-strided inputs
// (lane l holds items l, l+32, ...) thus always reduce in one fixed order.
__device__ __forceinline__ Moments moments_warp(Moments m) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int k = 16; k >= 1; k >>= 1) {
#ifdef INFOPO_EMULATOR
        const Moments o = __shfl_xor_sync(0xffffffffu, m, k); // one exchange (see state_shfl_xor)
#else
        Moments o;
        o.n = __shfl_xor_sync(0xffffffffu, m.n, k);
        o.mean = __shfl_xor_sync(0xffffffffu, m.mean, k);
        o.m2 = __shfl_xor_sync(0xffffffffu, m.m2, k);
#endif
        // Operands swapped with scalar selects (one inlined merge, no local-memory struct copy).
        const bool upper = (lane & (unsigned)k) != 0u;
        Moments l, r;
        l.n = upper ? o.n : m.n;
        l.mean = upper ? o.mean : m.mean;
        l.m2 = upper ? o.m2 : m.m2;
        r.n = upper ? m.n : o.n;
        r.mean = upper ? m.mean : o.mean;
        r.m2 = upper ? m.m2 : o.m2;
        m = moments_merge(l, r);
    }
    return m;
}

__device__ __forceinline__ double sum_warp(double v) {
#pragma unroll
    for (int k = 16; k >= 1; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
    return v;
}

// Block-wide moments: every thread calls it; the result is returned to every thread.
__device__ __forceinline__ Moments moments_block(Moments m, Moments *scratch) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    m = moments_warp(m);
    if (lane == 0) scratch[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? scratch[lane] : moments_empty();
        m = moments_warp(m);
        if (lane == 0) scratch[32] = m;
    }
    __syncthreads();
    m = scratch[32];
    __syncthreads();
    return m;
}

// Trajectory i's token advantage outside its credited spans: advantage_i (intrinsic only: 0).
__device__ __forceinline__ double token_base(const InfopoArgs &a, int64_t i) {
    return a.intrinsic_only ? 0.0 : a.traj_advantage[i];
}

// Trajectory i's tokens in both token outputs, by the block's threads: token_base on each of
// them, and 0 on the padding of its [B, L] row (when asked for). Strided over the block:
// coalesced.
__device__ __forceinline__ void fill_tokens(const InfopoArgs &a, int64_t i) {
    const double adv = token_base(a, i);
    const int64_t k0 = (int64_t)a.trajectory_token_offsets[i], n = (int64_t)a.trajectory_token_offsets[i + 1] - k0;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) a.token_advantage[k0 + k] = adv;
    if (a.padded_advantage == nullptr) return;
    const int64_t o = a.pad_offset[i];
    double *row = a.padded_advantage + i * a.pad_width;
    for (int64_t p = threadIdx.x; p < a.pad_width; p += blockDim.x) row[p] = (p >= o && p < o + n) ? adv : 0.0;
}

// Turn t's credited span in both token outputs, by one warp: token_base + bonus_t. Spans are
// disjoint (validated on the host); a fill of the trajectory must have happened before (barrier).
__device__ __forceinline__ void write_span(const InfopoArgs &a, int64_t t, unsigned lane) {
    const uint32_t i = a.turn_trajectory[t];
    const int64_t start = a.turn_credit_start[t], n = a.turn_credit[t];
    const double v = token_base(a, i) + a.turn_bonus[t];
    double *m = a.token_advantage + (int64_t)a.trajectory_token_offsets[i] + start;
    for (int64_t k = lane; k < n; k += 32) m[k] = v;
    if (a.padded_advantage == nullptr) return;
    double *p = a.padded_advantage + (int64_t)i * a.pad_width + a.pad_offset[i] + start;
    for (int64_t k = lane; k < n; k += 32) p[k] = v;
}

__device__ __forceinline__ void epilogue(const InfopoArgs &a, Moments *scratch) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int64_t T = a.n_turns, lo_row = a.first_row, hi_row = a.first_row + a.n_rows;
    const float *est = a.row_out + (a.estimator ? 3 : 2) * a.n_rows;
    const bool groups = a.finalize && a.n_traj > 0;

    // (a) Per turn: this launch's rows of the turn, added to the carried sums.
    for (int64_t t = warp; t < T; t += warps) {
        const int64_t lo = max64((int64_t)a.turn_offsets[t], lo_row) - lo_row;
        const int64_t hi = max64(min64((int64_t)a.turn_offsets[t + 1], hi_row) - lo_row, lo);
        double s = 0.0;
        for (int64_t r = lo + lane; r < hi; r += 32) s += (double)__ldcg(est + r);
        s = sum_warp(s);
        if (lane == 0) {
            const double sum = a.turn_sum[t] + s;
            const double cnt = a.turn_count[t] + (double)(hi - lo);
            a.turn_sum[t] = sum;
            a.turn_count[t] = cnt;
            const double info = cnt > 0.0 ? sum / cnt : 0.0;
            a.turn_info[t] = info;
            if (groups) a.turn_intrinsic[t] = info / (double)a.turn_credit[t];
        }
    }
    if (!groups) return;
    __syncthreads();

    // (b) Per group (a warp each): outcome moments, advantages, gates; intrinsic pool, norms.
    for (int64_t g = warp; g < a.n_groups; g += warps) {
        const int64_t b0 = a.group_trajectory_offsets[g], b1 = a.group_trajectory_offsets[g + 1];
        Moments m = moments_empty();
        for (int64_t j = b0 + lane; j < b1; j += 32)
            m = moments_merge(m, moments_one(1.0, a.trajectory_outcome[a.group_trajectories[j]]));
        m = moments_warp(m);
        const bool single = m.n == 1.0;
        const double mu = single ? 0.0 : m.mean;
        const double sigma = single ? 1.0 : sqrt(m.m2 / (m.n - 1.0));

        const int64_t t0 = a.group_turn_offsets[g], t1 = a.group_turn_offsets[g + 1];
        Moments p = moments_empty();
        for (int64_t j = t0 + lane; j < t1; j += 32) {
            const uint32_t t = a.group_turns[j];
            const double v = a.turn_intrinsic[t];
            if (fabs(v) > a.pool_tolerance) p = moments_merge(p, moments_one((double)a.turn_credit[t], v));
        }
        p = moments_warp(p);
        const bool psingle = p.n == 1.0;
        const double pmu = p.mean;
        const double psigma = psingle ? 1.0 : sqrt(p.m2 / (p.n - 1.0));
        for (int64_t j = t0 + lane; j < t1; j += 32) {
            const uint32_t t = a.group_turns[j];
            const double v = a.turn_intrinsic[t];
            const double centred = v - pmu;
            const double norm = a.centre_only ? centred : centred / (psigma + a.eps);
            a.turn_norm[t] = a.normalize ? (fabs(v) > a.pool_tolerance ? norm : 0.0) : v;
        }

        // The gate's σ_g: the outcomes' std, or the intrinsic pool's (0 below 2 tokens).
        const double gate_sigma = a.gate_source ? (p.n < 2.0 ? 0.0 : sqrt(fmax(p.m2 / (p.n - 1.0), 0.0))) : sigma;
        const double gate = 1.0 / (1.0 + exp(gate_sigma / a.gate_temperature));
        for (int64_t j = b0 + lane; j < b1; j += 32) {
            const uint32_t i = a.group_trajectories[j];
            const double centred = a.trajectory_outcome[i] - mu;
            a.traj_advantage[i] = a.centre_only ? centred : centred / (sigma + a.eps);
            a.traj_gate[i] = gate;
        }
    }
    __syncthreads();

    // (c) Batch statistics over the M response tokens.
    Moments o = moments_empty();
    for (int64_t i = threadIdx.x; i < a.n_traj; i += blockDim.x)
        o = moments_merge(o, moments_one((double)a.trajectory_tokens[i], a.traj_advantage[i]));
    o = moments_block(o, scratch);
    Moments q = moments_empty();
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
        q = moments_merge(q, moments_one((double)a.turn_credit[t], a.turn_norm[t]));
    q = moments_block(q, scratch);
    q = moments_merge(q, moments_one(a.total_tokens - q.n, 0.0)); // uncredited tokens carry 0
    const double outcome_std = sqrt(o.m2 / (o.n - 1.0)) + a.eps;
    const double intrinsic_std = sqrt(q.m2 / (q.n - 1.0)) + a.eps;
    const double ratio = fmin(1.0, fmax(outcome_std, 1.0) / intrinsic_std);
    if (threadIdx.x == 0) {
        a.scalars[0] = outcome_std;
        a.scalars[1] = intrinsic_std;
        a.scalars[2] = ratio;
    }
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
        a.turn_bonus[t] = a.intrinsic_only ? ratio * a.turn_norm[t]
                                           : a.beta * a.traj_gate[a.turn_trajectory[t]] * ratio * a.turn_norm[t];
    // The spread variant leaves (d) to infopo_tokens, launched next on the stream by the host.
    if (a.token_advantage == nullptr || a.variant == INFOPO_VARIANT_SPREAD) return;
    __syncthreads();

    // (d) Per-token advantages, on the device for the loss ([M], and [B, L] when asked for):
    // every token of trajectory i gets advantage_i, then each credited span is overwritten by
    // advantage_i + bonus_t, a warp per turn. Both are the f64 values the CPU writes.
    for (int64_t i = 0; i < a.n_traj; ++i) fill_tokens(a, i);
    __syncthreads();
    for (int64_t t = warp; t < T; t += warps) write_span(a, t, lane);
}

// (d) spread over the grid (variant SPREAD): one block per trajectory, in group order, so that
// M tokens are written by every SM rather than by the one block that ran the epilogue (M is
// every agent token of the batch, often far more than the rows of a small final launch). The
// block fills trajectory i's tokens with advantage_i, then overwrites the credited spans of
// i's turns, found among its group's turns; the values are (d)'s, bit for bit. The epilogue's
// launch has finished (stream order): its traj_advantage and turn_bonus are final.
__device__ __forceinline__ void token_advantages_spread(const InfopoArgs &a) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t j = blockIdx.x; j < a.n_traj; j += gridDim.x) {
        int64_t g = 0, hi = a.n_groups; // the group holding member j: offsets[g] <= j < offsets[g + 1]
        while (hi - g > 1) {
            const int64_t mid = (g + hi) / 2;
            if ((int64_t)a.group_trajectory_offsets[mid] <= j) g = mid; else hi = mid;
        }
        const uint32_t i = a.group_trajectories[j];
        fill_tokens(a, i);
        __syncthreads(); // the fill before the spans' overwrites (same block: ordered by the barrier)
        for (int64_t u = a.group_turn_offsets[g] + warp; u < (int64_t)a.group_turn_offsets[g + 1]; u += warps) {
            const uint32_t t = a.group_turns[u];
            if (a.turn_trajectory[t] == i) write_span(a, t, lane);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Partial-state mode: the complete state of a row over this launch's vocabulary range, and the
// raw target logits when the target falls in the range (NaN otherwise: the host merge, which
// knows every range, reads them from the range that holds the target and decides row errors).

template <typename T>
__device__ __forceinline__ void write_range_state(const InfopoArgs &a, int64_t row, const RowState &s) {
    const int64_t stride = a.row_stride ? a.row_stride : a.vocab;
    const int64_t col = a.targets[row] - a.vocab_start;
    const bool here = col >= 0 && col < a.vocab;
    const float nan = __uint_as_float(0x7fc00000u);
    const float xa = here ? Elem<T>::load(static_cast<const T *>(a.real) + row * stride + col) : nan;
    const float ya = here ? Elem<T>::load(static_cast<const T *>(a.masked) + row * stride + col) : nan;
    float *o = a.state_out + row * INFOPO_RANGE_STATE_FLOATS;
    o[0] = s.max_real; o[1] = s.sum_real; o[2] = s.max_masked; o[3] = s.sum_masked;
    o[4] = s.sum_diff; o[5] = s.sum_centered; o[6] = xa; o[7] = ya;
}

// ---------------------------------------------------------------------------------------------
// Merge mode (entry point infopo_merge): row `row`'s state over the whole vocabulary, folded
// from the states of the P ranges in part order 0, 1, ..., P-1 (one thread, a fixed order: the
// same bits wherever and in whatever order the parts were computed), with the split merge's
// state_merge, so a fill, an empty range or a gap (sticky +inf sum_diff) merges as it does
// inside one launch. Folding from the empty state gives part 0 bit for bit (state_merge with
// the empty state is exact), so P = 1 reproduces the unsplit launch's row. The raw target
// logits come from the part whose range holds the target: the only one whose x_a / y_a are not
// NaN. A NaN target logit itself is no exception: it made its side's sum NaN, code 2 or 3,
// which outranks every target code in state_finalize.

__device__ __forceinline__ RowState merged_row_state(const InfopoArgs &a, int64_t row, float &xa, float &ya) {
    xa = ya = __uint_as_float(0x7fc00000u);
    RowState s = state_empty();
    const int64_t part_stride = a.n_rows * INFOPO_RANGE_STATE_FLOATS;
    const float *p = a.merge_states + row * INFOPO_RANGE_STATE_FLOATS;
    for (int64_t k = 0; k < a.merge_parts; ++k, p += part_stride) {
        RowState q;
        q.max_real = p[0]; q.sum_real = p[1]; q.max_masked = p[2];
        q.sum_masked = p[3]; q.sum_diff = p[4]; q.sum_centered = p[5];
        s = state_merge(s, q, a.scale);
        const float px = p[6], py = p[7];
        if (px == px) xa = px; // not NaN: this part's range holds the target
        if (py == py) ya = py;
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// The kernel. MERGE = false: the logit entry points (rows from logits, or partial-state mode);
// MERGE = true: infopo_merge (rows from range states). Everything after a row's state is
// shared: finalisation, the error word, the turn sums and the epilogue with its tickets.

template <typename T, bool MERGE, unsigned VARIANT = INFOPO_VARIANT_BASELINE>
__device__ __forceinline__ void infopo_body(const InfopoArgs &a) {
    __shared__ RowState red[32];
    __shared__ Moments mscratch[33];
    __shared__ unsigned row_flag, grid_flag;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;

    // An epilogue-only launch (a final micro-batch with no rows) runs it in block 0; otherwise
    // the block that finalises the last row does, after its loop (it has no items left then:
    // every row, hence every item, is done). One call site keeps the code inlined once.
    // Partial-state mode never runs it (it has no turns; the host ensures n_turns == 0).
    bool run_epilogue = a.n_rows == 0 && blockIdx.x == 0 && a.n_turns > 0 && (MERGE || a.state_out == nullptr);
    const int64_t S = MERGE ? 1 : a.splits; // merge mode: one block per row
    const int64_t items = a.n_rows * S;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const int64_t row = item / S;
        RowState s;
        float xa, ya; // the raw target logits (merge mode: from the states)
        bool row_done = true;
        if constexpr (MERGE) {
            if (threadIdx.x == 0) s = merged_row_state(a, row, xa, ya); // valid in thread 0
        } else {
            const int64_t split = item - row * S;
            s = row_chunk<T, VARIANT>(a, row, split);
            s = state_block_merge(s, red, a.scale); // valid in warp 0

            if (S > 1) {
                if (threadIdx.x == 0) {
                    float *p = a.partials + item * INFOPO_STATE_FLOATS;
                    p[0] = s.max_real; p[1] = s.sum_real; p[2] = s.max_masked;
                    p[3] = s.sum_masked; p[4] = s.sum_diff; p[5] = s.sum_centered;
                    __threadfence(); // release: this split's partial before its ticket
                    // Wraps to 0 on the last ticket: self-cleaning inside the atomic, so no plain
                    // store ever touches a ticket another block may still be incrementing.
                    const unsigned ticket = atomicInc(a.row_tickets + row, (unsigned)(S - 1));
                    row_flag = ticket == (unsigned)(S - 1);
                    // Acquire, in the thread that drew the last ticket, before the barrier that
                    // hands the row to warp 0: every split's partial is visible to the block.
                    if (row_flag) __threadfence();
                }
                __syncthreads();
                row_done = row_flag != 0u;
                if (row_done && warp == 0) {
                    // Lane l folds splits l, l+32, ... then an ordered butterfly: fixed split order.
                    const float *base = a.partials + row * S * INFOPO_STATE_FLOATS;
                    RowState m = state_empty();
                    for (int64_t k = lane; k < S; k += 32) {
                        const float *p = base + k * INFOPO_STATE_FLOATS;
                        RowState q;
                        q.max_real = __ldcg(p + 0); q.sum_real = __ldcg(p + 1); q.max_masked = __ldcg(p + 2);
                        q.sum_masked = __ldcg(p + 3); q.sum_diff = __ldcg(p + 4); q.sum_centered = __ldcg(p + 5);
                        m = state_merge(m, q, a.scale);
                    }
                    s = state_warp_merge(m, a.scale);
                }
            }

            if (a.state_out != nullptr) { // partial-state mode: the row's state, not its values
                if (row_done && threadIdx.x == 0) write_range_state<T>(a, row, s);
                continue; // no turns in this mode (the host ensures n_turns == 0)
            }
        } // !MERGE

        if (row_done && threadIdx.x == 0) {
            const int64_t V = a.vocab;
            const int64_t target = a.targets[row];
            unsigned code;
            RowValues v;
            if (target < 0 || target >= V) {
                code = INFOPO_ERR_TARGET_OUT_OF_RANGE;
                v.lse_real = v.lse_masked = v.log_ratio = v.kl = v.entropy_real = __uint_as_float(0x7fc00000u);
            } else {
                if constexpr (!MERGE) {
                    // Rows are `stride` apart, as row_chunk reads them.
                    const int64_t stride = a.row_stride ? a.row_stride : V;
                    xa = Elem<T>::load(static_cast<const T *>(a.real) + row * stride + target);
                    ya = Elem<T>::load(static_cast<const T *>(a.masked) + row * stride + target);
                }
                code = state_finalize(s, xa, ya, a.scale, v);
                // With trajectories, a non-finite estimator (kl = +inf) would make the turn's
                // info, and every bonus of the batch, NaN: report it (after any row error).
                const float est = a.estimator ? v.kl : v.log_ratio;
                if (code == 0u && a.n_turns > 0 && a.n_traj > 0 && !(fabsf(est) < INFINITY))
                    code = INFOPO_ERR_ESTIMATOR_NOT_FINITE;
            }
            const int64_t n = a.n_rows;
            a.row_out[0 * n + row] = v.lse_real;
            a.row_out[1 * n + row] = v.lse_masked;
            a.row_out[2 * n + row] = v.log_ratio;
            a.row_out[3 * n + row] = v.kl;
            a.row_out[4 * n + row] = v.entropy_real;
            if (code) atomicMax(a.error_word, ~infopo_error_key(a.first_row + row, code));
        }

        if (a.n_turns > 0) {
            if (threadIdx.x == 0) {
                unsigned last = 0u;
                if (row_done) {
                    __threadfence(); // release: this row's outputs before its ticket
                    const unsigned ticket = atomicInc(a.grid_ticket, (unsigned)(a.n_rows - 1)); // self-cleaning
                    last = ticket == (unsigned)(a.n_rows - 1);
                    // Acquire: every row's outputs, for the epilogue after the barrier.
                    if (last) __threadfence();
                }
                grid_flag = last;
            }
            __syncthreads();
            if (grid_flag) run_epilogue = true;
        }
    }
    if (run_epilogue) epilogue(a, mscratch); // ordered by the grid ticket's acquire fence
}

extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_f32(const InfopoArgs a) { infopo_body<float, false>(a); }
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_f16(const InfopoArgs a) { infopo_body<__half, false>(a); }
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_bf16(const InfopoArgs a) { infopo_body<__nv_bfloat16, false>(a); }
// Variants of the bf16 row pass (kernels/variants.cuh), one entry each so that each is allocated
// on its own (a dispatch inside one kernel spilled: registers are the maximum over every path).
// The host launches the one its variant names (src/launch.rs::entry_point).
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_bf16_packed(const InfopoArgs a) { infopo_body<__nv_bfloat16, false, INFOPO_VARIANT_PACKED>(a); }
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_bf16_packed_bump(const InfopoArgs a) { infopo_body<__nv_bfloat16, false, INFOPO_VARIANT_PACKED_BUMP>(a); }
// The ring variant (kernels/variants.cuh, end): every dtype, shared memory of its own.
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_f32_ring(const InfopoArgs a) { infopo_body<float, false, INFOPO_VARIANT_RING>(a); }
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_f16_ring(const InfopoArgs a) { infopo_body<__half, false, INFOPO_VARIANT_RING>(a); }
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_bf16_ring(const InfopoArgs a) { infopo_body<__nv_bfloat16, false, INFOPO_VARIANT_RING>(a); }
// Merge mode: one entry for every logit dtype (the range states are f32).
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS, INFOPO_MIN_BLOCKS) infopo_merge(const InfopoArgs a) { infopo_body<float, true>(a); }
// The spread variant's second launch (token_advantages_spread): every dtype and mode, after the
// launch that ran the epilogue, with its args.
extern "C" __global__ void __launch_bounds__(INFOPO_MAX_THREADS) infopo_tokens(const InfopoArgs a) { token_advantages_spread(a); }
