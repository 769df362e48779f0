// balanced_bitmask.cu: y = W x for a balanced-sparse W stored with the BITMASK index encoding.
//
// Device layout (built on the host by balprune.formats.layouts.bitmask_segments; kernels/README.md
// states it byte for byte): a row of B blocks of length L is cut into S segments of g whole
// blocks (g chosen by SegmentGeometry), so a segment covers g*L columns in W = ceil(g*L/32)
// 32-bit mask words (bits past g*L zero) and holds exactly g*k kept values (the last segment is filled up with phantom blocks: zero values,
// their first k bits set, columns past the row whose x is staged as 0). A row's segments go to P
// lanes (P = min(32, next power of two >= S), or >= ceil(S / 2) in the paired layout walk 6 takes;
// 32 / P rows per warp), segment s = q*P + l to lane l in round q; phantom segments (s >= S) hold
// zero values and their first g*k bits set. Arrays:
//   vals  [rows, Q, C, P] 16-byte units: unit c of lane l in round q holds values c*V .. c*V+V-1
//         of segment q*P + l in column order (V = 16 / sizeof(T); zeros past g*k);
//   masks [rows, Q, W, P] 32-bit words: word w of that segment, bit 31 - b = segment column
//         32*w + b (bit-reversed: the next kept column is a count of leading zeros away).
// So a warp's loads of one unit (or one word) over its lanes are one contiguous run.
//
// Per value a lane finds its column by walking the set bits of its mask words (find lowest set
// bit, clear it), reads x from shared memory and accumulates in fp32; the lanes of a row add
// their sums with shuffles; the epilogue (bias, ReLU) runs in fp32 before the one rounding to T.
//
// Shared memory: x staged once per CTA, interleaved by segment (column cs of segment s at
// xs[(cs * SP + s) * NB + n], SP = Q * P), so the 32 lanes of a warp, which walk 32 different
// segments, read 32 different banks whatever columns they are at; then per warp the W mask words
// of each lane's current segment (mw[w * 32 + lane]), loaded with the value units at the start of
// a segment: a lane refills its walk from shared memory, never with a global load inside the
// walk (lanes refill at different values, so a global load there would serialise its latency
// over the warp: measured 4-5x slower than a plain read of the bytes).
#include "bp_common.cuh"

// Kernel-side constants the host layout must agree with (tests/test_kernels_compile.py reads them).
#define BP_BM_UNIT_BYTES 16
#define BP_BM_WORD_BITS 32
// Units loaded ahead of their use, per lane (registers: 4 words each).
#ifndef BP_BM_AHEAD
#define BP_BM_AHEAD 4
#endif
// 1: rolling prefetch of value units (each unit's registers reload as soon as it is consumed);
// 0: the batch reload of AHEAD units (version 4).
#ifndef BP_BM_ROLLING
#define BP_BM_ROLLING 1
#endif
// 6: the uniform walk (every lane runs the same instructions per value: the next mask word is held in a
// register and a refill is a predicated move, so no lane's word boundary diverges the warp), two
// segments walked at once per lane (the host's layout must pair rounds: SegmentGeometry(paired=True));
// 5: version 5's walk, one segment at a time. The host passes it (runtime.bitmask.WALK).
#ifndef BP_BM_WALK
#define BP_BM_WALK 5
#endif
// Value units per lane asked into L1 before the prologue (the warp's first row group; 0: none). NOTES v30.
#ifndef BP_BM_L1_UNITS
#define BP_BM_L1_UNITS 8
#endif
// CTAs of 256 threads per SM the register budget is sized for (4: 64 registers, 32 warps per SM).
#ifndef BP_BM_MIN_CTAS
#define BP_BM_MIN_CTAS 4
#endif

