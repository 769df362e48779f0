// bench_util.cu: helper kernels for measuring, not for inference.
//
// read_reduce: the read-bandwidth ceiling. Every thread sums 16-byte vectors of `src` (n4 of them
//   in all) with a grid-stride loop, UNROLL independent loads in flight, and writes one float per
//   thread to `sink` (so the loads cannot be removed). Bytes moved: n4 * 16 read (+ the sink,
//   negligible). Launch: any 1-D grid; blockDim.x = 256 is fine; grid = 4 * SMs or more.
// spin: keeps the GPU busy for `cycles` clock cycles (one thread), so that the timed launches
//   queued behind it run back to back with no host gaps between them.
#include "bp_common.cuh"

extern "C" __global__ void bp_read_reduce(const float4* __restrict__ src, long long n4, float* __restrict__ sink) {
  constexpr int UNROLL = 8;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long nthreads = (long long)gridDim.x * blockDim.x;
  float acc = 0.0f;
  long long i = tid;
  for (; i + (UNROLL - 1) * nthreads < n4; i += UNROLL * nthreads) {
    bp::Words<4> v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = bp::ld_words<4>(src + i + u * nthreads);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      acc += __uint_as_float(v[u].w[0]) + __uint_as_float(v[u].w[1]) + __uint_as_float(v[u].w[2]) +
             __uint_as_float(v[u].w[3]);
  }
  for (; i < n4; i += nthreads) {
    const bp::Words<4> v = bp::ld_words<4>(src + i);
    acc += __uint_as_float(v.w[0]) + __uint_as_float(v.w[1]) + __uint_as_float(v.w[2]) + __uint_as_float(v.w[3]);
  }
  sink[tid] = acc;
}

extern "C" __global__ void bp_spin(long long cycles, int* __restrict__ flag) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
  if (threadIdx.x == 0 && blockIdx.x == 0) *flag = 1;
}
