// HiP mask estimation on CUDA: the hierarchical top-k tree search of hip_kernels::hip_mask (see
// docs/kernels/hip.md, "Mask estimation"), one CTA per (query block, query head, batch).
//
// Per iteration every group of more than one key block splits in two; each new branch is scored
// by its center block (max of q.k over the block's strided queries and the center block's
// strided keys, as one tensor-core GEMM per tile of 64 gathered keys), and the best G branches
// survive (ties to the earlier block), until every group is one block.
//
// Inputs bf16 / f16 token-major (contiguous or paged K, as in span_attn.cu); output: block start
// tokens [B, Hq, n_qblocks, G] sorted ascending (unused slots 0xffffffff) and counts.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

#define NEG_INF (-__int_as_float(0x7f800000))

struct KvArgs {
    const void* k;
    const void* v;
    long long kv_b;
    long long kv_t;
    const int* table;
    int table_stride;
    int page;
    int t_k;
    int heads_kv;
};

struct SearchArgs {
    int t_q;
    int heads_q;
    int block_q, stride_q;
    int block_k, stride_k;
    int sink, window;
    int groups;        // G = k / block_k
    int n_qblocks;
    int cap;           // branch slots in shared memory: a power of two >= 2 * G
};

__device__ __forceinline__ long long kv_row(const KvArgs& a, int b, int j) {
    if (a.table != nullptr) {
        int blk = a.table[(long long)b * a.table_stride + j / a.page];
        return ((long long)blk * a.page + j % a.page) * a.kv_t;
    }
    return (long long)b * a.kv_b + (long long)j * a.kv_t;
}

// Sorts n_pow2 (key, value) pairs in shared memory by `before(a, b)` (bitonic; all threads).
template <typename Less>
__device__ void bitonic_sort(float* score, uint32_t* a, uint32_t* b, int n_pow2, Less before) {
    for (int size = 2; size <= n_pow2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < n_pow2; i += blockDim.x) {
                int j = i ^ stride;
                if (j > i) {
                    bool up = (i & size) == 0;
                    bool swap = up ? before(score[j], a[j], score[i], a[i]) : before(score[i], a[i], score[j], a[j]);
                    if (swap) {
                        float ts = score[i]; score[i] = score[j]; score[j] = ts;
                        uint32_t ta = a[i]; a[i] = a[j]; a[j] = ta;
                        uint32_t tb = b[i]; b[i] = b[j]; b[j] = tb;
                    }
                }
            }
        }
    }
    __syncthreads();
}

// Higher score first; ties to the earlier block; padding (start 0xffffffff) last.
struct BestFirst {
    __device__ __forceinline__ bool operator()(float s1, uint32_t a1, float s2, uint32_t a2) const {
        if (a1 == 0xffffffffu || a2 == 0xffffffffu) return a1 < a2;
        if (s1 != s2) return s1 > s2;
        return a1 < a2;
    }
};
struct Ascending {
    __device__ __forceinline__ bool operator()(float, uint32_t a1, float, uint32_t a2) const { return a1 < a2; }
};

