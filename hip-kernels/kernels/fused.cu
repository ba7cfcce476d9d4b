// Small fused kernels of the transformer step around attention (see hip-kernels/src/cuda/fused.rs):
// each replaces several one-operation launches of a decode step by one.

#include "common.cuh"

// The residual update and the next RMSNorm of one row per CTA: x_out = x + delta (f32; delta in
// T, or none), xn = x_out * rsqrt(mean(x_out^2) + eps) * w, written in T. The sum of squares is
// taken in f32 over the f32 row, like candle's rms_norm.
template <typename T>
__device__ void add_rms_norm(const float* __restrict__ x, const T* __restrict__ delta, const float* __restrict__ w,
                             float eps, int h, float* __restrict__ x_out, T* __restrict__ xn) {
    // A row of up to VPT * blockDim values stays in registers, its loads all issued at once (a
    // loop of dependent loads, one round trip each, made a 16 x 1536 norm 7 us on the H200);
    // longer rows take the loop, reading their sums back from x_out.
    constexpr int VPT = 16;
    const long long off = (long long)blockIdx.x * h;
    x += off;
    x_out += off;
    xn += off;
    if (delta != nullptr) delta += off;
    const int nt = blockDim.x;
    const bool regs = h <= VPT * nt;
    float v[VPT], wv[VPT];
    float ss = 0.f;
    if (regs) {
        // The weights load with the row (not after the sum of squares: one round trip less).
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            const int i = threadIdx.x + k * nt;
            v[k] = i < h ? x[i] + (delta != nullptr ? to_f(delta[i]) : 0.f) : 0.f;
            wv[k] = i < h ? w[i] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            const int i = threadIdx.x + k * nt;
            if (i < h) x_out[i] = v[k];
            ss += v[k] * v[k];
        }
    } else {
        for (int i = threadIdx.x; i < h; i += nt) {
            const float s = x[i] + (delta != nullptr ? to_f(delta[i]) : 0.f);
            x_out[i] = s;  // read back below by this same thread
            ss += s * s;
        }
    }
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x / 32) ? red[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (lane == 0) red[0] = t;
    }
    __syncthreads();
    const float r = rsqrtf(red[0] / (float)h + eps);
    if (regs) {
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            const int i = threadIdx.x + k * nt;
            if (i < h) xn[i] = from_f<T>(v[k] * r * wv[k]);
        }
    } else {
        for (int i = threadIdx.x; i < h; i += nt) xn[i] = from_f<T>(x_out[i] * r * w[i]);
    }
}

#define ADD_RMS_NORM(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(const float* x, const T* delta, const float* w, \
                                                           float eps, int h, float* x_out, T* xn) {       \
        pdl_entry(); add_rms_norm<T>(x, delta, w, eps, h, x_out, xn);                                                 \
    }

ADD_RMS_NORM(add_rms_norm_f32, float)
ADD_RMS_NORM(add_rms_norm_bf16, __nv_bfloat16)
ADD_RMS_NORM(add_rms_norm_f16, __half)

// The attention input of a step in one launch: q, k and v rows of N tokens (each its own row
// stride, so that they can be column ranges of one fused product), plus their bias (f32
// [(H + 2 KVH) * D], q then k then v; or none), q and k rotated by RoPE (cos / sin f32
// [N, D / 2]; pairs (i, i + D/2), or (2i, 2i + 1) when `interleaved`), q written to q_out
// [N, H, D] and k / v into the cache pools [R, KVH, D] at row rows[n] (rows >= R are skipped).
// One thread a rotation pair (or two values of v); grid (N, ceil(pairs / blockDim)).
template <typename T>
__device__ void qkv_rope_write(const T* __restrict__ q_in, const T* __restrict__ k_in, const T* __restrict__ v_in,
                               long long q_stride, long long k_stride, long long v_stride,
                               const float* __restrict__ bias, const float* __restrict__ cos_t,
                               const float* __restrict__ sin_t, const unsigned* __restrict__ rows,
                               long long n_rows, T* __restrict__ q_out, T* __restrict__ k_pool,
                               T* __restrict__ v_pool, int heads, int heads_kv, int d, int interleaved) {
    const int n = blockIdx.x;
    const int half = d / 2;
    const int p = blockIdx.y * blockDim.x + threadIdx.x;  // pair index over (q, k, v) heads
    const int pairs = (heads + 2 * heads_kv) * half;
    if (p >= pairs) return;
    const int head = p / half, i = p % half;  // head over q heads, then k heads, then v heads
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const int col = head * d;                 // column of this head in the fused layout
    const T* src;
    T* dst;
    if (head < heads) {
        src = q_in + n * q_stride + col;
        dst = q_out + ((long long)n * heads + head) * d;
    } else {
        const unsigned r = rows[n];
        if (r >= n_rows) return;
        if (head < heads + heads_kv) {
            const int h = head - heads;
            src = k_in + n * k_stride + h * d;
            dst = k_pool + ((long long)r * heads_kv + h) * d;
        } else {
            const int h = head - heads - heads_kv;
            src = v_in + n * v_stride + h * d;
            dst = v_pool + ((long long)r * heads_kv + h) * d;
        }
    }
    float xa = to_f(src[a]), xb = to_f(src[b]);
    if (bias != nullptr) {
        xa += bias[col + a];
        xb += bias[col + b];
    }
    if (head < heads + heads_kv) {
        const float c = cos_t[(long long)n * half + i], s = sin_t[(long long)n * half + i];
        const float ra = xa * c - xb * s, rb = xa * s + xb * c;
        xa = ra;
        xb = rb;
    }
    dst[a] = from_f<T>(xa);
    dst[b] = from_f<T>(xb);
}

