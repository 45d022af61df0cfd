// memlayers_cpu::bag_backward, bag_backward_adam_ and bag_grad_sq_norm: the weighted bag sum's gradients in
// one pass over the unique rows read, optionally with the value table's AdamW step fused in
// (memlayers/lookup_cpu.py, RowSparseAdam.fused_backward), or only the value gradient's squared norm
// (RowSparseAdam's deferred fused update: the global-norm clip coefficient is known before the step).

#include "row_math.h"

#include <cmath>
#include <optional>
#include <utility>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sort.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

// Rows ahead to prefetch in the gathers: random rows miss every cache level and the
// hardware prefetcher cannot guess the next index.
constexpr int64_t kPrefetchAhead = 4;

// Gradient buffers are hundreds of MB and freshly allocated every step: with 4 KiB
// pages, first-touch page faults cost more than writing the data (measured: 418 MB
// takes ~100 ms to fault in vs ~16 ms to fill). Large buffers therefore come from
// 2 MiB-aligned memory advised for transparent huge pages (THP "madvise" mode is
// the common default). Elsewhere this is a plain at::empty.
Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes >= 2 * kHuge) {
    const size_t alloc = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, alloc) == 0) {
      madvise(ptr, alloc, MADV_HUGEPAGE);  // advisory: failure just means small pages
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

// Parallel first touch: zero-filling also faults the pages in on both cores.
Tensor zeros_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = empty_large(sizes, options);
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  at::parallel_for(0, nbytes, int64_t(1) << 22, [&](int64_t b0, int64_t b1) {
    std::memset(base + b0, 0, static_cast<size_t>(b1 - b0));
  });
  return t;
}

// ---------------------------------------------------------------- backward
// grad_weights only: per bag, dot(grad_out[b], values[idx[b,k]]) by column blocks (the same sums
// as the value-gradient kernels below). Used when the values need no gradient, so no sort is paid.
template <typename scalar_t>
void weights_grad_kernel(const Tensor& values, const Tensor& indices, const Tensor& grad_out, Tensor& gw) {
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const scalar_t* V = values.const_data_ptr<scalar_t>();
  const int64_t* I = indices.const_data_ptr<int64_t>();
  const float* G = grad_out.const_data_ptr<float>();
  float* GW = gw.mutable_data_ptr<float>();
  at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
    float p[kCB];
    for (int64_t b = b0; b < b1; ++b) {
      const float* __restrict__ g = G + b * D;
      const int64_t* idx = I + b * K;
      for (int64_t k = 0; k < K; ++k) {
        if (k + kPrefetchAhead < K) prefetch_row(V + idx[k + kPrefetchAhead] * D, D);
        const scalar_t* row = V + idx[k] * D;
        float dot = 0.f;
        for (int64_t col = 0; col < D; col += kCB) {
          const int64_t w = std::min(kCB, D - col);
          load_block(row + col, w, p);
          dot += dot_block(g + col, p, w);
        }
        GW[b * K + k] = dot;
      }
    }
  });
}

// Reads grouped by row: a stable sort of the flat indices, then segment starts.
struct RowSegments {
  Tensor sorted_rows, perm;
  std::vector<int64_t> seg_start;  // U+1 entries
  int64_t unique() const { return static_cast<int64_t>(seg_start.size()) - 1; }
};

