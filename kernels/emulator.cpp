// Host entry points of the emulated kernel (feature `emulator`): kernels/infopo.cu compiled as
// C++ against emulator.h, launched on CPU threads. Called from src/emulated.rs.
//
// The kernel is compiled INFOPO_EMU_MAX_BLOCKS_AT_ONCE times, copy k in namespace
// infopo_copy<k> with its entry points renamed infopo_<dtype>_<k> (and infopo_merge_<k>): `__shared__` is a
// function-local static, so each copy has its own shared storage, and team k of a concurrent
// launch (emulator.h) runs every block it draws with copy k. The headers the kernel includes
// are included here first, at global scope; their include guards keep them out of the copies.
#include "emulator.h"
#include "args.h"
#include "state.cuh"

#include <cstddef>

#define infopo_f32 infopo_f32_0
#define infopo_f16 infopo_f16_0
#define infopo_bf16 infopo_bf16_0
#define infopo_merge infopo_merge_0
#define infopo_bf16_packed infopo_bf16_packed_0
#define infopo_bf16_packed_bump infopo_bf16_packed_bump_0
#define infopo_f32_ring infopo_f32_ring_0
#define infopo_f16_ring infopo_f16_ring_0
#define infopo_bf16_ring infopo_bf16_ring_0
#define infopo_tokens infopo_tokens_0
namespace infopo_copy0 {
#include "infopo.cu"
}
#undef infopo_f32
#undef infopo_f16
#undef infopo_bf16
#undef infopo_merge
#undef infopo_bf16_packed
#undef infopo_bf16_packed_bump
#undef infopo_f32_ring
#undef infopo_f16_ring
#undef infopo_bf16_ring
#undef infopo_tokens
#define infopo_f32 infopo_f32_1
#define infopo_f16 infopo_f16_1
#define infopo_bf16 infopo_bf16_1
#define infopo_merge infopo_merge_1
#define infopo_bf16_packed infopo_bf16_packed_1
#define infopo_bf16_packed_bump infopo_bf16_packed_bump_1
#define infopo_f32_ring infopo_f32_ring_1
#define infopo_f16_ring infopo_f16_ring_1
#define infopo_bf16_ring infopo_bf16_ring_1
#define infopo_tokens infopo_tokens_1
namespace infopo_copy1 {
#include "infopo.cu"
}
#undef infopo_f32
#undef infopo_f16
#undef infopo_bf16
#undef infopo_merge
#undef infopo_bf16_packed
#undef infopo_bf16_packed_bump
#undef infopo_f32_ring
#undef infopo_f16_ring
#undef infopo_bf16_ring
#undef infopo_tokens
#define infopo_f32 infopo_f32_2
#define infopo_f16 infopo_f16_2
#define infopo_bf16 infopo_bf16_2
#define infopo_merge infopo_merge_2
#define infopo_bf16_packed infopo_bf16_packed_2
#define infopo_bf16_packed_bump infopo_bf16_packed_bump_2
#define infopo_f32_ring infopo_f32_ring_2
#define infopo_f16_ring infopo_f16_ring_2
#define infopo_bf16_ring infopo_bf16_ring_2
#define infopo_tokens infopo_tokens_2
namespace infopo_copy2 {
#include "infopo.cu"
}
#undef infopo_f32
#undef infopo_f16
#undef infopo_bf16
#undef infopo_merge
#undef infopo_bf16_packed
#undef infopo_bf16_packed_bump
#undef infopo_f32_ring
#undef infopo_f16_ring
#undef infopo_bf16_ring
#undef infopo_tokens
#define infopo_f32 infopo_f32_3
#define infopo_f16 infopo_f16_3
#define infopo_bf16 infopo_bf16_3
#define infopo_merge infopo_merge_3
#define infopo_bf16_packed infopo_bf16_packed_3
#define infopo_bf16_packed_bump infopo_bf16_packed_bump_3
#define infopo_f32_ring infopo_f32_ring_3
#define infopo_f16_ring infopo_f16_ring_3
#define infopo_bf16_ring infopo_bf16_ring_3
#define infopo_tokens infopo_tokens_3
namespace infopo_copy3 {
#include "infopo.cu"
}
#undef infopo_f32
#undef infopo_f16
#undef infopo_bf16
#undef infopo_merge
#undef infopo_bf16_packed
#undef infopo_bf16_packed_bump
#undef infopo_f32_ring
#undef infopo_f16_ring
#undef infopo_bf16_ring
#undef infopo_tokens
static_assert(INFOPO_EMU_MAX_BLOCKS_AT_ONCE == 4, "one kernel copy per team above");

