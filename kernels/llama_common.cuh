// llama_common.cuh: the pieces of a Llama-family decode step that kernels/llama_ops.cu (one launch per
// op) and kernels/llama_step.cu (the whole step in one persistent launch) share: roundings, CTA
// reductions, the per-head norm, RoPE, the KV staging and one attention work item. One owner, so the two
// step forms round alike (the runtime's gate holds each to the torch-ops step).
#pragma once
#include "bp_common.cuh"

namespace bp {

// An element of T written by another CTA of the same launch (or the previous one), as fp32: through L2
// (ld.global.cg), never from this SM's L1, which is not coherent and may hold the last layer's value.
template <typename T>
__device__ __forceinline__ float ldcg_val(const T* p);
template <>
__device__ __forceinline__ float ldcg_val<float>(const float* p) { return __ldcg(p); }
template <>
__device__ __forceinline__ float ldcg_val<f16>(const f16* p) {
  return half_bits_to_float(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
template <>
__device__ __forceinline__ float ldcg_val<bf16>(const bf16* p) {
  return bf16_bits_to_float(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}


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

// The qwen3 per-head RMSNorm of one head in shared memory, in place: x[i] = T(w[i] * T(x[i] / rms(x))), every
// thread of the CTA taking part (block_sum's barriers); each thread rewrites only the elements it summed.
template <typename T>
__device__ __forceinline__ void head_rms_norm(float* x, const T* __restrict__ w, int d, float eps, float* red) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ss += x[i] * x[i];
  const float r = rsqrtf(block_sum(ss, red) / (float)d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) x[i] = rnd<T>(Val<T>::sload(w + i) * rnd<T>(x[i] * r));
}

// RoPE of `heads` heads of d elements in shared memory (x[r * d + i]), in place, rounded as torch's apply_rope
// in T: y = T(T(x * cos) + T(rotate_half(x) * sin)). A thread owns the pair (i, i + d/2) of a head, the two
// elements rotate_half mixes, so it reads both before it writes either. The caller syncs before and after.
template <typename T>
__device__ __forceinline__ void rope_pairs(float* x, int heads, int d, const T* __restrict__ cs,
                                           const T* __restrict__ sn) {
  const int half = d >> 1;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int r = t / half, i = t - r * half;
    float* h = x + r * d;
    const float a = h[i], b = h[i + half];
    h[i] = rnd<T>(rnd<T>(a * Val<T>::sload(cs + i)) + rnd<T>(-b * Val<T>::sload(sn + i)));
    h[i + half] = rnd<T>(rnd<T>(b * Val<T>::sload(cs + i + half)) + rnd<T>(a * Val<T>::sload(sn + i + half)));
  }
}

// One attention chunk's keys and values into shared memory as fp32: rows x d contiguous elements of K
// and V (a chunk's cache rows are adjacent) into ks / vs [chunk][stride], rows rows..chunk-1 zeroed.
// With d a multiple of a 16-byte vector and aligned sources each thread issues all its 16-byte loads
// of K and V before it stores any (the unrolled loop), so the chunk is one memory round trip.
template <typename T>
__device__ __forceinline__ void stage_kv(const T* __restrict__ K, const T* __restrict__ V, int rows, int chunk, int d,
                                         float* ks, float* vs, int stride) {
  constexpr int kVec = 16 / (int)sizeof(T);
  const int n = chunk * d;
  const bool vec = d % kVec == 0 && ((reinterpret_cast<unsigned long long>(K) | reinterpret_cast<unsigned long long>(V)) & 15) == 0;
  if (vec) {
#pragma unroll 4
    for (int i = threadIdx.x * kVec; i < n; i += blockDim.x * kVec) {
      const int r = i / d, e = i - r * d;  // a vector never crosses a row: d % kVec == 0
      uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
      if (r < rows) {
        // __ldcg, not __ldg: attention_split writes row pos of this cache (a read-only load must not see
        // memory the kernel writes, even where, as here, the one CTA that writes it reads it first)
        kr = __ldcg(reinterpret_cast<const uint4*>(K + i));
        vr = __ldcg(reinterpret_cast<const uint4*>(V + i));
      }
      const T* kt = reinterpret_cast<const T*>(&kr);
      const T* vt = reinterpret_cast<const T*>(&vr);
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        ks[r * stride + e + u] = Val<T>::sload(kt + u);
        vs[r * stride + e + u] = Val<T>::sload(vt + u);
      }
    }
    return;
  }
#pragma unroll 8
  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // independent loads: many in flight per thread
    const int r = i / d, e = i - r * d;
    ks[r * stride + e] = r < rows ? Val<T>::sload(K + i) : 0.0f;
    vs[r * stride + e] = r < rows ? Val<T>::sload(V + i) : 0.0f;
  }
}

