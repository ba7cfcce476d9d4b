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
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Where the keys and values are and which of them a row of queries sees.
struct KvArgs {
    const void* k;
    const void* v;
    long long kv_b;       // batch stride (elements), contiguous layout
    long long kv_t;       // token (row) stride (elements)
    const int* table;     // block table [B, table_stride] or nullptr for contiguous K/V
    int table_stride;
    int page;             // tokens per cache block (paged layout)
    int t_k;
    int heads_kv;
};

struct MaskArgs {
    const uint32_t* starts;  // [B, Hq, n_qblocks, max_blocks] or nullptr (dense)
    const uint32_t* counts;  // [B, Hq, n_qblocks]
    int n_qblocks;
    int max_blocks;
    int block_q;             // queries per mask row
    int block_k;             // tokens per mask block
    int sink;
    long long window;        // per-query window (mask window + extra); huge for dense
};

__device__ __forceinline__ long long kv_row(const KvArgs& a, int b, int j) {
    if (a.table != nullptr) {
        int blk = a.table[(long long)b * a.table_stride + j / a.page];
        return ((long long)blk * a.page + j % a.page) * a.kv_t;
    }
    return (long long)b * a.kv_b + (long long)j * a.kv_t;
}

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
__device__ __forceinline__ KeyList key_list(const MaskArgs& m, long long row, int p_first, int p_last) {
    KeyList l;
    l.block_k = m.block_k;
    if (m.starts == nullptr) {
        l.len_a = 0; l.n_b = 0; l.starts = nullptr; l.wlo = 0; l.len_c = p_last + 1;
        return l;
    }
    l.len_a = min(m.sink, p_last + 1);
    l.n_b = (int)m.counts[row];
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

// ------------------------------------------------------------------------------------------------
// Prefill: one CTA per (query tile of 16 * WARPS rows, query head, batch); tensor-core tiles
// (WMMA 16x16x16) for S = Q K^T and O += P V, online softmax in shared memory.

template <typename T, int D, int WARPS>
__device__ void span_attn_prefill(const T* __restrict__ q, T* __restrict__ o, long long q_b, long long q_t,
                                  int t_q, int heads_q, KvArgs kv, MaskArgs mask, float scale_log2) {
    constexpr int BM = 16 * WARPS;
    constexpr int BN = 64;
    constexpr int NT = 32 * WARPS;
    constexpr int LDQ = D + 8;   // halves
    constexpr int LDK = D + 8;
    constexpr int LDS = BN + 4;  // floats
    constexpr int LDP = BN + 8;  // halves
    constexpr int LDO = D + 4;   // floats
    constexpr int VEC = 8;       // halves per 16-byte load

    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);
    T* Ks = Qs + BM * LDQ;
    float* Ss = reinterpret_cast<float*>(Ks + BN * LDK);
    T* Ps = reinterpret_cast<T*>(Ss + BM * LDS);
    float* Os = reinterpret_cast<float*>(Ps + BM * LDP);
    float* m_s = Os + BM * LDO;
    float* l_s = m_s + BM;
    int* kj = reinterpret_cast<int*>(l_s + BM);
    int* kseg = kj + BN;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m0 = blockIdx.x * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int group = heads_q / kv.heads_kv;
    const int hk = h / group;
    const int offset = kv.t_k - t_q;
    const int rows = min(BM, t_q - m0);
    const int p_first = offset + m0, p_last = offset + m0 + rows - 1;
    const long long mrow = ((long long)b * heads_q + h) * mask.n_qblocks + m0 / mask.block_q;
    const KeyList keys = key_list(mask, mrow, p_first, p_last);
    const int L = keys.len();

    // Q tile, zero rows past the end; O, m, l.
    for (int c = tid; c < BM * (D / VEC); c += NT) {
        int r = c / (D / VEC), x = (c % (D / VEC)) * VEC;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < rows) val = *reinterpret_cast<const uint4*>(q + b * q_b + (long long)(m0 + r) * q_t + (long long)h * D + x);
        *reinterpret_cast<uint4*>(Qs + r * LDQ + x) = val;
    }
    for (int c = tid; c < BM * D; c += NT) Os[(c / D) * LDO + c % D] = 0.f;
    for (int r = tid; r < BM; r += NT) { m_s[r] = NEG_INF; l_s[r] = 0.f; }

    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);
    for (int t0 = 0; t0 < L; t0 += BN) {
        __syncthreads();  // previous tile done with Ks / kj
        for (int c = tid; c < BN; c += NT) {
            int seg = -1, j = -1;
            if (t0 + c < L) j = keys.at(t0 + c, &seg);
            if (j >= kv.t_k || j > p_last) j = -1;
            kj[c] = j;
            kseg[c] = seg;
        }
        __syncthreads();
        for (int c = tid; c < BN * (D / VEC); c += NT) {
            int r = c / (D / VEC), x = (c % (D / VEC)) * VEC;
            int j = kj[r];
            uint4 val = make_uint4(0, 0, 0, 0);
            if (j >= 0) val = *reinterpret_cast<const uint4*>(K + kv_row(kv, b, j) + (long long)hk * D + x);
            *reinterpret_cast<uint4*>(Ks + r * LDK + x) = val;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
        {
            const T* qw = Qs + warp * 16 * LDQ;
            for (int n = 0; n < BN / 16; n++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
                for (int kk = 0; kk < D / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
                    wmma::load_matrix_sync(a, qw + kk * 16, LDQ);
                    wmma::load_matrix_sync(bf, Ks + n * 16 * LDK + kk * 16, LDK);
                    wmma::mma_sync(acc, a, bf, acc);
                }
                wmma::store_matrix_sync(Ss + warp * 16 * LDS + n * 16, acc, LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();

        // Online softmax of this warp's rows; P to shared memory; O rows rescaled.
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            if (row >= rows) {
                Ps[row * LDP + lane] = from_f<T>(0.f);
                Ps[row * LDP + lane + 32] = from_f<T>(0.f);
                continue;
            }
            const int p = offset + m0 + row;
            float s0 = admit(kj[lane], kseg[lane], p, mask.window) ? Ss[row * LDS + lane] * scale_log2 : NEG_INF;
            float s1 = admit(kj[lane + 32], kseg[lane + 32], p, mask.window) ? Ss[row * LDS + lane + 32] * scale_log2
                                                                           : NEG_INF;
            const float m_old = m_s[row];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
            float p0 = 0.f, p1 = 0.f, alpha = 1.f;
            if (m_new != NEG_INF) {
                p0 = s0 == NEG_INF ? 0.f : exp2f(s0 - m_new);
                p1 = s1 == NEG_INF ? 0.f : exp2f(s1 - m_new);
                alpha = m_old == NEG_INF ? 0.f : exp2f(m_old - m_new);
            }
            const T h0 = from_f<T>(p0), h1 = from_f<T>(p1);
            // Sum what P·V will use: the rounded probabilities.
            const float sum = warp_sum(to_f(h0) + to_f(h1));
            Ps[row * LDP + lane] = h0;
            Ps[row * LDP + lane + 32] = h1;
            __syncwarp();
            if (lane == 0) {
                l_s[row] = l_s[row] * alpha + sum;
                m_s[row] = m_new;
            }
            if (alpha != 1.f)
                for (int d = lane; d < D; d += 32) Os[row * LDO + d] *= alpha;
        }
        __syncthreads();  // every warp is done with K

        for (int c = tid; c < BN * (D / VEC); c += NT) {
            int r = c / (D / VEC), x = (c % (D / VEC)) * VEC;
            int j = kj[r];
            uint4 val = make_uint4(0, 0, 0, 0);
            if (j >= 0) val = *reinterpret_cast<const uint4*>(V + kv_row(kv, b, j) + (long long)hk * D + x);
            *reinterpret_cast<uint4*>(Ks + r * LDK + x) = val;
        }
        __syncthreads();

        // O += P V for this warp's rows.
        for (int n = 0; n < D / 16; n++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            float* ow = Os + warp * 16 * LDO + n * 16;
            wmma::load_matrix_sync(acc, ow, LDO, wmma::mem_row_major);
            for (int kk = 0; kk < BN / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
                wmma::load_matrix_sync(a, Ps + warp * 16 * LDP + kk * 16, LDP);
                wmma::load_matrix_sync(bf, Ks + kk * 16 * LDK + n * 16, LDK);
                wmma::mma_sync(acc, a, bf, acc);
            }
            wmma::store_matrix_sync(ow, acc, LDO, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int c = tid; c < rows * D; c += NT) {
        int r = c / D, d = c % D;
        float l = l_s[r];
        float val = l > 0.f ? Os[r * LDO + d] / l : 0.f;
        o[b * q_b + (long long)(m0 + r) * q_t + (long long)h * D + d] = from_f<T>(val);
    }
}

template <int D, int WARPS>
constexpr int prefill_smem_bytes() {
    return (16 * WARPS * (D + 8) + 64 * (D + 8)) * 2 + 16 * WARPS * (64 + 4) * 4 + 16 * WARPS * (64 + 8) * 2 +
           16 * WARPS * (D + 4) * 4 + 2 * 16 * WARPS * 4 + 2 * 64 * 4;
}

// ------------------------------------------------------------------------------------------------
// Decode: split-KV flash-decoding. One CTA per (split, query head, batch * t_q); each warp takes
// every WARPS-th key of the split; partial (m, l, acc) go to a workspace that `span_attn_combine`
// reduces.

template <typename T, int D>
__device__ void span_attn_decode(const T* __restrict__ q, long long q_b, long long q_t, int t_q, int heads_q,
                                 KvArgs kv, MaskArgs mask, float scale_log2, int keys_per_split,
                                 float* __restrict__ part_m, float* __restrict__ part_l,
                                 float* __restrict__ part_acc, int n_splits) {
    constexpr int WARPS = 4;
    constexpr int E = D / 32;  // elements per lane
    __shared__ float sm_m[WARPS], sm_l[WARPS];
    __shared__ float sm_acc[WARPS][D];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int split = blockIdx.x, h = blockIdx.y;
    const int b = blockIdx.z / t_q, i = blockIdx.z % t_q;
    const int group = heads_q / kv.heads_kv;
    const int hk = h / group;
    const int p = kv.t_k - t_q + i;
    const long long mrow = ((long long)b * heads_q + h) * mask.n_qblocks + i / mask.block_q;
    const KeyList keys = key_list(mask, mrow, p, p);
    const int L = keys.len();
    const int start = split * keys_per_split, end = min(L, start + keys_per_split);

    float qv[E];
    const T* qp = q + b * q_b + (long long)i * q_t + (long long)h * D + lane * E;
    for (int e = 0; e < E; e++) qv[e] = to_f(qp[e]) * scale_log2;
    float m = NEG_INF, l = 0.f, acc[E];
    for (int e = 0; e < E; e++) acc[e] = 0.f;

    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);
    for (int pos = start + warp; pos < end; pos += WARPS) {
        int seg;
        int j = keys.at(pos, &seg);
        if (j >= kv.t_k || !admit(j, seg, p, mask.window)) continue;
        const long long off = kv_row(kv, b, j) + (long long)hk * D + lane * E;
        float dot = 0.f;
        for (int e = 0; e < E; e++) dot += qv[e] * to_f(K[off + e]);
        const float s = warp_sum(dot);
        const float m_new = fmaxf(m, s);
        const float alpha = m == NEG_INF ? 0.f : exp2f(m - m_new);
        const float pe = exp2f(s - m_new);
        l = l * alpha + pe;
        for (int e = 0; e < E; e++) acc[e] = acc[e] * alpha + pe * to_f(V[off + e]);
        m = m_new;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
    for (int e = 0; e < E; e++) sm_acc[warp][lane * E + e] = acc[e];
    __syncthreads();
    if (warp == 0) {
        float mm = NEG_INF;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, sm_m[w]);
        float ll = 0.f, out[E];
        for (int e = 0; e < E; e++) out[e] = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float f = sm_m[w] == NEG_INF ? 0.f : exp2f(sm_m[w] - mm);
            ll += sm_l[w] * f;
            for (int e = 0; e < E; e++) out[e] += sm_acc[w][lane * E + e] * f;
        }
        const long long prow = (((long long)b * t_q + i) * heads_q + h) * n_splits + split;
        if (lane == 0) { part_m[prow] = mm; part_l[prow] = ll; }
        for (int e = 0; e < E; e++) part_acc[prow * D + lane * E + e] = out[e];
    }
}


// Dense decode, GQA-aware: one CTA per (split, KV head, batch * t_q) handles every query head of
// the KV head's group, so each K/V row is read once. Each warp scores 32 keys at a time, one key
// per lane (all heads of the group), then switches to one slice of the head dim per lane to add
// the 32 weighted V rows. Partials go to the same workspace layout as `span_attn_decode`.
template <typename T, int D, int MAXG>
__device__ void dense_decode_gqa(const T* __restrict__ q, long long q_b, long long q_t, int t_q, int heads_q,
                                 KvArgs kv, float scale_log2, int keys_per_split, float* __restrict__ part_m,
                                 float* __restrict__ part_l, float* __restrict__ part_acc, int n_splits) {
    constexpr int WARPS = 4;
    constexpr int E = D / 32;
    __shared__ float qs[MAXG][D];
    __shared__ float sm_m[WARPS][MAXG], sm_l[WARPS][MAXG];
    __shared__ float sm_acc[WARPS][MAXG][D];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int split = blockIdx.x, hk = blockIdx.y;
    const int b = blockIdx.z / t_q, i = blockIdx.z % t_q;
    const int G = heads_q / kv.heads_kv;
    const int p = kv.t_k - t_q + i;
    const int start = split * keys_per_split, end = min(p + 1, start + keys_per_split);

    for (int c = threadIdx.x; c < G * D; c += 32 * WARPS) {
        int g = c / D, d = c % D;
        qs[g][d] = to_f(q[b * q_b + (long long)i * q_t + (long long)(hk * G + g) * D + d]) * scale_log2;
    }
    __syncthreads();

    float m[MAXG], l[MAXG], acc[MAXG][E];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[g][e] = 0.f;
    }
    const T* K = static_cast<const T*>(kv.k);
    const T* V = static_cast<const T*>(kv.v);
    for (int base = start + warp * 32; base < end; base += WARPS * 32) {
        const int j = base + lane;
        const bool valid = j < end;
        float s[MAXG];
#pragma unroll
        for (int g = 0; g < MAXG; g++) s[g] = 0.f;
        if (valid) {
            const T* kr = K + kv_row(kv, b, j) + (long long)hk * D;
#pragma unroll 4
            for (int x = 0; x < D; x += 8) {
                uint4 raw = *reinterpret_cast<const uint4*>(kr + x);
                const T* k8 = reinterpret_cast<const T*>(&raw);
                float kf[8];
#pragma unroll
                for (int e = 0; e < 8; e++) kf[e] = to_f(k8[e]);
#pragma unroll
                for (int g = 0; g < MAXG; g++) {
                    if (g < G) {
#pragma unroll
                        for (int e = 0; e < 8; e++) s[g] += qs[g][x + e] * kf[e];
                    }
                }
            }
        }
        float pe[MAXG];
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g >= G) { pe[g] = 0.f; continue; }
            const float sv = valid ? s[g] : NEG_INF;
            const float m_new = fmaxf(m[g], warp_max(sv));  // lane 0 is always valid
            const float alpha = m[g] == NEG_INF ? 0.f : exp2f(m[g] - m_new);
            pe[g] = valid ? exp2f(sv - m_new) : 0.f;
            l[g] = l[g] * alpha + warp_sum(pe[g]);
#pragma unroll
            for (int e = 0; e < E; e++) acc[g][e] *= alpha;
            m[g] = m_new;
        }
        const int n = min(32, end - base);
        for (int kk = 0; kk < n; kk++) {
            const T* vr = V + kv_row(kv, b, base + kk) + (long long)hk * D + lane * E;
            float vf[E];
#pragma unroll
            for (int e = 0; e < E; e++) vf[e] = to_f(vr[e]);
#pragma unroll
            for (int g = 0; g < MAXG; g++) {
                const float pg = __shfl_sync(0xffffffffu, pe[g], kk);
#pragma unroll
                for (int e = 0; e < E; e++) acc[g][e] += pg * vf[e];
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g >= G) continue;
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
        for (int e = 0; e < E; e++) sm_acc[warp][g][lane * E + e] = acc[g][e];
    }
    __syncthreads();
    // Warp w merges heads g = w, w + WARPS, ...
    for (int g = warp; g < G; g += WARPS) {
        float mm = NEG_INF;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, sm_m[w][g]);
        float ll = 0.f, out[E];
        for (int e = 0; e < E; e++) out[e] = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float f = sm_m[w][g] == NEG_INF ? 0.f : exp2f(sm_m[w][g] - mm);
            ll += sm_l[w][g] * f;
            for (int e = 0; e < E; e++) out[e] += sm_acc[w][g][lane * E + e] * f;
        }
        const int h = hk * G + g;
        const long long prow = (((long long)b * t_q + i) * heads_q + h) * n_splits + split;
        if (lane == 0) { part_m[prow] = mm; part_l[prow] = ll; }
        for (int e = 0; e < E; e++) part_acc[prow * D + lane * E + e] = out[e];
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
        span_attn_prefill<T, D, W>(q, o, q_b, q_t, t_q, heads_q, kv, mask, scale_log2);                          \
    }
