// Dense causal prefill on Hopper's warpgroup MMA (`wgmma`, sm_90a), FlashAttention-3's
// warp-specialized structure with cp.async in place of TMA (so any K/V layout `kv_loc` addresses,
// contiguous or paged, works). One CTA of three warpgroups per (tile of BM = 128 queries, query
// head, batch): warpgroup 0 gathers key/value tiles of BN = 128 rows into shared memory in the
// 128-byte-swizzled layout the MMA reads, three stages deep; warpgroups 1 and 2 own 64 query rows
// each and per tile run S = Q K^T as 8 wgmma m64n128k16 (Q and K from shared memory), an online
// softmax on the S registers, and O += P V as 8 more with P straight from registers and V read
// N-major (the transpose flag). Head dim 128 only; the span kernel (span_attn.cu) covers
// everything else.
// The same layouts in both tiles: row r (a query or a key), 16-byte chunk x of its 128 halves
// lives at (x / 8) * rows * 128 + r * 128 + ((x % 8) ^ (r % 8)) * 16 bytes, atoms 1024-aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

constexpr int D = 128, BM = 128, BN = 128, STAGES = 3;

// Byte offset of chunk x of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t sw_off(int rows, int r, int x) {
    return (uint32_t)((x >> 3) * rows * 128 + r * 128 + (((x & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t sdesc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <typename T> __device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int scale_d);
template <typename T> __device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b);

template <>
__device__ __forceinline__ void wgmma_ss<__nv_bfloat16>(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
}
template <>
__device__ __forceinline__ void wgmma_rs<__nv_bfloat16>(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_ss<__half>(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
}
template <>
__device__ __forceinline__ void wgmma_rs<__half>(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}


// Keeps the compiler from moving accumulator reads across the asynchronous MMAs.
__device__ __forceinline__ void fence_regs(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// 2^x with denormal results flushed to zero (one MUFU op; exp2f adds a denormal fix-up around it).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The S fragment of a warpgroup's m64n128 tile: this thread holds rows g and g + 8 of its warp's
// 16 at columns 8 n + 2 tq + e, as s[4 n + e] and s[4 n + 2 + e].

// Causal mask of the tile of keys from k0 (where it crosses the diagonal; p0, p1: the rows'
// positions).
__device__ __forceinline__ void mask_diag(float (&s)[64], int k0, int p0, int p1, int tq) {
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int j = k0 + n * 8 + tq * 2 + e;
            if (j > p0) s[n * 4 + e] = NEG_INF;
            if (j > p1) s[n * 4 + 2 + e] = NEG_INF;
        }
}

// The rows' new running maxima: updates m_r and returns the scaled maxima to subtract (ms) and
// the factors rescaling what was accumulated before (alpha).
__device__ __forceinline__ void row_max(const float (&s)[64], float (&m_r)[2], float scale_log2, float (&ms)[2],
                                        float (&alpha)[2]) {
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < 16; n++) {
        mx[0] = fmaxf(mx[0], fmaxf(s[n * 4], s[n * 4 + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[n * 4 + 2], s[n * 4 + 3]));
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(m_r[i], mx[i]);
        ms[i] = m_new == NEG_INF ? 0.f : m_new * scale_log2;
        alpha[i] = ex2(m_r[i] * scale_log2 - ms[i]);
        m_r[i] = m_new;
    }
}

// Writes this thread's two rows of O / l (rows r0 and r0 + 8 of the CTA's, those below `rows`)
// to `out`, the CTA's first row, `q_t` elements per row.
template <typename T>
__device__ __forceinline__ void store_o(const float (&oacc)[64], float (&l_r)[2], T* out, long long q_t, int r0,
                                        int rows) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int r = r0 + 8 * i;
        if (r >= rows) continue;
        const float inv = l_r[i] > 0.f ? 1.f / l_r[i] : 0.f;
        T* o = out + (long long)r * q_t;
#pragma unroll
        for (int n = 0; n < 16; n++)
            *reinterpret_cast<uint32_t*>(o + n * 8) = pack2<T>(oacc[n * 4 + 2 * i] * inv, oacc[n * 4 + 2 * i + 1] * inv);
    }
}

// mbarrier helpers (shared::cta).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// Named barriers (0 is __syncthreads): bar.sync waits for `count` threads, bar.arrive only counts.
__device__ __forceinline__ void named_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N> __device__ __forceinline__ void keep_regs(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) asm volatile("" : "+r"(a[i][j])::"memory");
}

