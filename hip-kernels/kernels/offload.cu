// KV-cache offloading (hip_kernels::cuda::offload): writing rows through to the host store and
// applying an LRU update to a GPU cache (page-table entries, rows copied from the host store
// into the bank). The host store is mapped pinned memory, so these kernels read or write it over
// the bus directly. Rows move in 16-byte chunks (head dims 64 and 128 of 2-byte elements).
#include "common.cuh"

// dst_k[rows[i]] = src_k[i] and dst_v[rows[i]] = src_v[i] for the n rows of `chunks` 16-byte
// chunks each (a row is every KV head of one token); rows at or past n_rows are skipped.
extern "C" __global__ void offload_write_rows(const uint4* __restrict__ src_k, const uint4* __restrict__ src_v,
                                              uint4* dst_k, uint4* dst_v, const unsigned* __restrict__ rows,
                                              int n, int chunks, long long n_rows) {
    const long long total = (long long)n * chunks;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < total;
         x += (long long)gridDim.x * blockDim.x) {
        const long long i = x / chunks, c = x % chunks;
        if ((long long)rows[i] >= n_rows) continue;
        const long long d = (long long)rows[i] * chunks + c;
        dst_k[d] = src_k[x];
        dst_v[d] = src_v[x];
    }
}

// Copies between a sequence's span of positions start..start + n and the store: position p
// lives in store row table[p / page] * page + p % page. With `to_store` (writing a span through)
// src row i goes to that row, rows at or past n_rows skipped (the block table is trusted, the
// host memory is not written out of bounds); else (staging a span on the GPU) that row goes to
// dst row i, zeros for a row at or past n_rows.
extern "C" __global__ void offload_span(const uint4* __restrict__ src_k, const uint4* __restrict__ src_v,
                                        uint4* dst_k, uint4* dst_v, const unsigned* __restrict__ table, int page,
                                        int start, int n, int chunks, long long n_rows, int to_store) {
    const long long total = (long long)n * chunks;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < total;
         x += (long long)gridDim.x * blockDim.x) {
        const int p = start + (int)(x / chunks);
        const long long row = (long long)table[p / page] * page + p % page;
        const long long y = row * chunks + x % chunks;
        if (to_store) {
            if (row >= n_rows) continue;
            dst_k[y] = src_k[x];
            dst_v[y] = src_v[x];
        } else if (row >= n_rows) {
            dst_k[x] = make_uint4(0, 0, 0, 0);
            dst_v[x] = make_uint4(0, 0, 0, 0);
        } else {
            dst_k[x] = src_k[y];
            dst_v[x] = src_v[y];
        }
    }
}

// table[idx[i]] = val[i] for the n entries (evictions set -1, insertions their slot).
extern "C" __global__ void offload_set_table(int* table, const long long* __restrict__ idx,
                                             const int* __restrict__ val, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) table[idx[i]] = val[i];
}

// For each of the *n_ins insertions (head, token, slot) of `ins`: bank row `slot` = the row of
// that head and token (K, and V when `bank_v` is not null), from the staging area when the
// epoch's kernels left it there (`kv.stage.tag` not null: the tag of its place is this epoch's
// and this entry's), else from the host store over the bus. `kv` addresses the host store
// (paged, one sequence) and carries the epoch and staging area; `d_chunks` = head_dim / 8.
// The count is read on the device (the LRU kernels produce it), so the grid is fixed and
// grid-strided. `staged` counts the rows copied from the staging area.
extern "C" __global__ void offload_fill(KvArgs kv, uint4* bank_k, uint4* bank_v, const int* __restrict__ ins,
                                        const unsigned* __restrict__ n_ins, int d_chunks,
                                        unsigned long long* staged) {
    const long long total = (long long)*n_ins * d_chunks;
    const uint4* hk = static_cast<const uint4*>(kv.k);
    const uint4* hv = static_cast<const uint4*>(kv.v);
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < total;
         x += (long long)gridDim.x * blockDim.x) {
        const long long i = x / d_chunks, c = x % d_chunks;
        const int head = ins[3 * i], token = ins[3 * i + 1], slot = ins[3 * i + 2];
        const long long dst = (long long)slot * d_chunks + c;
        if (kv.stage.tag != nullptr) {
            const unsigned long long key = kv_stage_key(kv, token, head);
            const unsigned s = kv_stage_place((unsigned)key, kv.stage.bits);
            if (kv.stage.tag[s] == key) {
                const long long src = (long long)s * d_chunks + c;
                bank_k[dst] = static_cast<const uint4*>(kv.stage.k)[src];
                if (bank_v != nullptr) bank_v[dst] = static_cast<const uint4*>(kv.stage.v)[src];
                // One atomic per converged group of lanes, not per row.
                const unsigned act = __activemask();
                const unsigned rows = __popc(__ballot_sync(act, c == 0));
                if (rows > 0 && (threadIdx.x % 32) == (unsigned)(__ffs(act) - 1)) atomicAdd(staged, (unsigned long long)rows);
                continue;
            }
        }
        const long long src = (kv_row(kv, 0, token) + (long long)head * d_chunks * 8) / 8 + c;
        bank_k[dst] = hk[src];
        if (bank_v != nullptr) bank_v[dst] = hv[src];
    }
}

