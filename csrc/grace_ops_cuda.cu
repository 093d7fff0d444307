// megatron-grace ops: CUDA kernels (TORCH_LIBRARY_IMPL(grace, CUDA, m)). Schemas and the meaning of
// every op: grace_ops.cpp. Built only where torch has CUDA and nvcc exists (setup.py); compile-checked
// on CPU-only machines by scripts/nvcc_compile_check.sh.
//
// No host synchronisation: no op reads a device value on the host (no .item(), no .cpu(), no
// data-dependent output shape), so every op can be captured in a CUDA graph and runs ahead of the
// host. Value validation with readable errors is the Python wrappers' job in debug mode
// (GRACE_DEBUG=1, megatron_grace/_ops.py), before any kernel runs. Here an out-of-range value fires
// CUDA_KERNEL_ASSERT (a device-side assert; it stays on with NDEBUG) and the element is skipped, so
// no kernel ever reads or writes out of bounds. Host-side TORCH_CHECKs look at shapes, dtypes and
// devices only (host metadata).
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
#include <c10/macros/Macros.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "grace_ops.h"

namespace grace {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

inline unsigned blocks_for(int64_t n, int64_t per_block = kThreads, int64_t cap = 65535LL * 32) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : (b > cap ? cap : b));
}

at::Tensor long_1d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong || t.scalar_type() == at::kShort,
              op, ": ", name, " must be an integer tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// An int32 or int64 1-D key tensor as is (contiguous), int16 widened: the hot kernels read both.
at::Tensor key_1d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong || t.scalar_type() == at::kShort,
              op, ": ", name, " must be an integer tensor, got ", t.scalar_type());
  return (t.scalar_type() == at::kShort ? t.to(at::kInt) : t).contiguous();
}

template <typename F>
void with_key_type(const at::Tensor& key, F&& f) {
  if (key.scalar_type() == at::kInt) f(static_cast<const int32_t*>(key.data_ptr()));
  else f(static_cast<const int64_t*>(key.data_ptr()));
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
}

// Bytes of one row (dim 0 slice) of a contiguous tensor, also when it has no rows.
int64_t row_bytes_of(const at::Tensor& x) {
  int64_t elems = 1;
  for (int64_t d = 1; d < x.dim(); ++d) elems *= x.size(d);
  return elems * x.element_size();
}

// The widest vector (16/8/4/1 bytes) that divides the row size and both base pointers.
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

// One warp copies one row: lanes stride over the row's vectors, four loads in flight per lane.
template <typename vec_t>
__device__ __forceinline__ void warp_copy_row(const vec_t* __restrict__ s, vec_t* __restrict__ d, int64_t len, int lane) {
  int64_t c = lane;
  for (; c + 96 < len; c += 128) {
    const vec_t a = s[c], b = s[c + 32], e = s[c + 64], f = s[c + 96];
    d[c] = a;
    d[c + 32] = b;
    d[c + 64] = e;
    d[c + 96] = f;
  }
  for (; c < len; c += 32) d[c] = s[c];
}

// ---------------------------------------------------------------- histogram

// Counts of values in [0, bins); -1 ignored when allowed; anything else asserts and is skipped.
// Per-block shared-memory counters when `bins` fits (dynamic shared memory of bins ints).
template <typename key_t>
__global__ void histogram_kernel(const key_t* __restrict__ v, int64_t n, int64_t bins, bool allow_minus_one, bool smem,
                                 unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int sh_hist[];
  if (smem) {
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) sh_hist[b] = 0;
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = static_cast<int64_t>(v[i]);
    const bool ok = x >= 0 && x < bins;
    CUDA_KERNEL_ASSERT(ok || (allow_minus_one && x == -1));
    if (!ok) continue;
    if (smem) atomicAdd(sh_hist + x, 1u);
    else atomicAdd(counts + x, 1ULL);  // integer atomics: order-independent result
  }
  if (smem) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) {
      if (sh_hist[b]) atomicAdd(counts + b, static_cast<unsigned long long>(sh_hist[b]));
    }
  }
}

constexpr int64_t kSmemHistBins = 8192;  // 32 KiB of shared counters

