// Attention over "key spans" on CUDA: dense causal attention and HiP block-sparse attention are
// the same kernel with different key lists (see hip-kernels/src/cuda/mod.rs and
// docs/kernels/hip.md).
//
// For a row of queries (one query head, one query block) the keys are a list of three segments:
//   A: sink tokens       [0, len_a)                      admitted iff j <= p
//   B: mask blocks       starts[s] + r, r < block_k      admitted iff j <= p and j + window <= p
//   C: window            [wlo, wlo + len_c)              admitted iff j <= p and j + window >  p
// where p is the query's position. Every key of the reference rule (sink, own window, or in a
// selected block) is admitted exactly once; dense attention is segment C alone from 0 with an
// infinite window. Keys are gathered by token index, so the same code reads contiguous or paged
// (block-table) caches.
//
// Inputs are bf16 or f16, token-major: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (or paged rows),
// accumulation in f32. Scores live in the log2 domain: s = q.k * scale * log2(e).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

// Which keys a row of queries sees.
struct MaskArgs {
    const uint32_t* starts;  // [B, Hq, n_qblocks, max_blocks] or nullptr (dense)
    const uint32_t* counts;  // [B, Hq, n_qblocks]
    int n_qblocks;
    int max_blocks;
    int block_q;             // queries per mask row
    int block_k;             // tokens per mask block
    int sink;
    long long window;        // per-query window (mask window + extra); huge for dense
    // A decode batch over per-sequence mask slots (null: batch entry b reads mask batch b with
    // `window` as it is): entry b reads slot `slots[b]`, whose mask was estimated over
    // `tks[slot]` keys, and widens the window by the tokens appended since (its length minus that).
    const int* slots;
    const unsigned* tks;
};

// The key list of one mask row.
struct KeyList {
    int len_a, n_b, block_k, wlo, len_c;
    const uint32_t* starts;
    __device__ __forceinline__ int len() const { return len_a + n_b * block_k + len_c; }
    // Token index of list position `pos`, and its segment (0 A, 1 B, 2 C).
    __device__ __forceinline__ int at(int pos, int* seg) const {
        if (pos < len_a) { *seg = 0; return pos; }
        pos -= len_a;
        int nb = n_b * block_k;
        if (pos < nb) { *seg = 1; return (int)starts[pos / block_k] + pos % block_k; }
        *seg = 2;
        return wlo + (pos - nb);
    }
};

// The keys of queries at positions [p_first, p_last] of mask row `row` (or dense).
// With `counted` false the B segment has every one of the row's max_blocks slots (the caller
// masks slots past the count), so that positions do not wait for the count to load.
__device__ __forceinline__ KeyList key_list(const MaskArgs& m, long long row, int p_first, int p_last,
                                            bool counted = true) {
    KeyList l;
    l.block_k = m.block_k;
    if (m.starts == nullptr) {
        l.len_a = 0; l.n_b = 0; l.starts = nullptr; l.wlo = 0; l.len_c = p_last + 1;
        return l;
    }
    l.len_a = min(m.sink, p_last + 1);
    l.n_b = counted ? (int)m.counts[row] : m.max_blocks;
    l.starts = m.starts + row * m.max_blocks;
    long long wlo = (long long)p_first + 1 - m.window;
    if (wlo < m.sink) wlo = m.sink;
    l.wlo = (int)wlo;
    l.len_c = p_last + 1 > l.wlo ? p_last + 1 - l.wlo : 0;
    return l;
}

