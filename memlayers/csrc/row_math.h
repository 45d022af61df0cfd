// Shared by every memlayers_cpu op family (one .cpp each in this directory, compiled together as one
// extension by memlayers/native.py): the includes, the column-block row arithmetic (loads, rounded
// stores, dot products), the exact lazy AdamW row update with its catch-up replay, and the argument
// checks of the optimizer kernels. The unfused backward, the optimizer steps and the fused
// backward+update all round through these same functions, so their results agree bit for bit.
//
// Only per-operator ATen headers are included: the catch-all <torch/extension.h>
// triples the build time and we need neither pybind nor the full op surface.
//
// Everything here sits in an anonymous namespace, as it did when the ops were one file: each op's
// translation unit gets its own internal-linkage copy that gcc may inline, and contract into FMAs,
// freely, as it could there (checked at the split: every op's outputs bit-identical to the one-file
// build). With external linkage the linker would keep one out-of-line copy per function, compiled in
// whichever unit it picked, and the rounding of an op could change with an unrelated file's edits.
// Each op family registers its own schemas with TORCH_LIBRARY_FRAGMENT(memlayers_cpu, ...).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// Bags/rows are cheap (one row is a few hundred bytes to a few KB); grains of this
// many rows keep the per-task overhead negligible while leaving work to balance.
constexpr int64_t kGrain = 64;

#ifndef MEMLAYERS_PF_LOCALITY
#define MEMLAYERS_PF_LOCALITY 1  // prefetcht2: into L2 (measured faster than t0 and nta for 1 KB rows)
#endif
// Every 64-byte line that [begin, begin + n) touches (a range that does not start on a line
// boundary ends in one more line than n / 64).
template <typename scalar_t>
inline void prefetch_span(const scalar_t* begin, int64_t n) {
  constexpr uintptr_t kLine = 64;
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~(kLine - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(begin + n);
  for (uintptr_t a = first; a < end; a += kLine) __builtin_prefetch(reinterpret_cast<const void*>(a), 0, MEMLAYERS_PF_LOCALITY);
}
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  prefetch_span(row, dim);
}

inline void check_lookup_inputs(const Tensor& values, const Tensor& indices, const Tensor& weights) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous 2-D tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == at::kLong,
              "indices must be a contiguous (B, K) int64 tensor");
  TORCH_CHECK(weights.sizes() == indices.sizes() && weights.is_contiguous() &&
                  weights.scalar_type() == at::kFloat,
              "weights must be a contiguous float32 tensor shaped like indices");
}

// ---------------------------------------------------------------- row arithmetic
// fp32 view of a stored value (exact widening).
inline float load_f(const float* p, int64_t j) { return p[j]; }
inline float load_f(const c10::BFloat16* p, int64_t j) {
  // bf16 -> fp32 is a 16-bit shift; spelled out so the compiler vectorises it.
  const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float load_f(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }

// Every kernel below that reads or writes a value row's numbers goes through these few inline
// functions, on column blocks of kCB floats held in stack arrays the compiler vectorises (the
// earlier per-row heap buffers ran 3x slower than torch's fused AdamW). So the unfused backward,
// the unfused optimizer step and the fused backward+update round identically (tests compare
// them bit for bit).
constexpr int64_t kCB = 64;

// fp32 -> storage dtype. bf16: round to nearest even, NaN -> 0x7FC0, exactly c10::BFloat16's rule,
// spelled out with integer ops so the loop vectorises.
inline void store_f(float* p, int64_t j, float x) { p[j] = x; }
inline void store_f(c10::BFloat16* p, int64_t j, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  reinterpret_cast<uint16_t*>(p)[j] = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}
inline void store_f(c10::Half* p, int64_t j, float x) { p[j] = static_cast<c10::Half>(x); }

// Stochastic rounding of the optimizer's bf16 stores (RowSparseAdam(rounding="stochastic")): an
// update smaller than half a bf16 step (2^-9 relative) is otherwise lost every time, e.g.
// v = b2*v + (1-b2)*g^2 only moves when g^2 differs from v by more than ~4x, so v ratchets upwards.
// Rounding up with probability equal to the dropped fraction keeps every update in expectation.
// The 16 dither bits are a hash of the fp32 value's bits and a per-(row, step, tensor) key, not of
// the column: so column shards of a table round exactly like the whole table, resumed runs like
// uninterrupted ones, and every kernel path (fused, unfused, catch-up) like the others.
// memlayers/optim/stochastic_rounding.py (stochastic_bf16) is the same function in torch ops.
// The rounding is a compile-time type, so the round-to-nearest loops stay exactly as they were
// (a runtime flag in the element loop cost 2x on bf16 tables: measured).
struct Nearest {};
struct Stochastic {
  uint32_t key;
};
inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash (Wellons): full avalanche, vectorises
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
// which: 0 = param, 1 = exp_avg, 2 = exp_avg_sq.
inline Stochastic stochastic_key(int64_t seed, int64_t row, int64_t step, uint32_t which) {
  uint32_t k = mix32(static_cast<uint32_t>(row) ^ mix32(static_cast<uint32_t>(row >> 32) + 0x9E3779B9u * (which + 1u)));
  k = mix32(k ^ static_cast<uint32_t>(step));
  return Stochastic{mix32(k ^ static_cast<uint32_t>(seed))};
}
template <typename Rounding>
inline void store_r(float* p, int64_t j, float x, const Rounding&) { p[j] = x; }
template <typename Rounding>
inline void store_r(c10::Half* p, int64_t j, float x, const Rounding&) { store_f(p, j, x); }
inline void store_r(c10::BFloat16* p, int64_t j, float x, const Nearest&) { store_f(p, j, x); }
inline void store_r(c10::BFloat16* p, int64_t j, float x, const Stochastic& r) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + (mix32(u ^ r.key) & 0xFFFFu)) >> 16;
  reinterpret_cast<uint16_t*>(p)[j] = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

