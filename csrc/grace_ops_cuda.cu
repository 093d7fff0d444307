// megatron-grace ops: CUDA kernels (TORCH_LIBRARY_IMPL(grace, CUDA, m)). Schemas and the meaning of
// every op: grace_ops.cpp. Built only where torch has CUDA and nvcc exists (setup.py); compile-checked
// on CPU-only machines by scripts/nvcc_compile_check.sh.
//
// Determinism: integer atomics only (counts); every float output element is written by one thread
// that adds its terms in a fixed order, with __fmul_rn/__fadd_rn (no FMA contraction), so results
// are bit-identical to the pure-torch path and independent of the launch configuration.
//
// Headers: no ATen/cuda/CUDAContext.h (see scripts/nvcc_compile_check.sh); the stream comes from
// c10/cuda/CUDAStream.h.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "grace_ops.h"

namespace grace {
namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  const int64_t b = (n + per_block - 1) / per_block;
  return b < 1 ? 1 : (b > 65535 * 32 ? 65535 * 32 : b);
}

at::Tensor long_1d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong || t.scalar_type() == at::kShort,
              op, ": ", name, " must be an integer tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
}

// ---------------------------------------------------------------- histogram / counting sort

__global__ void histogram_kernel(const int64_t* __restrict__ v, int64_t n, int64_t bins, bool allow_minus_one,
                                 unsigned long long* __restrict__ counts, int* __restrict__ bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = v[i];
    if (x >= 0 && x < bins) {
      atomicAdd(counts + x, 1ULL);  // integer atomics: order-independent result
    } else if (!(allow_minus_one && x == -1)) {
      atomicExch(bad, 1);
    }
  }
}

at::Tensor histogram(const at::Tensor& v, int64_t bins, bool allow_minus_one, const char* op) {
  auto counts = at::zeros({bins}, v.options().dtype(at::kLong));
  auto bad = at::zeros({1}, v.options().dtype(at::kInt));
  const int64_t n = v.numel();
  if (n) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    histogram_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        v.data_ptr<int64_t>(), n, bins, allow_minus_one,
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    TORCH_CHECK(bad.item<int>() == 0, op, ": value out of range [", allow_minus_one ? -1 : 0, ", ", bins, ")");
  }
  return counts;
}

// ---------------------------------------------------------------- row gather / scatter

// One warp-strided loop per row; 16-byte vectors when the row size and pointers allow.
template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x, const int64_t* __restrict__ index,
                                   const int64_t* __restrict__ order, int64_t n, int64_t row_vecs, vec_t* __restrict__ out) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t r = index[order ? order[i] : i];
    const vec_t* s = x + r * row_vecs;
    vec_t* d = out + i * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) d[c] = s[c];
  }
}

template <typename vec_t>
__global__ void scatter_rows_kernel(const vec_t* __restrict__ y, const int64_t* __restrict__ order, int64_t n,
                                    int64_t row_vecs, vec_t* __restrict__ out) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const vec_t* s = y + i * row_vecs;
    vec_t* d = out + order[i] * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) d[c] = s[c];
  }
}

template <typename F>
void with_vector_type(const void* a, const void* b, int64_t row_bytes, F&& f) {
  const auto aligned = [&](int64_t k) {
    return row_bytes % k == 0 && reinterpret_cast<uintptr_t>(a) % k == 0 && reinterpret_cast<uintptr_t>(b) % k == 0;
  };
  if (aligned(16)) f(uint4{}, row_bytes / 16);
  else if (aligned(8)) f(uint2{}, row_bytes / 8);
  else if (aligned(4)) f(uint32_t{}, row_bytes / 4);
  else f(uint8_t{}, row_bytes);
}

__global__ void check_range_kernel(const int64_t* __restrict__ v, const int64_t* __restrict__ through, int64_t n, int64_t lo,
                                   int64_t hi, int* __restrict__ bad) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = through ? v[through[i]] : v[i];
    if (x < lo || x >= hi) atomicExch(bad, 1);
  }
}

