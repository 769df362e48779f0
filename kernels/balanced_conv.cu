// balanced_conv.cu: direct convolution with a balanced-sparse weight, batch 1..8 (NCHW).
//
// Why not im2col + SpMM: at batch 1 a conv's "batch" is H*W pixels (50176 for VGG's first layers),
// far outside what the SpMV kernels are built for, and the explicit [C_in*kh*kw, H*W] operand is
// 9x the activation bytes. Here each CTA stages an input tile once in shared memory (fp32) and every
// warp walks the kept taps of one output channel against it: a tap (value, input channel, dy, dx) is
// warp-uniform, each lane owns one output column of the tile and PY output rows, so one tap costs a
// lane PY shared-memory loads (a warp's 32 lanes read 32 consecutive words: no bank conflict at
// stride 1) and PY FMAs, and the index arithmetic is paid once per tap, not per pixel. A warp loads
// its taps 32 at a time, one per lane, and broadcasts each by __shfl_sync: the walk waits for one
// global load per 32 taps (a load per tap made both kernels latency-bound: kernels/NOTES.md v23).
//
// Layout (formats.layouts.conv_taps; its CPU model conv_taps_reference is what the CPU tests hold
// it to): the kept weights of output channel o, in column order of the [C_out, C_in*kh*kw] view
// (which is (c, dy, dx) order, so sorted by input channel), as
//   tap_w[t]   float32 value,
//   tap_pos[t] int32 (c << 8) | (dy << 4) | dx          (kh, kw <= 16, c < 2^23),
//   chunk_start[o * (nchunks + 1) + j]: the first tap of channel o whose c >= j * CC (the last entry
//   is the end of o's taps), so chunk j's taps of o are [chunk_start[.. j], chunk_start[.. j + 1]).
//
// Launch: grid (ceil(OW / 32) * ceil(OH / (PY * WR)), ceil(Cout / CO), batch); block 32 x WR x CO
// threads (warp (r, g) = rows r*PY .. r*PY+PY-1 of the tile, output channel blockIdx.y*CO + g);
// dynamic shared memory CC * TIH * TIW floats, TIH = (PY*WR - 1) * stride + kh, TIW = 31 * stride + kw.
// Epilogue: + bias[o] (fp32, optional), ReLU if relu, rounded to T once.
#include "bp_common.cuh"

