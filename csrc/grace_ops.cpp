// megatron-grace ops: schemas (TORCH_LIBRARY "grace", the one place they are defined) and the
// C++ CPU kernels (TORCH_LIBRARY_IMPL CPU). CUDA kernels: grace_ops_cuda.cu. Fake (meta) kernels
// for torch.compile: megatron_grace/_ops.py. No autograd formulas (the layer is inference-only).
//
// destination_histogram(dest [n] int, num_destinations) -> counts int64 [D]
//     counts[d] = #{i : dest[i] == d}; -1 = dropped (not counted); other values are an error.
// sort_by_key(key [n] int, num_keys) -> (order int64 [n], counts int64 [K])
//     Stable counting sort: order lists the entries by ascending key, equal keys in input
//     order (== torch.sort(key, stable=True).indices); counts = histogram of key.
// permute_by_key(x [N, ...], key [n] int, num_keys, items_per_row r) -> (out [n, ...], position int64 [n], counts int64 [K])
//     Item i reads row i // r of x; items are stably sorted by key; out[position[i]] = x[i // r]
//     (position = the inverse of sort_by_key's order), counts = items per key. Needs n <= N * r.
// gather_rows(x [N, ...], index [m] int, order [n] int?) -> [n or m, ...]
//     out[i] = x[index[order[i]]] (order given) or x[index[i]]: the dispatch permute.
// scatter_rows(y [n, ...], order [n] int) -> [n, ...]
//     out[order[i]] = y[i]; order must be a permutation of [0, n): the un-permute.
// weighted_combine(values [m, h], row [n], pos [n], weight [n], num_rows, width, out_dtype,
//                  value_index [n]?) -> [num_rows, h] out_dtype
//     out[r] = sum_{p : row[p] == r} weight[p] * values[value_index[p] or p], the terms added in
//     ascending pos (a fixed order; accumulation in float32, float64 for float64 values). An entry
//     whose value_index is -1 is no term at all (a dropped pair of a dense layout): skipped, its
//     row and pos are not looked at.
// grace_choose_copies(topk_ids [T, k], src_gpu [T], hosts [E, R], copies [E], spare [G] f64,
//                     pred [G] f64, params [3] f64, gpus_per_node, offload) -> int64 [T, k]
//     The `grace` replica-choice policy (megatron_grace.routing.policies), bit-exact. params holds
//     (step, mean, hot_threshold) on the tensors' device, so a CUDA caller needs no host values.
//
// Errors: shapes and dtypes are TORCH_CHECKed. The CPU kernels also TORCH_CHECK values (cheap
// integer loops), always outside parallel regions: a parallel pass only records what it saw and
// the check runs after it. The CUDA kernels never read values on the host (see grace_ops_cuda.cu).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "grace_ops.h"

namespace grace {
namespace {

at::Tensor as_long_1d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong || t.scalar_type() == at::kShort,
              op, ": ", name, " must be an integer tensor (int16/int32/int64), got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

// A value seen by a parallel pass outside its allowed range (the first one of its chunk).
struct BadValue {
  int64_t count = 0;
  int64_t value = 0;
  void add(int64_t v) {
    if (count++ == 0) value = v;
  }
};

int64_t first_bad(const std::vector<BadValue>& bad, int64_t* value) {
  int64_t total = 0;
  for (const auto& b : bad) {
    if (b.count && !total) *value = b.value;
    total += b.count;
  }
  return total;
}

// Stable counting sort of n keys in [0, K): order[s] = i and/or position[i] = s (either may be
// null), counts[K] (zeroed by the caller). Returns the number of keys out of range (then nothing
// but `counts` of the valid keys is written, and *bad_value is the first bad key); the caller
// raises, outside the parallel regions.
int64_t counting_sort(const int64_t* k, int64_t n, int64_t K, int64_t* order, int64_t* position, int64_t* counts,
                      int64_t* bad_value) {
  if (n == 0) return 0;
  // chunks * K private counters; few chunks when there are many keys
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::min<int64_t>(threads, std::max<int64_t>(1, n / 32768));
  while (chunks > 1 && chunks * K > 4 * n + (1 << 16)) --chunks;
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<int64_t> cnt(chunks * K, 0);
  std::vector<BadValue> bad(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = cnt.data() + c * K;
      for (int64_t i = c * per, e = std::min(n, (c + 1) * per); i < e; ++i) {
        const int64_t v = k[i];
        if (v >= 0 && v < K) ++h[v]; else bad[c].add(v);
      }
    }
  });
  const int64_t nbad = first_bad(bad, bad_value);
  // counts and exclusive offsets in (key, chunk) order: cnt becomes each chunk's write cursor
  int64_t running = 0;
  for (int64_t v = 0; v < K; ++v) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t x = cnt[c * K + v];
      cnt[c * K + v] = running;
      running += x;
      counts[v] += x;
    }
  }
  if (nbad) return nbad;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cur = cnt.data() + c * K;
      for (int64_t i = c * per, e = std::min(n, (c + 1) * per); i < e; ++i) {
        const int64_t s = cur[k[i]]++;
        if (order) order[s] = i;
        if (position) position[i] = s;
      }
    }
  });
  return 0;
}

