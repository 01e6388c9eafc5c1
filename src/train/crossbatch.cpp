#include "train/crossbatch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "train/backward_ops.h"

namespace ll::train {

int CrossBatch::contexts(int b) const {
  int n = range + 1;
  if (stepping && k > 1) {
    const int step = (range + 1 + (k - 2)) / (k - 1);  // ceil((r+1)/(k-1))
    n = std::min(n, (b % k) * step + 1);
  }
  if (!negatives) n = std::min(n, b % k + 1);
  return std::min(n, b + 1);
}

namespace {

std::vector<size_t> probs_offsets(const CrossBatch& cb, int B, int S, int H) {
  std::vector<size_t> off(size_t(B) * H + 1, 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) off[size_t(b) * H + h + 1] = off[size_t(b) * H + h] + size_t(S) * cb.contexts(b) * S;
  return off;
}

bool worth_threads(int B, int S, int H, int D) { return int64_t(B) * H * S * S * D > (1 << 16); }

}  // namespace

size_t attention_probs_size(const CrossBatch& cb, int B, int S, int H) { return probs_offsets(cb, B, S, H).back(); }

template <typename T>
void attention_fwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   T* P, T* O) {
  const int ld = H * D;
  const T scale = T(1) / std::sqrt(T(D));
  const std::vector<size_t> off = probs_offsets(cb, B, S, H);
  const bool parallel = worth_threads(B, S, H, D);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < B * H; ++task) {
    const int b = task / H, h = task % H, c = cb.contexts(b), W = c * S;
    const int64_t first = int64_t(b - c + 1) * S;  // first key row (entry b-c+1)
    const T* q = Q + int64_t(b) * S * ld + h * D;
    T* p = P + off[task];
    if (c > 1)  // earlier entries' keys, un-rotated, all visible
      gemm_serial<T>(false, true, S, (c - 1) * S, D, scale, q, ld, Kx + first * ld + h * D, ld, T(0), p, W);
    gemm_serial<T>(false, true, S, S, D, scale, q, ld, Kown + int64_t(b) * S * ld + h * D, ld, T(0), p + (c - 1) * S,
                   W);
    for (int i = 0; i < S; ++i) {  // one softmax over (c-1)·S cross keys + own keys 0..i
      T* row = p + int64_t(i) * W;
      const int n = (c - 1) * S + i + 1;
      T mx = row[0];
#pragma omp simd reduction(max : mx)
      for (int j = 1; j < n; ++j) mx = std::max(mx, row[j]);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < n; ++j) sum += (row[j] = fast_exp(row[j] - mx));
      const T inv = T(1) / sum;
#pragma omp simd
      for (int j = 0; j < n; ++j) row[j] *= inv;
      std::fill(row + n, row + W, T(0));
    }
    gemm_serial<T>(false, false, S, D, W, T(1), p, W, V + first * ld + h * D, ld, T(0), O + int64_t(b) * S * ld + h * D,
                   ld);
  }
}

