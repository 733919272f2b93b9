// Paged attention on the CPU: queries attend over KV blocks read in place from the pool.
//
// Built by engine/cpu_kernels/build.py and called through ctypes. Every pointer is to
// contiguous memory owned by a torch tensor that the caller keeps alive for the call.
//
// The pool of one layer, K and V each: [num_blocks, num_kv_heads, block_size, head_dim], in
// float32, bfloat16 or fp8 e4m3 (with a float32 scale per token per head,
// [num_blocks, num_kv_heads, block_size]). Queries and output: [T, num_heads, head_dim] in the
// model dtype (float32 or bfloat16). Query head j uses KV head j / (num_heads / num_kv_heads),
// the grouping HF's repeat_kv implies.
//
// One work item is one sequence's run of queries: num_queries tokens at batch rows
// [q_row, q_row + num_queries), at positions [start, start + num_queries), attending causally
// over positions [0, position] through block table row table_row. A decode is num_queries = 1.
// Work is split into (item, KV head, query tile) units; each unit keeps its rows' running
// softmax (flash attention's online rescaling), so K and V are read once per tile, block by
// block, never copied into a contiguous buffer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace pdserve;

enum KVType { KV_F32 = 0, KV_BF16 = 1, KV_FP8 = 2 };
enum QType { Q_F32 = 0, Q_BF16 = 1 };

constexpr int kMaxHeadDim = 256;
constexpr int kTileRows = 16;  // query rows (tokens x heads of one group) per unit

// exp(x) for x <= 0, 0 below -87 (the weight is 0 to float precision).
inline float exp_nonpositive(float x) {
    return x <= -87.0f ? 0.0f : exp_clamped(x);
}

struct Pool {
    const void* k;
    const void* v;
    const float* k_scales;  // fp8 only
    const float* v_scales;
    int64_t block_elems;  // num_kv_heads * block_size * head_dim
    int64_t block_tokens;  // num_kv_heads * block_size (scales per block)
};

struct Shape {
    int num_heads, num_kv_heads, block_size, head_dim;
    float scale;
};

// Rows [0, n) of one (block, head) as float32 into dst [n, head_dim]; for float32 pools the
// rows are used where they lie and dst is untouched.
template <int KV>
inline const float* load_rows(const void* pool, const float* scales,
                              int64_t block, int head, const Shape& s, const Pool& p, int n,
                              float* dst) {
    int64_t offset = block * p.block_elems + static_cast<int64_t>(head) * s.block_size * s.head_dim;
    if constexpr (KV == KV_F32) {
        return static_cast<const float*>(pool) + offset;
    } else if constexpr (KV == KV_BF16) {
        const uint16_t* src = static_cast<const uint16_t*>(pool) + offset;
        for (int i = 0; i < n * s.head_dim; ++i) dst[i] = bf16_to_float(src[i]);
        return dst;
    } else {
        const uint8_t* src = static_cast<const uint8_t*>(pool) + offset;
        const float* scale = scales + block * p.block_tokens + static_cast<int64_t>(head) * s.block_size;
        for (int t = 0; t < n; ++t) {
            const float sc = scale[t];
            const uint8_t* row = src + static_cast<int64_t>(t) * s.head_dim;
            float* out = dst + static_cast<int64_t>(t) * s.head_dim;
            for (int d = 0; d < s.head_dim; ++d) out[d] = fp8_to_float(row[d]) * sc;
        }
        return dst;
    }
}

template <int KV>
constexpr int kv_bytes() { return KV == KV_F32 ? 4 : KV == KV_BF16 ? 2 : 1; }

constexpr int kPrefetchBlocks = 1;

inline void prefetch(const void* base, int64_t offset, int64_t bytes) {
    const char* p = static_cast<const char*>(base) + offset;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 0);
}

struct Unit {
    int64_t item;
    int head, head_end;  // KV heads [head, head_end)
    int first_query;  // within the item
    int num_queries;
};

// The running state of one unit's rows: scaled queries, softmax max and sum, accumulators.
struct Rows {
    int count;
    float q[kTileRows][kMaxHeadDim];
    float acc[kTileRows][kMaxHeadDim];
    float max[kTileRows];
    float sum[kTileRows];
    int64_t pos[kTileRows];
};