// Row copies dst[d(i)] = src[s(i)] for i in [0, n), in parallel (no checks: indices are valid).
template <typename F>
void copy_rows(const char* src, char* dst, int64_t n, int64_t row_bytes, F&& index_pair) {
  if (n == 0 || row_bytes == 0) return;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [s, d] = index_pair(i);
      std::memcpy(dst + d * row_bytes, src + s * row_bytes, row_bytes);
    }
  });
}

}  // namespace

at::Tensor destination_histogram_cpu(const at::Tensor& dest, int64_t num_destinations) {
  const char* op = "destination_histogram";
  check_cpu(dest, op, "dest");
  TORCH_CHECK(num_destinations >= 0, op, ": num_destinations must be >= 0, got ", num_destinations);
  auto d = as_long_1d(dest, op, "dest");
  const int64_t n = d.numel();
  const int64_t* p = d.data_ptr<int64_t>();
  const int64_t grain = 1 << 16;
  const int64_t chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<int64_t> partial(chunks * num_destinations, 0);
  std::vector<BadValue> bad(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = partial.data() + c * num_destinations;
      const int64_t end = std::min(n, (c + 1) * grain);
      for (int64_t i = c * grain; i < end; ++i) {
        const int64_t v = p[i];
        if (v >= 0 && v < num_destinations) {
          ++h[v];
        } else if (v != -1) {
          bad[c].add(v);
        }
      }
    }
  });
  int64_t value = 0;
  TORCH_CHECK(first_bad(bad, &value) == 0, op, ": dest value ", value, " out of range [-1, ", num_destinations, ")");
  auto out = at::zeros({num_destinations}, d.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t* h = partial.data() + c * num_destinations;
    for (int64_t j = 0; j < num_destinations; ++j) o[j] += h[j];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sort_by_key_cpu(const at::Tensor& key_in, int64_t num_keys) {
  const char* op = "sort_by_key";
  check_cpu(key_in, op, "key");
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be >= 0, got ", num_keys);
  auto key = as_long_1d(key_in, op, "key");
  const int64_t n = key.numel();
  auto order = at::empty({n}, key.options());
  auto counts = at::zeros({num_keys}, key.options());
  int64_t value = 0;
  const int64_t nbad = counting_sort(key.data_ptr<int64_t>(), n, num_keys, order.data_ptr<int64_t>(), nullptr,
                                     counts.data_ptr<int64_t>(), &value);
  TORCH_CHECK(nbad == 0, op, ": key value ", value, " out of range [0, ", num_keys, ")");
  return {order, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_by_key_cpu(const at::Tensor& x_in, const at::Tensor& key_in, int64_t num_keys,
                                                                  int64_t items_per_row) {
  const char* op = "permute_by_key";
  check_cpu(x_in, op, "x");
  check_cpu(key_in, op, "key");
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have a row dimension");
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be >= 0, got ", num_keys);
  TORCH_CHECK(items_per_row >= 1, op, ": items_per_row must be >= 1, got ", items_per_row);
  auto key = as_long_1d(key_in, op, "key");
  const int64_t n = key.numel(), N = x_in.size(0);
  TORCH_CHECK(n == 0 || (n - 1) / items_per_row < N, op, ": ", n, " items at ", items_per_row, " per row need ",
              (n + items_per_row - 1) / items_per_row, " rows of x, x has ", N);
  auto x = x_in.contiguous();
  auto position = at::empty({n}, key.options());
  auto counts = at::zeros({num_keys}, key.options());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  int64_t value = 0;
  int64_t* pos = position.data_ptr<int64_t>();
  const int64_t nbad = counting_sort(key.data_ptr<int64_t>(), n, num_keys, nullptr, pos, counts.data_ptr<int64_t>(), &value);
  TORCH_CHECK(nbad == 0, op, ": key value ", value, " out of range [0, ", num_keys, ")");
  const int64_t row_bytes = N ? x.numel() / N * x.element_size() : 0;
  copy_rows(static_cast<const char*>(x.data_ptr()), static_cast<char*>(out.data_ptr()), n, row_bytes,
            [&](int64_t i) { return std::pair<int64_t, int64_t>(i / items_per_row, pos[i]); });
  return {out, position, counts};
}

at::Tensor gather_rows_cpu(const at::Tensor& x_in, const at::Tensor& index_in, const c10::optional<at::Tensor>& order_in) {
  const char* op = "gather_rows";
  check_cpu(x_in, op, "x");
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have a row dimension");
  auto x = x_in.contiguous();
  auto index = as_long_1d(index_in, op, "index");
  const int64_t N = x.size(0), m = index.numel();
  at::Tensor order;
  if (order_in.has_value()) order = as_long_1d(*order_in, op, "order");
  const int64_t n = order.defined() ? order.numel() : m;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  if (n == 0) return out;
  const int64_t row_bytes = (N ? x.numel() / N : 0) * x.element_size();
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t* ord = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {  // validate first (cheap, integers only, not in a parallel region)
    const int64_t j = ord ? ord[i] : i;
    TORCH_CHECK(j >= 0 && j < m, op, ": order value ", j, " out of range [0, ", m, ")");
    TORCH_CHECK(idx[j] >= 0 && idx[j] < N, op, ": index value ", idx[j], " out of range [0, ", N, ")");
  }
  copy_rows(static_cast<const char*>(x.data_ptr()), static_cast<char*>(out.data_ptr()), n, row_bytes,
            [&](int64_t i) { return std::pair<int64_t, int64_t>(idx[ord ? ord[i] : i], i); });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& y_in, const at::Tensor& order_in) {
  const char* op = "scatter_rows";
  check_cpu(y_in, op, "y");
  TORCH_CHECK(y_in.dim() >= 1, op, ": y must have a row dimension");
  auto y = y_in.contiguous();
  auto order = as_long_1d(order_in, op, "order");
  const int64_t n = y.size(0);
  TORCH_CHECK(order.numel() == n, op, ": order has ", order.numel(), " entries, y has ", n, " rows");
  auto out = at::empty_like(y);
  if (n == 0) return out;
  const int64_t* o = order.data_ptr<int64_t>();
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(o[i] >= 0 && o[i] < n, op, ": order value ", o[i], " out of range [0, ", n, ") at ", i);
    TORCH_CHECK(!seen[o[i]], op, ": order must be a permutation of [0, ", n, "), value ", o[i], " repeats at ", i);
    seen[o[i]] = 1;
  }
  const int64_t row_bytes = y.numel() / n * y.element_size();
  copy_rows(static_cast<const char*>(y.data_ptr()), static_cast<char*>(out.data_ptr()), n, row_bytes,
            [&](int64_t i) { return std::pair<int64_t, int64_t>(i, o[i]); });
  return out;
}

namespace {

template <typename scalar_t, typename acc_t, typename out_t>
void combine_rows(const scalar_t* v, const acc_t* w, const int64_t* table, const int64_t* vidx, int64_t R, int64_t width,
                  int64_t h, out_t* out) {
  at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(h, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(h);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* a = acc.data();
      bool first = true;
      for (int64_t j = 0; j < width; ++j) {  // fixed order: position 0, 1, 2, ...
        const int64_t p = table[r * width + j];
        if (p < 0) continue;
        const acc_t wp = w[p];
        const scalar_t* row = v + (vidx ? vidx[p] : p) * h;
        if (first) {  // 0 + w * x == w * x exactly (the sum never is -0: it starts at +0)
          for (int64_t c = 0; c < h; ++c) a[c] = acc_t(0) + wp * static_cast<acc_t>(row[c]);
          first = false;
        } else {
          for (int64_t c = 0; c < h; ++c) {
            const acc_t prod = wp * static_cast<acc_t>(row[c]);  // rounded, then added (no FMA: -ffp-contract=off)
            a[c] = a[c] + prod;
          }
        }
      }
      out_t* o = out + r * h;
      if (first) {
        std::fill(o, o + h, out_t(0));
      } else {
        for (int64_t c = 0; c < h; ++c) o[c] = static_cast<out_t>(a[c]);
      }
    }
  });
}

}  // namespace