__device__ __forceinline__ bool admit(int j, int seg, int p, long long window) {
    if (j < 0 || j > p) return false;
    if (seg == 0) return true;
    bool in_window = (long long)j + window > p;
    return seg == 1 ? !in_window : in_window;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Merges N partial softmax states (m[w], l[w], acc rows of `stride` floats) into one: returns
// (m, l) and leaves this lane's E elements of the merged acc in `out` (one warp calls it).
template <int E, int N>
__device__ __forceinline__ float2 merge_states(const float* m, const float* l, const float* acc, int stride, int lane,
                                               float* out) {
    float mm = NEG_INF;
    for (int w = 0; w < N; w++) mm = fmaxf(mm, m[w]);
    float ll = 0.f;
    for (int e = 0; e < E; e++) out[e] = 0.f;
    for (int w = 0; w < N; w++) {
        const float f = m[w] == NEG_INF ? 0.f : exp2f(m[w] - mm);
        ll += l[w] * f;
        for (int e = 0; e < E; e++) out[e] += acc[w * stride + lane * E + e] * f;
    }
    return make_float2(mm, ll);
}

// ------------------------------------------------------------------------------------------------
// Prefill: one CTA per (query tile of BM = 16 * WARPS rows, query head, batch), FlashAttention-2
// style. Each warp keeps its 16 query rows (as mma A fragments), its S = Q K^T tile and its output
// accumulator in registers (mma.sync m16n8k16, f32 accumulation); S becomes the A operand of
// P V without leaving registers. Key tiles of BN = 64 gathered rows stream through shared memory
// with cp.async: V of tile t loads while S of tile t is computed, K of tile t + 1 while P V runs.
// A tile whose keys every row admits (all of them causal, in the right segment) skips the
// per-element mask.

template <typename T, int D, int WARPS>
__device__ void span_attn_prefill(const T* __restrict__ q, T* __restrict__ o, long long q_b, long long q_t,
                                  int t_q, int heads_q, KvArgs kv, MaskArgs mask, float scale_log2) {
    constexpr int BM = 16 * WARPS;
    constexpr int BN = 64;
    constexpr int NT = 32 * WARPS;
    constexpr int LD = D + 8;    // halves per shared row: ldmatrix rows land in distinct banks
    constexpr int CH = D / 8;    // 16-byte chunks per row
    constexpr int NS = BN / 8;   // n-tiles of S per warp
    constexpr int NO = D / 8;    // n-tiles of O per warp
    constexpr int KD = D / 16;   // k-steps over the head dim

    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);
    T* Ks = Qs + BM * LD;
    T* Vs = Ks + BN * LD;
    long long* krow = reinterpret_cast<long long*>(Vs + BN * LD);  // [2][BN] element offsets, -1 none
    int* kj = reinterpret_cast<int*>(krow + 2 * BN);                // [2][BN] token index, -1 none
    int* kseg = kj + 2 * BN;                                         // [2][BN]

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int m0 = blockIdx.x * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads_q / kv.heads_kv);
    const int offset = kv.t_k - t_q;
    const int rows = min(BM, t_q - m0);
    const int p_first = offset + m0, p_last = offset + m0 + rows - 1;
    const long long mrow = ((long long)b * heads_q + h) * mask.n_qblocks + m0 / mask.block_q;
    const KeyList keys = key_list(mask, mrow, p_first, p_last);
    const int L = keys.len();
    const int n_tiles = (L + BN - 1) / BN;
    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);

    // Key indices of the tile at list position `t0` into buffer `buf`; returns (to every thread,
    // after a barrier) whether every query row of the CTA admits every key of the tile.
    auto fill = [&](int buf, int t0) -> int {
        int full = 1;
        for (int c = tid; c < BN; c += NT) {
            int seg = -1, j = -1;
            if (t0 + c < L) j = keys.at(t0 + c, &seg);
            if (j >= kv.t_k || j > p_last) j = -1;
            kj[buf * BN + c] = j;
            kseg[buf * BN + c] = seg;
            krow[buf * BN + c] = j >= 0 ? kv_loc<D>(kv, b, j, hk, true) : -1;
            bool f = j >= 0 && j <= p_first;
            if (seg == 1) f = f && (long long)j + mask.window <= p_first;
            if (seg == 2) f = f && (long long)j + mask.window > p_last;
            full &= f ? 1 : 0;
        }
        return __syncthreads_and(full);
    };
    auto load = [&](T* dst, const T* src, const void* bank, int buf) {
        for (int c = tid; c < BN * CH; c += NT) {
            int r = c / CH, x = (c % CH) * 8;
            long long row = krow[buf * BN + r];
            cp_async16(dst + r * LD + x, row != -1 ? kv_at<T>(src, bank, row) + x : src, row != -1 ? 16 : 0);
        }
    };

    for (int c = tid; c < BM * CH; c += NT) {
        int r = c / CH, x = (c % CH) * 8;
        const T* src = q + b * q_b + (long long)(m0 + min(r, rows - 1)) * q_t + (long long)h * D + x;
        cp_async16(Qs + r * LD + x, src, r < rows ? 16 : 0);
    }
    cp_async_commit();
    float oacc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
    float m_r[2] = {NEG_INF, NEG_INF}, l_r[2] = {0.f, 0.f};
    if (n_tiles > 0) {
        int full = fill(0, 0);
        load(Ks, K, kv.bank_k, 0);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();
        uint32_t qf[KD][4];
#pragma unroll
        for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], Qs + (warp * 16 + (lane % 16)) * LD + kk * 16 + (lane / 16) * 8);
        const int p0 = offset + m0 + warp * 16 + g, p1 = p0 + 8;

        for (int t = 0; t < n_tiles; t++) {
            const int cur = t & 1;
            load(Vs, V, kv.bank_v, cur);
            cp_async_commit();
            cp_async_wait_1();
            __syncthreads();  // K of tile t has landed

            float s[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
#pragma unroll
                for (int n = 0; n < NS; n += 2) {
                    uint32_t bk[4];
                    ldsm_x4(bk, Ks + (n * 8 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
                    mma16816<T>(s[n], qf[kk], bk[0], bk[1]);
                    mma16816<T>(s[n + 1], qf[kk], bk[2], bk[3]);
                }
            }
            if (!full) {
#pragma unroll
                for (int n = 0; n < NS; n++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int c = cur * BN + n * 8 + tq * 2 + e;
                        const int j = kj[c], seg = kseg[c];
                        if (!admit(j, seg, p0, mask.window)) s[n][e] = NEG_INF;
                        if (!admit(j, seg, p1, mask.window)) s[n][2 + e] = NEG_INF;
                    }
                }
            }
            // Online softmax of rows g (elements 0, 1) and g + 8 (elements 2, 3) of the warp.
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < NS; n++) {
                mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
            }
            float alpha[2], ms[2], sum[2] = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 2; i++) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                const float m_new = fmaxf(m_r[i], mx[i]);
                ms[i] = m_new == NEG_INF ? 0.f : m_new * scale_log2;
                alpha[i] = exp2f(m_r[i] * scale_log2 - ms[i]);
                m_r[i] = m_new;
            }
            uint32_t pf[NS / 2][4];
#pragma unroll
            for (int n = 0; n < NS; n++) {
                const float a0 = exp2f(fmaf(s[n][0], scale_log2, -ms[0]));
                const float a1 = exp2f(fmaf(s[n][1], scale_log2, -ms[0]));
                const float c0 = exp2f(fmaf(s[n][2], scale_log2, -ms[1]));
                const float c1 = exp2f(fmaf(s[n][3], scale_log2, -ms[1]));
                sum[0] += a0 + a1;
                sum[1] += c0 + c1;
                pf[n / 2][(n % 2) * 2] = pack2<T>(a0, a1);
                pf[n / 2][(n % 2) * 2 + 1] = pack2<T>(c0, c1);
            }
#pragma unroll
            for (int i = 0; i < 2; i++) l_r[i] = l_r[i] * alpha[i] + sum[i];
