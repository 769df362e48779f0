// balanced_spmv.cu: y = W x for a balanced-sparse W, batch 1 (SpMV) and batch 2..64 (SpMM).
//
// One template, bp::balanced_spmm<T, I, NB, XS, IL>, instantiated by name (CuPy name_expressions):
//   T  value type of W, x and y: float, bp::f16, bp::bf16 (raw __half / __nv_bfloat16 bits)
//   I  in-block index type: unsigned char (block length L <= 256) or unsigned short (L <= 65536)
//   NB batch columns computed per pass (1, 2, 4, 8); each (value, index) loaded is used NB times
//   XS x staging mode. 1: x staged in shared memory as fp32, block-interleaved; 0: x read from
//      global memory through the read-only cache (when it does not fit); 2 (16-bit T, NB >= 2,
//      interleaved layout): x staged in shared memory in its own 16-bit type, NB values per
//      (i, j) unit. Mode 2 is exact (x already is T) and takes half the bytes of mode 1 with no
//      transpose scratch, so NB = 8 fits for K = 8192 (128 KB): batch 8 streams W once.
//      3 (NB = 1): x copied into shared memory as it is, in its own type, plus zeros up to B*L:
//      one coalesced 16-byte copy instead of a transposition, so a small or wide layer does not
//      spend most of its launch staging x (fc6: 18.7 -> 8.4 us with no staging at all). Lane j
//      then reads x[j*L + idx] with bank conflicts that depend on the indices.
//   IL true: the interleaved weight layout below; false: the direct layout
// Accumulation is fp32 for every T; y is rounded to T once, at the end.
//
// Matrix layout (kernels/README.md has the full contract). W is [R, K], split per row into B
// blocks of length L (K <= B*L; columns >= K are padding and hold value 0). Every block keeps
// exactly `keep` = k entries; the entry at slot t of block j sits at column j*L + idx and
// y[r] = sum over t, j of value * x[col]. Row r occupies row_stride elements of `vals` and of
// `idx` (the two arrays share offsets), in one of two layouts (template argument IL):
//   false, direct: [k, B] per row, element t*B + j = slot t of block j: the packed file's
//      ROWS_SLOTS_BLOCKS arrays [R, k, B] as they are (row_stride = k*B). Scalar loads.
//   true, interleaved: V = 16 / sizeof(T) slots per group, G = k / V groups, rem = k - G*V:
//      main part, g < G:          element (g*B + j)*V + s          = slot g*V + s of block j
//      tail pieces, W in {4,2,1} with rem & W (in that order), each [B, W]:
//                                 element G*V*B + B*(rem & ~(2W-1)) + j*W + s = slot G*V + (rem & ~(2W-1)) + s
//      Each lane reads its block's V values with one 16-byte load and the V indices with one
//      4/8/16-byte load (coalesced across lanes); each tail piece with one load per array.
//      Requires row_stride % V == 0 and 16-byte aligned base pointers (the runtime rounds
//      k*B up to a multiple of 16). Built once on the device by
//      balprune.runtime.balanced.interleave_rows.
//
// x is [K, batch] row-major (batch innermost; batch = 1 for SpMV); y is [R, batch] row-major.
// Every kernel here ends with the fused epilogue (bp_common.cuh): y[r, n] = act(acc + bias[r]),
// bias [R] fp32 or null, act 0 (identity) or 1 (ReLU): a layer's bias and ReLU cost no launch.
// Pass n of the launch (blockIdx.y) computes batch columns [NB*n, NB*n + NB).
//
// Launch geometry: blockDim.x = 32 * nwarps (any multiple of 32 up to 1024); grid.x = number of
// persistent CTAs (each stages x once, then sweeps rows); grid.y = ceil(batch / NB). Lanes per
// row P = lanes_per_row (a power of two, min(32, next_pow2(B))); a warp holds 32 / P rows; lane
// `sub` of a row owns blocks sub, sub + P, ... Dynamic shared memory: XS = 1:
// (B*L + B*(L|1)) * NB * 4 bytes (the staged x plus a transpose scratch); XS = 2:
// B*L*NB*sizeof(T) bytes; XS = 3: B*L*sizeof(T) rounded up to 16; XS = 0: none.
#include "bp_common.cuh"

// Diagnostics for timing experiments only (results are wrong): -DBP_DIAG=1 the pipelined kernel
// streams the weights but computes nothing; =2 it computes on whatever the ring holds without
// copying (u8 indices only); =3 both kernels skip staging x.
#ifndef BP_DIAG
#define BP_DIAG 0
#endif

