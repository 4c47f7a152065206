// fastmft._C, CUDA part (built only where torch has CUDA and a toolkit is found; see fastmft/_C.py):
// the inner step theta' = theta - lr * grad as a multi-tensor apply: one launch per dtype for up to
// kMaxTensors tensors (more launches when the list is longer).
//
// Metadata travels BY VALUE in the kernel's arguments (LaunchArgs: the tensors' pointers, sizes
// and first block, under the 4 KB parameter limit), so a call makes no host-to-device copy and
// reads no host buffer later: a captured CUDA graph replays with the pointers it was captured
// with, and nothing on the host can be recycled under it (the previous version copied the table
// from a pinned buffer on every call, which a replay would not repeat).
//
// Each tensor is cut into chunks of kChunk elements and every CUDA block takes one chunk; a block
// finds its tensor by a binary search over the launch's first blocks (the same argument words for
// every thread: uniform constant-bank reads, no local memory). kChunk = 16384 so that a MiniLM step
// (22.7M parameters in 103 tensors, fp32) makes 1,449 blocks: 2.7 waves of 528 (132 SMs x 4 blocks
// of 512 threads at <= 32 registers) on an H100/H200; 65,536-element chunks made 429, 0.81 of a wave.
// Each thread moves 16 bytes per load/store (float4 / 8 x bf16 / 8 x fp16 / 2 x double) when the
// chunk's three pointers are 16-byte aligned (always true for FlatParams buffers and fresh
// allocations), element by element otherwise and for the chunk's tail. Math in fp32 (fp64 for
// double) with explicit __fmaf_rn or multiply-then-add, as fastmft/_C.py's probe of torch's own
// _foreach_add says (`modes`, see csrc/inner_step.h), so that results match torch's foreach op.
// The optional non-finite check sets a device flag (no host sync here; Python reads it when asked).
#include "inner_step.h"

#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <vector>

namespace fastmft {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 16384;  // elements per block (a multiple of every vector width)
constexpr int kMaxTensors = 110;   // tensors per launch: LaunchArgs and the other arguments fit in 4 KB

// One launch's tensors, passed by value. Block b works on tensor i, the last one with
// first_block[i] <= b, at chunk b - first_block[i].
struct LaunchArgs {
  const void* p[kMaxTensors];
  const void* g[kMaxTensors];  // nullptr: plain copy of p
  void* o[kMaxTensors];
  int64_t n[kMaxTensors];
  int32_t first_block[kMaxTensors];
  int32_t count;
};
// The kernel's parameters (LaunchArgs, alpha, the flag pointer) within the 4 KB every CUDA
// version and architecture accepts.
static_assert(sizeof(LaunchArgs) + sizeof(double) + sizeof(bool*) <= 4096, "kernel parameters over 4 KB");

// element <-> math type
template <typename T> struct Elem;
template <> struct Elem<float> {
  using M = float;
  __device__ static M in(float x) { return x; }
  __device__ static float out(M x) { return x; }
};
template <> struct Elem<double> {
  using M = double;
  __device__ static M in(double x) { return x; }
  __device__ static double out(M x) { return x; }
};
template <> struct Elem<__half> {
  using M = float;
  __device__ static M in(__half x) { return __half2float(x); }
  __device__ static __half out(M x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
  using M = float;
  __device__ static M in(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 out(M x) { return __float2bfloat16_rn(x); }
};

template <bool FMA>
__device__ __forceinline__ float step(float p, float g, float a) {
  return FMA ? __fmaf_rn(g, a, p) : __fadd_rn(p, __fmul_rn(a, g));
}
template <bool FMA>
__device__ __forceinline__ double step(double p, double g, double a) {
  return FMA ? __fma_rn(g, a, p) : __dadd_rn(p, __dmul_rn(a, g));
}
__device__ __forceinline__ bool nonfinite(float x) { return !isfinite(x); }
__device__ __forceinline__ bool nonfinite(double x) { return !isfinite(x); }

template <typename T, int N>
struct alignas(16) Vec {
  T v[N];
};

template <typename T, bool FMA, bool CHECK>
__global__ void __launch_bounds__(kThreads)
    inner_step_kernel(const __grid_constant__ LaunchArgs args, typename Elem<T>::M alpha, bool* flag) {
  using E = Elem<T>;
  using M = typename E::M;
  constexpr int kVec = 16 / sizeof(T);
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = args.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_block[mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  const int64_t start = static_cast<int64_t>(block - args.first_block[lo]) * kChunk;
  const int64_t n = min(kChunk, args.n[lo] - start);
  const T* p = static_cast<const T*>(args.p[lo]) + start;
  const T* g = args.g[lo] ? static_cast<const T*>(args.g[lo]) + start : nullptr;
  T* o = static_cast<T*>(args.o[lo]) + start;
  bool bad = false;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(o)) & 15) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t nv = n / kVec;
    const auto* vp = reinterpret_cast<const Vec<T, kVec>*>(p);
    const auto* vg = reinterpret_cast<const Vec<T, kVec>*>(g);
    auto* vo = reinterpret_cast<Vec<T, kVec>*>(o);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<T, kVec> a = vp[i];
      if (g) {
        Vec<T, kVec> b = vg[i];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          M r = step<FMA>(E::in(a.v[k]), E::in(b.v[k]), alpha);
          a.v[k] = E::out(r);
          if (CHECK) bad |= nonfinite(static_cast<M>(E::in(a.v[k])));
        }
      } else if (CHECK) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) bad |= nonfinite(static_cast<M>(E::in(a.v[k])));
      }
      vo[i] = a;
    }
    done = nv * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    M r = E::in(p[i]);
    if (g) r = step<FMA>(r, E::in(g[i]), alpha);
    T x = E::out(r);
    o[i] = x;
    if (CHECK) bad |= nonfinite(static_cast<M>(E::in(x)));
  }
  // Every writer stores the same `true` and nothing reads the flag before the kernel ends, so a
  // plain store is enough (no atomic on a byte; torch's own found_inf flag of AMP does the same).
  if (CHECK && bad) *flag = true;
}

