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
#include <stdint.h>

#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

struct SearchArgs {
    int t_q;
    int heads_q;
    int block_q, stride_q;
    int block_k, stride_k;
    int sink, window;
    int groups;        // G = k / block_k
    int n_qblocks;
    int cap;           // branch slots in shared memory: a power of two >= 2 * G
    // A decode batch into per-sequence mask slots (null: batch entry b writes mask batch b):
    // entry b writes slot `slots[b]` and leaves its key count (`kv_len`) in `tks[slot]`.
    const int* slots;
    unsigned* tks;
};

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

// The same sort with one element per thread in registers (blockDim.x >= n_pow2): exchanges at
// strides below 32 are warp shuffles, only the wider ones go through shared memory (10 of the 45
// stages for 512 elements). With `top_half`, it stops after the first merge stage of the last
// size: the two halves are then sorted in opposite directions and that stage leaves the better
// of each pair (i, i + n_pow2 / 2) in the first half, which holds the best n_pow2 / 2 elements,
// unordered.
template <typename Less>
__device__ void bitonic_sort_regs(float* score, uint32_t* a, uint32_t* b, int n_pow2, Less before,
                                  bool top_half = false) {
    const int i = threadIdx.x;
    const bool mine = i < n_pow2;
    __syncthreads();
    float s = mine ? score[i] : 0.f;
    uint32_t x = mine ? a[i] : 0u, y = mine ? b[i] : 0u;
    for (int size = 2; size <= n_pow2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            float ps = s;
            uint32_t px = x, py = y;
            if (stride >= 32) {
                __syncthreads();
                if (mine) { score[i] = s; a[i] = x; b[i] = y; }
                __syncthreads();
                if (mine) { ps = score[i ^ stride]; px = a[i ^ stride]; py = b[i ^ stride]; }
            } else {
                ps = __shfl_xor_sync(0xffffffffu, s, stride);
                px = __shfl_xor_sync(0xffffffffu, x, stride);
                py = __shfl_xor_sync(0xffffffffu, y, stride);
            }
            // The lower index of a pair keeps the element that comes first in an ascending run.
            const bool first = ((i & stride) == 0) == ((i & size) == 0);
            const bool take = first ? before(ps, px, s, x) : before(s, x, ps, px);
            if (take) { s = ps; x = px; y = py; }
            if (top_half && size == n_pow2) break;
        }
    }
    __syncthreads();
    if (mine) { score[i] = s; a[i] = x; b[i] = y; }
    __syncthreads();
}

// Exclusive prefix sum of `x` over the block (blockDim.x a multiple of 32, at most 32 warps);
// `total` gets the sum. Ends with a barrier.
__device__ __forceinline__ int block_exclusive_scan(int x, int* total, int* tmp) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int incl = x;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) tmp[warp] = incl;
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < warps; w++) {
        if (w < warp) before += tmp[w];
        sum += tmp[w];
    }
    *total = sum;
    __syncthreads();
    return before + incl - x;
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

// ------------------------------------------------------------------------------------------------
// Steps both search kernels share (all threads of the CTA call each).

// The mask row of this CTA (query block `qblock`, head blockIdx.y, batch blockIdx.z): its
// queries [i0, i1), the end of its candidate range, the number of candidate key blocks. The
// batch entry's first CTA records the entry's key count for a slotted mask.
struct SearchRow {
    int i0, i1, search_end, n_cand;
    long long row;
    uint32_t* out;  // G block starts
};

__device__ __forceinline__ SearchRow search_row(const KvArgs& kv, const SearchArgs& sa, uint32_t* out_starts,
                                                int qblock) {
    SearchRow r;
    r.i0 = qblock * sa.block_q;
    r.i1 = min(r.i0 + sa.block_q, sa.t_q);
    const int len = kv_len(kv, blockIdx.z);
    const int p_last = len - sa.t_q + r.i1 - 1;
    r.search_end = max(p_last + 1 - sa.window, sa.sink);
    r.n_cand = (r.search_end - sa.sink + sa.block_k - 1) / sa.block_k;
    const int mb = sa.slots != nullptr ? sa.slots[blockIdx.z] : (int)blockIdx.z;
    if (sa.tks != nullptr && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) sa.tks[mb] = (unsigned)len;
    r.row = ((long long)mb * sa.heads_q + blockIdx.y) * sa.n_qblocks + qblock;
    r.out = out_starts + r.row * sa.groups;
    return r;
}

// With no more candidates than groups every one is selected: writes the row and returns true.
// (Only a `writer` CTA writes.)
__device__ __forceinline__ bool select_all_if_few(const SearchRow& r, const SearchArgs& sa, uint32_t* out_counts,
                                                  bool writer = true) {
    if (r.n_cand > sa.groups) return false;
    if (!writer) return true;
    for (int c = threadIdx.x; c < sa.groups; c += blockDim.x)
        r.out[c] = c < r.n_cand ? (uint32_t)(sa.sink + c * sa.block_k) : 0xffffffffu;
    if (threadIdx.x == 0) out_counts[r.row] = r.n_cand;
    return true;
}