// Softmax weights of one block's scores in place, updating a row's max and sum; returns the
// factor the row's accumulator must be scaled by. Keys past ``visible`` get weight 0.
inline float softmax_block(float* scores, int n, int visible, float& row_max, float& row_sum) {
    float block_max = -INFINITY;
    for (int t = 0; t < visible; ++t) block_max = std::max(block_max, scores[t]);
    for (int t = visible; t < n; ++t) scores[t] = -INFINITY;
    const float new_max = std::max(row_max, block_max);
    const float correction = exp_nonpositive(row_max - new_max);
    float sum = 0.0f;
    for (int t = 0; t < n; ++t) {
        const float w = exp_nonpositive(scores[t] - new_max);
        scores[t] = w;
        sum += w;
    }
    row_sum = row_sum * correction + sum;
    row_max = new_max;
    return correction;
}

// R rows (from ``first``) against one block of n keys, head_dim = 16 * NV: keys and values
// are read once per R rows, the rows' queries and accumulators stay in registers.
template <int NV, int R>
inline void block_rows(Rows& rows, int first, const float* keys, const float* values, int n,
                       int64_t first_key) {
    constexpr int D = 16 * NV;
    v16 q[R][NV], a[R][NV];
    float scores[R][64];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) q[r][c] = load16(rows.q[first + r] + 16 * c);
    for (int t = 0; t < n; ++t) {
        v16 part[R];
        for (int r = 0; r < R; ++r) part[r] = v16{};
        for (int c = 0; c < NV; ++c) {
            const v16 k = load16(keys + t * D + 16 * c);
            for (int r = 0; r < R; ++r) part[r] += q[r][c] * k;
        }
        for (int r = 0; r < R; ++r) scores[r][t] = sum16(part[r]);
    }
    for (int r = 0; r < R; ++r) {
        const int row = first + r;
        const int visible = static_cast<int>(std::min<int64_t>(n, rows.pos[row] - first_key + 1));
        const float correction = softmax_block(scores[r], n, std::max(visible, 0), rows.max[row],
                                               rows.sum[row]);
        for (int c = 0; c < NV; ++c) a[r][c] = load16(rows.acc[row] + 16 * c) * correction;
    }
    for (int t = 0; t < n; ++t) {
        for (int c = 0; c < NV; ++c) {
            const v16 v = load16(values + t * D + 16 * c);
            for (int r = 0; r < R; ++r) a[r][c] += scores[r][t] * v;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) store16(rows.acc[first + r] + 16 * c, a[r][c]);
}

// Any head_dim: the same computation in plain loops.
inline void block_rows_any(Rows& rows, const float* keys, const float* values, int n,
                           int64_t first_key, int D) {
    float scores[64];
    for (int row = 0; row < rows.count; ++row) {
        for (int t = 0; t < n; ++t) {
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += rows.q[row][d] * keys[t * D + d];
            scores[t] = dot;
        }
        const int visible = static_cast<int>(std::min<int64_t>(n, rows.pos[row] - first_key + 1));
        const float correction = softmax_block(scores, n, std::max(visible, 0), rows.max[row],
                                               rows.sum[row]);
        float* a = rows.acc[row];
        for (int d = 0; d < D; ++d) a[d] *= correction;
        for (int t = 0; t < n; ++t)
            for (int d = 0; d < D; ++d) a[d] += scores[t] * values[t * D + d];
    }
}

template <int NV>
inline void block_all(Rows& rows, const float* keys, const float* values, int n,
                      int64_t first_key) {
    // Two rows at a time keeps 2 * 2 * NV vectors live: in registers up to head_dim 128.
    constexpr int step = NV <= 2 ? 4 : 2;
    int first = 0;
    for (; first + step <= rows.count; first += step)
        block_rows<NV, step>(rows, first, keys, values, n, first_key);
    for (; first < rows.count; ++first)
        block_rows<NV, 1>(rows, first, keys, values, n, first_key);
}