// ---------------------------------------------------------------- weighted combine

__global__ void combine_table_kernel(const int64_t* __restrict__ row, const int64_t* __restrict__ pos, int64_t n,
                                     int64_t num_rows, int64_t width, int64_t* __restrict__ table, int* __restrict__ bad) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = row[p], j = pos[p];
    if (r < 0 || r >= num_rows || j < 0 || j >= width) { atomicExch(bad, 1); continue; }
    const unsigned long long prev = atomicCAS(reinterpret_cast<unsigned long long*>(table + r * width + j),
                                              static_cast<unsigned long long>(-1LL), static_cast<unsigned long long>(p));
    if (prev != static_cast<unsigned long long>(-1LL)) atomicExch(bad, 2);  // duplicate (row, pos)
  }
}

template <typename acc_t> struct Acc;
template <> struct Acc<float> {
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
};
template <> struct Acc<double> {
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
};

// grid: (row blocks, column blocks); each thread owns one output element of a row and adds that
// row's terms in position order.
template <typename in_t, typename acc_t, typename out_t>
__global__ void combine_kernel(const in_t* __restrict__ v, const acc_t* __restrict__ w, const int64_t* __restrict__ table,
                               const int64_t* __restrict__ vidx, int64_t num_rows, int64_t width, int64_t h,
                               out_t* __restrict__ out) {
  const int64_t c = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
  if (c >= h) return;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t p = table[r * width + j];
      if (p < 0) continue;
      const int64_t src = vidx ? vidx[p] : p;
      acc = Acc<acc_t>::add(acc, Acc<acc_t>::mul(w[p], static_cast<acc_t>(v[src * h + c])));
    }
    out[r * h + c] = static_cast<out_t>(acc);
  }
}

// ---------------------------------------------------------------- grace policy

// key (src * E + e) of each pair whose expert has several copies, else -1; out = -1 (dropped) or 0.
__global__ void grace_keys_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ src, const int64_t* __restrict__ copies,
                                  int64_t T, int64_t k, int64_t E, int64_t R, int64_t G, int64_t* __restrict__ key,
                                  int64_t* __restrict__ out, int* __restrict__ bad) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < T * k; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = ids[p], s = src[p / k];
    if (e < -1 || e >= E || s < 0 || s >= G) { atomicExch(bad, 1); key[p] = -1; out[p] = -1; continue; }
    const bool multi = e >= 0 && R > 1 && copies[e] > 1;
    key[p] = multi ? s * E + e : -1;
    out[p] = e < 0 ? -1 : 0;
  }
}

// rank of sorted entry i among equal keys = i - (first index of its key): a binary search per entry.
__global__ void grace_pick_kernel(const int64_t* __restrict__ sorted_key, const int64_t* __restrict__ order, int64_t n,
                                  const int64_t* __restrict__ ids, const int64_t* __restrict__ src, const int64_t* __restrict__ hosts,
                                  int64_t k, int64_t R, const double* __restrict__ spare, const double* __restrict__ pred,
                                  int64_t gpn, int64_t step, double mean, double hot_threshold, bool offload,
                                  int64_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t key = sorted_key[i];
    if (key < 0) continue;
    int64_t lo = 0, hi = i;  // first index with sorted_key == key
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_key[mid] < key) lo = mid + 1; else hi = mid;
    }
    const int64_t p = order[i];
    const int64_t e = ids[p], s = src[p / k];
    out[p] = grace_pick(hosts + e * R, R, s, key, i - lo, spare, pred, gpn, step, mean, hot_threshold, offload);
  }
}

}  // namespace

// ---------------------------------------------------------------- op entry points

at::Tensor destination_histogram_cuda(const at::Tensor& dest, int64_t num_destinations) {
  TORCH_CHECK(num_destinations >= 0, "destination_histogram: num_destinations must be >= 0");
  c10::cuda::CUDAGuard guard(dest.device());
  auto d = long_1d(dest, "destination_histogram", "dest");
  return histogram(d, num_destinations, /*allow_minus_one=*/true, "destination_histogram");
}

