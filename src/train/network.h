#pragma once
// The training forward and backward pass of a whole LongLLaMA over one micro-batch of B entries
// of S tokens each (positions 0..S-1 in every entry), with crossbatch attention in memory layers.
// Keeps the activations the backward pass needs, about (9·d + 3·ffn) values per token and layer
// plus the logits; attention keeps only a log-sum-exp per query and head (its probabilities are
// recomputed), so memory does not depend on the crossbatch range.
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"
#include "train/backward_ops.h"
#include "train/crossbatch.h"
#include "train/negative_bank.h"
#include "train/params.h"

namespace ll::train {

template <typename T>
class Network {
 public:
  Network(const ModelConfig& config, int seq_len);

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  int seq_len() const { return S_; }

  // inputs: [B·S] token ids. cb applies to memory layers (others are always plain causal).
  // Returns the logits [B·S, vocab], valid until the next call.
  const T* forward(const T* params, const int* inputs, int B, const CrossBatch& cb);

  // Loss of the last forward (targets and loss mask [B·S]), see cross_entropy(): loss_sum is
  // the sum over entries of per-entry mean NLL.
  CEStats loss(const int* targets, const uint8_t* mask);
  // Loss, then backward: grads += ∂(loss_scale · loss_sum)/∂params. Overwrites the logits with
  // their gradient (call forward again before another loss/backward).
  CEStats backward(const T* params, const int* targets, const uint8_t* mask, T loss_scale, T* grads);

  // For the next backward only: attention targets of the memory layers (AttendTargets; attend
  // [B·S], rows of this micro-batch, -1 for none) with loss weight `weight`: the objective gains
  // weight · Σ_entries mean over the entry's rows with a visible target of the mean over heads of
  // −log P(the row attends its target), summed over memory layers (times loss_scale, as the NLL).
  // attention_loss() then returns that term (without loss_scale).
  void use_attention_targets(const int32_t* attend, double weight);
  double attention_loss() const { return attention_loss_; }

  // Negative banks (negative_bank.h), one per memory layer, each `size` rows, top_k per query.
  void enable_negative_banks(int64_t size, int top_k);
  // For the next forward + backward only: the rows with mask != 0 ([B·S], the loss rows) use the
  // banks, and after the backward pass the keys and values of entries b with b % pack == 0 (the
  // first chunk of each pack: definitions, in the dictionary task) join them. Forward passes
  // without this call (evaluation) neither read nor change the banks.
  void use_negative_banks(const uint8_t* mask, int pack);
  // Banks filled by another network (a momentum copy) instead of this one's own keys.
  void set_bank_external(bool external) { bank_external_ = external; }
  // Appends all rows of `other`'s last forward (its memory layers' keys and values) to the banks.
  void push_banks_from(const Network<T>& other);

 private:
  struct LayerActs {
    std::vector<T> x_in, xn, rstd1, Q, K, Kr, V, lse, att, x_mid, xn2, rstd2, G, U, A;
  };
  bool rope_in(int layer) const { return !config_.is_mem_layer(layer) || config_.mem_positionals; }
  CrossBatch layer_cb(int layer) const;

  ModelConfig config_;
  ParamLayout layout_;
  int S_;
  Rope<T> rope_;
  int B_ = 0;
  CrossBatch cb_;
  std::vector<int> inputs_;
  std::vector<LayerActs> acts_;
  std::vector<T> x_final_, xf_, rstd_f_, logits_;
  std::vector<std::unique_ptr<NegativeBank<T>>> banks_;  // by layer; null: not a memory layer / no bank
  std::vector<int> bank_rows_;
  const uint8_t* bank_mask_ = nullptr;
  bool bank_external_ = false;
  const int32_t* attend_ = nullptr;  // use_attention_targets, for the next backward
  double attend_weight_ = 0, attention_loss_ = 0;
  std::vector<T> attend_w_;
  int bank_pack_ = 0;  // > 0: the current forward + backward use the banks
  // Workspaces kept across calls (re-allocating them every micro-batch costs page faults).
  std::vector<T> x_, tmp_, dx_, dxn_, datt_, dQ_, dKown_, dKx_, dV_, dA_, dG_, dU_;
};

extern template class Network<float>;
extern template class Network<double>;

}  // namespace ll::train
