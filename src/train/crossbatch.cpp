#include "train/crossbatch.h"

#include <omp.h>

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

int CrossBatch::negative_contexts(int b) const {
  const int first = b - contexts(b) + 1, pack_start = b - b % k;
  return std::max(0, pack_start - first);
}

namespace {

bool worth_threads(int B, int S, int H, int D) { return int64_t(B) * H * S * S * D > (1 << 16); }

// Rows of a causal block computed together: each tile of rows skips the keys after its last row.
constexpr int kCausalTile = 64;

// row[0, n) <- softmax(row[0, n)); returns the log-sum-exp.
template <typename T>
T softmax_row(T* row, int n) {
  T mx = row[0];
#pragma omp simd reduction(max : mx)
  for (int j = 1; j < n; ++j) mx = std::max(mx, row[j]);
#pragma omp simd
  for (int j = 0; j < n; ++j) row[j] = fast_exp(row[j] - mx);
  T sum = 0;
  for (int j = 0; j < n; ++j) sum += row[j];  // in order: the bits do not depend on the vector width
  const T inv = T(1) / sum;
#pragma omp simd
  for (int j = 0; j < n; ++j) row[j] *= inv;
  return mx + std::log(sum);
}

}  // namespace

template <typename T>
void attention_fwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   T* lse, T* O) {
  const int ld = H * D;
  const T scale = T(1) / std::sqrt(T(D));
#pragma omp parallel for schedule(dynamic, 1) if (worth_threads(B, S, H, D))
  for (int task = 0; task < B * H; ++task) {
    const int b = task / H, h = task % H, c = cb.contexts(b), W = c * S;
    const int64_t first = int64_t(b - c + 1) * S;  // first key row (entry b-c+1)
    const T* q = Q + int64_t(b) * S * ld + h * D;
    thread_local std::vector<T> scores;  // [S x W]: keys of entries b-c+1 .. b in that order
    scores.resize(size_t(S) * W);
    T* p = scores.data();
    T* row_lse = lse + (int64_t(b) * H + h) * S;
    T* out = O + int64_t(b) * S * ld + h * D;
    if (c == 1) {  // own keys only: rows [r0, r1) see keys [0, r1), the masked rest is not computed
      const T* k = Kown + int64_t(b) * S * ld + h * D;
      for (int r0 = 0; r0 < S; r0 += kCausalTile) {
        const int r1 = std::min(S, r0 + kCausalTile);
        gemm_serial<T>(false, true, r1 - r0, r1, D, scale, q + int64_t(r0) * ld, ld, k, ld, T(0), p + int64_t(r0) * W, W);
        for (int i = r0; i < r1; ++i) {
          T* row = p + int64_t(i) * W;
          row_lse[i] = softmax_row(row, i + 1);
          std::fill(row + i + 1, row + r1, T(0));
        }
        gemm_serial<T>(false, false, r1 - r0, D, r1, T(1), p + int64_t(r0) * W, W, V + first * ld + h * D, ld, T(0),
                       out + int64_t(r0) * ld, ld);
      }
      continue;
    }
    if (c > 1) {  // earlier entries' keys, un-rotated, all visible
      gemm_serial<T>(false, true, S, (c - 1) * S, D, scale, q, ld, Kx + first * ld + h * D, ld, T(0), p, W);
      const int neg = cb.negative_contexts(b) * S;  // negatives' columns come first
      if (cb.negative_bias != 0 && neg > 0)
        for (int i = 0; i < S; ++i) {
          T* row = p + int64_t(i) * W;
          const T bias = T(cb.negative_bias);
#pragma omp simd
          for (int j = 0; j < neg; ++j) row[j] += bias;
        }
    }
    gemm_serial<T>(false, true, S, S, D, scale, q, ld, Kown + int64_t(b) * S * ld + h * D, ld, T(0), p + (c - 1) * S,
                   W);
    for (int i = 0; i < S; ++i) {  // one softmax over (c-1)·S cross keys + own keys 0..i
      T* row = p + int64_t(i) * W;
      const int n = (c - 1) * S + i + 1;
      row_lse[i] = softmax_row(row, n);
      std::fill(row + n, row + W, T(0));
    }
    gemm_serial<T>(false, false, S, D, W, T(1), p, W, V + first * ld + h * D, ld, T(0), out, ld);
  }
}

