// emulator.h: just enough of CUDA to compile kernels/*.cu unchanged as host C++20 (g++/clang),
// so the kernel source itself is tested without a GPU (cargo feature `emulator`).
//
// Model:
//  * one OS thread per CUDA thread. A launch runs `blocks_at_once` blocks at a time (1 = the
//    serial mode, the default: blocks 0, 1, 2, ... in turn). Each running block is a team of
//    blockDim.x threads with its own barriers and shuffle buffers; the team's thread 0 draws
//    the next block index from a relaxed counter when the team's previous block is done, as a
//    GPU hands blocks to SMs that free up. The draw is relaxed on purpose: the scheduler must
//    add no happens-before edge between blocks, so only the kernel's own fences and atomics
//    order them (what ThreadSanitizer then checks, see below);
//  * __shared__ is `static`, and kernels/emulator.cpp compiles kernels/infopo.cu once per
//    team (INFOPO_EMU_MAX_BLOCKS_AT_ONCE copies, each in its own namespace): a function-local
//    static of copy k is the shared memory of whatever block team k runs, so blocks running at
//    once never share `__shared__` storage, and the kernel source stays unchanged. Launches
//    are serialised by a global mutex (cargo runs tests in parallel);
//  * concurrent mode (blocks_at_once > 1) yields at random (seeded per launch and thread) at
//    barriers, atomics and fences: std::this_thread::yield() often, a sleep of up to 50 µs
//    rarely, so the blocks' interleaving changes from run to run;
//  * __syncthreads / __syncwarp are blocking waits on a team's own barrier (futex or condition
//    variable; no spinning, and no state shared with other teams);
//  * __shfl_xor_sync(mask, v, m): each lane writes v to its slot of a per-warp exchange buffer,
//    one warp barrier, reads lane ^ m's slot. Two buffers alternate, so one barrier per shuffle
//    suffices (a lane can only overwrite a buffer after every lane passed the next barrier).
//    All 32 lanes of the warp must call it (the kernels only shuffle warp-uniformly). Any
//    trivially copyable value up to 64 bytes can be exchanged at once: the kernels use that
//    (under INFOPO_EMULATOR) to move a whole reduction state with one barrier instead of one
//    per 32-bit word, the only emulator-specific code in the kernel source;
//  * memory model. GPU atomics are relaxed, so atomicInc / atomicMax are relaxed
//    std::atomic_ref operations, and __ldcg is a plain load. __threadfence is a seq_cst
//    std::atomic_thread_fence (which, with the relaxed ticket atomics, is what orders the
//    blocks in the C++ model) AND an acq_rel read-modify-write of one global sync object,
//    `fence_sync`: ThreadSanitizer ignores standalone fences, but it does model that RMW, so
//    a fence acquires everything released by every fence executed before it (in real time).
//    What ThreadSanitizer can then report: a block reading another block's partials or row
//    outputs with no fence after its ticket (acquire missing), a writer with no fence before
//    its ticket whose writes are still unordered when they are read (release missing), a
//    block that reads before the ticket is complete (wrong or early election: the reads race
//    with writes still to come), a plain access to a ticket racing with the atomics. What it
//    cannot: the one sync object over-synchronises (any fence orders everything fenced
//    before it, in any thread), so a missing fence is hidden when an unrelated fence of the
//    same thread ran earlier than the reader's; only interleavings that occur are checked
//    (hence random yields and repetitions); GPU specifics beyond C++: the fence's scope
//    (__threadfence_block is not mapped), L1 staleness (a plain load where __ldcg is needed
//    looks the same here), nvcc's own reordering;
//  * floating point: every emulator thread sets flush-to-zero and denormals-are-zero, as
//    nvcc -ftz=true does for the kernel's f32 arithmetic (x86: MXCSR FTZ|DAZ via _mm_setcsr;
//    aarch64: FPCR.FZ; elsewhere nothing, a documented gap). Divergence: on x86 and aarch64
//    this also flushes f64 subnormals (the epilogue), which the GPU does not;
//  * __half / __nv_bfloat16 are 16-bit storage types with exact conversions to float;
//  * math (exp2f, log2f, fmaf, ...) is the host libm: results agree with the GPU to rounding,
//    not bit for bit; each build is bitwise deterministic on its own, in either mode.
// Not emulated: warp divergence semantics beyond the above, launch bounds, the read-only cache.
//
// Fault injection (positive controls of scripts/tsan): only in a build with
// INFOPO_EMULATOR_FAULTS defined (build.rs defines it with INFOPO_EMULATOR_TSAN=1), the
// environment variable INFOPO_EMULATOR_FAULT, read at each launch, breaks the protocol:
//   no_fence      __threadfence does nothing (no fence, no annotation);
//   early_ticket  atomicInc returns old + 1, so the second-to-last block to draw
//                 a ticket believes it is the last: a row merge / epilogue that reads too early.
// Under ThreadSanitizer only this C++ is instrumented; the Rust caller is not (scripts/tsan).
#ifndef INFOPO_EMULATOR_H
#define INFOPO_EMULATOR_H
#define INFOPO_EMULATOR 1