namespace bp {

// acc[c] += w * x[col, n0 + c] for the column of in-block index `id` in the current block.
template <typename T, int NB, int XS>
__device__ __forceinline__ void fma_x(float (&acc)[NB], float w, unsigned id, const float* xsj, int BN,
                                      const T* __restrict__ x, int colbase, int cols, int batch, int n0) {
  if constexpr (XS == 3) {
    // xsj points at x[j*L] in shared memory (plain layout, own type).
    acc[0] = fmaf(w, Val<T>::sload(reinterpret_cast<const T*>(xsj) + id), acc[0]);
  } else if constexpr (XS == 2) {
    // Unit (i*B + j) holds x[j*L + i, n0 .. n0+NB) as NB values of T (NB*2 bytes, one LDS of
    // 4/8/16 bytes). B % 32 == 0: lane j reads its own slot of a conflict-free phase.
    constexpr int XW = (NB * (int)sizeof(T)) / 4;
    const Words<XW> xv = *reinterpret_cast<const Words<XW>*>(reinterpret_cast<const char*>(xsj) +
                                                             id * (unsigned)(BN * (int)sizeof(T)));
#pragma unroll
    for (int c = 0; c < NB; ++c) acc[c] = fmaf(w, Val<T>::at(xv, c), acc[c]);
  } else if (XS == 1) {
    // xs[(i*B + j)*NB + c]: for B % 32 == 0 lane j always hits bank j (NB = 1), or its own
    // 16-byte slot of a conflict-free quarter-warp phase (NB = 4). Address: one IMAD on the
    // 32-bit shared-window address of xs[j*NB].
    if (NB == 1) {
      acc[0] = fmaf(w, lds_f32(smem_addr(xsj) + id * (unsigned)(BN * 4)), acc[0]);
    } else {
      const float* p = reinterpret_cast<const float*>(reinterpret_cast<const char*>(xsj) + id * (unsigned)(BN * 4));
      if (NB == 2) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        acc[0] = fmaf(w, v.x, acc[0]);
        acc[1 % NB] = fmaf(w, v.y, acc[1 % NB]);
      } else {
#pragma unroll
        for (int c4 = 0; c4 < NB; c4 += 4) {
          const float4 v = *reinterpret_cast<const float4*>(p + c4);
          acc[(c4 + 0) % NB] = fmaf(w, v.x, acc[(c4 + 0) % NB]);
          acc[(c4 + 1) % NB] = fmaf(w, v.y, acc[(c4 + 1) % NB]);
          acc[(c4 + 2) % NB] = fmaf(w, v.z, acc[(c4 + 2) % NB]);
          acc[(c4 + 3) % NB] = fmaf(w, v.w, acc[(c4 + 3) % NB]);
        }
      }
    }
  } else {
    // Global fallback: x is not padded, so a padding column (value 0) must not be read.
    const int col = colbase + (int)id;
    if (col < cols) {
      const T* px = x + (size_t)col * batch + n0;
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        if (n0 + c < batch) acc[c] = fmaf(w, Val<T>::ldg(px + c), acc[c]);
      }
    }
  }
}

// One piece of the interleaved tail: W slots (W < V) of block j, one vector load each for the
// values (W*sizeof(T) bytes) and the indices (W*sizeof(I) bytes).
template <typename T, typename I, int W>
struct Piece {
  Words<Bytes<W * (int)sizeof(T)>::kWords> v;
  Words<Bytes<W * (int)sizeof(I)>::kWords> i;
  __device__ __forceinline__ void load(const T* pv, const I* pi) {
    v = Bytes<W * (int)sizeof(T)>::load(pv);
    i = Bytes<W * (int)sizeof(I)>::load(pi);
  }
  template <int NB, int XS>
  __device__ __forceinline__ void use(float (&acc)[NB], const float* xsj, int BN, const T* __restrict__ x, int colbase,
                                      int cols, int batch, int n0) const {
#pragma unroll
    for (int s = 0; s < W; ++s)
      fma_x<T, NB, XS>(acc, Val<T>::at(v, s), Idx<I>::at(i, s), xsj, BN, x, colbase, cols, batch, n0);
  }
};