at::Tensor histogram(const at::Tensor& v, int64_t bins, bool allow_minus_one) {
  auto counts = at::zeros({bins}, v.options().dtype(at::kLong));
  const int64_t n = v.numel();
  if (n == 0) return counts;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool smem = bins <= kSmemHistBins;
  const unsigned grid = blocks_for(n, kThreads * 8, 4096);
  with_key_type(v, [&](auto p) {
    using key_t = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    histogram_kernel<key_t><<<grid, kThreads, smem ? bins * sizeof(unsigned) : 0, stream>>>(
        p, n, bins, allow_minus_one, smem, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

// ---------------------------------------------------------------- counting sort / permute by key
//
// Two launches (plus a memset), no host sync:
//   1. key_count_kernel: block b counts the keys of its tile [b * tile, (b + 1) * tile) into column b
//      of a [K, B] matrix (key-major). The last block to finish (an atomic ticket) turns the matrix
//      into exclusive offsets (one scan in key-major order: keys ascending, blocks ascending within a
//      key, i.e. exactly the stable order) and writes counts [K].
//   2. key_place_kernel: block b ranks its tile stably: `rank_warps` warps own contiguous sub-tiles,
//      count them (warp __match_any_sync, a leader lane updates per-key counters in shared memory),
//      turn the counters into cursors from the block's column of the offsets, then walk the
//      sub-tile again in 32-item steps (rank among equal keys = popcount of the lower peer lanes)
//      and write order / position. For permute_by_key all warps then copy the tile's rows with
//      16-byte vectors when the row size and pointers allow.
// Keys out of [0, K) assert in launch 1 and are skipped (position -1, no row written).

constexpr int kSortThreads = 512;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int64_t kMaxMatrix = 1 << 16;          // [K, B] entries the last block scans
constexpr int64_t kMinTile = 2048;               // items per block (a multiple of kSortThreads)
constexpr int64_t kSmemCursorInts = 12 * 1024;   // 48 KiB of per-warp counters in launch 2
constexpr int kScanItems = 8;

struct SortPlan {
  int64_t tile = kMinTile, blocks = 1;
  int rank_warps = kSortWarps;  // warps ranking in parallel (0: one warp with cursors in global memory)
};

SortPlan plan_sort(int64_t n, int64_t K) {
  SortPlan p;
  int64_t max_blocks = std::max<int64_t>(1, kMaxMatrix / std::max<int64_t>(K, 1));
  int64_t tile = std::max<int64_t>(kMinTile, (n + max_blocks - 1) / max_blocks);
  tile = (tile + kSortThreads - 1) / kSortThreads * kSortThreads;
  p.tile = tile;
  p.blocks = std::max<int64_t>(1, (n + tile - 1) / tile);
  const int64_t fit = kSmemCursorInts / std::max<int64_t>(K, 1);
  p.rank_warps = static_cast<int>(std::min<int64_t>(kSortWarps, fit));  // 0 when K > kSmemCursorInts
  return p;
}

// Block-wide exclusive scan of data[0, len) in place (int32; the last block of key_count_kernel).
__device__ void block_exclusive_scan(int* data, int64_t len, int* total) {
  __shared__ int warp_sums[32];
  __shared__ int carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < len; base += (int64_t)blockDim.x * kScanItems) {
    const int64_t i0 = base + (int64_t)threadIdx.x * kScanItems;
    int vals[kScanItems];
    int local = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) vals[j] = i0 + j < len ? __ldcg(data + i0 + j) : 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) local += vals[j];
    int incl = local;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(kFullMask, s, off);
        if (lane >= off) s += y;
      }
      if (lane < nwarps) warp_sums[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    int run = carry + (warp ? warp_sums[warp - 1] : 0) + incl - local;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (i0 + j < len) data[i0 + j] = run;
      run += vals[j];
    }
    __syncthreads();  // everyone has read carry and warp_sums
    if (threadIdx.x == 0) carry += warp_sums[nwarps - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = carry;
  __syncthreads();
}

template <typename key_t>
__global__ void __launch_bounds__(kSortThreads)
key_count_kernel(const key_t* __restrict__ key, int64_t n, int64_t K, int64_t tile, bool smem, int* __restrict__ hist,
                 unsigned int* __restrict__ ticket, int64_t* __restrict__ counts) {
  extern __shared__ int sh_count[];
  __shared__ int is_last;
  __shared__ int total;
  const int64_t b = blockIdx.x, B = gridDim.x;
  const int64_t begin = b * tile, end = begin + tile < n ? begin + tile : n;
  if (smem) {
    for (int64_t v = threadIdx.x; v < K; v += blockDim.x) sh_count[v] = 0;
    __syncthreads();
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t k = static_cast<int64_t>(key[i]);
    const bool ok = k >= 0 && k < K;
    CUDA_KERNEL_ASSERT(ok);
    if (!ok) continue;
    if (smem) atomicAdd(sh_count + k, 1);
    else atomicAdd(hist + k * B + b, 1);  // the matrix was zeroed (memset) in this mode
  }
  if (smem) {
    __syncthreads();
    for (int64_t v = threadIdx.x; v < K; v += blockDim.x) hist[v * B + b] = sh_count[v];
  }
  // the last block to finish scans the whole matrix
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  block_exclusive_scan(hist, K * B, &total);
  for (int64_t v = threadIdx.x; v < K; v += blockDim.x) {
    const int start = __ldcg(hist + v * B);
    const int next = v + 1 < K ? __ldcg(hist + (v + 1) * B) : total;
    counts[v] = next - start;
  }
}

template <typename key_t, typename vec_t>
__global__ void __launch_bounds__(kSortThreads)
key_place_kernel(const key_t* __restrict__ key, int64_t n, int64_t K, int64_t tile, int rank_warps, int* __restrict__ offs,
                 int64_t* __restrict__ order, int64_t* __restrict__ position, const vec_t* __restrict__ x, int64_t items_per_row,
                 int64_t row_vecs, vec_t* __restrict__ out) {
  extern __shared__ int sh_cursor[];  // [rank_warps][K] when rank_warps > 0
  const int64_t b = blockIdx.x, B = gridDim.x;
  const int64_t begin = b * tile, end = begin + tile < n ? begin + tile : n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const bool smem = rank_warps > 0;
  const int rw = smem ? rank_warps : 1;
  const int64_t sub = ((end - begin + rw - 1) / rw + 31) / 32 * 32;  // sub-tile of each ranking warp
  const int64_t s0 = begin + warp * sub, s1 = s0 + sub < end ? s0 + sub : end;
  const unsigned lower = (1u << lane) - 1u;
  if (smem) {
    for (int64_t v = threadIdx.x; v < (int64_t)rank_warps * K; v += blockDim.x) sh_cursor[v] = 0;
    __syncthreads();
    if (warp < rank_warps) {  // count each sub-tile's keys
      int* cnt = sh_cursor + warp * K;
      for (int64_t c = s0; c < s1; c += 32) {
        const int64_t i = c + lane;
        const int64_t k = i < s1 ? static_cast<int64_t>(key[i]) : -1;
        const bool ok = k >= 0 && k < K;
        const int mk = ok ? static_cast<int>(k) : -1 - lane;  // invalid lanes match nobody
        const unsigned peers = __match_any_sync(kFullMask, mk);
        if (ok && (peers & lower) == 0) cnt[k] += __popc(peers);
        __syncwarp();
      }
    }
    __syncthreads();
    for (int64_t v = threadIdx.x; v < K; v += blockDim.x) {  // counts -> cursors, warps in order
      int run = offs[v * B + b];
      for (int w = 0; w < rank_warps; ++w) {
        const int t = sh_cursor[w * K + v];
        sh_cursor[w * K + v] = run;
        run += t;
      }
    }
    __syncthreads();
  }
  if (warp < rw) {
    // cursors: this warp's shared counters, or (one ranking warp) the block's own column of offs
    int* cur = smem ? sh_cursor + warp * K : nullptr;
    for (int64_t c = s0; c < s1; c += 32) {
      const int64_t i = c + lane;
      const bool in = i < s1;
      const int64_t k = in ? static_cast<int64_t>(key[i]) : -1;
      const bool ok = k >= 0 && k < K;
      const int mk = ok ? static_cast<int>(k) : -1 - lane;
      const unsigned peers = __match_any_sync(kFullMask, mk);
      const bool leader = (peers & lower) == 0;
      int base = 0;
      if (ok) base = smem ? cur[k] : *((volatile int*)(offs + k * B + b));
      __syncwarp();
      if (ok && leader) {
        if (smem) cur[k] = base + __popc(peers);
        else *((volatile int*)(offs + k * B + b)) = base + __popc(peers);
      }
      __syncwarp();
      if (ok) {
        const int64_t p = base + __popc(peers & lower);
        if (order) order[p] = i;
        if (position) position[i] = p;
      } else if (in && position) {
        position[i] = -1;
      }
    }
  }
  if (x == nullptr) return;  // uniform: sort_by_key has no rows
  __syncthreads();           // the tile's positions are written (by this block)
  for (int64_t i = begin + warp; i < end; i += nwarps) {
    const int64_t p = __ldcg(position + i);
    if (p < 0) continue;
    warp_copy_row(x + (i / items_per_row) * row_vecs, out + p * row_vecs, row_vecs, lane);
  }
}

// counts [K] int64 and (order or position, optional rows) for n keys; n > 0.
void counting_sort_cuda(const at::Tensor& key, int64_t K, const at::Tensor& counts, int64_t* order, int64_t* position,
                        const at::Tensor* x, int64_t items_per_row, at::Tensor* out) {
  const int64_t n = key.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SortPlan plan = plan_sort(n, K);
  const int64_t B = plan.blocks, entries = K * B;
  // [K * B] counts -> offsets, then one ticket counter
  auto work = at::empty({entries + 1}, key.options().dtype(at::kInt));
  int* hist = work.data_ptr<int>();
  unsigned int* ticket = reinterpret_cast<unsigned int*>(hist + entries);
  const bool smem_count = K <= kSmemHistBins;
  if (smem_count) {
    C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  } else {
    C10_CUDA_CHECK(cudaMemsetAsync(hist, 0, (entries + 1) * sizeof(int), stream));
  }
  with_key_type(key, [&](auto kp) {
    using key_t = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    key_count_kernel<key_t><<<static_cast<unsigned>(B), kSortThreads, smem_count ? K * sizeof(int) : 0, stream>>>(
        kp, n, K, plan.tile, smem_count, hist, ticket, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t place_smem = plan.rank_warps > 0 ? static_cast<size_t>(plan.rank_warps) * K * sizeof(int) : 0;
    if (x == nullptr) {
      key_place_kernel<key_t, uint4><<<static_cast<unsigned>(B), kSortThreads, place_smem, stream>>>(
          kp, n, K, plan.tile, plan.rank_warps, hist, order, position, nullptr, 1, 0, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t row_bytes = row_bytes_of(*x);
    with_vector_type(x->data_ptr(), out->data_ptr(), row_bytes, [&](auto vec, int64_t row_vecs) {
      using vec_t = decltype(vec);
      key_place_kernel<key_t, vec_t><<<static_cast<unsigned>(B), kSortThreads, place_smem, stream>>>(
          kp, n, K, plan.tile, plan.rank_warps, hist, order, position, static_cast<const vec_t*>(x->data_ptr()), items_per_row,
          row_vecs, static_cast<vec_t*>(out->data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------- row gather / scatter

// One warp per output row (grid-stride); an out-of-range order/index asserts and the row is skipped.
template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x, int64_t N, const int64_t* __restrict__ index, int64_t m,
                                   const int64_t* __restrict__ order, int64_t n, int64_t row_vecs, vec_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t i = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); i < n; i += warps) {
    const int64_t j = order ? order[i] : i;
    const bool ok_j = j >= 0 && j < m;
    CUDA_KERNEL_ASSERT(ok_j);
    if (!ok_j) continue;
    const int64_t r = index[j];
    const bool ok_r = r >= 0 && r < N;
    CUDA_KERNEL_ASSERT(ok_r);
    if (!ok_r) continue;
    warp_copy_row(x + r * row_vecs, out + i * row_vecs, row_vecs, lane);
  }
}

template <typename vec_t>
__global__ void scatter_rows_kernel(const vec_t* __restrict__ y, const int64_t* __restrict__ order, int64_t n, int64_t row_vecs,
                                    vec_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t i = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); i < n; i += warps) {
    const int64_t d = order[i];
    const bool ok = d >= 0 && d < n;
    CUDA_KERNEL_ASSERT(ok);
    if (!ok) continue;
    warp_copy_row(y + i * row_vecs, out + d * row_vecs, row_vecs, lane);
  }
}

// ---------------------------------------------------------------- weighted combine

// (row, pos) -> entry table; entries with value_index -1 are no term. Out-of-range row / pos /
// value_index and duplicate (row, pos) assert; such entries are left out of the table.
__global__ void combine_table_kernel(const int64_t* __restrict__ row, const int64_t* __restrict__ pos,
                                     const int64_t* __restrict__ vidx, int64_t n, int64_t m, int64_t num_rows, int64_t width,
                                     int64_t* __restrict__ table) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t vi = vidx ? vidx[p] : p;
    if (vidx && vi == -1) continue;
    const int64_t r = row[p], j = pos[p];
    const bool ok = r >= 0 && r < num_rows && j >= 0 && j < width && vi >= 0 && vi < m;
    CUDA_KERNEL_ASSERT(ok);
    if (!ok) continue;
    const unsigned long long prev = atomicCAS(reinterpret_cast<unsigned long long*>(table + r * width + j),
                                              static_cast<unsigned long long>(-1LL), static_cast<unsigned long long>(p));
    CUDA_KERNEL_ASSERT(prev == static_cast<unsigned long long>(-1LL));  // two entries share (row, pos)
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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// grid: (row blocks, column blocks); each thread owns VEC consecutive output elements of a row
// (one 16-byte load per term when VEC * sizeof(in_t) == 16) and adds the row's terms in position
// order, four table entries (and their loads) at a time.
template <typename in_t, typename acc_t, typename out_t, int VEC>
__global__ void combine_kernel(const in_t* __restrict__ v, const acc_t* __restrict__ w, const int64_t* __restrict__ table,
                               const int64_t* __restrict__ vidx, int64_t num_rows, int64_t width, int64_t h,
                               out_t* __restrict__ out) {
  const int64_t c = (blockIdx.y * (int64_t)blockDim.x + threadIdx.x) * VEC;
  if (c >= h) return;
  using InPack = Pack<in_t, VEC>;
  using OutPack = Pack<out_t, VEC>;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
    const int64_t* trow = table + r * width;
    for (int64_t j0 = 0; j0 < width; j0 += 4) {
      int64_t p[4];
      InPack val[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) p[u] = j0 + u < width ? trow[j0 + u] : -1;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (p[u] >= 0) val[u] = *reinterpret_cast<const InPack*>(v + (vidx ? vidx[p[u]] : p[u]) * h + c);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (p[u] < 0) continue;
        const acc_t wp = w[p[u]];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = Acc<acc_t>::add(acc[e], Acc<acc_t>::mul(wp, static_cast<acc_t>(val[u].v[e])));
      }
    }
    OutPack o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<out_t>(acc[e]);
    *reinterpret_cast<OutPack*>(out + r * h + c) = o;
  }
}

template <typename in_t, typename acc_t, typename out_t, int VEC>
void launch_combine(const in_t* v, const acc_t* w, const int64_t* table, const int64_t* vidx, int64_t num_rows, int64_t width,
                    int64_t h, out_t* out, cudaStream_t stream) {
  const int64_t lanes = (h + VEC - 1) / VEC;
  const int threads = lanes >= 256 ? 256 : (lanes >= 128 ? 128 : (lanes >= 64 ? 64 : 32));
  const dim3 grid(static_cast<unsigned>(num_rows < (1LL << 30) ? num_rows : (1LL << 30)),
                  static_cast<unsigned>((lanes + threads - 1) / threads));
  combine_kernel<in_t, acc_t, out_t, VEC><<<grid, threads, 0, stream>>>(v, w, table, vidx, num_rows, width, h, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- grace policy

// key (src * E + e) of each pair whose expert has several copies, else -1 (dropped, single-copy,
// or invalid pairs: they take no part in any group's ranks); out = -1 (dropped/invalid) or 0.
__global__ void grace_keys_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ src,
                                  const int64_t* __restrict__ copies, int64_t T, int64_t k, int64_t E, int64_t R, int64_t G,
                                  int64_t* __restrict__ key, int64_t* __restrict__ out) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < T * k; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = ids[p], s = src[p / k];
    const bool ok = e >= -1 && e < E && s >= 0 && s < G;
    CUDA_KERNEL_ASSERT(ok);
    if (!ok || e < 0) { key[p] = -1; out[p] = -1; continue; }
    key[p] = R > 1 && copies[e] > 1 ? s * E + e : -1;
    out[p] = 0;
  }
}

// rank of sorted entry i among equal keys = i - (first index of its key): a binary search per entry.
// params = (step, mean, hot_threshold), read on the device.
__global__ void grace_pick_kernel(const int64_t* __restrict__ sorted_key, const int64_t* __restrict__ order, int64_t n,
                                  const int64_t* __restrict__ ids, const int64_t* __restrict__ src, const int64_t* __restrict__ hosts,
                                  int64_t k, int64_t R, int64_t G, const double* __restrict__ spare, const double* __restrict__ pred,
                                  const double* __restrict__ params, int64_t gpn, bool offload, int64_t* __restrict__ out) {
  const double step = params[0], mean = params[1], hot_threshold = params[2];
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
    const int64_t* row = hosts + e * R;
    const bool ok = hosts_row_ok(row, R, G);
    CUDA_KERNEL_ASSERT(ok);
    out[p] = ok ? grace_pick(row, R, s, key, i - lo, spare, pred, gpn, step, mean, hot_threshold, offload) : 0;
  }
}

}  // namespace

// ---------------------------------------------------------------- op entry points

at::Tensor destination_histogram_cuda(const at::Tensor& dest, int64_t num_destinations) {
  TORCH_CHECK(num_destinations >= 0, "destination_histogram: num_destinations must be >= 0");
  c10::cuda::CUDAGuard guard(dest.device());
  auto d = key_1d(dest, "destination_histogram", "dest");
  return histogram(d, num_destinations, /*allow_minus_one=*/true);
}

std::tuple<at::Tensor, at::Tensor> sort_by_key_cuda(const at::Tensor& key_in, int64_t num_keys) {
  const char* op = "sort_by_key";
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be >= 0, got ", num_keys);
  c10::cuda::CUDAGuard guard(key_in.device());
  auto key = key_1d(key_in, op, "key");
  const int64_t n = key.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max() && num_keys < std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 keys and key values");
  auto opts = key.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, opts), at::zeros({num_keys}, opts)};
  auto order = at::empty({n}, opts);
  auto counts = at::empty({num_keys}, opts);
  counting_sort_cuda(key, num_keys, counts, order.data_ptr<int64_t>(), nullptr, nullptr, 1, nullptr);
  return {order, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_by_key_cuda(const at::Tensor& x_in, const at::Tensor& key_in, int64_t num_keys,
                                                                   int64_t items_per_row) {
  const char* op = "permute_by_key";
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have a row dimension");
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be >= 0, got ", num_keys);
  TORCH_CHECK(items_per_row >= 1, op, ": items_per_row must be >= 1, got ", items_per_row);
  c10::cuda::CUDAGuard guard(x_in.device());
  check_same_device(x_in, key_in, op, "key");
  auto key = key_1d(key_in, op, "key");
  const int64_t n = key.numel(), N = x_in.size(0);
  TORCH_CHECK(n == 0 || (n - 1) / items_per_row < N, op, ": ", n, " items at ", items_per_row, " per row need ",
              (n + items_per_row - 1) / items_per_row, " rows of x, x has ", N);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max() && num_keys < std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 items and keys");
  auto x = x_in.contiguous();
  auto opts = key.options().dtype(at::kLong);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  auto position = at::empty({n}, opts);
  if (n == 0) return {out, position, at::zeros({num_keys}, opts)};
  auto counts = at::empty({num_keys}, opts);
  const bool rows = out.numel() > 0;
  counting_sort_cuda(key, num_keys, counts, nullptr, position.data_ptr<int64_t>(), rows ? &x : nullptr, items_per_row,
                     rows ? &out : nullptr);
  return {out, position, counts};
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& index_in, const c10::optional<at::Tensor>& order_in) {
  const char* op = "gather_rows";
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have a row dimension");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  check_same_device(x, index_in, op, "index");
  auto index = long_1d(index_in, op, "index");
  at::Tensor order;
  if (order_in.has_value()) {
    check_same_device(x, *order_in, op, "order");
    order = long_1d(*order_in, op, "order");
  }
  const int64_t N = x.size(0), m = index.numel(), n = order.defined() ? order.numel() : m;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  if (n == 0 || out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = row_bytes_of(x);  // x may have no rows (then every index asserts)
  const int64_t* ord = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  with_vector_type(x.data_ptr(), out.data_ptr(), row_bytes, [&](auto vec, int64_t row_vecs) {
    using vec_t = decltype(vec);
    gather_rows_kernel<vec_t><<<blocks_for(n, kThreads / 32), kThreads, 0, stream>>>(
        static_cast<const vec_t*>(x.data_ptr()), N, index.data_ptr<int64_t>(), m, ord, n, row_vecs, static_cast<vec_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& y_in, const at::Tensor& order_in) {
  const char* op = "scatter_rows";
  TORCH_CHECK(y_in.dim() >= 1, op, ": y must have a row dimension");
  c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  check_same_device(y, order_in, op, "order");
  auto order = long_1d(order_in, op, "order");
  const int64_t n = y.size(0);
  TORCH_CHECK(order.numel() == n, op, ": order has ", order.numel(), " entries, y has ", n, " rows");
  auto out = at::empty_like(y);
  if (n == 0 || y.numel() == 0) return out;
  // order is a permutation by contract (checked in debug mode by the Python wrapper); values out
  // of range assert here, repeats are not detected.
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = row_bytes_of(y);
  with_vector_type(y.data_ptr(), out.data_ptr(), row_bytes, [&](auto vec, int64_t row_vecs) {
    using vec_t = decltype(vec);
    scatter_rows_kernel<vec_t><<<blocks_for(n, kThreads / 32), kThreads, 0, stream>>>(
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
  if (value_index_in.has_value()) {
    check_same_device(values, *value_index_in, op, "value_index");
    vidx = long_1d(*value_index_in, op, "value_index");
    TORCH_CHECK(vidx.numel() == n, op, ": value_index must be [n]=", n);
  } else {
    TORCH_CHECK(m == n, op, ": values has ", m, " rows but there are ", n, " entries (pass value_index)");
  }
  width = width < 1 ? 1 : width;
  const auto acc_type = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto weight = weight_in.to(acc_type).contiguous();
  // The kernel writes the values' dtype or the accumulation dtype; any other out_dtype is one
  // rounding from the accumulator afterwards (as the pure-torch path's final .to(out_dtype)).
  const bool direct = out_dtype == values.scalar_type();
  auto out = at::empty({num_rows, h}, values.options().dtype(direct ? out_dtype : acc_type));
  if (num_rows == 0 || h == 0) return direct ? out : out.to(out_dtype);
  auto table = at::full({num_rows, width}, -1, row.options());
  const int64_t* vp = vidx.defined() ? vidx.data_ptr<int64_t>() : nullptr;
  if (n) {
    combine_table_kernel<<<blocks_for(n), kThreads, 0, stream>>>(row.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), vp, n, m,
                                                                 num_rows, width, table.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "weighted_combine_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    constexpr int kVec = 16 / sizeof(in_t);
    const bool vec = h % kVec == 0 && reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0;
    const in_t* v = values.data_ptr<in_t>();
    const acc_t* w = weight.data_ptr<acc_t>();
    const int64_t* t = table.data_ptr<int64_t>();
    if (direct) {
      in_t* o = out.data_ptr<in_t>();
      if (vec) launch_combine<in_t, acc_t, in_t, kVec>(v, w, t, vp, num_rows, width, h, o, stream);
      else launch_combine<in_t, acc_t, in_t, 1>(v, w, t, vp, num_rows, width, h, o, stream);
    } else {
      acc_t* o = out.data_ptr<acc_t>();
      if (vec) launch_combine<in_t, acc_t, acc_t, kVec>(v, w, t, vp, num_rows, width, h, o, stream);
      else launch_combine<in_t, acc_t, acc_t, 1>(v, w, t, vp, num_rows, width, h, o, stream);
    }
  });
  if (!direct) out = out.to(out_dtype);
  return out;
}

at::Tensor grace_choose_copies_cuda(const at::Tensor& topk_ids, const at::Tensor& src_gpu, const at::Tensor& hosts_in,
                                    const at::Tensor& copies_in, const at::Tensor& spare_in, const at::Tensor& pred_in,
                                    const at::Tensor& params_in, int64_t gpus_per_node, bool offload) {
  const char* op = "grace_choose_copies";
  TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be [T, k], got ", topk_ids.dim(), "-D");
  TORCH_CHECK(hosts_in.dim() == 2, op, ": hosts must be [E, R], got ", hosts_in.dim(), "-D");
  TORCH_CHECK(gpus_per_node > 0, op, ": gpus_per_node must be > 0");
  TORCH_CHECK(params_in.dim() == 1 && params_in.numel() == 3 && at::isFloatingType(params_in.scalar_type()), op,
              ": params must be a float tensor [3] = (step, mean, hot_threshold)");
  c10::cuda::CUDAGuard guard(topk_ids.device());
  for (const auto* t : {&src_gpu, &hosts_in, &copies_in, &spare_in, &pred_in, &params_in}) check_same_device(topk_ids, *t, op, "an input");
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = hosts_in.size(0), R = hosts_in.size(1);
  auto ids = topk_ids.to(at::kLong).contiguous();
  auto src = long_1d(src_gpu, op, "src_gpu");
  auto hosts = hosts_in.to(at::kLong).contiguous();
  auto copies = long_1d(copies_in, op, "copies");
  auto spare = spare_in.to(at::kDouble).contiguous();
  auto pred = pred_in.to(at::kDouble).contiguous();
  auto params = params_in.to(at::kDouble).contiguous();
  const int64_t G = spare.numel();
  TORCH_CHECK(src.numel() == T, op, ": src_gpu must be [T]=", T);
  TORCH_CHECK(copies.numel() == E, op, ": copies must be [E]=", E);
  TORCH_CHECK(spare.dim() == 1 && pred.dim() == 1 && pred.numel() == G, op, ": spare and pred must both be [G]");
  auto out = at::empty({T, k}, ids.options());
  const int64_t n = T * k;
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto key = at::empty({n}, ids.options());
  grace_keys_kernel<<<blocks_for(n), kThreads, 0, stream>>>(ids.data_ptr<int64_t>(), src.data_ptr<int64_t>(), copies.data_ptr<int64_t>(),
                                                            T, k, E, R, G, key.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // group rank by (src, expert) key in token order: stable sort (ties keep token order), then
  // rank = sorted position - first position of the key. Keys -1 (no group) sort first and are skipped.
  auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  grace_pick_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      std::get<0>(sorted).data_ptr<int64_t>(), std::get<1>(sorted).data_ptr<int64_t>(), n, ids.data_ptr<int64_t>(),
      src.data_ptr<int64_t>(), hosts.data_ptr<int64_t>(), k, R, G, spare.data_ptr<double>(), pred.data_ptr<double>(),
      params.data_ptr<double>(), gpus_per_node, offload, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace grace

TORCH_LIBRARY_IMPL(grace, CUDA, m) {
  m.impl("destination_histogram", &grace::destination_histogram_cuda);
  m.impl("sort_by_key", &grace::sort_by_key_cuda);
  m.impl("permute_by_key", &grace::permute_by_key_cuda);
  m.impl("gather_rows", &grace::gather_rows_cuda);
  m.impl("scatter_rows", &grace::scatter_rows_cuda);
  m.impl("weighted_combine", &grace::weighted_combine_cuda);
  m.impl("grace_choose_copies", &grace::grace_choose_copies_cuda);
}