#include <atomic>
#include <condition_variable>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#ifdef __linux__
#include <climits>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__ __restrict

// Most blocks one launch runs at once (copies of the kernel in kernels/emulator.cpp).
#define INFOPO_EMU_MAX_BLOCKS_AT_ONCE 4

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

// How a launch runs (mirrored by src/emulated.rs).
struct InfopoEmulation {
    uint32_t blocks_at_once; // 1 = serial; at most INFOPO_EMU_MAX_BLOCKS_AT_ONCE
    uint32_t blocks_run; // 0 = every block; else only the first blocks_run blocks drawn run, as in
                         // a launch aborted half-way (the CPU stand-in of the driver, .ci/fake-cuda)
    uint64_t seed; // of the random yields (concurrent mode)
};

namespace infopo_emu {

// A reusable barrier of n threads whose only shared state is its own. Not std::barrier:
// libstdc++ parks its waiters in a process-wide table of mutexes and atomic counters shared by
// every barrier, which gives ThreadSanitizer happens-before edges between unrelated blocks and
// hid a removed __threadfence (the no_fence control) in a first version. On Linux: a counter
// (acq_rel arrivals) and a phase word the waiters sleep on with a raw futex (not intercepted
// by ThreadSanitizer, so it adds no edge of its own); elsewhere a mutex and condition variable.
class Barrier {
public:
    explicit Barrier(unsigned n) : n_(n) {}
#ifdef __linux__
    void arrive_and_wait() {
        const unsigned phase = phase_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1u, std::memory_order_acq_rel) + 1u == n_) {
            arrived_.store(0u, std::memory_order_relaxed); // before anyone sees the new phase
            phase_.store(phase + 1u, std::memory_order_release);
            syscall(SYS_futex, reinterpret_cast<unsigned *>(&phase_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
            return;
        }
        while (phase_.load(std::memory_order_acquire) == phase)
            syscall(SYS_futex, reinterpret_cast<unsigned *>(&phase_), FUTEX_WAIT_PRIVATE, phase, nullptr, nullptr, 0);
    }

private:
    const unsigned n_;
    std::atomic<unsigned> arrived_{0}, phase_{0};
    static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned) && std::atomic<unsigned>::is_always_lock_free);
#else
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned phase = phase_;
        if (++arrived_ == n_) {
            arrived_ = 0;
            ++phase_;
            cv_.notify_all();
            return;
        }
        cv_.wait(lock, [&] { return phase_ != phase; });
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    const unsigned n_;
    unsigned arrived_ = 0, phase_ = 0;
#endif
};

// The threads of one running block: barriers, shuffle buffers, the drawn block index.
struct Team {
    explicit Team(unsigned threads)
        : block(threads), warps(threads / 32) {
        for (unsigned w = 0; w < warps; ++w) warp.emplace_back(std::make_unique<Barrier>(32));
        for (auto &b : shfl) b.assign(threads, Slot{});
    }
    Barrier block;
    unsigned warps;
    std::vector<std::unique_ptr<Barrier>> warp;
    struct Slot {
        alignas(16) unsigned char bytes[64];
    };
    std::vector<Slot> shfl[2];
    unsigned drawn = 0; // written by thread 0, read by all after a block barrier
};