#pragma unroll
            for (int n = 0; n < NO; n++) {
                oacc[n][0] *= alpha[0];
                oacc[n][1] *= alpha[0];
                oacc[n][2] *= alpha[1];
                oacc[n][3] *= alpha[1];
            }

            // Indices of the next tile (its barrier also ends every warp's use of Ks), then its K.
            int full_next = 0;
            if (t + 1 < n_tiles) {
                full_next = fill(cur ^ 1, (t + 1) * BN);
                load(Ks, K, kv.bank_k, cur ^ 1);
            } else {
                __syncthreads();
            }
            cp_async_commit();
            cp_async_wait_1();
            __syncthreads();  // V of tile t has landed

#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
#pragma unroll
                for (int n = 0; n < NO; n += 2) {
                    uint32_t bv[4];
                    ldsm_x4_t(bv, Vs + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LD + n * 8 + (lane / 16) * 8);
                    mma16816<T>(oacc[n], pf[kk], bv[0], bv[1]);
                    mma16816<T>(oacc[n + 1], pf[kk], bv[2], bv[3]);
                }
            }
            full = full_next;
            __syncthreads();  // every warp is done with Vs
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
    }
    const int r0 = warp * 16 + g;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int r = r0 + 8 * i;
        if (r >= rows) continue;
        const float inv = l_r[i] > 0.f ? 1.f / l_r[i] : 0.f;
        T* out = o + b * q_b + (long long)(m0 + r) * q_t + (long long)h * D + tq * 2;
#pragma unroll
        for (int n = 0; n < NO; n++)
            *reinterpret_cast<uint32_t*>(out + n * 8) = pack2<T>(oacc[n][2 * i] * inv, oacc[n][2 * i + 1] * inv);
    }
}

// ------------------------------------------------------------------------------------------------
// Decode: split-KV flash-decoding in one launch. The CS CTAs of a thread-block cluster share one
// (query, query head, batch) row, each taking a CS-th of its key list. A CTA works in chunks of up
// to CHUNK keys: its threads first place every key of the chunk at once (the mask's block starts
// and its count load together: list positions are laid out as if every mask slot were used, and
// slots past the count hold no key), then gather all of the chunk's K and V rows into shared
// memory with cp.async, then each warp attends to every WARPS-th row from there. A decode row
// thus waits for two round trips to memory, not two per few keys. The CTAs' partial softmax
// states (m, l, acc) meet in distributed shared memory: after a cluster barrier the cluster's
// first CTA merges them and writes the output, so there is no workspace and no combine launch.

constexpr int DECODE_CS = 8;      // CTAs per row (one cluster)
constexpr int DECODE_WARPS = 8;
constexpr int DECODE_CHUNK = 128;  // keys staged in shared memory at a time

// The form: CS CTAs a row, CHUNK keys a stage, STAGES stages. With MAXK = 0 each chunk's keys are
// placed just before its rows load (2 stages: the next chunk is placed and loaded while the warps
// attend to this one). With MAXK > 0 the keys of up to MAXK list positions are placed at once,
// then their rows stream through a ring of STAGES chunks, STAGES - 1 of them in flight while the
// warps attend to one. hip-kernels/src/cuda/mod.rs's `span_decode_form` picks a form by the
// number of rows; HIP_SPAN_DECODE forces one, for measurements. The dynamic shared memory holds
// STAGES x the K and V rows of CHUNK keys, then the keys' locations and tokens; after the key
// loop its start is reused for the warps' states (`decode_epilogue_bytes`), so nothing else is
// static.
template <int D>
__host__ __device__ constexpr int decode_epilogue_bytes() { return (DECODE_WARPS * D + 2 * DECODE_WARPS + D + 2) * 4; }

