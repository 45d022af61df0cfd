// CPU kernels for the memory-layer value lookup and its row-sparse Adam step.
//
// Registered as torch.library ops in the `memlayers_cpu` namespace; the Python side
// (memlayers/lookup_cpu.py) builds this file once with torch.utils.cpp_extension and
// falls back to pure torch when it cannot.
//
// Only per-operator ATen headers are included: the catch-all <torch/extension.h>
// triples the build time and we need neither pybind nor the full op surface.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

using at::Tensor;

// Bags/rows are cheap (one row is a few hundred bytes to a few KB); grains of this
// many rows keep the per-task overhead negligible while leaving work to balance.
constexpr int64_t kGrain = 64;
// Rows ahead to prefetch in the gathers: random rows miss every cache level and the
// hardware prefetcher cannot guess the next index.
constexpr int64_t kPrefetchAhead = 4;

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

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

#ifndef MEMLAYERS_PF_LOCALITY
#define MEMLAYERS_PF_LOCALITY 1  // prefetcht2: into L2 (measured faster than t0 and nta for 1 KB rows)
#endif
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(p + off, 0, MEMLAYERS_PF_LOCALITY);
  }
}

void check_lookup_inputs(const Tensor& values, const Tensor& indices, const Tensor& weights) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous 2-D tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == at::kLong,
              "indices must be a contiguous (B, K) int64 tensor");
  TORCH_CHECK(weights.sizes() == indices.sizes() && weights.is_contiguous() &&
                  weights.scalar_type() == at::kFloat,
              "weights must be a contiguous float32 tensor shaped like indices");
}

// ---------------------------------------------------------------- forward
// out[b] = sum_k w[b,k] * values[idx[b,k]], accumulated in fp32.
//
// The reads are random rows, so the forward is bound by memory latency: the kernel keeps
// kForwardPrefetch rows in flight, counted over the flat (bag, slot) sequence so the next
// bag's first rows are already on their way while this bag finishes. Columns are done in
// blocks of kColBlock floats held in registers across the bag's K rows (one store per block
// instead of a load+store of the accumulator per row); the first block pulls each row into
// cache (prefetched), the later blocks of the same bag re-read it from L1/L2.
#ifndef MEMLAYERS_FWD_PREFETCH
#define MEMLAYERS_FWD_PREFETCH 16
#endif
#ifndef MEMLAYERS_COL_BLOCK
#define MEMLAYERS_COL_BLOCK 64
#endif
constexpr int64_t kForwardPrefetch = MEMLAYERS_FWD_PREFETCH;
constexpr int64_t kColBlock = MEMLAYERS_COL_BLOCK;

