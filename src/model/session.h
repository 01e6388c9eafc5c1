#pragma once
// A Session is one stream of text through a model: the local caches of every layer and the
// memories of the memory layers. forward() reproduces the official
// LongLlamaForCausalLM.forward(input_ids, past_key_values, use_cache) for batch size 1:
//  - a call of T tokens sends its first T - last_context_length tokens through windows of
//    max_position_embeddings (W) tokens, then the rest in one last chunk;
//  - without a local cache, windows run with no cache at all; memory layers append each window's
//    keys/values to memory after its attention ("window to memory");
//  - with a local cache, a chunk that would make it longer than W first flushes the whole cache
//    (into memory for memory layers, dropped elsewhere);
//  - local RoPE positions count from the oldest cached token; memory keys are stored un-rotated;
//    local and memory logits share one softmax, computed blockwise (online softmax).
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "memory/kv_memory.h"
#include "model/model.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace ll {

enum class LogitsWanted { None, Last, All };

// Called after each chunk: tokens done so far, tokens in this call.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

class Session {
 public:
  explicit Session(const Weights& weights);
  // Runs float32 parameters directly (borrowed, no copy), e.g. a model being trained.
  explicit Session(const Model& model);

  // Returns logits, row-major [rows x vocab]: rows = T (All), 1 (Last) or 0 (None).
  // use_cache = false is the scoring path (official use_cache=False) and needs an empty local
  // cache; every chunk then goes to memory.
  std::vector<float> forward(const std::vector<int>& ids, bool use_cache, LogitsWanted which,
                             const ProgressFn& progress = {});

  int local_length() const { return local_n_; }
  int64_t memory_length(int layer) const;  // 0 for layers without memory
  size_t memory_bytes() const;
  // Bytes the memory layers need to hold `tokens` more tokens (keys and values).
  size_t memory_bytes_for(int64_t tokens) const;
  int64_t tokens_seen() const { return tokens_seen_; }
  const Weights& weights() const { return *w_; }
  const ModelConfig& config() const { return w_->config; }
  void reset();
  // Memory attention of memory layers: 0 (default, as the official code) attends densely to the
  // whole memory; k > 0 attends, per query and head, to the k memory keys with the highest scores
  // (exact top-k, found by a full scan), together with the local keys in one softmax.
  void set_memory_top_k(int k) { top_k_ = k; }
  // How this session stores memory keys/values (default: the config's mem_dtype). Clears the
  // memory and the local cache (reset), so one set of weights can serve sessions of several
  // storage types (bench --mem-types).
  void set_memory_type(MemDType t);
  MemDType memory_type() const { return mem_dtype_; }
  int memory_top_k() const { return top_k_; }
  // Benchmarks only: appends n tokens of random keys/values to every memory layer, so decoding
  // with a large memory can be timed without ingesting it first (the cost of attention does not
  // depend on the values).
  void fill_memory_random(int64_t n, uint64_t seed);
  // Diagnostics (eval dictionary --ranks): memory layers pass each call's queries of head h,
  // [count][head_dim] exactly as they are scored against the memory keys.
  using MemoryQueryFn = std::function<void(int layer, int head, const float* q, int count)>;
  void set_memory_query_observer(MemoryQueryFn f) { mem_query_fn_ = std::move(f); }
  const KVMemory* memory(int layer) const { return memory_[layer] ? &*memory_[layer] : nullptr; }

 private:
  struct LocalCache {
    // per head: [n][D] rows. k_rot are rotated by their local position (valid until the next
    // flush, since positions count from the oldest cached token); k_raw (memory layers only)
    // are kept un-rotated for the flush into memory.
    std::vector<std::vector<float>> k_rot, k_raw, v;
  };
  void run_chunk(const int* ids, int q, bool use_cache, bool all_logits, bool last_logit, float* logits,
                 bool kv_only = false);
  void attention(int layer, const float* Q, const float* K, const float* V, int q, int n_keep,
                 bool use_cache, float* out);

  std::shared_ptr<const Weights> owned_;  // set when built from a Model
  const Weights* w_;
  RopeTable rope_;
  MemDType mem_dtype_;  // storage of memory keys/values (config's mem_dtype unless set)
  std::vector<LocalCache> local_;
  int local_n_ = 0;
  std::vector<std::optional<KVMemory>> memory_;  // engaged for memory layers
  int64_t tokens_seen_ = 0;
  int top_k_ = 0;
  MemoryQueryFn mem_query_fn_;
};

}  // namespace ll