template <typename T, int D, int CS_ = DECODE_CS, int CHUNK_ = DECODE_CHUNK, int STAGES = 1, int MAXK = 0>
__device__ void span_attn_decode(const T* __restrict__ q, T* __restrict__ o, long long q_b, long long q_t, int t_q,
                                 int heads_q, KvArgs kv, MaskArgs mask, float scale_log2) {
    constexpr int WARPS = DECODE_WARPS, CS = CS_, CHUNK = CHUNK_, NT = 32 * WARPS;
    constexpr int E = D / 32;  // elements per lane
    constexpr int CH = D / 8;  // 16-byte chunks per row
    static_assert(MAXK > 0 ? MAXK % CHUNK == 0 && STAGES >= 2 : STAGES == 1 || STAGES == 2, "a form");
    static_assert(STAGES * CHUNK * D * 2 * (int)sizeof(T) >= decode_epilogue_bytes<D>(), "epilogue fits");
    constexpr int NLOC = MAXK > 0 ? MAXK : STAGES * CHUNK;  // key locations and tokens held
    extern __shared__ __align__(128) unsigned char smem[];
    T* Ks0 = reinterpret_cast<T*>(smem);                                   // [STAGES][CHUNK][D]
    T* Vs0 = Ks0 + STAGES * CHUNK * D;                                     // [STAGES][CHUNK][D]
    long long* kloc0 = reinterpret_cast<long long*>(Vs0 + STAGES * CHUNK * D);  // [NLOC] -1 none
    int* kjs0 = reinterpret_cast<int*>(kloc0 + NLOC);                           // [NLOC] -1 none

    cg::cluster_group cluster = cg::this_cluster();
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int split = blockIdx.x % CS, h = blockIdx.y;
    const int b = blockIdx.z / t_q, i = blockIdx.z % t_q;
    const int group = heads_q / kv.heads_kv;
    const int hk = h / group;
    const int len = kv_len(kv, b);
    const int p = len - t_q + i;
    const int mb = mask.slots != nullptr ? mask.slots[b] : b;
    if (mask.tks != nullptr) mask.window += len - (int)mask.tks[mb];
    const long long mrow = ((long long)mb * heads_q + h) * mask.n_qblocks + i / mask.block_q;
    KeyList keys = key_list(mask, mrow, p, p, false);
    const int n_used = mask.starts != nullptr ? (int)mask.counts[mrow] : 0;
    const int L = keys.len();
    const int per = (L + CS - 1) / CS;
    const int start = split * per, end = min(L, start + per);

    float qv[E];
    const T* qp = q + b * q_b + (long long)i * q_t + (long long)h * D + lane * E;
    for (int e = 0; e < E; e++) qv[e] = to_f(qp[e]) * scale_log2;
    float m = NEG_INF, l = 0.f, acc[E];
    for (int e = 0; e < E; e++) acc[e] = 0.f;

    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);
    const bool staging = kv_stages(kv);
    // Where each of the n keys from list position c0 is (kjs, kloc); then (after a barrier) the K
    // and V rows of n keys at kloc into stage s, zero rows for no key, as one cp.async group.
    auto place = [&](int c0, int n, int* kjs, long long* kloc) {
        for (int c = tid; c < n; c += NT) {
            int seg = -1;
            int j = keys.at(c0 + c, &seg);
            const bool unused = seg == 1 && (c0 + c - keys.len_a) / keys.block_k >= n_used;
            if (unused || j < 0 || j >= len || !admit(j, seg, p, mask.window)) j = -1;
            kjs[c] = j;
            kloc[c] = j >= 0 ? kv_loc<D>(kv, b, j, hk, false) : -1;
        }
    };
    auto load = [&](const long long* kloc, int n, int s) {
        T* Ks = Ks0 + s * CHUNK * D;
        T* Vs = Vs0 + s * CHUNK * D;
        for (int c = tid; c < n * CH; c += NT) {
            const int r = c / CH, x = (c % CH) * 8;
            const long long loc = kloc[r];
            cp_async16(Ks + r * D + x, loc != -1 ? kv_at<T>(K, kv.bank_k, loc) + x : K, loc != -1 ? 16 : 0);
            cp_async16(Vs + r * D + x, loc != -1 ? kv_at<T>(V, kv.bank_v, loc) + x : V, loc != -1 ? 16 : 0);
        }
        cp_async_commit();
    };
    if constexpr (MAXK == 0 && STAGES == 2) {
        if (start < end) {
            place(start, min(CHUNK, end - start), kjs0, kloc0);
            __syncthreads();
            load(kloc0, min(CHUNK, end - start), 0);
        }
    }
    int stage = 0;
    for (int c0 = start; c0 < end; c0 += CHUNK, stage = STAGES == 2 ? stage ^ 1 : 0) {
        const int n = min(CHUNK, end - c0);
        int koff = stage * CHUNK;  // this chunk's first key in kjs0 / kloc0
        if constexpr (MAXK > 0) {
            // Chunk ci of the group of MAXK positions from s0 (ns of them, nch chunks).
            const int s0 = c0 - (c0 - start) % MAXK, ns = min(MAXK, end - s0);
            const int ci = (c0 - s0) / CHUNK, nch = (ns + CHUNK - 1) / CHUNK;
            if (ci == 0) {
                // Every key of the group at once, then the first STAGES - 1 chunks' rows (the
                // ring is free: the last iteration ended in a barrier and its groups are done).
                place(s0, ns, kjs0, kloc0);
                __syncthreads();
#pragma unroll
                for (int a = 0; a < STAGES - 1; a++) {
                    if (a < nch) load(kloc0 + a * CHUNK, min(CHUNK, ns - a * CHUNK), a % STAGES);
                    else cp_async_commit();  // an empty group keeps the count uniform
                }
            }
            // Chunk ci + STAGES - 1 into the stage chunk ci - 1 left (or an empty group).
            const int ahead = ci + STAGES - 1;
            if (ahead < nch) load(kloc0 + ahead * CHUNK, min(CHUNK, ns - ahead * CHUNK), ahead % STAGES);
            else cp_async_commit();
            cp_async_wait_all_but<STAGES - 1>();
            stage = ci % STAGES;
            koff = ci * CHUNK;
        } else if constexpr (STAGES == 1) {
            place(c0, n, kjs0, kloc0);
            __syncthreads();
            load(kloc0, n, 0);
            cp_async_wait_0();
        } else if (c0 + CHUNK < end) {
            // The next chunk into the other stage (free: the last iteration ended in a barrier).
            const int n1 = min(CHUNK, end - c0 - CHUNK);
            place(c0 + CHUNK, n1, kjs0 + (stage ^ 1) * CHUNK, kloc0 + (stage ^ 1) * CHUNK);
            __syncthreads();
            load(kloc0 + (stage ^ 1) * CHUNK, n1, stage ^ 1);
            cp_async_wait_1();
        } else {
            cp_async_wait_0();
        }
        __syncthreads();
        const T* Ks = Ks0 + stage * CHUNK * D;
        const T* Vs = Vs0 + stage * CHUNK * D;
        const int* kjs = kjs0 + koff;
        const long long* kloc = kloc0 + koff;
        if (staging) {
            // Offloading: leave the rows read over the bus where the cache update finds them.
            for (int r = warp; r < n; r += WARPS) {
                if (kjs[r] < 0 || kloc[r] < 0) continue;  // no key, or read from the GPU bank
                int slot = lane == 0 ? kv_stage_claim(kv, kjs[r], hk) : -1;
                slot = __shfl_sync(0xffffffffu, slot, 0);
                if (slot < 0) continue;
                T* sk = static_cast<T*>(kv.stage.k) + (long long)slot * D + lane * E;
                T* sv = static_cast<T*>(kv.stage.v) + (long long)slot * D + lane * E;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    sk[e] = Ks[r * D + lane * E + e];
                    sv[e] = Vs[r * D + lane * E + e];
                }
            }
        }
        // Warp w attends to rows w, w + WARPS, ..., U of them per step.
        constexpr int U = 4;
        for (int r0 = warp * U; r0 < n; r0 += WARPS * U) {
            float s[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int r = r0 + u;
                float dot = 0.f;
                if (r < n) {
#pragma unroll
                    for (int e = 0; e < E; e++) dot += qv[e] * to_f(Ks[r * D + lane * E + e]);
                }
                s[u] = dot;
            }
#pragma unroll
            for (int u = 0; u < U; u++) s[u] = warp_sum(s[u]);
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int r = r0 + u;
                if (r >= n || kjs[r] < 0) continue;  // the same for every lane of the warp
                const float m_new = fmaxf(m, s[u]);
                const float alpha = m == NEG_INF ? 0.f : exp2f(m - m_new);
                const float pe = exp2f(s[u] - m_new);
                l = l * alpha + pe;
#pragma unroll
                for (int e = 0; e < E; e++) acc[e] = acc[e] * alpha + pe * to_f(Vs[r * D + lane * E + e]);
                m = m_new;
            }
        }
        // Offloading: record the chunk's reads (after the loads, so that the recording's
        // atomics never stall one).
        if (kv.seen != nullptr)
            for (int c = tid; c < n; c += NT)
                if (kjs[c] >= 0) kv_record(kv, kjs[c], hk);
        __syncthreads();  // every warp is done with the chunk's rows
    }
    // The key loop ended in a barrier (or staged nothing): its shared memory now holds the warps'
    // states and this CTA's merged one, `part` (acc[D], m, l), which the cluster's first CTA reads.
    float* sm_acc = reinterpret_cast<float*>(smem);  // [WARPS][D]
    float* sm_m = sm_acc + WARPS * D;
    float* sm_l = sm_m + WARPS;
    float* part = sm_l + WARPS;
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
    for (int e = 0; e < E; e++) sm_acc[warp * D + lane * E + e] = acc[e];
    __syncthreads();
    if (warp == 0) {
        const float2 ml = merge_states<E, WARPS>(sm_m, sm_l, sm_acc, D, lane, acc);
        for (int e = 0; e < E; e++) part[lane * E + e] = acc[e];
        if (lane == 0) { part[D] = ml.x; part[D + 1] = ml.y; }
    }
    cluster.sync();  // every CTA's `part` is written
    if (cluster.block_rank() == 0 && warp == 0) {
        float pm[CS], pl[CS];
        const float* rp[CS];
#pragma unroll
        for (int r = 0; r < CS; r++) {
            rp[r] = cluster.map_shared_rank(part, r);
            pm[r] = rp[r][D];
            pl[r] = rp[r][D + 1];
        }
        float mm = NEG_INF;
#pragma unroll
        for (int r = 0; r < CS; r++) mm = fmaxf(mm, pm[r]);
        float ll = 0.f, out[E];
        for (int e = 0; e < E; e++) out[e] = 0.f;
#pragma unroll
        for (int r = 0; r < CS; r++) {
            if (pm[r] == NEG_INF) continue;
            const float f = exp2f(pm[r] - mm);
            ll += pl[r] * f;
            for (int e = 0; e < E; e++) out[e] += rp[r][lane * E + e] * f;
        }
        T* op = o + b * q_b + (long long)i * q_t + (long long)h * D + lane * E;
        for (int e = 0; e < E; e++) op[e] = from_f<T>(ll > 0.f ? out[e] / ll : 0.f);
    }
    cluster.sync();  // no CTA leaves while the first one still reads its shared memory
}

