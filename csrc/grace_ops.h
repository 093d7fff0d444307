// megatron-grace dispatch ops: shared declarations and the exact arithmetic of the grace policy.
//
// The op schemas live in one place, grace_ops.cpp (TORCH_LIBRARY(grace, m)); the CPU kernels are
// in grace_ops.cpp and the CUDA kernels in grace_ops_cuda.cu (TORCH_LIBRARY_IMPL(grace, CUDA, m)).
// Fake (meta) implementations for torch.compile are registered in Python (megatron_grace/_ops.py).
// No op has an autograd formula: the layer is inference-only.
//
// Value validation: the Python wrappers check ids/keys/indices only in debug mode (GRACE_DEBUG=1),
// before any kernel runs. The CUDA kernels never synchronise with the host: an out-of-range value
// fires CUDA_KERNEL_ASSERT (kept with NDEBUG) and the element is skipped, so no kernel reads or
// writes out of bounds. The CPU kernels may TORCH_CHECK values, but only outside parallel regions.

#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define GRACE_HD __host__ __device__ __forceinline__
#else
#define GRACE_HD inline
#endif

namespace grace {

// Constants of megatron_grace.routing.policies (same double literals).
constexpr double kPhi = 0.6180339887498949;   // golden ratio conjugate
constexpr double kR2A = 0.7548776662466927;   // plastic-number (R2) sequence constants
constexpr double kR2B = 0.5698402909980532;
constexpr double kQuotaEps = 1.0 - 1e-9;      // _pick_by_quota's clamp factor (rounded like Python's 1 - 1e-9)

// Double-precision add / multiply with one rounding each and no contraction into FMA, so host
// and device code reproduce the pure-torch elementwise kernels bit for bit.
GRACE_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;  // built with -ffp-contract=off
#endif
}
GRACE_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GRACE_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GRACE_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GRACE_HD double frac(double x) {  // torch.frac
#if defined(__CUDA_ARCH__)
  return x - ::trunc(x);
#else
  return x - std::trunc(x);
#endif
}

GRACE_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Whether every entry of an expert's hosts row is a GPU in [0, G) or the -1 padding.
GRACE_HD bool hosts_row_ok(const int64_t* hosts_row, int64_t R, int64_t G) {
  bool ok = true;
  for (int64_t c = 0; c < R; ++c) ok &= hosts_row[c] >= -1 && hosts_row[c] < G;
  return ok;
}

// The grace policy's choice for one (token, expert) pair whose expert has several copies.
//   hosts_row: the expert's R hosting GPUs (-1 padded); src: the token's GPU; rank: the pair's rank
//   among pairs of the same (src, expert) key in token order; key = src * E + expert.
//   step: the forward-pass counter (an integer value held in a double, as the params tensor stores it).
// Every hosts_row entry must be in [-1, G) (spare/pred have G entries); callers guard that.
// Mirrors megatron_grace.routing.policies._grace + _pick_by_quota operation by operation.
GRACE_HD int64_t grace_pick(const int64_t* hosts_row, int64_t R, int64_t src, int64_t key, int64_t rank,
                            const double* spare, const double* pred, int64_t gpn, double step, double mean,
                            double hot_threshold, bool offload) {
  const int64_t src_node = floor_div(src, gpn);
  bool has_gpu = false, has_node = false, roomy_peer = false;
  for (int64_t c = 0; c < R; ++c) {
    const int64_t g = hosts_row[c];
    if (g < 0) continue;
    const bool on_gpu = g == src;
    const bool on_node = floor_div(g, gpn) == src_node;
    has_gpu |= on_gpu;
    has_node |= on_node;
    roomy_peer |= on_node && !on_gpu && pred[g] < mean;
  }
  // tier: 0 = own GPU, 1 = own node, 2 = any present copy
  int tier = has_gpu ? 0 : (has_node ? 1 : 2);
  if (offload && has_gpu && roomy_peer && pred[src] > hot_threshold) tier = 1;
  // u = frac(frac(key * A + step * B) + (rank + 0.5) * phi), each operation rounded as in torch
  const double offset = frac(dadd(dmul(static_cast<double>(key), kR2A), dmul(step, kR2B)));
  const double u = frac(dadd(offset, dmul(static_cast<double>(rank) + 0.5, kPhi)));
  // cumulative weights (sequential, as torch.cumsum on a row), then count(cw <= target)
  double total = 0.0;
  for (int64_t c = 0; c < R; ++c) {
    const int64_t g = hosts_row[c];
    const bool in_tier = g >= 0 && (tier == 0 ? g == src : (tier == 1 ? floor_div(g, gpn) == src_node : true));
    total = dadd(total, in_tier ? spare[g] : 0.0);
  }
  bool all_zero = total == 0.0;  // no candidate: column 0 (as torch's `flat_w[sum == 0, 0] = 1`)
  if (all_zero) total = 1.0;
  const double a = dmul(u, total), b = dmul(total, kQuotaEps);
  const double target = a < b ? a : b;  // torch.minimum (no NaN here)
  double cw = 0.0;
  int64_t count = 0;
  for (int64_t c = 0; c < R; ++c) {
    const int64_t g = hosts_row[c];
    double w;
    if (all_zero) {
      w = c == 0 ? 1.0 : 0.0;
    } else {
      const bool in_tier = g >= 0 && (tier == 0 ? g == src : (tier == 1 ? floor_div(g, gpn) == src_node : true));
      w = in_tier ? spare[g] : 0.0;
    }
    cw = dadd(cw, w);
    count += cw <= target ? 1 : 0;
  }
  return count < R - 1 ? count : R - 1;
}

}  // namespace grace
