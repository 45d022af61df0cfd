// memlayers_cpu::selected_scores_backward: the K-sparse gradient of the selected sub-key scores
// (memlayers/key_search.py).

#include "row_math.h"

namespace {

// ---------------------------------------------------------------- selected-score gradients
// The product-key search reads every sub-key score (T, G, N) but only the K selected ones per row
// (top_s = scores.gather(-1, top_i)) reach the loss, so their gradient is K-sparse: the dense route
// (a zero (T, G, N) gradient, scatter, two batched matmuls over it) moves and multiplies N/K times
// more than it needs (67 MB written and read back per memory layer and step at the 20M model's shape).
//   grad_q[t, g]       = sum_k grad[t, g, k] * keys[g, top_i[t, g, k]]
//   grad_keys[g, n]    = sum over (t, k) with top_i[t, g, k] == n of grad[t, g, k] * q[t, g]
// Both sums run in a fixed order ((t, k) ascending), so results do not depend on the thread count.
template <typename T>
void selected_scores_backward_kernel(const Tensor& grad, const Tensor& q, const Tensor& keys, const Tensor& top_i,
                                     Tensor& gq, Tensor& gk) {
  const int64_t R = q.size(0), G = q.size(1), D = q.size(2), N = keys.size(1), K = top_i.size(2);
  const T* Gr = grad.const_data_ptr<T>();
  const T* Q = q.const_data_ptr<T>();
  const T* KS = keys.const_data_ptr<T>();
  const int64_t* I = top_i.const_data_ptr<int64_t>();
  T* GQ = gq.mutable_data_ptr<T>();
  T* GK = gk.mutable_data_ptr<T>();
  at::parallel_for(0, R, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        T* __restrict__ out = GQ + (r * G + g) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = T(0);
        const int64_t* idx = I + (r * G + g) * K;
        const T* w = Gr + (r * G + g) * K;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = idx[k];
          TORCH_CHECK(n >= 0 && n < N, "sub-key id ", n, " out of range [0, ", N, ")");
          const T* __restrict__ key = KS + (g * N + n) * D;
          const T wk = w[k];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) out[d] += wk * key[d];
        }
      }
    }
  });
  // grad_keys: each task owns a range of one group's sub-keys (no two tasks write one row) and scans
  // that group's selections; G alone (8 at the 20M shape) would leave most cores of a bigger box idle.
  const int64_t chunks = std::min<int64_t>(N, std::max<int64_t>(1, (4 * at::get_num_threads() + G - 1) / G));
  at::parallel_for(0, G * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, c = t % chunks;
      const int64_t n0 = c * N / chunks, n1 = (c + 1) * N / chunks;
      T* rows = GK + (g * N + n0) * D;
      std::fill(rows, rows + (n1 - n0) * D, T(0));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t* idx = I + (r * G + g) * K;
        const T* w = Gr + (r * G + g) * K;
        const T* __restrict__ qr = Q + (r * G + g) * D;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = idx[k];
          if (n < n0 || n >= n1) continue;
          T* __restrict__ out = GK + (g * N + n) * D;
          const T wk = w[k];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) out[d] += wk * qr[d];
        }
      }
    }
  });
}

// grad (R, G, K), q (R, G, D), keys (G, N, D), top_i (R, G, K) int64 -> (grad_q (R, G, D), grad_keys (G, N, D)).
std::tuple<Tensor, Tensor> selected_scores_backward(const Tensor& grad, const Tensor& q, const Tensor& keys,
                                                    const Tensor& top_i) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && top_i.dim() == 3 && grad.dim() == 3,
              "selected_scores_backward: grad, q, top_i must be (R, G, *) and keys (G, N, D)");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && top_i.is_contiguous() && grad.is_contiguous(),
              "selected_scores_backward: inputs must be contiguous");
  TORCH_CHECK(keys.size(0) == q.size(1) && keys.size(2) == q.size(2), "keys must be (G, N, D) for q (R, G, D)");
  TORCH_CHECK(top_i.size(0) == q.size(0) && top_i.size(1) == q.size(1) && grad.sizes() == top_i.sizes(),
              "grad and top_i must both be (R, G, K) for q (R, G, D)");
  TORCH_CHECK(top_i.scalar_type() == at::kLong, "top_i must be int64");
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && keys.scalar_type() == q.scalar_type(),
              "grad, q and keys must share one dtype");
  Tensor gq = at::empty(q.sizes(), q.options());
  Tensor gk = at::empty(keys.sizes(), keys.options());
  switch (q.scalar_type()) {
    case at::kFloat: selected_scores_backward_kernel<float>(grad, q, keys, top_i, gq, gk); break;
    case at::kDouble: selected_scores_backward_kernel<double>(grad, q, keys, top_i, gq, gk); break;
    default: TORCH_CHECK(false, "selected_scores_backward: float32 or float64 only, got ", q.scalar_type());
  }
  return {gq, gk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def("selected_scores_backward(Tensor grad, Tensor q, Tensor keys, Tensor top_i) -> (Tensor, Tensor)",
        &selected_scores_backward);
}