namespace bp {

// x of NB batch columns from the shared-window address `addr` (NB values of XT, aligned to NB *
// sizeof(XT)), as fp32.
template <typename XT, int NB>
__device__ __forceinline__ void lds_x(unsigned addr, float (&out)[NB]) {
  if constexpr (sizeof(XT) == 4) {
#pragma unroll
    for (int n = 0; n < NB; ++n) out[n] = lds_f32(addr + 4u * n);
  } else if constexpr (NB == 1) {
    out[0] = lds_as_f32<XT>(addr);
  } else {
    // 16-bit x: the NB halves as whole 32-bit words (NB >= 2)
#pragma unroll
    for (int i = 0; i < NB / 2; ++i) {
      unsigned wv;
      asm("ld.shared.u32 %0, [%1];" : "=r"(wv) : "r"(addr + 4u * i));
      Words<1> one;
      one.w[0] = wv;
      out[2 * i] = Val<XT>::template at<1>(one, 0);
      out[2 * i + 1] = Val<XT>::template at<1>(one, 1);
    }
  }
}

__device__ __forceinline__ unsigned lds_u32(unsigned addr) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

// The next kept column of a non-empty bit-reversed word m, consumed: its bit p = 31 - (column in the
// word) is one FLO, cleared by a shift and an xor, and x's address is xhi - p * xcol with xhi the
// address at the word's last column (one multiply-add). Written as 31 - __clz, the compiler emits
// FLO then the subtraction it undoes; as clz directly, a subtraction and a shifted constant more.
__device__ __forceinline__ unsigned take_column(unsigned& m, unsigned xhi, unsigned xcol) {
  const unsigned p = 31u - __clz(m);
  m ^= 1u << p;
  return xhi - p * xcol;
}

// Compile-time flag for a generic lambda's argument (the walk with or without empty-word handling).
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// One lane's walk over the kept columns of its segment. Mask words are stored bit-reversed
// (bit 31 = the word's first column), so the next kept column is one count of leading zeros
// away. Exactly g*k bits are set per segment and exactly g*k values are consumed, so fill()
// never runs past the segment's last word.
template <bool HI>
struct MaskWalk {
  unsigned m;      // the current word's kept columns not consumed yet
  unsigned maddr;  // shared address of the current word (a lane's words are 128 bytes apart)
  unsigned xaddr;  // shared address of x at the current word's first column (HI: its last, bit 0)
  unsigned xw;     // x bytes from one word's first column to the next word's
  unsigned xcol;   // x bytes between consecutive columns
  __device__ __forceinline__ void fill() {  // make m non-empty (empty words are skipped)
    while (m == 0u) {
      maddr += 128u;
      xaddr += xw;
      m = lds_u32(maddr);
    }
  }
  __device__ __forceinline__ unsigned take() {  // m != 0: x's address at the next kept column
    if constexpr (HI) {
      return take_column(m, xaddr, xcol);
    } else {  // (the form that fits fp32 values at batch tiles >= 4 in 64 registers)
      const unsigned b = __clz(m);
      m ^= 0x80000000u >> b;
      return xaddr + b * xcol;
    }
  }
  __device__ __forceinline__ unsigned next() {  // any m: x's address at the next kept column
    fill();
    return take();
  }
};

// Version 6's walk: the current word's kept columns not consumed yet (m) and the NEXT word (n), both
// in registers. A take that finds m empty moves n into m and loads the following word into n: four
// predicated instructions, no branch, and n's load has a whole word's values to arrive. Only an
// empty word past the first (32 pruned columns in a row: rare below ~85% sparsity) needs the loop
// (GAPS): the kernel takes the loop-free walk for every round in which no lane of the warp has one
// (v28: the loop's reconvergence and checks were ~7 of ~21 instructions per value).
// The lane's words sit in shared memory 128 bytes apart with one spare slot past the last word (the
// load of "the word after the last" reads it and is never used).
template <bool GAPS>
struct UniformWalk {
  unsigned m, n;   // current word (unconsumed bits), next word
  unsigned naddr;  // shared address of n
  unsigned xhi;    // shared address of x at m's last column (bit 0)
  unsigned xw;     // x bytes from one word's first column to the next word's
  unsigned xcol;   // x bytes between consecutive columns
  __device__ __forceinline__ void start(unsigned maddr, unsigned x0, unsigned xw_, unsigned xcol_) {
    m = lds_u32(maddr);
    naddr = maddr + 128u;
    n = lds_u32(naddr);
    xhi = x0 + 31u * xcol_;
    xw = xw_;
    xcol = xcol_;
  }
  __device__ __forceinline__ unsigned next() {  // x's address at the next kept column
    const bool p = m == 0u;
    m = p ? n : m;
    xhi = p ? xhi + xw : xhi;
    naddr = p ? naddr + 128u : naddr;
    if (p) n = lds_u32(naddr);
    if constexpr (GAPS) {
      while (m == 0u) {  // m was an empty word
        m = n;
        xhi += xw;
        naddr += 128u;
        n = lds_u32(naddr);
      }
    }
    return take_column(m, xhi, xcol);
  }
};

// Values t0 .. t0 + cnt - 1 of a 16-byte unit, each column from walk.next(): a whole unit (0, V: the
// checks fold away), a segment's last, partial one (0, cnt: the same in every lane, a uniform branch) or
// a part of 4 (constants once unrolled). Walk: UniformWalk<GAPS> (version 6) or MaskWalk<HI> (version 5).
template <typename T, typename XT, int NB, typename Walk>
__device__ __forceinline__ void values_fma(const Words<4>& v, int t0, int cnt, Walk& walk, float (&acc)[NB]) {
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
#pragma unroll
  for (int t = 0; t < V; ++t) {
    if (t >= t0 && t < t0 + cnt) {
      float xv[NB];
      lds_x<XT, NB>(walk.next(), xv);
      const float w = Val<T>::template at<4>(v, t);
#pragma unroll
      for (int n = 0; n < NB; ++n) acc[n] = fmaf(w, xv[n], acc[n]);
    }
  }
}

// Two units of two segments, interleaved value by value (two independent walks and sums: the
// latency of one hides behind the other's instructions).
template <typename T, typename XT, int NB, typename Walk>
__device__ __forceinline__ void unit_fma_u2(const Words<4>& va, const Words<4>& vb, Walk& wa, Walk& wb,
                                            float (&acca)[NB], float (&accb)[NB]) {
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
#pragma unroll
  for (int t = 0; t < V; ++t) {
    const unsigned aa = wa.next(), ab = wb.next();
    float xa[NB], xb[NB];
    lds_x<XT, NB>(aa, xa);
    lds_x<XT, NB>(ab, xb);
    const float w0 = Val<T>::template at<4>(va, t), w1 = Val<T>::template at<4>(vb, t);
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      acca[n] = fmaf(w0, xa[n], acca[n]);
      accb[n] = fmaf(w1, xb[n], accb[n]);
    }
  }
}