// Initial groups: ranges of `step` candidate blocks at multiples of `step`, the smallest power of
// two that leaves at most G groups. Ends with a barrier.
__device__ __forceinline__ void init_groups(uint32_t* gs, uint32_t* ge, int n_cand, int G, int* s_n) {
    int step = 1;
    while ((n_cand + step - 1) / step > G) step <<= 1;
    const int n0 = (n_cand + step - 1) / step;
    for (int g = threadIdx.x; g < n0; g += blockDim.x) {
        gs[g] = g * step;
        ge[g] = min((g + 1) * step, n_cand);
    }
    if (threadIdx.x == 0) *s_n = n0;
    __syncthreads();
}

// Splits every group of more than one block in two, in parallel (each thread a contiguous run of
// groups, a block-wide scan places its branches), and swaps the branches into (gs, ge). Returns
// the number of branches; `more` tells whether any branch still spans more than one block.
__device__ __forceinline__ int split_groups(uint32_t*& gs, uint32_t*& ge, uint32_t*& ns, uint32_t*& ne, int n,
                                            int* scan_tmp, int* more) {
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int g0 = min(n, (int)threadIdx.x * per), g1 = min(n, g0 + per);
    int cnt = 0, wider = 0;
    for (int g = g0; g < g1; g++) cnt += ge[g] - gs[g] > 1 ? 2 : 1;
    int total;
    int w = block_exclusive_scan(cnt, &total, scan_tmp);
    for (int g = g0; g < g1; g++) {
        uint32_t s0 = gs[g], e0 = ge[g];
        if (e0 - s0 > 1) {
            uint32_t mid = s0 + (e0 - s0) / 2;
            ns[w] = s0; ne[w] = mid;
            ns[w + 1] = mid; ne[w + 1] = e0;
            w += 2;
            wider |= (mid - s0 > 1) || (e0 - mid > 1);
        } else {
            ns[w] = s0; ne[w] = e0;
            w += 1;
        }
    }
    *more = __syncthreads_or(wider);
    uint32_t* t = gs; gs = ns; ns = t;
    t = ge; ge = ne; ne = t;
    return total;
}

// Sorts the first n entries by `before` after padding to a power of two; in registers when the
// CTA has a thread per entry. With `top_half`, only moves the best half to the front (see
// bitonic_sort_regs).
template <typename Less>
__device__ __forceinline__ void sort_padded(float* score, uint32_t* gs, uint32_t* ge, int n, Less before,
                                            bool top_half_if_exact = false, int half = 0) {
    int np2 = 1;
    while (np2 < n) np2 <<= 1;
    for (int x = n + threadIdx.x; x < np2; x += blockDim.x) { score[x] = NEG_INF; gs[x] = 0xffffffffu; ge[x] = 0xffffffffu; }
    if (np2 <= (int)blockDim.x) bitonic_sort_regs(score, gs, ge, np2, before, top_half_if_exact && 2 * half == np2);
    else bitonic_sort(score, gs, ge, np2, before);
}

// Keeps the best G of the nb scored branches in the front of (score, gs, ge); s_n = min(nb, G).
// Ends with a barrier.
__device__ __forceinline__ void keep_best(float* score, uint32_t* gs, uint32_t* ge, int nb, int G, int* s_n) {
    if (nb > G) sort_padded(score, gs, ge, nb, BestFirst(), true, G);  // else every branch survives
    if (threadIdx.x == 0) *s_n = min(nb, G);
    __syncthreads();
}

// Order-preserving integer of a score (defined below).
__device__ __forceinline__ unsigned ordered(float f);

