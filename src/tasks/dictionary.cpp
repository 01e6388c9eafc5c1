#include "tasks/dictionary.h"

#include <algorithm>
#include <unordered_set>

#include "util/error.h"

namespace ll::tasks {

using namespace dict;

DictionaryOptions DictionaryOptions::from_json(const nlohmann::json& o, const std::string& where) {
  train::check_task_options(o, {"length", "window", "min_definitions", "max_definitions", "definitions", "queries",
                                "symbols", "unique_queries", "local_definitions", "random_offset", "bos", "near_keys", "max_gap", "key_symbols",
                                "mark_first", "first_value_weight", "attend_values"},
                            where);
  DictionaryOptions d;
  train::task_option(o, "length", d.length, where, 2);
  train::task_option(o, "window", d.window, where, kEntry + 1);
  int both = -1;
  train::task_option(o, "definitions", both, where, 0);
  if (both >= 0) d.min_definitions = d.max_definitions = both;
  train::task_option(o, "min_definitions", d.min_definitions, where, 0);
  train::task_option(o, "max_definitions", d.max_definitions, where, 0);
  train::task_option(o, "local_definitions", d.local_definitions, where, 0);
  if (d.local_definitions > (d.window - 1) / kEntry - 1)
    throw Error(where + ": task option 'local_definitions' leaves no room for a query in the window");
  train::task_option(o, "queries", d.queries, where, 1);
  train::task_option(o, "symbols", d.symbols, where, 2);
  int unique = 0;
  train::task_option(o, "unique_queries", unique, where, 0);
  d.unique_queries = unique != 0;
  int offset = 0;
  train::task_option(o, "random_offset", offset, where, 0);
  d.random_offset = offset != 0;
  int bos = 1;
  train::task_option(o, "bos", bos, where, 0);
  d.bos = bos != 0;
  train::task_option(o, "near_keys", d.near_keys, where, 0);
  train::task_option(o, "max_gap", d.max_gap, where, 0);
  train::task_option(o, "key_symbols", d.key_symbols, where, 1);
  if (d.key_symbols > kKeyLength)
    throw Error(where + ": task option 'key_symbols' must be <= " + std::to_string(kKeyLength));
  if (d.key_symbols < kKeyLength && d.local_definitions > 0)
    throw Error(where + ": task option 'key_symbols' < " + std::to_string(kKeyLength) +
                " does not go with 'local_definitions'");
  train::task_option(o, "mark_first", d.mark_first, where, 0);
  train::task_option(o, "first_value_weight", d.first_value_weight, where, 1);
  if (d.first_value_weight > 255)
    throw Error(where + ": task option 'first_value_weight' must be <= 255 (a loss weight stored in 8 bits)");
  train::task_option(o, "attend_values", d.attend_values, where, 0);
  if (d.attend_values > kValueLength)
    throw Error(where + ": task option 'attend_values' must be <= " + std::to_string(kValueLength));
  if (d.mark_first > 100) throw Error(where + ": task option 'mark_first' is a percentage, must be <= 100");
  if (d.near_keys > 100) throw Error(where + ": task option 'near_keys' is a percentage, must be <= 100");
  if (d.symbols > kSymbols) throw Error(where + ": task option 'symbols' must be <= " + std::to_string(kSymbols));
  if (d.length % d.window != 0 || d.length < 2 * d.window)
    throw Error(where + ": task option 'length' must be a multiple of 'window' and at least 2 windows");
  if (d.max_definitions == 0 && d.local_definitions == 0)
    throw Error(where + ": a document needs definitions (max_definitions or local_definitions > 0)");
  if (d.min_definitions > d.max_definitions)
    throw Error(where + ": task option 'min_definitions' must be <= 'max_definitions'");
  return d;
}

namespace {

uint32_t key_code(const int* k, int symbols) {
  uint32_t c = 0;
  for (int i = 0; i < kKeyLength; ++i) c = c * uint32_t(symbols) + uint32_t(k[i] - kFirstSymbol);
  return c;
}

// Appends a definition with a fresh key (distinct from those in `used`) and random values.
// With `near` (the start of an earlier definition in `out`), the key is that definition's key
// with one symbol changed, when such a key is still free (else a random one). Only the last
// `varying` key symbols are drawn; the ones before them are the first symbol. With `mark_first`
// the <v> mark goes before the key instead of after it.
template <class Set>
void put_definition(std::vector<int>& out, Set& used, int symbols, train::Rng& rng, int64_t near = -1,
                    int varying = kKeyLength, bool mark_first = false) {
  const int fixed = kKeyLength - varying;
  int k[kKeyLength];
  for (int i = 0; i < fixed; ++i) k[i] = kFirstSymbol;
  bool found = false;
  if (near >= 0) {
    for (int attempt = 0; attempt < 8 && !found; ++attempt) {
      const size_t key = size_t(near) + (out[size_t(near) + 1] == kValueMark ? 2 : 1);
      for (int i = 0; i < kKeyLength; ++i) k[i] = out[key + size_t(i)];
      const int at = fixed + int(rng.below(uint32_t(varying)));
      const int old = k[at] - kFirstSymbol;
      k[at] = kFirstSymbol + (old + 1 + int(rng.below(uint32_t(symbols - 1)))) % symbols;  // != old
      found = used.insert(key_code(k, symbols)).second;
    }
  }
  while (!found) {
    for (int i = fixed; i < kKeyLength; ++i) k[i] = kFirstSymbol + int(rng.below(uint32_t(symbols)));
    found = used.insert(key_code(k, symbols)).second;
  }
  out.push_back(kKeyMark);
  if (mark_first) out.push_back(kValueMark);
  out.insert(out.end(), k, k + kKeyLength);
  if (!mark_first) out.push_back(kValueMark);
  for (int i = 0; i < kValueLength; ++i) out.push_back(kFirstSymbol + int(rng.below(uint32_t(symbols))));
}

// Appends the query of the definition starting at def[0] (its `<k>`); marks its values scored.
void put_query(std::vector<int>& out, std::vector<uint8_t>& scored, const int* def) {
  out.push_back(kQueryMark);
  scored.push_back(0);
  for (int i = 1; i < kEntry; ++i) {
    out.push_back(def[i]);
    scored.push_back(i > kKeyLength + 1);
  }
}

// Picks n definition indices in [0, count): a random permutation, repeated when n > count.
std::vector<int64_t> pick(int64_t count, int n, train::Rng& rng) {
  std::vector<int64_t> r;
  if (count <= 4 * int64_t(n)) {
    std::vector<int64_t> perm(count);
    for (int64_t i = 0; i < count; ++i) perm[i] = i;
    while (int(r.size()) < n) {
      for (int64_t i = count - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(uint32_t(i + 1))]);
      for (int64_t i = 0; i < count && int(r.size()) < n; ++i) r.push_back(perm[i]);
    }
  } else {
    std::unordered_set<int64_t> seen;
    while (int(r.size()) < n) {
      const int64_t i = int64_t(rng.next() % uint64_t(count));
      if (seen.insert(i).second) r.push_back(i);
    }
  }
  return r;
}

// Fills tokens (and scored) with a query window of `window` tokens ending in EOS; returns the
// indices (into def_starts) of the definitions asked about, in order.
// With `local` > 0, that many new definitions open the window (keys distinct from `used`) and the
// queries are drawn from the earlier and these definitions together.
std::vector<int64_t> query_window(std::vector<int>& tokens, std::vector<uint8_t>& scored, const std::vector<int>& defs_tokens,
                  std::vector<int64_t> def_starts, int window, int queries, train::Rng& rng, int local = 0,
                  std::unordered_set<uint32_t>* used = nullptr, int symbols = kSymbols) {
  const size_t begin = tokens.size();
  std::vector<int> all;
  const std::vector<int>* defs = &defs_tokens;
  if (local > 0) {
    all = defs_tokens;
    for (int i = 0; i < local; ++i) {
      def_starts.push_back(int64_t(all.size()));
      const size_t at = all.size();
      put_definition(all, *used, symbols, rng);
      tokens.insert(tokens.end(), all.begin() + at, all.end());
      scored.insert(scored.end(), kEntry, 0);
    }
    defs = &all;
  }
  const int fit = std::min(queries, int(window - 1 - (tokens.size() - begin)) / kEntry);
  if (def_starts.empty()) throw Error("dictionary: a document without definitions");
  std::vector<int64_t> picked = pick(int64_t(def_starts.size()), fit, rng);
  for (int64_t i : picked) put_query(tokens, scored, &(*defs)[def_starts[i]]);
  while (tokens.size() - begin < size_t(window - 1)) {
    tokens.push_back(kPad);
    scored.push_back(0);
  }
  tokens.push_back(kEos);
  scored.push_back(0);
  return picked;
}

}  // namespace