// Dot product of block j of one row with x (interleaved layout), accumulated into acc.
// rv / ri point at the row. The G slot groups come in batches of U (one 16-byte value load and
// one index load per group); batch 0 also issues the tail pieces (rem = 4 + 2 + 1 slots at
// most, one load each), so a row whose G <= U costs one memory round trip: every load of the
// lane is in flight before the first use.
template <typename T, typename I, int NB, int XS>
__device__ __forceinline__ void block_dot_interleaved(float (&acc)[NB], const T* __restrict__ rv,
                                                      const I* __restrict__ ri, int j, int B, int L, int G, int rem,
                                                      const float* xs, const T* __restrict__ x, int cols, int batch,
                                                      int n0) {
  constexpr int V = Val<T>::kPerVec;                 // slots per 16-byte value vector
  constexpr int IW = (V * (int)sizeof(I)) / 4;        // 32-bit words per index vector (1, 2, 4)
  constexpr int U = NB <= 2 ? 4 : 2;                  // slot groups in flight per lane
  const int BN = B * NB;
  const float* xsj = XS == 3 ? reinterpret_cast<const float*>(reinterpret_cast<const T*>(xs) + (size_t)j * L)
                     : XS == 2 ? reinterpret_cast<const float*>(reinterpret_cast<const char*>(xs) + j * NB * (int)sizeof(T))
                             : xs + j * NB;
  const int colbase = j * L;
  const size_t gstride = (size_t)B * V;               // elements from group g to group g + 1
  const T* pv = rv + (size_t)j * V;
  const I* pi = ri + (size_t)j * V;
  // Tail piece of W slots starts after the main part and the larger pieces: B * (rem & ~(2W-1)).
  const size_t tail = (size_t)G * gstride;
  Piece<T, I, 4> p4;
  Piece<T, I, 2> p2;
  Piece<T, I, 1> p1;
  if (V > 4 && (rem & 4)) p4.load(rv + tail + (size_t)j * 4, ri + tail + (size_t)j * 4);
  if (rem & 2) {
    const size_t o = tail + (size_t)B * (rem & ~3) + (size_t)j * 2;
    p2.load(rv + o, ri + o);
  }
  if (rem & 1) {
    const size_t o = tail + (size_t)B * (rem & ~1) + j;
    p1.load(rv + o, ri + o);
  }
  int g0 = 0;
  do {
    Words<4> v[U];
    Words<IW> ix[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (g0 + u < G) {
        v[u] = ld_words<4>(pv + (size_t)(g0 + u) * gstride);
        ix[u] = ld_words<IW>(pi + (size_t)(g0 + u) * gstride);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (g0 + u < G) {
#pragma unroll
        for (int s = 0; s < V; ++s)
          fma_x<T, NB, XS>(acc, Val<T>::at(v[u], s), Idx<I>::at(ix[u], s), xsj, BN, x, colbase, cols, batch, n0);
      }
    }
    g0 += U;
  } while (g0 < G);
  if (V > 4 && (rem & 4)) p4.template use<NB, XS>(acc, xsj, BN, x, colbase, cols, batch, n0);
  if (rem & 2) p2.template use<NB, XS>(acc, xsj, BN, x, colbase, cols, batch, n0);
  if (rem & 1) p1.template use<NB, XS>(acc, xsj, BN, x, colbase, cols, batch, n0);
}

// Dot product of block j of one row with x (direct layout [k, B]: the packed file's own arrays,
// no repacking): scalar loads, TB slots in flight per lane, coalesced across the warp.
template <typename T, typename I, int NB, int XS>
__device__ __forceinline__ void block_dot_direct(float (&acc)[NB], const T* __restrict__ rv, const I* __restrict__ ri,
                                                 int j, int B, int L, int keep, const float* xs,
                                                 const T* __restrict__ x, int cols, int batch, int n0) {
  constexpr int TB = 8;
  const int BN = B * NB;
  const float* xsj = XS == 3 ? reinterpret_cast<const float*>(reinterpret_cast<const T*>(xs) + (size_t)j * L)
                             : xs + j * NB;
  const int colbase = j * L;
  for (int t0 = 0; t0 < keep; t0 += TB) {
    float tw[TB];
    unsigned ti[TB];
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      if (t0 + t < keep) {
        const size_t off = (size_t)(t0 + t) * B + j;
        tw[t] = Val<T>::load(rv + off);
        ti[t] = Idx<I>::load(ri + off);
      }
    }
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      if (t0 + t < keep) fma_x<T, NB, XS>(acc, tw[t], ti[t], xsj, BN, x, colbase, cols, batch, n0);
    }
  }
}