// `order`: (sorted rows, permutation) of an earlier stable sort of these indices (a deferred update's
// norm pass hands its sort to the step), checked against the indices; otherwise sorted here.
RowSegments segment_rows(const Tensor& indices,
                         const std::optional<std::pair<Tensor, Tensor>>& order = std::nullopt) {
  RowSegments s;
  Tensor flat = indices.reshape({-1});
  if (order) {
    std::tie(s.sorted_rows, s.perm) = *order;
    const int64_t M = flat.numel();
    for (const Tensor* t : {&s.sorted_rows, &s.perm}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1 && t->numel() == M,
                  "sorted_rows and perm must be contiguous int64 tensors of indices.numel() entries");
    }
    const int64_t* S = s.sorted_rows.const_data_ptr<int64_t>();
    const int64_t* P = s.perm.const_data_ptr<int64_t>();
    const int64_t* F = flat.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < M; ++e) {  // a permutation that sorts the indices stably: what at::sort gives
      TORCH_CHECK(P[e] >= 0 && P[e] < M && S[e] == F[P[e]] &&
                      (e == 0 || S[e] > S[e - 1] || (S[e] == S[e - 1] && P[e] > P[e - 1])),
                  "sorted_rows/perm are not a stable sort of these indices");
    }
  } else {
    std::tie(s.sorted_rows, s.perm) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  }
  const int64_t M = flat.numel();
  const int64_t* S = s.sorted_rows.const_data_ptr<int64_t>();
  s.seg_start.reserve(M + 1);
  for (int64_t e = 0; e < M; ++e) {
    if (e == 0 || S[e] != S[e - 1]) s.seg_start.push_back(e);
  }
  s.seg_start.push_back(M);
  return s;
}

// What the pass over the unique rows does with each row's summed gradient.
enum class RowsOut {
  kGradRows,  // write it to `grad_rows` (row u, or row r when dense)
  kAdam,      // the AdamW step of that row, in place (FBGEMM's fused backward+update)
  kSqNorm,    // its squared L2 norm (in the table's dtype, as the unfused gradient holds it), and the row
              // itself to `grad_rows` (row u) when that is given
};

