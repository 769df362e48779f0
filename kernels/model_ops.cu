// model_ops.cu: the small element-wise kernels of the end-to-end model runtime (balprune.runtime.model).
//
// The matrix products of a model run on balanced_spmv.cu (or dense cuBLAS/cuDNN, whichever the
// dispatcher measured faster); these kernels do everything between them, each fused so that a
// model step is as few launches as possible (at batch 1 a launch costs about as much as moving a
// few MB, so launches, not FLOPs, set the floor of small layers).
//
// Every kernel is a template over the storage type T (float, bp::f16, bp::bf16; see
// bp_common.cuh), instantiated by name. Arithmetic is fp32; results are rounded to T once.
// Launch: 1-D grid of 1-D blocks covering the n outputs (any block size); no shared memory.
#include "bp_common.cuh"

namespace bp {

__device__ __forceinline__ float sigmoidf_(float v) { return 1.0f / (1.0f + __expf(-v)); }

// One LSTM cell step for one direction of one layer (torch's gate order i, f, g, o):
//   a_q = gx[(q*H + j) * gx_stride] + gh[q*H + j] + bias[q*H + j]     (q = 0..3; gh, bias optional)
//   c_j = sigmoid(a_f) * c_j + sigmoid(a_i) * tanh(a_g);  h_j = sigmoid(a_o) * tanh(c_j)
// gx: the input projection W_ih x (+ W_hh h when both were fused into one matrix), a column of a
// [4H, gx_stride] row-major array (gx_stride = 1 for one vector; the frame count when W_ih was
// applied to every frame of an utterance at once). gh: W_hh h as its own [4H] vector, or null
// when it is already in gx. bias: b_ih + b_hh in fp32, or null. c: the fp32 cell state, updated
// in place. h: written to h_out[j] and, when h_out2 is not null, to h_out2[j * h2_stride] (the
// next layer's input, or column t of an utterance's [2H, frames] output).
template <typename T>
__global__ void lstm_cell(const T* __restrict__ gx, long long gx_stride, const T* __restrict__ gh,
                          const float* __restrict__ bias, float* __restrict__ c, T* __restrict__ h_out,
                          T* __restrict__ h_out2, long long h2_stride, int H) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= H) return;
  float a[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = q * H + j;
    float v = Val<T>::sload(gx + (long long)r * gx_stride);
    if (gh != nullptr) v += Val<T>::sload(gh + r);
    if (bias != nullptr) v += bias[r];
    a[q] = v;
  }
  const float cn = sigmoidf_(a[1]) * c[j] + sigmoidf_(a[0]) * tanhf(a[2]);
  const float hn = sigmoidf_(a[3]) * tanhf(cn);
  c[j] = cn;
  Val<T>::store(h_out + j, hn);
  if (h_out2 != nullptr) Val<T>::store(h_out2 + (long long)j * h2_stride, hn);
}

// out[j] = table[token[0] * dim + j]: an embedding lookup whose token id lives in device memory,
// so a captured CUDA graph can be replayed for any token. Ids outside [0, vocab) give zeros (a
// raw out-of-range read would return another allocation's bytes).
template <typename T>
__global__ void embedding_row(const long long* __restrict__ token, const T* __restrict__ table, long long vocab,
                              int dim, T* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  const long long t = token[0];
  out[j] = (t >= 0 && t < vocab) ? table[t * dim + j] : T{};
}

// out[c, oy, ox] = max over the 2x2 window at (2*oy, 2*ox) of relu(y[c, ., .] + bias[c]): a
// conv's bias, ReLU and the 2x2/stride-2 max-pool after it, in one pass. y is [C, H, W], out
// [C, H/2, W/2] (floor, as torch's max_pool2d). n = C * (H/2) * (W/2) outputs.
template <typename T>
__global__ void bias_relu_pool2(const T* __restrict__ y, const float* __restrict__ bias, int C, int H, int W,
                                T* __restrict__ out) {
  const int OH = H / 2, OW = W / 2;
  const long long n = (long long)C * OH * OW;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int ox = (int)(i % OW);
  const int oy = (int)((i / OW) % OH);
  const int c = (int)(i / ((long long)OW * OH));
  const T* p = y + ((long long)c * H + 2 * oy) * W + 2 * ox;
  float m = fmaxf(fmaxf(Val<T>::sload(p), Val<T>::sload(p + 1)), fmaxf(Val<T>::sload(p + W), Val<T>::sload(p + W + 1)));
  if (bias != nullptr) m += bias[c];  // max commutes with adding the channel's constant bias
  Val<T>::store(out + i, fmaxf(m, 0.0f));
}

// Implicit-im2col's explicit form for a conv (dilation 1, zero padding pad, any stride):
// cols[(c*kh*kw + dy*kw + dx), (oy*OW + ox)] = x[c, oy*stride + dy - pad, ox*stride + dx - pad] (0 outside),
// the [C*kh*kw, OH*OW] operand whose row order matches the weight's [C_out, C_in*kh*kw] view, so
// y [C_out, OH*OW] = W cols is the conv. x is [C, H, W]; n = C*kh*kw*OH*OW outputs.
template <typename T>
__global__ void im2col(const T* __restrict__ x, int C, int H, int W, int kh, int kw, int pad, int stride, int OH,
                       int OW, T* __restrict__ cols) {
  const long long P = (long long)OH * OW;
  const long long n = (long long)C * kh * kw * P;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long p = i % P;
  const long long r = i / P;
  const int dx = (int)(r % kw), dy = (int)((r / kw) % kh), c = (int)(r / ((long long)kw * kh));
  const int oy = (int)(p / OW), ox = (int)(p % OW);
  const int iy = oy * stride + dy - pad, ix = ox * stride + dx - pad;
  cols[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((long long)c * H + iy) * W + ix] : T{};
}

// A residual block's end, in place: y = act(y + r) (ResNet: the block's last conv, bias already added,
// plus the block's identity, then ReLU), one rounding to T. n outputs.
template <typename T>
__global__ void add_relu(T* __restrict__ y, const T* __restrict__ r, long long n, int relu) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = Val<T>::sload(y + i) + Val<T>::sload(r + i);
  if (relu) v = fmaxf(v, 0.0f);
  Val<T>::store(y + i, v);
}

}  // namespace bp
