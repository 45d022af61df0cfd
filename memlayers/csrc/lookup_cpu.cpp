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
#include <limits>
#include <tuple>
#include <type_traits>
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
// instead of a load+store of the accumulator per row); each block prefetches its own columns of
// the rows ahead (see bag_block).
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

// One column block of one bag. Row k's turn also prefetches columns [col, col + pf_cols) of the
// row kForwardPrefetch reads later in the flat sequence (`ahead[k]`, while k < n_ahead): each block
// fetches its own columns just before it needs them. Prefetching whole rows in the first block
// (and re-reading the later blocks from L2) measured 0.70-0.75x embedding_bag on a Zen 3 EPYC (512 KB
// L2 per core: 16 rows x 1 KB of prefetches in flight per core); per block, 0.93-1.07x on the same
// box, where both run at its read bandwidth. pf_cols runs to the row's end in the last block, so
// the narrow tail is prefetched too.
template <typename scalar_t, int64_t CB>
inline void bag_block(const scalar_t* __restrict__ V, const int64_t* __restrict__ idx, const float* __restrict__ w,
                      int64_t K, int64_t D, int64_t col, float* __restrict__ out, const int64_t* ahead,
                      int64_t n_ahead, int64_t pf_cols) {
  float acc[CB];
  for (int64_t j = 0; j < CB; ++j) acc[j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    if (k < n_ahead) prefetch_span(V + ahead[k] * D + col, pf_cols);
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
        bag_block<scalar_t, kColBlock>(V, idx, w, K, D, col, o + col, ahead, n_ahead,
                                       col + kColBlock == full ? D - col : kColBlock);
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

// ---------------------------------------------------------------- row arithmetic
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
// memlayers/row_sparse_adam.py (stochastic_bf16) is the same function in torch ops.
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

RowSegments segment_rows(const Tensor& indices) {
  RowSegments s;
  Tensor flat = indices.reshape({-1});
  std::tie(s.sorted_rows, s.perm) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t M = flat.numel();
  const int64_t* S = s.sorted_rows.const_data_ptr<int64_t>();
  s.seg_start.reserve(M + 1);
  for (int64_t e = 0; e < M; ++e) {
    if (e == 0 || S[e] != S[e - 1]) s.seg_start.push_back(e);
  }
  s.seg_start.push_back(M);
  return s;
}

// The value gradient (plus grad_weights when needed) in one pass over the UNIQUE rows: every value
// row is read once, its dot products with the bag gradients give grad_weights, and its summed
// gradient either goes to `grad_rows` (kFuseAdam false: row u, or row r when dense) or, with
// kFuseAdam, straight into the AdamW step of that row (FBGEMM's fused backward+update: no gradient
// row is written or read back). Fused, a row not yet caught up to step target-1 is first caught
// up as a read would (and rounded to the storage dtype as that write would), the gradient is rounded
// to the table's dtype as the unfused gradient tensor is, and the row's state is stored once.
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
template <typename scalar_t, bool kFuseAdam, typename Rounding = Nearest>
void rows_backward_kernel(const Tensor& values, const Tensor& weights, const Tensor& grad_out, const int64_t K,
                          const RowSegments& seg, bool need_gw, bool dense, Tensor& grad_rows, Tensor& gw,
                          Tensor* exp_avg, Tensor* exp_avg_sq, Tensor* row_step, const AdamArgs* adam,
                          int64_t target) {
  const int64_t D = values.size(1);
  const int64_t U = seg.unique();
  const int64_t* SS = seg.seg_start.data();
  scalar_t* Pp = const_cast<scalar_t*>(values.const_data_ptr<scalar_t>());
  const float* W = weights.const_data_ptr<float>();
  const float* G = grad_out.const_data_ptr<float>();
  const int64_t* S = seg.sorted_rows.const_data_ptr<int64_t>();
  const int64_t* Pm = seg.perm.const_data_ptr<int64_t>();
  scalar_t* GR = kFuseAdam ? nullptr : grad_rows.mutable_data_ptr<scalar_t>();
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
        if constexpr (kFuseAdam) {
          round_block<scalar_t>(acc, w);
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
  if (st == at::kFloat)
    rows_backward_kernel<float, false>(values, weights, grad_out, K, seg, need_weights_grad, dense, grad_rows, gw,
                                       none, none, none, nullptr, 0);
  else if (st == at::kBFloat16)
    rows_backward_kernel<c10::BFloat16, false>(values, weights, grad_out, K, seg, need_weights_grad, dense,
                                               grad_rows, gw, none, none, none, nullptr, 0);
  else
    rows_backward_kernel<c10::Half, false>(values, weights, grad_out, K, seg, need_weights_grad, dense, grad_rows,
                                           gw, none, none, none, nullptr, 0);
  return {rows, grad_rows, gw};
}

// rowwise: exp_avg_sq is one fp32 second moment per row (partial row-wise Adam), else a full table.
void check_adam_state(const Tensor& param, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_step,
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
void check_rows(const Tensor& param, const Tensor& rows, const Tensor& grad_rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows must be a contiguous 1-D int64 tensor");
  if (grad_rows.numel() > 0) {
    TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == rows.numel() && grad_rows.size(1) == param.size(1) &&
                    grad_rows.is_contiguous() && grad_rows.scalar_type() == param.scalar_type(),
                "grad_rows must be a contiguous (len(rows), D) tensor of param's dtype");
  }
}

AdamArgs make_adam_args(const Tensor& hist, double beta1, double beta2, double eps, int64_t horizon,
                        int64_t rounding_seed) {
  return AdamArgs{hist.const_data_ptr<double>(), beta1, beta2, float(beta1), float(beta2),
                  float(1.0 - beta1), float(1.0 - beta2), float(eps), horizon, rounding_seed};
}

// Fused backward + AdamW step of the value table (row-sparse, exact: see rows_backward_kernel and
// lazy_adam_rows_). Returns grad_weights (B, K) float32 (empty when not needed).
Tensor bag_backward_adam_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor row_step, const Tensor& indices,
                          const Tensor& weights, const Tensor& grad_out, bool need_weights_grad, const Tensor& hist,
                          int64_t target, double beta1, double beta2, double eps, int64_t horizon,
                          int64_t rounding_seed) {
  check_backward_inputs(param, indices, weights, grad_out);
  check_adam_state(param, exp_avg, exp_avg_sq, row_step, hist, target);
  TORCH_CHECK(target >= 1, "target step must be >= 1");
  const int64_t B = indices.size(0), K = indices.size(1);
  Tensor gw = need_weights_grad ? at::empty({B, K}, weights.options()) : at::empty({0}, weights.options());
  RowSegments seg = segment_rows(indices);
  const AdamArgs a = make_adam_args(hist, beta1, beta2, eps, horizon, rounding_seed);
  Tensor none;
  switch (param.scalar_type()) {
    case at::kFloat:
      rows_backward_kernel<float, true>(param, weights, grad_out, K, seg, need_weights_grad, false, none, gw,
                                        &exp_avg, &exp_avg_sq, &row_step, &a, target);
      break;
    case at::kBFloat16:
      with_rounding<c10::BFloat16>(rounding_seed, [&](auto rnd) {
        rows_backward_kernel<c10::BFloat16, true, decltype(rnd)>(param, weights, grad_out, K, seg, need_weights_grad,
                                                                 false, none, gw, &exp_avg, &exp_avg_sq, &row_step,
                                                                 &a, target);
      });
      break;
    default:
      rows_backward_kernel<c10::Half, true>(param, weights, grad_out, K, seg, need_weights_grad, false, none, gw,
                                            &exp_avg, &exp_avg_sq, &row_step, &a, target);
  }
  return gw;
}

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

TORCH_LIBRARY(memlayers_cpu, m) {
  m.def("unique_rows(Tensor indices, int n_rows) -> Tensor", &unique_rows);
  m.def("bag_forward(Tensor values, Tensor indices, Tensor weights) -> Tensor", &bag_forward);
  m.def(
      "bag_backward(Tensor values, Tensor indices, Tensor weights, Tensor grad_out, bool need_values_grad, "
      "bool need_weights_grad, bool dense) -> (Tensor, Tensor, Tensor)",
      &bag_backward);
  m.def(
      "lazy_adam_rows_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor rows, Tensor grad_rows, Tensor hist, int target, float beta1, float beta2, float eps, int horizon, "
      "int rounding_seed=-1) -> ()",
      &lazy_adam_rows_);
  m.def(
      "bag_backward_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor indices, Tensor weights, Tensor grad_out, bool need_weights_grad, Tensor hist, int target, "
      "float beta1, float beta2, float eps, int horizon, int rounding_seed=-1) -> Tensor",
      &bag_backward_adam_);
  m.def(
      "lazy_rowwise_adam_rows_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
      "Tensor rows, Tensor grad_rows, Tensor hist, int target, float beta1, float beta2, float eps, int horizon, "
      "int rounding_seed=-1) -> ()",
      &lazy_rowwise_adam_rows_);
  m.def("product_topk(Tensor scores, int K) -> (Tensor, Tensor)", &product_topk);
  m.def("selected_scores_backward(Tensor grad, Tensor q, Tensor keys, Tensor top_i) -> (Tensor, Tensor)",
        &selected_scores_backward);
}