inline float load_f(const float* p, int64_t j) { return p[j]; }
inline float load_f(const c10::BFloat16* p, int64_t j) {
  // bf16 -> fp32 is a 16-bit shift; spelled out so the compiler vectorises it.
  const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float load_f(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }

// One column block of one bag. With `ahead` non-null (the first block), row k's turn also
// prefetches the row kForwardPrefetch reads later in the flat sequence (`ahead[k]`, while
// k < n_ahead).
template <typename scalar_t, int64_t CB>
inline void bag_block(const scalar_t* __restrict__ V, const int64_t* __restrict__ idx, const float* __restrict__ w,
                      int64_t K, int64_t D, int64_t col, float* __restrict__ out, const int64_t* ahead,
                      int64_t n_ahead) {
  float acc[CB];
  for (int64_t j = 0; j < CB; ++j) acc[j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    if (ahead != nullptr && k < n_ahead) prefetch_row(V + ahead[k] * D, D);
    const scalar_t* __restrict__ row = V + idx[k] * D + col;
    const float wk = w[k];
#pragma omp simd
    for (int64_t j = 0; j < CB; ++j) acc[j] += wk * load_f(row, j);
  }
  for (int64_t j = 0; j < CB; ++j) out[j] = acc[j];
}

template <typename scalar_t>
void bag_forward_kernel(const Tensor& values, const Tensor& indices, const Tensor& weights, Tensor& out) {
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const scalar_t* V = values.const_data_ptr<scalar_t>();
  const int64_t* I = indices.const_data_ptr<int64_t>();
  const float* W = weights.const_data_ptr<float>();
  float* O = out.mutable_data_ptr<float>();
  const int64_t full = D / kColBlock * kColBlock;
  at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
    const int64_t e_end = b1 * K;
    // Prime the pipeline: the first rows of this chunk.
    for (int64_t e = b0 * K; e < std::min(e_end, b0 * K + kForwardPrefetch); ++e) prefetch_row(V + I[e] * D, D);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* idx = I + b * K;
      const float* w = W + b * K;
      float* o = O + b * D;
      const int64_t e0 = b * K;
      const int64_t* ahead = I + e0 + kForwardPrefetch;
      const int64_t n_ahead = std::max<int64_t>(0, std::min(K, e_end - e0 - kForwardPrefetch));
      for (int64_t col = 0; col < full; col += kColBlock)
        bag_block<scalar_t, kColBlock>(V, idx, w, K, D, col, o + col, col == 0 ? ahead : nullptr, n_ahead);
      if (full == 0) {  // narrow rows: the tail loop below is the only pass, prefetch there
        for (int64_t k = 0; k < n_ahead; ++k) prefetch_row(V + ahead[k] * D, D);
      }
      if (full < D) {
        const int64_t rest = D - full;
        for (int64_t j = 0; j < rest; ++j) o[full + j] = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* __restrict__ row = V + idx[k] * D + full;
          const float wk = w[k];
#pragma omp simd
          for (int64_t j = 0; j < rest; ++j) o[full + j] += wk * load_f(row, j);
        }
      }
    }
  });
}

Tensor bag_forward(const Tensor& values, const Tensor& indices, const Tensor& weights) {
  check_lookup_inputs(values, indices, weights);
  Tensor out = at::empty({indices.size(0), values.size(1)}, values.options().dtype(at::kFloat));
  switch (values.scalar_type()) {
    case at::kFloat: bag_forward_kernel<float>(values, indices, weights, out); break;
    case at::kBFloat16: bag_forward_kernel<c10::BFloat16>(values, indices, weights, out); break;
    case at::kHalf: bag_forward_kernel<c10::Half>(values, indices, weights, out); break;
    default: TORCH_CHECK(false, "values dtype must be float32, bfloat16 or float16, got ", values.scalar_type());
  }
  return out;
}

// ---------------------------------------------------------------- backward
// grad_weights only: per bag, dot(grad_out[b], values[idx[b,k]]). Used when the
// values need no gradient, so no sort is paid for.
template <typename scalar_t>
void weights_grad_kernel(const Tensor& values, const Tensor& indices, const Tensor& grad_out, Tensor& gw) {
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const scalar_t* V = values.const_data_ptr<scalar_t>();
  const int64_t* I = indices.const_data_ptr<int64_t>();
  const float* G = grad_out.const_data_ptr<float>();
  float* GW = gw.mutable_data_ptr<float>();
  at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* __restrict__ g = G + b * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t* idx = I + b * K;
        if (k + kPrefetchAhead < K) prefetch_row(V + idx[k + kPrefetchAhead] * D, D);
        const scalar_t* __restrict__ row = V + idx[k] * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += g[d] * to_f(row[d]);
        GW[b * K + k] = dot;
      }
    }
  });
}