// keep_best by a radix select instead of a sort, for nb <= blockDim.x (one branch a thread): the
// 64-bit key (ordered score, ~start) orders the branches as BestFirst does (higher score, then the
// earlier block; starts are distinct, so keys are too). From the top bit down, one barrier count
// a bit finds the key prefix that exactly the best G share or beat (stopping at the first bit
// where the branches sharing the prefix are exactly the ones still needed: about 10-20 bits for
// distinct scores), then one block scan places the kept branches. Without SPLIT they move to the
// front of (score, gs, ge), unordered, as keep_best leaves them; with SPLIT each is split in two
// as split_groups does (the same scan places the branches) into (ns, ne), swapped into (gs, ge),
// and `more` tells whether a branch still spans more than one block. Returns the branches kept
// (SPLIT: the branches); s_n = min(nb, G). Ends with a barrier.
template <bool SPLIT>
__device__ int keep_best_select(float* score, uint32_t*& gs, uint32_t*& ge, uint32_t*& ns, uint32_t*& ne, int nb,
                                int G, int* s_n, int* scan_tmp, int* more) {
    __syncthreads();  // the scores are in
    const int i = threadIdx.x;
    const bool mine = i < nb;
    const float s = mine ? score[i] : 0.f;
    const uint32_t a = mine ? gs[i] : 0u, e = mine ? ge[i] : 0u;
    const unsigned long long key = ((unsigned long long)ordered(s) << 32) | (unsigned)~a;
    unsigned long long prefix = 0, high = 0;  // `high`: the bits decided so far
    int need = min(nb, G), match = nb;        // branches still needed; branches sharing `prefix`
    for (int bit = 63; bit >= 0 && match != need; bit--) {
        const unsigned long long b = 1ull << bit, want = prefix | b;
        high |= b;
        const int c = __syncthreads_count(mine && (key & high) == want);
        if (c >= need) {
            prefix = want;
            match = c;
        } else {
            need -= c;
            match -= c;
        }
    }
    // Kept: above the prefix in the decided bits, or sharing it (then all of them are needed).
    const bool sel = mine && (key & high) >= prefix;
    int total;
    const int pos = block_exclusive_scan(sel ? (SPLIT && e - a > 1 ? 2 : 1) : 0, &total, scan_tmp);
    int wider = 0;
    if (sel) {
        if constexpr (SPLIT) {
            if (e - a > 1) {
                const uint32_t mid = a + (e - a) / 2;
                ns[pos] = a; ne[pos] = mid;
                ns[pos + 1] = mid; ne[pos + 1] = e;
                wider = (mid - a > 1) || (e - mid > 1);
            } else {
                ns[pos] = a; ne[pos] = e;
            }
        } else {
            score[pos] = s;
            gs[pos] = a;
            ge[pos] = e;
        }
    }
    if (i == 0) *s_n = min(nb, G);
    if constexpr (SPLIT) {
        *more = __syncthreads_or(wider);
        uint32_t* t = gs; gs = ns; ns = t;
        t = ge; ge = ne; ne = t;
    } else {
        __syncthreads();
    }
    return total;
}

// Every group is one block: writes the row's block starts, ascending, and its count.
__device__ __forceinline__ void write_row(float* score, uint32_t* gs, uint32_t* ge, int n, const SearchRow& r,
                                          const SearchArgs& sa, uint32_t* out_counts) {
    sort_padded(score, gs, ge, n, Ascending());
    for (int c = threadIdx.x; c < sa.groups; c += blockDim.x)
        r.out[c] = c < n ? (uint32_t)(sa.sink + gs[c] * sa.block_k) : 0xffffffffu;
    if (threadIdx.x == 0) out_counts[r.row] = n;
}

