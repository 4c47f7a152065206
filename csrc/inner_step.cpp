// fastmft._C, CPU part: the functional inner step theta' = theta - lr * grad over a list of
// tensors in ONE OpenMP parallel pass, and the operator's registration (the CUDA part,
// csrc/inner_step_cuda.cu, is built only where torch has CUDA). The operator's contract, the
// dtype codes and the rounding modes are in csrc/inner_step.h, shared with the CUDA part.
//
// This file is compiled with -ffp-contract=off so that the compiler never fuses a multiply and an
// add on its own: `modes` (see inner_step.h) decides where a fused multiply-add is used.
//
// Parallel layout: all tensors' elements form one global index space [0, total); each OpenMP
// thread takes one contiguous range of it (balanced elements, crossing tensor boundaries), reads
// theta and grad where they live and writes theta' where outs live (a FlatParams buffer).
// Tensors that are not contiguous (or of an unsupported dtype) go through at::add_out afterwards.
// Calls whose output exceeds 4 x the last-level cache store fp32/bf16 results with streaming
// (non-temporal) stores, which skip the read-for-ownership of the output (same arithmetic).
#include "inner_step.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTMFT_X86 1
#else
#define FASTMFT_X86 0
#endif

namespace fastmft {
namespace {

// A Segment with its place in the global index space and its dtype's rounding.
struct Seg : Segment {
  int64_t begin;  // offset in the global index space
  int code;
  int mode;
  double alpha;  // -lr, already rounded as `mode` says
};

// ---------------------------------------------------------------- element helpers
inline uint32_t f32_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float bits_f32(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
inline uint64_t f64_bits(double x) { uint64_t u; std::memcpy(&u, &x, 8); return u; }

inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }
// Round to nearest even, NaN -> quiet NaN (c10::BFloat16's scalar rounding).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}
inline bool f32_nonfinite(float r) { return (f32_bits(r) & 0x7f800000u) == 0x7f800000u; }
inline bool f64_nonfinite(double r) {
  return (f64_bits(r) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

template <bool FMA>
inline float op32(float p, float g, float a) {
  if (FMA) return __builtin_fmaf(g, a, p);
  return p + a * g;  // -ffp-contract=off: two roundings, as torch's DEFAULT kernels
}
template <bool FMA>
inline double op64(double p, double g, double a) {
  if (FMA) return __builtin_fma(g, a, p);
  return p + a * g;
}

// ---------------------------------------------------------------- loops (generic code; the x86
// dispatch below instantiates them again inside avx2/fma/f16c functions so that they vectorise)
template <bool FMA, bool CHECK>
inline bool loop_f32(const float* p, const float* g, float* o, int64_t n, float a) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    float r = op32<FMA>(p[i], g[i], a);
    o[i] = r;
    if (CHECK) bad |= static_cast<uint32_t>(f32_nonfinite(r));
  }
  return bad != 0;
}

template <bool FMA, bool CHECK>
inline bool loop_f64(const double* p, const double* g, double* o, int64_t n, double a) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    double r = op64<FMA>(p[i], g[i], a);
    o[i] = r;
    if (CHECK) bad |= static_cast<uint32_t>(f64_nonfinite(r));
  }
  return bad != 0;
}

template <bool FMA, bool CHECK>
inline bool loop_bf16(const uint16_t* p, const uint16_t* g, uint16_t* o, int64_t n, float a) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    float r = op32<FMA>(bf16_to_f32(p[i]), bf16_to_f32(g[i]), a);
    uint16_t b = f32_to_bf16(r);
    o[i] = b;
    if (CHECK) bad |= static_cast<uint32_t>((b & 0x7F80u) == 0x7F80u);
  }
  return bad != 0;
}

template <bool FMA, bool CHECK>
inline bool loop_f16_generic(const c10::Half* p, const c10::Half* g, c10::Half* o, int64_t n, float a) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    c10::Half h(op32<FMA>(static_cast<float>(p[i]), static_cast<float>(g[i]), a));
    o[i] = h;
    if (CHECK) bad |= static_cast<uint32_t>((h.x & 0x7C00u) == 0x7C00u);
  }
  return bad != 0;
}

template <typename T>
inline void copy_elems(const T* p, T* o, int64_t n) {
  if (p != o) std::memcpy(o, p, static_cast<size_t>(n) * sizeof(T));
}

