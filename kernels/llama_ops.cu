// llama_ops.cu: the non-matrix work of a Llama-family decode step at batch 1
// (balprune.runtime.model.llama), fused so that a decoder layer is nine launches: norm, q/k/v,
// rope_append, attention, o, add_rms_norm, gate/up, silu_mul, down (the next layer's add_rms_norm
// takes down's residual add). In torch ops the same layer is about forty launches; at batch 1 a
// launch costs about as much as moving a few MB, so launches set the floor of a 1B model's step.
//
// Numbers: each kernel rounds to T exactly where llm.reference.ReferenceLM (torch ops in T) does,
// so the fused step and the torch-ops step differ only in summation order. Arithmetic is fp32.
// T is float, bp::f16 or bp::bf16 (bp_common.cuh), instantiated by name. The position of the
// token lives in device memory (pos[0]) so a captured CUDA graph serves every step.
#include "bp_common.cuh"

namespace bp {

// x rounded to T and back (the value a torch op in T would hold).
template <typename T>
__device__ __forceinline__ float rnd(float x) {
  T t;
  Val<T>::store(&t, x);
  return Val<T>::sload(&t);
}

// Sum of v over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// red: 32 floats of shared memory; the call ends with a barrier so red can be reused.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = lane < warps ? red[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = lane < warps ? red[lane] : -__int_as_float(0x7f800000);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, o));
  return s;
}

// The residual add and the next RMSNorm, one CTA: h += delta (rounded to T; delta may be null),
// then out = w * T(h / sqrt(mean(h^2) + eps)). dim <= 32 * blockDim.x elements per thread loop.
template <typename T>
__global__ void add_rms_norm(T* __restrict__ h, const T* __restrict__ delta, const T* __restrict__ w,
                             T* __restrict__ out, int dim, float eps) {
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
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = Val<T>::sload(h + i);  // this thread's own store above: visible to it
    Val<T>::store(out + i, Val<T>::sload(w + i) * rnd<T>(v * r));
  }
}

// RoPE (and, for qwen3, the per-head RMSNorm before it) of one head, in registers: thread i < d
// holds element i. Returns the rotated value (rounded as torch: x*cos and rot(x)*sin each to T,
// then their sum). xs: d floats of shared memory holding the (normed) head.
template <typename T>
__device__ __forceinline__ float rope_one(float x, const T* __restrict__ norm_w, float eps, const T* __restrict__ cos_row,
                                          const T* __restrict__ sin_row, int d, float* xs, float* red) {
  const int i = threadIdx.x;
  if (norm_w != nullptr) {
    const float ss = block_sum(i < d ? x * x : 0.0f, red);
    if (i < d) x = Val<T>::sload(norm_w + i) * rnd<T>(x * rsqrtf(ss / (float)d + eps));
    x = rnd<T>(x);
  }
  __syncthreads();
  if (i < d) xs[i] = x;
  __syncthreads();
  if (i >= d) return 0.0f;
  const int half = d >> 1;
  const float rot = i < half ? -xs[i + half] : xs[i - half];
  return rnd<T>(rnd<T>(x * Val<T>::sload(cos_row + i)) + rnd<T>(rot * Val<T>::sload(sin_row + i)));
}

// RoPE of q in place and of k into the KV cache, and v into the cache, at position pos[0].
// qkv: [heads*d | kvh*d | kvh*d] (the fused projection's output). Grid: heads + kvh CTAs (CTA b <
// heads: query head b; else key/value head b - heads), blockDim.x = d rounded up to 32 (d <= 1024,
// even). cos, sin: [max_len, d] tables. keys, values: this layer's [kvh, max_len, d].
// q_norm / k_norm: the qwen3 per-head RMSNorm weights [d], or null.
template <typename T>
__global__ void rope_append(T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                            const long long* __restrict__ pos, T* __restrict__ keys, T* __restrict__ values,
                            const T* __restrict__ q_norm, const T* __restrict__ k_norm, float eps, int heads, int kvh,
                            int d, int max_len) {
  __shared__ float red[32];
  __shared__ float xs[1024];
  const int b = blockIdx.x, i = threadIdx.x;
  const long long p = pos[0];
  if (p < 0 || p >= max_len) return;  // never written out of bounds (the host refuses such a step first)
  const T* c = cos + p * d;
  const T* s = sin + p * d;
  if (b < heads) {
    T* q = qkv + (long long)b * d;
    const float x = i < d ? Val<T>::sload(q + i) : 0.0f;
    const float y = rope_one<T>(x, q_norm, eps, c, s, d, xs, red);
    if (i < d) Val<T>::store(q + i, y);
    return;
  }
  const int g = b - heads;
  const T* k = qkv + (long long)heads * d + (long long)g * d;
  const T* v = qkv + (long long)(heads + kvh) * d + (long long)g * d;
  const float x = i < d ? Val<T>::sload(k + i) : 0.0f;
  const float y = rope_one<T>(x, k_norm, eps, c, s, d, xs, red);
  if (i < d) {
    const long long at = ((long long)g * max_len + p) * d + i;
    Val<T>::store(keys + at, y);
    values[at] = v[i];
  }
}