// Multiply-accumulate values t0 .. t0 + H - 1 of a 16-byte unit. When the current word holds
// all H of them (the common case) their columns come without a check in between, so the H x
// loads are in flight together; otherwise each value refills the word first.
template <typename T, typename XT, int NB, int H, typename Walk>
__device__ __forceinline__ void part_fma(const Words<4>& v, int t0, Walk& walk, float (&acc)[NB]) {
  walk.fill();
  if (__popc(walk.m) >= H) {
    unsigned a[H];
#pragma unroll
    for (int h = 0; h < H; ++h) a[h] = walk.take();
#pragma unroll
    for (int h = 0; h < H; ++h) {
      float xv[NB];
      lds_x<XT, NB>(a[h], xv);
      const float w = Val<T>::template at<4>(v, t0 + h);
#pragma unroll
      for (int n = 0; n < NB; ++n) acc[n] = fmaf(w, xv[n], acc[n]);
    }
  } else {
    values_fma<T, XT, NB>(v, t0, H, walk, acc);
  }
}

// A whole unit (V values) in parts of 4.
template <typename T, typename XT, int NB, typename Walk>
__device__ __forceinline__ void unit_fma(const Words<4>& v, Walk& walk, float (&acc)[NB]) {
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
#pragma unroll
  for (int t0 = 0; t0 < V; t0 += 4) part_fma<T, XT, NB, 4>(v, t0, walk, acc);
}


// y[rows, batch] = act(W x + bias), columns n0 = blockIdx.y * NB .. of the batch per CTA row of
// the grid. x [cols, batch] and y [rows, batch] row-major in T. Dynamic shared memory: x as
// XT [seg_cols][SP][NB] (SP = Q * P; zero past cols and past the batch), rounded up to 16 bytes,
// then per warp the lanes' mask words: W * 32 (walk 5) or 2 * (W + 1) * 32 (walk 6: two segments, a
// spare slot after each). Grid-stride over row groups of 32 / P rows per warp.
// Before the prologue: the first row group of this warp (the rows its first pass of the group loop walks) into
// this SM's L1 -- up to BP_BM_L1_UNITS value units per lane in the order the walk takes them (walk 6: rounds 0
// and 1 side by side) and the mask words of those rounds. At batch 1 on a 1B-shaped layer that group is all a
// warp reads, and the walk keeps only 2-4 units in flight per lane: its loads were a chain of L2/DRAM round
// trips behind the x staging. Asked for here, the whole group streams in while the previous grid runs (under
// programmatic dependent launch) or while x is staged, and the walk's loads hit L1. Prefetches write no
// register and nothing waits on them; no grid writes weights, so they may precede the prologue.
__device__ __forceinline__ void prefetch_first_group_l1(const Words<4>* vals, const unsigned* masks, int rows, int Q,
                                                        int C, int W, int P, int S) {
  if (BP_BM_L1_UNITS <= 0) return;
  const int lane = threadIdx.x & 31;
  const int row = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * (32 / P) + lane / P;
  const int l = lane & (P - 1);
  // (walk 5 never reads a phantom segment, s >= S; walk 6 walks them)
  if (row >= rows || (BP_BM_WALK != 6 && l >= S)) return;
  const int rounds = BP_BM_WALK == 6 ? (Q < 2 ? Q : 2) : 1;  // the rounds walked first, side by side
  const Words<4>* v = vals + (long long)row * Q * C * P + l;
  const unsigned* m = masks + (long long)row * Q * W * P + l;
  for (int q = 0; q < rounds; ++q)
    for (int w = 0; w < W; ++w) prefetch_l1(m + (long long)(q * W + w) * P);
  int n = 0;
  for (int c = 0; c < C && n < BP_BM_L1_UNITS; ++c)
    for (int q = 0; q < rounds && n < BP_BM_L1_UNITS; ++q, ++n) prefetch_l1(v + (long long)(q * C + c) * P);
}

