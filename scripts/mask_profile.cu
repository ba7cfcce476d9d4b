// Phase profile of the decode mask search (hip_mask_few_*) on one GPU: times per launch and clock64
// cycles of thread 0 of CTA 0 in the first split, score (with the placement), rank (with the next
// split) and output phases (the
// kernel's PROF hooks, compiled in only with HIP_MASK_PROFILE). One query per sequence, K random
// bf16 in a contiguous [batch, t_k, heads_kv, 128] store (every sequence its own keys),
// HipConfig::paper() (k 512, block_k 2, sink 16, window 256).
//   . scripts/cuda-env.sh && nvcc -O3 -std=c++17 -arch=sm_90 -o mask_profile scripts/mask_profile.cu \
//       -lcudart_static -ldl -lrt -lpthread
//   ./mask_profile [t_k 131072] [batch 16] [heads_q 12] [heads_kv 2] [form t|o2p|base]
// (defaults: Qwen2.5-1.5B's heads at 128k x 16, the default `_t` form)
#define HIP_MASK_PROFILE
#include "../hip-kernels/kernels/hip_mask.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

// Uniform [-0.5, 0.5) bf16 from a hash of the index.
__global__ void fill(__nv_bfloat16* x, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        x[i] = __float2bfloat16((h >> 8) / 16777216.f - 0.5f);
    }
}

typedef void (*Kernel)(const __nv_bfloat16*, long long, long long, KvArgs, SearchArgs, float, uint32_t*, uint32_t*);

int main(int argc, char** argv) {
    long long tk = argc > 1 ? atoll(argv[1]) : 131072;
    int batch = argc > 2 ? atoi(argv[2]) : 16, hq = argc > 3 ? atoi(argv[3]) : 12, hkv = argc > 4 ? atoi(argv[4]) : 2;
    const char* form = argc > 5 ? argv[5] : "t";
    const int d = 128, G = 256, cap = 512, kpb = 2;
    size_t nk = (size_t)batch * tk * hkv * d, nq = (size_t)batch * hq * d;
    __nv_bfloat16 *dk, *dq; uint32_t *ds, *dc;
    CK(cudaMalloc(&dk, nk * 2)); CK(cudaMalloc(&dq, nq * 2));
    fill<<<1024, 256>>>(dk, nk, 1); fill<<<64, 256>>>(dq, nq, 2);
    CK(cudaMalloc(&ds, (size_t)batch * hq * G * 4)); CK(cudaMalloc(&dc, (size_t)batch * hq * 4));
    KvArgs kv{};
    kv.k = dk; kv.v = dk; kv.kv_b = tk * hkv * d; kv.kv_t = hkv * d; kv.page = 1; kv.t_k = (int)tk; kv.heads_kv = hkv;
    SearchArgs sa{1, hq, 64, 2, 2, 1, 16, 256, G, 1, cap, nullptr, nullptr};
    int smem = cap * 28;  // score + 4 branch arrays + 2 arrays of branch maxima
    Kernel k = hip_mask_few_bf16_d128;
    if (!strcmp(form, "t")) { k = hip_mask_few_bf16_d128_t; smem += cap * kpb * 8; }
    else if (!strcmp(form, "o2p")) { k = hip_mask_few_bf16_d128_o2p; smem += cap * kpb * 8; }
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    auto run = [&]() { k<<<dim3(1, hq, batch), 512, smem>>>(dq, hq * d, hq * d, kv, sa, 0.088f, ds, dc); };
    for (int i = 0; i < 3; i++) run();
    CK(cudaDeviceSynchronize());
    unsigned long long zero[8] = {0};
    CK(cudaMemcpyToSymbol(g_prof, zero, sizeof(zero)));
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    int reps = 20;
    cudaEventRecord(a);
    for (int i = 0; i < reps; i++) run();
    cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b);
    unsigned long long prof[8]; CK(cudaMemcpyFromSymbol(prof, g_prof, sizeof(prof)));
    printf("form %s t_k %lld batch %d heads %d/%d: %.1f us per launch; cycles per launch (CTA 0): split %.0f score %.0f rank %.0f output %.0f\n",
           form, tk, batch, hq, hkv, ms * 1000 / reps, prof[0] / (double)reps, prof[1] / (double)reps,
           prof[2] / (double)reps, prof[3] / (double)reps);
    return 0;
}