template <typename T>
void attention_bwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   T* P, const T* O, const T* dO, T* dQ, T* dKown, T* dKx, T* dV) {
  const int ld = H * D;
  const T scale = T(1) / std::sqrt(T(D));
  const std::vector<size_t> off = probs_offsets(cb, B, S, H);
  const bool parallel = worth_threads(B, S, H, D);
  auto rows = [&](const T* base, int e, int h) { return base + int64_t(e) * S * ld + h * D; };
  auto rows_mut = [&](T* base, int e, int h) { return base + int64_t(e) * S * ld + h * D; };
  // Column block of entry e inside the probability block of query entry b.
  auto block = [&](T* base, int b, int h, int e) {
    const int c = cb.contexts(b);
    return base + off[size_t(b) * H + h] + int64_t(e - (b - c + 1)) * S;
  };

  // 1. dV[e] = Σ_{b ≥ e that see e} P_b[:, e]ᵀ · dO_b   (P still holds probabilities)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < B * H; ++task) {
    const int e = task / H, h = task % H;
    T* dv = rows_mut(dV, e, h);
    // Not a prefix of b = e, e+1, ...: with stepping, a pack's first entry sees nothing earlier
    // while the next one does.
    for (int b = e; b < B && b - e <= cb.range; ++b)
      if (b - e < cb.contexts(b))
        gemm_serial<T>(true, false, S, D, S, T(1), block(P, b, h, e), cb.contexts(b) * S, rows(dO, b, h), ld,
                       b == e ? T(0) : T(1), dv, ld);
  }

  // 2. dS = P ⊙ (dP - rowsum(dP ⊙ P)) · scale with dP = dO · Vᵀ and rowsum(dP ⊙ P) = dO·O;
  //    dQ_b = dS · keys.
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < B * H; ++task) {
    const int b = task / H, h = task % H, c = cb.contexts(b), W = c * S;
    const int64_t first = int64_t(b - c + 1) * S;
    T* p = P + off[task];
    thread_local std::vector<T> dp;  // reused: a fresh [S x W] block per task would page-fault
    dp.resize(size_t(S) * W);
    gemm_serial<T>(false, true, S, W, D, T(1), rows(dO, b, h), ld, V + first * ld + h * D, ld, T(0), dp.data(), W);
    for (int i = 0; i < S; ++i) {
      const T* go = rows(dO, b, h) + int64_t(i) * ld;
      const T* o = rows(O, b, h) + int64_t(i) * ld;
      T delta = 0;
      for (int j = 0; j < D; ++j) delta += go[j] * o[j];
      T* row = p + int64_t(i) * W;
      const T* dpr = dp.data() + int64_t(i) * W;
#pragma omp simd
      for (int j = 0; j < W; ++j) row[j] = row[j] * (dpr[j] - delta) * scale;  // masked: P = 0 -> 0
    }
    T* dq = rows_mut(dQ, b, h);
    gemm_serial<T>(false, false, S, D, S, T(1), p + (c - 1) * S, W, rows(Kown, b, h), ld, T(0), dq, ld);
    if (c > 1) gemm_serial<T>(false, false, S, D, (c - 1) * S, T(1), p, W, Kx + first * ld + h * D, ld, T(1), dq, ld);
  }

  // 3. dKown[e] = dS_e[:, own]ᵀ · Q_e ; dKx[e] = Σ_{b > e that see e} dS_b[:, e]ᵀ · Q_b
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int task = 0; task < B * H; ++task) {
    const int e = task / H, h = task % H, c = cb.contexts(e);
    gemm_serial<T>(true, false, S, D, S, T(1), block(P, e, h, e), c * S, rows(Q, e, h), ld, T(0), rows_mut(dKown, e, h),
                   ld);
    T* dk = rows_mut(dKx, e, h);
    bool any = false;
    for (int b = e + 1; b < B && b - e <= cb.range; ++b) {
      if (b - e >= cb.contexts(b)) continue;
      gemm_serial<T>(true, false, S, D, S, T(1), block(P, b, h, e), cb.contexts(b) * S, rows(Q, b, h), ld,
                     any ? T(1) : T(0), dk, ld);
      any = true;
    }
    if (!any)
      for (int i = 0; i < S; ++i) std::fill(dk + int64_t(i) * ld, dk + int64_t(i) * ld + D, T(0));
  }
}

template void attention_fwd<float>(const CrossBatch&, int, int, int, int, const float*, const float*, const float*,
                                   const float*, float*, float*);
template void attention_fwd<double>(const CrossBatch&, int, int, int, int, const double*, const double*, const double*,
                                    const double*, double*, double*);
template void attention_bwd<float>(const CrossBatch&, int, int, int, int, const float*, const float*, const float*,
                                   const float*, float*, const float*, const float*, float*, float*, float*, float*);
template void attention_bwd<double>(const CrossBatch&, int, int, int, int, const double*, const double*, const double*,
                                    const double*, double*, const double*, const double*, double*, double*, double*,
                                    double*);

}  // namespace ll::train