// The kernel. Warpgroup 0 only gathers K/V tiles (cp.async, three stages handed over through
// `full`/`empty` mbarriers) with its registers given to the two consumer warpgroups
// (setmaxnreg). Each consumer issues S(t) = Q K(t)^T before O += P(t-1) V(t-1), so that the
// softmax of tile t runs while the P V of tile t - 1 is still in flight. With PINGPONG the
// consumers also take turns at the tensor cores (named barriers, FlashAttention-3's ping-pong):
// on the H200 that ran 5-7% slower than letting both issue freely, so it is kept for comparison
// only (HIP_CUDA_WGMMA=pp).
template <typename T, bool PINGPONG>
__device__ void dense_prefill_ws(const T* __restrict__ q, T* __restrict__ o, long long q_b, long long q_t, int t_q,
                                 int heads_q, KvArgs kv, float scale_log2) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* sm = smem_raw + (base - raw);
    const uint32_t q_s = base;                                // [2 consumers][64 rows], 16 KB each
    const uint32_t kv_s = base + BM * D * 2;                  // [STAGES][K, V][BN rows], 32 KB each
    const uint32_t bars = kv_s + STAGES * 2 * BN * D * 2;    // full[STAGES], empty[STAGES]
    auto full = [&](int st) { return bars + st * 8; };
    auto empty = [&](int st) { return bars + (STAGES + st) * 8; };

    const int tid = threadIdx.x, wg = tid / 128, wt = tid % 128;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads_q / kv.heads_kv);
    const int offset = kv.t_k - t_q;
    const int rows = min(BM, t_q - m0);
    const int p_first = offset + m0, p_last = offset + m0 + rows - 1;
    const int n_tiles = (p_last + 1 + BN - 1) / BN;

    if (tid == 0) {
        for (int st = 0; st < STAGES; st++) {
            mbar_init(full(st), 128);  // every producer thread, once its copies landed
            mbar_init(empty(st), 8);   // every consumer warp, once its MMAs read the stage
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: gathers each tile in coalesced 16-byte chunks; each thread's copies arrive
        // on the stage's `full` barrier as they land (the consumers fence for the async proxy).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        const T* K = static_cast<const T*>(kv.k);
        const T* V = static_cast<const T*>(kv.v);
        const int x = wt & 15, r_lo = wt >> 4, plane = wt & 31;
        // A warp copies rows 2w + (0, 1) + 8i (w: its warp, i < 16), 32 rows a tile: its lane
        // 2i + e finds row 2w + e + 8i (kv_loc: index arithmetic, a block table read) once,
        // one tile ahead, and the copy loop takes each row's place by shuffle.
        auto row_loc = [&](int t) -> long long {
            const int j = t * BN + 2 * (wt >> 5) + (plane & 1) + 8 * (plane >> 1);
            return j <= p_last ? kv_loc<D>(kv, b, j, hk, false) : -1;
        };
        long long next = row_loc(0);
        for (int t = 0; t < n_tiles; t++) {
            const int st = t % STAGES;
            const long long mine = next;
            if (t + 1 < n_tiles) next = row_loc(t + 1);
            if (t >= STAGES) mbar_wait(empty(st), ((t / STAGES) - 1) & 1);
            // Chunk x of rows r_lo, r_lo + 8, ...: a warp's copies cover two whole rows.
            const uint32_t kt = kv_s + st * 2 * BN * D * 2 + (x >> 3) * BN * 128 + (((x & 7) ^ r_lo) << 4);
#pragma unroll 4
            for (int i = 0; i < BN / 8; i++) {
                const long long loc = __shfl_sync(0xffffffffu, mine, 2 * i + (plane >> 4));
                const bool ok = loc >= 0;
                const long long at = ok ? loc + x * 8 : 0;
                const uint32_t d = kt + (i * 8 + r_lo) * 128;
                const int n = ok ? 16 : 0;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(K + at), "r"(n) : "memory");
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d + BN * D * 2), "l"(V + at), "r"(n)
                             : "memory");
            }
            // Arrives on full(st) once this thread's copies have landed (without waiting here).
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full(st)) : "memory");
        }
        cp_async_wait_all_but<0>();  // nothing in flight when the warpgroup exits
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int c = wg - 1, warp = wt / 32, lane = tid % 32;
    const int g = lane >> 2, tq = lane & 3;
    // This warpgroup's 64 queries (rows past t_q zero).
    const uint32_t qw = q_s + c * 64 * D * 2;
    for (int i = wt; i < 64 * 16; i += 128) {
        const int r = c * 64 + i / 16, x = i % 16;
        const T* src = q + b * q_b + (long long)(m0 + min(r, rows - 1)) * q_t + (long long)h * D + x * 8;
        cp_async16(sm + (qw - base) + sw_off(64, r % 64, x), src, r < rows ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait_all_but<0>();
    fence_async_smem();
    named_sync(1 + c, 128);

    // Turns at the tensor cores: consumer c waits at barrier 3 + c for the other's arrival.
    const int my_turn = 3 + c, other_turn = 3 + (1 - c);
    if (PINGPONG && c == 1) named_arrive(3, 256);  // consumer 0 goes first

    float oacc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) oacc[i] = 0.f;
    float m_r[2] = {NEG_INF, NEG_INF}, l_r[2] = {0.f, 0.f};
    const int r0 = c * 64 + warp * 16 + g;
    const int p0 = offset + m0 + r0, p1 = p0 + 8;

    float s[64];
    uint32_t pf[8][4];
    auto issue_scores = [&](int st) {
        const uint32_t kt = kv_s + st * 2 * BN * D * 2;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const uint32_t koff = (kk & 3) * 32;
            const uint64_t da = sdesc(qw + (kk >> 2) * 64 * 128 + koff, 16, 1024);
            const uint64_t db = sdesc(kt + (kk >> 2) * BN * 128 + koff, 16, 1024);
            wgmma_ss<T>(s, da, db, kk > 0);
        }
        wg_commit();
    };
    auto issue_pv = [&](int st) {
        const uint32_t vt = kv_s + st * 2 * BN * D * 2 + BN * D * 2;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) wgmma_rs<T>(oacc, pf[kk], sdesc(vt + kk * 2048, BN * 128, 1024));
        wg_commit();
    };
    // Masks, exponentiates S of tile t in place and returns the rescale factors of O.
    auto softmax = [&](int t, float (&alpha)[2]) {
        if (t * BN + BN - 1 > p_first) mask_diag(s, t * BN, p0, p1, tq);
        float ms[2], sum[2] = {0.f, 0.f};
        row_max(s, m_r, scale_log2, ms, alpha);
#pragma unroll
        for (int n = 0; n < 16; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[n * 4 + e] = ex2(fmaf(s[n * 4 + e], scale_log2, -ms[0]));
                s[n * 4 + 2 + e] = ex2(fmaf(s[n * 4 + 2 + e], scale_log2, -ms[1]));
                sum[0] += s[n * 4 + e];
                sum[1] += s[n * 4 + 2 + e];
            }
        }