// Branch scores meet in shared memory through an order-preserving integer atomicMax.
__device__ __forceinline__ unsigned ordered(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float unordered(unsigned e) {
    return __uint_as_float((e & 0x80000000u) ? (e & 0x7fffffffu) : ~e);
}

// Prefill search, one CTA of 4 warps per mask row. The block's QR strided queries stay in
// registers as mma A fragments; each tile of BN gathered keys is one S = Q K^T of m16n8k16 MMAs
// (each warp 16 keys), whose per-key maxima over the queries come out of the accumulators by warp
// shuffles and reach their branch's score through atomicMax in shared memory. Key rows stream in
// through cp.async, double-buffered and swizzled; the per-key index lists are triple-buffered so
// that a tile costs two barriers.
template <typename T, int D>
__device__ void hip_mask_search(const T* __restrict__ q, long long q_b, long long q_t, KvArgs kv, SearchArgs sa,
                                float scale, uint32_t* __restrict__ out_starts, uint32_t* __restrict__ out_counts) {
    constexpr int WARPS = 4, NT = 128, BN = 64, QR = 32;  // at most QR strided queries per block
    constexpr int MT = QR / 16, KD = D / 16, CH = D / 8, LDQ = D + 8;
    static_assert(BN == 16 * WARPS, "each warp scores 16 keys of a tile");
    static_assert(QR * LDQ <= BN * D, "the queries are staged in the second key buffer");
    extern __shared__ __align__(128) unsigned char smem[];
    T* Ks = reinterpret_cast<T*>(smem);                 // [2][BN][D] (swizzled, double buffer)
    int* kbranch = reinterpret_cast<int*>(Ks + 2 * BN * D);  // [3][BN] branch of each gathered key, -1 none
    int* kj = kbranch + 3 * BN;                         // [3][BN] token of each gathered key, -1 none
    float* score = reinterpret_cast<float*>(kj + 3 * BN);  // [cap]
    uint32_t* gs = reinterpret_cast<uint32_t*>(score + sa.cap);  // groups / branches [cap]
    uint32_t* ge = gs + sa.cap;
    uint32_t* ns = ge + sa.cap;                         // the next iteration's branches [cap]
    uint32_t* ne = ns + sa.cap;
    __shared__ int s_n;
    __shared__ int scan_tmp[WARPS];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (sa.heads_q / kv.heads_kv);
    const SearchRow sr = search_row(kv, sa, out_starts, blockIdx.x);
    const int i0 = sr.i0, i1 = sr.i1, search_end = sr.search_end, G = sa.groups;
    if (select_all_if_few(sr, sa, out_counts)) return;

    // Strided queries counted back from the block's last one (the newest query always scores),
    // unscaled (the scale is applied to the max later; it is positive), staged in the second key
    // buffer and loaded into A fragments; rows past nq are zero and never count.
    const int nq = (i1 - i0 + sa.stride_q - 1) / sa.stride_q;
    {
        T* Qs = Ks + BN * D;
        for (int c = tid; c < QR * CH; c += NT) {
            int r = c / CH, x = (c % CH) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (r < nq)
                val = *reinterpret_cast<const uint4*>(q + b * q_b + (long long)(i1 - 1 - r * sa.stride_q) * q_t +
                                                      (long long)h * D + x);
            *reinterpret_cast<uint4*>(Qs + r * LDQ + x) = val;
        }
    }
    init_groups(gs, ge, sr.n_cand, G, &s_n);  // ends with a barrier: Qs is complete
    uint32_t qf[MT][KD][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int kk = 0; kk < KD; kk++)
            ldsm_x4(qf[mt][kk], Ks + BN * D + (mt * 16 + (lane % 16)) * LDQ + kk * 16 + (lane / 16) * 8);
    bool row_ok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        row_ok[mt][0] = mt * 16 + g < nq;
        row_ok[mt][1] = mt * 16 + g + 8 < nq;
    }
    __syncthreads();  // every warp holds its fragments before the buffer takes keys

    const int kpb = (sa.block_k + sa.stride_k - 1) / sa.stride_k;  // keys per branch (<= BN)
    const int bpt = BN / kpb;                                       // branches per key tile
    const T* K = static_cast<const T*>(kv.k);
    unsigned* su = reinterpret_cast<unsigned*>(score);
    // Token and branch of key slot c of a tile starting at branch t0 of nb (-1: none).
    auto prep = [&](int t0, int ib, int nb) {
        for (int c = tid; c < BN; c += NT) {
            int br = t0 + c / kpb, r = c % kpb;
            int j = -1;
            if (c / kpb < bpt && br < nb) {
                int center = gs[br] + (ge[br] - gs[br]) / 2;
                j = sa.sink + center * sa.block_k + r * sa.stride_k;
                if (j >= search_end || j >= sa.sink + (center + 1) * sa.block_k) j = -1;
            }
            kbranch[ib * BN + c] = j >= 0 ? br : -1;
            kj[ib * BN + c] = j;
        }
    };
    // Asynchronous gather of a tile's key rows (zero rows for empty slots), 16 bytes a copy.
    auto issue = [&](int buf, int ib) {
        T* dst0 = Ks + buf * BN * D;
        for (int c = tid; c < BN * CH; c += NT) {
            int r = c / CH, x = c % CH;
            int j = kj[ib * BN + r];
            const T* src = j >= 0 ? kv_at<T>(K, kv.bank_k, kv_loc<D>(kv, b, j, hk, x == 0)) + x * 8 : K;
            cp_async16(dst0 + swz_row<D>(r, x), src, j >= 0 ? 16 : 0);
        }
        cp_async_commit();
    };
    for (;;) {
        int more;
        const int nb = split_groups(gs, ge, ns, ne, s_n, scan_tmp, &more);
        for (int x = tid; x < nb; x += NT) su[x] = ordered(NEG_INF);
        // Score every branch by its center block, gathering tile t + 1 while tile t computes.
        const int ntiles = (nb + bpt - 1) / bpt;
        prep(0, 0, nb);
        __syncthreads();
        issue(0, 0);
        for (int t = 0; t < ntiles; t++) {
            const int cur = t & 1, ib = t % 3;
            // The barrier below also ends every warp's use of key buffer cur ^ 1 (tile t - 1) and
            // of index buffer (t + 1) % 3 (tile t - 2).
            if (t + 1 < ntiles) prep((t + 1) * bpt, (t + 1) % 3, nb);
            __syncthreads();
            if (t + 1 < ntiles) issue(cur ^ 1, (t + 1) % 3); else cp_async_commit();
            cp_async_wait_1();
            __syncthreads();  // tile t has landed
            const T* Kc = Ks + cur * BN * D;
            float acc[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < 2; n++) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                uint32_t bk[4];
                ldsm_x4(bk, Kc + swz_row<D>(warp * 16 + (lane / 16) * 8 + lane % 8, kk * 2 + (lane / 8) % 2));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma16816<T>(acc[mt][0], qf[mt][kk], bk[0], bk[1]);
                    mma16816<T>(acc[mt][1], qf[mt][kk], bk[2], bk[3]);
                }
            }
            // Per key (column 2 tq + e of n-tile n): the max over the valid query rows, reduced
            // over the lanes of one column (same tq), then into the key's branch.
#pragma unroll
            for (int n = 0; n < 2; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float best = NEG_INF;
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        if (row_ok[mt][0]) best = fmaxf(best, acc[mt][n][e]);
                        if (row_ok[mt][1]) best = fmaxf(best, acc[mt][n][2 + e]);
                    }
                    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 4));
                    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 8));
                    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 16));
                    const int br = kbranch[ib * BN + warp * 16 + n * 8 + tq * 2 + e];
                    if (g == 0 && br >= 0) atomicMax(&su[br], ordered(best * scale));
                }
            }
        }
        cp_async_wait_0();
        __syncthreads();
        for (int x = tid; x < nb; x += NT) score[x] = unordered(su[x]);
        keep_best(score, gs, ge, nb, G, &s_n);
        if (!more) break;
    }
    write_row(score, gs, ge, s_n, sr, sa, out_counts);
}