// The end of a row in both kernels: the P lanes of the row add their sums (groups are aligned runs of P lanes),
// then its lane l == 0 writes y[row, n0 ..] through the epilogue (bias, activation) in fp32, rounded to T once.
template <typename T, int NB>
__device__ __forceinline__ void store_row(float (&acc)[NB], int P, int l, int row, int rows, int n0, int batch,
                                          T* __restrict__ y, const float* __restrict__ bias, int act) {
#pragma unroll
  for (int n = 0; n < NB; ++n)
    for (int off = P >> 1; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
  if (row < rows && l == 0) {
#pragma unroll
    for (int n = 0; n < NB; ++n)
      if (n0 + n < batch) Val<T>::store(y + (long long)row * batch + n0 + n, epilogue(acc[n], bias, act, row));
  }
}

// Stage x for one CTA's batch columns n0 .. n0 + NB - 1: element i = (cs * SP + s) * NB + n of xs holds
// x[(s * seg_cols + cs) * batch + n0 + n] (0 past cols, past the batch and for segments s >= S). x [cols, batch]
// row-major in T. The caller synchronises the CTA before reading xs.
template <typename T, typename XT, int NB>
__device__ __forceinline__ void stage_x_segments(const T* __restrict__ x, XT* xs, int cols, int batch, int n0,
                                                 int seg_cols, int SP, int S) {
  const int xs_elems = seg_cols * SP * NB;
  constexpr int VX = 16 / sizeof(T);  // x elements per 16-byte load
  if (NB == 1 && batch == 1 && seg_cols % VX == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0) {
    // batch 1: consecutive threads take the same 16-byte piece of consecutive segments, so each
    // load moves 16 useful bytes and the stores of one piece position hit 32 different banks
    const int pieces = seg_cols / VX * SP;
    for (int i0 = threadIdx.x; i0 < pieces; i0 += blockDim.x * 4) {
      Words<4> v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = i0 + j * blockDim.x;
        const int s = i % SP, c0 = s * seg_cols + (i / SP) * VX;
        v[j].w[0] = v[j].w[1] = v[j].w[2] = v[j].w[3] = 0u;
        if (i < pieces && s < S && c0 + VX <= cols) {
          v[j] = *reinterpret_cast<const Words<4>*>(x + c0);
        } else if (i < pieces && s < S && c0 < cols) {  // the row's last, partial piece
          // unrolled with a guard, not a loop to cols - c0: a word index that is not a constant would put
          // v[] in local memory and make every piece's load wait at its local store (serialising the four)
#pragma unroll
          for (int t = 0; t < VX; ++t) {
            if (t < cols - c0) {
              const unsigned h = sizeof(T) == 4 ? __float_as_uint(Val<T>::ldg(x + c0 + t))
                                                : reinterpret_cast<const unsigned short*>(x)[c0 + t];
              v[j].w[t * sizeof(T) / 4] |= sizeof(T) == 4 ? h : h << (16 * (t & 1));
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = i0 + j * blockDim.x;
        if (i < pieces) {
          const int s = i % SP, cs0 = (i / SP) * VX;
#pragma unroll
          for (int t = 0; t < VX; ++t) Val<XT>::store(xs + (cs0 + t) * SP + s, Val<T>::template at<4>(v[j], t));
        }
      }
    }
  } else {
    // any batch and shape: element by element, 8 loads in flight per thread before their stores
    constexpr int SU = 8;
    for (int i0 = threadIdx.x; i0 < xs_elems; i0 += blockDim.x * SU) {
      float v[SU];
#pragma unroll
      for (int j = 0; j < SU; ++j) {
        const int i = i0 + j * blockDim.x;
        const int n = i % NB, cs_s = i / NB;
        const int cs = cs_s / SP, s = cs_s - cs * SP;
        const int c = s * seg_cols + cs;
        v[j] = (i < xs_elems && c < cols && n0 + n < batch) ? Val<T>::ldg(x + (long long)c * batch + n0 + n) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < SU; ++j)
        if (i0 + j * blockDim.x < xs_elems) Val<XT>::store(xs + i0 + j * blockDim.x, v[j]);
    }
  }
}

template <typename T, typename XT, int NB>
__global__ void __launch_bounds__(256, BP_BM_MIN_CTAS)
    balanced_bitmask_spmm(const Words<4>* __restrict__ vals, const unsigned* __restrict__ masks, int rows, int Q,
                          int C, int W, int P, int seg_keep, int seg_cols, int S, const T* __restrict__ x, int cols,
                          int batch, T* __restrict__ y, const float* __restrict__ bias, int act) {
  // weights only, before the prologue; at batch 1 (batch tiles of 2+ are at the 64-register budget already)
  if (NB == 1) prefetch_first_group_l1(vals, masks, rows, Q, C, W, P, S);
  if (blockIdx.y == 0)  // weights only, before the prologue: this CTA's first rows into L2
    prefetch_cta_rows_l2(vals, (long long)Q * C * P * 16, masks, (long long)Q * W * P * 4,
                         (long long)blockIdx.x * (blockDim.x >> 5) * (32 / P), (blockDim.x >> 5) * (32 / P), rows);
  overlap_prologue();  // then wait for the previous grid (bp_common.cuh)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  XT* xs = reinterpret_cast<XT*>(smem_raw);
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
  const int SP = Q * P;
  const int n0 = blockIdx.y * NB;
  const int xs_elems = seg_cols * SP * NB;
  stage_x_segments<T, XT, NB>(x, xs, cols, batch, n0, seg_cols, SP, S);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int mask_words_per_lane = BP_BM_WALK == 6 ? 2 * (W + 1) : W;
  unsigned* mw = reinterpret_cast<unsigned*>(smem_raw + ((xs_elems * (int)sizeof(XT) + 15) & ~15)) +
                 warp * mask_words_per_lane * 32 + lane;  // this lane's words: mw[w * 32] (walk 6: a second segment's at mw[(W + 1 + w) * 32])
  __syncthreads();

  const int l = lane & (P - 1);  // lane within its row's group
  const int rows_per_warp = 32 / P;
  const int warps = blockDim.x >> 5;
  const long long unit_row = (long long)Q * C * P;  // 16-byte units per row
  const long long word_row = (long long)Q * W * P;  // mask words per row
  const int full = seg_keep / V;                    // whole units of a segment
  const int tail = seg_keep - full * V;             // values in its last, partial unit
  const int cstride = SP * NB;                      // x elements between consecutive columns
  // wide batch tiles hold NB accumulators and NB x values per weight: fewer units in flight
  constexpr int AHEAD = NB >= 16 ? 1 : NB >= 8 ? 2 : BP_BM_AHEAD;
  for (int group = blockIdx.x * warps + warp; group * rows_per_warp < rows; group += gridDim.x * warps) {
    const int row = group * rows_per_warp + lane / P;
    float acc[NB];
#pragma unroll
    for (int n = 0; n < NB; ++n) acc[n] = 0.0f;
#if BP_BM_WALK == 6
    float acc2[NB];  // the second walk's sums (added at the end: two independent FMA chains)
#pragma unroll
    for (int n = 0; n < NB; ++n) acc2[n] = 0.0f;
    const unsigned xcol = (unsigned)(cstride * sizeof(XT));
    // units in flight per walk (two walks at NB <= 4: as many bytes in flight as version 5's four)
    constexpr int A2 = NB >= 8 ? 1 : 2;
    for (int q = 0; q < Q;) {
      // rounds q and q + 1 together (uniform): two segments of the same row per lane; phantom
      // segments (s >= S) are walkable (their first seg_keep bits set, values and x zero)
      const bool two = NB <= 4 && q + 1 < Q;
      const bool active = row < rows;
      const long long r0 = active ? row : 0;
      const Words<4>* va = vals + r0 * unit_row + (long long)q * C * P + l;
      const Words<4>* vb = va + (long long)C * P;
      const unsigned* ma = masks + r0 * word_row + (long long)q * W * P + l;
      const unsigned* mb = ma + (long long)W * P;
      Words<4> ua[A2], ub[A2];
      const int first = full < A2 ? full : A2;
      if (active) {
#pragma unroll
        for (int a = 0; a < A2; ++a)
          if (a < first) {
            ua[a] = ld_words<4>(va + (long long)a * P);
            if (two) ub[a] = ld_words<4>(vb + (long long)a * P);
          }
      }
      __syncwarp();  // the previous walk is done with mw
      // gaps: an empty word past a walk's first with kept columns after it (only then can a take find
      // the word it moves in empty; the first word's emptiness is handled by the take's own move)
      bool gaps = false;
      if (active) {
        bool ea = false, eb = false;
        for (int w = 0; w < W; ++w) {
          const unsigned a = __ldg(ma + (long long)w * P);
          mw[w * 32] = a;
          gaps |= ea && a != 0u;
          ea |= w > 0 && a == 0u;
          if (two) {
            const unsigned b = __ldg(mb + (long long)w * P);
            mw[(W + 1 + w) * 32] = b;
            gaps |= eb && b != 0u;
            eb |= w > 0 && b == 0u;
          }
        }
      }
      gaps = __any_sync(0xffffffffu, gaps);  // a lane reads back only its own words: no sync needed for mw
      const int s0 = q * P + l;
      q += two ? 2 : 1;
      if (!active) continue;
      // one round of the walk, with (GAPS) or without the empty-word loop: uniform over the warp
      auto round = [&](auto gaps_flag) {
        constexpr bool G = decltype(gaps_flag)::value;
        UniformWalk<G> wa, wb;
        wa.start(smem_addr(mw), smem_addr(xs + s0 * NB), 32u * xcol, xcol);
        int c = 0;
        if (two) {
          wb.start(smem_addr(mw + (W + 1) * 32), smem_addr(xs + (s0 + P) * NB), 32u * xcol, xcol);
          for (; c + A2 <= full; c += A2) {
#pragma unroll
            for (int a = 0; a < A2; ++a) {
              unit_fma_u2<T, XT, NB>(ua[a], ub[a], wa, wb, acc, acc2);
              if (c + A2 + a < full) {
                ua[a] = ld_words<4>(va + (long long)(c + A2 + a) * P);
                ub[a] = ld_words<4>(vb + (long long)(c + A2 + a) * P);
              }
            }
          }
#pragma unroll
          for (int a = 0; a < A2; ++a)
            if (c + a < full) unit_fma_u2<T, XT, NB>(ua[a], ub[a], wa, wb, acc, acc2);
          if (tail) {
            const Words<4> ta = ld_words<4>(va + (long long)full * P), tb = ld_words<4>(vb + (long long)full * P);
            values_fma<T, XT, NB>(ta, 0, tail, wa, acc);
            values_fma<T, XT, NB>(tb, 0, tail, wb, acc2);
          }
        } else {
          for (; c + A2 <= full; c += A2) {
#pragma unroll
            for (int a = 0; a < A2; ++a) {
              values_fma<T, XT, NB>(ua[a], 0, V, wa, acc);
              if (c + A2 + a < full) ua[a] = ld_words<4>(va + (long long)(c + A2 + a) * P);
            }
          }
#pragma unroll
          for (int a = 0; a < A2; ++a)
            if (c + a < full) values_fma<T, XT, NB>(ua[a], 0, V, wa, acc);
          if (tail) values_fma<T, XT, NB>(ld_words<4>(va + (long long)full * P), 0, tail, wa, acc);
        }
      };
      if (gaps)
        round(Flag<true>{});
      else
        round(Flag<false>{});
    }
#pragma unroll
    for (int n = 0; n < NB; ++n) acc[n] += acc2[n];
#else
    for (int q = 0; q < Q; ++q) {
      // uniform over the warp (every lane stages and syncs); lanes without a segment skip the walk
      const int s = q * P + l;
      const bool active = row < rows && s < S;
      const Words<4>* vp = vals + (long long)(active ? row : 0) * unit_row + (long long)q * C * P + l;
      const unsigned* mp = masks + (long long)(active ? row : 0) * word_row + (long long)q * W * P + l;
      Words<4> u[AHEAD];
      const int first = full < AHEAD ? full : AHEAD;
      if (active) {
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
          if (a < first) u[a] = ld_words<4>(vp + (long long)a * P);
      }
      __syncwarp();  // the previous segment's walk is done with mw
      if (active)
        for (int w = 0; w < W; ++w) mw[w * 32] = __ldg(mp + (long long)w * P);
      __syncwarp();
      if (!active) continue;
      const unsigned xcol = (unsigned)(cstride * sizeof(XT));
      // the one-FLO take (xaddr at the word's last column) except where its extra live value spills
      constexpr bool kHi = !(sizeof(T) == 4 && NB >= 4);
      MaskWalk<kHi> walk{mw[0], smem_addr(mw), smem_addr(xs + s * NB) + (kHi ? 31u * xcol : 0u), 32u * xcol, xcol};
      int c = 0;
      // (fp32 values with 4+ batch columns: the rolling loop spills at the 64-register budget)
      constexpr bool kRolling = BP_BM_ROLLING && (sizeof(T) < 4 || NB < 4);
      if (first == AHEAD && kRolling) {
        // Rolling prefetch: the moment unit c + a is consumed, its registers load unit c + AHEAD + a,
        // so AHEAD units stay in flight through the whole segment (the batch reload below waits a
        // full memory latency once per AHEAD units; measured per version in kernels/NOTES.md).
        for (; c + AHEAD <= full; c += AHEAD) {
#pragma unroll
          for (int a = 0; a < AHEAD; ++a) {
            unit_fma<T, XT, NB>(u[a], walk, acc);
            if (c + AHEAD + a < full) u[a] = ld_words<4>(vp + (long long)(c + AHEAD + a) * P);
          }
        }
        // units c .. full - 1 (fewer than AHEAD) were loaded into u[0 ..] by the last round
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
          if (c + a < full) unit_fma<T, XT, NB>(u[a], walk, acc);
        c = full;
      } else if (first == AHEAD) {
        for (;;) {
#pragma unroll
          for (int a = 0; a < AHEAD; ++a) unit_fma<T, XT, NB>(u[a], walk, acc);
          c += AHEAD;
          if (c + AHEAD > full) break;
#pragma unroll
          for (int a = 0; a < AHEAD; ++a) u[a] = ld_words<4>(vp + (long long)(c + a) * P);
        }
      } else {
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
          if (a < first) unit_fma<T, XT, NB>(u[a], walk, acc);
        c = first;
      }
      for (; c < full; ++c) unit_fma<T, XT, NB>(ld_words<4>(vp + (long long)c * P), walk, acc);
      if (tail) values_fma<T, XT, NB>(ld_words<4>(vp + (long long)full * P), 0, tail, walk, acc);
    }
#endif
    store_row<T, NB>(acc, P, l, row, rows, n0, batch, y, bias, act);
  }
}

// ---- the delta walk (BitmaskLinear walk 7; kernels/NOTES.md v37) --------------------------------------
//
// The same segments, lanes and x staging as the mask walks, but a lane's segment is a list of entries in column
// order, each a 4-bit column step and a value (formats/layouts.py delta_segments): a value's x address is the
// previous one's plus step * xcol. Per value that is a shift, a mask, a multiply-add, the x load, the value's
// conversion and the FMA -- no bit search, no empty-word test and no branch: the mask walks spend ~16 SASS
// instructions per value (walk 6), which at batch 1 is what bounds them, not their bytes. The price is 4 bits per
// kept value instead of one per column, phantom entries where two kept columns are more than 15 apart, and every
// segment of a row group padded to the group's entry count (a multiple of 8): +4% bytes at 70%, +11% at 50% on the
// 8B shapes. Padding entries step 0 with value 0.
//   vals   [steps * UPS][32] 16-byte units, deltas [steps][32] u32 (8 steps per word, the first in the low nibble),
//   starts [groups + 1] u32: row group G's steps starts[G] .. starts[G+1] - 1, Q rounds of D = (...) / Q steps;
//   lane (row - G * rpw) * P + l walks segment q * P + l in round q.
// Kernel-side constants the host layout must agree with (tests/test_layouts.py reads them): entries per word of
// steps (one step of the walk), and the largest step (4 bits).
#define BP_BM_DELTA_ENTRIES 8
#define BP_BM_DELTA_MAX 15
// Steps (of 8 entries) loaded ahead of their use, per lane, at batch tiles of 1 or 2 with 16-bit values.
#ifndef BP_DELTA_AHEAD
#define BP_DELTA_AHEAD 4
#endif
// v42 (kernels/NOTES.md; written, not yet run): each consumed step also asks L2 for the step BP_DELTA_PF_L2 steps
// past the register look-ahead (0: off). A prefetch has no destination register, so it takes no scoreboard: every
// look-ahead load shares the one scoreboard the x loads leave free (NOTES "Where the delta walk waits"), which
// makes the register look-ahead one batch per round trip; with the lines already in L2 that round trip is L2's.
#ifndef BP_DELTA_PF_L2
#define BP_DELTA_PF_L2 0
#endif
// Eight entries of one step: their columns from the word of steps (addr: x's shared address at the previous
// entry's column), their values from the step's UPS units.
template <typename T, typename XT, int NB, int UPS>
__device__ __forceinline__ void delta_step(unsigned steps, const Words<4> (&u)[UPS], unsigned& addr, unsigned xcol,
                                           float (&acc)[NB]) {
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
  static_assert(BP_BM_DELTA_ENTRIES * 4 == 32 && BP_BM_DELTA_MAX == 15, "eight 4-bit steps per word");
#pragma unroll
  for (int t = 0; t < BP_BM_DELTA_ENTRIES; ++t) {
    addr += ((steps >> (4 * t)) & (unsigned)BP_BM_DELTA_MAX) * xcol;
    const float w = Val<T>::template at<4>(u[t / V], t % V);
    // x in pieces of at most 4 batch columns (16 x values live at once spill at NB = 16)
    constexpr int NP = NB < 4 ? NB : 4;
#pragma unroll
    for (int n0 = 0; n0 < NB; n0 += NP) {
      float xv[NP];
      lds_x<XT, NP>(addr + n0 * (unsigned)sizeof(XT), xv);
#pragma unroll
      for (int n = 0; n < NP; ++n) acc[n0 + n] = fmaf(w, xv[n], acc[n0 + n]);
    }
  }
}

template <typename T, typename XT, int NB>
__global__ void __launch_bounds__(256, BP_BM_MIN_CTAS)
    balanced_delta_spmm(const Words<4>* __restrict__ vals, const unsigned* __restrict__ deltas,
                        const unsigned* __restrict__ starts, int rows, int Q, int P, int seg_cols, int S,
                        const T* __restrict__ x, int cols, int batch, T* __restrict__ y, const float* __restrict__ bias,
                        int act) {
  constexpr int V = BP_BM_UNIT_BYTES / sizeof(T);
  constexpr int UPS = V < BP_BM_DELTA_ENTRIES ? BP_BM_DELTA_ENTRIES / V : 1;  // 16-byte units per step
  // steps in flight per lane (registers: 1 + 4 * UPS each)
  constexpr int AH = NB >= 8 ? 1 : (UPS > 1 || NB >= 4) ? 2 : BP_DELTA_AHEAD;
  const int warps = blockDim.x >> 5;
  const int lg = __ffs(P) - 1;  // P is a power of two: rows per group 32 / P = 1 << (5 - lg)
  const int groups = (rows + (1 << (5 - lg)) - 1) >> (5 - lg);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Each warp owns one contiguous run of row groups, [gb, ge): their steps are one contiguous stream in memory
  // (starts[gb] .. starts[ge] - 1), walked with one rolling look-ahead that crosses round and group ends, so the
  // loads of the next group are in flight while this one finishes (a grid-stride loop restarts the look-ahead,
  // and waits a memory round trip, at every group).
  const long long wtot = (long long)gridDim.x * warps, wid = (long long)blockIdx.x * warps + warp;
  const int gb = (int)(wid * groups / wtot), ge = (int)((wid + 1) * groups / wtot);
  {  // weights only, before the prologue: the CTA's run into L2 (up to its share), this warp's first steps into L1
    const int cb = (int)((long long)blockIdx.x * warps * groups / wtot);
    const int ce = (int)(((long long)blockIdx.x + 1) * warps * groups / wtot);
    if (blockIdx.y == 0 && cb < ce) {
      const long long s0 = __ldg(starts + cb), s1 = __ldg(starts + ce);
      const long long cap = prefetch_share() * 4 / (4 + 16 * UPS);  // the share split by bytes per step
      prefetch_rows_l2(deltas + s0 * 32, (s1 - s0) * 128, (s1 - s0) * 128, (s1 - s0) * 128, cap);
      prefetch_rows_l2(vals + s0 * UPS * 32, (s1 - s0) * UPS * 512, (s1 - s0) * UPS * 512, (s1 - s0) * UPS * 512,
                       cap * 4 * UPS);
    }
    if (NB == 1 && gb < ge) {
      const long long s0 = __ldg(starts + gb), s1 = __ldg(starts + ge);
      for (long long st = s0; st < s1 && st < s0 + 2 * BP_DELTA_AHEAD; ++st) {
        prefetch_l1(deltas + st * 32 + lane);
#pragma unroll
        for (int i = 0; i < UPS; ++i) prefetch_l1(vals + (st * UPS + i) * 32 + lane);
      }
    }
  }
  overlap_prologue();  // then wait for the previous grid (bp_common.cuh)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  XT* xs = reinterpret_cast<XT*>(smem_raw);
  const int SP = Q * P;
  const int n0 = blockIdx.y * NB;
  stage_x_segments<T, XT, NB>(x, xs, cols, batch, n0, seg_cols, SP, S);
  __syncthreads();
  if (gb >= ge) return;  // (no barrier below)
  const int l = lane & (P - 1);
  const unsigned xcol = (unsigned)(SP * NB * sizeof(XT));  // x bytes between consecutive columns of a segment
  const unsigned xbase = smem_addr(xs + l * NB), xround = (unsigned)(P * NB * sizeof(XT));  // round q: + q * xround
  const unsigned* dp = deltas + lane;
  const Words<4>* vp = vals + lane;
  unsigned s = __ldg(starts + gb);          // the next step to consume (flat, over the warp's run)
  const unsigned s1 = __ldg(starts + ge);   // the run's end
  unsigned end = __ldg(starts + gb + 1);    // the current group's end
  unsigned after = __ldg(starts + gb + (gb + 1 < ge ? 2 : 1));  // the next group's end (loaded a group ahead)
  int group = gb;
  float acc[NB];
#pragma unroll
  for (int n = 0; n < NB; ++n) acc[n] = 0.0f;
  unsigned sw[AH];
  Words<4> u[AH][UPS];
  // Slot a of the look-ahead: step nx's word of steps and its values.
  auto load = [&](int a, unsigned nx) {
    sw[a] = __ldg(dp + (size_t)nx * 32);
#pragma unroll
    for (int i = 0; i < UPS; ++i) u[a][i] = ld_words<4>(vp + ((size_t)nx * UPS + i) * 32);
  };
  // (v42) Step st's word of steps and values asked of L2 (a prefetch takes no scoreboard).
  auto prefetch_step_l2 = [&](size_t st) {
    prefetch_l2(dp + st * 32);
#pragma unroll
    for (int i = 0; i < UPS; ++i) prefetch_l2(vp + (st * UPS + i) * 32);
  };
  if (s < s1) {
#pragma unroll
    for (int a = 0; a < AH; ++a) load(a, min(s + a, s1 - 1));
    if (BP_DELTA_PF_L2 > 0) {  // (v42) the steps the rolling prefetch in take() starts past: AH .. AH + PF - 1
#pragma unroll 1
      for (unsigned st = s + AH; st < min(s + AH + BP_DELTA_PF_L2, s1); ++st) prefetch_step_l2(st);
    }
  }
  int D = (int)((end - s) / (unsigned)Q);  // steps per round of the current group
  int left = D, q = 0;                      // steps left in round q
  unsigned addr = xbase;
  // Consumes slot a (step s + a) and reloads it with the step AH on; past the run's last step the last one again
  // (an L1 hit, never used), so there is no branch around the loads.
  auto take = [&](int a) {
    delta_step<T, XT, NB, UPS>(sw[a], u[a], addr, xcol, acc);
    load(a, min(s + a + AH, s1 - 1));
    if (BP_DELTA_PF_L2 > 0 && s + a + AH + BP_DELTA_PF_L2 < s1) prefetch_step_l2(s + a + AH + BP_DELTA_PF_L2);
  };
  // Groups without steps (every row of them empty) store bias / activation of zero and take nothing from the stream.
  // Called when a group's last round ends (or before the first): moves to the next group that has steps.
  auto next_group = [&]() {
    while (left == 0) {  // uniform over the warp (a group's step count is)
      store_row<T, NB>(acc, P, l, (group << (5 - lg)) + (lane >> lg), rows, n0, batch, y, bias, act);
#pragma unroll
      for (int n = 0; n < NB; ++n) acc[n] = 0.0f;
      if (++group == ge) return;
      const unsigned begin = end;
      end = after;
      if (group + 1 < ge) after = __ldg(starts + group + 2);
      D = (int)((end - begin) / (unsigned)Q);
      left = D;
    }
  };
  next_group();  // (a no-op unless the run's first groups are empty)
  // The round's last step consumed: the next round of the group, or the next group.
  auto round_end = [&]() {
    if (++q < Q) {
      left = D;
      addr = xbase + q * xround;
    } else {
      q = 0;
      addr = xbase;
      next_group();
    }
  };
  for (; s < s1; s += AH) {
    if (left >= AH && s + AH <= s1) {  // (uniform) AH steps of one round: no test per step
#pragma unroll
      for (int a = 0; a < AH; ++a) take(a);
      left -= AH;
      if (left == 0) round_end();
    } else {  // a round or the run ends inside these AH steps
#pragma unroll
      for (int a = 0; a < AH; ++a) {
        if (s + a < s1) {  // uniform over the warp
          take(a);
          if (--left == 0) round_end();
        }
      }
    }
  }
}

}  // namespace bp