// The value gradient (plus grad_weights when needed) in one pass over the UNIQUE rows: every value
// row is read once, its dot products with the bag gradients give grad_weights, and its summed
// gradient either goes to `grad_rows` (kGradRows), straight into the AdamW step of that row (kAdam:
// no gradient row is written or read back), or into `row_sq[u]`, its squared norm (kSqNorm; the value
// row is read only for grad_weights). Fused, a row not yet caught up to step target-1 is first caught up as a read
// would (and rounded to the storage dtype as that write would), the gradient is rounded to the table's
// dtype as the unfused gradient tensor is, multiplied by `grad_scale` and rounded again when that is
// not 1 (the unfused gradient's in-place clip, `grad.mul_(scale)`), and the row's state is stored once.
//
// The reads' weights and weight gradients are used in row order, i.e. at random positions of the
// (B, K) tensors (2 MB each at 4096 x 128, past L2). Inside the row loop, whose state rows already
// keep the memory system busy, those scattered loads and read-modify-writes (one per column block)
// stalled it: so the weights are first gathered into row order and the weight gradients are summed
// in row order, then scattered back, each in a separate independent pass. The bag-gradient rows of
// the row kGradPrefetch unique rows ahead are prefetched (random rows of a (B, D) tensor larger than
// L2). Measured on the fused step (1M x 256 fp32 table, 4096 x 128 uniform reads, the two builds
// alternating in one process, median of 55 pairs): the gather/scatter 1.06x and 1.13x in two runs,
// the prefetch another 1.06-1.07x (8 and 16 rows ahead alike). Same sums in the same order: the
// results are bit-identical.
constexpr int64_t kGradPrefetch = 8;
template <typename scalar_t, RowsOut kOut, typename Rounding = Nearest>
void rows_backward_kernel(const Tensor& values, const Tensor& weights, const Tensor& grad_out, const int64_t K,
                          const RowSegments& seg, bool need_gw, bool dense, Tensor& grad_rows, Tensor& gw,
                          Tensor* exp_avg, Tensor* exp_avg_sq, Tensor* row_step, const AdamArgs* adam,
                          int64_t target, float grad_scale = 1.f, double* row_sq = nullptr) {
  constexpr bool kFuseAdam = kOut == RowsOut::kAdam;
  constexpr bool kNorm = kOut == RowsOut::kSqNorm;
  const int64_t D = values.size(1);
  const int64_t U = seg.unique();
  const int64_t* SS = seg.seg_start.data();
  scalar_t* Pp = const_cast<scalar_t*>(values.const_data_ptr<scalar_t>());
  const float* W = weights.const_data_ptr<float>();
  const float* G = grad_out.const_data_ptr<float>();
  const int64_t* S = seg.sorted_rows.const_data_ptr<int64_t>();
  const int64_t* Pm = seg.perm.const_data_ptr<int64_t>();
  scalar_t* GR = kOut == RowsOut::kGradRows || (kNorm && grad_rows.defined() && grad_rows.numel() > 0)
                     ? grad_rows.mutable_data_ptr<scalar_t>()
                     : nullptr;
  float* GW = need_gw ? gw.mutable_data_ptr<float>() : nullptr;
  scalar_t* Mp = kFuseAdam ? exp_avg->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* Vp = kFuseAdam ? exp_avg_sq->mutable_data_ptr<scalar_t>() : nullptr;
  int64_t* RS = kFuseAdam ? row_step->mutable_data_ptr<int64_t>() : nullptr;
  // Weights and weight gradients in row order (entry e belongs to read Pm[e]).
  const int64_t n_reads = seg.seg_start.back();
  std::vector<float> w_sorted(static_cast<size_t>(n_reads)), gw_sorted(need_gw ? static_cast<size_t>(n_reads) : 0);
  float* WS = w_sorted.data();
  float* GWS = gw_sorted.data();
  at::parallel_for(0, n_reads, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) WS[e] = W[Pm[e]];
  });
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    float p[kCB], m[kCB], v[kCB], acc[kCB];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t e0 = SS[u], e1 = SS[u + 1];
      const int64_t r = S[e0];
      if constexpr (kFuseAdam) {
        if (u + kStatePrefetch < u1) prefetch_state_row(Pp, Mp, Vp, S[SS[u + kStatePrefetch]], D);
      } else if (need_gw && u + kPrefetchAhead < u1) {
        prefetch_row(Pp + S[SS[u + kPrefetchAhead]] * D, D);
      }
      if (u + kGradPrefetch < u1) {
        for (int64_t e = SS[u + kGradPrefetch]; e < SS[u + kGradPrefetch + 1]; ++e) prefetch_row(G + (Pm[e] / K) * D, D);
      }
      CatchUp plan{};
      RowRnd<Rounding> at_read{}, at_step{};
      if constexpr (kFuseAdam) {
        const int64_t last = RS[r];
        TORCH_CHECK(last <= target - 1, "row ", r, " is ahead of the optimizer (row step ", last, " > ", target - 1, ")");
        plan = plan_catch_up(*adam, last, target - 1);
        at_read = row_rounding<Rounding>(*adam, r, target - 1);
        at_step = row_rounding<Rounding>(*adam, r, target);
      }
      const bool replay = has_replay(plan);
      double sq = 0.0;  // kNorm: the row's squared norm
      for_blocks(D, [&](int64_t col, auto w) {
        scalar_t* P = Pp + r * D + col;
        if (need_gw || kFuseAdam) load_block(P, w, p);
        if constexpr (kFuseAdam) {
          if (replay) {  // only when a row was not caught up at its read
            load_block(Mp + r * D + col, w, m);
            load_block(Vp + r * D + col, w, v);
            catch_up_block(p, m, v, w, *adam, plan);
            // As if caught up at the read: stored, then read back (the dot products see that value).
            round_block<scalar_t>(p, w, at_read.p);
            round_block<scalar_t>(m, w, at_read.m);
            round_block<scalar_t>(v, w, at_read.v);
          }
        }
        for (int64_t j = 0; j < w; ++j) acc[j] = 0.f;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t pos = Pm[e];
          const float* __restrict__ g = G + (pos / K) * D + col;
          const float wt = WS[e];
          if (need_gw) {
            const float dot = dot_block(g, p, w);
            GWS[e] = col == 0 ? dot : GWS[e] + dot;
          }
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) acc[j] += wt * g[j];
        }
        if constexpr (kNorm) {
          round_block<scalar_t>(acc, w);
#pragma omp simd reduction(+ : sq)
          for (int64_t j = 0; j < w; ++j) sq += static_cast<double>(acc[j]) * static_cast<double>(acc[j]);
          if (GR != nullptr) store_block(acc, w, GR + u * D + col);
        } else if constexpr (kFuseAdam) {
          round_block<scalar_t>(acc, w);
          if (grad_scale != 1.f) {
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) acc[j] *= grad_scale;
            round_block<scalar_t>(acc, w);
          }
          scalar_t* __restrict__ M = Mp + r * D + col;
          scalar_t* __restrict__ V = Vp + r * D + col;
          const AdamArgs& a = *adam;
          const StepScalars k = step_scalars(a, target);
          const float omb1 = a.omb1, b2 = a.b2, omb2 = a.omb2, eps = a.eps;
          if (!replay) {  // the common case: m, v straight from the table (two loops, no select: both vectorise)
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
              m[j] = load_f(M, j);
              v[j] = load_f(V, j);
            }
          }
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            float pj = p[j], mj = m[j], vj = v[j];
            grad_elem(pj, mj, vj, acc[j], k, omb1, b2, omb2, eps);
            store_r(P, j, pj, at_step.p);
            store_r(M, j, mj, at_step.m);
            store_r(V, j, vj, at_step.v);
          }
        } else {
          store_block(acc, w, GR + (dense ? r : u) * D + col);
        }
      });
      if constexpr (kFuseAdam) RS[r] = target;
      if constexpr (kNorm) row_sq[u] = sq;
    }
  });
  if (need_gw) {
    at::parallel_for(0, n_reads, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) GW[Pm[e]] = GWS[e];
    });
  }
}

