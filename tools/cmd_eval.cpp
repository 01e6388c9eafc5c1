// eval dictionary|passkey: long-memory evaluations (src/tasks/eval.h, docs/tasks.md). Builds the
// memory from the long prefix of each seed's document with progress on stderr, scores the part in
// the local window, and prints accuracy with its min/max over seeds (one JSON object with --json).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli.h"
#include "perf/machine.h"
#include "tasks/dictionary.h"
#include "tasks/eval.h"
#include "util/error.h"

namespace cli {

namespace {

struct EvalArgs {
  std::string task, model, tokenizer, seeds = "1";
  LoadFlags load;
  int64_t tokens = 0;
  int top_k = 0, threads = 0, symbols = 64;
  double depth = -1.0;
  bool json = false, ranks = false;
};

std::vector<uint64_t> parse_seeds(const std::string& s) {
  std::vector<uint64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    try {
      size_t used = 0;
      const unsigned long long v = std::stoull(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (const std::exception&) {
      throw ll::Error("--seeds: '" + item + "' is not a non-negative integer (give a comma-separated list)");
    }
  }
  if (out.empty()) throw ll::Error("--seeds: no seed given");
  return out;
}

int run_eval(const EvalArgs& a) {
  if (a.tokens <= 0) throw ll::Error("eval: --tokens must be > 0");
  if (a.depth > 1.0) throw ll::Error("eval: --depth must be in [0, 1]");
  if (a.top_k < 0) throw ll::Error("eval: --top-k must be >= 0");
  const std::vector<uint64_t> seeds = parse_seeds(a.seeds);
  if (a.threads > 0) omp_set_num_threads(a.threads);
  ll::Weights w = load_model(a.model, a.load);
  std::unique_ptr<ll::Tokenizer> tok;
  if (a.task == "passkey") tok = std::make_unique<ll::Tokenizer>(open_tokenizer(w, a.tokenizer));

  std::vector<ll::tasks::SeedResult> results;
  for (uint64_t seed : seeds) {
    ProgressLine progress(a.task + " seed " + std::to_string(seed) + " memory");
    auto cb = [&](int64_t done, int64_t total) { progress(done, total); };
    results.push_back(a.task == "dictionary" ? ll::tasks::eval_dictionary(w, a.tokens, seed, a.top_k, cb, a.symbols, a.ranks)
                                             : ll::tasks::eval_passkey(w, *tok, a.tokens, seed, a.depth, a.top_k, cb));
    const auto& r = results.back();
    std::fprintf(stderr, "%s seed %llu: %lld/%lld correct%s\n", a.task.c_str(), (unsigned long long)seed,
                 (long long)r.correct, (long long)r.total,
                 a.task == "passkey" ? (" (key " + std::to_string(r.key) + ", answered \"" + tok->decode(r.generated) +
                                        "\", depth " + std::to_string(r.depth) + ")").c_str()
                                     : "");
  }
  double sum = 0, mn = 1, mx = 0, ingest_s = 0;
  int64_t ingested = 0, correct = 0, total = 0;
  size_t mem_bytes = 0;
  for (const auto& r : results) {
    sum += r.accuracy;
    mn = std::min(mn, r.accuracy);
    mx = std::max(mx, r.accuracy);
    ingest_s += r.ingest_seconds;
    ingested += r.prefix_tokens;
    correct += r.correct;
    total += r.total;
    mem_bytes = std::max(mem_bytes, r.memory_bytes);
  }
  // dictionary: accuracy by the value's place in its entry and by the definition's slot in its
  // window, over all seeds
  const auto merged = [&](std::vector<int64_t> ll::tasks::SeedResult::*correct_of,
                          std::vector<int64_t> ll::tasks::SeedResult::*total_of) {
    std::vector<int64_t> c, t;
    for (const auto& r : results)
      for (size_t i = 0; i < (r.*total_of).size(); ++i) {
        if (i >= t.size()) {
          t.resize(i + 1, 0);
          c.resize(i + 1, 0);
        }
        t[i] += (r.*total_of)[i];
        c[i] += (r.*correct_of)[i];
      }
    std::vector<double> acc;
    for (size_t i = 0; i < t.size(); ++i) acc.push_back(t[i] ? double(c[i]) / double(t[i]) : 0.0);
    return std::make_pair(acc, t);
  };
  const auto [by_place, place_total] = merged(&ll::tasks::SeedResult::correct_by_place, &ll::tasks::SeedResult::total_by_place);
  const auto [by_slot, slot_total] = merged(&ll::tasks::SeedResult::correct_by_slot, &ll::tasks::SeedResult::total_by_slot);
  const auto [by_slot_place, slot_place_total] =
      merged(&ll::tasks::SeedResult::correct_by_slot_place, &ll::tasks::SeedResult::total_by_slot_place);
  const auto [by_window, window_total] =
      merged(&ll::tasks::SeedResult::correct_by_window, &ll::tasks::SeedResult::total_by_window);
  ll::tasks::MemoryRanks ranks;
  for (const auto& r : results) ranks.merge(r.ranks);
  // --ranks, per value place: fractions over queries and heads, then per head (its target offset
  // from the queried definition's <k>: the most frequent place of its first-ranked key)
  nlohmann::json ranks_json = nlohmann::json::array();
  using MR = ll::tasks::MemoryRanks;
  for (size_t p = 0; p < ranks.queries.size(); ++p) {
    int64_t q = 0, t1 = 0, t32 = 0;
    nlohmann::json heads = nlohmann::json::array();
    for (size_t h = 0; h < ranks.queries[p].size(); ++h) {
      const int64_t n = ranks.queries[p][h];
      q += n;
      t1 += ranks.target_first[p][h];
      t32 += ranks.target_in_top32[p][h];
      const auto& hist = ranks.first_at[p][h];
      const int mode = int(std::max_element(hist.begin(), hist.end() - 1) - hist.begin());
      heads.push_back({{"target_offset", mode - MR::kBefore},
                       {"target_first", n ? double(ranks.target_first[p][h]) / double(n) : 0.0},
                       {"target_in_top32", n ? double(ranks.target_in_top32[p][h]) / double(n) : 0.0},
                       {"first_outside_definition_span", n ? double(hist[MR::kSpan]) / double(n) : 0.0}});
    }
    const auto& o = ranks.first_other[p];
    ranks_json.push_back({{"place", p + 1},
                          {"queries_x_heads", q},
                          {"target_first", q ? double(t1) / double(q) : 0.0},
                          {"target_in_top32", q ? double(t32) / double(q) : 0.0},
                          {"first_when_not_target",
                           {{"target_of_a_definition_sharing_0_key_symbols", o[0]},
                            {"sharing_1", o[1]},
                            {"sharing_2", o[2]},
                            {"sharing_3", o[3]},
                            {"near_the_queried_definition", o[4]},
                            {"elsewhere", o[5]}}},
                          {"heads", heads}});
  }
  const double acc = sum / double(results.size());
  const double rate = ingest_s > 0 ? double(ingested) / ingest_s : 0.0;
  const size_t rss = ll::peak_rss_bytes();
  if (a.json) {
    nlohmann::json per = nlohmann::json::array();
    for (const auto& r : results) {
      nlohmann::json j = {{"seed", r.seed},           {"accuracy", r.accuracy},
                          {"correct", r.correct},     {"total", r.total},
                          {"prefix_tokens", r.prefix_tokens}, {"prompt_tokens", r.prompt_tokens},
                          {"ingest_seconds", r.ingest_seconds}};
      if (a.task == "passkey") {
        j["key"] = r.key;
        j["depth"] = r.depth;
        j["answer"] = r.answer;
        j["generated"] = r.generated;
      }
      per.push_back(j);
    }
    nlohmann::json out = {{"task", a.task},
                          {"model", a.model},
                          {"tokens", a.tokens},
                          {"seeds", seeds},
                          {"top_k", a.top_k},
                          {"accuracy", acc},
                          {"min", mn},
                          {"max", mx},
                          {"correct", correct},
                          {"total", total},
                          {"scoring", a.task == "dictionary"
                                          ? "fraction of queried value tokens whose greedy argmax, given the true prefix, is exact (mean over seeds)"
                                          : "fraction of seeds whose greedily generated answer tokens all equal the key's"},
                          {"ingest_tokens", ingested},
                          {"ingest_seconds", ingest_s},
                          {"ingest_tokens_per_s", rate},
                          {"memory_bytes", mem_bytes},
                          {"peak_rss_bytes", rss},
                          {"threads", omp_get_max_threads()},
                          {"per_seed", per}};
    if (a.task == "dictionary") {
      out["symbols"] = a.symbols;
      out["accuracy_by_value_place"] = by_place;
      out["accuracy_by_definition_slot"] = by_slot;
      out["values_by_definition_slot"] = slot_total;
      // [slot][v1 … v4]
      nlohmann::json slot_place = nlohmann::json::array();
      const size_t nv = size_t(ll::tasks::dict::kValueLength);
      for (size_t i = 0; i < by_slot_place.size(); i += nv)
        slot_place.push_back(std::vector<double>(by_slot_place.begin() + long(i),
                                                 by_slot_place.begin() + long(std::min(i + nv, by_slot_place.size()))));
      out["accuracy_by_definition_slot_and_value_place"] = slot_place;
      // [first window, later windows]; a side with no queries reads 0 with 0 values
      out["accuracy_by_definition_window"] = by_window;
      out["values_by_definition_window"] = window_total;
      if (a.ranks) out["memory_ranks"] = ranks_json;
    }
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("%s: %lld tokens, %zu seed(s), top-k %s: accuracy %.4f (min %.4f, max %.4f)\n", a.task.c_str(),
                (long long)a.tokens, seeds.size(), a.top_k ? std::to_string(a.top_k).c_str() : "dense", acc, mn, mx);
    if (!by_place.empty()) {
      std::printf("by value place (all seeds):");
      for (size_t i = 0; i < by_place.size(); ++i) std::printf(" v%zu %.3f", i + 1, by_place[i]);
      std::printf("\n");
    }
    if (!by_slot.empty()) {  // groups of 5 slots (a window of 256 holds 25 definitions)
      std::printf("by definition slot in its window (all seeds):");
      for (size_t g = 0; g < by_slot.size(); g += 5) {
        int64_t c = 0, t = 0;
        for (size_t i = g; i < std::min(by_slot.size(), g + 5); ++i) {
          t += slot_total[i];
          c += int64_t(std::llround(by_slot[i] * double(slot_total[i])));
        }
        std::printf(" %zu-%zu %.3f", g, std::min(by_slot.size(), g + 5) - 1, t ? double(c) / double(t) : 0.0);
      }
      std::printf("\n");
    }
    if (!by_window.empty()) {
      std::printf("by definition window (all seeds): first %.3f (%lld values)", by_window[0], (long long)window_total[0]);
      if (by_window.size() > 1)
        std::printf(", later %.3f (%lld values)", by_window[1], (long long)window_total[1]);
      std::printf("\n");
    }
    for (const auto& pr : ranks_json) {
      const auto& o = pr["first_when_not_target"];
      std::printf("memory ranks v%d: target first %.3f, in top 32 %.3f (targets", pr["place"].get<int>(),
                  pr["target_first"].get<double>(), pr["target_in_top32"].get<double>());
      for (const auto& h : pr["heads"])
        std::printf(" %+d:%.2f", h["target_offset"].get<int>(), h["target_first"].get<double>());
      std::printf("); first when not the target: another definition's target sharing 0/1/2/3 key symbols "
                  "%lld/%lld/%lld/%lld, near %lld, elsewhere %lld\n",
                  o["target_of_a_definition_sharing_0_key_symbols"].get<long long>(), o["sharing_1"].get<long long>(),
                  o["sharing_2"].get<long long>(), o["sharing_3"].get<long long>(),
                  o["near_the_queried_definition"].get<long long>(), o["elsewhere"].get<long long>());
    }
    std::printf("ingest: %lld tokens in %.2f s (%.0f tokens/s), memory %.1f MB, peak RSS %.1f MB\n",
                (long long)ingested, ingest_s, rate, mem_bytes / 1e6, rss / 1e6);
  }
  return 0;
}

}  // namespace

void add_eval_commands(CLI::App& app, Commands& out) {
  auto* e = app.add_subcommand("eval", "Long-memory evaluations: dictionary lookup, passkey retrieval");
  e->require_subcommand(1);
  for (const char* task : {"dictionary", "passkey"}) {
    auto a = std::make_shared<EvalArgs>();
    a->task = task;
    auto* c = e->add_subcommand(task, std::string(task) == "dictionary"
                                          ? "Dictionary lookup (FoT appendix): N tokens of definitions in memory, then queries"
                                          : "Passkey retrieval with the LongLLaMA prompt of N tokens");
    c->add_option("-m,--model", a->model, "Model directory or .gguf file")->required();
    c->add_option("--tokens", a->tokens, "Prompt length in tokens (dictionary: tokens of definitions in memory)")
        ->required();
    c->add_option("--seeds", a->seeds, "Comma-separated seeds")->capture_default_str();
    c->add_option("--top-k", a->top_k, "Memory attention to the top k memory keys (0: dense, all of memory)")
        ->capture_default_str();
    if (std::string(task) == "dictionary")
      c->add_option("--symbols", a->symbols, "Draw keys and values from the first N of the 64 symbols (curriculum stages)")
          ->check(CLI::Range(2, 64))
          ->capture_default_str();
    if (std::string(task) == "dictionary")
      c->add_flag("--ranks", a->ranks,
                  "Also rank the memory keys for each query of the first memory layer (where the right definition "
                  "lands, what beats it)");
    if (std::string(task) == "passkey") {
      c->add_option("--depth", a->depth, "Depth of the key line in [0, 1] (default: random per seed)");
      c->add_option("--tokenizer", a->tokenizer, "tokenizer.model (default: the model's)");
    }
    c->add_option("-t,--threads", a->threads, "Threads (default: all cores)");
    c->add_flag("--json", a->json, "Print one JSON object");
    a->load.add(c);
    out.push_back({c, [a] { return run_eval(*a); }});
  }
}

}  // namespace cli