// The value gradient (plus grad_weights when needed) in one pass over the UNIQUE rows: every value row is read once
// (coalesced) and its gradient row written once; grad_weights comes from the same
// read. Entries are grouped by row with a stable sort of the flat indices.
template <typename scalar_t>
void fused_backward_kernel(const Tensor& values, const Tensor& weights, const Tensor& grad_out,
                           const int64_t K, const Tensor& sorted_rows, const Tensor& perm,
                           const std::vector<int64_t>& seg_start, bool need_gw, bool dense,
                           Tensor& grad_rows, Tensor& gw) {
  const int64_t D = values.size(1);
  const int64_t U = static_cast<int64_t>(seg_start.size()) - 1;
  const scalar_t* V = values.const_data_ptr<scalar_t>();
  const float* W = weights.const_data_ptr<float>();
  const float* G = grad_out.const_data_ptr<float>();
  const int64_t* S = sorted_rows.const_data_ptr<int64_t>();
  const int64_t* P = perm.const_data_ptr<int64_t>();
  scalar_t* GR = grad_rows.mutable_data_ptr<scalar_t>();
  float* GW = need_gw ? gw.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    std::vector<float> acc_buf(D);
    float* __restrict__ acc = acc_buf.data();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t e0 = seg_start[u], e1 = seg_start[u + 1];
      const int64_t r = S[e0];
      if (u + kPrefetchAhead < u1 && need_gw) prefetch_row(V + S[seg_start[u + kPrefetchAhead]] * D, D);
      const scalar_t* __restrict__ row = V + r * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t pos = P[e];
        const float* __restrict__ g = G + (pos / K) * D;
        const float w = W[pos];
        if (need_gw) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) {
            dot += g[d] * to_f(row[d]);
            acc[d] += w * g[d];
          }
          GW[pos] = dot;
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w * g[d];
        }
      }
      {
        scalar_t* __restrict__ out = GR + (dense ? r : u) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] = from_f<scalar_t>(acc[d]);
      }
    }
  });
}

// Returns (rows, grad_rows, grad_weights):
//   sparse: rows = sorted unique slot ids (U,), grad_rows = (U, D) summed row grads;
//   dense:  rows = empty, grad_rows = (N, D) dense gradient;
//   grad_weights = (B, K) float32 (empty when not needed).
std::tuple<Tensor, Tensor, Tensor> bag_backward(const Tensor& values, const Tensor& indices,
                                                const Tensor& weights, const Tensor& grad_out,
                                                bool need_values_grad, bool need_weights_grad, bool dense) {
  check_lookup_inputs(values, indices, weights);
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                  grad_out.size(0) == B && grad_out.size(1) == D,
              "grad_out must be a contiguous float32 (B, D) tensor");
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "values dtype must be float32, bfloat16 or float16, got ", st);
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

  Tensor flat = indices.reshape({-1});
  auto [sorted_rows, perm] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t M = flat.numel();
  const int64_t* S = sorted_rows.const_data_ptr<int64_t>();
  std::vector<int64_t> seg_start;
  seg_start.reserve(M + 1);
  for (int64_t e = 0; e < M; ++e) {
    if (e == 0 || S[e] != S[e - 1]) seg_start.push_back(e);
  }
  seg_start.push_back(M);
  const int64_t U = static_cast<int64_t>(seg_start.size()) - 1;

  Tensor rows = dense ? empty_rows : at::empty({U}, indices.options());
  if (!dense) {
    int64_t* R = rows.mutable_data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) R[u] = S[seg_start[u]];
  }
  // Dense: rows never touched must read zero; sparse: every row is written.
  Tensor grad_rows = dense ? zeros_large(values.sizes(), values.options()) : empty_large({U, D}, values.options());

  if (st == at::kFloat)
    fused_backward_kernel<float>(values, weights, grad_out, K, sorted_rows, perm, seg_start,
                                 need_weights_grad, dense, grad_rows, gw);
  else if (st == at::kBFloat16)
    fused_backward_kernel<c10::BFloat16>(values, weights, grad_out, K, sorted_rows, perm, seg_start,
                                         need_weights_grad, dense, grad_rows, gw);
  else
    fused_backward_kernel<c10::Half>(values, weights, grad_out, K, sorted_rows, perm, seg_start,
                                     need_weights_grad, dense, grad_rows, gw);
  return {rows, grad_rows, gw};
}