// ---- The LRU policy of hip_kernels::offload::TokenCache, on the device -------------------------
//
// State of one cache: `table` [H, T] (slot or -1), `owner` [H, S] (token or -1), `last` [H, S]
// (tick of the last access; 0 when empty), `bits` [H, ceil(T / 32)] (missed tokens of the update,
// all zero between updates), per head `taken` and `missn` (zero between updates). One update:
//   lru_classify: every distinct access list entry is a hit (its slot gets the tick; counted in
//                 `taken`) or a miss (its bit set; counted in `missn`);
//   lru_plan:     one CTA per head inserts n = min(misses, S - taken) missed tokens, lowest
//                 first, into the lowest free slots, else the least recently used slots not
//                 accessed in this update (smallest (last, slot)); the chosen slots are filled in
//                 ascending slot order. It appends (head, token, slot) to `ins` for offload_fill.

struct LruArgs {
    int* table;
    int* owner;
    int* last;
    unsigned* bits;
    unsigned* taken;
    unsigned* missn;
    int* scratch;               // [H, S]: chosen slots in ascending order
    int* ins;                   // [cap_ins, 3]
    unsigned* ins_n;
    unsigned long long* stats;  // hits, misses, inserts, evictions, dropped (list overflow)
    long long tokens;           // T
    int slots;                  // S
    int words;                  // ceil(T / 32)
    int tick;
};

extern "C" __global__ void lru_classify(LruArgs a, const unsigned* __restrict__ list,
                                        const unsigned* __restrict__ list_n, int cap) {
    const unsigned n = min(*list_n, (unsigned)cap);
    if (blockIdx.x == 0 && threadIdx.x == 0 && *list_n > (unsigned)cap)
        atomicAdd(&a.stats[4], (unsigned long long)(*list_n - (unsigned)cap));
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned idx = list[i];
        const int h = (int)(idx / a.tokens), t = (int)(idx % a.tokens);
        const int s = a.table[idx];
        if (s >= 0) {
            a.last[s] = a.tick;
            atomicAdd(&a.taken[h], 1u);
        } else {
            atomicOr(&a.bits[(long long)h * a.words + t / 32], 1u << (t % 32));
            atomicAdd(&a.missn[h], 1u);
        }
    }
}

constexpr int LRU_THREADS = 1024;

// Exclusive prefix sum of `v` over the CTA (LRU_THREADS threads); `*total` gets the sum.
__device__ __forceinline__ unsigned block_scan(unsigned v, unsigned* total) {
    __shared__ unsigned warp_tot[LRU_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_tot[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned w = warp_tot[lane];
        unsigned z = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned y = __shfl_up_sync(0xffffffffu, z, o);
            if (lane >= o) z += y;
        }
        warp_tot[lane] = z - w;  // exclusive prefix of the warp totals
        if (lane == 31) *total = z;
    }
    __syncthreads();
    const unsigned r = warp_tot[warp] + x - v;
    __syncthreads();
    return r;
}