// One segment piece [lo, hi) of segment s; returns the non-finite flag.
template <bool CHECK>
bool run_generic(const Seg& s, int64_t lo, int64_t hi) {
  const int64_t n = hi - lo;
  const bool fma = s.mode & 1;
  switch (s.code) {
    case kF32: {
      auto p = static_cast<const float*>(s.p) + lo;
      auto o = static_cast<float*>(s.o) + lo;
      if (!s.g) {
        copy_elems(p, o, n);
        if (!CHECK) return false;
        bool b = false;
        for (int64_t i = 0; i < n; ++i) b |= f32_nonfinite(p[i]);
        return b;
      }
      auto g = static_cast<const float*>(s.g) + lo;
      float a = static_cast<float>(s.alpha);
      return fma ? loop_f32<true, CHECK>(p, g, o, n, a) : loop_f32<false, CHECK>(p, g, o, n, a);
    }
    case kF64: {
      auto p = static_cast<const double*>(s.p) + lo;
      auto o = static_cast<double*>(s.o) + lo;
      if (!s.g) {
        copy_elems(p, o, n);
        if (!CHECK) return false;
        bool b = false;
        for (int64_t i = 0; i < n; ++i) b |= f64_nonfinite(p[i]);
        return b;
      }
      auto g = static_cast<const double*>(s.g) + lo;
      return fma ? loop_f64<true, CHECK>(p, g, o, n, s.alpha) : loop_f64<false, CHECK>(p, g, o, n, s.alpha);
    }
    case kBF16: {
      auto p = static_cast<const uint16_t*>(s.p) + lo;
      auto o = static_cast<uint16_t*>(s.o) + lo;
      if (!s.g) {
        copy_elems(p, o, n);
        if (!CHECK) return false;
        bool b = false;
        for (int64_t i = 0; i < n; ++i) b |= (p[i] & 0x7F80u) == 0x7F80u;
        return b;
      }
      auto g = static_cast<const uint16_t*>(s.g) + lo;
      float a = static_cast<float>(s.alpha);
      return fma ? loop_bf16<true, CHECK>(p, g, o, n, a) : loop_bf16<false, CHECK>(p, g, o, n, a);
    }
    case kF16: {
      auto p = static_cast<const c10::Half*>(s.p) + lo;
      auto o = static_cast<c10::Half*>(s.o) + lo;
      if (!s.g) {
        copy_elems(p, o, n);
        if (!CHECK) return false;
        bool b = false;
        for (int64_t i = 0; i < n; ++i) b |= (p[i].x & 0x7C00u) == 0x7C00u;
        return b;
      }
      auto g = static_cast<const c10::Half*>(s.g) + lo;
      float a = static_cast<float>(s.alpha);
      return fma ? loop_f16_generic<true, CHECK>(p, g, o, n, a) : loop_f16_generic<false, CHECK>(p, g, o, n, a);
    }
  }
  return false;
}

#if FASTMFT_X86
// The same loops compiled for AVX2 + FMA + F16C (chosen at run time when the CPU has them):
// identical arithmetic (explicit fma or explicit multiply-then-add), wider instructions.
#define FASTMFT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_f32(const float* p, const float* g, float* o, int64_t n, float a) {
  return loop_f32<FMA, CHECK>(p, g, o, n, a);
}
template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_f64(const double* p, const double* g, double* o, int64_t n, double a) {
  return loop_f64<FMA, CHECK>(p, g, o, n, a);
}
template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_bf16(const uint16_t* p, const uint16_t* g, uint16_t* o, int64_t n, float a) {
  return loop_bf16<FMA, CHECK>(p, g, o, n, a);
}
template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_f16(const uint16_t* p, const uint16_t* g, uint16_t* o, int64_t n, float a) {
  const __m256 va = _mm256_set1_ps(a);
  const __m256i expmask = _mm256_set1_epi32(0x7C00);
  __m256i bad = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 vp = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    __m256 vg = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i)));
    __m256 r = FMA ? _mm256_fmadd_ps(vg, va, vp) : _mm256_add_ps(vp, _mm256_mul_ps(va, vg));
    __m128i h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
    if (CHECK) {
      __m256i e = _mm256_and_si256(_mm256_cvtepu16_epi32(h), expmask);
      bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, expmask));
    }
  }
  uint32_t tail_bad = 0;
  for (; i < n; ++i) {
    float r = op32<FMA>(_cvtsh_ss(p[i]), _cvtsh_ss(g[i]), a);
    uint16_t h = _cvtss_sh(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    o[i] = h;
    if (CHECK) tail_bad |= static_cast<uint32_t>((h & 0x7C00u) == 0x7C00u);
  }
  return CHECK && (tail_bad || !_mm256_testz_si256(bad, bad));
}