inline thread_local Team *current = nullptr;
inline thread_local unsigned shfl_phase = 0;
inline thread_local bool yields = false;
inline thread_local uint64_t rng = 0;

// The sync object of __threadfence's ThreadSanitizer annotation (see the header comment).
inline std::atomic<unsigned> fence_sync{0};

enum Fault { NO_FAULT, FAULT_NO_FENCE, FAULT_EARLY_TICKET };
inline Fault fault = NO_FAULT; // written under the launch mutex before the threads start

inline std::mutex &launch_mutex() {
    static std::mutex m;
    return m;
}

inline uint64_t splitmix(uint64_t &s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Concurrent mode: yield one time in 8, sleep up to 50 µs one time in 256.
inline void maybe_yield() {
    if (!yields) return;
    const uint64_t r = splitmix(rng);
    if ((r & 255u) == 0u) {
        std::this_thread::sleep_for(std::chrono::microseconds((r >> 8) % 50u));
    } else if ((r & 7u) == 0u) {
        std::this_thread::yield();
    }
}

// Flush f32 subnormal results to zero and read subnormal inputs as zero, like nvcc -ftz=true.
inline void flush_subnormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(_mm_getcsr() | 0x8040u); // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    fpcr |= (uint64_t)1 << 24; // FZ: flush inputs and outputs (single and double)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
}

inline Fault fault_from_env() {
#ifdef INFOPO_EMULATOR_FAULTS
    const char *f = std::getenv("INFOPO_EMULATOR_FAULT");
    if (f && std::strcmp(f, "no_fence") == 0) return FAULT_NO_FENCE;
    if (f && std::strcmp(f, "early_ticket") == 0) return FAULT_EARLY_TICKET;
#endif
    return NO_FAULT;
}

// Runs a grid of `grid` blocks of `threads` threads (a multiple of 32). Team k runs its blocks
// with body(k, ...): the k-th copy of the kernel, whose __shared__ storage is team k's own.
template <class F>
void launch(unsigned grid, unsigned threads, const InfopoEmulation &opt, F &&body) {
    std::lock_guard<std::mutex> lock(launch_mutex());
    fault = fault_from_env();
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{threads, 1, 1};
    unsigned teams = opt.blocks_at_once < 1u ? 1u : opt.blocks_at_once;
    if (teams > INFOPO_EMU_MAX_BLOCKS_AT_ONCE) teams = INFOPO_EMU_MAX_BLOCKS_AT_ONCE;
    if (teams > grid) teams = grid;
    const bool concurrent = teams > 1;
    std::atomic<unsigned> next_block{0};
    std::vector<std::unique_ptr<Team>> team;
    for (unsigned k = 0; k < teams; ++k) team.emplace_back(std::make_unique<Team>(threads));
    std::vector<std::thread> pool;
    pool.reserve((size_t)teams * threads);
    for (unsigned k = 0; k < teams; ++k) {
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, k, t] {
                flush_subnormals();
                Team &me = *team[k];
                current = &me;
                threadIdx = dim3{t, 0, 0};
                shfl_phase = 0;
                yields = concurrent;
                rng = opt.seed ^ ((uint64_t)k << 40) ^ ((uint64_t)t << 16);
                for (;;) {
                    // Relaxed: the draw must not order blocks (see the header comment).
                    if (t == 0) me.drawn = next_block.fetch_add(1u, std::memory_order_relaxed);
                    me.block.arrive_and_wait();
                    const unsigned b = me.drawn;
                    if (b >= grid || (opt.blocks_run != 0u && b >= opt.blocks_run)) break;
                    blockIdx = dim3{b, 0, 0};
                    maybe_yield();
                    body(k);
                    me.block.arrive_and_wait(); // the block is done; `drawn` may be overwritten
                }
            });
        }
    }
    for (auto &th : pool) th.join();
}

} // namespace infopo_emu