// Calls fn(col, w) for the column blocks of a D-wide row: w is a compile-time kCB for the full
// blocks (fixed trip counts vectorise without remainder loops) and a runtime width for the tail.
template <typename Fn>
inline void for_blocks(int64_t D, Fn&& fn) {
  int64_t col = 0;
  for (; col + kCB <= D; col += kCB) fn(col, std::integral_constant<int64_t, kCB>{});
  if (col < D) fn(col, D - col);
}

template <typename scalar_t>
inline void load_block(const scalar_t* __restrict__ src, int64_t w, float* __restrict__ dst) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) dst[j] = load_f(src, j);
}
template <typename scalar_t, typename Rounding>
inline void store_block_r(const float* __restrict__ src, int64_t w, scalar_t* __restrict__ dst, const Rounding& r) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) store_r(dst, j, src[j], r);
}
template <typename scalar_t>
inline void store_block(const float* __restrict__ src, int64_t w, scalar_t* __restrict__ dst) {
  store_block_r(src, w, dst, Nearest{});
}
// x -> storage dtype -> fp32: what a value written to the table and read back holds.
template <typename scalar_t, typename Rounding = Nearest>
inline void round_block(float* __restrict__ x, int64_t w, const Rounding& r = Rounding{}) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    scalar_t tmp[kCB];
    store_block_r<scalar_t>(x, w, tmp, r);
    load_block<scalar_t>(tmp, w, x);
  }
}
inline float dot_block(const float* __restrict__ a, const float* __restrict__ b, int64_t w) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < w; ++j) dot += a[j] * b[j];
  return dot;
}

// Dense AdamW (torch.optim.AdamW, single-tensor path) for one row, lazily. `hist` holds per step s
// (doubles): step_size = lr_s/bc1_s, bc2sqrt_s, decay_s = 1 - lr_s*wd, C_s = sum_{j<=s} log(decay_j).
// Catching a row up from step `last` to `upto` replays the steps dense AdamW took with a zero
// gradient for it:  m = lerp(m, 0, 1-b1);  v = b2*v;  p = p*decay_s - step_size_s*m / (sqrt(v)/bc2sqrt_s + eps).
// After `horizon` replayed steps the remaining updates are below float resolution (the Python side
// derives the horizon from the betas; < 0 = replay every step) and the rest of the gap is applied in
// closed form (m *= b1^n, v *= b2^n, p *= exp(C_upto - C_s)).
struct AdamArgs {
  const double* H;  // (T+1, 4)
  double beta1, beta2;
  float b1, b2, omb1, omb2, eps;
  int64_t horizon;
  int64_t rounding_seed;  // < 0: stores round to nearest even; else stochastically (bf16)
};
// The roundings of one row's (p, m, v) stored as of optimizer step `step`.
template <typename Rounding>
struct RowRnd {
  Rounding p, m, v;
};
template <typename Rounding>
inline RowRnd<Rounding> row_rounding(const AdamArgs& a, int64_t row, int64_t step) {
  if constexpr (std::is_same_v<Rounding, Stochastic>) {
    return RowRnd<Rounding>{stochastic_key(a.rounding_seed, row, step, 0), stochastic_key(a.rounding_seed, row, step, 1),
                     stochastic_key(a.rounding_seed, row, step, 2)};
  } else {
    return RowRnd<Rounding>{};
  }
}
// Calls fn(Rounding{}) with the rounding type a kernel of `scalar_t` runs with: stochastic only for bf16
// tables with a seed (fp32 stores are exact; fp16 keeps round-to-nearest).
template <typename scalar_t, typename Fn>
inline void with_rounding(int64_t seed, Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (seed >= 0) return fn(Stochastic{0u});
  }
  fn(Nearest{});
}