#pragma unroll
        for (int i = 0; i < 2; i++) l_r[i] = l_r[i] * alpha[i] + sum[i];
    };
    auto to_p = [&]() {
#pragma unroll
        for (int n = 0; n < 16; n++) {
            pf[n / 2][(n % 2) * 2] = pack2<T>(s[n * 4], s[n * 4 + 1]);
            pf[n / 2][(n % 2) * 2 + 1] = pack2<T>(s[n * 4 + 2], s[n * 4 + 3]);
        }
    };
    auto release = [&](int st) {
        if (lane == 0) mbar_arrive(empty(st));
    };

    // Tile 0: scores alone.
    mbar_wait(full(0), 0);
    fence_async_smem();  // the producer's cp.async writes, before the MMAs read them
    if (PINGPONG) named_sync(my_turn, 256);
    wg_fence();
    issue_scores(0);
    if (PINGPONG) named_arrive(other_turn, 256);
    wg_wait<0>();
    fence_regs(s);
    {
        float alpha[2];
        softmax(0, alpha);
        to_p();
    }
    for (int t = 1; t < n_tiles; t++) {
        const int st = t % STAGES, prev = (t - 1) % STAGES;
        mbar_wait(full(st), (t / STAGES) & 1);
        fence_async_smem();
        if (PINGPONG) named_sync(my_turn, 256);
        wg_fence();
        issue_scores(st);
        issue_pv(prev);
        if (PINGPONG) named_arrive(other_turn, 256);
        wg_wait<1>();
        fence_regs(s);
        float alpha[2];
        softmax(t, alpha);
        wg_wait<0>();
        fence_regs(oacc);
        keep_regs(pf);
        release(prev);
#pragma unroll
        for (int n = 0; n < 16; n++) {
            oacc[n * 4] *= alpha[0];
            oacc[n * 4 + 1] *= alpha[0];
            oacc[n * 4 + 2] *= alpha[1];
            oacc[n * 4 + 3] *= alpha[1];
        }
        to_p();
    }
    // The last tile's P V.
    if (PINGPONG) named_sync(my_turn, 256);
    wg_fence();
    issue_pv((n_tiles - 1) % STAGES);
    if (PINGPONG && c == 0) named_arrive(other_turn, 256);
    wg_wait<0>();
    fence_regs(oacc);
    keep_regs(pf);

    store_o<T>(oacc, l_r, o + b * q_b + (long long)m0 * q_t + (long long)h * D + tq * 2, q_t, r0, rows);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(384, 1)
    dense_prefill_sm90_bf16(const __nv_bfloat16* q, __nv_bfloat16* o, long long q_b, long long q_t, int t_q,
                            int heads_q, KvArgs kv, float scale_log2) {
    dense_prefill_ws<__nv_bfloat16, false>(q, o, q_b, q_t, t_q, heads_q, kv, scale_log2);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    dense_prefill_sm90_f16(const __half* q, __half* o, long long q_b, long long q_t, int t_q, int heads_q, KvArgs kv,
                           float scale_log2) {
    dense_prefill_ws<__half, false>(q, o, q_b, q_t, t_q, heads_q, kv, scale_log2);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    dense_prefill_sm90_pp_bf16(const __nv_bfloat16* q, __nv_bfloat16* o, long long q_b, long long q_t, int t_q,
                               int heads_q, KvArgs kv, float scale_log2) {
    dense_prefill_ws<__nv_bfloat16, true>(q, o, q_b, q_t, t_q, heads_q, kv, scale_log2);
}
extern "C" __global__ void __launch_bounds__(384, 1)
    dense_prefill_sm90_pp_f16(const __half* q, __half* o, long long q_b, long long q_t, int t_q, int heads_q,
                              KvArgs kv, float scale_log2) {
    dense_prefill_ws<__half, true>(q, o, q_b, q_t, t_q, heads_q, kv, scale_log2);
}
