#pragma once
// The dictionary-lookup task of the Focused Transformer paper (appendix): a vocabulary of 64
// symbols plus the marks <k>, <v>, <q>; a definition is `<k> k1 k2 k3 k4 <v> v1 v2 v3 v4`, a query
// `<q> k1 k2 k3 k4 <v> v1 v2 v3 v4` repeats a definition and only its values are scored.
//
// Token ids (vocab_size 70): 0 pad/unk, 1 BOS, 2 EOS, 3 <k>, 4 <v>, 5 <q>, 6..69 the symbols.
//
// Layout. Every window of `window` tokens holds whole entries, padded with 0 at its end:
//  - training document (`length` tokens, default 512 = 2 windows): BOS, then definition windows
//    (all but the last window), then one query window ending in EOS. Only the last window holds
//    queries, so with local context = window the queries reach their definitions through memory
//    only (crossbatch positives in training, the memory at inference). Loss only on v1..v4 of the
//    queries.
//  - evaluation: a prefix of N tokens of definitions laid out the same way (BOS first, windows of
//    whole definitions) followed by one query window of `window` tokens (25 queries for 256),
//    which is scored.
// Keys of the definitions of one document (or one evaluation prefix) are distinct; queries ask
// about definitions drawn uniformly (without repetition while possible) from the whole prefix.
#include <cstdint>
#include <string>
#include <vector>

#include "train/tasks.h"

namespace ll::tasks {

namespace dict {
constexpr int kPad = 0, kBos = 1, kEos = 2, kKeyMark = 3, kValueMark = 4, kQueryMark = 5, kFirstSymbol = 6;
constexpr int kSymbols = 64;
constexpr int kVocab = kFirstSymbol + kSymbols;  // 70
constexpr int kKeyLength = 4, kValueLength = 4;
constexpr int kEntry = 2 + kKeyLength + kValueLength;  // 10 tokens per definition or query
}  // namespace dict

struct DictionaryOptions {
  int length = 512;  // tokens per training document (a multiple of window, >= 2 windows)
  int window = 256;  // the local context: entries never straddle a window
  // Definitions per definition window, drawn uniformly in [min_definitions, max_definitions]
  // (clamped to what fits); fewer definitions make the lookup easier (a curriculum).
  int min_definitions = 1000000, max_definitions = 1000000;  // default: as many as fit
  int queries = 1000000;  // queries in the query window (clamped to what fits)
  // Definitions that open the query window itself: their queries are answerable locally, a
  // stepping stone for learning the lookup before it has to go through memory.
  int local_definitions = 0;
  bool unique_queries = false;  // at most one query per definition (else definitions repeat)
  // Pads of a random length (up to the window's free space) open each definition window, so a
  // few definitions still land anywhere in it. Without it, a curriculum of few definitions only
  // ever fills the start of the window and the lookup learned there does not carry over to later
  // positions (docs/tasks.md, session 4).
  bool random_offset = false;
  int symbols = dict::kSymbols;  // symbols used (<= 64): fewer make a smaller key space
  // BOS opens the document. Without it the first definition window looks like every later window
  // of a long evaluation prefix (which has BOS only in its first window): a model that only ever
  // saw definition windows opened by BOS reads the later ones badly (docs/tasks.md, session 5).
  bool bos = true;
  // Hard negatives: each definition after the first of a document takes, with this probability
  // (in percent), the key of an earlier definition of the document with one symbol changed, and
  // its own values. A long evaluation memory holds many keys that share 2-3 symbols with the
  // queried one; random training keys almost never do, so nothing taught the model to tell them
  // apart (docs/tasks.md, session 6).
  int near_keys = 0;
  // Up to this many pads (uniform, as far as the window has room) follow each definition. Without
  // gaps a definition is always followed by the next one at a fixed offset, and the lookup the
  // curriculum found reads a definition's values from the tokens after it (the next definition's
  // <k> … <v>), where its key symbols are 6–14 tokens back (docs/tasks.md, session 6).
  int max_gap = 0;
  // How many key symbols vary (1-4; the earlier ones are all the first symbol): a lookup on a
  // shorter key, a curriculum for the 4-symbol one. Definitions per document are capped by the
  // symbols^key_symbols distinct keys.
  int key_symbols = dict::kKeyLength;
  // A curriculum format: each definition (and so its query) is, with this probability in percent,
  // written `<k> <v> k1 k2 k3 k4 v1 v2 v3 v4`: v1 then follows its key directly, so it is looked up
  // by the tokens just before it, like v2..v4, instead of across the <v> mark, which carries
  // nothing about the key (the lookup that stays weakest: docs/tasks.md, session 12).
  int mark_first = 0;
  // The loss weight of each queried first value v1 (v2..v4 keep 1): v1 is the value looked up by
  // the key alone, and the one that fails first as the memory grows (docs/tasks.md, session 21).
  int first_value_weight = 1;
  // Attention targets (Document::attend, for the training option memory_attention_loss) for the
  // first n values of each query: 4 = all, 1 = v1 only, 0 = none.
  int attend_values = dict::kValueLength;
  static DictionaryOptions from_json(const nlohmann::json& o, const std::string& where);
};

// A training document (tokens with BOS first and EOS last, loss only on queried values).
train::Document dictionary_document(const DictionaryOptions& o, train::Rng& rng);

// An evaluation document: `prefix` goes to memory, `queries` (one window, <= window tokens) is run
// after it in one call; scored[i] says whether predicting queries[i] counts.
struct DictionaryEval {
  std::vector<int> prefix;
  std::vector<int> queries;
  std::vector<uint8_t> scored;
  // per query (entry q starts at queries[q * kEntry]): its definition's slot in its window of the
  // prefix (0 = the window's first definition), for the accuracy by slot
  std::vector<int> query_slot;
  // per query: whether its definition is in the prefix's first window (the one that opens with BOS)
  std::vector<uint8_t> query_first_window;
  // per query: where its definition starts in the prefix (its <k>)
  std::vector<int64_t> query_definition;
  // start of every definition in the prefix, ascending
  std::vector<int64_t> definition_starts;
  int64_t definitions = 0;
};
// symbols < 64 draws keys and values from the first `symbols` only (the curriculum's alphabets).
DictionaryEval dictionary_eval(int64_t prefix_tokens, uint64_t seed, int window = 256, int symbols = dict::kSymbols);

// Greedy scoring of a call's logits: row i of logits [T x vocab] predicts tokens[i + 1]; a scored
// token tokens[i] (i >= 1) counts as correct when argmax(row i - 1) == tokens[i] (ties go to the
// lowest id). tokens[0] must not be scored (its prediction belongs to the previous call).
struct Score {
  int64_t correct = 0, total = 0;
  double accuracy() const { return total ? double(correct) / double(total) : 0.0; }
};
Score score_greedy(const std::vector<float>& logits, int vocab, const std::vector<int>& tokens,
                   const std::vector<uint8_t>& scored);

// The trainer's task "dictionary" (options: the fields of DictionaryOptions).
class DictionaryTask : public train::DocumentSource {
 public:
  DictionaryTask(const nlohmann::json& options, const std::string& where)
      : o_(DictionaryOptions::from_json(options, where)) {}
  train::Document next(train::Rng& rng) const override { return dictionary_document(o_, rng); }
  int vocab_needed() const override { return dict::kVocab; }

 private:
  DictionaryOptions o_;
};

}  // namespace ll::tasks