// float32 with non-temporal (streaming) stores: for calls whose output is far larger than the
// last-level cache, theta' bypasses the cache, which saves the read-for-ownership of every output
// line (16 -> 12 bytes moved per element). Same arithmetic as avx2_f32 (bitwise equal results).
template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_f32_stream(const float* p, const float* g, float* o, int64_t n, float a) {
  int64_t i = 0;
  uint32_t bad = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(o + i) & 31) != 0; ++i) {
    float r = op32<FMA>(p[i], g[i], a);
    o[i] = r;
    if (CHECK) bad |= static_cast<uint32_t>(f32_nonfinite(r));
  }
  const __m256 va = _mm256_set1_ps(a);
  const __m256i expmask = _mm256_set1_epi32(0x7f800000);
  __m256i badv = _mm256_setzero_si256();
  for (; i + 16 <= n; i += 16) {
    __m256 p0 = _mm256_loadu_ps(p + i), p1 = _mm256_loadu_ps(p + i + 8);
    __m256 g0 = _mm256_loadu_ps(g + i), g1 = _mm256_loadu_ps(g + i + 8);
    __m256 r0 = FMA ? _mm256_fmadd_ps(g0, va, p0) : _mm256_add_ps(p0, _mm256_mul_ps(va, g0));
    __m256 r1 = FMA ? _mm256_fmadd_ps(g1, va, p1) : _mm256_add_ps(p1, _mm256_mul_ps(va, g1));
    _mm256_stream_ps(o + i, r0);
    _mm256_stream_ps(o + i + 8, r1);
    if (CHECK) {
      __m256i e0 = _mm256_and_si256(_mm256_castps_si256(r0), expmask);
      __m256i e1 = _mm256_and_si256(_mm256_castps_si256(r1), expmask);
      badv = _mm256_or_si256(badv, _mm256_or_si256(_mm256_cmpeq_epi32(e0, expmask), _mm256_cmpeq_epi32(e1, expmask)));
    }
  }
  for (; i < n; ++i) {
    float r = op32<FMA>(p[i], g[i], a);
    o[i] = r;
    if (CHECK) bad |= static_cast<uint32_t>(f32_nonfinite(r));
  }
  return CHECK && (bad || !_mm256_testz_si256(badv, badv));
}

// bfloat16 with streaming stores: 16 values per step, fp32 math, round to nearest even (NaN ->
// 0x7FC0) exactly as loop_bf16 does.
FASTMFT_AVX2 inline __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FASTMFT_AVX2 inline __m256i f32_to_bf16x8(__m256 r) {  // bf16 bits in the low half of each lane
  const __m256i u = _mm256_castps_si256(r);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i t = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

template <bool FMA, bool CHECK>
FASTMFT_AVX2 bool avx2_bf16_stream(const uint16_t* p, const uint16_t* g, uint16_t* o, int64_t n, float a) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(o) & 31;
  if (mis & 1) return loop_bf16<FMA, CHECK>(p, g, o, n, a);  // cannot align: ordinary stores
  int64_t i = std::min<int64_t>(n, mis ? static_cast<int64_t>((32 - mis) / 2) : 0);
  bool bad = i > 0 && loop_bf16<FMA, CHECK>(p, g, o, i, a);
  const __m256 va = _mm256_set1_ps(a);
  const __m256i expmask = _mm256_set1_epi32(0x7F80);
  __m256i badv = _mm256_setzero_si256();
  for (; i + 16 <= n; i += 16) {
    const __m256i vp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i vg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i));
    const __m256 p0 = bf16x8_to_f32(_mm256_castsi256_si128(vp)), p1 = bf16x8_to_f32(_mm256_extracti128_si256(vp, 1));
    const __m256 g0 = bf16x8_to_f32(_mm256_castsi256_si128(vg)), g1 = bf16x8_to_f32(_mm256_extracti128_si256(vg, 1));
    const __m256 r0 = FMA ? _mm256_fmadd_ps(g0, va, p0) : _mm256_add_ps(p0, _mm256_mul_ps(va, g0));
    const __m256 r1 = FMA ? _mm256_fmadd_ps(g1, va, p1) : _mm256_add_ps(p1, _mm256_mul_ps(va, g1));
    const __m256i t0 = f32_to_bf16x8(r0), t1 = f32_to_bf16x8(r1);
    // packus works per 128-bit lane: [t0 0-3, t1 0-3 | t0 4-7, t1 4-7] -> reorder the 64-bit quarters
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(t0, t1), 0xD8);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(o + i), packed);
    if (CHECK) {
      badv = _mm256_or_si256(badv, _mm256_cmpeq_epi32(_mm256_and_si256(t0, expmask), expmask));
      badv = _mm256_or_si256(badv, _mm256_cmpeq_epi32(_mm256_and_si256(t1, expmask), expmask));
    }
  }
  if (i < n) bad |= loop_bf16<FMA, CHECK>(p + i, g + i, o + i, n - i, a);
  return CHECK && (bad || !_mm256_testz_si256(badv, badv));
}