at::Tensor weighted_combine_cpu(const at::Tensor& values_in, const at::Tensor& row_in, const at::Tensor& pos_in,
                                const at::Tensor& weight_in, int64_t num_rows, int64_t width, at::ScalarType out_dtype,
                                const c10::optional<at::Tensor>& value_index_in) {
  const char* op = "weighted_combine";
  check_cpu(values_in, op, "values");
  TORCH_CHECK(values_in.dim() == 2, op, ": values must be [m, h], got ", values_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(values_in.scalar_type()), op, ": values must be floating point, got ", values_in.scalar_type());
  TORCH_CHECK(at::isFloatingType(out_dtype), op, ": out_dtype must be floating point, got ", out_dtype);
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0");
  auto values = values_in.contiguous();
  auto row = as_long_1d(row_in, op, "row");
  auto pos = as_long_1d(pos_in, op, "pos");
  const int64_t n = row.numel(), m = values.size(0), h = values.size(1);
  TORCH_CHECK(pos.numel() == n && weight_in.dim() == 1 && weight_in.numel() == n, op,
              ": row, pos and weight must all be [n], got ", n, ", ", pos.numel(), ", ", weight_in.sizes());
  at::Tensor vidx;
  if (value_index_in.has_value()) {
    vidx = as_long_1d(*value_index_in, op, "value_index");
    TORCH_CHECK(vidx.numel() == n, op, ": value_index must be [n]=", n, ", got ", vidx.numel());
  } else {
    TORCH_CHECK(m == n, op, ": values has ", m, " rows but there are ", n, " entries (pass value_index)");
  }
  width = std::max<int64_t>(width, 1);
  const auto acc_type = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto weight = weight_in.to(acc_type).contiguous();
  // (row, pos) -> entry table, -1 = empty; validates ranges and uniqueness (sequential: no parallel region)
  std::vector<int64_t> table(num_rows * width, -1);
  const int64_t* rp = row.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* vp = vidx.defined() ? vidx.data_ptr<int64_t>() : nullptr;
  for (int64_t p = 0; p < n; ++p) {
    if (vp && vp[p] == -1) continue;  // no term
    TORCH_CHECK(!vp || (vp[p] >= 0 && vp[p] < m), op, ": value_index value ", vp ? vp[p] : 0, " out of range [-1, ", m, ")");
    TORCH_CHECK(rp[p] >= 0 && rp[p] < num_rows, op, ": row value ", rp[p], " out of range [0, ", num_rows, ")");
    TORCH_CHECK(pp[p] >= 0 && pp[p] < width, op, ": pos value ", pp[p], " out of range [0, ", width, ")");
    int64_t& slot = table[rp[p] * width + pp[p]];
    TORCH_CHECK(slot < 0, op, ": two entries share row ", rp[p], " and pos ", pp[p]);
    slot = p;
  }
  // The kernel writes the values' dtype or the accumulation dtype; any other out_dtype is one
  // rounding from the accumulator afterwards (as the pure-torch path's final .to(out_dtype)).
  const bool direct = out_dtype == values.scalar_type();
  auto out = at::empty({num_rows, h}, values.options().dtype(direct ? out_dtype : acc_type));
  if (num_rows > 0 && h > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "weighted_combine_cpu", [&] {
      using in_t = scalar_t;
      using acc_t = at::opmath_type<in_t>;
      const acc_t* w = weight.data_ptr<acc_t>();
      if (direct) {
        combine_rows<in_t, acc_t, in_t>(values.data_ptr<in_t>(), w, table.data(), vp, num_rows, width, h, out.data_ptr<in_t>());
      } else {
        combine_rows<in_t, acc_t, acc_t>(values.data_ptr<in_t>(), w, table.data(), vp, num_rows, width, h, out.data_ptr<acc_t>());
      }
    });
  }
  if (!direct) out = out.to(out_dtype);
  return out;
}

