// lstm_common.cuh: what the persistent LSTM kernels (lstm_recurrence.cu, lstm_lm_step.cu) share:
// 16-bit float bit conversions, tagged h words (a value and the step it belongs to in one
// store, so CTAs hand h to each other without a grid barrier; see lstm_recurrence.cu), the
// launch epoch that keeps tags of successive launches apart, and the cell's nonlinearity.
#pragma once
#include "bp_common.cuh"

namespace bp {

// The low 16 bits of w as a 16-bit float, and a float rounded to 16-bit bits (round to nearest even).
template <typename T>
__device__ __forceinline__ float from_bits16(unsigned w);
template <>
__device__ __forceinline__ float from_bits16<f16>(unsigned w) { return half_bits_to_float(w & 0xffffu); }
template <>
__device__ __forceinline__ float from_bits16<bf16>(unsigned w) { return bf16_bits_to_float(w); }
template <typename T>
__device__ __forceinline__ unsigned short to_bits16(float f);
template <>
__device__ __forceinline__ unsigned short to_bits16<f16>(float f) { return float_to_half_bits(f); }
template <>
__device__ __forceinline__ unsigned short to_bits16<bf16>(float f) { return float_to_bf16_bits(f); }

// Tagged h words: Tag<T>::Word holds h's bits and a 16-bit step tag.
template <typename T>
struct Tag;
template <>
struct Tag<float> {
  using Word = unsigned long long;
  __device__ static __forceinline__ Word pack(float h, unsigned tag) {
    return (unsigned long long)__float_as_uint(h) | ((unsigned long long)tag << 32);
  }
  __device__ static __forceinline__ unsigned tag(Word w) { return (unsigned)(w >> 32); }
  __device__ static __forceinline__ float value(Word w) { return __uint_as_float((unsigned)w); }
  __device__ static __forceinline__ Word load(const Word* p) {
    Word v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
  }
  __device__ static __forceinline__ void store(Word* p, Word v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
  }
};
template <typename T>
struct Tag16 {  // f16, bf16: the 16 value bits in the low half, the tag in the high half
  using Word = unsigned;
  __device__ static __forceinline__ Word pack(float h, unsigned tag) { return (unsigned)to_bits16<T>(h) | (tag << 16); }
  __device__ static __forceinline__ unsigned tag(Word w) { return w >> 16; }
  __device__ static __forceinline__ float value(Word w) { return from_bits16<T>(w); }
  __device__ static __forceinline__ Word load(const Word* p) {
    Word v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
  }
  __device__ static __forceinline__ void store(Word* p, Word v) {
    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
  }
};
template <>
struct Tag<f16> : Tag16<f16> {};
template <>
struct Tag<bf16> : Tag16<bf16> {};

__device__ __forceinline__ float sigmoid_rec(float v) { return 1.0f / (1.0f + __expf(-v)); }

// put(i, the value of src[i]) for i < n, once every word carries `tag`: the CTA polls the words
// (coalesced) until all of them match. Each try issues all of a thread's loads (up to 4 per
// round) before it looks at any, so a try costs one L2 round trip, not one per word. Called by
// every thread of the CTA (it ends with a CTA-wide barrier).
template <typename T, typename Put>
__device__ __forceinline__ void gather_tagged(const typename Tag<T>::Word* src, int n, unsigned tag, Put put) {
  constexpr int kPer = 4;
  bool done = false;
  while (!done) {
    bool mine = true;
    for (int base = threadIdx.x; base < n; base += kPer * blockDim.x) {
      typename Tag<T>::Word w[kPer];
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        const int i = base + m * blockDim.x;
        if (i < n) w[m] = Tag<T>::load(src + i);
      }
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        const int i = base + m * blockDim.x;
        if (i >= n) continue;
        if (Tag<T>::tag(w[m]) == tag) {
          put(i, Tag<T>::value(w[m]));
        } else {
          mine = false;
        }
      }
    }
    done = __syncthreads_and(mine);
  }
}

// The launch epoch: ctl[1] (written by the previous launch's last CTA, which finished before
// this launch began). end_launch: the last CTA of the grid to finish advances it for the next
// launch (ctl[0] counts finished CTAs and returns to 0).
__device__ __forceinline__ unsigned launch_epoch(const unsigned* ctl) {
  return *reinterpret_cast<const volatile unsigned*>(ctl + 1);
}
__device__ __forceinline__ void end_launch(unsigned* ctl, unsigned epoch) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(ctl, 1u) == gridDim.x * gridDim.y - 1) {
    ctl[0] = 0;
    ctl[1] = epoch + 1;
  }
}

}  // namespace bp