struct CatchUp {
  int64_t first, last;  // replay steps [first, last]
  bool tail;
  float fm, fv, fd;
};

inline CatchUp plan_catch_up(const AdamArgs& a, int64_t from, int64_t upto) {
  const int64_t gap = upto - from;
  const int64_t n_replay = a.horizon < 0 ? gap : std::min(gap, a.horizon);
  CatchUp c{from + 1, from + n_replay, gap > n_replay, 1.f, 1.f, 1.f};
  if (c.tail) {
    const int64_t rest = gap - n_replay;
    c.fm = std::pow(a.beta1, double(rest));
    c.fv = std::pow(a.beta2, double(rest));
    c.fd = std::exp(a.H[4 * upto + 3] - a.H[4 * (from + n_replay) + 3]);
  }
  return c;
}

// One element's arithmetic, shared by every loop below (identical expressions -> identical rounding).
struct StepScalars {
  float ss, bc2s, dec;  // lr_s/bc1_s, sqrt(bc2_s), 1 - lr_s*wd
};
inline StepScalars step_scalars(const AdamArgs& a, int64_t s) {
  const double* h = a.H + 4 * s;
  return StepScalars{float(h[0]), float(h[1]), float(h[2])};
}
inline void zero_grad_elem(float& p, float& m, float& v, const StepScalars& k, float omb1, float b2, float eps) {
  const float md = m + omb1 * (0.f - m);
  const float vd = v * b2;
  p = p * k.dec + (-k.ss * md) / (std::sqrt(vd) / k.bc2s + eps);
  m = md;
  v = vd;
}
inline void grad_elem(float& p, float& m, float& v, float g, const StepScalars& k, float omb1, float b2,
                      float omb2, float eps) {
  const float md = m + omb1 * (g - m);
  const float vd = v * b2 + omb2 * g * g;
  p = p * k.dec + (-k.ss * md) / (std::sqrt(vd) / k.bc2s + eps);
  m = md;
  v = vd;
}

// Replay the zero-gradient steps of `c` on w elements held in fp32 (stack) arrays: one vectorised
// pass per replayed step (the step scalars are uniform across the pass).
inline void catch_up_block(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, int64_t w,
                           const AdamArgs& a, const CatchUp& c) {
  const float omb1 = a.omb1, b2 = a.b2, eps = a.eps;
  for (int64_t s = c.first; s <= c.last; ++s) {
    const StepScalars k = step_scalars(a, s);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) zero_grad_elem(p[j], m[j], v[j], k, omb1, b2, eps);
  }
  if (c.tail) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      m[j] *= c.fm;
      v[j] *= c.fv;
      p[j] *= c.fd;
    }
  }
}

inline bool has_replay(const CatchUp& c) { return c.first <= c.last || c.tail; }