// Decode, GQA-aware, on tensor cores: one CTA per (split, KV head, batch * t_q) handles every
// query head of the KV head's group (G <= 8), so each K/V row is read once for the group. The G
// queries are the first rows of a 16-row mma A tile kept in registers. K/V tiles of BN = 64 keys
// stream through a STAGES-deep cp.async pipeline (swizzled rows: conflict-free ldmatrix); each
// warp takes 16 keys of a tile: S = Q K^T (m16n8k16), an online softmax per head row, O += P V
// with P straight from the S registers — the prefill kernel's structure with warps splitting the
// keys instead of the queries. The warps' states merge in shared memory at the end; partials go
// to the workspace `span_attn_combine` reduces.
//
// Dense (LIST false): the keys are the tokens [0, p]; every row admits each.
// HiP (LIST true): the keys are the group's list, the shared segments once for all heads (sink,
// then window) and after them each head's mask blocks (every slot, as in `key_list` uncounted):
//   [0, len_a)                       sink      admitted by every head of the group
//   [len_a, len_a + len_c)           window    admitted by every head
//   + r * max_blocks * block_k ...   head r's blocks, admitted by head r alone (as `admit` says)
// so a token two heads selected is loaded twice but attended once per head. The CTA places up
// to GROUP list positions at once (location and a bit per admitting head, in shared memory),
// then streams their rows through the stages. One CTA thus serves G rows that the one-row span
// decode serves with G CTAs, and the scores run on tensor cores.

constexpr int DENSE_DEC_STAGES = 3;
constexpr int GQA_GROUP = 512;  // list positions placed at once (LIST)

