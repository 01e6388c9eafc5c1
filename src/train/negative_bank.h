#pragma once
// A bank of stale negative keys for a memory layer (this engine's training extension, off unless
// the training config asks for it).
//
// Crossbatch gives each query the keys of at most d - 1 other documents (d = 128: ~32k keys),
// while an evaluation memory holds millions; the keys that beat the target there are the rare
// high scorers the training softmax never met. The bank keeps the keys and values the memory
// layer produced for the definition chunks of the last steps (a ring of `size` rows, no
// gradient: they are constants, computed with older parameters, or by the trainer's momentum
// copy of them, which keeps training stable; docs/tasks.md, session 17), and each chosen query (the
// rows the loss reads) adds its `top_k` best-scoring bank keys to its one softmax over local and
// crossbatch keys. Only the query gets their gradient, as in MoCo's queue of negatives.
//
// Exact: the scan scores every bank key (blocks of rows x blocks of keys through BLAS) and keeps
// a heap of the best top_k per row and head.
#include <cstdint>
#include <vector>

namespace ll::train {

template <typename T>
class NegativeBank {
 public:
  // ld = H·D columns per row (head h at h·D).
  NegativeBank(int64_t size, int top_k, int H, int D);

  int64_t rows() const { return count_; }

  // Appends rows [0, n) of K and V ([n x ld]); the oldest rows make room once the bank is full.
  void push(const T* K, const T* V, int64_t n);

  // Selection for the query rows `rows` of Q ([* x ld]); kept until the next select().
  void select(const T* Q, const std::vector<int>& rows);

  // Joins the selected bank keys to the softmax of each chosen row: lse ([B][H][S]) and O
  // ([* x ld]) of the local + crossbatch attention become those of local + crossbatch + bank.
  void merge_fwd(int S, T* lse, T* O) const;

  // dQ (chosen rows) += the bank part of ∂/∂Q, given lse and O as merge_fwd left them and dO.
  void add_dq(int S, const T* lse, const T* O, const T* dO, T* dQ) const;

 private:
  int64_t size_;
  int top_k_, H_, D_, ld_;
  std::vector<T> K_, V_;  // [size x ld] ring
  int64_t next_ = 0, count_ = 0;
  // Selection: chosen rows, and for each (row, head) top_k bank rows and their scores (scaled).
  std::vector<int> rows_;
  std::vector<int64_t> index_;  // [rows][H][top_k]
  std::vector<T> score_;        // [rows][H][top_k]
  int chosen_ = 0;              // bank keys per (row, head): min(top_k, count)
};

extern template class NegativeBank<float>;
extern template class NegativeBank<double>;

}  // namespace ll::train