// Grouped-query attention of one query at position p over the cache, split over the cache
// (flash-decoding), with this step's RoPE and KV-cache append: each CTA ropes the rep query heads of its K/V
// head g (qwen3: their per-head RMSNorm first) from the fused projection's output qkv = [heads*d | kvh*d |
// kvh*d], and the CTA whose chunk holds pos ropes key head g, writes it and value head g into the cache at pos
// and into its staged rows (a separate launch for this cost ~1.8 us per layer at 1B: kernels/NOTES.md v31).
// Why split: one CTA per query head walking the whole cache (the first version) keeps
// one load in flight per warp per key, so its time grows with the context at memory latency, and
// reads each K/V head once per query head. Here a CTA owns one K/V head g and one chunk of `chunk`
// positions: it stages the chunk's keys and values once, together (fp32, rows padded by one word:
// conflict-free; 16-byte loads where d allows, so the whole chunk is in flight at once: staging keys
// and values one after the other with scalar loads made the kernel wait for memory ~9 times and cost
// ~20 us per layer at context 128, kernels/NOTES.md v23), scores
// them against all rep = heads / kvh query heads of g (s_j = T(T(q . k_j) * scaling) for the visible
// positions: j <= pos, and pos - j < window when window > 0), takes the chunk's max m and exp-sum l
// per head and writes the unnormalised partial output
// o = sum_j exp(s_j - m) v_j (fp32) with m and l to `part`. The last CTA of g to finish (a counter per
// K/V head, reset by that CTA for the next step) combines the chunks: out = T(sum_c o_c e^(m_c - M) /
// sum_c l_c e^(m_c - M)). The probabilities are not rounded to T on their own (the fp32 reference
// does not round them either); the runtime's gate holds the step to the torch-ops step's logits.
// One work item: K/V head g, chunk c of nchunks, the position p (read by the caller); every thread of the CTA
// calls it (any blockDim.x, a multiple of 32); an item with nothing visible returns at once. kOverlap: the
// launch is a programmatic dependent one (overlap_prologue after the cache rows are staged). wait_qkv: called
// there too, by every thread, before anything of this step is read (llama_step.cu: its grid barrier after the
// q/k/v rows, so that the staging overlaps the slowest CTA's rows; a no-op for attention_split).
// Dynamic shared memory: 2 * chunk * (d + 1) + rep * d + rep * chunk floats.
// part: float [heads, ceil(max_len / chunk), d + 2]; count: int [kvh], zero before the first step.
struct NoWait {
  __device__ void operator()() const {}
};

