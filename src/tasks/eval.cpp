#include "tasks/eval.h"

#include <algorithm>
#include <chrono>

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

}  // namespace

SeedResult eval_dictionary(Weights& w, int64_t tokens, uint64_t seed, int top_k, const IngestProgress& progress,
                           int symbols) {
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
  try {
    logits = s.forward(e.queries, /*use_cache=*/false, LogitsWanted::All);
  } catch (...) {
    w.config.last_context_length = saved;
    throw;
  }
  w.config.last_context_length = saved;
  r.memory_bytes = s.memory_bytes();
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
    if (query < e.query_slot.size()) count(r.correct_by_slot, r.total_by_slot, size_t(e.query_slot[query]), ok);
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
