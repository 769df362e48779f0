// bsr_spmv.cu: y = W x for a block-sparse (BSR) W, batch 1 (SpMV) and batch 2..64 (SpMM).
//
// One template, bp::bsr_spmm<T, LB, NB>, instantiated by name (CuPy name_expressions):
//   T  value type of W, x and y: float, bp::f16, bp::bf16 (raw __half / __nv_bfloat16 bits)
//   LB bytes of W one lane loads at a time (the "chunk"): 16, 8, 4 or 2 (2 only for 16-bit T).
//      The runtime picks the largest power of two <= 16 dividing bw * sizeof(T), so a chunk of
//      SEG = LB / sizeof(T) values never crosses a row of a tile and is naturally aligned in the
//      file's own layout (no repacking on upload; narrower loads for narrow tiles instead).
//   NB batch columns computed per pass (1, 2, 4, 8); each chunk loaded is used NB times
// Accumulation is fp32 for every T; y is rounded to T once, at the end.
// The fused epilogue (bp_common.cuh): y[r, n] = act(acc + bias[r]), bias [R] fp32 or null, act 0
// (identity) or 1 (ReLU), applied before that rounding.
//
// Matrix layout (kernels/README.md has the full contract): the packed file's BSR arrays as they
// are. W is [rows R, cols K], cut into bh x bw tiles (Rb = ceil(R/bh) tile rows, Cb = ceil(K/bw)
// tile columns; tiles past the matrix edge are zero-padded in the file). Tile row tr keeps tiles
// crow[tr] .. crow[tr+1]-1; tile n sits at tile column tcol[n]; its values are vals[n, 0:bh, 0:bw]
// (row-major, contiguous). x is [K, batch] row-major (batch innermost; [K] for batch 1), y is
// [R, batch] row-major. Pass p = blockIdx.y computes batch columns [p*NB, p*NB + NB).
//
// Work decomposition. A row of a tile is cut into nseg = bw / SEG chunks. A "unit" is one band of
// rows [h0, h0 + hcur) of one tile row, hcur <= band_rows; band_rows * min(nseg, 32) <= 32, so a
// band of one tile is at most 32 chunks (bands = 1 unless bh * min(nseg, 32) > 32). A unit is
// computed by a team of team_lanes = TL lanes (a power of two: a part of a warp, one warp, or
// S = TL/32 warps of the CTA). LPT = hcur * min(nseg, 32) lanes share a tile; TPS = TL / LPT
// (rounded down) tiles are in flight per step of the team, lanes past TPS * LPT idle. Lane tl of
// the team owns chunk i0 = tl % LPT of the band, i.e. one fixed row rl = i0 / min(nseg, 32) and
// segment s = i0 % min(nseg, 32) (plus s + 32, s + 64, ... when nseg > 32: then hcur = 1 and a
// row of a tile is G = ceil(nseg / 32) "virtual tiles" of 32 chunks), and tiles toff, toff + TPS,
// ... (toff = tl / LPT) of the tile row. Consecutive lanes therefore read consecutive chunks:
// every team-wide load is one contiguous, coalesced run of TL * LB bytes (or of whole bands).
// A fixed row per lane means one fp32 accumulator per batch column; the team's partial sums of a
// row are combined with warp shuffles (lanes 0..hcur-1 of the team end up with rows h0..), then,
// for teams of S > 1 warps, through shared memory; no atomics, no output memset.
//
// Loads: W chunks with ld.global.nc.L1::no_allocate (streamed once; keeps L1 for x); UNR chunks
// per lane (BsrUnroll: up to 64 bytes of W for NB <= 2, 32 for NB = 4, 16 for NB = 8; 2 to 8
// chunks) and their tile-column indices are issued before the first use;
// x through the read-only path with L1 allocation (x is small and reused by every tile row): one
// LB-byte vector per chunk for batch 1, one NB-column vector per element for batch % NB == 0,
// scalar loads otherwise (and when x is not 16-byte aligned, which the kernel checks itself).
//
// Launch geometry: blockDim.x = a power of two in [32, 1024], a multiple of TL; grid.x =
// ceil(Rb * bands / (blockDim.x / TL)); grid.y = ceil(batch / NB). Dynamic shared memory:
// blockDim.x * NB * 4 bytes when TL > 32 (the cross-warp reduction), else 0.
#include "bp_common.cuh"