#define QKV_ROPE_WRITE(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                    \
        NAME(const T* q_in, const T* k_in, const T* v_in, long long q_stride, long long k_stride,         \
             long long v_stride, const float* bias, const float* cos_t, const float* sin_t,              \
             const unsigned* rows, long long n_rows, T* q_out, T* k_pool, T* v_pool, int heads,           \
             int heads_kv, int d, int interleaved) {                                                     \
        pdl_entry(); qkv_rope_write<T>(q_in, k_in, v_in, q_stride, k_stride, v_stride, bias, cos_t, sin_t, rows,      \
                          n_rows, q_out, k_pool, v_pool, heads, heads_kv, d, interleaved);               \
    }

QKV_ROPE_WRITE(qkv_rope_write_f32, float)
QKV_ROPE_WRITE(qkv_rope_write_bf16, __nv_bfloat16)
QKV_ROPE_WRITE(qkv_rope_write_f16, __half)

// SwiGLU's gate: out[n, j] = silu(y[n, j]) * y[n, ffn + j] for y = [N, 2 ffn] (gate then up, one
// fused product), computed in f32, written in T. Grid-stride over N * ffn.
template <typename T>
__device__ void silu_mul(const T* __restrict__ y, T* __restrict__ out, long long n, int ffn) {
    const long long total = n * ffn;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / ffn;
        const int j = (int)(e % ffn);
        const float g = to_f(y[r * 2 * ffn + j]), u = to_f(y[r * 2 * ffn + ffn + j]);
        out[e] = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
}

#define SILU_MUL(NAME, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* y, T* out, long long n, int ffn) { \
        pdl_entry(); silu_mul<T>(y, out, n, ffn);                                                                   \
    }

SILU_MUL(silu_mul_f32, float)
SILU_MUL(silu_mul_bf16, __nv_bfloat16)
SILU_MUL(silu_mul_f16, __half)

// The arg max of each row of x [rows, cols] (f32), as packed keys: the value made order-preserving
// as an unsigned int in the high 32 bits, ~column in the low ones, so that the largest key is the
// largest value at its first column (NaN sorts above everything). `out` [rows] must hold zeros;
// grid (rows, chunks), each CTA reduces its chunk and merges with one atomicMax.
__device__ __forceinline__ unsigned long long argmax_key(float v, unsigned col) {
    unsigned u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(~col);
}

extern "C" __global__ void __launch_bounds__(256)
    argmax_rows_f32(const float* __restrict__ x, long long cols, unsigned long long* __restrict__ out) {
    pdl_entry();
    const float* row = x + (long long)blockIdx.x * cols;
    const long long per = (cols + gridDim.y - 1) / gridDim.y;
    const long long lo = (long long)blockIdx.y * per;
    const long long hi = min(cols, lo + per);
    unsigned long long best = 0;
    for (long long c = lo + threadIdx.x; c < hi; c += blockDim.x) {
        const unsigned long long k = argmax_key(row[c], (unsigned)c);
        best = k > best ? k : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    __shared__ unsigned long long red[8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) best = red[w] > best ? red[w] : best;
        if (best != 0) atomicMax(out + blockIdx.x, best);
    }
}