// STAGES: 3 by default; the opt-in 2 (`span_decode_gqa_s2_*`) leaves one tile in flight while
// the warps attend to another, for 73 KB of shared memory instead of 105 (three CTAs a
// multiprocessor instead of two, at head dim 128).
template <typename T, int D, bool LIST, int STAGES = DENSE_DEC_STAGES>
__device__ void gqa_decode_mma(const T* __restrict__ q, long long q_b, long long q_t, int t_q, int heads_q,
                               KvArgs kv, MaskArgs mask, float scale_log2, int keys_per_split,
                               float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc,
                               int n_splits) {
    constexpr int WARPS = 4, NT = 32 * WARPS, BN = 16 * WARPS;
    static_assert(STAGES >= 2 && STAGES * 2 * BN * D * (int)sizeof(T) >= WARPS * 8 * (D + 2) * 4, "epilogue fits");
    constexpr int CH = D / 8, KD = D / 16, NO = D / 8, LDQ = D + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* tiles = reinterpret_cast<T*>(smem);            // [STAGES][2][BN][D]: K then V of each stage
    T* Qs = tiles + STAGES * 2 * BN * D;              // [16][LDQ]
    long long* kloc = reinterpret_cast<long long*>(Qs + 16 * LDQ);  // LIST: [GQA_GROUP], -1 none
    unsigned char* khm = reinterpret_cast<unsigned char*>(kloc + GQA_GROUP);  // LIST: head bits
    float* mrg = reinterpret_cast<float*>(tiles);     // after the loop: [WARPS][8][D + 2] (acc, m, l)

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int split = blockIdx.x, hk = blockIdx.y;
    const int b = blockIdx.z / t_q, i = blockIdx.z % t_q;
    const int G = heads_q / kv.heads_kv;
    const int len = kv_len(kv, b);
    const int p = len - t_q + i;
    // The positions of this split: tokens (dense) or list positions.
    int start, end;
    KeyList keys{};
    int per_head = 0, shared_len = 0, mb = 0;
    if constexpr (LIST) {
        mb = mask.slots != nullptr ? mask.slots[b] : b;
        if (mask.tks != nullptr) mask.window += len - (int)mask.tks[mb];
        keys = key_list(mask, ((long long)mb * heads_q + hk * G) * mask.n_qblocks + i / mask.block_q, p, p, false);
        per_head = mask.max_blocks * mask.block_k;
        shared_len = keys.len_a + keys.len_c;
        const int L = shared_len + G * per_head;
        const int per = (L + n_splits - 1) / n_splits;
        start = split * per;
        end = min(L, start + per);
    } else {
        start = split * keys_per_split;
        end = min(p + 1, start + keys_per_split);
    }
    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);

    // The group's queries (rows >= G zero).
    for (int c = tid; c < 16 * CH; c += NT) {
        const int r = c / CH, x = (c % CH) * 8;
        const T* src = q + b * q_b + (long long)i * q_t + (long long)(hk * G + min(r, G - 1)) * D + x;
        cp_async16(Qs + r * LDQ + x, src, r < G ? 16 : 0);
    }
    cp_async_commit();
    // LIST: where each of the n list positions from g0 is, and which heads admit it. A thread's
    // PU positions go together through two rounds of loads: their mask slots (start and count),
    // then their rows' block-table entries, instead of a chain of three loads per position.
    auto place = [&](int g0, int n) {
        constexpr int PU = GQA_GROUP / NT;
        int js[PU];
        unsigned bits[PU];
#pragma unroll
        for (int u = 0; u < PU; u++) {
            const int c = tid + u * NT, pos = g0 + c;
            js[u] = -1;
            bits[u] = 0;
            if (c < n && pos < shared_len) {
                const int seg = pos < keys.len_a ? 0 : 2;
                const int j = seg == 0 ? pos : keys.wlo + (pos - keys.len_a);
                if (j < len && admit(j, seg, p, mask.window)) { js[u] = j; bits[u] = (1u << G) - 1; }
            } else if (c < n) {
                const int off = pos - shared_len, r = off / per_head, slot = (off % per_head) / mask.block_k;
                const long long mrow = ((long long)mb * heads_q + hk * G + r) * mask.n_qblocks + i / mask.block_q;
                // Both loads at once: a slot past the count holds no key (its start is ignored).
                const unsigned count = mask.counts[mrow];
                const int j = (int)mask.starts[mrow * mask.max_blocks + slot] + off % mask.block_k;
                if (slot < (int)count && j < len && admit(j, 1, p, mask.window)) { js[u] = j; bits[u] = 1u << r; }
            }
        }
#pragma unroll
        for (int u = 0; u < PU; u++) {
            const int c = tid + u * NT;
            if (c < n) {
                khm[c] = (unsigned char)bits[u];
                kloc[c] = bits[u] != 0 ? kv_loc<D>(kv, b, js[u], hk, false) : -1;
            }
        }
    };
    // K and V rows of tile t (positions t0 + t * BN ...) into its stage (zero rows past `gend` or
    // for no key); dense: every thread computes the location of the rows it copies (recording
    // each row's read once, at its first chunk).
    auto issue = [&](int t0, int gend, int t) {
        T* Kt = tiles + (t % STAGES) * 2 * BN * D;
        T* Vt = Kt + BN * D;
        const int r0 = t0 + t * BN;
        for (int c = tid; c < BN * CH; c += NT) {
            const int r = c / CH, x = c % CH, j = r0 + r;
            long long loc = -1;
            if constexpr (LIST) {
                if (j < gend) loc = kloc[j - t0];
            } else {
                if (j < gend) loc = kv_loc<D>(kv, b, j, hk, x == 0);
            }
            const bool ok = loc != -1;
            cp_async16(Kt + swz_row<D>(r, x), ok ? kv_at<T>(K, kv.bank_k, loc) + x * 8 : K, ok ? 16 : 0);
            cp_async16(Vt + swz_row<D>(r, x), ok ? kv_at<T>(V, kv.bank_v, loc) + x * 8 : V, ok ? 16 : 0);
        }
    };

    uint32_t qf[KD][4];
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_r = NEG_INF, l_r = 0.f;  // row g (rows g + 8 are padding)
    // Dense: one group of every position; LIST: GQA_GROUP positions at a time.
    const int group = LIST ? GQA_GROUP : (end > start ? end - start : 1);
    for (int t0 = start; t0 < end; t0 += group) {
        const int gend = min(end, t0 + group);
        const int n_tiles = (gend - t0 + BN - 1) / BN;
        if constexpr (LIST) {
            place(t0, gend - t0);
            __syncthreads();
        }
#pragma unroll
        for (int t = 0; t < STAGES - 1; t++) {
            if (t < n_tiles) issue(t0, gend, t);
            cp_async_commit();
        }
        if (t0 == start) {
            cp_async_wait_all_but<STAGES - 1>();  // the queries
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], Qs + (lane % 16) * LDQ + kk * 16 + (lane / 16) * 8);
        }
        for (int t = 0; t < n_tiles; t++) {
            cp_async_wait_all_but<STAGES - 2>();
            __syncthreads();  // tile t has landed; every warp is done with tile t - 1's stage
            if (t + STAGES - 1 < n_tiles) issue(t0, gend, t + STAGES - 1);
            cp_async_commit();
            const T* Kt = tiles + (t % STAGES) * 2 * BN * D;
            const T* Vt = Kt + BN * D;
            float s[2][4];
#pragma unroll
            for (int n = 0; n < 2; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                uint32_t bk[4];
                ldsm_x4(bk, Kt + swz_row<D>(warp * 16 + (lane / 16) * 8 + lane % 8, kk * 2 + (lane / 8) % 2));
                mma16816<T>(s[0], qf[kk], bk[0], bk[1]);
                mma16816<T>(s[1], qf[kk], bk[2], bk[3]);
            }
            const int c0 = t * BN + warp * 16 + tq * 2;  // this lane's first column, from t0
            float mx = NEG_INF;
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = c0 + n * 8 + e;
                    bool ok = t0 + c < gend;
                    if constexpr (LIST) ok = ok && ((khm[c] >> g) & 1u);
                    if (!ok) s[n][e] = NEG_INF;
                    mx = fmaxf(mx, s[n][e]);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_r, mx);
            const float ms = m_new == NEG_INF ? 0.f : m_new * scale_log2;
            const float alpha = exp2f(m_r * scale_log2 - ms);
            m_r = m_new;
            uint32_t pf[4];
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 2; n++) {
                const float a0 = exp2f(fmaf(s[n][0], scale_log2, -ms));
                const float a1 = exp2f(fmaf(s[n][1], scale_log2, -ms));
                sum += a0 + a1;
                pf[n * 2] = pack2<T>(a0, a1);
                pf[n * 2 + 1] = 0u;  // rows g + 8: padding
            }
            l_r = l_r * alpha + sum;
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][0] *= alpha;
                o[n][1] *= alpha;
            }