train::Document dictionary_document(const DictionaryOptions& o, train::Rng& rng) {
  train::Document d;
  std::vector<int>& t = d.tokens;
  std::vector<int64_t> starts;
  std::unordered_set<uint32_t> used;
  const int def_windows = o.length / o.window - 1;
  int64_t keys = 1;  // distinct keys there are; a document never asks for more
  for (int i = 0; i < o.key_symbols; ++i) keys *= o.symbols;
  for (int w = 0; w < def_windows; ++w) {
    const size_t begin = t.size();
    if (w == 0 && o.bos) t.push_back(kBos);
    const int fit = int(std::min<int64_t>(int64_t(o.window - (t.size() - begin)) / kEntry, keys - int64_t(used.size())));
    const int lo = std::min(o.min_definitions, fit), hi = std::min(o.max_definitions, fit);
    const int n = lo + int(rng.below(uint32_t(hi - lo + 1)));
    int free = int(o.window - (t.size() - begin)) - n * kEntry;
    std::vector<int> gaps(size_t(n), 0);
    if (o.max_gap > 0)
      for (int& g : gaps) {
        g = std::min(free, int(rng.below(uint32_t(o.max_gap + 1))));
        free -= g;
      }
    if (o.random_offset)  // the window's free space goes first, in a random amount
      t.insert(t.end(), size_t(rng.below(uint32_t(free + 1))), kPad);
    for (int i = 0; i < n; ++i) {
      int64_t near = -1;
      if (o.near_keys > 0 && !starts.empty() && int(rng.below(100)) < o.near_keys)
        near = starts[rng.below(uint32_t(starts.size()))];
      starts.push_back(int64_t(t.size()));
      const bool mark_first = o.mark_first > 0 && int(rng.below(100)) < o.mark_first;
      put_definition(t, used, o.symbols, rng, near, o.key_symbols, mark_first);
      t.insert(t.end(), size_t(gaps[size_t(i)]), kPad);
    }
    t.resize(begin + o.window, kPad);
  }
  d.loss.assign(t.size(), 0);
  const std::vector<int> defs = t;
  const int queries =
      o.unique_queries ? std::min<int>(o.queries, int(starts.size()) + o.local_definitions) : o.queries;
  const size_t begin = t.size();
  const std::vector<int64_t> picked =
      query_window(t, d.loss, defs, starts, o.window, queries, rng, o.local_definitions, &used, o.symbols);
  // Attention targets: each queried value's key is the same value in its definition (the token
  // whose preceding tokens are the key, as an induction head reads it). Local definitions open the
  // query window, after the earlier ones.
  d.attend.assign(t.size(), -1);
  const size_t first_query = begin + size_t(o.local_definitions) * kEntry;
  for (size_t q = 0; q < picked.size(); ++q) {
    const int64_t i = picked[q];
    const int64_t def = i < int64_t(starts.size()) ? starts[size_t(i)]
                                                   : int64_t(begin) + (i - int64_t(starts.size())) * kEntry;
    for (int v = kEntry - kValueLength; v < kEntry - kValueLength + o.attend_values; ++v)
      d.attend[first_query + q * kEntry + size_t(v)] = int32_t(def + v);
  }
  if (o.first_value_weight != 1)  // a scored token after an unscored one is a v1
    for (size_t i = d.loss.size() - 1; i > 0; --i)
      if (d.loss[i] && !d.loss[i - 1]) d.loss[i] = uint8_t(o.first_value_weight);
  return d;
}

