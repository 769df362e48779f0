// nm24_sparse_mma.cu: y = W x for a 2:4 W (balanced with block length 4, keep 2) on the sparse
// tensor cores (mma.sp, m16n8k32, fp16/bf16 with fp32 accumulation), batch 1 to 16.
//
// Why: a 2:4 layer read at one bit of index per weight (the bitmask encoding's bytes) is decoded by
// the tensor core itself; the CUDA-core kernels spend ~10-20 instructions per kept value finding its
// column, the sparse MMA ~1 per value (kernels/NOTES.md v16). The batch columns ride in the MMA's
// N = 8, so batch 1 to 8 cost one pass over W and batch 16 one pass with two MMAs per tile.
//
// Device layout (built on the host by balprune.formats.layouts.nm24_records; kernels/README.md):
// W [R, K] is cut into row tiles of 16 rows and k-tiles of 32 columns (8 blocks of 4); rows past R
// and blocks past the row's last hold zero values at in-block indices (0, 1). Per row tile rt and
// k-tile pair kp (k-tiles 2kp and 2kp+1), one record of BP_NM_RECORD_BYTES bytes:
//   bytes    0 ..  511: A fragment of k-tile 2kp, 16 bytes per lane: lane (g = lane / 4,
//                       t = lane % 4) holds registers r0..r3 = the two kept values (in column order:
//                       low half first) of (row g, block t), (row g + 8, block t), (row g, block
//                       t + 4), (row g + 8, block t + 4) of the tile;
//   bytes  512 .. 1023: the same for k-tile 2kp + 1;
//   bytes 1024 .. 1151: one 32-bit metadata word per lane: lanes t = 0, 1 hold k-tile 2kp's
//                       (sparsity selector 0), lanes t = 2, 3 k-tile 2kp + 1's (selector 1). The
//                       word of lane (g, t) covers blocks 4h .. 4h + 3 (h = t % 2) of rows g (bits
//                       0..15) and g + 8 (bits 16..31), 4 bits per block: the two kept in-block
//                       indices i0 < i1 as i0 | i1 << 2.
// Records are stored [row tiles][pairs] so a warp's loads of one record are one contiguous run.
//
// x [cols, batch] and y [rows, batch] row-major in T. B fragment (x): lane (g, t) holds rows
// (columns of W) 2t, 2t + 1, +8, +16, +24 of the k-tile for batch column n0 + g; columns past the
// batch read column batch - 1 (their products land in D columns that are never stored). x is read
// through the read-only cache (a layer's x is at most ~28 KB: L1-resident after the first tiles).
//
// A CTA of WK warps (blockDim.x = 32 * WK) owns one row tile; warp w takes pairs w, w + WK, ...
// (split K), the WK partial tiles are added in shared memory (WK * 16 * 8 * NT floats, dynamic),
// and the epilogue (bias, ReLU) runs in fp32 before the one rounding to T.
#include "bp_common.cuh"

// Kernel-side constants the host layout must agree with (tests/test_layouts.py reads them).
#define BP_NM_RECORD_BYTES 1152
#define BP_NM_TILE_ROWS 16
#define BP_NM_TILE_COLS 32
// Records loaded ahead of their use per warp.
#ifndef BP_NM_AHEAD
#define BP_NM_AHEAD 2
#endif

namespace bp {

template <typename T, int SEL>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const Words<4>& a, const unsigned (&b)[4], unsigned e);

#define BP_MMA_SP(TYPE, PTXT, SELV)                                                                            \
  template <>                                                                                                  \
  __device__ __forceinline__ void mma_sp_16832<TYPE, SELV>(float (&d)[4], const Words<4>& a,                 \
                                                           const unsigned (&b)[4], unsigned e) {             \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTXT "." PTXT                  \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, " #SELV ";"         \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                              \
                 : "r"(a.w[0]), "r"(a.w[1]), "r"(a.w[2]), "r"(a.w[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),       \
                   "r"(b[3]), "r"(e));                                                                         \
  }
BP_MMA_SP(f16, "f16", 0)
BP_MMA_SP(f16, "f16", 1)
BP_MMA_SP(bf16, "bf16", 0)
BP_MMA_SP(bf16, "bf16", 1)
#undef BP_MMA_SP

// The B fragment of one k-tile (first column c0 = kt * 32) for batch column n: lane t's pairs of
// rows (2t, 2t + 1) + 8j, j = 0..3. `pairs`: batch 1 with x 4-byte aligned, so a pair is one 32-bit
// load; `guard`: the tile reaches past `cols` (zeros there: padding columns hold zero weights, but
// x past the end may be anything, and 0 * inf is NaN).
__device__ __forceinline__ unsigned x_pair(const unsigned short* __restrict__ x, int k, int n, int batch, int cols,
                                           bool pairs, bool guard) {
  if (pairs && !guard) return __ldg(reinterpret_cast<const unsigned*>(x + k));
  const unsigned lo = (!guard || k < cols) ? __ldg(x + (long long)k * batch + n) : 0u;
  const unsigned hi = (!guard || k + 1 < cols) ? __ldg(x + (long long)(k + 1) * batch + n) : 0u;
  return lo | (hi << 16);
}

template <int NT>
__device__ __forceinline__ void load_b(unsigned (&b)[NT][4], const unsigned short* __restrict__ x, int c0, int t,
                                       const int (&n)[NT], int batch, int cols, bool pairs, bool guard) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j) b[nt][j] = x_pair(x, c0 + 2 * t + 8 * j, n[nt], batch, cols, pairs, guard);
}