void check_backward_inputs(const Tensor& values, const Tensor& indices, const Tensor& weights, const Tensor& grad_out) {
  check_lookup_inputs(values, indices, weights);
  const int64_t B = indices.size(0), D = values.size(1);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                  grad_out.size(0) == B && grad_out.size(1) == D,
              "grad_out must be a contiguous float32 (B, D) tensor");
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "values dtype must be float32, bfloat16 or float16, got ", st);
}

// Returns (rows, grad_rows, grad_weights):
//   sparse: rows = sorted unique slot ids (U,), grad_rows = (U, D) summed row grads;
//   dense:  rows = empty, grad_rows = (N, D) dense gradient;
//   grad_weights = (B, K) float32 (empty when not needed).
std::tuple<Tensor, Tensor, Tensor> bag_backward(const Tensor& values, const Tensor& indices,
                                                const Tensor& weights, const Tensor& grad_out,
                                                bool need_values_grad, bool need_weights_grad, bool dense) {
  check_backward_inputs(values, indices, weights, grad_out);
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const auto st = values.scalar_type();
  Tensor gw = need_weights_grad ? at::empty({B, K}, weights.options()) : at::empty({0}, weights.options());
  Tensor empty_rows = at::empty({0}, indices.options());

  if (!need_values_grad) {
    if (need_weights_grad) {
      if (st == at::kFloat) weights_grad_kernel<float>(values, indices, grad_out, gw);
      else if (st == at::kBFloat16) weights_grad_kernel<c10::BFloat16>(values, indices, grad_out, gw);
      else weights_grad_kernel<c10::Half>(values, indices, grad_out, gw);
    }
    return {empty_rows, at::empty({0, D}, values.options()), gw};
  }

  RowSegments seg = segment_rows(indices);
  const int64_t U = seg.unique();
  Tensor rows = dense ? empty_rows : at::empty({U}, indices.options());
  if (!dense) {
    int64_t* R = rows.mutable_data_ptr<int64_t>();
    const int64_t* S = seg.sorted_rows.const_data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) R[u] = S[seg.seg_start[u]];
  }
  // Dense: rows never touched must read zero; sparse: every row is written.
  Tensor grad_rows = dense ? zeros_large(values.sizes(), values.options()) : empty_large({U, D}, values.options());
  Tensor* none = nullptr;
  constexpr RowsOut kRows = RowsOut::kGradRows;
  if (st == at::kFloat)
    rows_backward_kernel<float, kRows>(values, weights, grad_out, K, seg, need_weights_grad, dense, grad_rows, gw,
                                       none, none, none, nullptr, 0);
  else if (st == at::kBFloat16)
    rows_backward_kernel<c10::BFloat16, kRows>(values, weights, grad_out, K, seg, need_weights_grad, dense,
                                               grad_rows, gw, none, none, none, nullptr, 0);
  else
    rows_backward_kernel<c10::Half, kRows>(values, weights, grad_out, K, seg, need_weights_grad, dense, grad_rows,
                                           gw, none, none, none, nullptr, 0);
  return {rows, grad_rows, gw};
}

