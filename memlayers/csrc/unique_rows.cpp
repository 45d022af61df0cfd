// memlayers_cpu::unique_rows: the sorted unique rows a read catches up (RowSparseAdam.catch_up_rows).

#include "row_math.h"

namespace {

// ---------------------------------------------------------------- unique rows
// The sorted unique slot ids among `indices` (any shape, int64, each in [0, n_rows)): a bitmap of the
// table's rows (n_rows / 8 bytes: 128 KB for 1M rows, L2-resident) marked by each index, then scanned
// in order. A training read's catch-up needs exactly this set, sorted (the row kernels then walk
// memory in order); torch.unique sorts all the indices instead (524k int64: 6-7 ms vs ~1 ms here).
// Each thread marks its own bitmap (no atomics) and the scan ORs them.
Tensor unique_rows(const Tensor& indices, int64_t n_rows) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(n_rows >= 0, "n_rows must be >= 0");
  const Tensor flat = indices.reshape({-1}).contiguous();
  const int64_t N = flat.numel();
  const int64_t* I = flat.const_data_ptr<int64_t>();
  const int64_t words = (n_rows + 63) / 64;
  const int n_maps = std::max(1, std::min(at::get_num_threads(), static_cast<int>(N / 4096 + 1)));
  std::vector<std::vector<uint64_t>> maps(n_maps, std::vector<uint64_t>(static_cast<size_t>(words), 0));
  const int64_t chunk = (N + n_maps - 1) / n_maps;
  std::vector<int64_t> bad(n_maps, -1);
  at::parallel_for(0, n_maps, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint64_t* map = maps[t].data();
      for (int64_t e = t * chunk; e < std::min(N, (t + 1) * chunk); ++e) {
        const int64_t r = I[e];
        if (r < 0 || r >= n_rows) {
          bad[t] = e;
          break;
        }
        map[r >> 6] |= uint64_t(1) << (r & 63);
      }
    }
  });
  for (int t = 0; t < n_maps; ++t) {
    TORCH_CHECK(bad[t] < 0, "slot id ", I[bad[t]], " at flat position ", bad[t],  // message built on failure only
                " is out of range for a table of ", n_rows, " rows");
  }
  uint64_t* merged = maps[0].data();
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) {
    for (int t = 1; t < n_maps; ++t) merged[w] |= maps[t][w];
    count += __builtin_popcountll(merged[w]);
  }
  Tensor rows = at::empty({count}, indices.options());
  int64_t* R = rows.mutable_data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t w = 0; w < words; ++w) {
    for (uint64_t bits = merged[w]; bits != 0; bits &= bits - 1) R[k++] = w * 64 + __builtin_ctzll(bits);
  }
  return rows;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def("unique_rows(Tensor indices, int n_rows) -> Tensor", &unique_rows);
}
