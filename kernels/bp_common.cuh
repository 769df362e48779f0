// bp_common.cuh: value types, conversions and cache-hinted loads shared by balprune kernels.
//
// No CUDA headers are included: under NVRTC (CuPy RawModule) cuda_fp16.h / cuda_bf16.h are not
// guaranteed to be on the include path, so the 16-bit float types are plain bit containers whose
// layout is identical to __half / __nv_bfloat16 (IEEE binary16, bfloat16), converted with PTX
// cvt instructions. The runtime inlines this file into the source string before compiling
// (CuPy's cache keys on the source text, not on files reached through -I).
#pragma once

namespace bp {

// Pick<C, A, B>::type: A when C, else B (no <type_traits> under NVRTC).
template <bool C, typename A, typename B>
struct Pick { using type = A; };
template <typename A, typename B>
struct Pick<false, A, B> { using type = B; };

// 16-bit float storage types: 2 bytes, the raw bits of a __half / __nv_bfloat16.
struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

// ---- weight loads -------------------------------------------------------------------------
// Weights are read exactly once per launch: stream them past L1 (no_allocate) so that L1 keeps
// whatever else the kernel reads (x in the global-memory fallback). BP_WEIGHT_HINT selects the
// qualifier at compile time (pass -DBP_WEIGHT_HINT=n): 0 plain read-only load, 1 L1::no_allocate
// (default), 2 .cs (evict-first in L1 and L2).
#ifndef BP_WEIGHT_HINT
#define BP_WEIGHT_HINT 1
#endif
#if BP_WEIGHT_HINT == 0
#define BP_LDW "ld.global.nc"
#elif BP_WEIGHT_HINT == 1
#define BP_LDW "ld.global.nc.L1::no_allocate"
#else
#define BP_LDW "ld.global.nc.cs"
#endif

// NW 32-bit words read with one vector load (NW * 4 bytes, naturally aligned: the alignment lets
// a plain dereference of shared memory compile to one LDS.64 / LDS.128).
template <int NW>
struct alignas(4 * NW) Words {
  unsigned w[NW];
};

template <int NW>
__device__ __forceinline__ Words<NW> ld_words(const void* p);

template <>
__device__ __forceinline__ Words<1> ld_words<1>(const void* p) {
  Words<1> r;
  asm(BP_LDW ".u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
  return r;
}

template <>
__device__ __forceinline__ Words<2> ld_words<2>(const void* p) {
  Words<2> r;
  asm(BP_LDW ".v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));
  return r;
}

template <>
__device__ __forceinline__ Words<4> ld_words<4>(const void* p) {
  Words<4> r;
  asm(BP_LDW ".v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
      : "l"(p));
  return r;
}

// Scalar weight / index loads, zero-extended into a 32-bit register (PTX allows a destination
// wider than the load type for ld).
__device__ __forceinline__ unsigned ld_u32(const void* p) {
  unsigned r;
  asm(BP_LDW ".u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ unsigned ld_u16(const void* p) {
  unsigned r;
  asm(BP_LDW ".u16 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ unsigned ld_u8(const void* p) {
  unsigned r;
  asm(BP_LDW ".u8 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}

// BYTES (1, 2, 4, 8 or 16, naturally aligned) read with one load into ceil(BYTES / 4) words.
template <int BYTES>
struct Bytes {
  static constexpr int kWords = BYTES < 4 ? 1 : BYTES / 4;
  __device__ static __forceinline__ Words<kWords> load(const void* p) {
    if (BYTES == 1) {
      Words<kWords> r;
      r.w[0] = ld_u8(p);
      return r;
    } else if (BYTES == 2) {
      Words<kWords> r;
      r.w[0] = ld_u16(p);
      return r;
    } else {
      return ld_words<kWords>(p);
    }
  }
};

// Bring one 128-byte line into L2 (no register is written, nothing waits on it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Bring one 128-byte line into this SM's L1 (and L2 on the way): no register is written, nothing waits on it.
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// Before overlap_prologue, a product kernel asks L2 for the first weights its CTA will read: no
// grid writes weights, so this is the one thing it may do before the previous grid has finished,
// and under programmatic dependent launch the previous grid (a norm, RoPE, attention: a few us that
// leave DRAM idle) overlaps the start of this one's weight stream. A CTA's rows in a grid-stride
// loop are runs of `run` bytes every `stride` bytes from `p`, up to `end` bytes from `p`; this asks
// for the first `cap` bytes of them in visiting order, one 128-byte line per thread and step.
// BP_L2_PREFETCH_BYTES is the budget of a whole grid (each CTA takes its share of it): a bounded
// part of a ~50 MB L2, so that prefetched lines are still there when the CTA reaches them.
#ifndef BP_L2_PREFETCH_BYTES
#define BP_L2_PREFETCH_BYTES (16ll << 20)
#endif
// (Only the CTAs of blockIdx.y == 0 prefetch: the other batch tiles read the same weights.)
__device__ __forceinline__ long long prefetch_share() {
  return (long long)(BP_L2_PREFETCH_BYTES) / gridDim.x;
}
__device__ __forceinline__ void prefetch_rows_l2(const void* p, long long run, long long stride, long long end,
                                                 long long cap) {
  if (run <= 0 || stride <= 0) return;  // (never from today's callers: it would loop forever)
  const char* c = reinterpret_cast<const char*>(p);
  for (long long start = 0; start < end && cap > 0; start += stride) {
    long long len = run < end - start ? run : end - start;
    len = len < cap ? len : cap;
    for (long long off = (long long)threadIdx.x * 128; off < len; off += (long long)blockDim.x * 128)
      prefetch_l2(c + start + off);
    cap -= len;
  }
}
// The usual case: two weight arrays of `a_row` and `b_row` bytes per row (values and their indices
// or masks); this CTA's rows start at `rows0` (of `rows`), `run` rows per grid-stride step of
// gridDim.x * run rows; the CTA's share of the budget split between the arrays by their bytes.
__device__ __forceinline__ void prefetch_cta_rows_l2(const void* a, long long a_row, const void* b, long long b_row,
                                                  long long rows0, long long run, long long rows) {
  if (rows0 >= rows) return;
  const long long share = prefetch_share() / (a_row + b_row), step = (long long)gridDim.x * run;
  prefetch_rows_l2(reinterpret_cast<const char*>(a) + rows0 * a_row, run * a_row, step * a_row, (rows - rows0) * a_row,
                   share * a_row);
  prefetch_rows_l2(reinterpret_cast<const char*>(b) + rows0 * b_row, run * b_row, step * b_row, (rows - rows0) * b_row,
                   share * b_row);
}

// ---- conversions --------------------------------------------------------------------------
__device__ __forceinline__ float half_bits_to_float(unsigned h) {
  float f;
  unsigned short s = (unsigned short)h;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
  return f;
}
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_bits_to_float(unsigned b) {
  return __uint_as_float((b & 0xffffu) << 16);
}
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// ---- per value type ---------------------------------------------------------------------------
// kPerVec: elements per 16-byte vector. at(v, s): element s (compile-time after unrolling) of a
// 16-byte vector as fp32. load(p): one streamed scalar weight. ldg(p): one cached read (x).
// store(p, f): round fp32 to T (round to nearest even) and store.
template <typename T>
struct Val;

template <>
struct Val<float> {
  static constexpr int kPerVec = 4;
  template <int NW>
  __device__ static __forceinline__ float at(const Words<NW>& v, int s) { return __uint_as_float(v.w[s]); }
  __device__ static __forceinline__ float load(const float* p) { return __uint_as_float(ld_u32(p)); }
  __device__ static __forceinline__ float ldg(const float* p) { return __ldg(p); }
  __device__ static __forceinline__ float sload(const float* p) { return *p; }
  __device__ static __forceinline__ void store(float* p, float f) { *p = f; }
};

template <>
struct Val<f16> {
  static constexpr int kPerVec = 8;
  template <int NW>
  __device__ static __forceinline__ float at(const Words<NW>& v, int s) {
    return half_bits_to_float((s & 1) ? (v.w[s >> 1] >> 16) : (v.w[s >> 1] & 0xffffu));
  }
  __device__ static __forceinline__ float load(const f16* p) { return half_bits_to_float(ld_u16(p)); }
  __device__ static __forceinline__ float ldg(const f16* p) {
    return half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ static __forceinline__ float sload(const f16* p) {
    return half_bits_to_float(*reinterpret_cast<const unsigned short*>(p));
  }
  __device__ static __forceinline__ void store(f16* p, float f) {
    *reinterpret_cast<unsigned short*>(p) = float_to_half_bits(f);
  }
};

template <>
struct Val<bf16> {
  static constexpr int kPerVec = 8;
  template <int NW>
  __device__ static __forceinline__ float at(const Words<NW>& v, int s) {
    return (s & 1) ? __uint_as_float(v.w[s >> 1] & 0xffff0000u) : __uint_as_float(v.w[s >> 1] << 16);
  }
  __device__ static __forceinline__ float load(const bf16* p) { return bf16_bits_to_float(ld_u16(p)); }
  __device__ static __forceinline__ float ldg(const bf16* p) {
    return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ static __forceinline__ float sload(const bf16* p) {
    return bf16_bits_to_float(*reinterpret_cast<const unsigned short*>(p));
  }
  __device__ static __forceinline__ void store(bf16* p, float f) {
    *reinterpret_cast<unsigned short*>(p) = float_to_bf16_bits(f);
  }
};

// ---- per index type -----------------------------------------------------------------------------
// at(v, s): in-block index s of a packed vector of NW words. load(p): one streamed scalar index.
template <typename I>
struct Idx;

template <>
struct Idx<unsigned char> {
  template <int NW>
  __device__ static __forceinline__ unsigned at(const Words<NW>& v, int s) {
    return __byte_perm(v.w[s >> 2], 0u, 0x4440u | (unsigned)(s & 3));  // one PRMT: byte s, zero-extended
  }
  __device__ static __forceinline__ unsigned load(const unsigned char* p) { return ld_u8(p); }
};

template <>
struct Idx<unsigned short> {
  template <int NW>
  __device__ static __forceinline__ unsigned at(const Words<NW>& v, int s) {
    return __byte_perm(v.w[s >> 1], 0u, (s & 1) ? 0x4432u : 0x4410u);  // one PRMT: half s, zero-extended
  }
  __device__ static __forceinline__ unsigned load(const unsigned short* p) { return ld_u16(p); }
};

// The fused epilogue of a product row: act(acc + bias[row]) in fp32, before the one rounding to
// T. bias: [rows] fp32 or null (none); act: 0 identity, 1 ReLU (fmaxf: like model_ops.cu's
// bias_relu_pool2, a NaN sum becomes 0).
__device__ __forceinline__ float epilogue(float acc, const float* __restrict__ bias, int act, long long row) {
  if (bias != nullptr) acc += __ldg(bias + row);
  return act ? fmaxf(acc, 0.0f) : acc;
}

// ---- Hopper bulk copies and mbarriers (sm_90) ----------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Make initialised barriers visible to the async proxy (the bulk-copy engine) before first use.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Wait until the phase with parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  const unsigned a = smem_addr(bar);
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
  } while (!done);
}
// Global -> shared bulk copy (bytes % 16 == 0, both addresses 16-byte aligned); completion is
// counted in bytes on `bar` (complete_tx).
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
// Order this thread's shared-memory accesses (generic proxy) before later bulk copies (async proxy) into it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// One fp32 from shared memory at a 32-bit shared-window address (lets address = IMAD + LDS).
__device__ __forceinline__ float lds_f32(unsigned addr) {
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
// One element of T from shared memory at a 32-bit shared-window address, as fp32 (x kept in its
// own type: a 16-bit load and a conversion).
template <typename T>
__device__ __forceinline__ float lds_as_f32(unsigned addr);
template <>
__device__ __forceinline__ float lds_as_f32<float>(unsigned addr) { return lds_f32(addr); }
template <>
__device__ __forceinline__ float lds_as_f32<f16>(unsigned addr) {
  unsigned h;  // zero-extended into a 32-bit register
  asm("ld.shared.u16 %0, [%1];" : "=r"(h) : "r"(addr));
  return half_bits_to_float(h);
}
template <>
__device__ __forceinline__ float lds_as_f32<bf16>(unsigned addr) {
  unsigned h;  // zero-extended into a 32-bit register
  asm("ld.shared.u16 %0, [%1];" : "=r"(h) : "r"(addr));
  return bf16_bits_to_float(h);
}
// Barrier over the first `threads` threads of the CTA (named barrier 1), leaving other warps free.
__device__ __forceinline__ void named_sync(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

// ---- programmatic dependent launch (sm_90+) -----------------------------------------------
// A decode step is ~150 short launches in a row; between two of them the GPU idles while the
// second grid is launched and its CTAs are placed (runtime._launch, ``overlap``). Launched with
// the programmatic-serialization attribute, a grid may start while the previous one still runs:
// its CTAs are placed early and wait here until the previous grid has completed and its writes are
// visible. So a kernel that can be launched that way calls overlap_prologue() before it reads anything a
// grid of the step writes, and before it writes any global memory; then it lets the next grid be placed
// (at most two grids are in flight: the running one and the next, waiting). What it may read first:
// the step's constants -- weights, the KV cache below the position, the position itself (torch writes it
// between steps, and the step's first overlapped launch starts after every torch launch before it).
// Without the attribute both instructions return at once, so the same kernel serves ordinary launches.
__device__ __forceinline__ void overlap_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace bp
