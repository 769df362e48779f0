// lstm_lm_step.cu: one token step of the LSTM language model (embedding lookup, every LSTM
// layer with W_ih | W_hh fused, the decoder) in ONE persistent launch.
//
// Why: run as separate launches the step is embedding + (SpMV + cell) per layer + decoder, six
// launches whose matrices (about 11, 11 and 9 MB at 80%, fp16) sit in L2: each launch spends
// more on its start, its ramp and its drain than on its bytes (kernels/NOTES.md v5-v7). Here the
// step is a sequence of phases, one per matrix; every CTA owns a slice of each phase's rows and
// at the start of the launch asks the copy engine for its slices of the first phases' weights
// (cp.async.bulk into shared memory, a ring of `regions` buffers), so the weights stream in
// while the CTA waits for its phase's input vector. Phases hand h to each other as tagged words
// (lstm_common.cuh): a CTA polls the previous phase's h until every word carries this launch's
// tag, with no grid barrier.
//
// bp::lstm_lm_step<T, I> (T: float, bp::f16, bp::bf16; I: in-block index, u8 or u16).
// recs: `phases` records of kFields u64 in global memory (fields below), phases <= kMaxPhases;
// every CTA copies them into shared memory in its first memory round trip (read from the
// constant bank instead, each phase's first reads were a chain of constant-cache misses:
// ~2 us before phase 0 could start, measured). A phase multiplies a balanced matrix [rows, B*L] by x = [A | 0 | own h of the previous launch at
// offB..offB+H) (LSTM) or x = [A | 0] (linear). Per row the kept weights are stored block-major,
// [B, k2]: slot t of block j at j*k2 + t, k2 = k rounded up to even (a padding slot has value 0
// and index 0), so a lane reads two slots of its block with one shared load per array.
// Weights: chunks [phases, grid + 1] u64 addresses; CTA c's chunk of phase p is
//             [chunks[p][c], chunks[p][c+1]) (16-aligned): the values [n_c, B*k2] T, padded to
//             16 bytes, then the indices [n_c, B*k2] I, padded to 16
//   kKind     0: LSTM gates (rows = 4H; CTA c owns units u0 = c*U .. u0+n-1, U = ceil(H / grid),
//             local row q*n + i = global row q*H + u0 + i); 1: linear (rows r0 = c*RD .., RD =
//             ceil(rows / grid), local row i = global row r0 + i)
//   kRows, kUnits (H; LSTM), kBlocks (B), kLength (L), kKeep (k2, even)
//   kSrcKind  A's source: 0 embedding row (kSrc: table [vocab, lenA] T; the id at `token`,
//             kVocab), 1 the previous layer's h (kSrc: its column in hstate)
//   kSrc, kSrcLen (lenA), kVocab
//   kOffB     LSTM: the column where this layer's own h starts
//   kOut      linear: the output [rows] T
//   kHOff     LSTM: this layer's column in hstate (and in the CTA's shared `hprev` [hcap])
//   kPreOff   where this phase's per-CTA values sit in `pre` [precap]: LSTM [5, U] (the four
//             gate biases, then c), linear [RD] (bias)
// hstate: every LSTM layer's tagged h words, [2, hcap] (layer at column kHOff; written: half
// `epoch & 1`; read as the previous step's h: the other half). pre_g: [grid, precap] fp32, CTA
// c's `pre` (biases set by the host; c of each unit read and written by its owning CTA only).
// token: int64 id of the embedding row (null when phase 0 reads no embedding).
// ctl: [2] u32 launch control (lstm_common.cuh). xcap: the largest B*L; ucap: the largest U;
// region_bytes: the largest chunk (128-aligned); regions: 1 or 2 (ring of weight buffers); lpr:
// lanes per row (power of 2, <= 32). Grid: 1-D, every CTA resident (cooperative launch).
// x is staged as fp32 block-interleaved in rows of 64 floats, column j*L + i at xs[i*64 + j]
// (B <= 64): lane j of a warp reads bank j whatever its index, instead of bank conflicts that
// depend on the indices (they made the arithmetic 3x slower than its instruction count,
// measured), and the byte offset of a kept weight's x, index*256 + 4*j, is ONE byte permute of
// the stored index and 4*j (kernels/NOTES.md v13: the offset took an extract, a multiply and a
// shift per weight; the arithmetic was 6.4 of the step's 19.9 us). xrows: the largest L.
// x in column order (xl: the embedding row, the previous layer's h) sits in the unused upper
// halves of those rows when every B <= 32 (xl_inline 1: column col at xs[(col / 32) * 64 + 32 +
// col % 32]), else after them ([xcap], xcap: the largest B*L).
// hcap: the sum of the LSTM layers' H; precap: the sum of the phases' `pre` sizes. Dynamic shared
// memory: 16 + 16 * kMaxPhases + 8 * kMaxPhases * kFields + 4 * (64 * xrows + (xl_inline ? 0 :
// xcap) + 4 * ucap + hcap + precap) rounded up to 128, + regions * region_bytes.
// Everything a phase reads from global memory besides its input h (the previous step's h, the
// embedding row, biases, c) is loaded at the start, in two round trips (records, chunk
// addresses, epoch, token, pre; then the h words, whose half depends on the epoch, and the
// embedding row, which depends on the token) that overlap the first weight copy, so no phase
// waits on it (measured: loaded per phase, the cell and the decoder's stores each waited an L2
// round trip; located through the records, the start took ~3 us instead of two round trips).
// A token id outside [0, vocab) gives a zero embedding row (the runtime checks ids on the host).
#include "lstm_common.cuh"

