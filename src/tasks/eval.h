#pragma once
// Long-memory evaluations of a model: the dictionary lookup and passkey retrieval (docs/tasks.md).
// Both build the memory from a long prefix first (windows of max_position_embeddings tokens, kv-only
// where exact, so a model with one memory layer ingests in linear time), then run the part that is
// scored in one call that stays in the local window.
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace ll::tasks {

// Progress of the ingestion: tokens done, tokens in the prefix.
using IngestProgress = std::function<void(int64_t done, int64_t total)>;

// eval dictionary --ranks: how the first memory layer's queries rank the keys in memory. Probes are
// the queries that predict each value place p (v1 … v4: the token before the value). Where a head
// looks is learned, not given: the first-ranked key's offset from the queried definition's <k> is
// histogrammed, the most frequent offset (per place and head) is that head's target, and the
// target's rank is then counted.
struct MemoryRanks {
  static constexpr int kBefore = 10, kSpan = 40;  // offsets [-10, 30) from the definition's <k>
  static constexpr int kKinds = 6;
  // [place][head]
  std::vector<std::vector<int64_t>> queries, target_first, target_in_top32;
  std::vector<std::vector<std::array<int64_t, kSpan + 1>>> first_at;  // last bin: outside the span
  // [place]: the first-ranked key when it is not the target, over heads: 0–3 = the target offset
  // of another definition whose key shares 0–3 symbols (in place) with the query's; 4 = another
  // offset near the queried definition; 5 = anywhere else (other definitions, pads)
  std::vector<std::array<int64_t, kKinds>> first_other;
  void merge(const MemoryRanks& o);
};

struct SeedResult {
  uint64_t seed = 0;
  int64_t correct = 0, total = 0;  // dictionary: value tokens; passkey: 1 trial
  double accuracy = 0.0;
  int64_t prefix_tokens = 0;      // tokens ingested into memory
  int64_t prompt_tokens = 0;      // prefix + the scored call
  double ingest_seconds = 0.0;
  size_t memory_bytes = 0;
  // dictionary only: correct/total by the value's place in its entry (v1 … v4): v1 needs the
  // lookup itself, v2–v4 can also lean on the values already given
  std::vector<int64_t> correct_by_place, total_by_place;
  // dictionary only: the same by the slot of the queried definition in its window of the prefix
  // (0 = first of the window): a lookup learned on few definitions per window fails past them
  std::vector<int64_t> correct_by_slot, total_by_slot;
  // dictionary only: by slot and value place together, at slot * dict::kValueLength + place (a slot's
  // first value can fail where its other values do not: docs/tasks.md, session 23)
  std::vector<int64_t> correct_by_slot_place, total_by_slot_place;
  // dictionary only: the same for definitions in the prefix's first window (index 0, it opens with
  // BOS) and in later windows (index 1)
  std::vector<int64_t> correct_by_window, total_by_window;
  MemoryRanks ranks;  // dictionary with ranks = true only
  // passkey only
  int key = 0;
  double depth = 0.0;
  std::vector<int> answer, generated;
};

// Dictionary lookup: N = tokens of definitions in memory, then one query window of W tokens
// (W = max_position_embeddings; 25 queries for W = 256). Accuracy = fraction of the queried value
// tokens whose greedy argmax prediction, given the true prefix (teacher forcing), is exact.
// symbols < 64: keys and values from the first `symbols` only (to probe a curriculum's stages).
SeedResult eval_dictionary(Weights& w, int64_t tokens, uint64_t seed, int top_k, const IngestProgress& progress,
                           int symbols = 64, bool ranks = false);

// Passkey: the LongLLaMA prompt of `tokens` tokens (<= tokens, as close as the text allows), the
// key at `depth` (< 0: uniform random from the seed); the last min(T, W - answer - 1) tokens (the
// question included) run in one call with a local cache after the rest went to memory; then the
// answer's length of tokens is generated greedily. Correct iff all of them equal the key's tokens.
SeedResult eval_passkey(Weights& w, const Tokenizer& tok, int64_t tokens, uint64_t seed, double depth, int top_k,
                        const IngestProgress& progress);

}  // namespace ll::tasks