extern "C" __global__ void __launch_bounds__(LRU_THREADS) lru_plan(LruArgs a) {
    __shared__ unsigned hist[256];
    __shared__ unsigned sh[4];
    const int h = blockIdx.x, tid = threadIdx.x;
    const long long base = (long long)h * a.slots;
    const unsigned misses = a.missn[h], taken = a.taken[h];
    const unsigned n_ins = min(misses, (unsigned)a.slots - taken);
    if (misses == 0) {
        if (tid == 0) {
            atomicAdd(&a.stats[0], (unsigned long long)taken);
            a.taken[h] = 0;
        }
        return;
    }
    // Free slots.
    if (tid == 0) sh[0] = 0;
    __syncthreads();
    unsigned mine = 0;
    for (int i = tid; i < a.slots; i += LRU_THREADS) mine += a.owner[base + i] < 0;
    atomicAdd(&sh[0], mine);
    __syncthreads();
    const unsigned free_n = sh[0];
    const unsigned from_free = min(n_ins, free_n);
    const unsigned need = n_ins - from_free;
    // Radix select of the need-th smallest `last` among occupied slots not accessed now.
    unsigned tau = 0, ties = 0;
    if (need > 0) {
        unsigned prefix = 0, remaining = need;
        for (int shift = 24; shift >= 0; shift -= 8) {
            const unsigned high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
            for (int i = tid; i < 256; i += LRU_THREADS) hist[i] = 0;
            __syncthreads();
            for (int i = tid; i < a.slots; i += LRU_THREADS) {
                const int l = a.last[base + i];
                if (a.owner[base + i] >= 0 && l < a.tick && ((unsigned)l & high) == (prefix & high))
                    atomicAdd(&hist[((unsigned)l >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                unsigned b = 0;
                while (hist[b] < remaining) remaining -= hist[b++];
                sh[1] = prefix | (b << shift);
                sh[2] = remaining;
            }
            __syncthreads();
            prefix = sh[1];
            remaining = sh[2];
            __syncthreads();
        }
        tau = prefix;
        ties = remaining;
    }
    // The chosen slots, ascending: the first `from_free` free slots and the victims (last < tau,
    // then the first `ties` slots with last == tau). Each thread walks a contiguous run of
    // slots: counts, one scan per kind for the ranks, a walk to mark the chosen, a scan for
    // their positions, and a walk to write them.
    const int run = (a.slots + LRU_THREADS - 1) / LRU_THREADS;
    const int s0 = min(tid * run, a.slots), s1 = min(s0 + run, a.slots);
    auto is_free = [&](int i) { return a.owner[base + i] < 0; };
    auto is_victim = [&](int i, bool* tie) {
        const int l = a.last[base + i];
        const bool el = need > 0 && a.owner[base + i] >= 0 && l < a.tick;
        *tie = el && (unsigned)l == tau;
        return el && (unsigned)l < tau;
    };
    unsigned n_fr = 0, n_tie = 0;
    for (int i = s0; i < s1; i++) {
        bool tie;
        n_fr += is_free(i);
        is_victim(i, &tie);
        n_tie += tie;
    }
    unsigned fr_rank = block_scan(n_fr, &sh[3]);
    unsigned tie_rank = block_scan(n_tie, &sh[3]);
    unsigned n_ch = 0;
    for (int i = s0; i < s1; i++) {
        bool tie;
        const bool fr = is_free(i);
        const bool v = is_victim(i, &tie);
        n_ch += (fr && fr_rank < from_free) || v || (tie && tie_rank < ties);
        fr_rank += fr;
        tie_rank += tie;
    }
    fr_rank = block_scan(n_fr, &sh[3]);
    tie_rank = block_scan(n_tie, &sh[3]);
    unsigned pos = block_scan(n_ch, &sh[3]);
    for (int i = s0; i < s1; i++) {
        bool tie;
        const bool fr = is_free(i);
        const bool v = is_victim(i, &tie);
        if ((fr && fr_rank < from_free) || v || (tie && tie_rank < ties)) a.scratch[base + pos++] = i;
        fr_rank += fr;
        tie_rank += tie;
    }
    __syncthreads();
    // Missed tokens in ascending order: the first n_ins go into the chosen slots.
    unsigned evicted = 0;
    const long long wbase = (long long)h * a.words;
    const int wrun = (a.words + LRU_THREADS - 1) / LRU_THREADS;
    const int w0 = min(tid * wrun, a.words), w1 = min(w0 + wrun, a.words);
    unsigned n_bits = 0;
    for (int w = w0; w < w1; w++) n_bits += __popc(a.bits[wbase + w]);
    unsigned r = block_scan(n_bits, &sh[3]);
    for (int w = w0; w < w1; w++) {
        const unsigned word = a.bits[wbase + w];
        if (!word) continue;
        unsigned rest = word;
        while (rest) {
            const int b = __ffs(rest) - 1;
            rest &= rest - 1;
            if (r < n_ins) {
                const int t = w * 32 + b;
                const int slot = a.scratch[base + r];
                const long long gs = base + slot;
                const int old = a.owner[gs];
                if (old >= 0) {
                    a.table[(long long)h * a.tokens + old] = -1;
                    evicted++;
                }
                a.owner[gs] = t;
                a.last[gs] = a.tick;
                a.table[(long long)h * a.tokens + t] = (int)gs;
                const unsigned p = atomicAdd(a.ins_n, 1u);
                a.ins[3 * p] = h;
                a.ins[3 * p + 1] = t;
                a.ins[3 * p + 2] = (int)gs;
            }
            r++;
        }
        a.bits[wbase + w] = 0u;
    }
    if (tid == 0) sh[0] = 0;
    __syncthreads();
    atomicAdd(&sh[0], evicted);
    __syncthreads();
    if (tid == 0) {
        atomicAdd(&a.stats[0], (unsigned long long)taken);
        atomicAdd(&a.stats[1], (unsigned long long)misses);
        atomicAdd(&a.stats[2], (unsigned long long)n_ins);
        atomicAdd(&a.stats[3], (unsigned long long)sh[0]);
        a.taken[h] = 0;
        a.missn[h] = 0;
    }
}