// Diagnostics for timing experiments only (results are wrong): -DBP_LM_DIAG=1 no matrix
// arithmetic (copies and hand-offs only); =2 no weight copies (arithmetic on whatever shared
// memory holds); =3 neither. Bit 4 (timeline, results stay right): thread 0 of every CTA writes
// %globaltimer at fixed points into bp_lm_stamps[cta][kStamps] (benchmarks/diag_lm_step.py).
#ifndef BP_LM_DIAG
#define BP_LM_DIAG 0
#endif
#if BP_LM_DIAG & 4
__device__ unsigned long long bp_lm_stamps[1024 * 32];
// clock64 at point e (cheap, this SM's clock); BP_GSTAMP: %globaltimer (common to all SMs, coarse),
// taken at the start (slot 31) and the end (slot 30) to place each CTA's clock on one time axis.
#define BP_STAMP(e)                                                                               \
  do {                                                                                            \
    if (threadIdx.x == 0 && (e) < 29) bp_lm_stamps[blockIdx.x * 32 + (e)] = clock64();            \
  } while (0)
#define BP_GSTAMP(e)                                                                              \
  do {                                                                                            \
    if (threadIdx.x == 0) {                                                                       \
      unsigned long long t_;                                                                      \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                      \
      bp_lm_stamps[blockIdx.x * 32 + (e)] = t_;                                                   \
    }                                                                                             \
  } while (0)
#else
#define BP_STAMP(e) \
  do {              \
  } while (0)
#define BP_GSTAMP(e) \
  do {               \
  } while (0)
#endif

