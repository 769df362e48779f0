// llama_step.cu: every decoder layer of a Llama-family decode step at batch 1 in ONE persistent launch
// (balprune.runtime.model.llama_step), the lane records of every product streamed into shared memory.
//
// What a CTA waits for on its critical path is memory round trips, and while every SM's copies stream each one
// takes ~2 us instead of ~0.8 (kernels/NOTES.md v12): so staging loads all of a thread's columns before it stores
// any, and nothing between two barriers waits for memory more than once where that can be avoided (v33).
//
// Why: as separate launches (llama_ops.cu + one product launch each) a 1B layer is eight launches whose products
// take 5-11 us each against 1.5-4 us of reading (kernels/NOTES.md v27-v29): each launch ramps from nothing in
// flight, and programmatic dependent launch took only 4% off. Here the weights of the whole step are one stream
// per CTA that does not depend on the activations: the CTA asks the copy engine for its next chunks (cp.async.bulk
// into a ring of shared-memory slots) as soon as a slot is free, across phase, layer and grid-barrier boundaries,
// so while the chip waits at a barrier for the activations, the next phase's weights are already on the way.
// Activations move between phases through global memory (read with ld.global.cg: other CTAs wrote them) behind
// a grid barrier: five per layer (after q/k/v, attention, o, gate/up, down). Balanced sparsity is what makes this
// simple: every row of a matrix has the same record size, so a chunk is a run of rows at a computed address.
//
// Per layer (h: the residual stream in T; the numbers round to T where llama_ops.cu's step does):
//   qkv:  every CTA computes xn = T(w * T(h * rsqrt(mean(h^2) + eps))) itself (h is a few KB), its q/k/v rows
//         -> qkv = T(acc + bias)
//   attention: work items (chunk, K/V head) over the CTAs: attention_item (llama_common.cuh; RoPE, the cache
//         append, the last CTA of a head combines) -> attn. A CTA's first item stages its cache rows before the
//         barrier after q/k/v (they are earlier steps'), so that round trip overlaps the wait.
//   o:    x = attn; its rows -> h[row] = T(h[row] + T(acc + bias)), h[row] from hres (the CTA's own rows of h,
//         kept in shared memory from the last norm's staging: o and down have the same hidden rows)
//   gate/up: x = the post norm of h; row pairs (gate i, up i) -> act[i] = T(T(silu(T(g))) * T(u))
//   down: x = act; its rows -> h[row] = T(h[row] + T(acc)) (hres as for o)
// After the last layer, CTA 0 writes the final norm of h to xn (the head is the next launch).
//
// Lane records (formats/layouts.py lane_records, the one owner of the layout): a row of B = 32 * nb blocks of L
// keeping k; lane j owns columns [j * C, (j + 1) * C), C = nb * L, and exactly n = nb * k values; record = mask
// words [W][32] u32 (bit b of word w: local column 32 w + b), then value units [U][32] u32 (V = 4 / sizeof(T)
// values per unit, the first in the low bits). x is staged in shared memory as fp32 at xs[p * 32 + j] (local
// column p of lane j), so a lane reads bank j whatever its columns: conflict-free.
// A row's work is split into G tasks (the phase's kGroups), task g walking values [t_g, t_{g+1}) of every
// lane, t_g = (g * n / G) & ~1: every lane takes the same number of values (uniform trip count; balanced), a
// warp per task; the partial sums are added in task order (deterministic: graph replay equals eager).
//
// phases: [4 * layers][kPhaseFields] u64 (fields below), layers: [layers][kLayerFields] u64.
// Dynamic shared memory (bytes): 128 (mbarriers) + 4 * xfloats (xs, >= 2 * hidden: stage_norm loads h and the
// norm's weights into it; attention's scratch aliases it) + 4 * (xcap_pad) (xtmp: x in column order, padded per
// lane range) + 4 * 2 * kMaxTasks (task sums) + 4 * residual_floats(hidden, grid) (hres) + slots * slot_bytes
// (the ring), each part 128-aligned (llama_step.py computes it). The o and down phases have hidden rows.
// Grid: one CTA per SM, all resident (cooperative launch); block kStepThreads.
// bar: u32 [2], zero before the first launch; every launch leaves them zero.
#include "llama_common.cuh"