// The same search for a block of at most QMAX strided queries (decode: one query per sequence),
// tuned for latency, since a decode step launches only one CTA per (query head, sequence) — or,
// with CS > 1, one thread-block cluster of CS CTAs, when the rows are few enough for the GPU to
// hold every cluster at once. 512 threads; a group of D / 8 lanes scores one key row straight
// from global memory (16 bytes a lane, UNROLL rows in flight per group) against the queries held
// in registers, and the branch maxima meet in shared memory through an order-preserving integer
// atomicMax. In a cluster every CTA holds the whole branch list and ranks it (the same steps give
// the same result everywhere) but scores only every CS-th pass of key rows: after a cluster
// barrier each CTA takes the max of the CTAs' branch maxima through distributed shared memory
// (double-buffered by iteration, so one barrier per iteration suffices). Same branches, scores
// (f32 dot products of the bf16 / f16 inputs), ties and output as `hip_mask_search`.

__device__ __forceinline__ void widen8(const __nv_bfloat16* x, float* f) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(x)[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}
__device__ __forceinline__ void widen8(const __half* x, float* f) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __half22float2(reinterpret_cast<const __half2*>(x)[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// Phase timers for the decode search (only with -DHIP_MASK_PROFILE: scripts/mask_profile.cu).
#ifdef HIP_MASK_PROFILE
__device__ unsigned long long g_prof[8];
#define PROF_START long long t_prof = clock64();
#define PROF(i)                                                                                   \
    if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {             \
        long long t_now = clock64();                                                              \
        g_prof[i] += t_now - t_prof;                                                              \
        t_prof = t_now;                                                                           \
    }
#else
#define PROF_START
#define PROF(i)
#endif

// Scores the 16 placed key rows of slots [t0, t0 + 16) (one warp) against the block's queries on
// the tensor cores and raises their branches' maxima. Lane (r = lane / 4, c = lane % 4) loads
// chunks 4m + c (8 dims each, m < D / 32) of rows t0 + r and t0 + r + 8 straight into mma.sync
// m16n8k16 A fragments: k-step 2m + h takes components 2h and 2h + 1 of chunk 4m + c as the pairs
// (2c, 2c + 1) and (2c + 8, 2c + 9) of the step. `qb` holds query (lane / 4)'s same chunks as B
// fragments, so each product pairs a key dim with the same query dim and every dim enters the
// sum once. The accumulators' columns are the queries: lane c = 0 holds queries 0 and 1 of rows
// r and r + 8. Rows without a key (`sloc` -1, or past `slots`) score nothing.
template <typename T, int D>
__device__ __forceinline__ void score_tile_mma(const T* K, const void* bank, const long long* sloc, int t0, int slots,
                                               int kpb, int kpb_shift, const uint4 (&qb)[D / 32], int nq, float scale,
                                               unsigned* su) {
    constexpr int M = D / 32;
    const int lane = threadIdx.x % 32, r = lane / 4, c = lane % 4;
    const int s0 = t0 + r, s1 = t0 + r + 8;
    const long long l0 = s0 < slots ? sloc[s0] : -1, l1 = s1 < slots ? sloc[s1] : -1;
    uint4 a0[M], a1[M];
    const T* p0 = l0 != -1 ? kv_at<T>(K, bank, l0) : nullptr;
    const T* p1 = l1 != -1 ? kv_at<T>(K, bank, l1) : nullptr;
#pragma unroll
    for (int m = 0; m < M; m++) {
        a0[m] = p0 ? *reinterpret_cast<const uint4*>(p0 + (4 * m + c) * 8) : make_uint4(0, 0, 0, 0);
        a1[m] = p1 ? *reinterpret_cast<const uint4*>(p1 + (4 * m + c) * 8) : make_uint4(0, 0, 0, 0);
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int m = 0; m < M; m++) {
        const uint32_t lo[4] = {a0[m].x, a1[m].x, a0[m].y, a1[m].y};
        mma16816<T>(acc, lo, qb[m].x, qb[m].y);
        const uint32_t hi[4] = {a0[m].z, a1[m].z, a0[m].w, a1[m].w};
        mma16816<T>(acc, hi, qb[m].z, qb[m].w);
    }
    if (c == 0) {
        if (p0) {
            const float best = nq > 1 ? fmaxf(acc[0], acc[1]) : acc[0];
            atomicMax(&su[kpb_shift >= 0 ? s0 >> kpb_shift : s0 / kpb], ordered(best * scale));
        }
        if (p1) {
            const float best = nq > 1 ? fmaxf(acc[2], acc[3]) : acc[2];
            atomicMax(&su[kpb_shift >= 0 ? s1 >> kpb_shift : s1 / kpb], ordered(best * scale));
        }
    }
}

// UNROLL: key-row loads in flight per lane group (8; 4 in the `_o2` forms, whose 64 registers a
// thread let two CTAs share a multiprocessor: a decode step of more rows than multiprocessors
// then runs in one wave instead of two). PLACE (the `_p` forms): each iteration first finds
// where every scored key row is (one `kv_loc` a slot, all threads at once, into shared memory
// after the branch arrays: cap * keys-per-branch offsets), so that a pass of loads no longer
// waits for its block-table reads first. MMA (the `_t` form: PLACE, two CTAs a multiprocessor, no
// cluster, no staging) scores 16 placed key rows a warp at a time on the tensor cores: each lane
// loads its 16-byte chunks of two rows straight into the A operand of mma.sync m16n8k16 (keys x
// dims) and the queries' matching chunks are the B operand (dims x queries), so that the dims are
// summed in another order but every one once (see `score_tile_mma`). `_t` is the default
// (HIP_MASK_FEW, src/cuda/mask.rs); `_o2p` (both of the above) where rows are staged.
template <typename T, int D, int QMAX, int CS, int UNROLL = 8, bool PLACE = false, bool MMA = false>
__device__ void hip_mask_search_few(const T* __restrict__ q, long long q_b, long long q_t, KvArgs kv, SearchArgs sa,
                                    float scale, uint32_t* __restrict__ out_starts, uint32_t* __restrict__ out_counts) {
    constexpr int NT = 512, WARPS = NT / 32;
    constexpr int LPK = D / 8;        // lanes per key row
    constexpr int KPW = 32 / LPK;     // key rows per warp per step
    extern __shared__ __align__(128) unsigned char smem[];
    float* score = reinterpret_cast<float*>(smem);             // [cap]
    uint32_t* gs = reinterpret_cast<uint32_t*>(score + sa.cap);  // groups / branches [cap]
    uint32_t* ge = gs + sa.cap;
    uint32_t* ns = ge + sa.cap;                                  // the next iteration's branches [cap]
    uint32_t* ne = ns + sa.cap;
    unsigned* su2 = ne + sa.cap;                                 // [2][cap] branch maxima (ordered)
    __shared__ int s_n;
    __shared__ int scan_tmp[WARPS];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int lk = lane % LPK, sub = lane / LPK;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (sa.heads_q / kv.heads_kv);
    const int rank = CS > 1 ? (int)cg::this_cluster().block_rank() : 0;
    const SearchRow sr = search_row(kv, sa, out_starts, blockIdx.x / CS);
    const int i0 = sr.i0, i1 = sr.i1, search_end = sr.search_end, G = sa.groups;
    if (select_all_if_few(sr, sa, out_counts, rank == 0)) return;  // the same in every CTA of a cluster

    PROF_START
    const int nq = min(QMAX, (i1 - i0 + sa.stride_q - 1) / sa.stride_q);
    float qv[QMAX][8];
#pragma unroll
    for (int r = 0; r < QMAX; r++) {
        if (r < nq) {
            uint4 raw = *reinterpret_cast<const uint4*>(q + b * q_b + (long long)(i1 - 1 - r * sa.stride_q) * q_t +
                                                        (long long)h * D + lk * 8);
            widen8(reinterpret_cast<const T*>(&raw), qv[r]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) qv[r][e] = 0.f;
        }
    }
    // The B operand of the tensor-core scoring: lane (n = lane / 4, c = lane % 4) holds query n's
    // chunks 4m + c (zero for n >= nq).
    uint4 qb[MMA ? D / 32 : 1];
    if constexpr (MMA) {
        const int n = lane / 4, c = lane % 4;
#pragma unroll
        for (int m = 0; m < D / 32; m++)
            qb[m] = n < nq ? *reinterpret_cast<const uint4*>(q + b * q_b + (long long)(i1 - 1 - n * sa.stride_q) * q_t +
                                                             (long long)h * D + (4 * m + c) * 8)
                           : make_uint4(0, 0, 0, 0);
    }
    init_groups(gs, ge, sr.n_cand, G, &s_n);

    const int kpb = (sa.block_k + sa.stride_k - 1) / sa.stride_k;  // keys per branch
    const int kpb_shift = (kpb & (kpb - 1)) == 0 ? __ffs(kpb) - 1 : -1;
    const T* K = static_cast<const T*>(kv.k);
    const bool staging = kv_stages(kv);
    int more;
    int nb = split_groups(gs, ge, ns, ne, s_n, scan_tmp, &more);
    for (int it = 0;; it++) {
        PROF(0)
        unsigned* su = su2 + (it & 1) * sa.cap;
        for (int x = tid; x < nb; x += NT) su[x] = ordered(NEG_INF);
        __syncthreads();
        // Score every branch: the max over its center block's strided keys and the queries.
        const int slots = nb * kpb;
        if constexpr (PLACE) {
            long long* sloc = reinterpret_cast<long long*>(su2 + 2 * sa.cap);  // [cap * kpb] row offsets
            for (int c = tid; c < slots; c += NT) {
                const int bi = kpb_shift >= 0 ? c >> kpb_shift : c / kpb;
                const int r = c - bi * kpb;
                const int center = gs[bi] + (ge[bi] - gs[bi]) / 2;
                const int j = sa.sink + center * sa.block_k + r * sa.stride_k;
                const bool ok = j < search_end && j < sa.sink + (center + 1) * sa.block_k;
                sloc[c] = ok ? kv_loc<D>(kv, b, j, hk, false) : -1;  // -1: no row
            }
            __syncthreads();
        }
        if constexpr (MMA) {
            static_assert(PLACE && CS == 1 && QMAX <= 2, "the tensor-core scoring reads placed rows, one CTA a row");
            const long long* sloc = reinterpret_cast<const long long*>(su2 + 2 * sa.cap);
            for (int t0 = warp * 16; t0 < slots; t0 += WARPS * 16)
                score_tile_mma<T, D>(K, kv.bank_k, sloc, t0, slots, kpb, kpb_shift, qb, nq, scale, su);
        } else
        for (int base = (rank * WARPS + warp) * KPW * UNROLL; base < slots; base += CS * WARPS * KPW * UNROLL) {
            uint4 kr[UNROLL];
            int br[UNROLL];
            int miss_j[UNROLL];  // staging: the key of a row read from the host store, else -1
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int c = base + u * KPW + sub;
                int j = -1;
                br[u] = -1;
                if (c < slots) {
                    const int bi = kpb_shift >= 0 ? c >> kpb_shift : c / kpb;
                    const int r = c - bi * kpb;
                    const int center = gs[bi] + (ge[bi] - gs[bi]) / 2;
                    j = sa.sink + center * sa.block_k + r * sa.stride_k;
                    if (j >= search_end || j >= sa.sink + (center + 1) * sa.block_k) j = -1;
                    if (j >= 0) br[u] = bi;
                }
                long long loc;
                if constexpr (PLACE)
                    loc = j >= 0 ? reinterpret_cast<const long long*>(su2 + 2 * sa.cap)[c] : 0;
                else
                    loc = j >= 0 ? kv_loc<D>(kv, b, j, hk, false) : 0;
                miss_j[u] = j >= 0 && loc >= 0 ? j : -1;
                kr[u] = j >= 0 ? *reinterpret_cast<const uint4*>(kv_at<T>(K, kv.bank_k, loc) + lk * 8)
                               : make_uint4(0, 0, 0, 0);
            }
            if (staging) {
                // Offloading: leave the rows read over the bus where the cache update finds
                // them (the group's first lane claims the place, every lane writes its chunk).
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    int place = lk == 0 && miss_j[u] >= 0 ? kv_stage_claim(kv, miss_j[u], hk) : -1;
                    place = __shfl_sync(0xffffffffu, place, (int)(threadIdx.x % 32) - lk);
                    if (place >= 0)
                        reinterpret_cast<uint4*>(static_cast<T*>(kv.stage.k) + (long long)place * D)[lk] = kr[u];
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                float kf[8];
                widen8(reinterpret_cast<const T*>(&kr[u]), kf);
                float best = NEG_INF;
#pragma unroll
                for (int r = 0; r < QMAX; r++) {
                    if (r < nq) {
                        float d = 0.f;
#pragma unroll
                        for (int e = 0; e < 8; e++) d = fmaf(qv[r][e], kf[e], d);
#pragma unroll
                        for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                        best = fmaxf(best, d);
                    }
                }
                if (lk == 0 && br[u] >= 0) atomicMax(&su[br[u]], ordered(best * scale));
            }
        }
        // Offloading: record this iteration's reads, one slot per thread (apart from the loads
        // above: the recording's atomics would otherwise stall every pass of them).
        if (kv.seen != nullptr) {
            for (int c = rank * NT + tid; c < slots; c += CS * NT) {
                const int bi = c / kpb, r = c - bi * kpb;
                const int center = gs[bi] + (ge[bi] - gs[bi]) / 2;
                const int j = sa.sink + center * sa.block_k + r * sa.stride_k;
                if (j < search_end && j < sa.sink + (center + 1) * sa.block_k) kv_record(kv, j, hk);
            }
        }
        if constexpr (CS > 1) {
            cg::cluster_group cluster = cg::this_cluster();
            cluster.sync();  // every CTA's maxima of this iteration are in
            const unsigned* rsu[CS];
#pragma unroll
            for (int r = 0; r < CS; r++) rsu[r] = cluster.map_shared_rank(su, r);
            for (int x = tid; x < nb; x += NT) {
                unsigned best = rsu[0][x];
#pragma unroll
                for (int r = 1; r < CS; r++) best = max(best, rsu[r][x]);
                score[x] = unordered(best);
            }
        } else {
            __syncthreads();
            for (int x = tid; x < nb; x += NT) score[x] = unordered(su[x]);
        }
        PROF(1)
        // Keep the best G; while a branch spans more blocks, split them for the next iteration.
        if (nb <= NT) {
            if (!more) {
                keep_best_select<false>(score, gs, ge, ns, ne, nb, G, &s_n, scan_tmp, &more);
                PROF(2)
                break;
            }
            nb = keep_best_select<true>(score, gs, ge, ns, ne, nb, G, &s_n, scan_tmp, &more);
        } else {
            keep_best(score, gs, ge, nb, G, &s_n);
            if (!more) {
                PROF(2)
                break;
            }
            nb = split_groups(gs, ge, ns, ne, s_n, scan_tmp, &more);
        }
        PROF(2)
    }
    if (rank == 0) write_row(score, gs, ge, s_n, sr, sa, out_counts);
    if constexpr (CS > 1) cg::this_cluster().sync();  // no CTA leaves while others read its maxima
    PROF(3)
}

#define MASK(NAME, T, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(const T* q, long long q_b, long long q_t, KvArgs kv, \
                                                           SearchArgs sa, float scale, uint32_t* starts,       \
                                                           uint32_t* counts) {                                 \
        pdl_entry(); hip_mask_search<T, D>(q, q_b, q_t, kv, sa, scale, starts, counts);                                    \
    }