template <typename T, int D>
__device__ void hip_mask_search(const T* __restrict__ q, long long q_b, long long q_t, KvArgs kv, SearchArgs sa,
                                float scale, uint32_t* __restrict__ out_starts, uint32_t* __restrict__ out_counts) {
    constexpr int WARPS = 4, NT = 128, BN = 64, QR = 32;  // at most QR strided queries per block
    constexpr int LDQ = D + 8, LDK = D + 8, LDS = BN + 4;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);                 // [QR][LDQ]
    T* Ks = Qs + QR * LDQ;                              // [BN][LDK]
    float* Ss = reinterpret_cast<float*>(Ks + BN * LDK);  // [QR][LDS]
    float* kmax = Ss + QR * LDS;                        // [BN]
    int* kbranch = reinterpret_cast<int*>(kmax + BN);   // [BN] branch of each gathered key, -1 none
    int* kj = kbranch + BN;                             // [BN] token of each gathered key, -1 none
    float* score = reinterpret_cast<float*>(kj + BN);   // [cap]
    uint32_t* gs = reinterpret_cast<uint32_t*>(score + sa.cap);
    uint32_t* ge = gs + sa.cap;
    __shared__ int s_n, s_more;

    const int tid = threadIdx.x, warp = tid / 32;
    const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (sa.heads_q / kv.heads_kv);
    const int i0 = m * sa.block_q, i1 = min(i0 + sa.block_q, sa.t_q);
    const int p_last = kv.t_k - sa.t_q + i1 - 1;
    int search_end = p_last + 1 - sa.window;
    if (search_end < sa.sink) search_end = sa.sink;
    const int n_cand = (search_end - sa.sink + sa.block_k - 1) / sa.block_k;
    const int G = sa.groups;
    const long long row = ((long long)b * sa.heads_q + h) * sa.n_qblocks + m;
    uint32_t* out = out_starts + row * G;

    if (n_cand <= G) {
        for (int c = tid; c < G; c += NT) out[c] = c < n_cand ? (uint32_t)(sa.sink + c * sa.block_k) : 0xffffffffu;
        if (tid == 0) out_counts[row] = n_cand;
        return;
    }

    // Strided queries, pre-scaled by nothing (scale applied to the max later; it is positive).
    const int nq = (i1 - i0 + sa.stride_q - 1) / sa.stride_q;
    for (int c = tid; c < QR * (D / 8); c += NT) {
        int r = c / (D / 8), x = (c % (D / 8)) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < nq) val = *reinterpret_cast<const uint4*>(q + b * q_b + (long long)(i0 + r * sa.stride_q) * q_t + (long long)h * D + x);
        *reinterpret_cast<uint4*>(Qs + r * LDQ + x) = val;
    }
    // Initial groups: ranges of `step` blocks at multiples of `step`.
    int step = 1;
    while ((n_cand + step - 1) / step > G) step <<= 1;
    const int n0 = (n_cand + step - 1) / step;
    for (int g = tid; g < n0; g += NT) {
        gs[g] = g * step;
        ge[g] = min((g + 1) * step, n_cand);
    }
    if (tid == 0) s_n = n0;
    __syncthreads();

    const int kpb = (sa.block_k + sa.stride_k - 1) / sa.stride_k;  // keys per branch (<= BN)
    const int bpt = BN / kpb;                                       // branches per key tile
    const T* K = static_cast<const T*>(kv.k);
    for (;;) {
        // Split: groups [0, n) -> branches [0, nb) in place, from the back (two slots per group).
        const int n = s_n;
        __syncthreads();
        if (tid == 0) {
            int nb = 0, more = 0;
            for (int g = 0; g < n; g++) nb += ge[g] - gs[g] > 1 ? 2 : 1;
            // Write from the back so that no group is overwritten before it is read.
            int w = nb;
            for (int g = n - 1; g >= 0; g--) {
                uint32_t s = gs[g], e = ge[g];
                if (e - s > 1) {
                    uint32_t mid = s + (e - s) / 2;
                    gs[w - 1] = mid; ge[w - 1] = e;
                    gs[w - 2] = s; ge[w - 2] = mid;
                    w -= 2;
                    more |= (mid - s > 1) || (e - mid > 1);
                } else {
                    gs[w - 1] = s; ge[w - 1] = e;
                    w -= 1;
                }
            }
            s_n = nb;
            s_more = more;
        }
        __syncthreads();
        const int nb = s_n;
        // Score every branch by its center block.
        for (int t0 = 0; t0 < nb; t0 += bpt) {
            for (int c = tid; c < BN; c += NT) {
                int br = t0 + c / kpb, r = c % kpb;
                int j = -1;
                if (c / kpb < bpt && br < nb) {
                    int center = gs[br] + (ge[br] - gs[br]) / 2;
                    j = sa.sink + center * sa.block_k + r * sa.stride_k;
                    if (j >= search_end || j >= sa.sink + (center + 1) * sa.block_k) j = -1;
                }
                kbranch[c] = j >= 0 ? br : -1;
                kj[c] = j;
            }
            __syncthreads();
            // Gather: every thread issues independent 16-byte loads.
            for (int c = tid; c < BN * (D / 8); c += NT) {
                int r = c / (D / 8), x = (c % (D / 8)) * 8;
                int j = kj[r];
                uint4 val = make_uint4(0, 0, 0, 0);
                if (j >= 0) val = *reinterpret_cast<const uint4*>(K + kv_row(kv, b, j) + (long long)hk * D + x);
                *reinterpret_cast<uint4*>(Ks + r * LDK + x) = val;
            }
            __syncthreads();
            // S = Qs Ks^T: QR x BN = 2 x 4 tiles, two per warp.
            for (int tile = warp; tile < (QR / 16) * (BN / 16); tile += WARPS) {
                int tr = tile / (BN / 16), tc = tile % (BN / 16);
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
                for (int kk = 0; kk < D / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
                    wmma::load_matrix_sync(a, Qs + tr * 16 * LDQ + kk * 16, LDQ);
                    wmma::load_matrix_sync(bf, Ks + tc * 16 * LDK + kk * 16, LDK);
                    wmma::mma_sync(acc, a, bf, acc);
                }
                wmma::store_matrix_sync(Ss + tr * 16 * LDS + tc * 16, acc, LDS, wmma::mem_row_major);
            }
            __syncthreads();
            for (int c = tid; c < BN; c += NT) {
                float best = NEG_INF;
                if (kbranch[c] >= 0)
                    for (int r = 0; r < nq; r++) best = fmaxf(best, Ss[r * LDS + c]);
                kmax[c] = best;
            }
            __syncthreads();
            for (int x = tid; x < bpt; x += NT) {
                int br = t0 + x;
                if (br < nb) {
                    float best = NEG_INF;
                    for (int r = 0; r < kpb; r++) best = fmaxf(best, kmax[x * kpb + r]);
                    score[br] = best * scale;
                }
            }
            __syncthreads();
        }
        // Keep the best G branches.
        int np2 = 1;
        while (np2 < nb) np2 <<= 1;
        for (int x = nb + tid; x < np2; x += NT) { score[x] = NEG_INF; gs[x] = 0xffffffffu; ge[x] = 0xffffffffu; }
        bitonic_sort(score, gs, ge, np2, BestFirst());
        if (tid == 0) s_n = min(nb, G);
        __syncthreads();
        if (!s_more) break;
    }
    // Every group is one block: output the starts, ascending.
    const int n = s_n;
    int np2 = 1;
    while (np2 < n) np2 <<= 1;
    for (int x = n + tid; x < np2; x += NT) { gs[x] = 0xffffffffu; ge[x] = 0xffffffffu; }
    bitonic_sort(score, gs, ge, np2, Ascending());
    for (int c = tid; c < G; c += NT) out[c] = c < n ? (uint32_t)(sa.sink + gs[c] * sa.block_k) : 0xffffffffu;
    if (tid == 0) out_counts[row] = n;
}

#define MASK(NAME, T, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(const T* q, long long q_b, long long q_t, KvArgs kv, \
                                                           SearchArgs sa, float scale, uint32_t* starts,       \
                                                           uint32_t* counts) {                                 \
        hip_mask_search<T, D>(q, q_b, q_t, kv, sa, scale, starts, counts);                                    \
    }

MASK(hip_mask_bf16_d64, __nv_bfloat16, 64)
MASK(hip_mask_bf16_d128, __nv_bfloat16, 128)
MASK(hip_mask_f16_d64, __half, 64)
MASK(hip_mask_f16_d128, __half, 128)
