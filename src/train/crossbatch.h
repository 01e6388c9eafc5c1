#pragma once
// Crossbatch attention (FoT training), as the released JAX code (FoT/cross_batch.py) does it.
//
// A micro-batch holds B entries of S tokens; k consecutive entries ("a pack") are k consecutive
// chunks of one document stream. In a memory layer, the queries of entry b attend, in one
// softmax, to their own causal keys (rotated by RoPE, positions 0..S-1) and to ALL keys of the
// contexts(b) - 1 entries just before b, un-rotated ("position 0", the raw k_proj outputs, as
// memory keys are at inference). Earlier entries of b's pack are positives, entries of earlier
// packs are other documents (negatives); entries after b are never visible.
// Non-memory layers, and memory layers with range 0, are plain causal attention.
#include <cstddef>
#include <cstdint>

namespace ll::train {

struct CrossBatch {
  int k = 1;              // pack size
  int range = 0;          // r = cross_batch_range: at most r earlier entries (d = r + 1 contexts)
  bool stepping = true;   // the JAX "stepping" rule: fewer contexts early in a pack
  bool negatives = true;  // false: only entries of b's own pack (= what inference sees)
  // Added to every score against a negative (an entry of an earlier pack): an additive margin, as
  // in AM-softmax. A negative key then weighs as much as e^bias keys of its score would, so a
  // softmax over the ~d·S training keys stands in for one over a memory e^bias times larger; the
  // positive must beat the negatives by `bias` more to get the same attention. 0 = the JAX code.
  double negative_bias = 0;

  // Contexts of entry b (own + earlier entries), the JAX pack_size:
  //   min((b mod k)·ceil((r+1)/max(k-1,1)) + 1, r+1, b+1), stepping only when k > 1.
  // E.g. k = 4, r = 3: positions get 0, 2, 3, 3 earlier entries = (positives, negatives)
  // (0,0), (1,1), (2,1), (3,0), the paper's LongLLaMA-3B recipe. The first pack of a micro-batch
  // has no earlier pack, so it gets no negatives.
  int contexts(int b) const;
  // How many of b's earlier context entries are negatives: they come first (entries b-c+1 ..).
  int negative_contexts(int b) const;
  // Whether query row i of entry b sees key row j of entry e (in one memory-layer softmax).
  bool sees(int b, int i, int e, int j) const { return e < b ? e >= b - contexts(b) + 1 : e == b && j <= i; }
};

// Attention targets (the training option memory_attention_loss): row r of the micro-batch
// (entry r / S, position r % S) should attend to key row attend[r] (entry e·S + position), -1 for
// none. Its loss is weight[r] · (−log P(r attends attend[r])), summed over heads; targets the row
// does not see are ignored. Null pointers: no targets.
template <typename T>
struct AttendTargets {
  const int32_t* attend = nullptr;
  const T* weight = nullptr;
  explicit operator bool() const { return attend != nullptr; }
};

// Q, Kown: queries and own keys, rotated when the layer uses RoPE; Kx: the keys other entries
// see (un-rotated); V: values. All [B·S rows, H·D], head h at column h·D. O: output, same shape.
// lse: [B][H][S] log-sum-exp of every query's scores, all the backward pass keeps (it recomputes
// the probabilities block by block), so memory does not grow with the crossbatch range.
// Scores are (Q·Kᵀ)·(1/sqrt(D)): the scale multiplies the product (gemm alpha), as in our
// inference and the HF code's division after the product; the JAX trainer pre-scales q, which
// is the same in exact arithmetic.
template <typename T>
void attention_fwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   T* lse, T* O);

// Gradients (all overwritten): dQ, dKown (own keys, still rotated), dKx (keys seen by later
// entries), dV. Each (query entry, key entry) block's probabilities are recomputed from lse.
// With targets, the gradients are those of Σ dO·O plus the targets' loss (AttendTargets).
// Parallel over heads (no two heads write the same columns), every sum in a fixed order:
// deterministic for any thread count.
template <typename T>
void attention_bwd(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx, const T* V,
                   const T* lse, const T* O, const T* dO, T* dQ, T* dKown, T* dKx, T* dV,
                   AttendTargets<T> targets = {});

// The targets' loss: Σ over rows with a visible target and over heads of weight[r] · (−log P).
// Scores are recomputed from Q and the keys; lse is attention_fwd's.
template <typename T>
double attention_target_loss(const CrossBatch& cb, int B, int S, int H, int D, const T* Q, const T* Kown, const T* Kx,
                             const T* lse, AttendTargets<T> targets);

}  // namespace ll::train
