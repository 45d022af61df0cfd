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

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(p + off, 0, 0);
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
// out[b] = sum_k w[b,k] * values[idx[b,k]], accumulated in fp32 in a thread-local row.
template <typename scalar_t>
void bag_forward_kernel(const Tensor& values, const Tensor& indices, const Tensor& weights, Tensor& out) {
  const int64_t B = indices.size(0), K = indices.size(1), D = values.size(1);
  const scalar_t* V = values.const_data_ptr<scalar_t>();
  const int64_t* I = indices.const_data_ptr<int64_t>();
  const float* W = weights.const_data_ptr<float>();
  float* O = out.mutable_data_ptr<float>();
  at::parallel_for(0, B, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* __restrict__ acc = O + b * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      const int64_t* idx = I + b * K;
      const float* w = W + b * K;
      for (int64_t k = 0; k < K; ++k) {
        if (k + kPrefetchAhead < K) prefetch_row(V + idx[k + kPrefetchAhead] * D, D);
        const scalar_t* __restrict__ row = V + idx[k] * D;
        const float wk = w[k];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += wk * to_f(row[d]);
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

// ---------------------------------------------------------------- row-sparse Adam
// Adam (decoupled weight decay) applied in place to the listed rows only. `rows` must
// be unique (a coalesced gradient), so rows can be updated in parallel without races.
// The math mirrors torch.optim.AdamW's single-tensor path:
//   p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps),  step_size = lr / bc1
template <typename scalar_t>
void row_sparse_adam_kernel(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& rows,
                            const Tensor& grad_rows, double lr, double beta1, double beta2, double eps,
                            double weight_decay, double step_size, double bc2_sqrt) {
  const int64_t U = rows.numel(), D = param.size(1);
  scalar_t* Pp = param.mutable_data_ptr<scalar_t>();
  scalar_t* Mp = exp_avg.mutable_data_ptr<scalar_t>();
  scalar_t* Vp = exp_avg_sq.mutable_data_ptr<scalar_t>();
  const int64_t* R = rows.const_data_ptr<int64_t>();
  const scalar_t* Gp = grad_rows.const_data_ptr<scalar_t>();
  const float b1 = beta1, b2 = beta2, one_m_b1 = 1.0 - beta1, one_m_b2 = 1.0 - beta2;
  const float decay = 1.0 - lr * weight_decay, ss = step_size, inv_bc2 = 1.0 / bc2_sqrt, fe = eps;
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = R[u];
      scalar_t* __restrict__ p = Pp + r * D;
      scalar_t* __restrict__ m = Mp + r * D;
      scalar_t* __restrict__ v = Vp + r * D;
      const scalar_t* __restrict__ g = Gp + u * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float gd = to_f(g[d]);
        const float md = b1 * to_f(m[d]) + one_m_b1 * gd;
        const float vd = b2 * to_f(v[d]) + one_m_b2 * gd * gd;
        const float pd = to_f(p[d]) * decay - ss * md / (std::sqrt(vd) * inv_bc2 + fe);
        m[d] = from_f<scalar_t>(md);
        v[d] = from_f<scalar_t>(vd);
        p[d] = from_f<scalar_t>(pd);
      }
    }
  });
}

void row_sparse_adam_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, const Tensor& rows,
                      const Tensor& grad_rows, double lr, double beta1, double beta2, double eps,
                      double weight_decay, double step_size, double bias_correction2_sqrt) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D tensor");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes() &&
                  exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                  exp_avg.scalar_type() == param.scalar_type() &&
                  exp_avg_sq.scalar_type() == param.scalar_type(),
              "exp_avg / exp_avg_sq must be contiguous and match param's shape and dtype");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == rows.numel() && grad_rows.size(1) == param.size(1) &&
                  grad_rows.is_contiguous() && grad_rows.scalar_type() == param.scalar_type(),
              "grad_rows must be a contiguous (len(rows), D) tensor of param's dtype");
  switch (param.scalar_type()) {
    case at::kFloat:
      row_sparse_adam_kernel<float>(param, exp_avg, exp_avg_sq, rows, grad_rows, lr, beta1, beta2, eps,
                                    weight_decay, step_size, bias_correction2_sqrt);
      break;
    case at::kBFloat16:
      row_sparse_adam_kernel<c10::BFloat16>(param, exp_avg, exp_avg_sq, rows, grad_rows, lr, beta1, beta2,
                                            eps, weight_decay, step_size, bias_correction2_sqrt);
      break;
    case at::kHalf:
      row_sparse_adam_kernel<c10::Half>(param, exp_avg, exp_avg_sq, rows, grad_rows, lr, beta1, beta2, eps,
                                        weight_decay, step_size, bias_correction2_sqrt);
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
      "row_sparse_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, "
      "Tensor grad_rows, float lr, float beta1, float beta2, float eps, float weight_decay, float step_size, "
      "float bias_correction2_sqrt) -> ()",
      &row_sparse_adam_);
}