template <typename T, bool kOverlap, typename Wait = NoWait>
__device__ __forceinline__ void attention_item(
    const T* __restrict__ qkv, T* __restrict__ keys, T* __restrict__ values, const T* __restrict__ cos,
    const T* __restrict__ sin, const T* __restrict__ q_norm, const T* __restrict__ k_norm, float eps, long long p,
    T* __restrict__ out, float* __restrict__ part, int* __restrict__ count, int heads, int kvh, int d, int max_len,
    int window, float scaling, int chunk, int g, int c, int nchunks, float* __restrict__ sm,
    Wait wait_qkv = Wait()) {
  const int rep = heads / kvh;
  // never out of bounds (the host refuses such a step first); such a grid still waits below before it ends,
  // so that the grids after it can rely on every grid before them having finished (bp_common.cuh)
  const bool in_range = p >= 0 && p < max_len;
  const int lo = window > 0 ? (int)max(0LL, p - window + 1) : 0, hi = (int)p;  // visible: lo .. hi
  const int j0 = c * chunk;
  if (in_range && (j0 > hi || j0 + chunk <= lo)) return;  // nothing visible in this chunk (counted by nobody)
  const int stride = d + 1;
  float* ks = sm;                       // [chunk][d + 1]: keys
  float* vs = ks + chunk * stride;      // [chunk][d + 1]: values
  float* qs = vs + chunk * stride;      // [rep][d]
  float* sc = qs + rep * d;             // [rep][chunk]: scores, then exp(s - m)
  __shared__ float mx[32], sum[32];     // per head (rep <= 32)
  __shared__ float red[32];             // block_sum's
  __shared__ int last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  const T* K = keys + (long long)g * max_len * d;
  const T* V = values + (long long)g * max_len * d;
  const int rows = min(chunk, max_len - j0);  // rows of the cache in this chunk

  // Before the prologue: the chunk's cache rows. Earlier steps wrote them (and pos, a torch op's, before this
  // step's first overlapped launch could start), no grid of this step does: the chunk's one memory round trip
  // overlaps the q/k/v product instead of following it. (Row pos is this step's: replaced below.)
  if (in_range) stage_kv<T>(K + (long long)j0 * d, V + (long long)j0 * d, rows, chunk, d, ks, vs, stride);
  if (kOverlap) overlap_prologue();  // then wait for the previous grid: qkv is its output (bp_common.cuh)
  wait_qkv();
  if (!in_range) return;
  // this step's key and value (the staged row at pos holds the cache's stale one): raw, over that row
  const bool owns_pos = p >= j0 && p < j0 + chunk;  // uniform over the CTA
  float* kn = owns_pos ? ks + (int)(p - j0) * stride : ks;  // (only the owner uses them)
  float* vn = owns_pos ? vs + (int)(p - j0) * stride : vs;
  __syncthreads();  // (stage_kv's stores of that row come first)
  // the rep query heads of g, then (the owner) key and value head g: one loop, one memory round trip
  const int nq = rep * d, nload = nq + (owns_pos ? 2 * d : 0);
  for (int i = tid; i < nload; i += blockDim.x) {
    const bool isq = i < nq, isk = !isq && i < nq + d;
    const long long at = isq ? (long long)g * nq + i
                             : (long long)(heads + (isk ? 0 : kvh) + g) * d + (i - nq - (isk ? 0 : d));
    float* dst = isq ? qs + i : (isk ? kn + (i - nq) : vn + (i - nq - d));
    *dst = ldcg_val<T>(qkv + at);
  }
  __syncthreads();
  const T* cs = cos + p * d;
  const T* sn = sin + p * d;
  if (q_norm != nullptr)
    for (int r = 0; r < rep; ++r) head_rms_norm<T>(qs + r * d, q_norm, d, eps, red);
  if (owns_pos && k_norm != nullptr) head_rms_norm<T>(kn, k_norm, d, eps, red);
  __syncthreads();
  rope_pairs<T>(qs, rep, d, cs, sn);
  if (owns_pos) rope_pairs<T>(kn, 1, d, cs, sn);
  __syncthreads();
  if (owns_pos)  // into the cache (the next steps read it; no CTA of this launch reads pos from global)
    for (int i = tid; i < d; i += blockDim.x) {
      const long long at = ((long long)g * max_len + p) * d + i;
      Val<T>::store(keys + at, kn[i]);
      Val<T>::store(values + at, vn[i]);
    }
  // scores: thread per (head, position) pair, the dot product over d from shared memory
  for (int t = tid; t < rep * chunk; t += blockDim.x) {
    const int r = t / chunk, jj = t - r * chunk, j = j0 + jj;
    float s = -__int_as_float(0x7f800000);
    if (j >= lo && j <= hi) {
      // four independent sums: the dot product is a chain of shared-memory loads, and one accumulator
      // made it d load latencies long (the kernel's largest cost at short contexts, NOTES v29)
      const float* k = ks + jj * stride;
      const float* q = qs + r * d;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
      int e = 0;
#pragma unroll 2
      for (; e + 4 <= d; e += 4) {
        a0 = fmaf(q[e], k[e], a0);
        a1 = fmaf(q[e + 1], k[e + 1], a1);
        a2 = fmaf(q[e + 2], k[e + 2], a2);
        a3 = fmaf(q[e + 3], k[e + 3], a3);
      }
      for (; e < d; ++e) a0 = fmaf(q[e], k[e], a0);
      s = rnd<T>(rnd<T>((a0 + a1) + (a2 + a3)) * scaling);
    }
    sc[t] = s;
  }
  __syncthreads();
  // per head: the chunk's max and exp-sum (a warp per head)
  for (int r = warp; r < rep; r += warps) {
    float m = -__int_as_float(0x7f800000);
    for (int jj = lane; jj < chunk; jj += 32) m = fmaxf(m, sc[r * chunk + jj]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (int jj = lane; jj < chunk; jj += 32) {
      const float s = sc[r * chunk + jj];
      const float e = s == -__int_as_float(0x7f800000) ? 0.0f : __expf(s - m);
      sc[r * chunk + jj] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      mx[r] = m;
      sum[r] = l;
    }
  }
  __syncthreads();  // every exp(s - m) written
  const int slots = d + 2;
  for (int t = tid; t < rep * d; t += blockDim.x) {
    const int r = t / d, e = t - r * d;
    const float* p = sc + r * chunk;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // independent sums, as for the scores
    int jj = 0;
#pragma unroll 2
    for (; jj + 4 <= chunk; jj += 4) {
      a0 = fmaf(p[jj], vs[jj * stride + e], a0);
      a1 = fmaf(p[jj + 1], vs[(jj + 1) * stride + e], a1);
      a2 = fmaf(p[jj + 2], vs[(jj + 2) * stride + e], a2);
      a3 = fmaf(p[jj + 3], vs[(jj + 3) * stride + e], a3);
    }
    for (; jj < chunk; ++jj) a0 = fmaf(p[jj], vs[jj * stride + e], a0);
    part[((long long)(g * rep + r) * nchunks + c) * slots + e] = (a0 + a1) + (a2 + a3);
  }
  if (tid < rep) {
    float* ml = part + ((long long)(g * rep + tid) * nchunks + c) * slots + d;
    ml[0] = mx[tid];
    ml[1] = sum[tid];
  }
  // the last chunk of g to finish combines (its partials are visible after the fence + atomic)
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int c_lo = lo / chunk, c_hi = hi / chunk;
    last = atomicAdd(count + g, 1) == c_hi - c_lo;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int c_lo = lo / chunk, c_hi = hi / chunk;
  for (int t = tid; t < rep * d; t += blockDim.x) {
    const int r = t / d, e = t - r * d;
    const float* base = part + (long long)(g * rep + r) * nchunks * slots;
    // one pass, rescaling as the max grows (two passes, the max first, waited for memory twice); the
    // chunks' loads are independent, so an unrolled run of them is in flight at once
    float M = -__int_as_float(0x7f800000), L = 0.0f, acc = 0.0f;
#pragma unroll 8
    for (int cc = c_lo; cc <= c_hi; ++cc) {
      const float m = __ldcg(base + cc * slots + d), l = __ldcg(base + cc * slots + d + 1);
      const float o = __ldcg(base + cc * slots + e);
      // a chunk whose visible scores all rounded to -inf (16-bit overflow) has m = -inf: it weighs 0, as in the
      // two-pass combine, never exp(-inf - -inf) = NaN (fmaxf takes -1e30 over a NaN difference; branches here
      // made ptxas spill)
      const float nm = fmaxf(M, m);
      const float fo = __expf(fmaxf(M - nm, -1e30f)), fc = __expf(fmaxf(m - nm, -1e30f));
      L = fmaf(L, fo, l * fc);
      acc = fmaf(acc, fo, o * fc);
      M = nm;
    }
    Val<T>::store(out + (long long)(g * rep + r) * d + e, acc / L);
  }
  if (tid == 0) count[g] = 0;  // ready for the next step (the graph replays this launch)
}

}  // namespace bp