namespace bp {

enum LmField : int {
  kKind = 0, kRows, kUnits, kBlocks, kLength, kKeep, kSrcKind, kSrc, kSrcLen, kVocab, kOffB, kOut, kHOff, kPreOff,
  kFields = 16  // even: a record is copied as 16-byte pieces
};
constexpr int kMaxPhases = 16;

// Two consecutive values / indices of a row from shared memory (one load each).
template <typename T>
__device__ __forceinline__ void value_pair(const T* p, float& v0, float& v1);
template <>
__device__ __forceinline__ void value_pair<float>(const float* p, float& v0, float& v1) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  v0 = v.x;
  v1 = v.y;
}
template <>
__device__ __forceinline__ void value_pair<f16>(const f16* p, float& v0, float& v1) {
  const unsigned w = *reinterpret_cast<const unsigned*>(p);
  v0 = half_bits_to_float(w & 0xffffu);
  v1 = half_bits_to_float(w >> 16);
}
template <>
__device__ __forceinline__ void value_pair<bf16>(const bf16* p, float& v0, float& v1) {
  const unsigned w = *reinterpret_cast<const unsigned*>(p);
  v0 = __uint_as_float(w << 16);
  v1 = __uint_as_float(w & 0xffff0000u);
}
// The byte offsets in xs of two consecutive kept weights' x: index * 256 + jb (jb = 4 * block <
// 256), each one byte permute of the loaded index pair and jb (bytes 4..7 of a permute are jb's).
template <typename I>
__device__ __forceinline__ void x_offsets(const I* p, unsigned jb, unsigned& o0, unsigned& o1);
template <>
__device__ __forceinline__ void x_offsets<unsigned char>(const unsigned char* p, unsigned jb, unsigned& o0,
                                                         unsigned& o1) {
  const unsigned w = *reinterpret_cast<const unsigned short*>(p);  // index 0 in byte 0, index 1 in byte 1
  o0 = __byte_perm(w, jb, 0x5504);                                 // [jb, index 0, 0, 0]
  o1 = __byte_perm(w, jb, 0x5514);                                 // [jb, index 1, 0, 0]
}
template <>
__device__ __forceinline__ void x_offsets<unsigned short>(const unsigned short* p, unsigned jb, unsigned& o0,
                                                          unsigned& o1) {
  const unsigned w = *reinterpret_cast<const unsigned*>(p);  // index 0 in bytes 0-1, index 1 in bytes 2-3
  o0 = __byte_perm(w, jb, 0x5104);                           // [jb, index 0 (2 bytes), 0]
  o1 = __byte_perm(w, jb, 0x5324);                           // [jb, index 1 (2 bytes), 0]
}

