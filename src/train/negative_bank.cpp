#include "train/negative_bank.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <utility>

#include "train/backward_ops.h"

namespace ll::train {

namespace {
constexpr int kRowBlock = 128;   // query rows scored together (a thread's share)
constexpr int kKeyBlock = 1024;  // bank keys per product: a [128 x 1024] score tile stays in L2
}  // namespace

template <typename T>
NegativeBank<T>::NegativeBank(int64_t size, int top_k, int H, int D)
    : size_(size), top_k_(top_k), H_(H), D_(D), ld_(H * D) {
  if (size <= 0 || top_k <= 0 || H <= 0 || D <= 0) throw std::invalid_argument("NegativeBank: sizes must be positive");
  K_.resize(size_t(size) * ld_);
  V_.resize(size_t(size) * ld_);
}

template <typename T>
void NegativeBank<T>::push(const T* K, const T* V, int64_t n) {
  for (int64_t i = std::max<int64_t>(0, n - size_); i < n; ++i) {  // more rows than the bank: keep the newest
    std::copy(K + i * ld_, K + (i + 1) * ld_, K_.begin() + next_ * ld_);
    std::copy(V + i * ld_, V + (i + 1) * ld_, V_.begin() + next_ * ld_);
    next_ = (next_ + 1) % size_;
    count_ = std::min(count_ + 1, size_);
  }
}

template <typename T>
void NegativeBank<T>::select(const T* Q, const std::vector<int>& rows) {
  rows_ = rows;
  chosen_ = int(std::min<int64_t>(top_k_, count_));
  const int R = int(rows.size()), k = chosen_;
  index_.assign(size_t(R) * H_ * k, 0);
  score_.assign(size_t(R) * H_ * k, T(0));
  if (R == 0 || k == 0) return;
  const T scale = T(1) / std::sqrt(T(D_));
  const int blocks = (R + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int h = 0; h < H_; ++h)
    for (int blk = 0; blk < blocks; ++blk) {
      const int r0 = blk * kRowBlock, rb = std::min(R, r0 + kRowBlock) - r0;
      thread_local std::vector<T> q, s;
      thread_local std::vector<std::vector<std::pair<T, int64_t>>> heaps;  // min-heaps: worst on top
      q.resize(size_t(rb) * D_);
      s.resize(size_t(rb) * kKeyBlock);
      heaps.resize(rb);
      for (int i = 0; i < rb; ++i) {
        const T* src = Q + int64_t(rows[r0 + i]) * ld_ + h * D_;
        std::copy(src, src + D_, q.begin() + int64_t(i) * D_);
        heaps[i].clear();
      }
      const auto worse = std::greater<std::pair<T, int64_t>>();
      for (int64_t k0 = 0; k0 < count_; k0 += kKeyBlock) {
        const int kb = int(std::min<int64_t>(kKeyBlock, count_ - k0));
        gemm_serial<T>(false, true, rb, kb, D_, scale, q.data(), D_, K_.data() + k0 * ld_ + h * D_, ld_, T(0), s.data(),
                       kb);
        for (int i = 0; i < rb; ++i) {
          auto& heap = heaps[i];
          const T* row = s.data() + int64_t(i) * kb;
          for (int j = 0; j < kb; ++j) {
            if (int(heap.size()) < k) {
              heap.emplace_back(row[j], k0 + j);
              std::push_heap(heap.begin(), heap.end(), worse);
            } else if (row[j] > heap.front().first) {
              std::pop_heap(heap.begin(), heap.end(), worse);
              heap.back() = {row[j], k0 + j};
              std::push_heap(heap.begin(), heap.end(), worse);
            }
          }
        }
      }
      for (int i = 0; i < rb; ++i) {
        const size_t at = (size_t(r0 + i) * H_ + h) * k;
        std::sort_heap(heaps[i].begin(), heaps[i].end(), worse);  // best first
        for (int j = 0; j < k; ++j) {
          score_[at + j] = heaps[i][j].first;
          index_[at + j] = heaps[i][j].second;
        }
      }
    }
}

template <typename T>
void NegativeBank<T>::merge_fwd(int S, T* lse, T* O) const {
  const int R = int(rows_.size()), k = chosen_;
  if (k == 0) return;
#pragma omp parallel for schedule(static)
  for (int i = 0; i < R; ++i) {
    const int r = rows_[i], b = r / S, pos = r % S;
    for (int h = 0; h < H_; ++h) {
      const size_t at = (size_t(i) * H_ + h) * k;
      T mx = score_[at];
      for (int j = 1; j < k; ++j) mx = std::max(mx, score_[at + j]);
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += std::exp(score_[at + j] - mx);
      const T lse_bank = mx + std::log(sum);
      T& l = lse[(int64_t(b) * H_ + h) * S + pos];
      const T lse_all = std::max(l, lse_bank) + std::log1p(std::exp(-std::abs(l - lse_bank)));
      T* o = O + int64_t(r) * ld_ + h * D_;
      const T keep = std::exp(l - lse_all);
      for (int c = 0; c < D_; ++c) o[c] *= keep;
      for (int j = 0; j < k; ++j) {
        const T p = std::exp(score_[at + j] - lse_all);
        const T* v = V_.data() + index_[at + j] * ld_ + h * D_;
        for (int c = 0; c < D_; ++c) o[c] += p * v[c];
      }
      l = lse_all;
    }
  }
}

template <typename T>
void NegativeBank<T>::add_dq(int S, const T* lse, const T* O, const T* dO, T* dQ) const {
  const int R = int(rows_.size()), k = chosen_;
  if (k == 0) return;
  const T scale = T(1) / std::sqrt(T(D_));
#pragma omp parallel for schedule(static)
  for (int i = 0; i < R; ++i) {
    const int r = rows_[i], b = r / S, pos = r % S;
    for (int h = 0; h < H_; ++h) {
      const size_t at = (size_t(i) * H_ + h) * k;
      const T* go = dO + int64_t(r) * ld_ + h * D_;
      const T* o = O + int64_t(r) * ld_ + h * D_;
      T delta = 0;  // Σ over all keys of P·dP = dO · O
      for (int c = 0; c < D_; ++c) delta += go[c] * o[c];
      const T l = lse[(int64_t(b) * H_ + h) * S + pos];
      T* dq = dQ + int64_t(r) * ld_ + h * D_;
      for (int j = 0; j < k; ++j) {
        const int64_t row = index_[at + j];
        const T* v = V_.data() + row * ld_ + h * D_;
        const T* key = K_.data() + row * ld_ + h * D_;
        T dp = 0;
        for (int c = 0; c < D_; ++c) dp += go[c] * v[c];
        const T ds = std::exp(score_[at + j] - l) * (dp - delta) * scale;
        for (int c = 0; c < D_; ++c) dq[c] += ds * key[c];
      }
    }
  }
}

template class NegativeBank<float>;
template class NegativeBank<double>;

}  // namespace ll::train