#define MASK_FEW_CLUSTER(NAME, T, D, CS)                                                                     \
    extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(512)                             \
        NAME(const T* q, long long q_b, long long q_t, KvArgs kv, SearchArgs sa, float scale, uint32_t* starts, \
             uint32_t* counts) {                                                                               \
        pdl_entry(); hip_mask_search_few<T, D, 2, CS>(q, q_b, q_t, kv, sa, scale, starts, counts);                         \
    }
// The forms of the decode search without a cluster (see hip_mask_search_few): MINB CTAs a
// multiprocessor, UNROLL loads in flight, PLACE.
#define MASK_FEW_FORM(NAME, T, D, MINB, UNROLL, PLACE, MMA)                                                  \
    extern "C" __global__ void __launch_bounds__(512, MINB)                                                  \
        NAME(const T* q, long long q_b, long long q_t, KvArgs kv, SearchArgs sa, float scale, uint32_t* starts, \
             uint32_t* counts) {                                                                               \
        pdl_entry(); hip_mask_search_few<T, D, 2, 1, UNROLL, PLACE, MMA>(q, q_b, q_t, kv, sa, scale, starts, counts);      \
    }
#define MASK_FEW(NAME, T, D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) NAME(const T* q, long long q_b, long long q_t, KvArgs kv, \
                                                           SearchArgs sa, float scale, uint32_t* starts,       \
                                                           uint32_t* counts) {                                 \
        pdl_entry(); hip_mask_search_few<T, D, 2, 1>(q, q_b, q_t, kv, sa, scale, starts, counts);                          \
    }                                                                                                        \
    MASK_FEW_CLUSTER(NAME##_c2, T, D, 2)                                                                     \
    MASK_FEW_CLUSTER(NAME##_c4, T, D, 4)                                                                     \
    MASK_FEW_FORM(NAME##_o2, T, D, 2, 4, false, false)                                                       \
    MASK_FEW_FORM(NAME##_p, T, D, 1, 8, true, false)                                                         \
    MASK_FEW_FORM(NAME##_o2p, T, D, 2, 4, true, false)                                                       \
    MASK_FEW_FORM(NAME##_t, T, D, 2, 4, true, true)

MASK(hip_mask_bf16_d64, __nv_bfloat16, 64)
MASK(hip_mask_bf16_d128, __nv_bfloat16, 128)
MASK(hip_mask_f16_d64, __half, 64)
MASK(hip_mask_f16_d128, __half, 128)
MASK_FEW(hip_mask_few_bf16_d64, __nv_bfloat16, 64)
MASK_FEW(hip_mask_few_bf16_d128, __nv_bfloat16, 128)
MASK_FEW(hip_mask_few_f16_d64, __half, 64)
MASK_FEW(hip_mask_few_f16_d128, __half, 128)
