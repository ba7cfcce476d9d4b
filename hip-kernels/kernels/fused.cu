// Small fused kernels of the transformer step around attention (see hip-kernels/src/cuda/fused.rs):
// each replaces several one-operation launches of a decode step by one.

#include "common.cuh"

// The residual update and the next RMSNorm of one row per CTA: x_out = x + delta (f32; delta in
// T, or none), xn = x_out * rsqrt(mean(x_out^2) + eps) * w, written in T. The sum of squares is
// taken in f32 over the f32 row, like candle's rms_norm.
template <typename T>
__device__ void add_rms_norm(const float* __restrict__ x, const T* __restrict__ delta, const float* __restrict__ w,
                             float eps, int h, float* __restrict__ x_out, T* __restrict__ xn) {
    const long long off = (long long)blockIdx.x * h;
    x += off;
    x_out += off;
    xn += off;
    if (delta != nullptr) delta += off;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = x[i] + (delta != nullptr ? to_f(delta[i]) : 0.f);
        x_out[i] = v;  // read back below by this same thread
        ss += v * v;
    }
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (int)(blockDim.x / 32) ? red[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    const float r = rsqrtf(red[0] / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) xn[i] = from_f<T>(x_out[i] * r * w[i]);
}

#define ADD_RMS_NORM(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(const float* x, const T* delta, const float* w, \
                                                           float eps, int h, float* x_out, T* xn) {       \
        add_rms_norm<T>(x, delta, w, eps, h, x_out, xn);                                                 \
    }

ADD_RMS_NORM(add_rms_norm_f32, float)
ADD_RMS_NORM(add_rms_norm_bf16, __nv_bfloat16)
ADD_RMS_NORM(add_rms_norm_f16, __half)
