#include "tasks/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "model/session.h"
#include "tasks/dictionary.h"
#include "tasks/passkey.h"
#include "util/error.h"

namespace ll::tasks {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Sends ids[0, n) to memory: calls of whole windows without a local cache and without logits
// (last_context_length 0 for the duration), so every window goes to memory as the official
// chunking of one long call would send it.
void ingest(Session& s, Weights& w, const int* ids, int64_t n, const IngestProgress& progress) {
  const int saved = w.config.last_context_length;
  w.config.last_context_length = 0;
  const int64_t W = w.config.max_position_embeddings;
  const int64_t block = W * std::max<int64_t>(1, (int64_t(1) << 16) / W);
  if (progress && n > 0) progress(0, n);  // the start: rates count from here, not from building the prompt
  try {
    for (int64_t b = 0; b < n; b += block) {
      const int64_t e = std::min(n, b + block);
      std::vector<int> chunk(ids + b, ids + e);
      s.forward(chunk, /*use_cache=*/false, LogitsWanted::None,
                progress ? ProgressFn([&](int64_t done, int64_t) { progress(b + done, n); }) : ProgressFn());
    }
  } catch (...) {
    w.config.last_context_length = saved;
    throw;
  }
  w.config.last_context_length = saved;
  if (progress && n == 0) progress(0, 0);
}

int argmax(const float* row, int n) { return int(std::max_element(row, row + n) - row); }

// Fills r.ranks from the queries (per head [q][D]) that the first memory layer scored in the
// query window's call against its memory: two full scans in float32 per head (where the first key
// lands; then how many keys beat each head's target).
void rank_memory_keys(const DictionaryEval& e, const KVMemory& mem, const std::vector<std::vector<float>>& queries,
                      MemoryRanks& r) {
  using R = MemoryRanks;
  const int H = mem.heads(), D = mem.head_dim();
  const int places = dict::kValueLength;
  r.queries.assign(places, std::vector<int64_t>(H, 0));
  r.target_first = r.target_in_top32 = r.queries;
  r.first_at.assign(places, std::vector<std::array<int64_t, R::kSpan + 1>>(H, std::array<int64_t, R::kSpan + 1>{}));
  r.first_other.assign(places, {});
  struct Probe {
    int place;
    size_t row;     // the query's token in the query window
    int64_t def;    // the queried definition's <k> in the prefix (= memory index)
    const int* key; // the query's key symbols
  };
  std::vector<Probe> probes;
  for (size_t q = 0; q < e.query_definition.size(); ++q) {
    const size_t at = q * dict::kEntry;  // the query's <q>
    for (int p = 0; p < places; ++p)
      probes.push_back({p, at + 1 + dict::kKeyLength + size_t(p), e.query_definition[q], &e.queries[at + 1]});
  }
  const int64_t n = mem.size();
  constexpr int kBlock = 4096;
  std::vector<float> k(size_t(kBlock) * D), v(size_t(kBlock) * D);
  const auto dot = [D](const float* a, const float* b) {
    float s = 0;
    for (int i = 0; i < D; ++i) s += a[i] * b[i];
    return s;
  };
  const auto is_start = [&](int64_t t) {
    return std::binary_search(e.definition_starts.begin(), e.definition_starts.end(), t);
  };
  for (int h = 0; h < H; ++h) {
    const auto q_of = [&](const Probe& p) { return &queries[size_t(h)][p.row * D]; };
    // Scan 1: the first-ranked key of every probe.
    std::vector<float> best(probes.size(), -INFINITY);
    std::vector<int64_t> best_at(probes.size(), -1);
    for (int64_t b = 0; b < n; b += kBlock) {
      const int m = int(std::min<int64_t>(kBlock, n - b));
      mem.read(h, b, m, k.data(), v.data());
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < probes.size(); ++i)
        for (int j = 0; j < m; ++j) {
          const float s = dot(q_of(probes[i]), &k[size_t(j) * D]);
          if (s > best[i]) {
            best[i] = s;
            best_at[i] = b + j;
          }
        }
    }
    std::vector<std::array<int64_t, R::kSpan + 1>> hist(places, std::array<int64_t, R::kSpan + 1>{});
    for (size_t i = 0; i < probes.size(); ++i) {
      const int64_t off = best_at[i] - probes[i].def + R::kBefore;
      ++hist[size_t(probes[i].place)][off >= 0 && off < R::kSpan ? size_t(off) : size_t(R::kSpan)];
    }
    std::vector<int> target(places);  // per place: this head's most frequent offset, from -kBefore
    for (int p = 0; p < places; ++p)
      target[size_t(p)] = int(std::max_element(hist[size_t(p)].begin(), hist[size_t(p)].end() - 1) - hist[size_t(p)].begin()) -
                          R::kBefore;
    // Scan 2: keys that beat the target (clamped into memory).
    std::vector<float> target_score(probes.size());
    std::vector<int64_t> target_at(probes.size()), above(probes.size(), 0);
    for (size_t i = 0; i < probes.size(); ++i) {
      target_at[i] = std::clamp<int64_t>(probes[i].def + target[size_t(probes[i].place)], 0, n - 1);
      mem.read(h, target_at[i], 1, k.data(), v.data());
      target_score[i] = dot(q_of(probes[i]), k.data());
    }
    for (int64_t b = 0; b < n; b += kBlock) {
      const int m = int(std::min<int64_t>(kBlock, n - b));
      mem.read(h, b, m, k.data(), v.data());
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < probes.size(); ++i)
        for (int j = 0; j < m; ++j)
          if (b + j != target_at[i] && dot(q_of(probes[i]), &k[size_t(j) * D]) >= target_score[i]) ++above[i];
    }
    for (size_t i = 0; i < probes.size(); ++i) {
      const Probe& pr = probes[i];
      const size_t p = size_t(pr.place);
      ++r.queries[p][h];
      r.target_first[p][h] += above[i] == 0;
      r.target_in_top32[p][h] += above[i] < 32;
      const int64_t off = best_at[i] - pr.def + R::kBefore;
      ++r.first_at[p][h][off >= 0 && off < R::kSpan ? size_t(off) : size_t(R::kSpan)];
      if (above[i] == 0) continue;
      const int64_t other = best_at[i] - target[p];  // the definition whose target won, if any
      int kind = off >= 0 && off < R::kSpan ? 4 : 5;
      if (other != pr.def && is_start(other)) {
        int shared = 0;
        for (int j = 0; j < dict::kKeyLength; ++j) shared += e.prefix[size_t(other + 1 + j)] == pr.key[j];
        kind = std::min(shared, 3);
      }
      ++r.first_other[p][size_t(kind)];
    }
  }
}

}  // namespace