at::Tensor grace_choose_copies_cpu(const at::Tensor& topk_ids, const at::Tensor& src_gpu, const at::Tensor& hosts_in,
                                   const at::Tensor& copies_in, const at::Tensor& spare_in, const at::Tensor& pred_in,
                                   const at::Tensor& params_in, int64_t gpus_per_node, bool offload) {
  const char* op = "grace_choose_copies";
  check_cpu(topk_ids, op, "topk_ids");
  check_cpu(params_in, op, "params");
  TORCH_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be [T, k], got ", topk_ids.dim(), "-D");
  TORCH_CHECK(hosts_in.dim() == 2, op, ": hosts must be [E, R], got ", hosts_in.dim(), "-D");
  TORCH_CHECK(gpus_per_node > 0, op, ": gpus_per_node must be > 0, got ", gpus_per_node);
  TORCH_CHECK(params_in.dim() == 1 && params_in.numel() == 3 && at::isFloatingType(params_in.scalar_type()), op,
              ": params must be a float tensor [3] = (step, mean, hot_threshold), got ", params_in.sizes(), " ", params_in.scalar_type());
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = hosts_in.size(0), R = hosts_in.size(1);
  auto ids = topk_ids.to(at::kLong).contiguous();
  auto src = as_long_1d(src_gpu, op, "src_gpu");
  auto hosts = hosts_in.to(at::kLong).contiguous();
  auto copies = as_long_1d(copies_in, op, "copies");
  auto spare = spare_in.to(at::kDouble).contiguous();
  auto pred = pred_in.to(at::kDouble).contiguous();
  auto params = params_in.to(at::kDouble).contiguous();
  const int64_t G = spare.numel();
  TORCH_CHECK(src.numel() == T, op, ": src_gpu must be [T]=", T, ", got ", src.numel());
  TORCH_CHECK(copies.numel() == E, op, ": copies must be [E]=", E, ", got ", copies.numel());
  TORCH_CHECK(spare.dim() == 1 && pred.dim() == 1 && pred.numel() == G, op, ": spare and pred must both be [G]");
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* hp = hosts.data_ptr<int64_t>();
  const int64_t* cp = copies.data_ptr<int64_t>();
  const double* prm = params.data_ptr<double>();
  const double step = prm[0], mean = prm[1], hot_threshold = prm[2];
  for (int64_t i = 0; i < E * R; ++i) TORCH_CHECK(hp[i] >= -1 && hp[i] < G, op, ": hosts value ", hp[i], " out of range [-1, ", G, ")");
  auto out = at::empty({T, k}, ids.options());
  int64_t* o = out.data_ptr<int64_t>();
  // group rank of every multi-copy pair among pairs with its (src, expert) key, in token order:
  // one sequential counting pass (integers only, O(T k + G E)). Dropped pairs take no rank.
  std::vector<int64_t> counter(static_cast<size_t>(G) * E, 0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < G, op, ": src_gpu value ", sp[t], " out of range [0, ", G, ")");
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ip[t * k + j];
      TORCH_CHECK(e >= -1 && e < E, op, ": topk_ids value ", e, " out of range [-1, ", E, ")");
      if (e < 0) { o[t * k + j] = -1; continue; }
      if (cp[e] <= 1 || R <= 1) { o[t * k + j] = 0; continue; }
      o[t * k + j] = -2 - counter[sp[t] * E + e]++;  // rank r stored as -2 - r until the pick below
    }
  }
  const double* spare_p = spare.data_ptr<double>();
  const double* pred_p = pred.data_ptr<double>();
  at::parallel_for(0, T * k, 4096, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (o[p] > -2) continue;
      const int64_t rank = -2 - o[p];
      const int64_t s = sp[p / k], e = ip[p];
      o[p] = grace_pick(hp + e * R, R, s, s * E + e, rank, spare_p, pred_p, gpus_per_node, step, mean, hot_threshold, offload);
    }
  });
  return out;
}

}  // namespace grace