// Rows a few steps behind (the common case: with uniform reads most rows are 1-4 steps behind at
// their next read) and rows taking a step are done in ONE vectorised pass: each element of p, m, v
// loaded once, its N replayed zero-gradient steps and the gradient step applied in registers, stored
// once. The per-step scalars come in as plain floats and the loop sits in its own non-inlined
// function: written inline with the StepScalars structs, gcc left such loops scalar (measured 2.3x
// slower than the block loop). The column-block loop in adam_row (three loops per 64 columns through
// stack arrays) took 1.5-1.7x this pass's time for a catch-up 1-4 steps behind (1M x 256 fp32 table,
// 412k sorted rows: 138/149/175 ms vs 80/82/118 ms), at equal memory traffic.
// The arithmetic restates zero_grad_elem / grad_elem expression for expression, on purpose: calling
// them here (references, a StepScalars per step) left this loop scalar again (measured 191 vs 50 ms
// for a catch-up one step behind). fp32 results are bit-identical to the block loop's (tested: one
// catch-up of 12 steps vs 2 x 6 vs 12 x 1; a mutant of this copy's rounding fails it).
constexpr int kMaxPassReplay = 8;
struct PassScalars {
  float ss[kMaxPassReplay + 1], bc2s[kMaxPassReplay + 1], dec[kMaxPassReplay + 1];  // [N] = the gradient step
  float omb1, b2, omb2, eps;
};
template <int N, bool kGrad, typename scalar_t, typename Rounding>
__attribute__((noinline)) void adam_row_pass(scalar_t* __restrict__ P, scalar_t* __restrict__ M, scalar_t* __restrict__ V,
                                             const scalar_t* __restrict__ G, int64_t D, const PassScalars s,
                                             const RowRnd<Rounding> rr) {
  static_assert(N >= 0 && N <= kMaxPassReplay, "replay count out of range");
  const float omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2, eps = s.eps;
  const float ssg = s.ss[N], bcg = s.bc2s[N], deg = s.dec[N];
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    float p = load_f(P, j), m = load_f(M, j), v = load_f(V, j);
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      const float md = m + omb1 * (0.f - m);
      const float vd = v * b2;
      p = p * s.dec[i] + (-s.ss[i] * md) / (std::sqrt(vd) / s.bc2s[i] + eps);
      m = md;
      v = vd;
    }
    if constexpr (kGrad) {
      const float g = load_f(G, j);
      const float md = m + omb1 * (g - m);
      const float vd = v * b2 + omb2 * g * g;
      p = p * deg + (-ssg * md) / (std::sqrt(vd) / bcg + eps);
      m = md;
      v = vd;
    }
    store_r(P, j, p, rr.p);
    store_r(M, j, m, rr.m);
    store_r(V, j, v, rr.v);
  }
}
// Replays [first, first + n) (n <= kMaxPassReplay, no closed-form tail) then, with kGrad, the step of `k`.
template <bool kGrad, typename scalar_t, typename Rounding>
inline void adam_row_one_pass(scalar_t* P, scalar_t* M, scalar_t* V, const scalar_t* G, int64_t D, const AdamArgs& a,
                              int64_t first, int64_t n, const StepScalars& k, const RowRnd<Rounding>& rr) {
  PassScalars s{};
  for (int64_t i = 0; i < n; ++i) {
    const StepScalars ki = step_scalars(a, first + i);
    s.ss[i] = ki.ss, s.bc2s[i] = ki.bc2s, s.dec[i] = ki.dec;
  }
  s.ss[n] = k.ss, s.bc2s[n] = k.bc2s, s.dec[n] = k.dec;
  s.omb1 = a.omb1, s.b2 = a.b2, s.omb2 = a.omb2, s.eps = a.eps;
  switch (n) {
    case 0: return adam_row_pass<0, kGrad>(P, M, V, G, D, s, rr);
    case 1: return adam_row_pass<1, kGrad>(P, M, V, G, D, s, rr);
    case 2: return adam_row_pass<2, kGrad>(P, M, V, G, D, s, rr);
    case 3: return adam_row_pass<3, kGrad>(P, M, V, G, D, s, rr);
    case 4: return adam_row_pass<4, kGrad>(P, M, V, G, D, s, rr);
    case 5: return adam_row_pass<5, kGrad>(P, M, V, G, D, s, rr);
    case 6: return adam_row_pass<6, kGrad>(P, M, V, G, D, s, rr);
    case 7: return adam_row_pass<7, kGrad>(P, M, V, G, D, s, rr);
    default: return adam_row_pass<8, kGrad>(P, M, V, G, D, s, rr);
  }
}
inline bool fits_one_pass(const CatchUp& c) { return !c.tail && c.last - c.first + 1 <= kMaxPassReplay; }

// Catch a D-wide row's (p, m, v) up per `c`, then (with G) take step `target`. Up to kMaxPassReplay
// replayed steps this is one pass (adam_row_pass); longer gaps and the closed-form tail go through
// fp32 stack blocks (one rounding to the storage dtype per catch-up, as the state is stored once).
template <typename scalar_t, typename Rounding>
inline void adam_row(scalar_t* __restrict__ P, scalar_t* __restrict__ M, scalar_t* __restrict__ V,
                     const scalar_t* __restrict__ G, int64_t D, const AdamArgs& a, const CatchUp& c,
                     int64_t target, int64_t row) {
  const StepScalars k = step_scalars(a, target);
  const RowRnd<Rounding> rr = row_rounding<Rounding>(a, row, target);
  const float omb1 = a.omb1, b2 = a.b2, omb2 = a.omb2, eps = a.eps;
  if (!has_replay(c) && G == nullptr) return;
  if (fits_one_pass(c)) {
    const int64_t n = has_replay(c) ? c.last - c.first + 1 : 0;
    if (G != nullptr) return adam_row_one_pass<true>(P, M, V, G, D, a, c.first, n, k, rr);
    return adam_row_one_pass<false>(P, M, V, G, D, a, c.first, n, k, rr);
  }
  for_blocks(D, [&](int64_t col, auto w) {
    float p[kCB], m[kCB], v[kCB];
    load_block(P + col, w, p);
    load_block(M + col, w, m);
    load_block(V + col, w, v);
    catch_up_block(p, m, v, w, a, c);
    if (G != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) grad_elem(p[j], m[j], v[j], load_f(G + col, j), k, omb1, b2, omb2, eps);
    }
    store_block_r(p, w, P + col, rr.p);
    store_block_r(m, w, M + col, rr.m);
    store_block_r(v, w, V + col, rr.v);
  });
}

