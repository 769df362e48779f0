// lstm_recurrence.cu: a whole LSTM layer's recurrence (every time step, one or two directions)
// in ONE persistent launch, with W_hh held in shared memory from the first step to the last.
//
// Why: a Bi-LSTM utterance run as per-step launches is 2 launches (W_hh h SpMV, cell) per step
// per direction per layer: at batch 1 each costs its launch and ramp (~2-4 us) while the work in
// it (a 4096 x 1024 matrix at 87.5% sparsity: 1.5 MB) is a fraction of that. Here each CTA owns
// a slice of hidden units u and the four gate rows (i, f, g, o) of each, loads those rows once,
// keeps its units' cell state c in shared memory, and per step: gathers h_{t-1} (written by
// every CTA of its direction in the step before) into shared memory, computes its gate rows,
// applies the cell and publishes h_t.
//
// Synchronisation without a grid barrier: h is published as tagged words, the value and the
// step it belongs to in ONE 32-bit (16-bit T) or 64-bit (float) store, so a reader that sees
// the expected tag has the value (single-copy atomicity; no fence, no counter). A CTA gathers
// h_{t-1} by polling the words until every tag is that step's: one L2 round trip after the last
// writer instead of a barrier's fence + atomic + release + poll (measured 4.7 us per step with
// a counter barrier). Two buffers (step parity): a CTA writes h_{s+1} into the buffer of h_{s-1}
// only after reading all of h_s, i.e. after every CTA wrote h_s, i.e. after every CTA finished
// reading h_{s-1}. Tags are 16 bits: (epoch * steps + s + 1) mod 2^16, epoch = launches done
// (ctl[1]), so a word left by an earlier launch (or graph replay) never matches; the last CTA
// to finish a launch advances the epoch (ctl[0] counts finished CTAs and returns to 0).
//
// bp::lstm_recurrence<T> (T: float, bp::f16, bp::bf16), one launch per layer:
//   desc   per direction d (8 x u64): slots [4H, nnz] Slot<T>::Word (each kept weight's value
//          and full column, block * L + in-block index, in one word: 16-bit T: bits | col << 16,
//          float: bits | col << 32; padding columns included with value 0), unused,
//          gx [4H, steps] T (W_ih x_t for every frame, row-major), bias [4H] fp32 or 0,
//          y (T*, element (u, t) at y[u * steps + t]), hbuf [2, H] tagged words (scratch),
//          ctl [2] u32 (direction 0's entry is used: finished-CTA count, epoch; zero before the
//          first launch), reverse (0: t = s, 1: t = steps - 1 - s).
//   H hidden units, steps frames, nnz kept weights per row (k * B), kpad = B * L (h staged as
//   fp32, zero beyond H), units per CTA, ctas per direction, lanes per row (1..32, power of 2).
// Grid: ctas * D CTAs (CTA b: direction b / ctas, units [(b % ctas) * units, ...)); they must
// all be resident at once (cooperative launch: a CTA waits for words other CTAs write).
// Dynamic shared memory: (kpad + 5 * units) * 4 rounded up to 8, + 4 * units * nnz * sizeof(Slot<T>::Word) bytes.
// h_0 = c_0 = 0 (the model's initial state), so step 0 has no recurrent term. Gates in torch's
// order (i, f, g, o); arithmetic fp32; h rounded to T once per step (as the per-step path stores it).
#include "lstm_common.cuh"

namespace bp {

// One kept weight in shared memory: its value and its full column in one word.
template <typename T>
struct Slot {  // f16, bf16
  using Word = unsigned;
  __device__ static __forceinline__ float value(Word w) { return from_bits16<T>(w); }
  __device__ static __forceinline__ unsigned col(Word w) { return w >> 16; }
};
template <>
struct Slot<float> {
  using Word = unsigned long long;
  __device__ static __forceinline__ float value(Word w) { return __uint_as_float((unsigned)w); }
  __device__ static __forceinline__ unsigned col(Word w) { return (unsigned)(w >> 32); }
};

// a[q] = gx[q*H + u, t] + bias[q*H + u] for the four gates of unit u.
template <typename T>
__device__ __forceinline__ void load_gate_inputs(float (&a)[4], const T* __restrict__ gx, const float* __restrict__ bias,
                                                 int H, int steps, int u, int t) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = q * H + u;
    a[q] = Val<T>::sload(gx + (long long)r * steps + t) + (bias != nullptr ? bias[r] : 0.0f);
  }
}