// Stage x[:, n0:n0+NB] into xs as fp32, block-interleaved: xs[(i*B + j)*NB + c] = x[j*L + i, n0 + c]
// (0 for padding columns and for batch columns >= batch). Two conflict-free passes through a
// scratch [B][Lp][NB] with an odd pitch Lp: (A) coalesced global reads along each block,
// contiguous shared stores; (B) reads across blocks at stride Lp*NB words (distinct banks since
// Lp is odd), contiguous stores into xs. A direct scatter would hit one bank 32 times per store.
// Called by warps 0..nwarps-1 (all of the CTA, or its consumer warps: then they synchronise on
// named barrier 1 and the other warps are left free).
template <typename T, int NB>
__device__ __forceinline__ void stage_x(float* xs, float* scratch, const T* __restrict__ x, int B, int L, int cols,
                                        int batch, int n0, int nwarps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int Lp = L | 1;
  // Pass A works on 32-column chunks (block j, columns i0..i0+31); each warp keeps SB chunks'
  // loads in flight before its first store, so x costs one L2 round trip, not one per block.
  constexpr int SB = NB >= 4 ? 4 : 8;
  const int cpb = (L + 31) >> 5;  // chunks per block
  const int nchunks = B * cpb;
  for (int c0 = warp; c0 < nchunks; c0 += nwarps * SB) {
    float v[SB][NB];
#pragma unroll
    for (int b = 0; b < SB; ++b) {
      const int c = c0 + b * nwarps;
      const int j = c / cpb, i = (c - j * cpb) * 32 + lane, col = j * L + i;
#pragma unroll
      for (int q = 0; q < NB; ++q)
        v[b][q] = (c < nchunks && i < L && col < cols && n0 + q < batch)
                      ? Val<T>::ldg(x + (size_t)col * batch + n0 + q) : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < SB; ++b) {
      const int c = c0 + b * nwarps;
      const int j = c / cpb, i = (c - j * cpb) * 32 + lane;
      if (c < nchunks && i < L) {
        float* dst = scratch + ((size_t)j * Lp + i) * NB;
        if (NB % 4 == 0) {
#pragma unroll
          for (int c4 = 0; c4 < NB; c4 += 4)
            *reinterpret_cast<float4*>(dst + c4) =
                make_float4(v[b][c4 % NB], v[b][(c4 + 1) % NB], v[b][(c4 + 2) % NB], v[b][(c4 + 3) % NB]);
        } else {
#pragma unroll
          for (int q = 0; q < NB; ++q) dst[q] = v[b][q];
        }
      }
    }
  }
  if (nwarps * 32 == (int)blockDim.x) __syncthreads(); else named_sync(nwarps * 32);
  const int BN = B * NB;
#pragma unroll 4
  for (int i = warp; i < L; i += nwarps) {
    for (int q = lane; q < BN; q += 32) {
      const int j = q / NB, c = q % NB;
      xs[(size_t)i * BN + q] = scratch[((size_t)j * Lp + i) * NB + c];
    }
  }
  if (nwarps * 32 == (int)blockDim.x) __syncthreads(); else named_sync(nwarps * 32);
}

// Stage x[:, n0:n0+NB] into xs in its own type T (XS = 2): unit u = i*B + j (NB*sizeof(T) bytes)
// holds x[j*L + i, n0 + c] for c < NB (0 for padding columns and batch columns >= batch). Lane l
// of a warp takes block j0 + (l & 7) and offset i0 + (l >> 3): its unit store lands in bank group
// (j mod 8), so the 8 lanes of a quarter warp never collide (a warp along i would hit one group
// 32 times), and each block's 4 consecutive columns are one 32-byte global sector at NB = 8.
template <typename T, int NB>
__device__ __forceinline__ void stage_x_own(char* xs, const T* __restrict__ x, int B, int L, int cols, int batch,
                                            int n0) {
  constexpr int XW = (NB * (int)sizeof(T)) / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int jt = (B + 7) >> 3, it = (L + 3) >> 2;
  const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);
  // The whole unit in one load when the slice n0..n0+NB of every column is whole and aligned.
  const bool whole = batch % NB == 0 && (reinterpret_cast<size_t>(x) % (NB * sizeof(T))) == 0;
  for (int t = warp; t < jt * it; t += nwarps) {
    const int j = (t % jt) * 8 + (lane & 7), i = (t / jt) * 4 + (lane >> 3);
    if (j >= B || i >= L) continue;
    const int col = j * L + i;
    Words<XW> u;
    if (whole && col < cols) {
      u = *reinterpret_cast<const Words<XW>*>(xb + (size_t)col * batch + n0);
    } else {
#pragma unroll
      for (int q = 0; q < XW; ++q) {
        unsigned lo = 0, hi = 0;
        if (col < cols && n0 + 2 * q < batch) lo = __ldg(xb + (size_t)col * batch + n0 + 2 * q);
        if (col < cols && n0 + 2 * q + 1 < batch) hi = __ldg(xb + (size_t)col * batch + n0 + 2 * q + 1);
        u.w[q] = lo | (hi << 16);
      }
    }
    *reinterpret_cast<Words<XW>*>(xs + ((size_t)i * B + j) * (NB * sizeof(T))) = u;
  }
  __syncthreads();
}