// BP_STEP_PROBE (a -D define; 0, i.e. absent, in every runtime build): benchmarks/step_probe.py times builds that
// leave parts of the step out, to place its time without hardware counters (what such a build computes is wrong):
//   1: no attention items  2: no staging of x  4: no task dots (every chunk still waited for and released)
//   8: no grid barriers    16: no weight stream (no copies, no waits, no tasks, no epilogues)
//   32: no stream across barriers (a phase's first chunks asked for when it starts; results stay right)
//   64: timeline (results stay right): thread 0 of every CTA writes clock64 at fixed points of every layer into
//       bp_step_stamps[cta][layer * kStampsPerLayer + point] and %globaltimer at its start and end (the last
//       slots), to put each CTA's clock on one time axis. Points of a layer: 0 start, 1 q/k/v x staged, 2 q/k/v rows
//       done, 3 barrier, 4 attention done, 5 barrier, 6 o x staged, 7 o rows done, 8 barrier, 9 gate/up x staged,
//       10 gate/up rows done, 11 barrier, 12 down x staged, 13 down rows done, 14 barrier
#ifndef BP_STEP_PROBE
#define BP_STEP_PROBE 0
#endif
#if BP_STEP_PROBE & 64
constexpr int kStampsPerLayer = 16, kStampLayers = 64, kStampCtas = 160;
constexpr int kStampSlots = kStampsPerLayer * kStampLayers + 4;  // + globaltimer and clock64 at start and end
__device__ unsigned long long bp_step_stamps[kStampCtas * kStampSlots];
#define BP_STEP_STAMP(l, e)                                                                                      \
  do {                                                                                                           \
    if (threadIdx.x == 0 && (l) < kStampLayers && blockIdx.x < kStampCtas)                                       \
      bp_step_stamps[blockIdx.x * kStampSlots + (l) * kStampsPerLayer + (e)] = clock64();                        \
  } while (0)
#define BP_STEP_EDGE(e) /* e: 0 start, 1 end */                                                                  \
  do {                                                                                                           \
    if (threadIdx.x == 0 && blockIdx.x < kStampCtas) {                                                           \
      unsigned long long t_;                                                                                     \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                                     \
      bp_step_stamps[blockIdx.x * kStampSlots + kStampsPerLayer * kStampLayers + (e)] = t_;                      \
      bp_step_stamps[blockIdx.x * kStampSlots + kStampsPerLayer * kStampLayers + 2 + (e)] = clock64();           \
    }                                                                                                            \
  } while (0)
#else
#define BP_STEP_STAMP(l, e) \
  do {                      \
  } while (0)
#define BP_STEP_EDGE(e) \
  do {                  \
  } while (0)
#endif