void MemoryRanks::merge(const MemoryRanks& o) {
  if (queries.empty()) {
    *this = o;
    return;
  }
  const auto add = [](auto& a, const auto& b) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i)
      for (size_t j = 0; j < a[i].size() && j < b[i].size(); ++j) a[i][j] += b[i][j];
  };
  add(queries, o.queries);
  add(target_first, o.target_first);
  add(target_in_top32, o.target_in_top32);
  add(first_other, o.first_other);
  for (size_t p = 0; p < first_at.size() && p < o.first_at.size(); ++p)
    add(first_at[p], o.first_at[p]);
}

SeedResult eval_dictionary(Weights& w, int64_t tokens, uint64_t seed, int top_k, const IngestProgress& progress,
                           int symbols, bool ranks) {
  const int W = w.config.max_position_embeddings;
  if (w.config.vocab_size < dict::kVocab)
    throw Error("dictionary: the model's vocab_size " + std::to_string(w.config.vocab_size) + " < " +
                std::to_string(dict::kVocab));
  const DictionaryEval e = dictionary_eval(tokens, seed, W, symbols);
  Session s(w);
  s.set_memory_top_k(top_k);
  SeedResult r;
  r.seed = seed;
  const auto t0 = std::chrono::steady_clock::now();
  ingest(s, w, e.prefix.data(), int64_t(e.prefix.size()), progress);
  r.ingest_seconds = seconds_since(t0);
  r.prefix_tokens = int64_t(e.prefix.size());
  r.prompt_tokens = r.prefix_tokens + int64_t(e.queries.size());
  // The query window is one call of <= W tokens with no local cache: one chunk, local attention
  // within it plus the memory.
  const int saved = w.config.last_context_length;
  w.config.last_context_length = W;
  std::vector<float> logits;
  int rank_layer = -1;  // the first memory layer, whose queries are kept for the ranks
  std::vector<std::vector<float>> layer_queries;
  if (ranks)
    s.set_memory_query_observer([&](int layer, int h, const float* q, int count) {
      if (rank_layer >= 0 && layer != rank_layer) return;
      rank_layer = layer;
      if (layer_queries.size() <= size_t(h)) layer_queries.resize(size_t(h) + 1);
      layer_queries[size_t(h)].assign(q, q + size_t(count) * size_t(w.config.head_dim_in(layer)));
    });
  try {
    logits = s.forward(e.queries, /*use_cache=*/false, LogitsWanted::All);
  } catch (...) {
    w.config.last_context_length = saved;
    throw;
  }
  w.config.last_context_length = saved;
  r.memory_bytes = s.memory_bytes();
  if (ranks) {
    if (rank_layer < 0) throw Error("dictionary --ranks: the model has no memory layer");
    rank_memory_keys(e, *s.memory(rank_layer), layer_queries, r.ranks);
  }
  const Score sc = score_greedy(logits, w.config.vocab_size, e.queries, e.scored);
  r.correct = sc.correct;
  r.total = sc.total;
  r.accuracy = sc.accuracy();
  // The same greedy predictions, split by place: a scored token right after an unscored one is v1.
  const int V = w.config.vocab_size;
  const auto count = [](std::vector<int64_t>& correct, std::vector<int64_t>& total, size_t at, bool ok) {
    if (at >= total.size()) {
      total.resize(at + 1, 0);
      correct.resize(at + 1, 0);
    }
    ++total[at];
    correct[at] += ok;
  };
  int place = 0;
  for (size_t i = 1; i < e.queries.size(); ++i) {
    if (!e.scored[i]) continue;
    place = e.scored[i - 1] ? place + 1 : 0;
    const bool ok = argmax(&logits[(i - 1) * size_t(V)], V) == e.queries[i];
    count(r.correct_by_place, r.total_by_place, size_t(place), ok);
    const size_t query = i / dict::kEntry;
    if (query < e.query_slot.size()) {
      count(r.correct_by_slot, r.total_by_slot, size_t(e.query_slot[query]), ok);
      count(r.correct_by_slot_place, r.total_by_slot_place,
            size_t(e.query_slot[query]) * dict::kValueLength + size_t(place), ok);
    }
    if (query < e.query_first_window.size())
      count(r.correct_by_window, r.total_by_window, e.query_first_window[query] ? 0 : 1, ok);
  }
  return r;
}

