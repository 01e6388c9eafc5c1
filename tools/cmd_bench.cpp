// bench: prompt processing and token generation speed, in the spirit of llama-bench, with this
// machine's limits (memory bandwidth, sgemm FLOP/s) measured in the same run.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#include "cli.h"
#include "model/session.h"
#include "ops/quant.h"
#include "perf/machine.h"
#include "util/error.h"

namespace cli {

namespace {

struct BenchArgs {
  std::string model, random_config;
  LoadFlags load;
  int pp = 512, tg = 128, threads = 0, repetitions = 1;
  std::vector<int64_t> memory_tokens;
  std::vector<std::string> mem_types;  // --mem-types: memory storage types compared in one run
  bool json = false;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> ids(n);
  for (int& t : ids) t = int(rng() % uint64_t(vocab));
  return ids;
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// "median (min-max)" of repeated figures, or the one figure.
std::string spread(const std::vector<double>& v, const char* fmt) {
  char m[64], lo[64], hi[64];
  std::snprintf(m, sizeof m, fmt, median(v));
  if (v.size() == 1) return m;
  std::snprintf(lo, sizeof lo, fmt, *std::min_element(v.begin(), v.end()));
  std::snprintf(hi, sizeof hi, fmt, *std::max_element(v.begin(), v.end()));
  return std::string(m) + " (" + lo + " - " + hi + ")";
}

// Decoding n tokens one at a time in each of the sessions, taking turns (a token of the first, a
// token of the second, ...), each token timed on its own between two probe passes, so that tokens
// are compared with the bandwidth of their own moment and the sessions with each other in the
// same moments.
struct DecodeTiming {
  double tokens_per_s = 0.0;       // n / summed token time (probe passes not counted)
  double probe_median = 0.0;       // bytes/s, median of the passes around this session's tokens
  std::vector<double> seconds;     // per token
  std::vector<double> equivalent;  // per token: seconds x mean of the two adjacent passes (bytes)
};

std::vector<DecodeTiming> decode_paired(const std::vector<ll::Session*>& sessions, int n, int vocab,
                                        ll::BandwidthProbe& probe) {
  const std::vector<int> ids = random_ids(n + 1, vocab, 7);
  for (ll::Session* s : sessions) s->forward({ids[0]}, true, ll::LogitsWanted::Last);  // warm-up, not timed
  std::vector<DecodeTiming> out(sessions.size());
  std::vector<std::vector<double>> passes(sessions.size());
  double last = probe.pass();
  for (int i = 1; i <= n; ++i)
    for (size_t k = 0; k < sessions.size(); ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      sessions[k]->forward({ids[i]}, true, ll::LogitsWanted::Last);
      const double dt = seconds_since(t0), next = probe.pass();
      out[k].seconds.push_back(dt);
      out[k].equivalent.push_back(dt * 0.5 * (last + next));
      passes[k].push_back(next);
      last = next;
    }
  for (size_t k = 0; k < sessions.size(); ++k) {
    double total = 0.0;
    for (double dt : out[k].seconds) total += dt;
    out[k].tokens_per_s = n / total;
    out[k].probe_median = median(passes[k]);
  }
  return out;
}

int run_bench(const BenchArgs& a) {
  if (a.model.empty() == a.random_config.empty()) throw ll::Error("bench: give exactly one of -m MODEL or --random CONFIG");
  if (!a.load.mem_type.empty() && !a.mem_types.empty())
    throw ll::Error("bench: give --mem-type or --mem-types, not both");
  std::vector<ll::MemDType> mem_types;  // checked before the model loads
  for (const std::string& t : a.mem_types) mem_types.push_back(ll::parse_mem_dtype(t, "--mem-types"));
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const int threads = omp_get_max_threads();
  std::fprintf(stderr, "bench: loading...\n");
  const auto tl = std::chrono::steady_clock::now();
  ll::Weights w = a.model.empty() ? ll::Weights::random(ll::ModelConfig::from_file(a.random_config),
                                                         a.load.type.empty() ? ll::DType::F16 : ll::parse_weight_type(a.load.type), 1,
                                                         !a.load.no_repack)
                                  : load_model(a.model, a.load);
  if (!a.load.mem_type.empty()) w.config.mem_dtype = ll::parse_mem_dtype(a.load.mem_type, "--mem-type");
  if (mem_types.empty()) mem_types.push_back(w.config.mem_dtype);
  const double load_s = seconds_since(tl);
  const ll::ModelConfig& c = w.config;

  std::fprintf(stderr, "bench: measuring memory bandwidth and sgemm...\n");
  // The bandwidth of these shared VMs jumps between regimes within seconds (BandwidthProbe): decode
  // is compared with probe passes paired with each token; the peak (best of 5 passes before and
  // after the model runs) is reported beside it.
  const double bw_before = ll::measure_read_bandwidth();
  ll::BandwidthProbe probe;
  // sgemm throughput jumps too (other tenants' load): each pp is compared with sgemm passes run
  // right before and after it; the best pass of the whole run is reported beside it.
  double sgemm_peak = ll::measure_sgemm_flops();

  // Bytes one decoded token streams: every matrix except the embedding (one row of it is read).
  const size_t embed_bytes = ll::row_bytes(w.embed.ref.type, w.embed.ref.cols) * size_t(w.embed.ref.rows);
  const size_t decode_bytes = w.matrix_bytes() - (w.lm_head.ref.data == w.embed.ref.data ? 0 : embed_bytes);
  const double matrix_params = double(decode_bytes) / ll::row_bytes(w.main_type(), c.hidden_size) * c.hidden_size;

  // Forward FLOPs of one prompt token: 2 per matrix parameter plus causal attention (q·k and p·v).
  const double attn_flops = 2.0 * 2.0 * c.hidden_size * c.num_hidden_layers * (a.pp / 2.0);
  const double pp_token_flops = 2.0 * matrix_params + attn_flops;
  // Sessions with memory are filled once; every repetition decodes a few more tokens in them.
  // With several --mem-types, each memory size has one session per type, all decoding in turn
  // with the same empty session (a paired comparison of the storage types).
  struct MemoryRun {
    int64_t tokens;
    ll::MemDType type;
    std::unique_ptr<ll::Session> full;
    std::vector<double> tg_rate, extra_s, extra_over_read, probe;
  };
  std::vector<MemoryRun> mem_runs;
  for (int64_t m : a.memory_tokens)
    for (ll::MemDType t : mem_types) {
      if (c.mem_layers.empty()) throw ll::Error("bench: --memory-tokens needs a model with memory layers");
      mem_runs.push_back({m, t, std::make_unique<ll::Session>(w), {}, {}, {}, {}});
      mem_runs.back().full->set_memory_type(t);
      mem_runs.back().full->fill_memory_random(m, 3);
    }
  // Every repetition measures pp, tg and each memory size again; figures are medians over them
  // (these machines switch bandwidth regimes within seconds).
  std::vector<double> pp_rates, pp_fractions, pp_sgemm, tg_rates, tg_fractions, tg_probes;
  for (int rep = 0; rep < a.repetitions; ++rep) {
    if (a.repetitions > 1) std::fprintf(stderr, "bench: repetition %d of %d\n", rep + 1, a.repetitions);
    std::fprintf(stderr, "bench: pp%d...\n", a.pp);
    {
      ll::Session s(w);
      const auto ids = random_ids(a.pp, c.vocab_size, 1);
      const double before = ll::measure_sgemm_flops(2048, 2);
      const auto t0 = std::chrono::steady_clock::now();
      s.forward(ids, true, ll::LogitsWanted::Last);
      pp_rates.push_back(a.pp / seconds_since(t0));
      const double after = ll::measure_sgemm_flops(2048, 2);
      sgemm_peak = std::max({sgemm_peak, before, after});
      pp_sgemm.push_back(0.5 * (before + after));
      pp_fractions.push_back(pp_rates.back() * pp_token_flops / pp_sgemm.back());
    }
    std::fprintf(stderr, "bench: tg%d...\n", a.tg);
    {
      ll::Session s(w);
      const DecodeTiming tg = decode_paired({&s}, a.tg, c.vocab_size, probe)[0];
      tg_rates.push_back(tg.tokens_per_s);
      tg_fractions.push_back(double(decode_bytes) / median(tg.equivalent));
      tg_probes.push_back(tg.probe_median);
    }
    for (size_t g = 0; g < mem_runs.size(); g += mem_types.size()) {
      std::fprintf(stderr, "bench: tg%d with %lld tokens in memory...\n", a.tg, (long long)mem_runs[g].tokens);
      // The empty session and the ones with memory take turns, so each token with memory has a
      // token without it from the same moment: their difference, as the bytes the probe streams
      // in that time, over the bytes of the memory's keys and values is the ratio the target
      // bounds (1 = exactly one read of them at the bandwidth of the moment).
      ll::Session empty(w);
      std::vector<ll::Session*> sessions = {&empty};
      for (size_t k = 0; k < mem_types.size(); ++k) sessions.push_back(mem_runs[g + k].full.get());
      const auto all = decode_paired(sessions, a.tg, c.vocab_size, probe);
      for (size_t k = 0; k < mem_types.size(); ++k) {
        MemoryRun& mr = mem_runs[g + k];
        const DecodeTiming& t = all[k + 1];
        std::vector<double> extra_eq, extra_dt;
        for (int i = 0; i < a.tg; ++i) {
          extra_eq.push_back(t.equivalent[i] - all[0].equivalent[i]);
          extra_dt.push_back(t.seconds[i] - all[0].seconds[i]);
        }
        mr.tg_rate.push_back(t.tokens_per_s);
        mr.extra_s.push_back(median(extra_dt));
        mr.extra_over_read.push_back(median(extra_eq) / double(mr.full->memory_bytes()));
        mr.probe.push_back(t.probe_median);
      }
    }
  }
  const double pp_rate = median(pp_rates), tg_rate = median(tg_rates);
  const double pp_flops = pp_rate * pp_token_flops, sgemm = median(pp_sgemm);
  nlohmann::json mem_rows = nlohmann::json::array();
  for (const MemoryRun& mr : mem_runs)
    mem_rows.push_back({{"memory_tokens", mr.tokens},
                        {"mem_type", ll::mem_dtype_name(mr.type)},
                        {"tg_tokens_per_s", median(mr.tg_rate)},
                        {"memory_bytes", double(mr.full->memory_bytes())},
                        {"extra_seconds_per_token", median(mr.extra_s)},
                        {"probe_median_bytes_per_s", median(mr.probe)},
                        {"extra_over_read_time", median(mr.extra_over_read)},
                        {"samples",
                         {{"tg_tokens_per_s", mr.tg_rate},
                          {"extra_over_read_time", mr.extra_over_read},
                          {"probe_median_bytes_per_s", mr.probe}}}});

  const double bw_after = ll::measure_read_bandwidth();
  const double peak = std::max(bw_before, bw_after), bw = median(tg_probes);
  for (auto& r : mem_rows) {
    const double read_s = r["memory_bytes"].get<double>() / peak;
    r["memory_read_seconds_at_peak_bandwidth"] = read_s;
    r["extra_over_read_time_at_peak"] = r["extra_seconds_per_token"].get<double>() / read_s;
  }
  const size_t rss = ll::peak_rss_bytes();
  const std::string type = ll::dtype_name(w.main_type());
  const double tg_bw = tg_rate * double(decode_bytes);
  nlohmann::json j = {{"model", a.model.empty() ? a.random_config : a.model},
                      {"type", type},
                      {"threads", threads},
                      {"load_seconds", load_s},
                      {"model_bytes", w.matrix_bytes()},
                      {"decode_bytes_per_token", decode_bytes},
                      {"pp", a.pp},
                      {"tg", a.tg},
                      {"pp_tokens_per_s", pp_rate},
                      {"pp_flops_per_s", pp_flops},
                      {"pp_fraction_of_sgemm", median(pp_fractions)},
                      {"pp_fraction_of_peak_sgemm", pp_flops / sgemm_peak},
                      {"tg_tokens_per_s", tg_rate},
                      {"tg_bytes_per_s", tg_bw},
                      {"tg_fraction_of_bandwidth", median(tg_fractions)},
                      {"tg_fraction_of_peak_bandwidth", tg_bw / peak},
                      {"memory", mem_rows},
                      {"peak_rss_bytes", rss},
                      {"bandwidth_bytes_per_s", bw},
                      {"bandwidth_probe_bytes", probe.bytes()},
                      {"bandwidth_peak_bytes_per_s", peak},
                      {"bandwidth_peak_before_after", {bw_before, bw_after}},
                      {"sgemm_flops_per_s", sgemm},
                      {"sgemm_peak_flops_per_s", sgemm_peak},
                      {"repetitions", a.repetitions},
                      {"samples",
                       {{"pp_tokens_per_s", pp_rates},
                        {"pp_fraction_of_sgemm", pp_fractions},
                        {"sgemm_flops_per_s", pp_sgemm},
                        {"tg_tokens_per_s", tg_rates},
                        {"tg_fraction_of_bandwidth", tg_fractions},
                        {"bandwidth_bytes_per_s", tg_probes}}}};
  if (a.json) {
    std::cout << j.dump(2) << std::endl;
    return 0;
  }
  std::printf("machine: read bandwidth %.1f GB/s (median of passes paired with tg's tokens; peak %.1f GB/s), "
              "sgemm %.1f GFLOP/s (median of passes paired with pp; peak %.1f; %d threads)\n",
              bw / 1e9, peak / 1e9, sgemm / 1e9, sgemm_peak / 1e9, threads);
  std::printf("model: %s, %s, %.2f GB of matrices, loaded in %.2f s, peak RSS %.2f GB\n\n",
              j["model"].get<std::string>().c_str(), type.c_str(), w.matrix_bytes() / 1e9, load_s, rss / 1e9);
  if (a.repetitions > 1)
    std::printf("%d repetitions: medians, with (min-max) over the repetitions\n\n", a.repetitions);
  std::vector<double> pp_percent;
  for (double f : pp_fractions) pp_percent.push_back(100.0 * f);
  std::vector<double> tg_percent;
  for (double f : tg_fractions) tg_percent.push_back(100.0 * f);
  std::printf("| test            |      t/s | implied           | of the limit |\n");
  std::printf("| --------------- | -------: | ----------------- | -----------: |\n");
  std::printf("| pp%-13d | %8s | %6.1f GFLOP/s    | %s sgemm |\n", a.pp, spread(pp_rates, "%8.2f").c_str(),
              pp_flops / 1e9, spread(pp_percent, "%5.1f%%").c_str());
  std::printf("| tg%-13d | %8s | %6.1f GB/s       | %s bw    |\n", a.tg, spread(tg_rates, "%8.2f").c_str(),
              tg_bw / 1e9, spread(tg_percent, "%5.1f%%").c_str());
  for (const MemoryRun& mr : mem_runs) {
    std::string label = "tg" + std::to_string(a.tg) + " @ mem " + std::to_string(mr.tokens);
    if (!a.mem_types.empty()) label += std::string(" ") + ll::mem_dtype_name(mr.type);
    std::printf("| %-15s | %8s | +%.1f ms/token    | %s read  |\n", label.c_str(), spread(mr.tg_rate, "%8.2f").c_str(),
                1e3 * median(mr.extra_s), spread(mr.extra_over_read, "%5.2fx").c_str());
  }
  std::printf("\nagainst the peaks instead: pp %.1f%% sgemm, tg %.1f%%", 100.0 * pp_flops / sgemm_peak,
              100.0 * tg_bw / peak);
  for (const auto& r : mem_rows)
    std::printf(", mem %lld%s %.2fx read", (long long)r["memory_tokens"].get<int64_t>(),
                a.mem_types.empty() ? "" : (" " + r["mem_type"].get<std::string>()).c_str(),
                r["extra_over_read_time_at_peak"].get<double>());
  std::printf("\n");
  return 0;
}

}  // namespace

void add_bench_commands(CLI::App& app, Commands& out) {
  auto a = std::make_shared<BenchArgs>();
  auto* b = app.add_subcommand("bench", "Prompt processing and generation speed against this machine's limits");
  b->add_option("-m,--model", a->model, "Model directory or .gguf file");
  b->add_option("--random", a->random_config, "Benchmark random weights of this config.json shape instead");
  b->add_option("-p,--n-prompt", a->pp, "Prompt tokens (pp)")->capture_default_str()->check(CLI::Range(1, 1 << 30));
  b->add_option("-n,--n-gen", a->tg, "Generated tokens (tg)")->capture_default_str()->check(CLI::Range(1, 1 << 30));
  b->add_option("--memory-tokens", a->memory_tokens, "Also time tg with this many tokens in memory (repeatable)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
  b->add_option("--mem-types", a->mem_types,
                "Compare memory storage types in one run, e.g. bfloat16,q8: one session per type and memory size, "
                "decoding in turn with the same empty session")
      ->delimiter(',');
  b->add_option("-t,--threads", a->threads, "Threads (default: all cores)")->check(CLI::Range(1, 1 << 30));
  b->add_option("-r,--repetitions", a->repetitions,
                "Measure pp, tg and each memory size this many times; report medians (and min-max)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  b->add_flag("--json", a->json, "Print one JSON object");
  a->load.add(b);
  out.push_back({b, [a] { return run_bench(*a); }});
}

}  // namespace cli
