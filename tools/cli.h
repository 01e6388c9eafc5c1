#pragma once
// Shared pieces of the longllama CLI. Each subcommand lives in its own tools/cmd_*.cpp and
// registers itself through one add_*_command function: it adds its options to the app and
// returns the function that runs it once the command line is parsed.
#include <CLI/CLI.hpp>
#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "generate/sampler.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace cli {

using Runner = std::function<int()>;
struct Command {
  CLI::App* app;
  Runner run;
};
using Commands = std::vector<Command>;

void add_generate_commands(CLI::App& app, Commands& out);  // generate, chat
void add_model_commands(CLI::App& app, Commands& out);
void add_bench_commands(CLI::App& app, Commands& out);     // bench     // tokenize, verify-reference, init-random, convert
void add_train_commands(CLI::App& app, Commands& out);     // train
void add_eval_commands(CLI::App& app, Commands& out);      // eval dictionary, eval passkey

std::string read_text_file(const std::string& path, const std::string& what);

// Progress on stderr: tokens done, tokens/s, ETA. Redraws one line, at most ~4 times a second.
class ProgressLine {
 public:
  explicit ProgressLine(std::string label);
  void operator()(int64_t done, int64_t total);

 private:
  using clock = std::chrono::steady_clock;
  std::string label_;
  clock::time_point t0_;
  int64_t done0_ = 0;
  bool started_ = false;
  double last_ = -1.0;
};

// The tokenizer of a loaded model (its tokenizer.model, or the one embedded in its .gguf), or
// override_path when given.
ll::Tokenizer open_tokenizer(const ll::Weights& w, const std::string& override_path);
// A tokenizer.model file, or the tokenizer of a model directory or .gguf.
ll::Tokenizer open_tokenizer(const std::string& path);

// How a model is loaded: --type converts its matrices; a .gguf is read through mmap (starts at
// once) unless --no-mmap copies it into huge-page RAM (faster decoding, survives page-cache
// eviction). Q8_0/Q4_0 matrices are repacked into 16-row groups for the AVX-512 VNNI decode
// kernel (ops/qgroup.h) unless --no-repack keeps the file's layout (as llama.cpp's --no-repack).
struct LoadFlags {
  std::string type;  // "" = as stored (float32 for a model directory)
  bool no_mmap = false;
  bool no_repack = false;
  std::string mem_type;  // "" = the config's mem_dtype; else bfloat16 | float16 | float32
  int last_context_length = -1;  // >= 0 overrides the config, as forward(..., last_context_length=N)
  void add(CLI::App* app);
};
ll::Weights load_model(const std::string& path, const LoadFlags& flags);

void add_sampling_flags(CLI::App* app, ll::SamplingParams& p);

// MemAvailable of /proc/meminfo in bytes (0 when unknown).
size_t available_ram_bytes();

}  // namespace cli
