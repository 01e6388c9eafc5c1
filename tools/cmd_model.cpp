// tokenize, verify-reference, init-random: model and tokenizer utilities.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "io/tensor_store.h"
#include "model/gguf_model.h"
#include "model/reference_check.h"
#include "ops/quant.h"
#include "tokenizer/prompt.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace cli {

namespace {

struct ModelArgs {
  std::string model, text, tmpl, system = ll::kDefaultSystemPrompt, case_dir, config, out, tokenizer, type = "f16";
  double tolerance = -1;  // verify-reference: < 0 = the case's own (ll::reference_tolerance)
  LoadFlags load;  // verify-reference: --type / --mem-type only
  uint64_t seed = 0;
  bool json = false, f32 = false;
};

int run_tokenize(const ModelArgs& a) {
  const ll::Tokenizer tok = open_tokenizer(a.model);
  std::vector<int> ids;
  if (a.tmpl.empty()) {
    ids = tok.encode(a.text);
  } else {
    switch (ll::parse_template(a.tmpl)) {
      case ll::PromptTemplate::Plain: ids = ll::build_plain(tok, a.text); break;
      case ll::PromptTemplate::Instruct: ids = ll::build_instruct(tok, a.system, a.text); break;
      case ll::PromptTemplate::Chat: ids = ll::build_chat(tok, ll::kChatIntro, {{"user", a.text}}); break;
    }
  }
  std::cout << nlohmann::json(ids).dump() << std::endl;
  return 0;
}

int run_verify(const ModelArgs& a) {
  ll::ReferenceOptions opt;
  if (!a.load.type.empty()) opt.weight_type = ll::parse_weight_type(a.load.type);
  if (!a.load.mem_type.empty()) opt.mem_type = ll::parse_mem_dtype(a.load.mem_type, "--mem-type");
  const double tolerance = a.tolerance >= 0 ? a.tolerance : ll::reference_tolerance(a.case_dir);
  const ll::ReferenceReport r = ll::verify_reference(a.case_dir, tolerance, opt);
  if (a.json) {
    std::cout << r.to_json() << std::endl;
  } else {
    std::printf("%s (tolerance %g)\n", a.case_dir.c_str(), tolerance);
    for (const auto& s : r.scenarios) {
      std::printf("  %-12s max |error| %.3g  mean KL %.3g  %s\n", s.name.c_str(), s.max_abs_error, s.mean_kl,
                  s.passed ? "ok" : "MISMATCH");
      for (const auto& p : s.problems) std::printf("    %s\n", p.c_str());
    }
    std::printf("%s\n", r.passed() ? "PASS" : "FAIL");
  }
  return r.passed() ? 0 : 1;
}

int run_init_random(const ModelArgs& a) {
  const ll::ModelConfig c = ll::ModelConfig::from_file(a.config);
  std::unique_ptr<ll::Tokenizer> tok;
  if (!a.tokenizer.empty()) {
    tok = std::make_unique<ll::Tokenizer>(a.tokenizer);
    if (tok->vocab_size() > c.vocab_size)
      throw ll::Error(a.tokenizer + ": tokenizer has " + std::to_string(tok->vocab_size()) +
                      " tokens, more than vocab_size in " + a.config);
  }
  const ll::Model m = ll::Model::random(c, a.seed);
  m.save(a.out, !a.f32);
  if (tok) ll::write_file_atomic((fs::path(a.out) / "tokenizer.model").string(), tok->serialized());
  std::fprintf(stderr, "wrote %s: %zu parameters\n", a.out.c_str(), m.parameter_count());
  return 0;
}

int run_convert(const ModelArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  ll::convert_to_gguf(a.model, a.out, ll::parse_weight_type(a.type));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "wrote %s (%.1f MB) in %.1f s\n", a.out.c_str(), double(fs::file_size(a.out)) / 1e6, s);
  return 0;
}

}  // namespace

void add_model_commands(CLI::App& app, Commands& out) {
  auto a = std::make_shared<ModelArgs>();
  auto* tok = app.add_subcommand("tokenize", "Print token ids as JSON");
  tok->add_option("-m,--model", a->model, "Model directory or tokenizer.model")->required();
  tok->add_option("--text", a->text, "Text to tokenize")->required();
  tok->add_option("--template", a->tmpl, "Build a prompt: plain, instruct or chat (default: the raw text, no BOS)");
  tok->add_option("--system", a->system, "System prompt of the instruct template");
  out.push_back({tok, [a] { return run_tokenize(*a); }});

  auto* ver = app.add_subcommand("verify-reference", "Compare with the official implementation's outputs");
  ver->add_option("case_dir", a->case_dir, "A directory in the layout of shared/reference/parity/<case>")->required();
  ver->add_option("--tolerance", a->tolerance,
                  "Largest allowed absolute logit error (default: 1e-4, or 5e-4 for bf16 memory)");
  ver->add_flag("--json", a->json, "Print the report as JSON");
  ver->add_option("--type", a->load.type, "Run with weights converted to f16, bf16, q8_0 or q4_0 (measures their error)");
  ver->add_option("--mem-type", a->load.mem_type, "Store memory as bfloat16, float16 or float32 (measures the error)");
  out.push_back({ver, [a] { return run_verify(*a); }});

  auto* init = app.add_subcommand("init-random", "Write a random model in Hugging Face layout");
  init->add_option("--config", a->config, "config.json with the model shape")->required();
  init->add_option("--seed", a->seed, "Random seed")->capture_default_str();
  init->add_option("-o,--out", a->out, "Output directory")->required();
  init->add_option("--tokenizer", a->tokenizer, "tokenizer.model to copy into the directory");
  init->add_flag("--f32", a->f32, "Store float32 weights (default bf16, like the released checkpoints)");
  out.push_back({init, [a] { return run_init_random(*a); }});

  auto* conv = app.add_subcommand("convert", "Convert a model directory to one mmap-able GGUF file");
  conv->add_option("model_dir", a->model, "Hugging Face model directory")->required();
  conv->add_option("out", a->out, "Output .gguf file")->required();
  conv->add_option("--type", a->type, "Matrix type: f32, f16, bf16, q8_0, q4_0")->capture_default_str();
  out.push_back({conv, [a] { return run_convert(*a); }});
}

}  // namespace cli