// The optimizer kernels' rows (value, m, v: read, updated in registers, stored) are prefetched into
// L2 with an explicit instruction, kStatePrefetch unique rows ahead. gcc silently dropped
// __builtin_prefetch from the fused backward+update (objdump of the built .so: not one prefetch
// instruction in it), so that loop ran without any. Measured (1M x 256 fp32 table, the 412k sorted
// unique rows of 4096 x 128 uniform reads): fused backward+update 148 -> 117 ms, catch-up one step
// behind 79 -> 68 ms; prefetcht0 (into L1) gained nothing in the fused kernel (its gradient rows
// need L1), 2 / 8 / 16 rows ahead measured alike. The gathers keep prefetch_row (__builtin_prefetch,
// which gcc does emit there): the explicit instruction in the forward measured no better (19.0-21.4
// vs 15.3-20.3 ms, three runs each).
constexpr int64_t kStatePrefetch = 8;
template <typename scalar_t>
inline void prefetch_row_l2(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht2 %0" : : "m"(p[off]));
#else
    __builtin_prefetch(p + off, 0, 1);
#endif
  }
}
template <typename scalar_t>
inline void prefetch_state_row(const scalar_t* P, const scalar_t* M, const scalar_t* V, int64_t r, int64_t D) {
  prefetch_row_l2(P + r * D, D);
  prefetch_row_l2(M + r * D, D);
  prefetch_row_l2(V + r * D, D);
}

// ---------------------------------------------------------------- optimizer kernel arguments
// rowwise: exp_avg_sq is one fp32 second moment per row (partial row-wise Adam), else a full table.
inline void check_adam_state(const Tensor& param, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_step,
                      const Tensor& hist, int64_t target, bool rowwise = false) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D tensor");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg.is_contiguous() &&
                  exp_avg.scalar_type() == param.scalar_type(),
              "exp_avg must be contiguous and match param's shape and dtype");
  if (rowwise) {
    TORCH_CHECK(exp_avg_sq.dim() == 1 && exp_avg_sq.size(0) == param.size(0) && exp_avg_sq.is_contiguous() &&
                    exp_avg_sq.scalar_type() == at::kFloat,
                "exp_avg_sq must be a contiguous float32 (rows,) tensor");
  } else {
    TORCH_CHECK(exp_avg_sq.sizes() == param.sizes() && exp_avg_sq.is_contiguous() &&
                    exp_avg_sq.scalar_type() == param.scalar_type(),
                "exp_avg_sq must be contiguous and match param's shape and dtype");
  }
  TORCH_CHECK(row_step.dim() == 1 && row_step.size(0) == param.size(0) && row_step.scalar_type() == at::kLong &&
                  row_step.is_contiguous(),
              "row_step must be a contiguous int64 (rows,) tensor");
  TORCH_CHECK(hist.dim() == 2 && hist.size(1) == 4 && hist.size(0) > target && hist.scalar_type() == at::kDouble &&
                  hist.is_contiguous(),
              "hist must be a contiguous float64 (steps+1, 4) tensor covering the target step");
}

// rows: 1-D int64 row ids; grad_rows: empty, or one gradient row per id in param's dtype.
inline void check_rows(const Tensor& param, const Tensor& rows, const Tensor& grad_rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows must be a contiguous 1-D int64 tensor");
  if (grad_rows.numel() > 0) {
    TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == rows.numel() && grad_rows.size(1) == param.size(1) &&
                    grad_rows.is_contiguous() && grad_rows.scalar_type() == param.scalar_type(),
                "grad_rows must be a contiguous (len(rows), D) tensor of param's dtype");
  }
}

inline AdamArgs make_adam_args(const Tensor& hist, double beta1, double beta2, double eps, int64_t horizon,
                        int64_t rounding_seed) {
  return AdamArgs{hist.const_data_ptr<double>(), beta1, beta2, float(beta1), float(beta2),
                  float(1.0 - beta1), float(1.0 - beta2), float(eps), horizon, rounding_seed};
}

}  // namespace