// y[rows, batch] = act(W x + bias) for batch columns n0 = blockIdx.y * 8 * NT .. of the launch.
template <typename T, int NT>
__global__ void __launch_bounds__(512)
    nm24_spmm(const unsigned char* __restrict__ records, int rows, int pairs_per_row, const T* __restrict__ xt,
              int cols, int batch, T* __restrict__ y, const float* __restrict__ bias, int act) {
  if (blockIdx.y == 0) {  // weights only, before the prologue: this CTA's records into L2
    const long long bytes = (long long)pairs_per_row * BP_NM_RECORD_BYTES;
    prefetch_rows_l2(records + (long long)blockIdx.x * bytes, bytes, bytes, bytes, prefetch_share());
  }
  overlap_prologue();  // then wait for the previous grid (bp_common.cuh)
  extern __shared__ __align__(16) float red[];  // [WK][16][8 * NT]
  const unsigned short* x = reinterpret_cast<const unsigned short*>(xt);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, WK = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rt = blockIdx.x;
  const int n0 = blockIdx.y * 8 * NT;
  int n[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) n[nt] = min(n0 + nt * 8 + g, batch - 1);
  const bool pairs = batch == 1 && (reinterpret_cast<unsigned long long>(x) & 3ull) == 0;
  const int ktiles = (cols + BP_NM_TILE_COLS - 1) / BP_NM_TILE_COLS;
  const unsigned char* base = records + ((long long)rt * pairs_per_row) * BP_NM_RECORD_BYTES;

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  for (int kp0 = w; kp0 < pairs_per_row; kp0 += WK * BP_NM_AHEAD) {
    // every load of AHEAD records first, then their products
    Words<4> a[BP_NM_AHEAD][2];
    unsigned e[BP_NM_AHEAD];
#pragma unroll
    for (int u = 0; u < BP_NM_AHEAD; ++u) {
      const int kp = kp0 + u * WK;
      if (kp < pairs_per_row) {
        const unsigned char* r = base + (long long)kp * BP_NM_RECORD_BYTES;
        a[u][0] = ld_words<4>(r + lane * 16);
        a[u][1] = ld_words<4>(r + 512 + lane * 16);
        e[u] = ld_u32(r + 1024 + lane * 4);
      }
    }
#pragma unroll
    for (int u = 0; u < BP_NM_AHEAD; ++u) {
      const int kp = kp0 + u * WK;
      if (kp < pairs_per_row) {
        const int kt0 = 2 * kp;
        unsigned b[NT][4];
        load_b<NT>(b, x, kt0 * BP_NM_TILE_COLS, t, n, batch, cols, pairs, (kt0 + 1) * BP_NM_TILE_COLS > cols);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_sp_16832<T, 0>(acc[nt], a[u][0], b[nt], e[u]);
        if (kt0 + 1 < ktiles) {  // a row of an odd number of k-tiles ends in a half-empty pair
          load_b<NT>(b, x, (kt0 + 1) * BP_NM_TILE_COLS, t, n, batch, cols, pairs,
                     (kt0 + 2) * BP_NM_TILE_COLS > cols);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_sp_16832<T, 1>(acc[nt], a[u][1], b[nt], e[u]);
        }
      }
    }
  }

  // D fragment: lane (g, t) holds rows g (d0, d1) and g + 8 (d2, d3), columns 2t, 2t + 1
  constexpr int NC = 8 * NT;
  float* mine = red + w * 16 * NC;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mine[g * NC + nt * 8 + 2 * t] = acc[nt][0];
    mine[g * NC + nt * 8 + 2 * t + 1] = acc[nt][1];
    mine[(g + 8) * NC + nt * 8 + 2 * t] = acc[nt][2];
    mine[(g + 8) * NC + nt * 8 + 2 * t + 1] = acc[nt][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * NC; i += blockDim.x) {
    const int r = i / NC, c = i - r * NC;
    const long long row = (long long)rt * BP_NM_TILE_ROWS + r;
    if (row < rows && n0 + c < batch) {
      float s = 0.0f;
      for (int v = 0; v < WK; ++v) s += red[v * 16 * NC + i];
      Val<T>::store(y + row * batch + n0 + c, epilogue(s, bias, act, row));
    }
  }
}

}  // namespace bp
