/* The one argument block of the InfoPO kernel (kernels/infopo.cu), passed BY VALUE to the
 * entry points infopo_f32 / infopo_f16 / infopo_bf16 / infopo_merge (and by pointer to the emulator's
 * infopo_emulate_<dtype>). Plain C types only; src/launch.rs mirrors it field for field as
 * `#[repr(C)] struct KernelArgs` (a unit test compares sizeof/offsetof through
 * infopo_args_layout() of the emulator build).
 *
 * Fields are ordered 8-byte first, then an even number of 4-byte ones, then the 8-byte fields of
 * partial-state and merge mode, so the struct has no interior padding.
 * "global row" = first_row + local row; every turn offset is in global rows.
 *
 * Buffers the host allocates ZEROED ONCE and never clears again (the kernel leaves them zero):
 *   row_tickets [>= n_rows] u32, grid_ticket [1] u32.
 * Buffers the host zeroes once per BATCH (before the first micro-batch launch):
 *   error_word [1] u64, turn_sum [n_turns] f64, turn_count [n_turns] f64.
 * Workspace with no initial contents: partials [n_rows * splits * 6] f32 (only when splits > 1).
 */
#ifndef INFOPO_ARGS_H
#define INFOPO_ARGS_H

#include <stdint.h>

#define INFOPO_STATE_FLOATS 6 /* floats per partial row state in `partials` */
#define INFOPO_ROW_OUTPUTS 5  /* lse_real, lse_masked, log_ratio, kl, entropy_real */
#define INFOPO_RANGE_STATE_FLOATS 8 /* floats per row in `state_out` (partial-state mode) */

