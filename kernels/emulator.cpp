// Host entry points of the emulated kernel (feature `emulator`): kernels/infopo.cu compiled as
// C++ against emulator.h, launched on CPU threads. Called from src/emulated.rs.
#include "infopo.cu"

#include <cstddef>

extern "C" {

// Runs one launch of infopo_<dtype> with `grid` blocks of `block` threads (a multiple of 32,
// at most 256). Launches are serialised process-wide.
void infopo_emulate_f32(const InfopoArgs *a, unsigned grid, unsigned block) {
    const InfopoArgs args = *a;
    infopo_emu::launch(grid, block, [&args] { infopo_f32(args); });
}
void infopo_emulate_f16(const InfopoArgs *a, unsigned grid, unsigned block) {
    const InfopoArgs args = *a;
    infopo_emu::launch(grid, block, [&args] { infopo_f16(args); });
}
void infopo_emulate_bf16(const InfopoArgs *a, unsigned grid, unsigned block) {
    const InfopoArgs args = *a;
    infopo_emu::launch(grid, block, [&args] { infopo_bf16(args); });
}

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
        F(scale), F(splits), F(estimator), F(finalize), F(normalize), F(reserved),
        F(state_out), F(row_stride), F(vocab_start),
    };
#undef F
    const size_t n = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < n && i < cap; ++i) out[i] = v[i];
    return n;
}
}