namespace bp {

constexpr int kProbe = BP_STEP_PROBE;
constexpr int kMaxSlots = 8;  // mbarriers: full[kMaxSlots] in the first 128 bytes

constexpr int kStepThreads = 512;
constexpr int kMaxTasks = 1024;  // tasks of one chunk (rows x groups)

// Fields of a product phase (u64 each).
enum PhaseField {
  kRecs = 0,    // address of the phase's records (row r at kRecs + r * kRecBytes; gate/up: gate i, up i at 2i, 2i+1)
  kRows,        // rows (gate/up: pairs)
  kRecBytes,    // bytes of one record (a multiple of 128)
  kWords,       // W: mask words per lane
  kKept,        // n: values per lane
  kChunkRows,   // rows (pairs) per chunk: the same for every CTA, chunk bytes <= slot_bytes
  kGroups,      // G: tasks per record
  kBias,        // float [rows] or 0
  kXCols,       // columns of x the phase multiplies (the rest of B * L staged as 0)
  kLaneCols,    // C: columns per lane
  kPhaseFields
};
// Fields of a layer (u64 each): the norms' weights (T), qwen3's per-head norms (or 0), the layer's cache.
enum LayerField { kInNorm = 0, kPostNorm, kQNorm, kKNorm, kKeys, kValues, kLayerFields };

// A CTA's rows of a phase with `rows` rows: [rows * c / G, rows * (c + 1) / G).
__device__ __forceinline__ int part_begin(long long rows, int c, int G) { return (int)(rows * c / G); }
// Floats of hres (the CTA's residual rows): the most rows of `hidden` a CTA of G gets, rounded up to 32.
__host__ __device__ __forceinline__ int residual_floats(int hidden, int G) { return ((hidden + G - 1) / G + 31) & ~31; }
// Columns a thread of stage / stage_norm loads before it stores (registers: 2 x this many floats).
constexpr int kStageBatch = 8;

// All CTAs of the grid meet here; `target` counts the arrivals this CTA waits for (it grows by the grid size per
// barrier). Writes before the barrier are visible to every CTA after it (the CTA's barrier, a fence and a release
// reduction for the arrival, an acquire load while waiting, then the CTA's barrier).
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned& target) {
  if (kProbe & 8) return;
  target += gridDim.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    // an arrival that does not wait for its answer (atomicAdd's return cost a round trip before the first poll)
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

// Values t and t + 1 (t even; the second only when `two`: past a lane's last value there may be no unit) of
// lane `lane` from its units (u32 words, unit u at units[u * 32]).
template <typename T>
struct LaneVals;
template <>
struct LaneVals<float> {
  __device__ static __forceinline__ void pair(const unsigned* units, int t, bool two, float& v0, float& v1) {
    v0 = __uint_as_float(units[t * 32]);
    v1 = two ? __uint_as_float(units[(t + 1) * 32]) : 0.0f;
  }
};
template <>
struct LaneVals<f16> {
  __device__ static __forceinline__ void pair(const unsigned* units, int t, bool, float& v0, float& v1) {
    const unsigned u = units[(t >> 1) * 32];
    v0 = half_bits_to_float(u & 0xffffu);
    v1 = half_bits_to_float(u >> 16);
  }
};
template <>
struct LaneVals<bf16> {
  __device__ static __forceinline__ void pair(const unsigned* units, int t, bool, float& v0, float& v1) {
    const unsigned u = units[(t >> 1) * 32];
    v0 = __uint_as_float(u << 16);
    v1 = __uint_as_float(u & 0xffff0000u);
  }
};

// One task of one record in shared memory: lane `lane`'s values [t0, t1) times x, summed over the warp (every
// lane gets the sum). t0 even. The lane finds the word holding its value t0 by counting bits, then takes one set
// bit per value: (t1 - t0) steps for every lane of the warp.
template <typename T>
__device__ __forceinline__ float task_dot(const unsigned* rec, int W, int t0, int t1, const float* xs, int lane) {
  const unsigned* words = rec + lane;
  const unsigned* units = rec + 32 * W + lane;
  int w = 0, before = 0;
  unsigned m = words[0];
  int cnt = __popc(m);
  while (before + cnt <= t0 && w + 1 < W) {  // the word holding value t0
    before += cnt;
    m = words[32 * ++w];
    cnt = __popc(m);
  }
  for (int s = before; s < t0; ++s) m &= m - 1;  // drop the values before t0 in that word
  float a0 = 0.0f, a1 = 0.0f;
  for (int t = t0; t < t1; t += 2) {
    float v0, v1;
    LaneVals<T>::pair(units, t, t + 1 < t1, v0, v1);
    while (m == 0) m = words[32 * ++w];
    int b = __ffs(m) - 1;
    m &= m - 1;
    a0 = fmaf(v0, xs[((w << 5) + b) * 32 + lane], a0);
    if (t + 1 < t1) {  // uniform over the warp: every lane has the same t1
      while (m == 0) m = words[32 * ++w];
      b = __ffs(m) - 1;
      m &= m - 1;
      a1 = fmaf(v1, xs[((w << 5) + b) * 32 + lane], a1);
    }
  }
  float s = a0 + a1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads, 1) llama_step(
    const unsigned long long* __restrict__ phases_g, const unsigned long long* __restrict__ layers_g, int nlayers,
    T* h, T* xn, T* qkv, T* attn, T* act, const T* __restrict__ final_norm, const T* __restrict__ cos,
    const T* __restrict__ sin, const long long* __restrict__ pos, float* part, int* count, unsigned* bar, int hidden,
    int heads, int kvh, int d, int max_len, int window, float scaling, int chunk, int nchunks, float eps,
    int xfloats, int xtmp_floats, int slots, unsigned slot_bytes) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);  // [slots <= kMaxSlots]
  float* xs = reinterpret_cast<float*>(smem + 128);                         // [xfloats]; attention's scratch too
  float* xtmp = xs + xfloats;                                              // [xtmp_floats]
  float* tsum = xtmp + xtmp_floats;                                        // [2][kMaxTasks]
  float* hres = tsum + 2 * kMaxTasks;                                      // [residual_floats(hidden, G)]
  unsigned char* ring = reinterpret_cast<unsigned char*>(hres + residual_floats(hidden, gridDim.x));
  __shared__ float red[32];
  const int G = gridDim.x, c = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warps = blockDim.x >> 5, nt = blockDim.x;
  const int nphases = 4 * nlayers;
  // the CTA's rows of the o and down phases (both have hidden rows): the residual it adds to, kept in hres
  const int hr0 = part_begin(hidden, c, G), hr1 = part_begin(hidden, c + 1, G);
  auto ph = [&](int p, int f) -> unsigned long long { return __ldg(phases_g + (size_t)p * kPhaseFields + f); };

  // thread 0's cursor over the CTA's chunks; chunk q goes to slot q % slots
  int ip = 0, ir = -1;      // next chunk to issue: phase, first row (pair) of it in the phase (-1: the part's first)
  long long issued = 0;     // chunks issued so far
  auto advance_to_rows = [&]() {  // skip phases where this CTA has no rows
    while (ip < nphases) {
      const long long rows = (long long)ph(ip, kRows);
      const int r1 = part_begin(rows, c + 1, G);
      if (ir < 0) ir = part_begin(rows, c, G);
      if (ir < r1) return;
      ++ip;
      ir = -1;
    }
  };
  int open_phase = 0;  // (probe 32: the one phase whose chunks may be asked for)
  auto issue_next = [&]() -> bool {  // thread 0: the next chunk of the stream, if any, into its slot
    advance_to_rows();
    if (ip >= nphases || ((kProbe & 32) && ip != open_phase)) return false;
    const long long rows = (long long)ph(ip, kRows);
    const int r1 = part_begin(rows, c + 1, G);
    const int per = (int)ph(ip, kChunkRows);
    const int n = min(per, r1 - ir);
    const unsigned long long unit = ph(ip, kRecBytes) * (ip % 4 == 2 ? 2 : 1);
    const unsigned bytes = (unsigned)(unit * (unsigned long long)n);
    unsigned long long* b = full + issued % slots;
    fence_proxy_async_shared();  // the slot's last reads (generic proxy) before the copy engine writes it
    mbar_arrive_expect_tx(b, bytes);
    bulk_copy_g2s(ring + (size_t)(issued % slots) * slot_bytes,
                  reinterpret_cast<const unsigned char*>(ph(ip, kRecs) + unit * (unsigned long long)ir), bytes, b);
    ++issued;
    ir += n;
    return true;
  };
  BP_STEP_EDGE(0);
  if (tid == 0) {
    for (int s = 0; s < slots; ++s) mbar_init(full + s, 1);
    mbar_init_fence();
    for (int s = 0; s < slots && !(kProbe & 16); ++s) issue_next();
  }
  __syncthreads();

  const long long p = pos[0];
  unsigned target = 0;   // grid barrier arrivals waited for so far
  long long q = 0;       // chunks consumed (every thread keeps the same count)

  // x into xs: value(col) for col < xcols (the rest 0), lane j's local column p at xs[p * 32 + j]. First in
  // column order into xtmp (lane ranges padded to an odd stride, so the gather below is conflict-free), then
  // gathered by lane. A thread loads kStageBatch of its columns before it stores any (a shared store after each
  // load kept one load in flight: a memory round trip per column, ~2 us each while the weights stream). Ends
  // with a barrier.
  auto stage = [&](int lane_cols, int xcols, auto value) {
    if (kProbe & 2) return;
    const int stride = lane_cols | 1;
    const int total = 32 * lane_cols;
    __syncthreads();  // (xs / xtmp may still be read by the previous phase's last tasks)
    for (int base = tid; base < total; base += kStageBatch * nt) {
      float v[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int col = base + u * nt;
        v[u] = col < xcols ? value(col) : 0.0f;  // (xcols <= total)
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int col = base + u * nt;
        if (col < total) {
          const int j = col / lane_cols, pp = col - j * lane_cols;
          xtmp[j * stride + pp] = v[u];
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < total; i += nt) {
      const int j = i & 31, pp = i >> 5;
      xs[i] = xtmp[j * stride + pp];
    }
    __syncthreads();
  };
  // The RMSNorm of h with weights w, staged as x (every CTA computes it: h is hidden elements). h and w are
  // loaded together into xs (h at [0, hidden), w at [hidden, 2 hidden): one round trip), and the CTA's own
  // rows of the o / down phases (the residual they add to) into hres.
  auto stage_norm = [&](const T* w, int lane_cols, int xcols) {
    __syncthreads();  // (xs may still be read by the previous phase's last tasks)
    float ss = 0.0f;
    for (int base = tid; base < hidden; base += kStageBatch * nt) {
      float hv[kStageBatch], wv[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = base + u * nt;
        hv[u] = i < hidden ? ldcg_val<T>(h + i) : 0.0f;
        wv[u] = i < hidden ? Val<T>::ldg(w + i) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = base + u * nt;
        if (i < hidden) {
          xs[i] = hv[u];
          xs[hidden + i] = wv[u];
        }
        ss += hv[u] * hv[u];
      }
    }
    const float r = rsqrtf(block_sum(ss, red) / (float)hidden + eps);  // (its barriers publish xs)
    for (int i = tid; i < hr1 - hr0; i += nt) hres[i] = xs[hr0 + i];
    // rounded to T as add_rms_norm stores it (the product reads xn in T)
    stage(lane_cols, xcols, [&](int col) { return rnd<T>(xs[hidden + col] * rnd<T>(xs[col] * r)); });
  };

  // One product phase: the CTA's chunks in stream order; mode 0: out = qkv, 1: h += y, 2: gate/up -> act.
  auto product = [&](int pi, int mode) {
    const long long rows = (long long)ph(pi, kRows);
    const int r0 = part_begin(rows, c, G), r1 = part_begin(rows, c + 1, G);
    if (r0 >= r1 || (kProbe & 16)) return;
    if ((kProbe & 32) && tid == 0) {  // this phase's first chunks, now
      open_phase = pi;
      while (issued - q < slots && issue_next()) {
      }
    }
    const int per = (int)ph(pi, kChunkRows), W = (int)ph(pi, kWords), n = (int)ph(pi, kKept);
    const int groups = (int)ph(pi, kGroups);
    const unsigned rec_words = (unsigned)(ph(pi, kRecBytes) / 4);
    const float* bias = reinterpret_cast<const float*>(ph(pi, kBias));
    const int recs_per_row = mode == 2 ? 2 : 1;
    for (int a = r0; a < r1; a += per) {
      const int nrows = min(per, r1 - a);
      const int slot = (int)(q % slots);
      mbar_wait(full + slot, (unsigned)((q / slots) & 1));
      const unsigned* base = reinterpret_cast<const unsigned*>(ring + (size_t)slot * slot_bytes);
      float* sums = tsum + (q & 1) * kMaxTasks;
      const int tasks = nrows * recs_per_row * groups;
      for (int task = warp; task < tasks && !(kProbe & 4); task += warps) {
        const int rec = task / groups, g = task - rec * groups;
        const int t0 = (int)(((long long)g * n / groups) & ~1LL);
        const int t1 = g + 1 == groups ? n : (int)(((long long)(g + 1) * n / groups) & ~1LL);
        const float s = task_dot<T>(base + (size_t)rec * rec_words, W, t0, t1, xs, lane);
        if (lane == 0) sums[task] = s;
      }
      __syncthreads();  // the slot is read and the sums are written
      if (tid == 0) issue_next();
      for (int i = tid; i < nrows; i += nt) {
        const int row = a + i;
        if (mode == 2) {
          float sg = 0.0f, su = 0.0f;
          for (int g = 0; g < groups; ++g) {
            sg += sums[(2 * i) * groups + g];
            su += sums[(2 * i + 1) * groups + g];
          }
          const float gv = rnd<T>(sg), uv = rnd<T>(su);
          const float si = rnd<T>(gv / (1.0f + __expf(-gv)));
          Val<T>::store(act + row, si * uv);
        } else {
          float s = 0.0f;
          for (int g = 0; g < groups; ++g) s += sums[i * groups + g];
          if (bias != nullptr) s += __ldg(bias + row);
          if (mode == 0) {
            Val<T>::store(qkv + row, s);
          } else {  // the residual from hres (a load from h here cost the chunk's next tasks a round trip)
            const float hn = rnd<T>(hres[row - hr0] + rnd<T>(s));
            hres[row - hr0] = hn;
            Val<T>::store(h + row, hn);
          }
        }
      }
      ++q;  // (the next chunk's sums go to the other half of tsum; a barrier separates its reuse)
    }
  };

  for (int l = 0; l < nlayers; ++l) {
    const unsigned long long* lay = layers_g + (size_t)l * kLayerFields;
    const T* in_norm = reinterpret_cast<const T*>(__ldg(lay + kInNorm));
    const T* post_norm = reinterpret_cast<const T*>(__ldg(lay + kPostNorm));
    const T* q_norm = reinterpret_cast<const T*>(__ldg(lay + kQNorm));
    const T* k_norm = reinterpret_cast<const T*>(__ldg(lay + kKNorm));
    T* keys = reinterpret_cast<T*>(__ldg(lay + kKeys));
    T* values = reinterpret_cast<T*>(__ldg(lay + kValues));
    const int p_qkv = 4 * l, p_o = p_qkv + 1, p_gu = p_qkv + 2, p_down = p_qkv + 3;

    BP_STEP_STAMP(l, 0);
    stage_norm(in_norm, (int)ph(p_qkv, kLaneCols), (int)ph(p_qkv, kXCols));
    BP_STEP_STAMP(l, 1);
    product(p_qkv, 0);
    BP_STEP_STAMP(l, 2);

    // attention: a CTA's first item stages its cache rows, then waits at the barrier after the q/k/v rows
    // (wait_qkv; every CTA arrives once), so the staging's round trip overlaps the slowest CTA's rows
    __syncthreads();  // (the attention scratch aliases xs: the q/k/v tasks' reads come first)
    bool waited = false;
    auto wait_qkv = [&]() {
      if (!waited) {
        grid_sync(bar, target);
        waited = true;
        BP_STEP_STAMP(l, 3);
      }
    };
    for (int item = c; item < kvh * nchunks && !(kProbe & 1); item += G) {
      const int ch = item / kvh, g = item - ch * kvh;  // chunk-major: the visible chunks spread over the CTAs
      attention_item<T, false>(qkv, keys, values, cos, sin, q_norm, k_norm, eps, p, attn, part, count, heads, kvh, d,
                               max_len, window, scaling, chunk, g, ch, nchunks, xs, wait_qkv);
      __syncthreads();
    }
    wait_qkv();  // (a CTA whose items were all past the position, or that had none)
    BP_STEP_STAMP(l, 4);
    grid_sync(bar, target);
    BP_STEP_STAMP(l, 5);

    stage((int)ph(p_o, kLaneCols), (int)ph(p_o, kXCols), [&](int col) { return ldcg_val<T>(attn + col); });
    BP_STEP_STAMP(l, 6);
    product(p_o, 1);
    BP_STEP_STAMP(l, 7);
    grid_sync(bar, target);
    BP_STEP_STAMP(l, 8);

    stage_norm(post_norm, (int)ph(p_gu, kLaneCols), (int)ph(p_gu, kXCols));
    BP_STEP_STAMP(l, 9);
    product(p_gu, 2);
    BP_STEP_STAMP(l, 10);
    grid_sync(bar, target);
    BP_STEP_STAMP(l, 11);

    stage((int)ph(p_down, kLaneCols), (int)ph(p_down, kXCols), [&](int col) { return ldcg_val<T>(act + col); });
    BP_STEP_STAMP(l, 12);
    product(p_down, 1);
    BP_STEP_STAMP(l, 13);
    grid_sync(bar, target);
    BP_STEP_STAMP(l, 14);
  }
  if (c == 0) {  // the final norm, for the head's launch
    float ss = 0.0f;
    for (int i = tid; i < hidden; i += nt) {
      const float v = ldcg_val<T>(h + i);
      ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, red) / (float)hidden + eps);
    for (int i = tid; i < hidden; i += nt) Val<T>::store(xn + i, Val<T>::ldg(final_norm + i) * rnd<T>(ldcg_val<T>(h + i) * r));
  }
  BP_STEP_EDGE(1);
  // the last CTA to finish leaves the barrier counters at zero for the next launch (every CTA is past every
  // barrier once all have arrived here)
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(bar + 1, 1u) == (unsigned)G - 1) {
      bar[0] = 0;
      bar[1] = 0;
    }
  }
}

}  // namespace bp