template <typename T>
__global__ void __launch_bounds__(512, 2) lstm_recurrence(const unsigned long long* __restrict__ desc, int H, int steps,
                                                        int nnz, int kpad, int units, int ctas, int lpr) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* hs = reinterpret_cast<float*>(smem);  // [kpad]
  float* gates = hs + kpad;                    // [4 * units]
  float* cst = gates + 4 * units;              // [units]
  using SWord = typename Slot<T>::Word;
  SWord* ws = reinterpret_cast<SWord*>(smem + (((size_t)kpad + 5 * units) * 4 + 7) / 8 * 8);  // [4 * units * nnz]

  const int d = blockIdx.x / ctas, cta = blockIdx.x % ctas;
  const unsigned long long* dd = desc + 8 * d;
  const SWord* __restrict__ slots = reinterpret_cast<const SWord*>(dd[0]);
  const T* __restrict__ gx = reinterpret_cast<const T*>(dd[2]);
  const float* __restrict__ bias = reinterpret_cast<const float*>(dd[3]);
  T* y = reinterpret_cast<T*>(dd[4]);
  using Word = typename Tag<T>::Word;
  Word* hbuf = reinterpret_cast<Word*>(dd[5]);
  unsigned* ctl = reinterpret_cast<unsigned*>(desc[6]);  // direction 0's: one for the launch
  const bool reverse = dd[7] != 0;

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int u0 = cta * units;
  const int nu = min(units, H - u0);  // >= 1: the runtime sizes ctas = ceil(H / units)
  const int R = 4 * units;

  // Load this CTA's gate rows (local row q * units + i is global row q * H + u0 + i); rows of
  // units past H are zero.
  for (long long e = tid; e < (long long)R * nnz; e += nthreads) {
    const int lr = (int)(e / nnz), s = (int)(e % nnz);
    const int q = lr / units, i = lr % units;
    if (i < nu) {
      const long long g = ((long long)q * H + u0 + i) * nnz + s;
      ws[e] = slots[g];
    } else {
      ws[e] = 0;
    }
  }
  for (int i = tid; i < kpad; i += nthreads) hs[i] = 0.0f;
  for (int i = tid; i < units; i += nthreads) cst[i] = 0.0f;
  // Written by the previous launch's last CTA, which finished before this launch began.
  const unsigned epoch = launch_epoch(ctl);
  const unsigned tag0 = epoch * (unsigned)steps + 1u;  // the tag of step s is (tag0 + s) & 0xffff

  // The input projection and bias of this thread's unit, loaded one step ahead.
  float a_in[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (tid < nu) load_gate_inputs(a_in, gx, bias, H, steps, u0 + tid, reverse ? steps - 1 : 0);
  __syncthreads();

  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int rpw = 32 / lpr, group = lane / lpr, sub = lane % lpr;
  for (int s = 0; s < steps; ++s) {
    const int t = reverse ? steps - 1 - s : s;
    if (s > 0) {
      // Gather h_{s-1}: poll the words until every one carries step s-1's tag.
      gather_tagged<T>(hbuf + (size_t)((s - 1) & 1) * H, H, (tag0 + (unsigned)(s - 1)) & 0xffffu,
                       [&](int i, float v) { hs[i] = v; });
      // Gate rows: lpr lanes per row, rpw rows per warp at a time; every lane runs the same
      // number of passes (shuffles stay converged).
      for (int base = warp * rpw; base < R; base += nwarps * rpw) {
        const int lr = base + group;
        float acc = 0.0f;
        if (lr < R) {
          const SWord* rs = ws + (size_t)lr * nnz;
#pragma unroll 4
          for (int e = sub; e < nnz; e += lpr) {
            const SWord w = rs[e];  // one shared load: value and column
            acc = fmaf(Slot<T>::value(w), hs[Slot<T>::col(w)], acc);
          }
        }
        for (int o = lpr >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (sub == 0 && lr < R) gates[lr] = acc;
      }
      __syncthreads();
    }
    if (tid < nu) {
      float a[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) a[q] = a_in[q] + (s > 0 ? gates[q * units + tid] : 0.0f);
      const float cn = sigmoid_rec(a[1]) * cst[tid] + sigmoid_rec(a[0]) * tanhf(a[2]);
      const float hn = sigmoid_rec(a[3]) * tanhf(cn);
      cst[tid] = cn;
      const int u = u0 + tid;
      Val<T>::store(y + (long long)u * steps + t, hn);
      Tag<T>::store(hbuf + (size_t)(s & 1) * H + u, Tag<T>::pack(hn, (tag0 + (unsigned)s) & 0xffffu));
    }
    // Independent of h: in flight while the next step's h is gathered.
    if (s + 1 < steps && tid < nu) load_gate_inputs(a_in, gx, bias, H, steps, u0 + tid, reverse ? t - 1 : t + 1);
  }
  end_launch(ctl, epoch);
}

}  // namespace bp