// Fused backward + AdamW step of the value table (row-sparse, exact: see rows_backward_kernel and
// lazy_adam_rows_), the value gradient scaled by `grad_scale` (a global-norm clip coefficient; 1: none).
// Returns grad_weights (B, K) float32 (empty when not needed).
Tensor bag_backward_adam_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor row_step, const Tensor& indices,
                          const Tensor& weights, const Tensor& grad_out, bool need_weights_grad, const Tensor& hist,
                          int64_t target, double beta1, double beta2, double eps, int64_t horizon,
                          int64_t rounding_seed, double grad_scale, const std::optional<Tensor>& sorted_rows,
                          const std::optional<Tensor>& perm) {
  check_backward_inputs(param, indices, weights, grad_out);
  TORCH_CHECK(sorted_rows.has_value() == perm.has_value(), "pass sorted_rows and perm together, or neither");
  const float scale = static_cast<float>(grad_scale);  // as `grad.mul_(scale)` converts a Python float
  TORCH_CHECK(std::isfinite(scale) && scale >= 0.f, "grad_scale must be finite and >= 0, got ", grad_scale);
  check_adam_state(param, exp_avg, exp_avg_sq, row_step, hist, target);
  TORCH_CHECK(target >= 1, "target step must be >= 1");
  const int64_t B = indices.size(0), K = indices.size(1);
  Tensor gw = need_weights_grad ? at::empty({B, K}, weights.options()) : at::empty({0}, weights.options());
  RowSegments seg =
      sorted_rows ? segment_rows(indices, std::make_pair(*sorted_rows, *perm)) : segment_rows(indices);
  const AdamArgs a = make_adam_args(hist, beta1, beta2, eps, horizon, rounding_seed);
  Tensor none;
  switch (param.scalar_type()) {
    case at::kFloat:
      rows_backward_kernel<float, RowsOut::kAdam>(param, weights, grad_out, K, seg, need_weights_grad, false, none,
                                                  gw, &exp_avg, &exp_avg_sq, &row_step, &a, target, scale);
      break;
    case at::kBFloat16:
      with_rounding<c10::BFloat16>(rounding_seed, [&](auto rnd) {
        rows_backward_kernel<c10::BFloat16, RowsOut::kAdam, decltype(rnd)>(param, weights, grad_out, K, seg,
                                                                           need_weights_grad, false, none, gw,
                                                                           &exp_avg, &exp_avg_sq, &row_step, &a,
                                                                           target, scale);
      });
      break;
    default:
      rows_backward_kernel<c10::Half, RowsOut::kAdam>(param, weights, grad_out, K, seg, need_weights_grad, false,
                                                      none, gw, &exp_avg, &exp_avg_sq, &row_step, &a, target, scale);
  }
  return gw;
}

