// Phase profile of the decode mask search (hip_mask_few_*) on one GPU: times per launch and clock64
// cycles of thread 0 of CTA 0 in the split, score, rank and output phases (the kernel's PROF hooks,
// compiled in only with HIP_MASK_PROFILE). Llama-3.1-8B shapes, HipConfig::paper(), one query.
//   . scripts/cuda-env.sh && nvcc -O3 -std=c++17 -arch=sm_90 -o mask_profile scripts/mask_profile.cu \
//       -lcudart_static -ldl -lrt -lpthread
//   ./mask_profile 1048576        (context length; K is random bf16)
#define HIP_MASK_PROFILE
#include "../hip-kernels/kernels/hip_mask.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)
int main(int argc, char** argv) {
    long long tk = argc > 1 ? atoll(argv[1]) : 1048576;
    int hq = 32, hkv = 8, d = 128;
    size_t nk = (size_t)tk * hkv * d;
    std::vector<__nv_bfloat16> hk(nk), hqv(hq * d);
    unsigned s = 1;
    for (size_t i = 0; i < nk; i++) { s = s * 1664525u + 1013904223u; hk[i] = __float2bfloat16(((s >> 8) / 16777216.f - 0.5f)); }
    for (int i = 0; i < hq * d; i++) { s = s * 1664525u + 1013904223u; hqv[i] = __float2bfloat16(((s >> 8) / 16777216.f - 0.5f)); }
    __nv_bfloat16 *dk, *dq; uint32_t *ds, *dc;
    CK(cudaMalloc(&dk, nk * 2)); CK(cudaMalloc(&dq, hq * d * 2));
    CK(cudaMemcpy(dk, hk.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dq, hqv.data(), hq * d * 2, cudaMemcpyHostToDevice));
    int G = 256, cap = 512;
    CK(cudaMalloc(&ds, hq * G * 4)); CK(cudaMalloc(&dc, hq * 4));
    KvArgs kv{dk, dk, tk * hkv * d, hkv * d, nullptr, 0, 1, (int)tk, hkv};
    SearchArgs sa{1, hq, 64, 2, 2, 1, 16, 256, G, 1, cap};
    int smem = cap * 28;  // score + 4 branch arrays + 2 arrays of branch maxima
    auto run = [&]() { hip_mask_few_bf16_d128<<<dim3(1, hq, 1), 512, smem>>>(dq, hq * d, hq * d, kv, sa, 0.088f, ds, dc); };
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
    printf("t_k %lld: %.1f us per launch; cycles per launch: split %.0f score %.0f rank %.0f output %.0f\n", tk, ms * 1000 / reps,
           prof[0] / (double)reps, prof[1] / (double)reps, prof[2] / (double)reps, prof[3] / (double)reps);
    return 0;
}