template <bool CHECK>
bool run_avx2(const Seg& s, int64_t lo, int64_t hi, bool stream) {
  if (!s.g) return run_generic<CHECK>(s, lo, hi);
  const int64_t n = hi - lo;
  const bool fma = s.mode & 1;
  switch (s.code) {
    case kF32: {
      auto p = static_cast<const float*>(s.p) + lo;
      auto g = static_cast<const float*>(s.g) + lo;
      auto o = static_cast<float*>(s.o) + lo;
      float a = static_cast<float>(s.alpha);
      if (stream)
        return fma ? avx2_f32_stream<true, CHECK>(p, g, o, n, a) : avx2_f32_stream<false, CHECK>(p, g, o, n, a);
      return fma ? avx2_f32<true, CHECK>(p, g, o, n, a) : avx2_f32<false, CHECK>(p, g, o, n, a);
    }
    case kF64: {
      auto p = static_cast<const double*>(s.p) + lo;
      auto g = static_cast<const double*>(s.g) + lo;
      auto o = static_cast<double*>(s.o) + lo;
      return fma ? avx2_f64<true, CHECK>(p, g, o, n, s.alpha) : avx2_f64<false, CHECK>(p, g, o, n, s.alpha);
    }
    case kBF16:
    case kF16: {
      auto p = static_cast<const uint16_t*>(s.p) + lo;
      auto g = static_cast<const uint16_t*>(s.g) + lo;
      auto o = static_cast<uint16_t*>(s.o) + lo;
      float a = static_cast<float>(s.alpha);
      if (s.code == kBF16 && stream)
        return fma ? avx2_bf16_stream<true, CHECK>(p, g, o, n, a) : avx2_bf16_stream<false, CHECK>(p, g, o, n, a);
      if (s.code == kBF16)
        return fma ? avx2_bf16<true, CHECK>(p, g, o, n, a) : avx2_bf16<false, CHECK>(p, g, o, n, a);
      return fma ? avx2_f16<true, CHECK>(p, g, o, n, a) : avx2_f16<false, CHECK>(p, g, o, n, a);
    }
  }
  return false;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

bool run_piece(const Seg& s, int64_t lo, int64_t hi, bool check, bool stream) {
#if FASTMFT_X86
  if (cpu_has_avx2()) return check ? run_avx2<true>(s, lo, hi, stream) : run_avx2<false>(s, lo, hi, stream);
#else
  (void)stream;
#endif
  return check ? run_generic<true>(s, lo, hi) : run_generic<false>(s, lo, hi);
}

// Elements [begin, end) of the global index space.
bool run_range(const std::vector<Seg>& segs, int64_t begin, int64_t end, bool check, bool stream) {
  if (begin >= end) return false;
  // First segment whose range contains `begin`.
  auto it = std::upper_bound(segs.begin(), segs.end(), begin,
                             [](int64_t v, const Seg& s) { return v < s.begin; });
  size_t k = static_cast<size_t>(std::distance(segs.begin(), it)) - 1;
  bool bad = false;
  int64_t pos = begin;
  while (pos < end && k < segs.size()) {
    const Seg& s = segs[k];
    int64_t lo = pos - s.begin;
    int64_t hi = std::min(s.n, end - s.begin);
    if (hi > lo) bad |= run_piece(s, lo, hi, check, stream);
    pos = s.begin + s.n;
    ++k;
  }
#if FASTMFT_X86
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish before the join
#endif
  return bad;
}

constexpr int64_t kSerialBelow = 1 << 15;  // elements: below this one thread beats a fork/join
constexpr int64_t kAlign = 64;             // split points are multiples of 64 elements

// Output bytes above which stores stream past the cache: 4 x the last-level cache, at least 16 MiB
// (measured on 2 EPYC cores, 32 MiB L3: BERT-base, 438 MB out, +25 % with streaming; MiniLM, 91 MB,
// a few % better with ordinary stores).
// FASTMFT_STREAM_STORES=0/1 forces the choice (benchmarking).
int64_t last_level_cache_bytes() {
  // sysfs first: inside VMs sysconf often reports the host socket's cache, not this CPU's share
  for (int idx = 3; idx >= 2; --idx) {
    std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size";
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      long v = 0;
      char unit = 0;
      int got = std::fscanf(f, "%ld%c", &v, &unit);
      std::fclose(f);
      if (got >= 1 && v > 0) return v * (unit == 'K' ? 1024L : unit == 'M' ? 1024L * 1024 : 1L);
    }
  }
  long l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return l3 > 0 ? l3 : int64_t{32} << 20;
}