namespace bp {

constexpr int kConvTileCols = 32;  // output columns per tile: one per lane
constexpr int kConvPosShift = 8;   // tap_pos: c << 8 | dy << 4 | dx

// One lane's share of a warp's batch of 32 taps: tap tt (when tt < t_end; else a zero weight at offset 0,
// never walked) as its value and its shared-memory offset in a staged input of `rows` x `cols` words per
// channel, channels from c0: ((c - c0) * rows + dy) * cols + dx. Both kernels walk the batch by __shfl_sync.
__device__ __forceinline__ void load_tap(const float* __restrict__ tap_w, const int* __restrict__ tap_pos, int tt,
                                         int t_end, int c0, int rows, int cols, float& w, int& off) {
  w = 0.0f;
  off = 0;
  if (tt < t_end) {
    w = __ldg(tap_w + tt);
    const int pos = __ldg(tap_pos + tt);
    off = (((pos >> kConvPosShift) - c0) * rows + ((pos >> 4) & 15)) * cols + (pos & 15);
  }
}

// Stage input channels c0 .. c0 + chans - 1 as fp32 into xs: `rows` x `cols` words per channel, word
// (cl * rows + r) * cols + q = input row iy0 + r, column ix0 + q of channel c0 + cl (0 outside the image:
// the padding). The work is cut into rows, not words: a row's columns are contiguous in x and in xs, so a
// row costs its (channel, row) bookkeeping once (carried from the thread's previous row by adds, no
// division) and each word a bounds test, a load and a store. Lanes take a row in groups of
// span = min(cols, 32), 32 / span rows per warp at a time; SU rows per thread are loaded before their
// stores (SU loads in flight). The first version divided every word's index twice (~70 instructions a
// word): instruction-bound, 20-35 us on ResNet's layers whatever their taps (kernels/NOTES.md v24).
template <typename T>
__device__ __forceinline__ void stage_input(float* __restrict__ xs, int chans, int rows, int cols, int tid,
                                            int nthreads, const T* __restrict__ xb, int c0, int H, int W, int iy0,
                                            int ix0) {
  constexpr int SU = 4;
  const int lane = tid & 31;
  const int span = cols < 32 ? cols : 32;
  const int per = 32 / span;  // rows a warp stages at once
  const int sub = lane / span;
  if (sub >= per) return;  // the lanes past the last whole group of span
  const int q0 = lane - sub * span;
  const int G = (nthreads >> 5) * per;  // rows staged at once by the CTA
  const int total = chans * rows;
  const int step_c = G / rows, step_r = G - step_c * rows;
  int rr = (tid >> 5) * per + sub;
  int cl = rr / rows, r = rr - cl * rows;
  while (rr < total) {
    int src[SU];  // within one image: C * H * W < 2^31 (runtime.conv checks the shapes)
    int dst[SU];  // -1: past the last row
    unsigned in_rows = 0u;  // bit j: row j lies inside the image
#pragma unroll
    for (int j = 0; j < SU; ++j) {
      const int iy = iy0 + r;
      if (rr < total && iy >= 0 && iy < H) in_rows |= 1u << j;
      src[j] = ((c0 + cl) * H + iy) * W + ix0;
      dst[j] = rr < total ? rr * cols : -1;
      rr += G;
      r += step_r;
      cl += step_c;
      if (r >= rows) {
        r -= rows;
        ++cl;
      }
    }
    for (int q = q0; q < cols; q += span) {
      const bool in_cols = ix0 + q >= 0 && ix0 + q < W;
      float v[SU];
#pragma unroll
      for (int j = 0; j < SU; ++j) v[j] = ((in_rows >> j & 1u) && in_cols) ? Val<T>::ldg(xb + src[j] + q) : 0.0f;
#pragma unroll
      for (int j = 0; j < SU; ++j)
        if (dst[j] >= 0) xs[dst[j] + q] = v[j];
    }
  }
}

template <typename T, int PY>
__global__ void __launch_bounds__(512) balanced_conv2d(
    const T* __restrict__ x, int C, int H, int W, long long x_batch_stride,
    const float* __restrict__ tap_w, const int* __restrict__ tap_pos, const int* __restrict__ chunk_start,
    int Cout, int kh, int kw, int stride, int pad, int OH, int OW, int CC, int nchunks,
    const float* __restrict__ bias, int relu, T* __restrict__ y, long long y_batch_stride) {
  extern __shared__ float xs[];
  const int lane = threadIdx.x;
  const int WR = blockDim.y;  // warps per channel along rows
  const int tile_rows = PY * WR;
  const int tiles_x = (OW + kConvTileCols - 1) / kConvTileCols;
  const int oy0 = (blockIdx.x / tiles_x) * tile_rows;
  const int ox0 = (blockIdx.x % tiles_x) * kConvTileCols;
  const int o = blockIdx.y * blockDim.z + threadIdx.z;
  const int TIH = (tile_rows - 1) * stride + kh;
  const int TIW = (kConvTileCols - 1) * stride + kw;
  const int iy0 = oy0 * stride - pad, ix0 = ox0 * stride - pad;  // the tile's input origin
  const T* xb = x + (long long)blockIdx.z * x_batch_stride;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + lane;

  float acc[PY];
#pragma unroll
  for (int p = 0; p < PY; ++p) acc[p] = 0.0f;

  // this lane's first input word inside a channel's tile: row threadIdx.y*PY*stride, column lane*stride
  const int lane_base = threadIdx.y * PY * stride * TIW + lane * stride;
  const int row_step = stride * TIW;
  const int* my_chunks = chunk_start + (long long)(o < Cout ? o : 0) * (nchunks + 1);

  for (int j = 0; j < nchunks; ++j) {
    const int c0 = j * CC;
    const int cc = min(CC, C - c0);
    // Also the barrier after the previous chunk's reads; a chunk none of the CTA's channels has a tap
    // in (common at high sparsity with few channels per CTA) is not staged at all.
    const bool mine = o < Cout && my_chunks[j + 1] > my_chunks[j];
    if (!__syncthreads_or(mine)) continue;
    stage_input(xs, cc, TIH, TIW, tid, nthreads, xb, c0, H, W, iy0, ix0);
    __syncthreads();
    if (o < Cout) {  // warp-uniform: a warp is one output channel
      const int t_end = my_chunks[j + 1];
      for (int tb = my_chunks[j]; tb < t_end; tb += 32) {
        // 32 taps at once, one per lane (coalesced), each turned into its shared-memory offset; the
        // warp then walks them from registers: one load latency per 32 taps, not one per tap
        float wl;
        int offl;
        load_tap(tap_w, tap_pos, tb + lane, t_end, c0, TIH, TIW, wl, offl);
        const int nb = min(32, t_end - tb);
        for (int u = 0; u < nb; ++u) {
          const float w = __shfl_sync(0xffffffffu, wl, u);
          const float* s = xs + __shfl_sync(0xffffffffu, offl, u) + lane_base;
#pragma unroll
          for (int p = 0; p < PY; ++p) acc[p] = fmaf(w, s[p * row_step], acc[p]);
        }
      }
    }
  }
  if (o >= Cout) return;
  const int ox = ox0 + lane;
  if (ox >= OW) return;
  const float b = bias != nullptr ? bias[o] : 0.0f;
  T* yo = y + (long long)blockIdx.z * y_batch_stride + (long long)o * OH * OW;
#pragma unroll
  for (int p = 0; p < PY; ++p) {
    const int oy = oy0 + threadIdx.y * PY + p;
    if (oy < OH) {
      float v = acc[p] + b;
      if (relu) v = fmaxf(v, 0.0f);
      Val<T>::store(yo + (long long)oy * OW + ox, v);
    }
  }
}

// ---- small maps: balanced_conv2d_map ------------------------------------------------------------
// Why a second kernel: on 7x7-14x14 maps (ResNet stages 3-4, VGG's last block) the tiled kernel above
// has one tile per map, so 25-80% of its lanes own no output column, and every CTA re-stages ALL input
// channels for its few output channels: the same input is read C_out / CO times (measured 10-300x
// slower than cuDNN, kernels/NOTES.md v17). Here a CTA owns a run of PIX output pixels (the whole map
// when it has <= PIX of them) of CO output channels and ONE slice of CS input channels: it stages
// that slice once (the input rows its pixels need, zero-padded, fp32), each warp walks the kept taps
// of its output channel that fall in the slice (chunk_start with chunk = slice), each lane owns the
// pixels lane, lane + 32, ... of the run (NP = PIX / 32 accumulators; a tap costs a lane NP shared
// loads and NP FMAs), and the slices' partial sums meet in fp32 by atomicAdd (S > 1) or go straight
// through the epilogue (S == 1).
//
// Launch: grid (pixel runs * channel groups, S slices, batch), block (32, CO); dynamic shared memory
// CS * TR * PW floats: PW = (OW - 1) * stride + kw padded input columns, TR = the padded input rows of
// the run's output rows. part: fp32 [batch, Cout, OH*OW] zeroed before the launch (S > 1; then
// conv_epilogue turns it into y), unused when S == 1.
template <typename T, int NP>
__global__ void __launch_bounds__(512) balanced_conv2d_map(
    const T* __restrict__ x, int C, int H, int W, long long x_batch_stride,
    const float* __restrict__ tap_w, const int* __restrict__ tap_pos, const int* __restrict__ chunk_start,
    int Cout, int kh, int kw, int stride, int pad, int OH, int OW, int CS, int nslices, int runs,
    const float* __restrict__ bias, int relu, T* __restrict__ y, float* __restrict__ part) {
  extern __shared__ float xs[];
  constexpr int PIX = 32 * NP;
  const int lane = threadIdx.x;
  const int run = blockIdx.x % runs;
  const int o = (blockIdx.x / runs) * blockDim.y + threadIdx.y;
  const int slice = blockIdx.y;
  const int c0 = slice * CS;
  const int cs = min(CS, C - c0);
  const int P = OH * OW;
  const int p0 = run * PIX;
  const int p1 = min(P, p0 + PIX);
  const int PW = (OW - 1) * stride + kw;
  const int row0 = (p0 / OW) * stride;                    // first staged row, padded coordinates
  const int TR = ((p1 - 1) / OW - p0 / OW) * stride + kh;  // staged rows
  const T* xb = x + (long long)blockIdx.z * x_batch_stride;
  const int nthreads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + lane;

  stage_input(xs, cs, TR, PW, tid, nthreads, xb, c0, H, W, row0 - pad, -pad);
  __syncthreads();
  if (o >= Cout) return;

  int base[NP];
  float acc[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = min(p0 + lane + 32 * j, p1 - 1);  // lanes past the run repeat its last pixel (not stored)
    const int oy = p / OW, ox = p - (p / OW) * OW;
    base[j] = (oy * stride - row0) * PW + ox * stride;
    acc[j] = 0.0f;
  }
  const int* my = chunk_start + (long long)o * (nslices + 1);
  const int t_end = my[slice + 1];
  for (int tb = my[slice]; tb < t_end; tb += 32) {
    // 32 taps at once, one per lane, as shared-memory offsets; walked from registers (see the tiled kernel)
    float wl;
    int offl;
    load_tap(tap_w, tap_pos, tb + lane, t_end, c0, TR, PW, wl, offl);
    const int nb = min(32, t_end - tb);
    for (int u = 0; u < nb; ++u) {
      const float w = __shfl_sync(0xffffffffu, wl, u);
      const int off = __shfl_sync(0xffffffffu, offl, u);
#pragma unroll
      for (int j = 0; j < NP; ++j) acc[j] = fmaf(w, xs[off + base[j]], acc[j]);
    }
  }
  const long long plane = ((long long)blockIdx.z * Cout + o) * P;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = p0 + lane + 32 * j;
    if (p < p1) {
      if (nslices > 1) {
        atomicAdd(part + plane + p, acc[j]);
      } else {
        float v = acc[j] + (bias != nullptr ? bias[o] : 0.0f);
        if (relu) v = fmaxf(v, 0.0f);
        Val<T>::store(y + plane + p, v);
      }
    }
  }
}

