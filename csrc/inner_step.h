// fastmft._C: what the CPU part (csrc/inner_step.cpp, g++) and the CUDA part
// (csrc/inner_step_cuda.cu, nvcc) share, so that the two cannot drift apart: the operator's
// schema and contract, the dtype codes that index `modes`, how alpha is rounded, and the
// device-independent handling of the arguments (checks, sorting, the ATen path).
//
// Operator (namespace fastmft_C, called from fastmft/_C.py through torch.ops): kInnerStepSchema.
// For every i: outs[i] = params[i] - lr * grads[i] (grads[i] None: outs[i] = params[i]).
// Both parts return a 0-d bool tensor on the params' device: true when check_finite and some
// written value is inf or NaN (the flag; nothing is raised here, and the CUDA part never waits
// for the device: Python reads the flag only when it asks for the check).
//
// Exactness: the result must be BITWISE equal to torch._foreach_add(params, grads, alpha=-lr)
// (fastmft.reference.inner_step). How torch rounds depends on its build and device (AVX2/AVX512
// and CUDA kernels use one fused multiply-add; the CPU's DEFAULT kernels multiply, round, then
// add; for float16/bfloat16 it rounds alpha to the tensor dtype first). fastmft/_C.py probes
// torch once per device and dtype and passes what it found in `modes` (one entry per Code):
//   bit 0: fused multiply-add (else multiply, round, add), bit 1: round alpha to the dtype first.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastmft {

inline constexpr char kInnerStepSchema[] =
    "inner_step_(Tensor[] params, Tensor?[] grads, Tensor(a!)[] outs, float lr, bool check_finite, "
    "int[] modes) -> Tensor";

// The dtypes the kernels take; the numbers are the indices of `modes` (fastmft/_C.py's _CODES).
enum Code : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kNumCodes = 4 };

inline int code_of(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return kF32;
    case c10::kDouble: return kF64;
    case c10::kHalf: return kF16;
    case c10::kBFloat16: return kBF16;
    default: return -1;
  }
}

// alpha (= -lr) as the kernels of dtype `code` use it: rounded to the dtype when `mode` says torch
// does (a float64 alpha is never rounded).
inline double rounded_alpha(double alpha, int code, int mode) {
  if (!(mode & 2)) return alpha;
  switch (code) {
    case kF32: return static_cast<double>(static_cast<float>(alpha));
    case kF16: return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(alpha))));
    case kBF16: return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(alpha))));
    default: return alpha;
  }
}

// One contiguous, non-empty tensor of a supported dtype, as both parts' kernels read it.
struct Segment {
  const void* p;
  const void* g;  // nullptr: plain copy of p
  void* o;
  int64_t n;
};

// The arguments sorted for the kernels: per Code, the tensors they take (in argument order);
// `slow`, the indices of the rest (non-contiguous, or another dtype), which step_slow runs.
struct Plan {
  std::vector<Segment> groups[kNumCodes];
  std::vector<size_t> slow;
};

inline Plan plan(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads, at::TensorList outs,
                 at::IntArrayRef modes, const at::Device& device) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && outs.size() == n, "fastmft_C::inner_step_: params has ", n,
              " tensors, grads ", grads.size(), ", outs ", outs.size());
  TORCH_CHECK(modes.size() == kNumCodes, "fastmft_C::inner_step_: modes must have ", int(kNumCodes), " entries");
  Plan result;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& o = outs[i];
    std::optional<at::Tensor> g = grads.get(i);
    const bool has_g = g.has_value() && g->defined();
    TORCH_CHECK(p.device() == device && o.device() == device && (!has_g || g->device() == device),
                "fastmft_C::inner_step_: tensor ", i, " is not on ", device);
    TORCH_CHECK(o.sizes() == p.sizes() && o.scalar_type() == p.scalar_type() &&
                    (!has_g || (g->sizes() == p.sizes() && g->scalar_type() == p.scalar_type())),
                "fastmft_C::inner_step_: tensor ", i, " has mismatched shapes or dtypes");
    if (p.numel() == 0) continue;
    const int code = code_of(p.scalar_type());
    if (code < 0 || !p.is_contiguous() || !o.is_contiguous() || (has_g && !g->is_contiguous())) {
      result.slow.push_back(i);
      continue;
    }
    result.groups[code].push_back(
        Segment{p.const_data_ptr(), has_g ? g->const_data_ptr() : nullptr, o.mutable_data_ptr(), p.numel()});
  }
  return result;
}

// The tensors the kernels do not take, through ATen (torch's own rounding); ORs their non-finite
// flag into `flag` as a tensor op, so the CUDA part does not wait for the device here.
inline void step_slow(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                      at::TensorList outs, const std::vector<size_t>& slow, double alpha, bool check_finite,
                      at::Tensor& flag) {
  for (size_t i : slow) {
    const at::Tensor& p = params[i];
    at::Tensor o = outs[i];
    std::optional<at::Tensor> g = grads.get(i);
    if (g.has_value() && g->defined()) {
      at::add_out(o, p, *g, alpha);
    } else if (!o.is_same(p)) {
      o.copy_(p);
    }
    if (check_finite) flag.logical_or_(at::isfinite(o).all().logical_not());
  }
}

}  // namespace fastmft