// One element's raw bits (zero-extended) and its value from those bits.
template <typename T>
__device__ __forceinline__ unsigned raw_bits(const T* p) {
  return sizeof(T) == 4 ? __ldcg(reinterpret_cast<const unsigned*>(p))
                        : (unsigned)__ldcg(reinterpret_cast<const unsigned short*>(p));
}
template <typename T>
__device__ __forceinline__ float bits_value(unsigned w) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w);
  } else {
    return from_bits16<T>(w);
  }
}
// Items [0, n) of the CTA: every thread issues the loads of kGather of its items (raw = load(i))
// before it stores any (store(i, raw)): one memory round trip per kGather * blockDim items, not
// one per item. after_issue() runs once per thread, after its first loads are issued.
template <int kGather, typename Load, typename Store, typename After>
__device__ __forceinline__ void gather_items(int n, Load load, Store store, After after_issue) {
  if (threadIdx.x >= n) after_issue();
  for (int base = threadIdx.x; base < n; base += kGather * blockDim.x) {
    unsigned long long raw[kGather];
#pragma unroll
    for (int m = 0; m < kGather; ++m) {
      const int i = base + m * blockDim.x;
      raw[m] = i < n ? load(i) : 0ull;
    }
    if (base == (int)threadIdx.x) after_issue();
#pragma unroll
    for (int m = 0; m < kGather; ++m) {
      const int i = base + m * blockDim.x;
      if (i < n) store(i, raw[m]);
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(1024, 1) lstm_lm_step(const unsigned long long* __restrict__ recs_g, int phases,
                                                     int regions, unsigned region_bytes, int xcap, int xrows,
                                                     int xl_inline, int ucap, int hcap,
                                                     int precap, unsigned* ctl, int lpr, const long long* token,
                                                     const unsigned long long* __restrict__ chunks, float* pre_g,
                                                     void* hstate, int copy_late) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* mbar = reinterpret_cast<unsigned long long*>(smem);  // [regions <= 2]
  unsigned long long* choff = mbar + 2;                                     // [2 * kMaxPhases] this CTA's chunks
  unsigned long long* recs = choff + 2 * kMaxPhases;                        // [kMaxPhases * kFields] records
  float* xs = reinterpret_cast<float*>(recs + kMaxPhases * kFields);        // [xrows, 64] (+ xl, see above)
  const size_t xfloats = 64 * (size_t)xrows + (xl_inline ? 0 : xcap);
  float* gates = xs + xfloats;       // [4 * ucap]
  float* hprev = gates + 4 * ucap;   // [hcap] every layer's h of the last step
  float* pre = hprev + hcap;         // [precap] biases, c
  unsigned char* ring =
      smem + ((16 + 16 * kMaxPhases + 8 * kMaxPhases * kFields + 4 * (xfloats + 4 * ucap + hcap + precap) + 127) /
              128) * 128;
  // x in column order: column col of xl.
  auto xl = [&](int col) -> float& {
    return xl_inline ? xs[((col >> 5) << 6) + 32 + (col & 31)] : xs[64 * (size_t)xrows + col];
  };

  using Word = typename Tag<T>::Word;
  // Prologue loads in flight per thread and round (measured, paper-sized LM, us per step, 8 / 4
  // / 2 loads): fp16 20.2 / 20.1 / 19.8 with the copy after the prologue (less unrolled code: at
  // the launch's start instruction fetches cost as much as the extra round trips), fp32 25.4 /
  // 25.3 / 26.4 with the copy during it (8 spills for fp32 with u8 indices).
  constexpr int kGather = sizeof(T) == 4 ? 4 : 2;
  Word* hs = reinterpret_cast<Word*>(hstate);
  const int G = gridDim.x, c = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  // The thread that asks for weight copies: in the last warp, so that warp 0 (which also runs
  // the cells of the CTA's units) never waits on it.
  const bool issuer = tid == nt - 1;
  BP_GSTAMP(31);
  BP_STAMP(0);

  // Ask for phase p's chunk [start, end) (addresses) in ring buffer p % regions (the issuer only).
  auto issue = [&](int p, unsigned long long start, unsigned long long end) {
    unsigned long long* bar = mbar + p % regions;
    if (end == start || (BP_LM_DIAG & 2)) {
      mbar_arrive(bar);
    } else {
      mbar_arrive_expect_tx(bar, (unsigned)(end - start));
      bulk_copy_g2s(ring + (size_t)(p % regions) * region_bytes, reinterpret_cast<const unsigned char*>(start),
                    (unsigned)(end - start), bar);
    }
  };
  if (issuer) {
    for (int r = 0; r < regions; ++r) mbar_init(mbar + r, 1);
    mbar_init_fence();
  }
  // Round trip 1 (all independent): the epoch, the token id, the records, every phase's chunk
  // addresses, this CTA's biases and cell state. Phase 0's weight copy is asked for once round
  // trip 2's loads are out (copy_late 0) or once the prologue is done (1): memory accesses made
  // while the copies of all CTAs stream take ~2 us instead of ~0.8 (measured), so issuing the
  // copy earlier slows the prologue; which order wins depends on the copy's size (the runtime
  // measures both).
  const unsigned epoch = launch_epoch(ctl);
  const long long tok = token != nullptr ? *token : 0;
  const int nrec = phases * (kFields / 2), nch = 2 * phases;
  const ulonglong2 rec = tid < nrec ? __ldcg(reinterpret_cast<const ulonglong2*>(recs_g) + tid) : ulonglong2{0, 0};
  gather_items<kGather>(
      nch + precap,  // items: the chunk addresses, then pre (the records are the 16-byte loads above)
      [&](int i) -> unsigned long long {
        if (i < nch) return chunks[(size_t)(i >> 1) * (G + 1) + c + (i & 1)];
        return __ldcg(reinterpret_cast<const unsigned*>(pre_g) + (size_t)c * precap + (i - nch));
      },
      [&](int i, unsigned long long raw) {
        if (i < nch) {
          choff[i] = raw;
        } else {
          pre[i - nch] = __uint_as_float((unsigned)raw);
        }
      },
      [] {});
  if (tid < nrec) {
    recs[2 * tid] = rec.x;
    recs[2 * tid + 1] = rec.y;
  }
  const unsigned tag = (epoch & 0x7fffu) + 1u;  // never 0: zeroed words (reset state) never match
  const size_t half = epoch & 1;
#if BP_LM_DIAG & 4
  asm volatile("" ::"r"(epoch));  // the stamp after the epoch has arrived
#endif
  BP_STAMP(25);
  __syncthreads();
  // Round trip 2: every layer's h of the previous step into hprev [hcap] (the other half of
  // hstate), the embedding row into xl.
  const int elen = phases > 0 && recs[kSrcKind] == 0 ? (int)recs[kSrcLen] : 0;
  const bool tok_ok = elen > 0 && token != nullptr && tok >= 0 && tok < (long long)recs[kVocab];
  const T* erow = reinterpret_cast<const T*>(recs[kSrc]) + (tok_ok ? tok : 0) * elen;
  const Word* hsrc = hs + (1 - half) * (size_t)hcap;
  gather_items<kGather>(
      hcap + elen,
      [&](int i) -> unsigned long long {
        if (i < hcap) return (unsigned long long)Tag<T>::load(hsrc + i);
        return tok_ok ? raw_bits<T>(erow + (i - hcap)) : 0ull;
      },
      [&](int i, unsigned long long raw) {
        if (i < hcap) {
          hprev[i] = Tag<T>::value((Word)raw);
        } else {
          xl(i - hcap) = bits_value<T>((unsigned)raw);
        }
      },
      [&] {
        if (!copy_late && issuer && phases > 0) issue(0, choff[0], choff[1]);
      });
  BP_STAMP(26);
  __syncthreads();
  if (copy_late && issuer && phases > 0) issue(0, choff[0], choff[1]);
  BP_STAMP(1);

  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const int rpw = 32 / lpr, group = lane / lpr, sub = lane % lpr;
  for (int p = 0; p < phases; ++p) {
    const unsigned long long* d = recs + (size_t)p * kFields;
    const bool lstm = d[kKind] == 0;
    const int R = (int)d[kRows], H = (int)d[kUnits], B = (int)d[kBlocks], L = (int)d[kLength], k = (int)d[kKeep];
    const int kpad = B * L, nnz = k * B;  // k: slots per block, even (padded)
    if (p == 0) BP_STAMP(27);
    int first, n;  // LSTM: first unit, units; linear: first row, rows
    if (lstm) {
      const int U = (H + G - 1) / G;
      first = c * U;
      n = max(0, min(U, H - first));
    } else {
      const int RD = (R + G - 1) / G;
      first = c * RD;
      n = max(0, min(RD, R - first));
    }
    const int nrows = lstm ? 4 * n : n;
    const int lenA = (int)d[kSrcLen];
    const float* pp = pre + d[kPreOff];  // this phase's biases (and c): loaded at the start
    const unsigned char* chunk = ring + (size_t)(p % regions) * region_bytes;
    const T* vals = reinterpret_cast<const T*>(chunk);
    const I* idx = reinterpret_cast<const I*>(chunk + ((size_t)nrows * nnz * sizeof(T) + 15) / 16 * 16);
    T* out = reinterpret_cast<T*>(d[kOut]);
    // Every row of this CTA over blocks [jlo, jhi): gate rows into `gates` (added to what is
    // there when `add`), linear rows (+ bias) into the output.
    auto rows_dot = [&](int jlo, int jhi, bool add) {
      if (BP_LM_DIAG & 1) return;
      for (int base = warp * rpw; base < nrows; base += nwarps * rpw) {
        const int lr = base + group;
        float acc = 0.0f;
        if (lr < nrows) {
          const T* rv = vals + (size_t)lr * nnz;
          const I* ri = idx + (size_t)lr * nnz;
          const unsigned char* xb = reinterpret_cast<const unsigned char*>(xs);
          for (int j = jlo + sub; j < jhi; j += lpr) {
            const unsigned jb = 4u * (unsigned)j;
            const T* vj = rv + j * k;
            const I* ij = ri + j * k;
#pragma unroll 4
            for (int t = 0; t < k; t += 2) {
              float v0, v1;
              unsigned o0, o1;
              value_pair<T>(vj + t, v0, v1);
              x_offsets<I>(ij + t, jb, o0, o1);
              acc = fmaf(v0, *reinterpret_cast<const float*>(xb + o0), acc);
              acc = fmaf(v1, *reinterpret_cast<const float*>(xb + o1), acc);
            }
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          if (o < lpr) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        }
        if (sub == 0 && lr < nrows) {
          if (lstm) {
            gates[lr] = add ? gates[lr] + acc : acc;
          } else {
            const int r = first + lr;
            Val<T>::store(out + r, acc + pp[lr]);
          }
        }
      }
    };
    // x[col] for the blocks [jlo, jhi) into xs (block-interleaved): columns below lenA from xl
    // (column order), this layer's previous h from hprev, zeros elsewhere. Threads walk xs in
    // order (conflict-free stores) and read the sources at stride L (conflict-free for odd L).
    const int offB = lstm ? (int)d[kOffB] : kpad;
    const float* hp = hprev + (lstm ? d[kHOff] : 0);
    // Thread tid stages block j = tid % B, rows i = tid / B, tid / B + nt / B, ... (B <= nt:
    // no division per element).
    auto stage = [&](int jlo, int jhi) {
      const int j = tid % B, per = nt / B;
      if (tid >= per * B || j < jlo || j >= jhi) return;
      for (int i = tid / B, col = j * L + i; i < L; i += per, col += per) {
        xs[i * 64 + j] = col < lenA ? xl(col) : (lstm && col >= offB && col < offB + H ? hp[col - offB] : 0.0f);
      }
    };
    // Wait for this phase's weights (once). Copies are issued one after another: phase 0's at the
    // start, phase p+1's into a fresh ring buffer as soon as phase p's have landed (issued
    // together, the copies share the bandwidth and phase 0 waits for both), a used buffer's
    // next phase once the buffer has been read.
    bool waited = false;
    auto wait_weights = [&]() {
      if (waited) return;
      mbar_wait(mbar + p % regions, (unsigned)((p / regions) & 1));
      waited = true;
      if (p == 0) BP_STAMP(24);
      if (p > 0 && p < 3 && phases <= 3) BP_STAMP(18 + 2 * p);  // slots 20, 22: phase 1, 2 weights landed
      if (issuer && p + 1 < phases && p + 1 < regions) issue(p + 1, choff[2 * p + 2], choff[2 * p + 3]);
    };
    if (nrows > 0) {
      const bool emb = d[kSrcKind] == 0;
      // Blocks from jB on hold only this layer's previous h (and zeros), known already: a layer
      // that waits for the previous layer's h computes that part of its rows first.
      const int jB = lstm ? offB / L : B;
      const bool split = !emb && jB < B;
      BP_STAMP(2 + 6 * p);
      if (split) {
        stage(jB, B);
        __syncthreads();
        wait_weights();
        rows_dot(jB, B, false);
      }
      BP_STAMP(3 + 6 * p);
      if (!emb) {
        // The previous layer's h of this step, in column order into xl (coalesced loads).
        gather_tagged<T>(hs + half * (size_t)hcap + d[kSrc], lenA, tag, [&](int i, float v) { xl(i) = v; });
      }
      BP_STAMP(4 + 6 * p);
      stage(0, split ? jB : B);
      __syncthreads();
      if (p > 0 && p < 3 && phases <= 3) BP_STAMP(19 + 2 * p);  // slots 21, 23: input staged (all threads)
      wait_weights();
      rows_dot(0, split ? jB : B, split);
      BP_STAMP(5 + 6 * p);
    }
    // This phase's weights (a CTA without rows waits too: the ring's phase parity must advance).
    wait_weights();
    __syncthreads();  // gates complete; this ring buffer is no longer read
    BP_STAMP(6 + 6 * p);
    if (issuer && p + regions < phases) {
      fence_proxy_async_shared();  // our reads of the buffer before the copy engine's writes
      issue(p + regions, choff[2 * (p + regions)], choff[2 * (p + regions) + 1]);
    }
    if (lstm && tid < n) {
      const int u = first + tid, U = (H + G - 1) / G;
      float a[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) a[q] = gates[q * n + tid] + pp[q * U + tid];
      const float cn = sigmoid_rec(a[1]) * pp[4 * U + tid] + sigmoid_rec(a[0]) * tanhf(a[2]);
      const float hn = sigmoid_rec(a[3]) * tanhf(cn);
      pre_g[(size_t)c * precap + d[kPreOff] + 4 * U + tid] = cn;
      Tag<T>::store(hs + half * (size_t)hcap + d[kHOff] + u, Tag<T>::pack(hn, tag));
    }
    BP_STAMP(7 + 6 * p);
  }
  end_launch(ctl, epoch);
  BP_STAMP(28);
  BP_GSTAMP(30);
}

}  // namespace bp