// The squared L2 norm (float64 scalar) of the value gradient that bag_backward would return for these
// reads, in the table's dtype: each row's gradient summed in registers as the fused update sums it,
// then squared, with no gradient row written. Rows in sorted order, each row's columns in blocks, then
// the rows' sums one after the other: the same number for any thread count. With need_weights_grad
// also grad_weights, from the same pass (each unique value row read once, as bag_backward reads it;
// without it no value row is read). When the rows are read at least `rows_at_reads_per_row` times each
// on average (>= 0; < 0: never), the summed rows are also written, as bag_backward writes them: few
// rows read many times cost less to keep than to sum again at the step. Returns (sq_norm, grad_weights
// or empty, sorted_rows, perm, rows, grad_rows): the sort, for bag_backward_adam_ to reuse, and the
// unique rows with their (U, D) gradient rows, or empty (0,) and (0, D) when not written.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bag_grad_sq_norm(
    const Tensor& values, const Tensor& indices, const Tensor& weights, const Tensor& grad_out,
    bool need_weights_grad, double rows_at_reads_per_row) {
  check_backward_inputs(values, indices, weights, grad_out);
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const bool need_gw = need_weights_grad;
  RowSegments seg = segment_rows(indices);
  const int64_t U = seg.unique();
  std::vector<double> row_sq(static_cast<size_t>(U));
  const bool write_rows = U > 0 && rows_at_reads_per_row >= 0 &&
                          static_cast<double>(B * K) >= rows_at_reads_per_row * static_cast<double>(U);
  Tensor rows = at::empty({write_rows ? U : 0}, indices.options());
  if (write_rows) {
    int64_t* R = rows.mutable_data_ptr<int64_t>();
    const int64_t* S = seg.sorted_rows.const_data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) R[u] = S[seg.seg_start[u]];
  }
  Tensor grad_rows = write_rows ? empty_large({U, D}, values.options()) : at::empty({0, D}, values.options());
  Tensor gw = need_gw ? at::empty({B, K}, weights.options()) : at::empty({0}, weights.options());
  Tensor* no_state = nullptr;
  constexpr RowsOut kNorm = RowsOut::kSqNorm;
  switch (values.scalar_type()) {
    case at::kFloat:
      rows_backward_kernel<float, kNorm>(values, weights, grad_out, K, seg, need_gw, false, grad_rows, gw, no_state,
                                         no_state, no_state, nullptr, 0, 1.f, row_sq.data());
      break;
    case at::kBFloat16:
      rows_backward_kernel<c10::BFloat16, kNorm>(values, weights, grad_out, K, seg, need_gw, false, grad_rows, gw,
                                                 no_state, no_state, no_state, nullptr, 0, 1.f, row_sq.data());
      break;
    default:
      rows_backward_kernel<c10::Half, kNorm>(values, weights, grad_out, K, seg, need_gw, false, grad_rows, gw,
                                             no_state, no_state, no_state, nullptr, 0, 1.f, row_sq.data());
  }
  double total = 0.0;
  for (double x : row_sq) total += x;
  Tensor sq_norm = at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
  return {sq_norm, gw, seg.sorted_rows, seg.perm, rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def(
      "bag_backward(Tensor values, Tensor indices, Tensor weights, Tensor grad_out, bool need_values_grad, "
      "bool need_weights_grad, bool dense) -> (Tensor, Tensor, Tensor)",
      &bag_backward);
  m.def(
      "bag_backward_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor indices, Tensor weights, Tensor grad_out, bool need_weights_grad, Tensor hist, int target, "
      "float beta1, float beta2, float eps, int horizon, int rounding_seed=-1, float grad_scale=1.0, "
      "Tensor? sorted_rows=None, Tensor? perm=None) -> Tensor",
      &bag_backward_adam_);
  m.def(
      "bag_grad_sq_norm(Tensor values, Tensor indices, Tensor weights, Tensor grad_out, bool need_weights_grad=False, "
      "float rows_at_reads_per_row=-1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      &bag_grad_sq_norm);
}
