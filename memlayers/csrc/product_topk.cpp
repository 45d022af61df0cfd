// memlayers_cpu::product_topk: the product-key search's top-K (memlayers/key_search.py).

#include "row_math.h"

namespace {

// ---------------------------------------------------------------- product-key top-K
// The memory layer's search (memlayers/memory.py, ProductKeyMemory.select): per (token, head), the
// top-K of each half's N sub-key scores, then the top-K of the K*K sums s1[i] + s2[j]. torch.topk
// over N = 1024 scores costs ~10 us per row on this CPU (most of the memory layer's own time); here one
// pass over the N scores rejects almost every score with one compare against the current K-th best
// (see top_k_row), and of the K*K sums only the ~K ln K that can rank in the top K are formed.
// Outputs are indices only (sorted by descending score, as torch.topk sorts); the caller gathers the
// scores with differentiable torch ops. Ties are broken towards the lower index.
template <typename T>
inline bool better(T a, int64_t ia, T b, int64_t ib) {  // a ranks before b; NaN ranks first, as in torch.topk
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

template <typename T>
void top_k_row(const T* x, int64_t n, int64_t K, int64_t* out, std::vector<std::pair<T, int64_t>>& buf) {
  // Candidates beat the current K-th best `t`; when 2K have gathered, nth_element keeps the best K and
  // raises `t`. On random scores only ~K*ln(n/K) of the n pass the one compare. A later equal score
  // has a higher index, so it can never displace the K-th: `>` is exact, ties included.
  auto rank = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return better(a.first, a.second, b.first, b.second);
  };
  if (n >= 4 * K) {
    // Pre-threshold: cut the row into K chunks. Each chunk's maximum is reached by a score of its own,
    // so at least K scores reach the smallest of those maxima, t0: the K-th best is >= t0 and no score
    // below t0 can rank. A vectorised pass for the maxima and a branch-free gather of the scores >= t0
    // (~10% of them on random scores) replace the compare-and-partition loop below. A row with a NaN
    // takes that loop (NaN ranks first there, as in torch.topk).
    const int64_t c = n / K;
    T t0 = std::numeric_limits<T>::infinity();
    int nan = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T* xc = x + k * c;
      const int64_t len = k == K - 1 ? n - k * c : c;
      T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx) reduction(| : nan)
      for (int64_t i = 0; i < len; ++i) {
        mx = xc[i] > mx ? xc[i] : mx;
        nan |= xc[i] != xc[i];
      }
      t0 = mx < t0 ? mx : t0;
    }
    if (!nan) {
      if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
      std::pair<T, int64_t>* b = buf.data();
      int64_t cnt = 0;
      for (int64_t i = 0; i < n; ++i) {  // branch-free: write always, advance when kept
        b[cnt] = {x[i], i};
        cnt += x[i] >= t0;
      }
      if (cnt > K) std::nth_element(b, b + (K - 1), b + cnt, rank);
      std::sort(b, b + K, rank);  // cnt >= K: the K chunk maxima are all kept
      for (int64_t k = 0; k < K; ++k) out[k] = b[k].second;
      return;
    }
  }
  buf.clear();
  T t = -std::numeric_limits<T>::infinity();
  bool full = false;
  for (int64_t i = 0; i < n; ++i) {
    if (full && x[i] <= t) continue;  // NaN never takes this branch (nor does anything when t is NaN)
    buf.emplace_back(x[i], i);
    if (static_cast<int64_t>(buf.size()) == 2 * K) {
      std::nth_element(buf.begin(), buf.begin() + (K - 1), buf.end(), rank);
      buf.resize(K);
      t = buf[K - 1].first;
      for (int64_t j = 0; j < K - 1; ++j) t = std::min(t, buf[j].first);
      full = true;
    }
  }
  if (static_cast<int64_t>(buf.size()) > K) {
    std::nth_element(buf.begin(), buf.begin() + (K - 1), buf.end(), rank);
    buf.resize(K);
  }
  std::sort(buf.begin(), buf.end(), rank);  // best first
  for (int64_t k = 0; k < K; ++k) out[k] = buf[k].second;
}

template <typename T>
void product_topk_kernel(const Tensor& scores, int64_t K, Tensor& top_i, Tensor& best_pos) {
  const int64_t rows = scores.numel() / (2 * scores.size(-1));  // (token, head) pairs
  const int64_t N = scores.size(-1);
  const T* S = scores.const_data_ptr<T>();
  int64_t* TI = top_i.mutable_data_ptr<int64_t>();
  int64_t* BP = best_pos.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<std::pair<T, int64_t>> buf;
    buf.reserve(2 * K);
    std::vector<std::pair<T, int64_t>> cand;  // (s1[a] + s2[b], a*K + b)
    auto rank = [](const std::pair<T, int64_t>& x, const std::pair<T, int64_t>& y) {
      return better(x.first, x.second, y.first, y.second);
    };
    for (int64_t r = r0; r < r1; ++r) {
      const T* s1 = S + (2 * r) * N;
      const T* s2 = s1 + N;
      int64_t* i1 = TI + (2 * r) * K;
      int64_t* i2 = i1 + K;
      top_k_row(s1, N, K, i1, buf);
      top_k_row(s2, N, K, i2, buf);
      // Both lists are descending, so the sum at (a, b) is beaten by the (a+1)(b+1)-1 sums above and left
      // of it: only pairs with (a+1)(b+1) <= K can be among the K best (~K ln K of the K*K).
      cand.clear();
      for (int64_t a = 0; a < K; ++a) {
        const T x = s1[i1[a]];
        for (int64_t b = 0; (a + 1) * (b + 1) <= K; ++b) cand.emplace_back(x + s2[i2[b]], a * K + b);
      }
      std::nth_element(cand.begin(), cand.begin() + (K - 1), cand.end(), rank);
      std::sort(cand.begin(), cand.begin() + K, rank);
      int64_t* out = BP + r * K;
      for (int64_t k = 0; k < K; ++k) out[k] = cand[k].second;
    }
  });
}

// scores (..., 2, N) contiguous float32/float64 -> (top_i (..., 2, K), best_pos (..., K)) int64:
// top_i = each half's top-K sub-key ids, best_pos = flat positions a*K + b (into top_i's two lists)
// of the K best sums, both in descending score order.
std::tuple<Tensor, Tensor> product_topk(const Tensor& scores, int64_t K) {
  TORCH_CHECK(scores.dim() >= 2 && scores.size(-2) == 2 && scores.is_contiguous(),
              "scores must be a contiguous (..., 2, N) tensor");
  const int64_t N = scores.size(-1);
  TORCH_CHECK(K >= 1 && K <= N, "K must lie in [1, N]");
  auto sizes = scores.sizes().vec();
  sizes.back() = K;
  Tensor top_i = at::empty(sizes, scores.options().dtype(at::kLong));
  sizes.pop_back();
  sizes.back() = K;
  Tensor best_pos = at::empty(sizes, scores.options().dtype(at::kLong));
  if (scores.numel() == 0) return {top_i, best_pos};
  switch (scores.scalar_type()) {
    case at::kFloat: product_topk_kernel<float>(scores, K, top_i, best_pos); break;
    case at::kDouble: product_topk_kernel<double>(scores, K, top_i, best_pos); break;
    default: TORCH_CHECK(false, "scores must be float32 or float64, got ", scores.scalar_type());
  }
  return {top_i, best_pos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def("product_topk(Tensor scores, int K) -> (Tensor, Tensor)", &product_topk);
}