namespace {

// The backward pass of one head, run by a team of `nt` threads (thread `tid`) that share P, dS
// and delta ([S x S], [S x S], [S]); a team of one is the plain serial loop. Every gemm is the
// same call whatever the team size (dQ always in the same row pieces: halves, or the own block's
// causal tiles), and each output block is written by one thread in the serial order, so the bits
// do not depend on the team size.
// Teams exist because since the memory layer has one head (stage M of the dictionary recipe),
// a loop over heads left the second core idle for ~80% of a crossbatch step.
template <typename T>
void head_bwd(const CrossBatch& cb, int B, int S, int H, int D, int h, const T* Q, const T* Kown, const T* Kx,
              const T* V, const T* lse, const T* O, const T* dO, T* dQ, T* dKown, T* dKx, T* dV, T* P, T* dS,
              T* delta, int tid, int nt, AttendTargets<T> targets) {
  const int ld = H * D;
  const T scale = T(1) / std::sqrt(T(D));
  auto at = [&](auto* base, int e, int h) { return base + int64_t(e) * S * ld + h * D; };
  auto barrier = [nt] {
    if (nt > 1) {
#pragma omp barrier
    }
  };
  auto mine = [tid, nt](int64_t i) { return i % nt == tid; };
  const int64_t rows = int64_t(B) * S;
  for (T* g : {dQ, dKown, dKx, dV})
    for (int64_t i = rows * tid / nt; i < rows * (tid + 1) / nt; ++i)
      std::fill(g + i * ld + h * D, g + i * ld + h * D + D, T(0));
  const int half = S / 2;
  for (int b = 0; b < B; ++b) {
    const T* q = at(Q, b, h);
    const T* go = at(dO, b, h);
    const T* row_lse = lse + (int64_t(b) * H + h) * S;
    barrier();  // the previous entry's last block is done with P, dS and delta
    for (int i = S * tid / nt; i < S * (tid + 1) / nt; ++i) {  // Σ_j P_ij dP_ij = dO_i · O_i
      const T* o = at(O, b, h) + int64_t(i) * ld;
      T s = 0;
      for (int j = 0; j < D; ++j) s += go[int64_t(i) * ld + j] * o[j];
      delta[i] = s;
    }
    const int c = cb.contexts(b), pack_start = b - b % cb.k;
    for (int e = b - c + 1; e <= b; ++e) {  // the key entries b sees; e == b: own causal keys
      const bool own = e == b;
      const T l_shift = e < pack_start ? T(cb.negative_bias) : T(0);  // a negative's scores carry the bias
      const T* k = own ? at(Kown, b, h) : at(Kx, e, h);
      if (e > b - c + 1) barrier();  // the previous block's gradients have read P and dS
      // Own keys come in tiles of kCausalTile rows: rows [r0, r1) see keys [0, r1).
      const int tiles = own ? (S + kCausalTile - 1) / kCausalTile : 1;
      const auto r0_of = [&](int t) { return own ? t * kCausalTile : 0; };
      const auto r1_of = [&](int t) { return own ? std::min(S, (t + 1) * kCausalTile) : S; };
      for (int t = 0; t < tiles; ++t) {
        const int r0 = r0_of(t), r1 = r1_of(t);
        if (mine(0))  // scores
          gemm_serial<T>(false, true, r1 - r0, r1, D, scale, q + int64_t(r0) * ld, ld, k, ld, T(0), P + int64_t(r0) * S,
                         S);
        if (mine(1))  // dP
          gemm_serial<T>(false, true, r1 - r0, r1, D, T(1), go + int64_t(r0) * ld, ld, at(V, e, h), ld, T(0),
                         dS + int64_t(r0) * S, S);
      }
      barrier();
      for (int i = S * tid / nt; i < S * (tid + 1) / nt; ++i) {
        T* p = P + int64_t(i) * S;
        T* ds = dS + int64_t(i) * S;
        const int n = own ? i + 1 : S, width = own ? r1_of(i / kCausalTile) : S;
        const T l = row_lse[i] - l_shift, dl = delta[i];
#pragma omp simd
        for (int j = 0; j < n; ++j) {
          p[j] = fast_exp(p[j] - l);
          ds[j] = p[j] * (ds[j] - dl) * scale;
        }
        if (targets) {  // + w·(−log P_t): ∂/∂score_j = w·(P_j − [j = t])
          const int64_t r = int64_t(b) * S + i;
          const int32_t t = targets.attend[r];
          if (t >= 0 && cb.sees(b, i, t / S, t % S)) {
            const T w = targets.weight[r] * scale;
#pragma omp simd
            for (int j = 0; j < n; ++j) ds[j] += w * p[j];
            if (t / S == e) ds[t % S] -= w;
          }
        }
        std::fill(p + n, p + width, T(0));  // masked: probability and gradient 0
        std::fill(ds + n, ds + width, T(0));
      }
      barrier();
      T* dk = own ? at(dKown, b, h) : at(dKx, e, h);
      if (own) {
        for (int t = 0; t < tiles; ++t) {  // dQ rows [r0, r1) from keys [0, r1); tiles 0, 3 | 1, 2 balance two threads
          const int r0 = r0_of(t), r1 = r1_of(t);
          if (mine(t % 4 == 1 || t % 4 == 2))
            gemm_serial<T>(false, false, r1 - r0, D, r1, T(1), dS + int64_t(r0) * S, S, k, ld, T(1),
                           at(dQ, b, h) + int64_t(r0) * ld, ld);
        }
        for (int t = 0; t < tiles; ++t) {  // keys [j0, j1) are seen by rows [j0, S)
          const int j0 = r0_of(t), j1 = r1_of(t);
          if (mine(0))
            gemm_serial<T>(true, false, j1 - j0, D, S - j0, T(1), P + int64_t(j0) * S + j0, S, go + int64_t(j0) * ld,
                           ld, T(1), at(dV, e, h) + int64_t(j0) * ld, ld);
          if (mine(1))
            gemm_serial<T>(true, false, j1 - j0, D, S - j0, T(1), dS + int64_t(j0) * S + j0, S, q + int64_t(j0) * ld,
                           ld, T(1), dk + int64_t(j0) * ld, ld);
        }
        continue;
      }
      if (mine(0)) {
        gemm_serial<T>(false, false, half, D, S, T(1), dS, S, k, ld, T(1), at(dQ, b, h), ld);
        gemm_serial<T>(true, false, S, D, S, T(1), P, S, go, ld, T(1), at(dV, e, h), ld);
      }
      if (mine(1)) {
        gemm_serial<T>(false, false, S - half, D, S, T(1), dS + int64_t(half) * S, S, k, ld, T(1),
                       at(dQ, b, h) + int64_t(half) * ld, ld);
        gemm_serial<T>(true, false, S, D, S, T(1), dS, S, q, ld, T(1), dk, ld);
      }
    }
  }
  barrier();
}

}  // namespace