#pragma unroll
            for (int n = 0; n < NO; n += 2) {
                uint32_t bv[4];
                ldsm_x4_t(bv, Vt + swz_row<D>(warp * 16 + lane % 8 + ((lane / 8) % 2) * 8, n + lane / 16));
                mma16816<T>(o[n], pf, bv[0], bv[1]);
                mma16816<T>(o[n + 1], pf, bv[2], bv[3]);
            }
        }
        if (gend < end) {
            // LIST: another group follows; the stages and the placed positions are free again.
            cp_async_wait_all_but<0>();
            __syncthreads();
        }
    }
    cp_async_wait_all_but<0>();
    __syncthreads();  // the stages are free: merge the warps' states there
    l_r += __shfl_xor_sync(0xffffffffu, l_r, 1);
    l_r += __shfl_xor_sync(0xffffffffu, l_r, 2);
    if (g < G) {
        float* row = mrg + (warp * 8 + g) * (D + 2);
#pragma unroll
        for (int n = 0; n < NO; n++) {
            row[n * 8 + tq * 2] = o[n][0];
            row[n * 8 + tq * 2 + 1] = o[n][1];
        }
        if (tq == 0) { row[D] = m_r * scale_log2; row[D + 1] = l_r; }
    }
    __syncthreads();
    constexpr int E = D / 32;
    for (int hg = warp; hg < G; hg += WARPS) {
        float mm = NEG_INF;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, mrg[(w * 8 + hg) * (D + 2) + D]);
        float ll = 0.f, acc[E];
        for (int e = 0; e < E; e++) acc[e] = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float* row = mrg + (w * 8 + hg) * (D + 2);
            const float f = row[D] == NEG_INF ? 0.f : exp2f(row[D] - mm);
            ll += row[D + 1] * f;
            for (int e = 0; e < E; e++) acc[e] += row[lane * E + e] * f;
        }
        const long long prow = (((long long)b * t_q + i) * heads_q + hk * G + hg) * n_splits + split;
        if (lane == 0) { part_m[prow] = mm; part_l[prow] = ll; }
        for (int e = 0; e < E; e++) part_acc[prow * D + lane * E + e] = acc[e];
    }
}

// One warp per (batch, query, head): merges the splits' partial softmax states.
template <typename T, int D>
__device__ void span_attn_combine(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                  const float* __restrict__ part_acc, int n_splits, T* __restrict__ o,
                                  long long o_b, long long o_t, int t_q, int heads_q, int rows) {
    constexpr int E = D / 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int h = row % heads_q, bi = row / heads_q, i = bi % t_q, b = bi / t_q;
    const long long base = (long long)row * n_splits;
    float mm = NEG_INF;
    for (int s = 0; s < n_splits; s++) mm = fmaxf(mm, part_m[base + s]);
    float ll = 0.f, out[E];
    for (int e = 0; e < E; e++) out[e] = 0.f;
    for (int s = 0; s < n_splits; s++) {
        const float ms = part_m[base + s];
        if (ms == NEG_INF) continue;
        const float f = exp2f(ms - mm);
        ll += part_l[base + s] * f;
        for (int e = 0; e < E; e++) out[e] += part_acc[(base + s) * D + lane * E + e] * f;
    }
    T* op = o + b * o_b + (long long)i * o_t + (long long)h * D + lane * E;
    for (int e = 0; e < E; e++) op[e] = from_f<T>(ll > 0.f ? out[e] / ll : 0.f);
}

