// llama_ops.cu: the non-matrix work of a Llama-family decode step at batch 1
// (balprune.runtime.model.llama), fused so that a decoder layer is eight launches: norm, q/k/v,
// attention_split (RoPE and the KV-cache append included), o, add_rms_norm, gate/up, silu_mul, down (the next
// layer's add_rms_norm takes down's residual add). In torch ops the same layer is about forty launches; at batch 1 a
// launch costs about as much as moving a few MB, so launches set the floor of a 1B model's step.
//
// Numbers: each kernel rounds to T exactly where llm.reference.ReferenceLM (torch ops in T) does,
// so the fused step and the torch-ops step differ only in summation order. Arithmetic is fp32.
// T is float, bp::f16 or bp::bf16 (bp_common.cuh), instantiated by name. The position of the
// token lives in device memory (pos[0]) so a captured CUDA graph serves every step.
#include "llama_common.cuh"

namespace bp {

// The residual add and the next RMSNorm, one CTA: h += delta (rounded to T; delta may be null),
// then out = w * T(h / sqrt(mean(h^2) + eps)). dim <= 32 * blockDim.x elements per thread loop.
// The norm's weights are read before the prologue (kNormPre per thread, in registers: a constant of the step,
// so their fetch overlaps the previous grid instead of adding a round trip after the barrier).
constexpr int kNormPre = 4;

template <typename T>
__global__ void add_rms_norm(T* __restrict__ h, const T* __restrict__ delta, const T* __restrict__ w,
                             T* __restrict__ out, int dim, float eps) {
  float wp[kNormPre];
#pragma unroll
  for (int u = 0; u < kNormPre; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    wp[u] = i < dim ? Val<T>::sload(w + i) : 0.0f;
  }
  overlap_prologue();  // then wait for the previous grid (h and delta are this step's: bp_common.cuh)
  __shared__ float red[32];
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = Val<T>::sload(h + i);
    if (delta != nullptr) {
      v = rnd<T>(v + Val<T>::sload(delta + i));
      Val<T>::store(h + i, v);
    }
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, red) / (float)dim + eps);
#pragma unroll
  for (int u = 0; u < kNormPre; ++u) {  // (unrolled: wp stays in registers)
    const int i = threadIdx.x + u * blockDim.x;
    if (i < dim) Val<T>::store(out + i, wp[u] * rnd<T>(Val<T>::sload(h + i) * r));  // h: this thread's own store
  }
  for (int i = threadIdx.x + kNormPre * blockDim.x; i < dim; i += blockDim.x)
    Val<T>::store(out + i, Val<T>::sload(w + i) * rnd<T>(Val<T>::sload(h + i) * r));
}

// grid (kvh, ceil(max_len / chunk)), block kAttThreads; chunks past pos exit at once (attention_item).
// Dynamic shared memory: 2 * chunk * (d + 1) + rep * d + rep * chunk floats.
// part: float [heads, ceil(max_len / chunk), d + 2]; count: int [kvh], zero before the first step.
constexpr int kAttThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kAttThreads) attention_split(
    const T* __restrict__ qkv, T* __restrict__ keys, T* __restrict__ values, const T* __restrict__ cos,
    const T* __restrict__ sin, const T* __restrict__ q_norm, const T* __restrict__ k_norm, float eps,
    const long long* __restrict__ pos, T* __restrict__ out, float* __restrict__ part, int* __restrict__ count,
    int heads, int kvh, int d, int max_len, int window, float scaling, int chunk) {
  extern __shared__ float sm[];
  attention_item<T, true>(qkv, keys, values, cos, sin, q_norm, k_norm, eps, pos[0], out, part, count, heads, kvh, d,
                          max_len, window, scaling, chunk, blockIdx.x, blockIdx.y, gridDim.y, sm);
}

// out[j] = T(T(silu(gate[j])) * up[j]) for gate_up = [gate | up], j < inter.
template <typename T>
__global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int inter) {
  overlap_prologue();  // first: this grid may be launched before the previous one ends (bp_common.cuh)
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= inter) return;
  const float gv = Val<T>::sload(gate_up + j);
  const float s = rnd<T>(gv / (1.0f + __expf(-gv)));
  Val<T>::store(out + j, s * Val<T>::sload(gate_up + inter + j));
}

}  // namespace bp
