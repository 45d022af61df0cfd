// memlayers_cpu::lazy_adam_rows_: RowSparseAdam's row kernel (memlayers/optim/row_sparse_adam.py).

#include "row_math.h"

namespace {

// ---------------------------------------------------------------- exact row-sparse Adam
// Dense AdamW applied row by row, lazily: a row is brought up to date only when it is read or gets a
// gradient. `row_step[r]` is the optimizer step through which row r is current. With `grad_rows`
// non-empty the rows are caught up to `target - 1` and then take step `target` with their gradient;
// otherwise they are caught up to `target` (rows already current are left as they are). Rows must be
// unique (the Python side passes them sorted: see RowSparseAdam.catch_up_rows).
template <typename scalar_t, typename Rounding>
void lazy_adam_kernel(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& row_step, const Tensor& rows,
                      const Tensor& grad_rows, const AdamArgs& a, int64_t target) {
  const int64_t U = rows.numel(), D = param.size(1);
  const bool has_grad = grad_rows.numel() > 0;
  const int64_t upto = has_grad ? target - 1 : target;
  scalar_t* Pp = param.mutable_data_ptr<scalar_t>();
  scalar_t* Mp = exp_avg.mutable_data_ptr<scalar_t>();
  scalar_t* Vp = exp_avg_sq.mutable_data_ptr<scalar_t>();
  int64_t* RS = row_step.mutable_data_ptr<int64_t>();
  const int64_t* R = rows.const_data_ptr<int64_t>();
  const scalar_t* Gp = has_grad ? grad_rows.const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = R[u];
      if (u + kStatePrefetch < u1) prefetch_state_row(Pp, Mp, Vp, R[u + kStatePrefetch], D);
      const int64_t last = RS[r];
      TORCH_CHECK(last <= upto, "row ", r, " is ahead of the optimizer (row step ", last, " > ", upto, ")");
      adam_row<scalar_t, Rounding>(Pp + r * D, Mp + r * D, Vp + r * D, has_grad ? Gp + u * D : nullptr, D, a,
                         plan_catch_up(a, last, upto), target, r);
      RS[r] = target;
    }
  });
}

void lazy_adam_rows_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor row_step, const Tensor& rows,
                     const Tensor& grad_rows, const Tensor& hist, int64_t target, double beta1, double beta2,
                     double eps, int64_t horizon, int64_t rounding_seed) {
  check_adam_state(param, exp_avg, exp_avg_sq, row_step, hist, target);
  check_rows(param, rows, grad_rows);
  const AdamArgs a = make_adam_args(hist, beta1, beta2, eps, horizon, rounding_seed);
  switch (param.scalar_type()) {
    case at::kFloat:
      with_rounding<float>(rounding_seed, [&](auto rnd) {
        lazy_adam_kernel<float, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    case at::kBFloat16:
      with_rounding<c10::BFloat16>(rounding_seed, [&](auto rnd) {
        lazy_adam_kernel<c10::BFloat16, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    case at::kHalf:
      with_rounding<c10::Half>(rounding_seed, [&](auto rnd) {
        lazy_adam_kernel<c10::Half, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    default: TORCH_CHECK(false, "param dtype must be float32, bfloat16 or float16, got ", param.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def(
      "lazy_adam_rows_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor rows, Tensor grad_rows, Tensor hist, int target, float beta1, float beta2, float eps, int horizon, "
      "int rounding_seed=-1) -> ()",
      &lazy_adam_rows_);
}
