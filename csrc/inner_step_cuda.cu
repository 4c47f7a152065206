// fastmft._C, CUDA part (built only where torch has CUDA and a toolkit is found; see fastmft/_C.py):
// the inner step theta' = theta - lr * grad as ONE multi-tensor-apply launch per dtype.
//
// The tensor list is cut into chunks of kChunk elements; every CUDA block takes one chunk
// (tensor index, chunk index) from a table, so one launch covers all ~200 tensors of a BERT.
// Each thread moves 16 bytes per load/store (float4 / 8 x bf16 / 8 x fp16 / 2 x double) when the
// chunk's three pointers are 16-byte aligned (always true for FlatParams buffers and fresh
// allocations), element by element otherwise and for the chunk's tail. Math in fp32 (fp64 for
// double) with explicit __fmaf_rn or multiply-then-add, as fastmft/_C.py's probe of torch's own
// _foreach_add says (`modes`, see csrc/inner_step.h), so that results match torch's foreach op.
// The optional non-finite check sets a device flag (no host sync here; Python reads it when asked).
//
// Metadata (tensor pointers and the chunk table) travels in one pinned host buffer copied to the
// device asynchronously on the current stream: one H2D copy and one kernel per dtype per call.
#include "inner_step.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace fastmft {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block (a multiple of every vector width)

struct ChunkMeta {
  int32_t tensor;
  int32_t chunk;
};

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
    inner_step_kernel(const Segment* __restrict__ tensors, const ChunkMeta* __restrict__ chunks,
                      typename Elem<T>::M alpha, bool* flag) {
  using E = Elem<T>;
  using M = typename E::M;
  constexpr int kVec = 16 / sizeof(T);
  const ChunkMeta c = chunks[blockIdx.x];
  const Segment t = tensors[c.tensor];
  const int64_t start = static_cast<int64_t>(c.chunk) * kChunk;
  const int64_t n = min(kChunk, t.n - start);
  const T* p = static_cast<const T*>(t.p) + start;
  const T* g = t.g ? static_cast<const T*>(t.g) + start : nullptr;
  T* o = static_cast<T*>(t.o) + start;
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
void launch(const std::vector<Segment>& metas, const at::Device& device, double alpha, bool fma, bool check,
            bool* flag) {
  std::vector<ChunkMeta> chunks;
  for (size_t i = 0; i < metas.size(); ++i) {
    const int64_t nchunks = (metas[i].n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < nchunks; ++c) chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
  if (chunks.empty()) return;
  const size_t tbytes = metas.size() * sizeof(Segment);
  const size_t cbytes = chunks.size() * sizeof(ChunkMeta);
  at::Tensor host = at::empty({static_cast<int64_t>(tbytes + cbytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr<uint8_t>(), metas.data(), tbytes);
  std::memcpy(host.mutable_data_ptr<uint8_t>() + tbytes, chunks.data(), cbytes);
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const auto* dt = reinterpret_cast<const Segment*>(dev.const_data_ptr<uint8_t>());
  const auto* dc = reinterpret_cast<const ChunkMeta*>(dev.const_data_ptr<uint8_t>() + tbytes);
  using M = typename Elem<T>::M;
  const M a = static_cast<M>(alpha);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // the chunk table is at most 2^31 blocks in x: 2^31 * 65536 elements, more than any GPU holds
  dim3 grid(static_cast<unsigned>(chunks.size()));
  if (fma) {
    if (check) inner_step_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(dt, dc, a, flag);
    else inner_step_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(dt, dc, a, flag);
  } else {
    if (check) inner_step_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(dt, dc, a, flag);
    else inner_step_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(dt, dc, a, flag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      case kF32: launch<float>(group, device, a, fma, check_finite, f); break;
      case kF64: launch<double>(group, device, a, fma, check_finite, f); break;
      case kF16: launch<__half>(group, device, a, fma, check_finite, f); break;
      case kBF16: launch<__nv_bfloat16>(group, device, a, fma, check_finite, f); break;
    }
  }
  step_slow(params, grads, outs, args.slow, alpha, check_finite, flag);
  return flag;
}

}  // namespace fastmft

TORCH_LIBRARY_IMPL(fastmft_C, CUDA, m) { m.impl("inner_step_", &fastmft::inner_step_cuda); }