// y[M, N] = x[M, K] · W[N, K]ᵀ for a decode step's few rows (M <= 16): bf16 / f16 in, f32
// accumulation on tensor cores, y in T. One CTA per 8 * NT output columns; its WARPS warps split K
// in blocks of 32 (block b to warp b % WARPS) and stream their weight rows with 16-byte loads
// straight into mma.sync m16n8k16 operands (no shared memory on the way): U blocks a warp at a
// time, every load of them issued before the first mma (unconditionally, no serial tail), one x
// fragment serving NT column tiles (x is re-read from L2 by every CTA: NT > 1 cuts that traffic,
// which for 8 columns a CTA was twice the weights'). The partial tiles are added in shared memory,
// one output element a thread. With M <= 8 the second half of the A operand is zero and x's rows
// 8.. are not read.
// The mma's k order is a permutation of the block's: lane (g, t) = (lane / 4, lane % 4) loads
// elements 8t .. 8t + 7 of a 32-wide block of W row n0 + g and of x rows g and g + 8; the first
// mma takes elements 8t + 0..3 as its k pairs (2t, 2t + 8), the second 8t + 4..7 — the same
// permutation for x and W, so the sum over k is unchanged. Needs N % (8 NT) == 0, K % 32 == 0.
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

//
// GLU (SwiGLU's gate fused in, NT == 2): W holds the gate rows then the up rows ([2 ffn, K], n =
// 2 ffn); CTA c takes gate columns 8c .. 8c + 7 as its tile 0 and the same up columns as its tile
// 1, and writes y[M, ffn] = silu(gate) * up, each of gate and up first rounded to T: what the
// plain product followed by silu_mul gives, bit for bit (same warps, same order of sums).
template <typename T, int WARPS, int NT, bool GLU = false>
__device__ void matmul_small(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int m, int n,
                             int k) {
    static_assert(!GLU || NT == 2, "GLU pairs a gate tile with an up tile");
    constexpr int U = NT == 4 ? 2 : 4;  // 32-wide blocks in flight per warp
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int n0 = GLU ? blockIdx.x * 8 : blockIdx.x * 8 * NT;
    // Row offset of tile j's weights from tile 0's.
    const long long tile_rows = GLU ? n / 2 : 8;
    const T* wr = w + (long long)(n0 + g) * k + t * 8;
    // Rows past m read row m - 1 instead (valid memory): a row of the product depends on its own
    // row of x alone, and those rows are not written.
    const T* x0 = x + (long long)min(g, m - 1) * k + t * 8;
    const T* x1 = x + (long long)min(g + 8, m - 1) * k + t * 8;
    const bool hi = m > 8;
    const int kb = k / 32;
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    for (int j0 = warp; j0 < kb; j0 += WARPS * U) {
        uint4 wv[U][NT], av[U], bv[U];
        // Every load of the U blocks is issued before the first mma, unconditionally: past the
        // last block a warp re-reads the last one (valid memory) and zeroes its x, so the mma adds
        // nothing. (Loads under a condition, or a skipped mma, let the compiler sink each load to
        // just before its mma: one round trip per block. So does ptxas when it aims at two CTAs
        // a multiprocessor: hence __launch_bounds__(.., 1) below; check with nvdisasm that the
        // LDGs of an iteration come before its HMMAs.)
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int b = min(j0 + u * WARPS, kb - 1);
#pragma unroll
            for (int j = 0; j < NT; j++) wv[u][j] = ldg16(wr + j * tile_rows * k + b * 32);
            av[u] = ldg16(x0 + b * 32);
            bv[u] = ldg16((hi ? x1 : x0) + b * 32);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const uint32_t keep = j0 + u * WARPS < kb ? ~0u : 0u, keep_hi = hi ? keep : 0u;
            av[u] = make_uint4(av[u].x & keep, av[u].y & keep, av[u].z & keep, av[u].w & keep);
            bv[u] = make_uint4(bv[u].x & keep_hi, bv[u].y & keep_hi, bv[u].z & keep_hi, bv[u].w & keep_hi);
            const uint32_t a_lo[4] = {av[u].x, bv[u].x, av[u].y, bv[u].y};
            const uint32_t a_hi[4] = {av[u].z, bv[u].z, av[u].w, bv[u].w};
#pragma unroll
            for (int j = 0; j < NT; j++) {
                mma16816<T>(c[j], a_lo, wv[u][j].x, wv[u][j].y);
                mma16816<T>(c[j], a_hi, wv[u][j].z, wv[u][j].w);
            }
        }
    }
    __shared__ float red[WARPS][NT * 4][32];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) red[warp][j * 4 + i][lane] = c[j][i];
    __syncthreads();
    // c[j][0..1]: row g, columns 2t, 2t + 1 of tile j; c[j][2..3]: row g + 8.
    if constexpr (GLU) {
        const int ffn = n / 2;
        for (int e = threadIdx.x; e < 4 * 32; e += WARPS * 32) {
            const int vi = e / 32, ln = e % 32;
            const int row = ln / 4 + 8 * (vi / 2), col = n0 + 2 * (ln % 4) + (vi % 2);
            if (row >= m) continue;
            float gs = 0.f, us = 0.f;
#pragma unroll 4
            for (int v = 0; v < WARPS; v++) {
                gs += red[v][vi][ln];
                us += red[v][4 + vi][ln];
            }
            // As silu_mul on the product rounded to T.
            const float gv = to_f(from_f<T>(gs)), uv = to_f(from_f<T>(us));
            y[(long long)row * ffn + col] = from_f<T>(gv / (1.f + __expf(-gv)) * uv);
        }
    } else {
        for (int e = threadIdx.x; e < NT * 4 * 32; e += WARPS * 32) {
            const int vi = e / 32, ln = e % 32, j = vi / 4, i = vi % 4;
            const int row = ln / 4 + 8 * (i / 2), col = n0 + j * 8 + 2 * (ln % 4) + (i % 2);
            if (row >= m) continue;
            float sum = 0.f;
#pragma unroll 4
            for (int v = 0; v < WARPS; v++) sum += red[v][vi][ln];
            y[(long long)row * n + col] = from_f<T>(sum);
        }
    }
}