// ---- no staging: balanced_conv2d_gather ---------------------------------------------------------
// Why a third kernel: at 90% sparsity a CTA of the map kernel reuses each staged input word ~1.6 times
// (16 output channels x 10% of the taps), so staging was most of its work (kernels/NOTES.md v24). Here
// nothing is staged: a CTA owns ONE output channel o and a run of 32 * NP output pixels; its WG warps
// split o's kept taps (warp g takes the batches of 32 taps g, g + WG, ...: one coalesced load per lane
// per batch, walked by __shfl_sync as in the other kernels); per tap a lane reads the input values of
// its NP pixels straight from global memory (a layer's input at batch 1 is 0.1-1.6 MB: L1 and L2 serve
// it), skipping taps that fall in the padding. The WG partial sums meet in shared memory and warp 0 adds
// bias, applies ReLU and stores y once: one launch, no atomics, no partial-sum buffer.
//
// Launch: grid (runs, Cout, batch), block (32, WG <= kGatherMaxWarps); chunk_start is the layout with
// one chunk (all of a channel's taps: chunk_start[o * 2], chunk_start[o * 2 + 1]).
constexpr int kGatherMaxWarps = 8;

template <typename T, int NP>
__global__ void __launch_bounds__(32 * kGatherMaxWarps, 4) balanced_conv2d_gather(
    const T* __restrict__ x, int C, int H, int W, long long x_batch_stride,
    const float* __restrict__ tap_w, const int* __restrict__ tap_pos, const int* __restrict__ chunk_start,
    int Cout, int kh, int kw, int stride, int pad, int OH, int OW, const float* __restrict__ bias, int relu,
    T* __restrict__ y) {
  __shared__ float red[kGatherMaxWarps * NP * 32];
  const int lane = threadIdx.x, g = threadIdx.y, WG = blockDim.y;
  const int o = blockIdx.y;
  const int P = OH * OW;
  const int p0 = blockIdx.x * 32 * NP;
  const T* xb = x + (long long)blockIdx.z * x_batch_stride;
  // per pixel: the input row and column of its (dy, dx) = (0, 0) tap; a lane past the map gets a row no
  // tap can bring inside the image, so it reads nothing
  int iyb[NP], ixb[NP], pb[NP];  // pb: the offset of that input value in its channel plane
  float acc[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = p0 + lane + 32 * j;
    const int oy = p / OW;
    iyb[j] = p < P ? oy * stride - pad : -(1 << 20);
    ixb[j] = (p - oy * OW) * stride - pad;
    pb[j] = p < P ? iyb[j] * W + ixb[j] : 0;
    acc[j] = 0.0f;
  }
  const int t_end = chunk_start[2 * o + 1];
  for (int tb = chunk_start[2 * o] + 32 * g; tb < t_end; tb += 32 * WG) {
    float wl = 0.0f;
    int offl = 0, dyxl = 0;  // the tap's offset c * H * W + dy * W + dx, and dy << 8 | dx
    if (tb + lane < t_end) {
      wl = __ldg(tap_w + tb + lane);
      const int pos = __ldg(tap_pos + tb + lane);
      const int dy = (pos >> 4) & 15, dx = pos & 15;
      offl = ((pos >> kConvPosShift) * H + dy) * W + dx;
      dyxl = dy << 8 | dx;
    }
    const int nb = min(32, t_end - tb);
#pragma unroll 4
    for (int u = 0; u < nb; ++u) {
      const float w = __shfl_sync(0xffffffffu, wl, u);
      const int off = __shfl_sync(0xffffffffu, offl, u);
      const int dyx = __shfl_sync(0xffffffffu, dyxl, u);
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int iy = iyb[j] + (dyx >> 8), ix = ixb[j] + (dyx & 255);
        if ((unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W)
          acc[j] = fmaf(w, Val<T>::ldg(xb + off + pb[j]), acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NP; ++j) red[(g * NP + j) * 32 + lane] = acc[j];
  __syncthreads();
  if (g != 0) return;
  const float b = bias != nullptr ? bias[o] : 0.0f;
  T* yo = y + ((long long)blockIdx.z * Cout + o) * P;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    float v = b;
    for (int k = 0; k < WG; ++k) v += red[(k * NP + j) * 32 + lane];
    if (relu) v = fmaxf(v, 0.0f);
    const int p = p0 + lane + 32 * j;
    if (p < P) Val<T>::store(yo + p, v);
  }
}

// y = act(part + bias) rounded to T once: the sliced map kernel's partial sums, [batch * Cout * P].
template <typename T>
__global__ void conv_epilogue(const float* __restrict__ part, long long n, int P, int Cout,
                              const float* __restrict__ bias, int relu, T* __restrict__ y) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float v = part[i] + (bias != nullptr ? bias[(i / P) % Cout] : 0.0f);
    if (relu) v = fmaxf(v, 0.0f);
    Val<T>::store(y + i, v);
  }
}

}  // namespace bp