inline void __syncthreads() {
    infopo_emu::maybe_yield();
    infopo_emu::current->block.arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) { infopo_emu::current->warp[threadIdx.x >> 5]->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    static_assert(sizeof(T) <= 64 && std::is_trivially_copyable_v<T>, "shuffle of a trivially copyable value of at most 64 bytes");
    infopo_emu::Team &l = *infopo_emu::current;
    const unsigned tid = threadIdx.x, base = tid & ~31u, lane = tid & 31u;
    std::vector<infopo_emu::Team::Slot> &buf = l.shfl[infopo_emu::shfl_phase];
    std::memcpy(buf[tid].bytes, &v, sizeof(T));
    l.warp[tid >> 5]->arrive_and_wait();
    T r;
    std::memcpy(&r, buf[base + (lane ^ ((unsigned)lane_mask & 31u))].bytes, sizeof(T));
    infopo_emu::shfl_phase ^= 1u;
    return r;
}

// Relaxed, like the GPU's atomics: ordering comes only from __threadfence.
// ((old >= limit) ? 0 : old + 1), as CUDA's atomicInc.
inline unsigned atomicInc(unsigned *p, unsigned limit) {
    infopo_emu::maybe_yield();
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u, std::memory_order_relaxed)) {
    }
    if (infopo_emu::fault == infopo_emu::FAULT_EARLY_TICKET) old += 1u;
    infopo_emu::maybe_yield();
    return old;
}
inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) {
    infopo_emu::maybe_yield();
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
inline void __threadfence() {
    infopo_emu::maybe_yield();
    if (infopo_emu::fault == infopo_emu::FAULT_NO_FENCE) return;
#ifndef __SANITIZE_THREAD__ // ThreadSanitizer does not support standalone fences (-Wtsan)
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
    infopo_emu::fence_sync.fetch_add(1u, std::memory_order_acq_rel);
    infopo_emu::maybe_yield();
}
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

// Packed bf16x2 min/max (kernels/variants.cuh), bit-exact to PTX max.bf16x2, min.bf16x2 and
// max.NaN.bf16x2 on each 16-bit half: a NaN operand is ignored (both NaN: the canonical NaN
// 0x7fff), or with .NaN any NaN gives 0x7fff; −0 orders below +0. Compared as integers, not
// through f32, so the emulator threads' DAZ cannot flush a subnormal bf16 to 0.
namespace infopo_emu {
inline bool bf16_is_nan(unsigned h) { return (h & 0x7fffu) > 0x7f80u; }
inline int bf16_order(unsigned h) { return (h & 0x8000u) ? -(int)(h & 0x7fffu) - 1 : (int)(h & 0x7fffu); }
inline unsigned bf16_pick(unsigned a, unsigned b, bool want_max, bool nan_propagates) {
    const bool na = bf16_is_nan(a), nb = bf16_is_nan(b);
    if (na || nb) return (nan_propagates || (na && nb)) ? 0x7fffu : (na ? b : a);
    const bool a_above = bf16_order(a) > bf16_order(b);
    return a_above == want_max ? a : b;
}
inline unsigned bf16x2_op(unsigned a, unsigned b, bool want_max, bool nan_propagates) {
    const unsigned lo = bf16_pick(a & 0xffffu, b & 0xffffu, want_max, nan_propagates);
    const unsigned hi = bf16_pick(a >> 16, b >> 16, want_max, nan_propagates);
    return lo | (hi << 16);
}
} // namespace infopo_emu
inline unsigned infopo_bf16x2_max(unsigned a, unsigned b) { return infopo_emu::bf16x2_op(a, b, true, false); }
inline unsigned infopo_bf16x2_min(unsigned a, unsigned b) { return infopo_emu::bf16x2_op(a, b, false, false); }
inline unsigned infopo_bf16x2_max_nan(unsigned a, unsigned b) { return infopo_emu::bf16x2_op(a, b, true, true); }


// Asynchronous copies of the `ring` variant (kernels/variants.cuh), as synchronous copies plus
// the synchronisation they would need on a GPU, so that the kernel's protocol around them is
// what runs (and what ThreadSanitizer checks):
//  * cp.async (sm_80-89, 16 bytes, one thread's own vector): a copy by the issuing thread;
//    commit_group / wait_group do nothing (every group of the thread is complete at once). The
//    kernel only ever reads back what the same thread copied, so no cross-thread order is needed;
//  * mbarrier: a 64-bit word in shared memory, [63] phase parity, [62:48] the arrival count it
//    was initialised with, [47:32] arrivals pending in this phase, [31:0] the transaction count
//    (signed). arrive.expect_tx adds bytes and one arrival; complete_tx subtracts bytes; a phase
//    completes when both reach 0 (then the parity flips, the arrivals are re-armed). Every
//    update is an acq_rel read-modify-write and try_wait.parity an acquire load, so what the
//    copy wrote before its complete_tx happens-before what a waiter reads after its wait;
//  * cp.async.bulk (sm_90, one elected thread, a whole stage): a copy by the issuing thread, as
//    plain element stores (not memcpy, which ThreadSanitizer's interceptors would hide), then
//    the mbarrier's complete_tx of its bytes. A refill that overwrote a stage other threads
//    still read is then a data race ThreadSanitizer reports.
// fence.proxy.async and fence.mbarrier_init order nothing more here (one proxy): no-ops.
namespace infopo_emu {
constexpr uint64_t MBAR_PHASE = 1ull << 63;
inline uint64_t mbar_settle(uint64_t w) { // completes the phase when arrivals and bytes are done
    const unsigned pending = (unsigned)(w >> 32) & 0xffffu, count = (unsigned)(w >> 48) & 0x7fffu;
    if (pending == 0u && (uint32_t)w == 0u)
        w = ((w & MBAR_PHASE) ^ MBAR_PHASE) | ((uint64_t)count << 48) | ((uint64_t)count << 32);
    return w;
}
template <class F> inline void mbar_update(uint64_t *bar, F &&f) {
    std::atomic_ref<uint64_t> a(*bar);
    uint64_t old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, mbar_settle(f(old)), std::memory_order_acq_rel, std::memory_order_relaxed)) {
    }
}
} // namespace infopo_emu
inline void infopo_mbar_init(uint64_t *bar, unsigned count) {
    std::atomic_ref<uint64_t>(*bar).store(((uint64_t)count << 48) | ((uint64_t)count << 32), std::memory_order_relaxed);
}
inline void infopo_mbar_inval(uint64_t *bar) { std::atomic_ref<uint64_t>(*bar).store(0u, std::memory_order_relaxed); }
inline void infopo_fence_mbar_init() {}
inline void infopo_fence_proxy_async() {}
inline void infopo_mbar_arrive_expect_tx(uint64_t *bar, unsigned bytes) {
    infopo_emu::mbar_update(bar, [bytes](uint64_t w) {
        return (w & ~0xffffffffull & ~(0xffffull << 32)) | ((uint64_t)((((unsigned)(w >> 32) & 0xffffu) - 1u) & 0xffffu) << 32) |
               (uint32_t)((uint32_t)w + bytes);
    });
}
inline bool infopo_mbar_try_wait(uint64_t *bar, unsigned parity) {
    const uint64_t w = std::atomic_ref<uint64_t>(*bar).load(std::memory_order_acquire);
    return ((w >> 63) & 1u) != (parity & 1u); // the phase of this parity has completed
}
inline void infopo_bulk_copy(void *dst, const void *src, unsigned bytes, uint64_t *bar) {
    uint4 *d = static_cast<uint4 *>(dst);
    const uint4 *s = static_cast<const uint4 *>(src);
    for (unsigned i = 0; i < bytes / 16u; ++i) {
        d[i] = s[i];
        __asm__ __volatile__("" ::: "memory"); // element stores, never turned into a memcpy call
    }
    infopo_emu::maybe_yield();
    infopo_emu::mbar_update(bar, [bytes](uint64_t w) { return (w & ~0xffffffffull) | (uint32_t)((uint32_t)w - bytes); });
}
inline void infopo_cp_async16(void *dst, const void *src) { *static_cast<uint4 *>(dst) = *static_cast<const uint4 *>(src); }
inline void infopo_cp_async_commit() {}
template <int N> inline void infopo_cp_async_wait() {}

#endif
