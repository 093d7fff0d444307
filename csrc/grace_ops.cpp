// megatron-grace C++ CPU ops, registered with TORCH_LIBRARY under the "grace" namespace.
//
// destination_histogram(dest, num_destinations) -> counts
//   dest: int32/int64 [n], values in [-1, num_destinations) (-1 = dropped, not counted)
//   counts: int64 [num_destinations], counts[d] = number of entries equal to d.
// Used to size the per-destination segments of the dispatch send buffer. Parallel over
// chunks with per-thread private histograms summed in a fixed order (deterministic).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace grace {

at::Tensor destination_histogram_cpu(const at::Tensor& dest, int64_t num_destinations) {
  TORCH_CHECK(dest.dim() == 1, "destination_histogram: dest must be 1-D, got ", dest.dim(), "-D");
  TORCH_CHECK(dest.scalar_type() == at::kInt || dest.scalar_type() == at::kLong,
              "destination_histogram: dest must be int32 or int64");
  TORCH_CHECK(num_destinations >= 0, "destination_histogram: num_destinations must be >= 0");
  auto d = dest.contiguous().to(at::kLong);
  const int64_t n = d.numel();
  const int64_t* p = d.data_ptr<int64_t>();
  const int64_t grain = 1 << 16;
  const int64_t chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<int64_t> partial(chunks * num_destinations, 0);
  std::vector<int64_t> bad(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = partial.data() + c * num_destinations;
      const int64_t end = std::min(n, (c + 1) * grain);
      for (int64_t i = c * grain; i < end; ++i) {
        const int64_t v = p[i];
        if (v >= 0 && v < num_destinations) {
          ++h[v];
        } else if (v != -1) {
          ++bad[c];
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    TORCH_CHECK(bad[c] == 0, "destination_histogram: value out of range [-1, ", num_destinations, ")");
  }
  auto out = at::zeros({num_destinations}, d.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t* h = partial.data() + c * num_destinations;
    for (int64_t j = 0; j < num_destinations; ++j) o[j] += h[j];
  }
  return out;
}

}  // namespace grace

TORCH_LIBRARY(grace, m) {
  m.def("destination_histogram(Tensor dest, int num_destinations) -> Tensor");
}

TORCH_LIBRARY_IMPL(grace, CPU, m) {
  m.impl("destination_histogram", &grace::destination_histogram_cpu);
}

// The extension is imported as a Python module (megatron_grace._C) to load the library.
#include <Python.h>
static struct PyModuleDef grace_module = {PyModuleDef_HEAD_INIT, "_C", "megatron-grace C++/CUDA ops (torch.ops.grace)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grace_module); }
