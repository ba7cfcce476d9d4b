// Pieces shared by the CUDA kernels of hip-kernels: dtype conversions, where a K/V row lives
// (contiguous or paged cache), asynchronous copies and the m16n8k16 tensor-core instructions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define NEG_INF (-__int_as_float(0x7f800000))

// Programmatic dependent launch (hip-kernels/src/cuda/launch.rs): the first statement of every
// kernel launched through `Launch`. `griddepcontrol.wait` holds the kernel until the grids it
// depends on have finished and their writes are visible (a no-op when launched without the
// attribute), so nothing below it may run earlier than after a plain launch; then
// `launch_dependents` lets the next such kernel be scheduled once all of this grid's CTAs run.
__device__ __forceinline__ void pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Staging of missed rows (KV-cache offloading; all null without, used only while recording): a
// decode kernel that read a row from the host store leaves it in place `kv_stage_place` of
// these, so that the cache update copies it from there instead of over the bus again.
struct StageArgs {
    void* k;                  // [1 << bits, head_dim]
    void* v;                  // (null for a key-only cache)
    unsigned long long* tag;  // per place: `kv_stage_key` of the row it holds
    int bits;
};

// Where the keys and values are.
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
    // KV-cache offloading (all null without): `k`/`v` then point at the host store (mapped
    // pinned memory) and a row resident in the GPU bank is read from there instead.
    const int* res;        // page table [heads_kv, res_stride]: bank slot of (head, token) or -1
    const void* bank_k;    // bank rows [slots, head_dim]
    const void* bank_v;    // (same slot as bank_k; null for a key-only cache)
    int* seen;             // [heads_kv, res_stride]: epoch of the entry's last recorded access
    unsigned* list;        // distinct (head * res_stride + token) entries read in this epoch
    unsigned* list_n;      // entries appended (may exceed list_cap: the rest are dropped)
    long long res_stride;  // tokens per head in `res` / `seen`
    int epoch;
    int list_cap;
    StageArgs stage;
    // A decode batch of sequences of different lengths (null: every entry has `t_k` tokens):
    // entry b's tokens, with `table` row b its blocks.
    const int* lens;
};

// Tokens of batch entry `b` (`t_k` without per-entry lengths).
__device__ __forceinline__ int kv_len(const KvArgs& a, int b) { return a.lens != nullptr ? a.lens[b] : a.t_k; }

// The staging place of entry `idx` (head * res_stride + token) among 1 << bits (bits >= 1):
// Fibonacci hashing, so that the entries of a tree level or a mask block spread out.
__device__ __forceinline__ unsigned kv_stage_place(unsigned idx, int bits) {
    return (idx * 0x9E3779B1u) >> (32 - bits);
}

// Whether the decode kernels stage the rows they read over the bus (staging, while recording).
__device__ __forceinline__ bool kv_stages(const KvArgs& a) { return a.stage.tag != nullptr && a.seen != nullptr; }

// The tag of (head hk, token j) staged in `a.epoch`: (epoch << 32) | entry.
__device__ __forceinline__ unsigned long long kv_stage_key(const KvArgs& a, int j, int hk) {
    const unsigned idx = (unsigned)((long long)hk * a.res_stride + j);
    return ((unsigned long long)(unsigned)a.epoch << 32) | idx;
}

// Claims the staging place of (head hk, token j) for the caller to write the row into (only
// when `kv_stages`): the place when it holds nothing of this epoch, else -1 (the entry is there
// already, or another entry of this epoch took the place: its update reads that one over the
// bus again). One thread per row claims; rows are written before the update that reads them
// runs (stream order).
__device__ __forceinline__ int kv_stage_claim(const KvArgs& a, int j, int hk) {
    const unsigned long long key = kv_stage_key(a, j, hk);
    const unsigned s = kv_stage_place((unsigned)key, a.stage.bits);
    const unsigned long long cur = *(volatile unsigned long long*)&a.stage.tag[s];
    if ((unsigned)(cur >> 32) == (unsigned)a.epoch) return -1;
    return atomicCAS(&a.stage.tag[s], cur, key) == cur ? (int)s : -1;
}

// Element offset of token `j`'s row of batch entry `b`.
__device__ __forceinline__ long long kv_row(const KvArgs& a, int b, int j) {
    if (a.table != nullptr) {
        int blk = a.table[(long long)b * a.table_stride + j / a.page];
        return ((long long)blk * a.page + j % a.page) * a.kv_t;
    }
    return (long long)b * a.kv_b + (long long)j * a.kv_t;
}

// Records a read of (head hk, token j) in the access list when it is the entry's first in this
// epoch (nothing without offloading or recording). Its atomics wait for their results, so the
// decode kernels call it apart from their row loads (after them, or in a pass of its own) rather
// than through `kv_loc`'s `rec`, which would put that wait before every load.
__device__ __forceinline__ void kv_record(const KvArgs& a, int j, int hk) {
    if (a.res == nullptr || a.seen == nullptr) return;
    const long long idx = (long long)hk * a.res_stride + j;
    if (a.seen[idx] != a.epoch && atomicExch(&a.seen[idx], a.epoch) != a.epoch) {
        const unsigned p = atomicAdd(a.list_n, 1u);
        if (p < (unsigned)a.list_cap) a.list[p] = (unsigned)idx;
    }
}

// Where the row of head `hk` of token `j` is: an element offset >= 0 from `k`/`v` (the pool or
// host store), or, when the offload page table says the row is resident, -2 - (its element
// offset in the bank). -1 is left for "no row". With `rec`, the first read of the entry in this
// epoch appends it to the access list (one thread per row read should pass `rec`).
template <int D>
__device__ __forceinline__ long long kv_loc(const KvArgs& a, int b, int j, int hk, bool rec) {
    if (a.res != nullptr) {
        const long long idx = (long long)hk * a.res_stride + j;
        if (rec) kv_record(a, j, hk);
        const int s = a.res[idx];
        if (s >= 0) return -2 - (long long)s * D;
    }
    return kv_row(a, b, j) + (long long)hk * D;
}

// The row at `loc` (from `kv_loc`, not -1) in `base` or, for a bank location, in `bank`.
template <typename T>
__device__ __forceinline__ const T* kv_at(const void* base, const void* bank, long long loc) {
    return loc >= 0 ? static_cast<const T*>(base) + loc : static_cast<const T*>(bank) + (-2 - loc);
}

// 16-byte asynchronous copy global -> shared; `src_bytes` = 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_all_but() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Element offset of 16-byte chunk `chunk` of row r in a tile of D-half rows, stored at chunk
// chunk ^ (r % 8): the eight rows an ldmatrix reads at one chunk fall in eight distinct bank groups.
template <int D>
__device__ __forceinline__ int swz_row(int r, int chunk) {
    return r * D + ((chunk ^ (r & 7)) << 3);
}

// Four 8x8 b16 matrices from shared memory (lanes 8i..8i+7 address the rows of matrix i).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
    unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row) {
    unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// c += a (16x16, row-major fragment) * b (16x8, column-major fragment), f32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded into one register of two b16 values (x in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
}