// ------------------------------------------------------------------------------------------------
// Entry points, one per (dtype, head dim[, warps]).

#define PREFILL(NAME, T, D, W)                                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * W) NAME(const T* q, T* o, long long q_b, long long q_t,      \
                                                              int t_q, int heads_q, KvArgs kv, MaskArgs mask,     \
                                                              float scale_log2) {                                 \
        pdl_entry(); span_attn_prefill<T, D, W>(q, o, q_b, q_t, t_q, heads_q, kv, mask, scale_log2);                          \
    }
#define DECODE_FORM(NAME, T, D, CS, CHUNK, STAGES, MINB, MAXK)                                                    \
    extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(32 * DECODE_WARPS, MINB)               \
        NAME(const T* q, T* o, long long q_b, long long q_t, int t_q, int heads_q, KvArgs kv, MaskArgs mask,       \
             float scale_log2) {                                                                                   \
        pdl_entry(); span_attn_decode<T, D, CS, CHUNK, STAGES, MAXK>(q, o, q_b, q_t, t_q, heads_q, kv, mask, scale_log2);       \
    }
// The forms of hip-kernels/src/cuda/mod.rs's `span_decode_form` (suffix, CTAs a row, keys a stage,
// stages, CTAs a multiprocessor the registers must allow, keys placed at once).
#define DECODE(NAME, T, D)                                       \
    DECODE_FORM(NAME, T, D, DECODE_CS, DECODE_CHUNK, 1, 0, 0)    \
    DECODE_FORM(NAME##_c4, T, D, 4, DECODE_CHUNK, 1, 0, 0)       \
    DECODE_FORM(NAME##_k64, T, D, DECODE_CS, 64, 1, 0, 0)        \
    DECODE_FORM(NAME##_p8, T, D, DECODE_CS, 32, 2, 6, 0)         \
    DECODE_FORM(NAME##_p4, T, D, 4, 32, 2, 6, 0)                 \
    DECODE_FORM(NAME##_p4w, T, D, 4, 64, 2, 3, 0)                \
    DECODE_FORM(NAME##_p2, T, D, 2, 64, 2, 3, 0)                 \
    DECODE_FORM(NAME##_q2, T, D, 2, 32, 4, 3, 512)               \
    DECODE_FORM(NAME##_q2w, T, D, 2, 64, 3, 2, 512)              \
    DECODE_FORM(NAME##_q8, T, D, DECODE_CS, 32, 3, 4, 128)
#define COMBINE(NAME, T, D)                                                                                        \
    extern "C" __global__ void NAME(const float* part_m, const float* part_l, const float* part_acc, int n_splits, \
                                    T* o, long long o_b, long long o_t, int t_q, int heads_q, int rows) {          \
        pdl_entry(); span_attn_combine<T, D>(part_m, part_l, part_acc, n_splits, o, o_b, o_t, t_q, heads_q, rows);             \
    }

#define DECODE_GQA(NAME, T, D, LIST, STAGES)                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        NAME(const T* q, long long q_b, long long q_t, int t_q, int heads_q, KvArgs kv, MaskArgs mask,             \
             float scale_log2, int keys_per_split, float* part_m, float* part_l, float* part_acc, int n_splits) {   \
        pdl_entry(); gqa_decode_mma<T, D, LIST, STAGES>(q, q_b, q_t, t_q, heads_q, kv, mask, scale_log2, keys_per_split,       \
                                           part_m, part_l, part_acc, n_splits);                                    \
    }
#define ALL(TN, T)                                     \
    PREFILL(span_prefill_##TN##_d64_w1, T, 64, 1)      \
    PREFILL(span_prefill_##TN##_d64_w2, T, 64, 2)      \
    PREFILL(span_prefill_##TN##_d64_w4, T, 64, 4)      \
    PREFILL(span_prefill_##TN##_d64_w8, T, 64, 8)      \
    PREFILL(span_prefill_##TN##_d128_w1, T, 128, 1)    \
    PREFILL(span_prefill_##TN##_d128_w2, T, 128, 2)    \
    PREFILL(span_prefill_##TN##_d128_w4, T, 128, 4)    \
    PREFILL(span_prefill_##TN##_d128_w8, T, 128, 8)    \
    DECODE(span_decode_##TN##_d64, T, 64)              \
    DECODE(span_decode_##TN##_d128, T, 128)            \
    DECODE_GQA(dense_decode_gqa_##TN##_d64, T, 64, false, 3)   \
    DECODE_GQA(dense_decode_gqa_##TN##_d128, T, 128, false, 3) \
    DECODE_GQA(span_decode_gqa_##TN##_d64, T, 64, true, 3)     \
    DECODE_GQA(span_decode_gqa_##TN##_d128, T, 128, true, 3)   \
    DECODE_GQA(span_decode_gqa_s2_##TN##_d64, T, 64, true, 2)  \
    DECODE_GQA(span_decode_gqa_s2_##TN##_d128, T, 128, true, 2) \
    COMBINE(span_combine_##TN##_d64, T, 64)            \
    COMBINE(span_combine_##TN##_d128, T, 128)

ALL(bf16, __nv_bfloat16)
ALL(f16, __half)