SeedResult eval_passkey(Weights& w, const Tokenizer& tok, int64_t tokens, uint64_t seed, double depth, int top_k,
                        const IngestProgress& progress) {
  const int W = w.config.max_position_embeddings;
  train::Rng rng(train::mix_seed(seed, 0x706b6579ull));
  const double d = depth >= 0.0 ? depth : rng.uniform();
  const int key = passkey_random_key(rng);
  const PasskeyPrompt p = passkey_prompt(tok, tokens, d, key);
  for (int id : p.ids)
    if (id >= w.config.vocab_size) throw Error("passkey: the tokenizer's ids exceed the model's vocab_size");
  const int64_t T = int64_t(p.ids.size());
  const int64_t tail = std::min<int64_t>(T, W - int64_t(p.answer.size()) - 1);
  if (tail < 16) throw Error("passkey: the model's local context is too short for the question");
  Session s(w);
  s.set_memory_top_k(top_k);
  SeedResult r;
  r.seed = seed;
  r.key = key;
  r.depth = d;
  r.answer = p.answer;
  const auto t0 = std::chrono::steady_clock::now();
  ingest(s, w, p.ids.data(), T - tail, progress);
  r.ingest_seconds = seconds_since(t0);
  r.prefix_tokens = T - tail;
  r.prompt_tokens = T;
  const int saved = w.config.last_context_length;
  w.config.last_context_length = W;  // the tail is one chunk that stays in the local cache
  try {
    std::vector<int> rest(p.ids.end() - tail, p.ids.end());
    std::vector<float> logits = s.forward(rest, /*use_cache=*/true, LogitsWanted::Last);
    for (size_t i = 0; i < p.answer.size(); ++i) {
      const int next = argmax(logits.data(), w.config.vocab_size);
      r.generated.push_back(next);
      if (i + 1 < p.answer.size()) logits = s.forward({next}, true, LogitsWanted::Last);
    }
  } catch (...) {
    w.config.last_context_length = saved;
    throw;
  }
  w.config.last_context_length = saved;
  r.memory_bytes = s.memory_bytes();
  r.total = 1;
  r.correct = r.generated == r.answer;
  r.accuracy = double(r.correct);
  return r;
}

}  // namespace ll::tasks