#define MATMUL_SMALL(NAME, T, W, NT, GLU)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * W, 1) NAME(const T* x, const T* w, T* y, int m, int n, int k) { \
        pdl_entry();                                                                                          \
        matmul_small<T, W, NT, GLU>(x, w, y, m, n, k);                                                        \
    }
#define MATMUL_SMALL_NT(W, NT)                                                                             \
    MATMUL_SMALL(matmul_small_bf16_w##W##_t##NT, __nv_bfloat16, W, NT, false)                             \
    MATMUL_SMALL(matmul_small_f16_w##W##_t##NT, __half, W, NT, false)

MATMUL_SMALL_NT(4, 1)
MATMUL_SMALL_NT(4, 2)
MATMUL_SMALL_NT(4, 4)
MATMUL_SMALL_NT(8, 1)
MATMUL_SMALL_NT(8, 2)
MATMUL_SMALL_NT(8, 4)
MATMUL_SMALL_NT(16, 1)
MATMUL_SMALL_NT(16, 2)
MATMUL_SMALL_NT(16, 4)

// The GLU forms (two tiles: a gate one and its up one).
#define MATMUL_SMALL_GLU(W)                                                                                \
    MATMUL_SMALL(matmul_small_bf16_glu_w##W, __nv_bfloat16, W, 2, true)                                   \
    MATMUL_SMALL(matmul_small_f16_glu_w##W, __half, W, 2, true)

MATMUL_SMALL_GLU(4)
MATMUL_SMALL_GLU(8)
MATMUL_SMALL_GLU(16)

// x (T, n elements) to f32: the logits of a step, cast for the host's sampling (candle's cast
// took 25 us for 16 x 152k bf16 values on the H200, ~5x the copy rate). 8 values a thread from
// one 16-byte load where x is 16-byte aligned (the host passes `vec` = 1 then), else one a thread.
template <typename T>
__device__ void to_f32(const T* __restrict__ x, float* __restrict__ y, long long n, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        const long long n8 = n / 8;
        for (long long j = i; j < n8; j += stride) {
            const uint4 v = reinterpret_cast<const uint4*>(x)[j];
            const T* e = reinterpret_cast<const T*>(&v);
            float4 a = make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
            float4 b = make_float4(to_f(e[4]), to_f(e[5]), to_f(e[6]), to_f(e[7]));
            reinterpret_cast<float4*>(y)[2 * j] = a;
            reinterpret_cast<float4*>(y)[2 * j + 1] = b;
        }
        for (long long j = n8 * 8 + i; j < n; j += stride) y[j] = to_f(x[j]);
    } else {
        for (long long j = i; j < n; j += stride) y[j] = to_f(x[j]);
    }
}

#define TO_F32(NAME, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* x, float* y, long long n, int vec) {   \
        pdl_entry();                                                                                        \
        to_f32<T>(x, y, n, vec);                                                                            \
    }

TO_F32(to_f32_bf16, __nv_bfloat16)
TO_F32(to_f32_f16, __half)