template <int QT>
void start_rows(Rows& rows, const Unit& u, int head, int64_t q_row, int64_t start, const void* q,
                const Shape& s) {
    const int group = s.num_heads / s.num_kv_heads;
    const int D = s.head_dim;
    rows.count = u.num_queries * group;
    for (int r = 0; r < rows.count; ++r) {
        const int token = u.first_query + r / group;
        const int64_t index = ((q_row + token) * s.num_heads + head * group + r % group) * D;
        if constexpr (QT == Q_F32) {
            const float* src = static_cast<const float*>(q) + index;
            for (int d = 0; d < D; ++d) rows.q[r][d] = src[d] * s.scale;
        } else {
            const uint16_t* src = static_cast<const uint16_t*>(q) + index;
            for (int d = 0; d < D; ++d) rows.q[r][d] = bf16_to_float(src[d]) * s.scale;
        }
        for (int d = 0; d < D; ++d) rows.acc[r][d] = 0.0f;
        rows.max[r] = -INFINITY;
        rows.sum[r] = 0.0f;
        rows.pos[r] = start + token;
    }
}

template <int QT>
void finish_rows(const Rows& rows, const Unit& u, int head, int64_t q_row, void* out,
                 const Shape& s) {
    const int group = s.num_heads / s.num_kv_heads;
    const int D = s.head_dim;
    for (int r = 0; r < rows.count; ++r) {
        const int token = u.first_query + r / group;
        const int64_t index = ((q_row + token) * s.num_heads + head * group + r % group) * D;
        const float inv = 1.0f / rows.sum[r];
        if constexpr (QT == Q_F32) {
            float* dst = static_cast<float*>(out) + index;
            for (int d = 0; d < D; ++d) dst[d] = rows.acc[r][d] * inv;
        } else {
            uint16_t* dst = static_cast<uint16_t*>(out) + index;
            for (int d = 0; d < D; ++d) dst[d] = float_to_bf16(rows.acc[r][d] * inv);
        }
    }
}

// One unit: its query tile, KV heads [head, head_end), block by block through the table. A
// block's heads lie side by side, so a unit of several heads reads one contiguous piece.
template <int KV, int QT>
void run_unit(const Unit& u, const int64_t* items, const int32_t* tables, int64_t table_width,
              const void* q, void* out, const Pool& p, const Shape& s,
              float* kbuf, float* vbuf, Rows* rows) {
    const int64_t q_row = items[u.item * 4 + 0];
    const int64_t start = items[u.item * 4 + 2];
    const int32_t* table = tables + items[u.item * 4 + 3] * table_width;
    const int D = s.head_dim;
    for (int h = u.head; h < u.head_end; ++h) start_rows<QT>(rows[h - u.head], u, h, q_row, start, q, s);
    const int64_t key_end = start + u.first_query + u.num_queries;  // exclusive
    const int64_t num_blocks = (key_end + s.block_size - 1) / s.block_size;
    const int64_t head_elems = static_cast<int64_t>(s.block_size) * D;
    const int64_t head_bytes = head_elems * kv_bytes<KV>();
    for (int64_t b = 0; b < num_blocks; ++b) {
        // Ask for a later block while this one computes: the pool is read from memory once,
        // scattered in block-sized pieces the hardware prefetcher does not foresee.
        // Spread over the heads, so a few hundred requests are in flight at a time rather
        // than the whole next block's at once.
        const bool has_next = b + kPrefetchBlocks < num_blocks;
        const int64_t ahead = has_next ? table[b + kPrefetchBlocks] * p.block_elems : 0;
        // Block 0 holds position 0, which every row sees: after it each row's max is finite.
        const int64_t first_key = b * s.block_size;
        const int n = static_cast<int>(std::min<int64_t>(s.block_size, key_end - first_key));
        const int64_t block = table[b];
        for (int h = u.head; h < u.head_end; ++h) {
            if (has_next) {
                const int64_t offset = (ahead + h * head_elems) * kv_bytes<KV>();
                prefetch(p.k, offset, head_bytes);
                prefetch(p.v, offset, head_bytes);
            }
            Rows& r = rows[h - u.head];
            const float* keys = load_rows<KV>(p.k, p.k_scales, block, h, s, p, n, kbuf);
            const float* values = load_rows<KV>(p.v, p.v_scales, block, h, s, p, n, vbuf);
            switch (D) {
                case 16: block_all<1>(r, keys, values, n, first_key); break;
                case 32: block_all<2>(r, keys, values, n, first_key); break;
                case 64: block_all<4>(r, keys, values, n, first_key); break;
                case 128: block_all<8>(r, keys, values, n, first_key); break;
                case 256: block_all<16>(r, keys, values, n, first_key); break;
                default: block_rows_any(r, keys, values, n, first_key, D);
            }
        }
    }
    for (int h = u.head; h < u.head_end; ++h) finish_rows<QT>(rows[h - u.head], u, h, q_row, out, s);
}

