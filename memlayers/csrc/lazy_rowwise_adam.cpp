// memlayers_cpu::lazy_rowwise_adam_rows_: RowwiseAdam's row kernel (memlayers/optim/rowwise_adam.py).

#include "row_math.h"

namespace {

// ---------------------------------------------------------------- exact partial row-wise Adam
// FBGEMM's partial row-wise Adam (full first moment m, ONE second moment per row: the running mean
// over the row of g^2), made exact like lazy_adam_rows_: rows are caught up on read by replaying the
// zero-gradient steps dense row-wise Adam took (m = lerp(m, 0, 1-b1); v_row = b2*v_row;
// p = p*decay - step_size*m / (sqrt(v_row)/bc2sqrt + eps)), closed-form tail after `horizon` steps.
// The denominator is one scalar per row and step, so a replay costs a multiply-add per element.
// `exp_avg_sq` is an fp32 (rows,) tensor whatever the table's dtype.
template <typename scalar_t, typename Rounding>
void lazy_rowwise_adam_kernel(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& row_step,
                              const Tensor& rows, const Tensor& grad_rows, const AdamArgs& a, int64_t target) {
  const int64_t U = rows.numel(), D = param.size(1);
  const bool has_grad = grad_rows.numel() > 0;
  const int64_t upto = has_grad ? target - 1 : target;
  scalar_t* Pp = param.mutable_data_ptr<scalar_t>();
  scalar_t* Mp = exp_avg.mutable_data_ptr<scalar_t>();
  float* VR = exp_avg_sq.mutable_data_ptr<float>();
  int64_t* RS = row_step.mutable_data_ptr<int64_t>();
  const int64_t* R = rows.const_data_ptr<int64_t>();
  const scalar_t* Gp = has_grad ? grad_rows.const_data_ptr<scalar_t>() : nullptr;
  const float omb1 = a.omb1, b2 = a.b2, omb2 = a.omb2, eps = a.eps;
  at::parallel_for(0, U, kGrain, [&](int64_t u0, int64_t u1) {
    std::vector<float> den;  // per replayed step: sqrt(v_row)/bc2sqrt + eps
    std::vector<StepScalars> ks;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = R[u];
      if (u + kStatePrefetch < u1) {
        prefetch_row_l2(Pp + R[u + kStatePrefetch] * D, D);
        prefetch_row_l2(Mp + R[u + kStatePrefetch] * D, D);
      }
      const int64_t last = RS[r];
      TORCH_CHECK(last <= upto, "row ", r, " is ahead of the optimizer (row step ", last, " > ", upto, ")");
      const CatchUp c = plan_catch_up(a, last, upto);
      scalar_t* P = Pp + r * D;
      scalar_t* M = Mp + r * D;
      float vr = VR[r];
      if (has_replay(c)) {
        const RowRnd<Rounding> at_upto = row_rounding<Rounding>(a, r, upto);
        den.clear();
        ks.clear();
        for (int64_t s = c.first; s <= c.last; ++s) {
          const StepScalars k = step_scalars(a, s);
          vr = vr * b2;
          den.push_back(std::sqrt(vr) / k.bc2s + eps);
          ks.push_back(k);
        }
        const int64_t n = static_cast<int64_t>(ks.size());
        for_blocks(D, [&](int64_t col, auto w) {
          float p[kCB], m[kCB];
          load_block(P + col, w, p);
          load_block(M + col, w, m);
          for (int64_t i = 0; i < n; ++i) {
            const float dec = ks[i].dec, ss = ks[i].ss, dn = den[i];
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
              const float md = m[j] + omb1 * (0.f - m[j]);
              p[j] = p[j] * dec + (-ss * md) / dn;
              m[j] = md;
            }
          }
          if (c.tail) {
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
              m[j] *= c.fm;
              p[j] *= c.fd;
            }
          }
          store_block_r(p, w, P + col, at_upto.p);
          store_block_r(m, w, M + col, at_upto.m);
        });
        if (c.tail) vr *= c.fv;
      }
      if (has_grad) {
        const scalar_t* G = Gp + u * D;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < D; ++j) sq += load_f(G, j) * load_f(G, j);
        const StepScalars k = step_scalars(a, target);
        const RowRnd<Rounding> at_step = row_rounding<Rounding>(a, r, target);
        vr = vr * b2 + omb2 * (sq / float(D));
        const float dn = std::sqrt(vr) / k.bc2s + eps;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const float gj = load_f(G, j);
          float mj = load_f(M, j);
          mj = mj + omb1 * (gj - mj);
          store_r(P, j, load_f(P, j) * k.dec + (-k.ss * mj) / dn, at_step.p);
          store_r(M, j, mj, at_step.m);
        }
      }
      VR[r] = vr;
      RS[r] = target;
    }
  });
}

void lazy_rowwise_adam_rows_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor row_step, const Tensor& rows,
                             const Tensor& grad_rows, const Tensor& hist, int64_t target, double beta1, double beta2,
                             double eps, int64_t horizon, int64_t rounding_seed) {
  check_adam_state(param, exp_avg, exp_avg_sq, row_step, hist, target, /*rowwise=*/true);
  check_rows(param, rows, grad_rows);
  const AdamArgs a = make_adam_args(hist, beta1, beta2, eps, horizon, rounding_seed);
  switch (param.scalar_type()) {
    case at::kFloat:
      with_rounding<float>(rounding_seed, [&](auto rnd) {
        lazy_rowwise_adam_kernel<float, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    case at::kBFloat16:
      with_rounding<c10::BFloat16>(rounding_seed, [&](auto rnd) {
        lazy_rowwise_adam_kernel<c10::BFloat16, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    case at::kHalf:
      with_rounding<c10::Half>(rounding_seed, [&](auto rnd) {
        lazy_rowwise_adam_kernel<c10::Half, decltype(rnd)>(param, exp_avg, exp_avg_sq, row_step, rows, grad_rows, a, target);
      });
      break;
    default: TORCH_CHECK(false, "param dtype must be float32, bfloat16 or float16, got ", param.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def(
      "lazy_rowwise_adam_rows_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor rows, Tensor grad_rows, Tensor hist, int target, float beta1, float beta2, float eps, int horizon, "
      "int rounding_seed=-1) -> ()",
      &lazy_rowwise_adam_rows_);
}