std::tuple<at::Tensor, at::Tensor> sort_by_key_cuda(const at::Tensor& key_in, int64_t num_keys) {
  TORCH_CHECK(num_keys >= 0, "sort_by_key: num_keys must be >= 0, got ", num_keys);
  c10::cuda::CUDAGuard guard(key_in.device());
  auto key = long_1d(key_in, "sort_by_key", "key");
  auto counts = histogram(key, num_keys, /*allow_minus_one=*/false, "sort_by_key");
  if (key.numel() == 0) return {at::empty({0}, key.options()), counts};
  // A stable radix sort (cub, through at::sort) gives exactly torch.sort(stable=True)'s order.
  auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  return {order, counts};
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& index_in, const c10::optional<at::Tensor>& order_in) {
  TORCH_CHECK(x_in.dim() >= 1, "gather_rows: x must have a row dimension");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  check_same_device(x, index_in, "gather_rows", "index");
  auto index = long_1d(index_in, "gather_rows", "index");
  at::Tensor order;
  if (order_in.has_value()) {
    check_same_device(x, *order_in, "gather_rows", "order");
    order = long_1d(*order_in, "gather_rows", "order");
  }
  const int64_t N = x.size(0), m = index.numel(), n = order.defined() ? order.numel() : m;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  if (n == 0 || out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto bad = at::zeros({2}, index.options().dtype(at::kInt));
  if (order.defined()) {
    check_range_kernel<<<blocks_for(n), kThreads, 0, stream>>>(order.data_ptr<int64_t>(), nullptr, n, 0, m, bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    TORCH_CHECK(bad.item<int>() == 0, "gather_rows: order value out of range [0, ", m, ")");
  }
  check_range_kernel<<<blocks_for(m), kThreads, 0, stream>>>(index.data_ptr<int64_t>(), nullptr, m, 0, N, bad.data_ptr<int>() + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(bad[1].item<int>() == 0, "gather_rows: index value out of range [0, ", N, ")");
  const int64_t row_bytes = x.numel() / N * x.element_size();
  const int64_t* ord = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  with_vector_type(x.data_ptr(), out.data_ptr(), row_bytes, [&](auto vec, int64_t row_vecs) {
    using vec_t = decltype(vec);
    const int threads = row_vecs >= 256 ? 256 : (row_vecs >= 64 ? 128 : 32);
    gather_rows_kernel<vec_t><<<blocks_for(n, 1), threads, 0, stream>>>(
        static_cast<const vec_t*>(x.data_ptr()), index.data_ptr<int64_t>(), ord, n, row_vecs, static_cast<vec_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& y_in, const at::Tensor& order_in) {
  TORCH_CHECK(y_in.dim() >= 1, "scatter_rows: y must have a row dimension");
  c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  check_same_device(y, order_in, "scatter_rows", "order");
  auto order = long_1d(order_in, "scatter_rows", "order");
  const int64_t n = y.size(0);
  TORCH_CHECK(order.numel() == n, "scatter_rows: order has ", order.numel(), " entries, y has ", n, " rows");
  auto out = at::empty_like(y);
  if (n == 0 || y.numel() == 0) return out;
  // order must be a permutation: check it by counting (a histogram with every count == 1).
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto counts = histogram(order, n, /*allow_minus_one=*/false, "scatter_rows");
  TORCH_CHECK(counts.eq(1).all().item<bool>(), "scatter_rows: order must be a permutation of [0, ", n, ")");
  const int64_t row_bytes = y.numel() / n * y.element_size();
  with_vector_type(y.data_ptr(), out.data_ptr(), row_bytes, [&](auto vec, int64_t row_vecs) {
    using vec_t = decltype(vec);
    const int threads = row_vecs >= 256 ? 256 : (row_vecs >= 64 ? 128 : 32);
    scatter_rows_kernel<vec_t><<<blocks_for(n, 1), threads, 0, stream>>>(
        static_cast<const vec_t*>(y.data_ptr()), order.data_ptr<int64_t>(), n, row_vecs, static_cast<vec_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor weighted_combine_cuda(const at::Tensor& values_in, const at::Tensor& row_in, const at::Tensor& pos_in,
                                 const at::Tensor& weight_in, int64_t num_rows, int64_t width, at::ScalarType out_dtype,
                                 const c10::optional<at::Tensor>& value_index_in) {
  const char* op = "weighted_combine";
  TORCH_CHECK(values_in.dim() == 2, op, ": values must be [m, h], got ", values_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(values_in.scalar_type()), op, ": values must be floating point");
  TORCH_CHECK(at::isFloatingType(out_dtype), op, ": out_dtype must be floating point");
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0");
  c10::cuda::CUDAGuard guard(values_in.device());
  auto values = values_in.contiguous();
  check_same_device(values, row_in, op, "row");
  check_same_device(values, pos_in, op, "pos");
  check_same_device(values, weight_in, op, "weight");
  auto row = long_1d(row_in, op, "row");
  auto pos = long_1d(pos_in, op, "pos");
  const int64_t n = row.numel(), m = values.size(0), h = values.size(1);
  TORCH_CHECK(pos.numel() == n && weight_in.dim() == 1 && weight_in.numel() == n, op, ": row, pos and weight must all be [n]");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor vidx;
  auto bad = at::zeros({2}, row.options().dtype(at::kInt));
  if (value_index_in.has_value()) {
    check_same_device(values, *value_index_in, op, "value_index");
    vidx = long_1d(*value_index_in, op, "value_index");
    TORCH_CHECK(vidx.numel() == n, op, ": value_index must be [n]=", n);
    if (n) {
      check_range_kernel<<<blocks_for(n), kThreads, 0, stream>>>(vidx.data_ptr<int64_t>(), nullptr, n, 0, m, bad.data_ptr<int>() + 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    TORCH_CHECK(m == n, op, ": values has ", m, " rows but there are ", n, " entries (pass value_index)");
  }
  width = width < 1 ? 1 : width;
  const auto acc_type = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto weight = weight_in.to(acc_type).contiguous();
  auto table = at::full({num_rows, width}, -1, row.options());
  if (n) {
    combine_table_kernel<<<blocks_for(n), kThreads, 0, stream>>>(row.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), n, num_rows,
                                                                 width, table.data_ptr<int64_t>(), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto flags = bad.cpu();
    const int* f = flags.data_ptr<int>();
    TORCH_CHECK(f[0] != 1, op, ": row or pos out of range (rows [0, ", num_rows, "), positions [0, ", width, "))");
    TORCH_CHECK(f[0] != 2, op, ": two entries share the same (row, pos)");
    TORCH_CHECK(f[1] == 0, op, ": value_index out of range [0, ", m, ")");
  }
  // The kernel writes the values' dtype or the accumulation dtype; any other out_dtype is one
  // rounding from the accumulator afterwards (as the pure-torch path's final .to(out_dtype)).
  const bool direct = out_dtype == values.scalar_type();
  auto out = at::empty({num_rows, h}, values.options().dtype(direct ? out_dtype : acc_type));
  if (num_rows == 0 || h == 0) return direct ? out : out.to(out_dtype);
  const int threads = h >= 256 ? 256 : 128;
  const dim3 grid(static_cast<unsigned>(num_rows < 65535 * 8 ? num_rows : 65535 * 8), static_cast<unsigned>((h + threads - 1) / threads));
  const int64_t* vp = vidx.defined() ? vidx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "weighted_combine_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    if (direct) {
      combine_kernel<in_t, acc_t, in_t><<<grid, threads, 0, stream>>>(
          values.data_ptr<in_t>(), weight.data_ptr<acc_t>(), table.data_ptr<int64_t>(), vp, num_rows, width, h, out.data_ptr<in_t>());
    } else {
      combine_kernel<in_t, acc_t, acc_t><<<grid, threads, 0, stream>>>(
          values.data_ptr<in_t>(), weight.data_ptr<acc_t>(), table.data_ptr<int64_t>(), vp, num_rows, width, h, out.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) out = out.to(out_dtype);
  return out;
}

at::Tensor grace_choose_copies_cuda(const at::Tensor& topk_ids, const at::Tensor& src_gpu, const at::Tensor& hosts_in,
                                    const at::Tensor& copies_in, const at::Tensor& spare_in, const at::Tensor& pred_in,
                                    int64_t gpus_per_node, int64_t step, double mean, double hot_threshold, bool offload) {
  const char* op = "grace_choose_copies";
  TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be [T, k], got ", topk_ids.dim(), "-D");
  TORCH_CHECK(hosts_in.dim() == 2, op, ": hosts must be [E, R], got ", hosts_in.dim(), "-D");
  TORCH_CHECK(gpus_per_node > 0, op, ": gpus_per_node must be > 0");
  c10::cuda::CUDAGuard guard(topk_ids.device());
  for (const auto* t : {&src_gpu, &hosts_in, &copies_in, &spare_in, &pred_in}) check_same_device(topk_ids, *t, op, "an input");
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = hosts_in.size(0), R = hosts_in.size(1);
  auto ids = topk_ids.to(at::kLong).contiguous();
  auto src = long_1d(src_gpu, op, "src_gpu");
  auto hosts = hosts_in.to(at::kLong).contiguous();
  auto copies = long_1d(copies_in, op, "copies");
  auto spare = spare_in.to(at::kDouble).contiguous();
  auto pred = pred_in.to(at::kDouble).contiguous();
  const int64_t G = spare.numel();
  TORCH_CHECK(src.numel() == T, op, ": src_gpu must be [T]=", T);
  TORCH_CHECK(copies.numel() == E, op, ": copies must be [E]=", E);
  TORCH_CHECK(spare.dim() == 1 && pred.dim() == 1 && pred.numel() == G, op, ": spare and pred must both be [G]");
  auto out = at::empty({T, k}, ids.options());
  const int64_t n = T * k;
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto bad = at::zeros({2}, ids.options().dtype(at::kInt));
  if (E * R) {
    check_range_kernel<<<blocks_for(E * R), kThreads, 0, stream>>>(hosts.data_ptr<int64_t>(), nullptr, E * R, -1, G, bad.data_ptr<int>() + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto key = at::empty({n}, ids.options());
  grace_keys_kernel<<<blocks_for(n), kThreads, 0, stream>>>(ids.data_ptr<int64_t>(), src.data_ptr<int64_t>(), copies.data_ptr<int64_t>(),
                                                            T, k, E, R, G, key.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                                            bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto flags = bad.cpu();
  TORCH_CHECK(flags.data_ptr<int>()[0] == 0, op, ": topk_ids out of range [-1, ", E, ") or src_gpu out of range [0, ", G, ")");
  TORCH_CHECK(flags.data_ptr<int>()[1] == 0, op, ": hosts out of range [-1, ", G, ")");
  // group rank by (src, expert) key in token order: stable sort (ties keep token order), then
  // rank = sorted position - first position of the key.
  auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  grace_pick_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      std::get<0>(sorted).data_ptr<int64_t>(), std::get<1>(sorted).data_ptr<int64_t>(), n, ids.data_ptr<int64_t>(),
      src.data_ptr<int64_t>(), hosts.data_ptr<int64_t>(), k, R, spare.data_ptr<double>(), pred.data_ptr<double>(), gpus_per_node,
      step, mean, hot_threshold, offload, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace grace

TORCH_LIBRARY_IMPL(grace, CUDA, m) {
  m.impl("destination_histogram", &grace::destination_histogram_cuda);
  m.impl("sort_by_key", &grace::sort_by_key_cuda);
  m.impl("gather_rows", &grace::gather_rows_cuda);
  m.impl("scatter_rows", &grace::scatter_rows_cuda);
  m.impl("weighted_combine", &grace::weighted_combine_cuda);
  m.impl("grace_choose_copies", &grace::grace_choose_copies_cuda);
}