namespace bp {

// ---- x: cached read-only loads (L1-allocating, unlike the weights) ------------------------------
template <int NW>
__device__ __forceinline__ Words<NW> ldx_words(const void* p);

template <>
__device__ __forceinline__ Words<1> ldx_words<1>(const void* p) {
  Words<1> r;
  asm("ld.global.nc.u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
  return r;
}
template <>
__device__ __forceinline__ Words<2> ldx_words<2>(const void* p) {
  Words<2> r;
  asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));
  return r;
}
template <>
__device__ __forceinline__ Words<4> ldx_words<4>(const void* p) {
  Words<4> r;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
      : "l"(p));
  return r;
}

// One chunk of W: LB bytes = SEG values of one row of one tile.
template <typename T, int LB>
struct BsrChunk {
  static_assert(LB == 2 || LB == 4 || LB == 8 || LB == 16, "chunk bytes");
  static_assert(LB >= (int)sizeof(T), "a chunk holds at least one value");
  static constexpr int kSeg = LB / (int)sizeof(T);
  static constexpr int kWords = Bytes<LB>::kWords;
  __device__ static __forceinline__ Words<kWords> load(const T* p) { return Bytes<LB>::load(p); }
};

// Chunks per lane issued before the first use: clamp(budget / LB, 2, cap), budget = bytes of W in
// flight per lane. Chosen so every instantiation fits 64 registers without spilling (nvcc 13,
// sm_90; tests/test_kernels_compile.py checks it): more columns need more accumulators.
template <int LB, int NB>
struct BsrUnroll {
  static constexpr int budget = NB <= 2 ? 64 : (NB == 4 ? 32 : 16);  // bytes of W in flight per lane
  static constexpr int raw = budget / LB;
  static constexpr int cap = NB <= 2 ? 8 : 4;
  static constexpr int value = raw < 2 ? 2 : (raw > cap ? cap : raw);
};

// xf[c] = x[n0 + c] of one x row (NB >= 2 columns, 16-byte aligned base, row offset a multiple of
// NB): one vector load of NB * sizeof(T) bytes (two for 32 bytes).
template <typename T, int NB>
__device__ __forceinline__ void x_row_vec(const T* p, float (&xf)[NB]) {
  constexpr int XB = NB * (int)sizeof(T);
  static_assert(XB % 4 == 0 && XB <= 32, "x row bytes");
  if constexpr (XB <= 16) {
    const Words<XB / 4> w = ldx_words<XB / 4>(p);
#pragma unroll
    for (int c = 0; c < NB; ++c) xf[c] = Val<T>::at(w, c);
  } else {
    const Words<4> a = ldx_words<4>(p);
    const Words<4> b = ldx_words<4>(reinterpret_cast<const char*>(p) + 16);
    constexpr int H = NB / 2;
#pragma unroll
    for (int c = 0; c < H; ++c) {
      xf[c] = Val<T>::at(a, c);
      xf[H + c] = Val<T>::at(b, c);
    }
  }
}