// ---------------------------------------------------------------- exact row-sparse Adam
// Dense AdamW (torch.optim.AdamW, single-tensor path) applied row by row, lazily: a row is
// brought up to date only when it is read or gets a gradient. `row_step[r]` is the optimizer
// step through which row r is current. Catching a row up from step `last` to `upto` replays
// the steps dense AdamW took with a zero gradient for it:
//   m = lerp(m, 0, 1-b1);  v = b2*v;  p = p*decay_s - step_size_s*m / (sqrt(v)/bc2sqrt_s + eps)
// with the per-step scalars of step s read from `hist` (doubles, one row per step:
// step_size = lr_s/bc1_s, bc2sqrt_s, decay_s = 1 - lr_s*wd, C_s = sum_{j<=s} log(decay_j)).
// After `horizon` replayed steps the remaining updates are below float resolution (the
// Python side derives the horizon from the betas; < 0 = replay every step): the rest of the
// gap is applied in closed form (m *= b1^n, v *= b2^n, p *= exp(C_upto - C_s)).
// With `grad_rows` non-empty the rows are caught up to `target - 1` and then take step
// `target` with their gradient; otherwise they are caught up to `target`.
// `claim`: rows may repeat (raw read indices); each row is claimed with a compare-and-swap
// on row_step so exactly one thread replays it. Without claim rows must be unique.
template <typename scalar_t>
void lazy_adam_kernel(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& row_step, const Tensor& rows,
                      const Tensor& grad_rows, const Tensor& hist, int64_t target, double beta1, double beta2,
                      double eps, int64_t horizon, bool claim) {
  const int64_t U = rows.numel(), D = param.size(1);
  const bool has_grad = grad_rows.numel() > 0;
  const int64_t upto = has_grad ? target - 1 : target;
  scalar_t* Pp = param.mutable_data_ptr<scalar_t>();
  scalar_t* Mp = exp_avg.mutable_data_ptr<scalar_t>();
  scalar_t* Vp = exp_avg_sq.mutable_data_ptr<scalar_t>();
  int64_t* RS = row_step.mutable_data_ptr<int64_t>();
  const int64_t* R = rows.const_data_ptr<int64_t>();
  const scalar_t* Gp = has_grad ? grad_rows.const_data_ptr<scalar_t>() : nullptr;
  const double* H = hist.const_data_ptr<double>();  // (T+1, 4)
  const float b1 = beta1, b2 = beta2, omb1 = 1.0 - beta1, omb2 = 1.0 - beta2, fe = eps;
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(3 * D);
    float* __restrict__ p = buf.data();
    float* __restrict__ m = p + D;
    float* __restrict__ v = m + D;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = R[u];
      int64_t last = RS[r];
      if (claim) {
        if (last < 0 || last >= upto) continue;  // being replayed by another thread, or current
        if (!__atomic_compare_exchange_n(&RS[r], &last, int64_t(-1), false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
          continue;
      }
      TORCH_CHECK(last <= upto, "row ", r, " is ahead of the optimizer (row step ", last, " > ", upto, ")");
      scalar_t* P = Pp + r * D;
      scalar_t* M = Mp + r * D;
      scalar_t* V = Vp + r * D;
      for (int64_t d = 0; d < D; ++d) {
        p[d] = to_f(P[d]);
        m[d] = to_f(M[d]);
        v[d] = to_f(V[d]);
      }
      const int64_t gap = upto - last;
      const int64_t n_replay = horizon < 0 ? gap : std::min(gap, horizon);
      for (int64_t s = last + 1; s <= last + n_replay; ++s) {
        const double* h = H + 4 * s;
        const float ss = h[0], bc2s = h[1], dec = h[2];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float md = m[d] + omb1 * (0.f - m[d]);
          const float vd = v[d] * b2;
          p[d] = p[d] * dec + (-ss * md) / (std::sqrt(vd) / bc2s + fe);
          m[d] = md;
          v[d] = vd;
        }
      }
      if (gap > n_replay) {
        const int64_t rest = gap - n_replay;
        const float fm = std::pow(beta1, double(rest)), fv = std::pow(beta2, double(rest));
        const float fd = std::exp(H[4 * upto + 3] - H[4 * (last + n_replay) + 3]);
        for (int64_t d = 0; d < D; ++d) {
          m[d] *= fm;
          v[d] *= fv;
          p[d] *= fd;
        }
      }
      if (has_grad) {
        const double* h = H + 4 * target;
        const float ss = h[0], bc2s = h[1], dec = h[2];
        const scalar_t* __restrict__ g = Gp + u * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float gd = to_f(g[d]);
          const float md = m[d] + omb1 * (gd - m[d]);
          const float vd = v[d] * b2 + omb2 * gd * gd;
          p[d] = p[d] * dec + (-ss * md) / (std::sqrt(vd) / bc2s + fe);
          m[d] = md;
          v[d] = vd;
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        P[d] = from_f<scalar_t>(p[d]);
        M[d] = from_f<scalar_t>(m[d]);
        V[d] = from_f<scalar_t>(v[d]);
      }
      if (claim) __atomic_store_n(&RS[r], target, __ATOMIC_RELEASE);
      else RS[r] = target;
    }
  });
}