TORCH_LIBRARY(grace, m) {
  m.def("destination_histogram(Tensor dest, int num_destinations) -> Tensor");
  m.def("sort_by_key(Tensor key, int num_keys) -> (Tensor order, Tensor counts)");
  m.def("permute_by_key(Tensor x, Tensor key, int num_keys, int items_per_row) -> (Tensor out, Tensor position, Tensor counts)");
  m.def("gather_rows(Tensor x, Tensor index, Tensor? order=None) -> Tensor");
  m.def("scatter_rows(Tensor y, Tensor order) -> Tensor");
  m.def("weighted_combine(Tensor values, Tensor row, Tensor pos, Tensor weight, int num_rows, int width, "
        "ScalarType out_dtype, Tensor? value_index=None) -> Tensor");
  m.def("grace_choose_copies(Tensor topk_ids, Tensor src_gpu, Tensor hosts, Tensor copies, Tensor spare, Tensor pred, "
        "Tensor params, int gpus_per_node, bool offload) -> Tensor");
}

TORCH_LIBRARY_IMPL(grace, CPU, m) {
  m.impl("destination_histogram", &grace::destination_histogram_cpu);
  m.impl("sort_by_key", &grace::sort_by_key_cpu);
  m.impl("permute_by_key", &grace::permute_by_key_cpu);
  m.impl("gather_rows", &grace::gather_rows_cpu);
  m.impl("scatter_rows", &grace::scatter_rows_cpu);
  m.impl("weighted_combine", &grace::weighted_combine_cpu);
  m.impl("grace_choose_copies", &grace::grace_choose_copies_cpu);
}

// The extension is imported as a Python module (megatron_grace._C) to load the library.
#include <Python.h>
static struct PyModuleDef grace_module = {PyModuleDef_HEAD_INIT, "_C", "megatron-grace C++/CUDA ops (torch.ops.grace)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grace_module); }