// acc += chunk w (values of columns xc .. xc+SEG-1 of one row) times x[those columns, n0 : n0+NB]
// (xb = x + n0; ld = batch, the row pitch of x; nrem = batch - n0, the columns left in this pass).
// NB = 1 keeps two accumulators (even / odd element): two FFMA chains instead of one.
// Columns >= cols are padding (their values are 0 in the file, x has no such rows): skipped.
template <typename T, int LB, int NB, int NA>
__device__ __forceinline__ void chunk_fma(float (&acc)[NA], const Words<BsrChunk<T, LB>::kWords>& w,
                                          const T* __restrict__ xb, int xc, int cols, int ld, int nrem, bool xvec) {
  constexpr int SEG = BsrChunk<T, LB>::kSeg;
  if constexpr (NB == 1) {
    if constexpr (SEG > 1) {
      if (xvec && xc + SEG <= cols) {
        // batch 1 (xvec): the SEG x values are contiguous and LB-aligned (xc is a multiple of SEG).
        const Words<BsrChunk<T, LB>::kWords> xw = ldx_words<BsrChunk<T, LB>::kWords>(xb + xc);
#pragma unroll
        for (int e = 0; e < SEG; ++e) acc[e & 1] = fmaf(Val<T>::at(w, e), Val<T>::at(xw, e), acc[e & 1]);
        return;
      }
    }
#pragma unroll
    for (int e = 0; e < SEG; ++e) {
      const int col = xc + e;
      if (col < cols) acc[e & 1] = fmaf(Val<T>::at(w, e), Val<T>::ldg(xb + (size_t)col * ld), acc[e & 1]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < SEG; ++e) {
      const int col = xc + e;
      if (col < cols) {
        const float wv = Val<T>::at(w, e);
        const T* px = xb + (size_t)col * ld;
        if (xvec) {
          float xf[NB];
          x_row_vec<T, NB>(px, xf);
#pragma unroll
          for (int c = 0; c < NB; ++c) acc[c] = fmaf(wv, xf[c], acc[c]);
        } else {
#pragma unroll
          for (int c = 0; c < NB; ++c) {
            if (c < nrem) acc[c] = fmaf(wv, Val<T>::ldg(px + c), acc[c]);
          }
        }
      }
    }
  }
}

template <typename T, int LB, int NB>
__global__ void __launch_bounds__(1024)
bsr_spmm(const T* __restrict__ vals, const int* __restrict__ crow, const int* __restrict__ tcol, int rows,
         int cols, int tile_rows, int bh, int bw, int band_rows, int bands, int team_lanes,
         const T* __restrict__ x, int batch, T* __restrict__ y, const float* __restrict__ bias,
         int act) {
  overlap_prologue();  // first: this grid may be launched before the previous one ends (bp_common.cuh)
  using C = BsrChunk<T, LB>;
  constexpr int SEG = C::kSeg;
  // Chunks in flight per lane: UNR * LB = 64 bytes of W for batch 1..2 (fewer for wider batch
  // tiles, 16 for 2-byte chunks): what fits in 64 registers next to the NB accumulators.
  constexpr int UNR = BsrUnroll<LB, NB>::value;
  constexpr int NA = NB == 1 ? 2 : NB;  // accumulators per lane
  extern __shared__ float4 bsr_smem[];

  const int TL = team_lanes;
  const int lane = threadIdx.x & 31;
  const int W = TL < 32 ? TL : 32;            // lanes of one team inside one warp
  const int S = TL > 32 ? TL >> 5 : 1;        // warps per team
  const int teams = (int)blockDim.x / TL;     // teams per CTA
  const int team = (int)threadIdx.x / TL;
  const int tl = (int)threadIdx.x - team * TL;  // lane within the team
  const int wl = lane & (W - 1);                // lane within the team's part of this warp
  const int wt = tl >> 5;                       // warp within the team (0 when S == 1)

  // unit < 2^31: the runtime checks tile_rows * bands (<= rows) fits an int.
  const int unit = (int)blockIdx.x * teams + team;
  const bool valid = unit < tile_rows * bands;
  const int tr = unit / bands;
  const int b = unit - tr * bands;
  const int h0 = b * band_rows;
  const int hcur = band_rows < bh - h0 ? band_rows : bh - h0;  // rows of this band (the last may be shorter)
  const int nseg = bw / SEG;                  // chunks per row of a tile
  const int nsegE = nseg < 32 ? nseg : 32;    // chunks per row of a band in one step
  const int G = (nseg + 31) >> 5;             // virtual tiles per tile (> 1 only when hcur == 1)
  const int LPT = hcur * nsegE;               // lanes per (virtual) tile, <= 32
  // The runtime never launches these (see the contract above); a wrong launch traps instead of
  // computing garbage. Bands > 1 with a sub-warp team would put teams of different band heights
  // (hence different reduction patterns) in one warp.
  if ((TL & (TL - 1)) != 0 || TL > (int)blockDim.x || bw % SEG != 0 || band_rows * nsegE > 32 ||
      band_rows * nsegE > TL || (bands > 1 && TL < 32))
    __trap();
  const int TPS = TL / LPT;                   // tiles per step of the team
  const int toff = tl / LPT;
  const int i0 = tl - toff * LPT;
  const int rl = i0 / nsegE;                  // this lane's row within the band
  const int s_in = i0 - rl * nsegE;
  const int n0 = blockIdx.y * NB;

  float acc[NA];
#pragma unroll
  for (int c = 0; c < NA; ++c) acc[c] = 0.0f;

  if (valid && toff < TPS) {
    // x vector loads need a 16-byte aligned x, and for NB > 1 rows whose NB columns start at a
    // multiple of NB elements (batch % NB == 0); batch 1 reads SEG consecutive columns instead.
    const bool xvec = (reinterpret_cast<unsigned long long>(x) & 15ull) == 0 &&
                      (NB == 1 ? batch == 1 : batch % NB == 0);
    const T* xb = x + n0;
    const int nrem = batch - n0;
    const int t0 = __ldg(crow + tr), t1 = __ldg(crow + tr + 1);
    const int tile_elems = bh * bw;  // < 2^31 (checked by the runtime)
    // This lane's chunk in tile t0: row h0 + rl, segment s_in (all offsets are multiples of SEG).
    const T* vlane = vals + (long long)t0 * tile_elems + (h0 + rl) * bw + s_in * SEG;
    const int* tc_row = tcol + t0;
    const int nt = t1 - t0;
    if (G == 1) {
      // Every tile of the row is one step of LPT lanes: tiles toff, toff + TPS, ...
      for (int t = toff; t < nt; t += TPS * UNR) {
        Words<C::kWords> w[UNR];
        int xc[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
          const int tt = t + u * TPS;
          xc[u] = -1;
#pragma unroll
          for (int q = 0; q < C::kWords; ++q) w[u].w[q] = 0u;
          if (tt < nt) {
            w[u] = C::load(vlane + (long long)tt * tile_elems);
            xc[u] = (int)ld_u32(tc_row + tt) * bw + s_in * SEG;
          }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
          if (xc[u] >= 0) chunk_fma<T, LB, NB, NA>(acc, w[u], xb, xc[u], cols, batch, nrem, xvec);
        }
      }
    } else {
      // Rows wider than 32 chunks (hcur == 1): virtual tile vt = trel * G + g is chunk group g
      // (chunks 32g .. 32g + 31) of tile trel. Stepping vt by TPS steps (trel, g) by (dq, dr)
      // with a carry: one division per UNR chunks, none per chunk.
      const int dq = TPS / G, dr = TPS - dq * G;
      for (int v0 = toff; v0 < nt * G; v0 += TPS * UNR) {
        int trel = v0 / G;
        int g = v0 - trel * G;
        Words<C::kWords> w[UNR];
        int xc[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
          const int s = g * 32 + s_in;
          xc[u] = -1;
#pragma unroll
          for (int q = 0; q < C::kWords; ++q) w[u].w[q] = 0u;
          if (trel < nt && s < nseg) {
            w[u] = C::load(vlane + (long long)trel * tile_elems + g * 32 * SEG);
            xc[u] = (int)ld_u32(tc_row + trel) * bw + s * SEG;
          }
          g += dr;
          trel += dq;
          if (g >= G) {
            g -= G;
            ++trel;
          }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
          if (xc[u] >= 0) chunk_fma<T, LB, NB, NA>(acc, w[u], xb, xc[u], cols, batch, nrem, xvec);
        }
      }
    }
  }
  if (NB == 1) acc[0] += acc[1 % NA];

  // ---- reduction: lane wl < hcur of the team (warp 0 of it) ends with row h0 + wl in out[] ----
  // Every lane of every warp runs this part (full shuffle masks). The path is uniform per warp:
  // with bands > 1 each warp belongs to one team, and with bands == 1 every team has hcur = bh.
  float out[NB];
  if ((LPT & (LPT - 1)) == 0) {
    // LPT, nsegE and TL are powers of two: lanes of one row differ only in their segment bits
    // (below nsegE) and tile bits (LPT and up); idle lanes do not exist.
    const int src = (lane & ~(W - 1)) + (wl < hcur ? wl : hcur - 1) * nsegE;
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      float v = acc[c];
      for (int o = 1; o < nsegE; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      for (int o = LPT; o < W; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      out[c] = __shfl_sync(0xffffffffu, v, src);
    }
  } else {
    // Any other tile shape: one team-wide sum per row of the band (idle lanes hold 0).
#pragma unroll
    for (int c = 0; c < NB; ++c) out[c] = 0.0f;
    for (int q = 0; q < hcur; ++q) {
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        float v = rl == q ? acc[c] : 0.0f;
        for (int o = 1; o < W; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (wl == q) out[c] = v;
      }
    }
  }
  if (S > 1) {
    // Teams of several warps: warp partials through shared memory (S is the same for the CTA,
    // so every thread reaches the barrier).
    float* red = reinterpret_cast<float*>(bsr_smem);
    if (wl < hcur) {
#pragma unroll
      for (int c = 0; c < NB; ++c) red[((team * S + wt) * 32 + wl) * NB + c] = out[c];
    }
    __syncthreads();
    if (wt == 0 && wl < hcur) {
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        float v = 0.0f;
        for (int k = 0; k < S; ++k) v += red[((team * S + k) * 32 + wl) * NB + c];
        out[c] = v;
      }
    }
  }
  if (valid && wt == 0 && wl < hcur) {
    const long long row = (long long)tr * bh + h0 + wl;
    if (row < rows) {
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        if (n0 + c < batch) Val<T>::store(y + row * batch + n0 + c, epilogue(out[c], bias, act, row));
      }
    }
  }
}

}  // namespace bp