void lazy_adam_rows_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor row_step, const Tensor& rows,
                     const Tensor& grad_rows, const Tensor& hist, int64_t target, double beta1, double beta2,
                     double eps, int64_t horizon, bool claim) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D tensor");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes() &&
                  exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                  exp_avg.scalar_type() == param.scalar_type() &&
                  exp_avg_sq.scalar_type() == param.scalar_type(),
              "exp_avg / exp_avg_sq must be contiguous and match param's shape and dtype");
  TORCH_CHECK(row_step.dim() == 1 && row_step.size(0) == param.size(0) && row_step.scalar_type() == at::kLong &&
                  row_step.is_contiguous(),
              "row_step must be a contiguous int64 (rows,) tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(hist.dim() == 2 && hist.size(1) == 4 && hist.size(0) > target && hist.scalar_type() == at::kDouble &&
                  hist.is_contiguous(),
              "hist must be a contiguous float64 (steps+1, 4) tensor covering the target step");
  if (grad_rows.numel() > 0) {
    TORCH_CHECK(!claim, "rows with gradients must be unique (claim=false)");
    TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == rows.numel() && grad_rows.size(1) == param.size(1) &&
                    grad_rows.is_contiguous() && grad_rows.scalar_type() == param.scalar_type(),
                "grad_rows must be a contiguous (len(rows), D) tensor of param's dtype");
  }
  switch (param.scalar_type()) {
    case at::kFloat:
      lazy_adam_kernel<float>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, hist, target, beta1, beta2,
                              eps, horizon, claim);
      break;
    case at::kBFloat16:
      lazy_adam_kernel<c10::BFloat16>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, hist, target, beta1,
                                      beta2, eps, horizon, claim);
      break;
    case at::kHalf:
      lazy_adam_kernel<c10::Half>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, hist, target, beta1,
                                  beta2, eps, horizon, claim);
      break;
    default: TORCH_CHECK(false, "param dtype must be float32, bfloat16 or float16, got ", param.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(memlayers_cpu, m) {
  m.def("bag_forward(Tensor values, Tensor indices, Tensor weights) -> Tensor", &bag_forward);
  m.def(
      "bag_backward(Tensor values, Tensor indices, Tensor weights, Tensor grad_out, bool need_values_grad, "
      "bool need_weights_grad, bool dense) -> (Tensor, Tensor, Tensor)",
      &bag_backward);
  m.def(
      "lazy_adam_rows_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor rows, Tensor grad_rows, Tensor hist, int target, float beta1, float beta2, float eps, int horizon, "
      "bool claim) -> ()",
      &lazy_adam_rows_);
}