#define DECODE(NAME, T, D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        NAME(const T* q, long long q_b, long long q_t, int t_q, int heads_q, KvArgs kv, MaskArgs mask,             \
             float scale_log2, int keys_per_split, float* part_m, float* part_l, float* part_acc, int n_splits) { \
        span_attn_decode<T, D>(q, q_b, q_t, t_q, heads_q, kv, mask, scale_log2, keys_per_split, part_m, part_l,   \
                               part_acc, n_splits);                                                               \
    }
#define COMBINE(NAME, T, D)                                                                                        \
    extern "C" __global__ void NAME(const float* part_m, const float* part_l, const float* part_acc, int n_splits, \
                                    T* o, long long o_b, long long o_t, int t_q, int heads_q, int rows) {          \
        span_attn_combine<T, D>(part_m, part_l, part_acc, n_splits, o, o_b, o_t, t_q, heads_q, rows);             \
    }

#define DECODE_GQA(NAME, T, D)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        NAME(const T* q, long long q_b, long long q_t, int t_q, int heads_q, KvArgs kv, float scale_log2,          \
             int keys_per_split, float* part_m, float* part_l, float* part_acc, int n_splits) {                    \
        dense_decode_gqa<T, D, 8>(q, q_b, q_t, t_q, heads_q, kv, scale_log2, keys_per_split, part_m, part_l,       \
                                  part_acc, n_splits);                                                             \
    }

#define ALL(TN, T)                                     \
    PREFILL(span_prefill_##TN##_d64_w1, T, 64, 1)      \
    PREFILL(span_prefill_##TN##_d64_w2, T, 64, 2)      \
    PREFILL(span_prefill_##TN##_d64_w4, T, 64, 4)      \
    PREFILL(span_prefill_##TN##_d128_w1, T, 128, 1)    \
    PREFILL(span_prefill_##TN##_d128_w2, T, 128, 2)    \
    PREFILL(span_prefill_##TN##_d128_w4, T, 128, 4)    \
    DECODE(span_decode_##TN##_d64, T, 64)              \
    DECODE(span_decode_##TN##_d128, T, 128)            \
    DECODE_GQA(dense_decode_gqa_##TN##_d64, T, 64)     \
    DECODE_GQA(dense_decode_gqa_##TN##_d128, T, 128)   \
    COMBINE(span_combine_##TN##_d64, T, 64)            \
    COMBINE(span_combine_##TN##_d128, T, 128)

ALL(bf16, __nv_bfloat16)
ALL(f16, __half)