// xs[c] = x[c] for c < cols, 0 up to padded, in x's own type, one element per step: c = first,
// first + step, ... (the element-wise part of a raw x copy: its tail, its padding, or all of it
// when x is not 16-byte aligned).
template <typename T>
__device__ __forceinline__ void copy_x_elements(char* xs, const T* __restrict__ x, int first, int step, int cols,
                                                int padded) {
  const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);
  for (int c = first; c < padded; c += step) {
    if constexpr (sizeof(T) == 2) {
      reinterpret_cast<unsigned short*>(xs)[c] = c < cols ? __ldg(xb + c) : (unsigned short)0;
    } else {
      reinterpret_cast<T*>(xs)[c] = c < cols ? x[c] : T{};
    }
  }
}

// Stage x (batch 1) into xs as it is, in its own type (XS = 3): xs[c] = x[c] for c < cols, 0 up to
// B*L. 16-byte loads and stores when x is 16-byte aligned (contiguous, conflict-free), else one
// element per thread.
template <typename T>
__device__ __forceinline__ void stage_x_raw(char* xs, const T* __restrict__ x, int cols, int padded) {
  constexpr int V = 16 / (int)sizeof(T);
  int done = 0;
  if ((reinterpret_cast<size_t>(x) & 15) == 0) {
    const int nvec = cols / V;
    const uint4* src = reinterpret_cast<const uint4*>(x);
    uint4* dst = reinterpret_cast<uint4*>(xs);
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) dst[v] = __ldg(src + v);
    done = nvec * V;
  }
  copy_x_elements<T>(xs, x, done + (int)threadIdx.x, (int)blockDim.x, cols, padded);
  __syncthreads();
}