DictionaryEval dictionary_eval(int64_t prefix_tokens, uint64_t seed, int window, int symbols) {
  if (window <= kEntry + 1) throw Error("dictionary: window must be > " + std::to_string(kEntry + 1));
  if (symbols < 2 || symbols > kSymbols)
    throw Error("dictionary: symbols must be in [2, " + std::to_string(kSymbols) + "], got " + std::to_string(symbols));
  DictionaryEval e;
  train::Rng rng(train::mix_seed(seed, 0x64696374ull));
  std::vector<int>& t = e.prefix;
  t.reserve(size_t(prefix_tokens));
  std::vector<int64_t> starts;
  std::unordered_set<uint32_t> used;
  const int64_t max_defs = int64_t(symbols) * symbols * symbols * symbols / 2;
  for (int64_t begin = 0; begin < prefix_tokens; begin += window) {
    const int64_t end = std::min(prefix_tokens, begin + window);
    if (begin == 0) t.push_back(kBos);
    while (int64_t(t.size()) + kEntry <= end) {
      if (int64_t(starts.size()) >= max_defs)
        throw Error("dictionary: --tokens " + std::to_string(prefix_tokens) + " needs more distinct keys than " +
                    std::to_string(symbols) + " symbols give (at most " + std::to_string(max_defs) + " definitions)");
      starts.push_back(int64_t(t.size()));
      put_definition(t, used, symbols, rng);
    }
    t.resize(size_t(end), kPad);
  }
  if (starts.empty())
    throw Error("dictionary: --tokens " + std::to_string(prefix_tokens) + " holds no definition (need >= " +
                std::to_string(kEntry + 1) + ")");
  e.definitions = int64_t(starts.size());
  for (int64_t i : query_window(e.queries, e.scored, e.prefix, starts, window, 1 << 30, rng)) {
    int slot = 0;  // definitions before this one in its window
    while (slot < i && starts[size_t(i - slot - 1)] / window == starts[size_t(i)] / window) ++slot;
    e.query_slot.push_back(slot);
    e.query_first_window.push_back(starts[size_t(i)] < window);
    e.query_definition.push_back(starts[size_t(i)]);
  }
  e.definition_starts = std::move(starts);
  return e;
}

Score score_greedy(const std::vector<float>& logits, int vocab, const std::vector<int>& tokens,
                   const std::vector<uint8_t>& scored) {
  if (logits.size() != tokens.size() * size_t(vocab) || scored.size() != tokens.size())
    throw Error("score_greedy: logits, tokens and scored sizes do not match");
  if (!scored.empty() && scored[0]) throw Error("score_greedy: the first token cannot be scored");
  Score s;
  for (size_t i = 1; i < tokens.size(); ++i) {
    if (!scored[i]) continue;
    const float* row = &logits[(i - 1) * size_t(vocab)];
    const int best = int(std::max_element(row, row + vocab) - row);
    ++s.total;
    s.correct += best == tokens[i];
  }
  return s;
}

}  // namespace ll::tasks