template <typename T>
void attention_bwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   const T* lse, const T* O, const T* dO, T* dQ, T* dKown, T* dKx, T* dV,
                   AttendTargets<T> targets) {
  const bool threads = worth_threads(B, S, H, D) && omp_get_max_threads() > 1 && !omp_in_parallel();
  if (!threads || H >= omp_get_max_threads()) {  // a head per thread
#pragma omp parallel for schedule(dynamic, 1) if (threads)
    for (int h = 0; h < H; ++h) {
      thread_local std::vector<T> P, dS, delta;
      P.resize(size_t(S) * S);
      dS.resize(size_t(S) * S);
      delta.resize(S);
      head_bwd(cb, B, S, H, D, h, Q, Kown, Kx, V, lse, O, dO, dQ, dKown, dKx, dV, P.data(), dS.data(), delta.data(), 0,
               1, targets);
    }
    return;
  }
  std::vector<T> P(size_t(S) * S), dS(size_t(S) * S), delta(S);  // fewer heads than threads: a team per head
  for (int h = 0; h < H; ++h) {
#pragma omp parallel
    head_bwd(cb, B, S, H, D, h, Q, Kown, Kx, V, lse, O, dO, dQ, dKown, dKx, dV, P.data(), dS.data(), delta.data(),
             omp_get_thread_num(), omp_get_num_threads(), targets);
  }
}

template <typename T>
double attention_target_loss(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx,
                             const T* lse, AttendTargets<T> targets) {
  if (!targets) return 0;
  const int ld = H * D;
  const double scale = 1.0 / std::sqrt(double(D));
  double total = 0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < S; ++i) {
      const int64_t r = int64_t(b) * S + i;
      const int32_t t = targets.attend[r];
      if (t < 0 || !cb.sees(b, i, t / S, t % S)) continue;
      const int e = t / S;
      const T* keys = e == b ? Kown : Kx;
      const double bias = e < b - b % cb.k ? cb.negative_bias : 0.0;
      for (int h = 0; h < H; ++h) {
        double s = 0;
        for (int j = 0; j < D; ++j) s += double(Q[r * ld + h * D + j]) * double(keys[int64_t(t) * ld + h * D + j]);
        total += double(targets.weight[r]) * (double(lse[(int64_t(b) * H + h) * S + i]) - (s * scale + bias));
      }
    }
  return total;
}

template void attention_fwd<float>(const CrossBatch&, int, int, int, int, const float*, const float*, const float*,
                                   const float*, float*, float*);
template void attention_fwd<double>(const CrossBatch&, int, int, int, int, const double*, const double*, const double*,
                                    const double*, double*, double*);
template void attention_bwd<float>(const CrossBatch&, int, int, int, int, const float*, const float*, const float*,
                                   const float*, const float*, const float*, const float*, float*, float*, float*,
                                   float*, AttendTargets<float>);
template void attention_bwd<double>(const CrossBatch&, int, int, int, int, const double*, const double*, const double*,
                                    const double*, const double*, const double*, const double*, double*, double*,
                                    double*, double*, AttendTargets<double>);
template double attention_target_loss<float>(const CrossBatch&, int, int, int, int, const float*, const float*,
                                             const float*, const float*, AttendTargets<float>);
template double attention_target_loss<double>(const CrossBatch&, int, int, int, int, const double*, const double*,
                                              const double*, const double*, AttendTargets<double>);

}  // namespace ll::train