template <int KV, int QT>
void run_all(const std::vector<Unit>& units, const int64_t* items, const int32_t* tables,
             int64_t table_width, const void* q, void* out, const Pool& p, const Shape& s,
             int num_threads) {
    const int64_t count = static_cast<int64_t>(units.size());
    const int64_t scratch = static_cast<int64_t>(s.block_size) * s.head_dim;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && count > 1)
    {
        std::vector<float> kbuf(scratch), vbuf(scratch);
        std::vector<Rows> rows(s.num_kv_heads);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; ++i) {
            run_unit<KV, QT>(units[i], items, tables, table_width, q, out, p, s,
                             kbuf.data(), vbuf.data(), rows.data());
        }
    }
}

}  // namespace

extern "C" {

// Returns 0 on success, a positive code for a shape the kernel does not take.
int pdserve_paged_attention(int kv_type, int q_type, const void* q, void* out, const void* k_pool,
                            const void* v_pool, const float* k_scales, const float* v_scales,
                            const int32_t* tables, int64_t table_width,
                            const int64_t* items, int64_t num_items, int num_heads,
                            int num_kv_heads, int block_size, int head_dim, float scale,
                            int num_threads) {
    if (head_dim > kMaxHeadDim) return 1;
    if (block_size > 64) return 2;
    if (num_heads % num_kv_heads) return 3;
    const int group = num_heads / num_kv_heads;
    if (group > kTileRows) return 4;
    const int tile_queries = kTileRows / group;
    // Whole blocks (every head) per unit while there are units enough for every thread;
    // a head per unit when there are few sequences.
    int64_t tiles = 0;
    for (int64_t i = 0; i < num_items; ++i)
        tiles += (items[i * 4 + 1] + tile_queries - 1) / tile_queries;
    const int heads_per_unit = tiles >= 4 * num_threads ? num_kv_heads : 1;
    std::vector<Unit> units;
    for (int64_t i = 0; i < num_items; ++i) {
        const int nq = static_cast<int>(items[i * 4 + 1]);
        for (int h = 0; h < num_kv_heads; h += heads_per_unit)
            for (int first = 0; first < nq; first += tile_queries)
                units.push_back({i, h, h + heads_per_unit, first,
                                 std::min(tile_queries, nq - first)});
    }
    Pool p{k_pool, v_pool, k_scales, v_scales,
           static_cast<int64_t>(num_kv_heads) * block_size * head_dim,
           static_cast<int64_t>(num_kv_heads) * block_size};
    Shape s{num_heads, num_kv_heads, block_size, head_dim, scale};
#define PDSERVE_RUN(KV, QT) run_all<KV, QT>(units, items, tables, table_width, q, out, p, s, num_threads)
    if (q_type == Q_F32) {
        if (kv_type == KV_F32) PDSERVE_RUN(KV_F32, Q_F32);
        else if (kv_type == KV_BF16) PDSERVE_RUN(KV_BF16, Q_F32);
        else PDSERVE_RUN(KV_FP8, Q_F32);
    } else {
        if (kv_type == KV_F32) PDSERVE_RUN(KV_F32, Q_BF16);
        else if (kv_type == KV_BF16) PDSERVE_RUN(KV_BF16, Q_BF16);
        else PDSERVE_RUN(KV_FP8, Q_BF16);
    }
#undef PDSERVE_RUN
    return 0;
}

}  // extern "C"