template <typename T, typename I, int NB, int XS, bool IL>
__global__ void __launch_bounds__(1024)
balanced_spmm(const T* __restrict__ vals, const I* __restrict__ idx, long long row_stride, int rows, int blocks,
              int block_length, int keep, int lanes_per_row, const T* __restrict__ x, int cols,
              int batch, T* __restrict__ y, const float* __restrict__ bias, int act) {
  if (XS) {
    // Weights only, before the prologue: ask L2 for this warp's first rows, so that DRAM latency
    // overlaps the x staging (and, under programmatic dependent launch, the previous grid).
    const int rpw = 32 / lanes_per_row;
    const long long first = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * rpw;
    if (first < rows) {
      const long long nr = (rows - first) < rpw ? (rows - first) : rpw;
      const char* pv = reinterpret_cast<const char*>(vals + first * row_stride);
      const char* pi = reinterpret_cast<const char*>(idx + first * row_stride);
      const size_t bv = (size_t)(nr * row_stride) * sizeof(T), bi = (size_t)(nr * row_stride) * sizeof(I);
      for (size_t off = (size_t)(threadIdx.x & 31) * 128; off < bv && off < 64 * 128; off += 32 * 128) prefetch_l2(pv + off);
      for (size_t off = (size_t)(threadIdx.x & 31) * 128; off < bi && off < 32 * 128; off += 32 * 128) prefetch_l2(pi + off);
    }
  }
  overlap_prologue();  // then wait for the previous grid (bp_common.cuh)
  extern __shared__ float4 bp_smem[];
  constexpr int V = Val<T>::kPerVec;
  const int B = blocks, L = block_length, P = lanes_per_row;
  const int G = IL ? keep / V : 0;  // 16-byte slot groups per block
  const int rem = keep - G * V;              // tail slots (< V when interleaved)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int sub = lane & (P - 1);
  const int rpw = 32 / P;  // rows per warp
  const int n0 = blockIdx.y * NB;
  const long long row_step = (long long)gridDim.x * nwarps * rpw;
  const long long first = ((long long)blockIdx.x * nwarps + warp) * rpw;
  float* xs = reinterpret_cast<float*>(bp_smem);

  static_assert(XS != 2 || (sizeof(T) == 2 && NB >= 2 && IL), "XS = 2: 16-bit T, NB >= 2, interleaved layout");
  static_assert(XS != 3 || NB == 1, "XS = 3: batch 1");
  if (XS) {
    if (BP_DIAG != 3) {
      if constexpr (XS == 3) stage_x_raw<T>(reinterpret_cast<char*>(xs), x, cols, B * L);
      else if constexpr (XS == 2) stage_x_own<T, NB>(reinterpret_cast<char*>(xs), x, B, L, cols, batch, n0);
      else stage_x<T, NB>(xs, xs + (size_t)B * L * NB, x, B, L, cols, batch, n0, nwarps);
    }
  }

  for (long long rb = first; rb < rows; rb += row_step) {
    const long long r = rb + lane / P;
    float acc[NB];
#pragma unroll
    for (int c = 0; c < NB; ++c) acc[c] = 0.0f;
    if (r < rows) {
      const T* rv = vals + r * row_stride;
      const I* ri = idx + r * row_stride;
      if (IL) {
        for (int j = sub; j < B; j += P)
          block_dot_interleaved<T, I, NB, XS>(acc, rv, ri, j, B, L, G, rem, xs, x, cols, batch, n0);
      } else {
        for (int j = sub; j < B; j += P) block_dot_direct<T, I, NB, XS>(acc, rv, ri, j, B, L, keep, xs, x, cols, batch, n0);
      }
    }
    // Sum the P lanes of each row (xor offsets < P stay inside the row's lane group); every
    // lane takes part, also those past the last row, so the full mask is valid.
    for (int off = P >> 1; off > 0; off >>= 1) {
#pragma unroll
      for (int c = 0; c < NB; ++c) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
    }
    if (sub == 0 && r < rows) {
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        if (n0 + c < batch) Val<T>::store(y + r * batch + n0 + c, epilogue(acc[c], bias, act, r));
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------
// bp::balanced_spmv_tma<T, I>: batch 1, x in shared memory, interleaved layout, weights streamed
// by the bulk-copy engine through a ring of shared-memory stages.
//
// Why: in balanced_spmm each warp loads its row into registers, waits, computes, and only then
// asks for the next row, so memory sits idle while warps compute and the bytes in flight are
// bounded by registers. Here one producer warp keeps `stages` groups of rows in flight per SM
// (cp.async.bulk global -> shared, completion counted in bytes on an mbarrier), independent of
// registers, while the consumer warps compute.
//
// CTA: consumer warps 0..ncw-1 in `teams` teams of wpt = group_rows / (32/P) warps, plus one
// producer warp (the last; ncw = blockDim.x/32 - 1 = teams * wpt). A group is `group_rows`
// consecutive rows; the CTA's n-th group (global group blockIdx.x + n*gridDim.x) sits in stage
// n % stages and is computed by team n % teams: several teams work on different stages at once,
// so the stage size (bytes per bulk copy) and the number of consumer warps are chosen apart.
// Requires stages % teams == 0: each stage then always belongs to the same team, which consumes
// every group passing through it in order. (Otherwise a team that skipped other teams' groups
// could wait on a stage two phases ahead, which an mbarrier parity wait cannot tell apart.)
// Each warp of a team computes 32/P rows of the group from shared memory (same interleaved
// layout as in global memory: one 16-byte LDS per lane and slot group, conflict-free).
// x: when x_bulk > 0 the producer first copies x_bulk bytes of x (16-byte aligned, a multiple of
// 16) into the xs region with one bulk copy and the consumers transpose it from shared memory;
// the rest of x (< 16 bytes) and the x_bulk = 0 case read global memory.
// row_stride * sizeof(I) must be a multiple of 16 (the runtime rounds row_stride up to 16).
// XR (x raw): x stays in its own type, as it is (x[c] at byte c*sizeof(T) of the xs region, zeros
// from cols up to B*L): the bulk copy lands it ready to use, so the consumers only fill the tail
// and the padding, and the x region is B*L*sizeof(T) bytes instead of the fp32 transposition's
// (B*L + B*(L|1))*4 (a wide layer then keeps most of its weights in flight in the ring from the
// start: fc6, K = 25088, 49 KB of x instead of 200 KB). Lane j reads x[j*L + idx] with
// index-dependent bank conflicts, as balanced_spmm's XS = 3.
// Dynamic shared memory: 256 (barriers) + the x region rounded up to 128, then `stages`
// (<= 15) stages of group_rows*row_stride*(sizeof(T)+sizeof(I)) bytes (values, then indices).
template <typename T, typename I, bool XR>
__global__ void __launch_bounds__(1024, 1)
balanced_spmv_tma(const T* __restrict__ vals, const I* __restrict__ idx, long long row_stride, int rows, int blocks,
                  int block_length, int keep, int lanes_per_row, const T* __restrict__ x, int cols,
                  T* __restrict__ y, int group_rows, int stages, int x_bulk,
                  const float* __restrict__ bias, int act) {
  // weights only, before the prologue: this CTA's first row groups into L2
  prefetch_cta_rows_l2(vals, row_stride * (long long)sizeof(T), idx, row_stride * (long long)sizeof(I),
                       (long long)blockIdx.x * group_rows, group_rows, rows);
  overlap_prologue();  // then wait for the previous grid (bp_common.cuh)
  extern __shared__ float4 bp_smem[];
  constexpr int V = Val<T>::kPerVec;
  constexpr int IW = (V * (int)sizeof(I)) / 4;
  const int B = blocks, L = block_length, P = lanes_per_row, GR = group_rows;
  const int G = keep / V, rem = keep - G * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ncw = (blockDim.x >> 5) - 1;
  const int sub = lane & (P - 1), rpw = 32 / P;
  const int wpt = GR / rpw, teams = ncw / wpt;
  if (stages % teams != 0) __trap();  // the contract above; the runtime never launches this
  char* base = reinterpret_cast<char*>(bp_smem);
  unsigned long long* full = reinterpret_cast<unsigned long long*>(base);
  unsigned long long* empty = full + stages;
  unsigned long long* xbar = empty + stages;
  float* xs = reinterpret_cast<float*>(base + 256);
  float* scratch = xs + (size_t)B * L;
  const size_t x_bytes = XR ? (size_t)B * L * sizeof(T) : ((size_t)B * L + (size_t)B * (L | 1)) * 4;
  char* ring = base + 256 + ((x_bytes + 127) & ~(size_t)127);
  const size_t vbytes = (size_t)GR * row_stride * sizeof(T), ibytes = (size_t)GR * row_stride * sizeof(I);
  const size_t stage_bytes = vbytes + ibytes;
  const long long ngroups = (rows + GR - 1) / GR;

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s], 1);      // the producer's arrive.expect_tx
      mbar_init(&empty[s], wpt);   // one arrive per warp of the consuming team
    }
    mbar_init(xbar, 1);
    mbar_init_fence();
  }
  __syncthreads();

  if (warp == ncw) {
    // Producer: one lane issues the x copy, then two bulk copies (values, indices) per group.
    if (lane == 0) {
      if (x_bulk > 0) {
        mbar_arrive_expect_tx(xbar, (unsigned)x_bulk);
        bulk_copy_g2s(xs, x, (unsigned)x_bulk, xbar);
      }
      int n = 0;
      for (long long grp = blockIdx.x; grp < ngroups; grp += gridDim.x, ++n) {
        const int s = n % stages;
        const unsigned ph = (unsigned)(n / stages) & 1u;
        mbar_wait(&empty[s], ph ^ 1u);  // a fresh barrier passes parity 1 at once
        const long long r0 = grp * GR;
        const long long nr = (rows - r0) < GR ? (rows - r0) : GR;
        const unsigned bv = (unsigned)(nr * row_stride * (long long)sizeof(T));
        const unsigned bi = (unsigned)(nr * row_stride * (long long)sizeof(I));
        char* st = ring + (size_t)s * stage_bytes;
        if (BP_DIAG == 2) {
          mbar_arrive(&full[s]);
        } else {
          mbar_arrive_expect_tx(&full[s], bv + bi);
          bulk_copy_g2s(st, vals + r0 * row_stride, bv, &full[s]);
          bulk_copy_g2s(st + vbytes, idx + r0 * row_stride, bi, &full[s]);
        }
      }
    }
    return;
  }

  // Consumers: build xs (x[j*L + i] -> xs[i*B + j], fp32, zero padded; or, XR, the tail of x
  // past the bulk copy and the zero padding) while the ring fills.
  if (XR && BP_DIAG != 3) {
    copy_x_elements<T>(reinterpret_cast<char*>(xs), x, x_bulk / (int)sizeof(T) + (int)threadIdx.x, ncw * 32, cols,
                       B * L);
    named_sync(ncw * 32);
    if (x_bulk > 0) mbar_wait(xbar, 0);
  } else if (BP_DIAG != 3) {
    if (x_bulk > 0) {
      // Pass A from the raw copy (sitting in the xs region) into the odd-pitch scratch.
      mbar_wait(xbar, 0);
      const T* xr = reinterpret_cast<const T*>(xs);
      const int nraw = x_bulk / (int)sizeof(T);
      const int Lp = L | 1;
      for (int col = threadIdx.x; col < B * L; col += ncw * 32) {
        const int j = col / L, i = col - j * L;
        float v = 0.0f;
        if (col < cols) v = col < nraw ? Val<T>::sload(xr + col) : Val<T>::ldg(x + col);
        scratch[(size_t)j * Lp + i] = v;
      }
      named_sync(ncw * 32);  // every read of the raw copy is done before xs is overwritten
      for (int i = warp; i < L; i += ncw) {
        for (int j = lane; j < B; j += 32) xs[(size_t)i * B + j] = scratch[(size_t)j * Lp + i];
      }
      named_sync(ncw * 32);
    } else {
      stage_x<T, 1>(xs, scratch, x, B, L, cols, 1, 0, ncw);
    }
  }

  const int team = warp / wpt, wt = warp - team * wpt;
  const int rl = wt * rpw + lane / P;  // row within a group
  const unsigned xs_addr = smem_addr(xs);
  // Bytes from block j's x of in-block index i to that of i + 1, and x of the block's first index.
  const unsigned xstride = XR ? (unsigned)sizeof(T) : (unsigned)B * 4u;
  const unsigned xjstep = XR ? (unsigned)L * (unsigned)sizeof(T) : 4u;
  using XT = typename Pick<XR, T, float>::type;  // what xs holds
  for (int n = team;; n += teams) {
    const long long grp = blockIdx.x + (long long)n * gridDim.x;
    if (grp >= ngroups) break;
    const int s = n % stages;
    const unsigned ph = (unsigned)(n / stages) & 1u;
    const long long r = grp * GR + rl;
    mbar_wait(&full[s], ph);
    float acc0 = 0.0f, acc1 = 0.0f;  // two chains: consecutive FFMAs do not wait on each other
    if (BP_DIAG != 1 && r < rows) {
      const char* st = ring + (size_t)s * stage_bytes;
      const T* sv = reinterpret_cast<const T*>(st) + (size_t)rl * row_stride;
      const I* si = reinterpret_cast<const I*>(st + vbytes) + (size_t)rl * row_stride;
      for (int j = sub; j < B; j += P) {
        const unsigned xj = xs_addr + (unsigned)j * xjstep;
#pragma unroll 2
        for (int g = 0; g < G; ++g) {
          const size_t off = ((size_t)g * B + j) * V;
          const Words<4> v = *reinterpret_cast<const Words<4>*>(sv + off);
          const Words<IW> ix = *reinterpret_cast<const Words<IW>*>(si + off);
#pragma unroll
          for (int q = 0; q < V; q += 2) {
            acc0 = fmaf(Val<T>::at(v, q), lds_as_f32<XT>(xj + Idx<I>::at(ix, q) * xstride), acc0);
            acc1 = fmaf(Val<T>::at(v, q + 1), lds_as_f32<XT>(xj + Idx<I>::at(ix, q + 1) * xstride), acc1);
          }
        }
        const size_t tail = (size_t)G * B * V;
        if (V > 4 && (rem & 4)) {
          const size_t o = tail + (size_t)j * 4;
          Words<Bytes<4 * (int)sizeof(T)>::kWords> v;
          Words<Bytes<4 * (int)sizeof(I)>::kWords> ix;
          v = *reinterpret_cast<const decltype(v)*>(sv + o);
          ix = *reinterpret_cast<const decltype(ix)*>(si + o);
#pragma unroll
          for (int q = 0; q < 4; q += 2) {
            acc0 = fmaf(Val<T>::at(v, q), lds_as_f32<XT>(xj + Idx<I>::at(ix, q) * xstride), acc0);
            acc1 = fmaf(Val<T>::at(v, q + 1), lds_as_f32<XT>(xj + Idx<I>::at(ix, q + 1) * xstride), acc1);
          }
        }
        if (rem & 2) {
          const size_t o = tail + (size_t)B * (rem & ~3) + (size_t)j * 2;
          acc0 = fmaf(Val<T>::sload(sv + o), lds_as_f32<XT>(xj + (unsigned)si[o] * xstride), acc0);
          acc1 = fmaf(Val<T>::sload(sv + o + 1), lds_as_f32<XT>(xj + (unsigned)si[o + 1] * xstride), acc1);
        }
        if (rem & 1) {
          const size_t o = tail + (size_t)B * (rem & ~1) + j;
          acc0 = fmaf(Val<T>::sload(sv + o), lds_as_f32<XT>(xj + (unsigned)si[o] * xstride), acc0);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);  // this warp is done reading stage s
    float acc = acc0 + acc1;
    for (int off = P >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (sub == 0 && r < rows) Val<T>::store(y + r, epilogue(acc, bias, act, r));
  }
}

}  // namespace bp