namespace {
using Kernel = void (*)(const InfopoArgs);
constexpr Kernel KERNELS_F32[] = {infopo_copy0::infopo_f32_0, infopo_copy1::infopo_f32_1, infopo_copy2::infopo_f32_2,
                                  infopo_copy3::infopo_f32_3};
constexpr Kernel KERNELS_F16[] = {infopo_copy0::infopo_f16_0, infopo_copy1::infopo_f16_1, infopo_copy2::infopo_f16_2,
                                  infopo_copy3::infopo_f16_3};
constexpr Kernel KERNELS_BF16[] = {infopo_copy0::infopo_bf16_0, infopo_copy1::infopo_bf16_1,
                                   infopo_copy2::infopo_bf16_2, infopo_copy3::infopo_bf16_3};
constexpr Kernel KERNELS_BF16_PACKED[] = {infopo_copy0::infopo_bf16_packed_0, infopo_copy1::infopo_bf16_packed_1,
                                          infopo_copy2::infopo_bf16_packed_2, infopo_copy3::infopo_bf16_packed_3};
constexpr Kernel KERNELS_BF16_PACKED_BUMP[] = {
    infopo_copy0::infopo_bf16_packed_bump_0, infopo_copy1::infopo_bf16_packed_bump_1,
    infopo_copy2::infopo_bf16_packed_bump_2, infopo_copy3::infopo_bf16_packed_bump_3};
#define INFOPO_KERNEL_COPIES(name)                                                                              \
    { infopo_copy0::name##_0, infopo_copy1::name##_1, infopo_copy2::name##_2, infopo_copy3::name##_3 }
constexpr Kernel KERNELS_F32_RING[] = INFOPO_KERNEL_COPIES(infopo_f32_ring);
constexpr Kernel KERNELS_F16_RING[] = INFOPO_KERNEL_COPIES(infopo_f16_ring);
constexpr Kernel KERNELS_BF16_RING[] = INFOPO_KERNEL_COPIES(infopo_bf16_ring);
constexpr Kernel KERNELS_TOKENS[] = INFOPO_KERNEL_COPIES(infopo_tokens);
#undef INFOPO_KERNEL_COPIES
constexpr Kernel KERNELS_MERGE[] = {infopo_copy0::infopo_merge_0, infopo_copy1::infopo_merge_1,
                                    infopo_copy2::infopo_merge_2, infopo_copy3::infopo_merge_3};

void run(const Kernel (&kernels)[INFOPO_EMU_MAX_BLOCKS_AT_ONCE], const InfopoArgs *a, unsigned grid, unsigned block,
         const InfopoEmulation *opt) {
    const InfopoArgs args = *a;
    infopo_emu::launch(grid, block, *opt, [&args, &kernels](unsigned team) { kernels[team](args); });
}
} // namespace

extern "C" {

// Runs one launch of infopo_<dtype> with `grid` blocks of `block` threads (a multiple of 32,
// at most 256), `opt->blocks_at_once` blocks at a time. Launches are serialised process-wide.
// f32 / f16 / bf16 run the entry of a->variant (kernels/args.h), as the GPU host loads
// infopo_<dtype>_<variant> (src/launch.rs::entry_point, per launch); variants without an entry of their own
// for the dtype run infopo_<dtype>.
void infopo_emulate_f32(const InfopoArgs *a, unsigned grid, unsigned block, const InfopoEmulation *opt) {
    run(a->variant == INFOPO_VARIANT_RING ? KERNELS_F32_RING : KERNELS_F32, a, grid, block, opt);
}
void infopo_emulate_f16(const InfopoArgs *a, unsigned grid, unsigned block, const InfopoEmulation *opt) {
    run(a->variant == INFOPO_VARIANT_RING ? KERNELS_F16_RING : KERNELS_F16, a, grid, block, opt);
}
void infopo_emulate_bf16(const InfopoArgs *a, unsigned grid, unsigned block, const InfopoEmulation *opt) {
    switch (a->variant) {
    case INFOPO_VARIANT_PACKED: run(KERNELS_BF16_PACKED, a, grid, block, opt); break;
    case INFOPO_VARIANT_PACKED_BUMP: run(KERNELS_BF16_PACKED_BUMP, a, grid, block, opt); break;
    case INFOPO_VARIANT_RING: run(KERNELS_BF16_RING, a, grid, block, opt); break;
    default: run(KERNELS_BF16, a, grid, block, opt); break;
    }
}
// The spread variant's token launch (infopo_tokens), launched the same way.
void infopo_emulate_tokens(const InfopoArgs *a, unsigned grid, unsigned block, const InfopoEmulation *opt) {
    run(KERNELS_TOKENS, a, grid, block, opt);
}
// The merge entry point (merge mode, kernels/args.h), launched the same way.
void infopo_emulate_merge(const InfopoArgs *a, unsigned grid, unsigned block, const InfopoEmulation *opt) {
    run(KERNELS_MERGE, a, grid, block, opt);
}

// 1 when the threads of an emulated launch flush a subnormal f32 result to zero (FTZ) and read
// a subnormal f32 input as zero (DAZ), as the kernel built with nvcc -ftz=true does; for the
// test in src/emulated.rs. The calling thread's floating-point mode is left alone.
int infopo_emulate_flushes_subnormals(void) {
    volatile float min_normal = FLT_MIN, two_pow_23 = 8388608.0f;
    const unsigned smallest_subnormal_bits = 1u;
    float half_min = 1.0f, scaled_subnormal = 1.0f;
    const InfopoEmulation serial{1u, 0u, 0u};
    infopo_emu::launch(1u, 32u, serial, [&](unsigned) {
        if (threadIdx.x != 0) return;
        half_min = min_normal * 0.5f; // 2^-127: subnormal, 0 under FTZ
        volatile float subnormal = __uint_as_float(smallest_subnormal_bits);
        scaled_subnormal = subnormal * two_pow_23; // 2^-126 exactly, 0 under DAZ
    });
    return half_min == 0.0f && scaled_subnormal == 0.0f;
}

// Most blocks a launch runs at once (src/emulated.rs checks its mirror against it).
unsigned infopo_emulate_max_blocks_at_once(void) { return INFOPO_EMU_MAX_BLOCKS_AT_ONCE; }

// The C layout of InfopoArgs for the Rust mirror's test: out[0] = sizeof, out[1] = alignof,
// then offsetof of every field in declaration order. Returns the number of entries written.
size_t infopo_args_layout(size_t *out, size_t cap) {
#define F(f) offsetof(InfopoArgs, f)
    const size_t v[] = {
        sizeof(InfopoArgs), alignof(InfopoArgs),
        F(real), F(masked), F(targets), F(row_out), F(error_word), F(partials), F(row_tickets),
        F(grid_ticket), F(n_rows), F(vocab), F(first_row),
        F(n_turns), F(turn_offsets), F(turn_trajectory), F(turn_credit), F(turn_sum), F(turn_count),
        F(turn_info),
        F(n_traj), F(n_groups), F(trajectory_outcome), F(trajectory_tokens), F(group_trajectory_offsets),
        F(group_trajectories), F(group_turn_offsets), F(group_turns), F(turn_intrinsic), F(turn_norm),
        F(turn_bonus), F(traj_advantage), F(traj_gate), F(scalars), F(total_tokens), F(beta),
        F(gate_temperature), F(eps),
        F(turn_credit_start), F(trajectory_token_offsets), F(token_advantage),
        F(scale), F(splits), F(estimator), F(finalize), F(normalize), F(gate_source),
        F(state_out), F(row_stride), F(vocab_start), F(merge_states), F(merge_parts), F(variant),
        F(variant_reserved), F(pool_tolerance), F(centre_only), F(intrinsic_only), F(padded_advantage),
        F(pad_offset), F(pad_width),
    };
#undef F
    const size_t n = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < n && i < cap; ++i) out[i] = v[i];
    return n;
}
}
