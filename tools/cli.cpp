#include "cli.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ops/quant.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace cli {

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ll::Error(what + " '" + path + "': cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ProgressLine::ProgressLine(std::string label) : label_(std::move(label)), t0_(clock::now()) {}

void ProgressLine::operator()(int64_t done, int64_t total) {
  if (!started_) {  // tokens/s and the ETA count from the first report, not from construction
    started_ = true;
    t0_ = clock::now();
    done0_ = done;
  }
  const double s = std::chrono::duration<double>(clock::now() - t0_).count();
  if (done < total && s - last_ < 0.25 && done > done0_) return;
  last_ = s;
  const double rate = s > 0 ? double(done - done0_) / s : 0.0;
  const double eta = rate > 0 ? double(total - done) / rate : 0.0;
  std::fprintf(stderr, "\r%s: %lld/%lld tokens (%.1f%%), %.0f tok/s, ETA %.0f s   ", label_.c_str(), (long long)done,
               (long long)total, total > 0 ? 100.0 * double(done) / double(total) : 100.0, rate, eta);
  if (done >= total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

ll::Tokenizer open_tokenizer(const ll::Weights& w, const std::string& override_path) {
  if (!override_path.empty()) return ll::Tokenizer(override_path);
  if (!w.tokenizer_proto.empty()) return ll::Tokenizer::from_bytes(w.tokenizer_proto, w.source);
  if (!w.tokenizer_path.empty()) return ll::Tokenizer(w.tokenizer_path);
  throw ll::Error(w.source + ": the model has no tokenizer.model (pass --tokenizer PATH)");
}

ll::Tokenizer open_tokenizer(const std::string& path) {
  if (fs::is_directory(path) || (path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0))
    return open_tokenizer(ll::Weights::load(path, std::nullopt, /*use_mmap=*/true, /*repack=*/false), "");
  return ll::Tokenizer(path);
}

void LoadFlags::add(CLI::App* app) {
  app->add_option("--type", type, "Convert weights at load: f32, f16, bf16, q8_0, q4_0");
  app->add_flag("--no-mmap", no_mmap, "Copy a .gguf model into RAM instead of reading it through mmap");
  app->add_flag("--no-repack", no_repack, "Keep Q8_0/Q4_0/F16/BF16 matrices in the file's layout (no 16-row repacking; mapped files stay zero-copy)");
  app->add_option("--last-context-length", last_context_length, "Override last_context_length");
  app->add_option("--mem-type", mem_type, "Store memory keys/values as bfloat16, float16, float32 or q8 (int8 rows with one scale each) (default: mem_dtype)");
}

ll::Weights load_model(const std::string& path, const LoadFlags& flags) {
  std::optional<ll::DType> type;
  if (!flags.type.empty()) type = ll::parse_weight_type(flags.type);
  ll::Weights w = ll::Weights::load(path, type, !flags.no_mmap, !flags.no_repack);
  if (flags.last_context_length >= 0) w.config.last_context_length = flags.last_context_length;
  if (!flags.mem_type.empty()) w.config.mem_dtype = ll::parse_mem_dtype(flags.mem_type, "--mem-type");
  return w;
}

void add_sampling_flags(CLI::App* app, ll::SamplingParams& p) {
  app->add_option("--temp", p.temperature, "Sampling temperature (0 = greedy)")->capture_default_str();
  app->add_option("--top-k", p.top_k, "Keep the k most likely tokens (0 = off)")->capture_default_str();
  app->add_option("--top-p", p.top_p, "Nucleus sampling threshold (1 = off)")->capture_default_str();
  app->add_option("--min-p", p.min_p, "Drop tokens below min-p times the top probability")->capture_default_str();
  app->add_option("--repeat-penalty", p.repeat_penalty, "Penalty for recent tokens (1 = off)")->capture_default_str();
  app->add_option("--repeat-last-n", p.repeat_last_n, "How many recent tokens are penalised")->capture_default_str();
  app->add_option("--seed", p.seed, "Random seed")->capture_default_str();
}

size_t available_ram_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (f >> key >> kb) {
    if (key == "MemAvailable:") return kb * 1024;
    f.ignore(256, '\n');
  }
  return 0;
}

}  // namespace cli
