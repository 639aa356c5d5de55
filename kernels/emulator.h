// emulator.h: just enough of CUDA to compile kernels/*.cu unchanged as host C++20 (g++/clang),
// so the kernel source itself is tested without a GPU (cargo feature `emulator`).
//
// Model:
//  * one OS thread per CUDA thread; a launch creates blockDim.x threads which run the blocks
//    0..gridDim.x-1 in turn (a block barrier after each block), so one block runs at a time;
//  * __shared__ is `static`: one copy per kernel instantiation, valid because one block runs at
//    a time and launches are serialised by a global mutex (cargo runs tests in parallel);
//  * __syncthreads / __syncwarp are blocking std::barrier waits (no spinning);
//  * __shfl_xor_sync(mask, v, m): each lane writes v to its slot of a per-warp exchange buffer,
//    one warp barrier, reads lane ^ m's slot. Two buffers alternate, so one barrier per shuffle
//    suffices (a lane can only overwrite a buffer after every lane passed the next barrier).
//    All 32 lanes of the warp must call it (the kernels only shuffle warp-uniformly). Any
//    trivially copyable value up to 64 bytes can be exchanged at once: the kernels use that
//    (under INFOPO_EMULATOR) to move a whole reduction state with one barrier instead of one
//    per 32-bit word, the only emulator-specific code in the kernel source;
//  * atomics are std::atomic_ref, __threadfence is a seq_cst fence, __ldcg a plain load;
//  * __half / __nv_bfloat16 are 16-bit storage types with exact conversions to float;
//  * math (exp2f, log2f, fmaf, ...) is the host libm: results agree with the GPU to rounding,
//    not bit for bit; each build is bitwise deterministic on its own.
// Not emulated: warp divergence semantics beyond the above, memory-model races between blocks
// (blocks are serial), launch bounds, the read-only cache.
#ifndef INFOPO_EMULATOR_H
#define INFOPO_EMULATOR_H
#define INFOPO_EMULATOR 1

#include <atomic>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace infopo_emu {

struct Launch {
    explicit Launch(unsigned threads)
        : block(threads), warps(threads / 32) {
        for (unsigned w = 0; w < warps; ++w) warp.emplace_back(std::make_unique<std::barrier<>>(32));
        for (auto &b : shfl) b.assign(threads, Slot{});
    }
    std::barrier<> block;
    unsigned warps;
    std::vector<std::unique_ptr<std::barrier<>>> warp;
    struct Slot {
        alignas(16) unsigned char bytes[64];
    };
    std::vector<Slot> shfl[2];
};

inline Launch *current = nullptr;
inline thread_local unsigned shfl_phase = 0;

inline std::mutex &launch_mutex() {
    static std::mutex m;
    return m;
}

// Runs body() as a grid of `grid` blocks of `threads` threads (a multiple of 32).
template <class F>
void launch(unsigned grid, unsigned threads, F &&body) {
    std::lock_guard<std::mutex> lock(launch_mutex());
    Launch l(threads);
    current = &l;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{threads, 1, 1};
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&l, &body, t, grid] {
            threadIdx = dim3{t, 0, 0};
            shfl_phase = 0;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = dim3{b, 0, 0};
                body();
                l.block.arrive_and_wait(); // the next block starts when this one has finished
            }
        });
    }
    for (auto &th : pool) th.join();
    current = nullptr;
}

} // namespace infopo_emu

inline void __syncthreads() { infopo_emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { infopo_emu::current->warp[threadIdx.x >> 5]->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    static_assert(sizeof(T) <= 64 && std::is_trivially_copyable_v<T>, "shuffle of a trivially copyable value of at most 64 bytes");
    infopo_emu::Launch &l = *infopo_emu::current;
    const unsigned tid = threadIdx.x, base = tid & ~31u, lane = tid & 31u;
    std::vector<infopo_emu::Launch::Slot> &buf = l.shfl[infopo_emu::shfl_phase];
    std::memcpy(buf[tid].bytes, &v, sizeof(T));
    l.warp[tid >> 5]->arrive_and_wait();
    T r;
    std::memcpy(&r, buf[base + (lane ^ ((unsigned)lane_mask & 31u))].bytes, sizeof(T));
    infopo_emu::shfl_phase ^= 1u;
    return r;
}

inline unsigned atomicAdd(unsigned *p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T __ldcg(const T *p) { return *p; }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }

// IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
inline float __half2float(__half h) {
    const unsigned sign = (unsigned)(h.x & 0x8000u) << 16;
    const unsigned exp = (h.x >> 10) & 0x1fu;
    unsigned mant = h.x & 0x3ffu;
    unsigned bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { // subnormal: normalise
        int e = -1;
        do {
            ++e;
            mant <<= 1;
        } while ((mant & 0x400u) == 0);
        bits = sign | ((unsigned)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
    return __uint_as_float(bits);
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }

#endif