template <typename T>
void launch_one(const LaunchArgs& args, int32_t blocks, typename Elem<T>::M alpha, bool fma, bool check, bool* flag,
                cudaStream_t stream) {
  if (fma) {
    if (check) inner_step_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(args, alpha, flag);
    else inner_step_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(args, alpha, flag);
  } else {
    if (check) inner_step_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(args, alpha, flag);
    else inner_step_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(args, alpha, flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches for the tensors of one dtype: a launch takes tensors in order until it holds
// kMaxTensors of them (or its blocks would pass INT_MAX, which no GPU's memory reaches).
template <typename T>
void launch(const std::vector<Segment>& segments, double alpha, bool fma, bool check, bool* flag) {
  using M = typename Elem<T>::M;
  const M a = static_cast<M>(alpha);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LaunchArgs args{};
  int64_t blocks = 0;
  for (const Segment& s : segments) {
    const int64_t chunks = (s.n + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT_MAX, "fastmft_C::inner_step_: a tensor of ", s.n, " elements is too large");
    if (args.count == kMaxTensors || (args.count > 0 && blocks + chunks > INT_MAX)) {
      launch_one<T>(args, static_cast<int32_t>(blocks), a, fma, check, flag, stream);
      args.count = 0;
      blocks = 0;
    }
    const int i = args.count++;
    args.p[i] = s.p;
    args.g[i] = s.g;
    args.o[i] = s.o;
    args.n[i] = s.n;
    args.first_block[i] = static_cast<int32_t>(blocks);
    blocks += chunks;
  }
  if (args.count) launch_one<T>(args, static_cast<int32_t>(blocks), a, fma, check, flag, stream);
}

}  // namespace

at::Tensor inner_step_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                           at::TensorList outs, double lr, bool check_finite, at::IntArrayRef modes) {
  TORCH_CHECK(!params.empty(), "fastmft_C::inner_step_: empty tensor list");
  const at::Device device = params[0].device();
  const Plan args = plan(params, grads, outs, modes, device);
  c10::cuda::CUDAGuard guard(device);
  at::Tensor flag = at::zeros({}, at::TensorOptions().dtype(at::kBool).device(device));
  const double alpha = -lr;
  bool* f = flag.mutable_data_ptr<bool>();
  for (int code = 0; code < kNumCodes; ++code) {
    const std::vector<Segment>& group = args.groups[code];
    if (group.empty()) continue;
    const int mode = static_cast<int>(modes[code]);
    const double a = rounded_alpha(alpha, code, mode);
    const bool fma = mode & 1;
    switch (code) {
      case kF32: launch<float>(group, a, fma, check_finite, f); break;
      case kF64: launch<double>(group, a, fma, check_finite, f); break;
      case kF16: launch<__half>(group, a, fma, check_finite, f); break;
      case kBF16: launch<__nv_bfloat16>(group, a, fma, check_finite, f); break;
    }
  }
  step_slow(params, grads, outs, args.slow, alpha, check_finite, flag);
  return flag;
}

}  // namespace fastmft

TORCH_LIBRARY_IMPL(fastmft_C, CUDA, m) { m.impl("inner_step_", &fastmft::inner_step_cuda); }