int64_t stream_threshold() {
  static const int64_t t = [] {
    const char* env = std::getenv("FASTMFT_STREAM_STORES");
    if (env && env[0] == '0') return static_cast<int64_t>(INT64_MAX);
    if (env && env[0] == '1') return int64_t{0};
    return std::max<int64_t>(int64_t{16} << 20, 4 * last_level_cache_bytes());
  }();
  return t;
}

}  // namespace

at::Tensor inner_step_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                          at::TensorList outs, double lr, bool check_finite, at::IntArrayRef modes) {
  const Plan args = plan(params, grads, outs, modes, at::Device(at::kCPU));
  const double alpha = -lr;
  std::vector<Seg> segs;
  int64_t total = 0;
  for (int code = 0; code < kNumCodes; ++code) {
    const int mode = static_cast<int>(modes[code]);
    const double a = rounded_alpha(alpha, code, mode);
    for (const Segment& t : args.groups[code]) {
      segs.push_back(Seg{t, total, code, mode, a});
      total += t.n;
    }
  }

  int64_t out_bytes = 0;
  for (const Seg& s : segs) out_bytes += s.n * (s.code == kF64 ? 8 : s.code == kF32 ? 4 : 2);
  const bool stream = out_bytes >= stream_threshold();
  bool bad = false;
  int nthreads = (total < kSerialBelow || omp_in_parallel()) ? 1 : at::get_num_threads();
  if (nthreads <= 1) {
    bad = run_range(segs, 0, total, check_finite, stream);
  } else {
    int bad_any = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad_any)
    {
      const int t = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      int64_t per = (total + nt - 1) / nt;
      per = (per + kAlign - 1) / kAlign * kAlign;
      const int64_t b = std::min<int64_t>(total, static_cast<int64_t>(t) * per);
      const int64_t e = std::min<int64_t>(total, b + per);
      bad_any |= static_cast<int>(run_range(segs, b, e, check_finite, stream));
    }
    bad = bad_any != 0;
  }

  at::Tensor flag = at::empty({}, at::TensorOptions().dtype(at::kBool));
  *flag.mutable_data_ptr<bool>() = bad;
  step_slow(params, grads, outs, args.slow, alpha, check_finite, flag);
  return flag;
}

}  // namespace fastmft

namespace {
std::string build_info() {
  std::string s = "cpu:openmp";
#if FASTMFT_X86
  s += fastmft::cpu_has_avx2() ? "+avx2" : "+generic";
#endif
#ifdef FASTMFT_WITH_CUDA
  s += ";cuda";
#endif
  return s;
}
}  // namespace

TORCH_LIBRARY(fastmft_C, m) {
  m.def(fastmft::kInnerStepSchema);
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(fastmft_C, CPU, m) { m.impl("inner_step_", &fastmft::inner_step_cpu); }