typedef struct InfopoArgs {
    /* ---------------- row pass ---------------- */
    const void *real;            /* [n_rows * vocab] logits of the entry point's dtype; row r starts at element r*row_stride (row_stride = vocab unless set; any alignment of the element type) */
    const void *masked;          /* [n_rows * vocab] same dtype; its alignment may differ from real's */
    const int64_t *targets;      /* [n_rows] realised token ids */
    float *row_out;              /* [5 * n_rows] out: row_out[k*n_rows + r], k = 0 lse_real, 1 lse_masked, 2 log_ratio, 3 kl, 4 entropy_real */
    unsigned long long *error_word; /* [1] in/out: atomicMax of ~infopo_error_key(global_row, code) (kernels/state.cuh); 0 = no error; host decodes ~word. Zero per batch. */
    float *partials;             /* [n_rows * splits * 6] workspace when splits > 1 (may be NULL when splits == 1) */
    uint32_t *row_tickets;       /* [n_rows] zeroed once, self-cleaning; needed when splits > 1 */
    uint32_t *grid_ticket;       /* [1] zeroed once, self-cleaning; needed when n_turns > 0 */
    int64_t n_rows;              /* rows in this launch (may be 0: the launch then only runs the epilogue) */
    int64_t vocab;               /* V >= 1 */
    int64_t first_row;           /* global index of this launch's row 0 (micro-batches) */

    /* ---------------- turns (n_turns > 0) ---------------- */
    int64_t n_turns;             /* T; 0 = no turn layout, no epilogue */
    const uint32_t *turn_offsets;    /* [T+1] global row CSR */
    const uint32_t *turn_trajectory; /* [T] */
    const uint32_t *turn_credit;     /* [T] >= 1 */
    double *turn_sum;            /* [T] carried across micro-batches: sum of the estimator */
    double *turn_count;          /* [T] carried across micro-batches: rows seen */
    double *turn_info;           /* [T] out: turn_sum / turn_count (0 for no rows), cumulative */

    /* ---------------- trajectories (finalize && n_traj > 0) ---------------- */
    int64_t n_traj;              /* B */
    int64_t n_groups;            /* G (dense) */
    const double *trajectory_outcome;      /* [B] */
    const uint32_t *trajectory_tokens;     /* [B] */
    const uint32_t *group_trajectory_offsets; /* [G+1] CSR into group_trajectories */
    const uint32_t *group_trajectories;    /* [B] members of each group, fixed order */
    const uint32_t *group_turn_offsets;    /* [G+1] CSR into group_turns */
    const uint32_t *group_turns;           /* [T] turns of each group, fixed order */
    double *turn_intrinsic;      /* [T] out: info_t / credit_t */
    double *turn_norm;           /* [T] out: norm_t */
    double *turn_bonus;          /* [T] out: bonus_t */
    double *traj_advantage;      /* [B] out */
    double *traj_gate;           /* [B] out */
    double *scalars;             /* [3] out: outcome_std, intrinsic_std, magnitude_ratio */
    double total_tokens;         /* M = sum of trajectory_tokens (>= 2) */
    double beta;
    double gate_temperature;     /* tau of the gate */
    double eps;

    /* ---------------- token advantages (finalize && n_traj > 0 && token_advantage) ---------------- */
    const uint32_t *turn_credit_start;   /* [T] first credited token of turn t in its trajectory's response (validated: spans fit and are disjoint), or NULL */
    const uint64_t *trajectory_token_offsets; /* [B+1] prefix sums of trajectory_tokens (u64: M may exceed 2^32) */
    double *token_advantage;     /* [M] out, or NULL for none: traj_advantage[i] on trajectory i's tokens, + turn_bonus[t] on turn t's span
                                    (variant SPREAD: written by infopo_tokens, launched after the epilogue's launch with the same args) */

    /* ---------------- 4-byte fields ---------------- */
    float scale;                 /* log2(e) / temperature */
    uint32_t splits;             /* blocks per row (>= 1); grid covers n_rows * splits work items */
    uint32_t estimator;          /* 0 = log_ratio, 1 = kl */
    uint32_t finalize;           /* 1 = last launch of the batch: run the group/trajectory epilogue */
    uint32_t normalize;          /* 1 = normalise intrinsic values within each group */
    uint32_t gate_source;        /* 0 = outcome std of the group, 1 = std of its intrinsic pool (0 below 2 tokens); an even count of 4-byte fields keeps sizeof a multiple of 8 */

    /* ---------------- partial-state mode (state_out != NULL; see src/partial.rs) ----------------
     * The launch scores the vocabulary range [vocab_start, vocab_start + vocab) of every row and
     * writes each row's state instead of finalising it: no row_out, no error word, no turns
     * (n_turns must be 0). Rows are read at real + r*row_stride (row_stride >= vocab), so one
     * column range of wider rows (a padded shard, or columns v0.. of the full logits with the
     * pointers offset by v0) is scored in place. */
    float *state_out;            /* [n_rows * 8] out: max_real (raw), sum_real, max_masked (raw), sum_masked, sum_diff, sum_centered (base 2, kernels/state.cuh), then the raw target logits x_a, y_a when vocab_start <= target < vocab_start + vocab, else NaN */
    int64_t row_stride;          /* elements between the starts of consecutive rows; 0 = vocab */
    int64_t vocab_start;         /* global token id of column 0 (targets are global ids) */

    /* ---------------- merge mode (entry point infopo_merge only) ----------------
     * The launch reads no logits: row r's state over the whole vocabulary is the fold of the
     * states of merge_parts vocabulary ranges that tile [0, vocab), each written by a
     * partial-state launch (state_out above, f32 whatever the logit dtype), folded in part order
     * 0, 1, ..., P-1 with state_merge. The target logits come from the part whose range holds the
     * target (the others hold NaN there). Then everything a normal launch does: row_out, the
     * error word (target range against `vocab`, the full vocabulary), turns and, with finalize,
     * the epilogue, through the same tickets. splits is ignored (1); real/masked/state_out unused.
     * Launch: blocks of the normal launch's size, one per row (src/launch.rs::merge_shape). */
    const float *merge_states;   /* [merge_parts][n_rows][8]: part k, row r at merge_states + (k * n_rows + r) * 8, the ranges in vocabulary order */
    int64_t merge_parts;         /* P >= 1 */

    /* ---------------- kernel variant (kernels/variants.cuh; src/launch.rs::KernelVariant) ---------------- */
    uint32_t variant;            /* INFOPO_VARIANT_*; 0 = today's kernel. Unknown values run today's kernel */
    uint32_t variant_reserved;   /* 0; keeps sizeof a multiple of 8 */

    /* ---------------- the official pipeline's ablation knobs (docs/contract.md §4; finalize only) ---------------- */
    double pool_tolerance;       /* |intrinsic_t| <= this counts as zero (out of the pool, norm 0); 0 = exact zeros */
    uint32_t centre_only;        /* 1: advantage R - mu, norm x - mu (no division by sigma + eps) */
    uint32_t intrinsic_only;     /* 1: bonus = ratio * norm (no beta, no gate); token advantages without the outcome */

    /* ---------------- the padded [B, L] token output (needs token_advantage; docs/contract.md §4) ---------------- */
    double *padded_advantage;    /* [B * pad_width] out, or NULL for none: row i holds trajectory i's token_advantage values at
                                    columns pad_offset[i] .. pad_offset[i] + trajectory_tokens[i] (validated to fit), 0 elsewhere */
    const uint32_t *pad_offset;  /* [B] */
    int64_t pad_width;           /* L */
} InfopoArgs;

/* Kernel variants of the row pass, chosen per launch (args.variant). Every variant computes the
 * same row states (bitwise on every row without an error; error rows keep their codes), so any
 * suite can run under any of them (INFOPO_KERNEL_VARIANT, src/launch.rs). */
#define INFOPO_VARIANT_BASELINE 0u    /* today's kernel */
#define INFOPO_VARIANT_PACKED 1u      /* bf16, 16-byte path: bf16x2 clamp/max/min, no `live` select (other dtypes: baseline) */
#define INFOPO_VARIANT_PACKED_BUMP 2u /* PACKED + 32-bit trip count, pointer bump, blockDim 256 fast path */
#define INFOPO_VARIANT_WAVES 3u       /* host only: whole-wave split counts (launch_shape); the kernel runs the baseline */
#define INFOPO_VARIANT_RING 4u        /* 16-byte path through a shared-memory ring: cp.async.bulk + mbarrier (sm_90), cp.async (sm_80-89); every dtype */
#define INFOPO_VARIANT_SPREAD 5u      /* baseline row pass; the epilogue stops before token_advantage, which the host's
                                         second launch (infopo_tokens, a block per trajectory) writes */

#endif
