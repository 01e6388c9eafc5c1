// train: FoT (crossbatch) training from a TRAIN.json (schema in docs/training.md).
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "train/trainer.h"

namespace cli {

namespace {

struct TrainArgs {
  std::string config, init, output;
  bool resume = false, json = false;
  int bench_steps = 0, threads = -1;
  int64_t stop_after = 0;
};

int run_train(const TrainArgs& a) {
  nlohmann::json overrides = nlohmann::json::object();
  if (!a.init.empty()) overrides["init"] = std::filesystem::absolute(a.init).string();
  if (!a.output.empty()) overrides["output"] = std::filesystem::absolute(a.output).string();
  ll::train::TrainConfig cfg = ll::train::TrainConfig::from_file(a.config, overrides);
  if (a.threads >= 0) cfg.threads = a.threads;
  auto log = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  };
  if (a.bench_steps > 0) {
    // Benchmarks never touch the output directory: no checkpoints, no model, no log.
    ll::train::Trainer t(cfg, ll::train::Trainer::Start::Bench, log);
    const ll::train::BenchReport r = t.bench(a.bench_steps);
    const double frac = r.train_gflops / r.sgemm_gflops;
    if (a.json) {
      std::cout << nlohmann::json{{"params", r.params},
                                  {"steps", r.steps},
                                  {"tokens", r.tokens},
                                  {"seconds", r.seconds},
                                  {"tokens_per_s", r.tokens_per_s},
                                  {"flops_per_token", r.flops_per_token},
                                  {"train_gflops", r.train_gflops},
                                  {"sgemm_gflops", r.sgemm_gflops},
                                  {"fraction_of_sgemm", frac}}
                       .dump()
                << std::endl;
    } else {
      std::printf("params %zu | %d steps, %lld tokens in %.2f s | %.0f tokens/s\n", r.params, r.steps,
                  (long long)r.tokens, r.seconds, r.tokens_per_s);
      std::printf(
          "%.1f MFLOP/token (6·matmul params + attention) -> %.1f GFLOP/s; sgemm %.1f GFLOP/s; %.0f%% of sgemm\n",
          r.flops_per_token / 1e6, r.train_gflops, r.sgemm_gflops, 100 * frac);
    }
    return 0;
  }
  ll::train::Trainer t(cfg, a.resume ? ll::train::Trainer::Start::Resume : ll::train::Trainer::Start::Fresh, log);
  t.run(a.stop_after);
  return 0;
}

}  // namespace

void add_train_commands(CLI::App& app, Commands& out) {
  auto a = std::make_shared<TrainArgs>();
  auto* tr = app.add_subcommand("train", "Train or fine-tune a LongLLaMA with FoT crossbatch (docs/training.md)");
  tr->add_option("--config", a->config, "TRAIN.json")->required();
  tr->add_option("--init", a->init, "Model directory to start from (replaces the config's init; relative to here)");
  tr->add_option("--output", a->output, "Output directory (replaces the config's output; relative to here)");
  tr->add_flag("--resume", a->resume, "Continue from the newest checkpoint in the output directory");
  tr->add_option("--threads", a->threads, "Threads (overrides the config; 0 = all)");
  tr->add_option("--bench-steps", a->bench_steps,
                 "Measure throughput over N steps (after one warm-up step) and exit; writes nothing");
  tr->add_flag("--json", a->json, "With --bench-steps: print one JSON object");
  tr->add_option("--stop-after", a->stop_after, "Stop after this step as if interrupted (checkpoint, no final model)");
  out.push_back({tr, [a] { return run_train(*a); }});
}

}  // namespace cli