// Grouped-query attention of one query at position pos[0] over the cache, one CTA per query head
// (query head b reads key/value head b / (heads / kvh)): scores s_j = T(T(q . k_j) * scaling) for
// the visible positions j (j <= pos, and pos - j < window when window > 0), a float32 softmax,
// probabilities rounded to T, out = T(sum_j p_j v_j). Dynamic shared memory: (max_len + d *
// (blockDim.x / d)) floats. blockDim.x a multiple of 32 and of d's 32-rounding; d <= blockDim.x.
template <typename T>
__global__ void attention_decode(const T* __restrict__ q_all, const T* __restrict__ keys, const T* __restrict__ values,
                                 const long long* __restrict__ pos, T* __restrict__ out, int heads, int kvh, int d,
                                 int max_len, int window, float scaling) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* scores = sm;            // [max_len]
  float* part = sm + max_len;    // [groups, d] partial outputs
  const int b = blockIdx.x, g = b / (heads / kvh);
  const long long p = pos[0];
  if (p < 0 || p >= max_len) return;
  const int lo = window > 0 ? (int)max(0LL, p - window + 1) : 0, hi = (int)p;  // visible: lo .. hi
  const T* q = q_all + (long long)b * d;
  const T* K = keys + (long long)g * max_len * d;
  const T* V = values + (long long)g * max_len * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // scores: a warp per key, lanes over the head dimension
  for (int j = lo + warp; j <= hi; j += warps) {
    float acc = 0.0f;
    for (int i = lane; i < d; i += 32) acc += Val<T>::sload(q + i) * Val<T>::sload(K + (long long)j * d + i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) scores[j] = rnd<T>(rnd<T>(acc) * scaling);
  }
  __syncthreads();
  float m = -__int_as_float(0x7f800000);
  for (int j = lo + (int)threadIdx.x; j <= hi; j += blockDim.x) m = fmaxf(m, scores[j]);
  m = block_max(m, red);
  float sum = 0.0f;
  for (int j = lo + (int)threadIdx.x; j <= hi; j += blockDim.x) {
    const float e = __expf(scores[j] - m);
    scores[j] = e;
    sum += e;
  }
  const float inv = 1.0f / block_sum(sum, red);  // ends with a barrier: every exp is in place
  // out: thread (group, i) sums its share of the positions for element i; groups added at the end
  const int groups = blockDim.x / d, grp = threadIdx.x / d, i = threadIdx.x % d;
  float acc = 0.0f;
  if (grp < groups) {
    for (int j = lo + grp; j <= hi; j += groups) acc += rnd<T>(scores[j] * inv) * Val<T>::sload(V + (long long)j * d + i);
    part[grp * d + i] = acc;
  }
  __syncthreads();
  if (threadIdx.x < d) {
    float t = 0.0f;
    for (int k = 0; k < groups; ++k) t += part[k * d + threadIdx.x];
    Val<T>::store(out + (long long)b * d + threadIdx.x, t);
  }
}

// out[j] = T(T(silu(gate[j])) * up[j]) for gate_up = [gate | up], j < inter.
template <typename T>
__global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int inter) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= inter) return;
  const float gv = Val<T>::sload(gate_up + j);
  const float s = rnd<T>(gv / (1.0f + __expf(-gv)));
  Val<T>::store(out + j, s * Val<T>::sload(gate_up + inter + j));
}

}  // namespace bp
