// longllama: the command-line front end. Each subcommand is a thin layer over the library:
// parse arguments, call src/, print results to stdout (JSON with --json) and progress to stderr.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "generate/generate.h"
#include "io/tensor_store.h"
#include "model/model.h"
#include "model/reference_check.h"
#include "model/session.h"
#include "tokenizer/prompt.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ll::Error(std::string(what) + " '" + path + "': cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Progress on stderr: tokens ingested, tokens/s, ETA. Redraws one line, at most ~4 times a second.
class ProgressLine {
 public:
  explicit ProgressLine(std::string label) : label_(std::move(label)), t0_(clock::now()) {}
  void operator()(int64_t done, int64_t total) {
    const double s = std::chrono::duration<double>(clock::now() - t0_).count();
    if (done < total && s - last_ < 0.25) return;
    last_ = s;
    const double rate = s > 0 ? double(done) / s : 0.0;
    const double eta = rate > 0 ? double(total - done) / rate : 0.0;
    std::fprintf(stderr, "\r%s: %lld/%lld tokens (%.1f%%), %.0f tok/s, ETA %.0f s   ", label_.c_str(),
                 (long long)done, (long long)total, 100.0 * double(done) / double(total), rate, eta);
    if (done == total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string label_;
  clock::time_point t0_;
  double last_ = -1.0;
};

ll::Tokenizer open_tokenizer(const std::string& model_dir_or_file, const std::string& override_path) {
  if (!override_path.empty()) return ll::Tokenizer(override_path);
  fs::path p(model_dir_or_file);
  if (fs::is_directory(p)) p /= "tokenizer.model";
  if (!fs::exists(p))
    throw ll::Error(p.string() + ": no tokenizer.model in the model directory (pass --tokenizer PATH)");
  return ll::Tokenizer(p.string());
}

struct SamplingFlags {
  ll::SamplingParams p;
  void add(CLI::App* app) {
    app->add_option("--temp", p.temperature, "Sampling temperature (0 = greedy)")->capture_default_str();
    app->add_option("--top-k", p.top_k, "Keep the k most likely tokens (0 = off)")->capture_default_str();
    app->add_option("--top-p", p.top_p, "Nucleus sampling threshold (1 = off)")->capture_default_str();
    app->add_option("--min-p", p.min_p, "Drop tokens below min-p times the top probability")->capture_default_str();
    app->add_option("--repeat-penalty", p.repeat_penalty, "Penalty for recent tokens (1 = off)")->capture_default_str();
    app->add_option("--repeat-last-n", p.repeat_last_n, "How many recent tokens are penalised")->capture_default_str();
    app->add_option("--seed", p.seed, "Random seed")->capture_default_str();
  }
};

// The model directory's default last_context_length can be overridden, as the official
// forward(..., last_context_length=N) allows.
ll::Model load_model(const std::string& dir, int last_context_length) {
  ll::Model m = ll::Model::load(dir);
  if (last_context_length >= 0) m.config.last_context_length = last_context_length;
  return m;
}

// Loads a long document into the session's memory: BOS + document, as the official Colab does.
void ingest_document(ll::Session& s, const ll::Tokenizer& tok, const std::string& path) {
  std::vector<int> ids = {tok.bos()};
  const std::vector<int> doc = tok.encode(read_text_file(path, "--doc"));
  ids.insert(ids.end(), doc.begin(), doc.end());
  ProgressLine progress("ingest " + path);
  s.forward(ids, true, ll::LogitsWanted::None, std::ref(progress));
}

int cmd_generate(const std::string& model_dir, const std::string& prompt_text, const std::string& prompt_file,
                 const std::string& doc, int n, const std::string& template_name, const std::string& system,
                 const std::string& tokenizer_path, const std::vector<std::string>& stop, int lcl,
                 const ll::SamplingParams& sampling, bool as_json) {
  if (prompt_text.empty() == prompt_file.empty()) throw ll::Error("generate: give exactly one of -p TEXT or -f FILE");
  const std::string text = prompt_file.empty() ? prompt_text : read_text_file(prompt_file, "-f");
  const ll::Model model = load_model(model_dir, lcl);
  const ll::Tokenizer tok = open_tokenizer(model_dir, tokenizer_path);
  if (tok.vocab_size() > model.config.vocab_size)
    throw ll::Error(tok.name() + ": tokenizer has " + std::to_string(tok.vocab_size()) +
                    " tokens, more than the model's vocab_size " + std::to_string(model.config.vocab_size));
  ll::Session session(model);
  if (!doc.empty()) ingest_document(session, tok, doc);

  std::vector<int> prompt;
  std::vector<std::string> stops = stop;
  switch (ll::parse_template(template_name)) {
    case ll::PromptTemplate::Plain: prompt = ll::build_plain(tok, text); break;
    case ll::PromptTemplate::Instruct: prompt = ll::build_instruct(tok, system, text); break;
    case ll::PromptTemplate::Chat:
      prompt = ll::build_chat(tok, ll::kChatIntro, {{"user", text}});
      stops.push_back("USER:");
      stops.push_back("ASSISTANT:");
      break;
  }
  ll::GenerateOptions opt;
  opt.max_new_tokens = n;
  opt.sampling = sampling;
  opt.stop = stops;
  ProgressLine progress("prompt");
  auto stream = [&](const std::string& s) {
    if (!as_json) {
      std::fwrite(s.data(), 1, s.size(), stdout);
      std::fflush(stdout);
    }
  };
  ll::GenerateResult r = ll::generate(session, tok, prompt, opt, stream, std::ref(progress));
  if (as_json) {
    json j = {{"text", r.text},
              {"ids", r.ids},
              {"stop_reason", r.stop_reason},
              {"prompt_tokens", r.prompt_tokens},
              {"memory_tokens", session.memory_length(model.config.mem_layers.empty() ? 0 : model.config.mem_layers[0])},
              {"prompt_seconds", r.prompt_seconds},
              {"generate_seconds", r.generate_seconds}};
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << std::endl;
  }
  std::fprintf(stderr, "generated %zu tokens in %.2f s (%.1f tok/s), stop: %s\n", r.ids.size(), r.generate_seconds,
               r.generate_seconds > 0 ? double(r.ids.size()) / r.generate_seconds : 0.0, r.stop_reason.c_str());
  return 0;
}

int cmd_chat(const std::string& model_dir, const std::string& doc, int n, const std::string& tokenizer_path, int lcl,
             const ll::SamplingParams& sampling) {
  const ll::Model model = load_model(model_dir, lcl);
  const ll::Tokenizer tok = open_tokenizer(model_dir, tokenizer_path);
  ll::Session session(model);
  if (!doc.empty()) ingest_document(session, tok, doc);
  ll::GenerateOptions opt;
  opt.max_new_tokens = n;
  opt.sampling = sampling;
  opt.stop = {"USER:", "ASSISTANT:"};
  std::vector<int> carry;  // tokens sampled but not yet fed (the end of the last answer)
  bool first = true;
  std::string line;
  std::fprintf(stderr, "Chat with %s. Empty line or EOF ends.\n", model_dir.c_str());
  while (true) {
    std::fprintf(stderr, "USER: ");
    if (!std::getline(std::cin, line) || line.empty()) break;
    std::vector<int> ids = carry;
    if (!carry.empty() && carry.back() != tok.eos()) ids.push_back(tok.eos());  // close the answer
    std::vector<int> turn = first ? ll::build_chat(tok, ll::kChatIntro, {{"user", line}}) : ll::chat_user_turn(tok, line);
    ids.insert(ids.end(), turn.begin(), turn.end());
    first = false;
    std::fprintf(stderr, "ASSISTANT: ");
    ll::GenerateResult r = ll::generate(session, tok, ids, opt, [](const std::string& s) {
      std::fwrite(s.data(), 1, s.size(), stdout);
      std::fflush(stdout);
    });
    std::cout << std::endl;
    carry = r.unfed;
  }
  return 0;
}

int cmd_tokenize(const std::string& path, const std::string& text, const std::string& template_name,
                 const std::string& system) {
  const ll::Tokenizer tok = open_tokenizer(path, "");
  std::vector<int> ids;
  if (template_name.empty()) {
    ids = tok.encode(text);
  } else {
    switch (ll::parse_template(template_name)) {
      case ll::PromptTemplate::Plain: ids = ll::build_plain(tok, text); break;
      case ll::PromptTemplate::Instruct: ids = ll::build_instruct(tok, system, text); break;
      case ll::PromptTemplate::Chat: ids = ll::build_chat(tok, ll::kChatIntro, {{"user", text}}); break;
    }
  }
  std::cout << json(ids).dump() << std::endl;
  return 0;
}

int cmd_verify(const std::string& case_dir, double tol, bool as_json) {
  const ll::ReferenceReport r = ll::verify_reference(case_dir, tol);
  if (as_json) {
    std::cout << r.to_json() << std::endl;
  } else {
    std::printf("%s (tolerance %g)\n", case_dir.c_str(), tol);
    for (const auto& s : r.scenarios) {
      std::printf("  %-12s max |error| %.3g  %s\n", s.name.c_str(), s.max_abs_error, s.passed ? "ok" : "MISMATCH");
      for (const auto& p : s.problems) std::printf("    %s\n", p.c_str());
    }
    std::printf("%s\n", r.passed() ? "PASS" : "FAIL");
  }
  return r.passed() ? 0 : 1;
}

int cmd_init_random(const std::string& config_path, uint64_t seed, const std::string& out,
                    const std::string& tokenizer_path, bool f32) {
  const ll::ModelConfig c = ll::ModelConfig::from_file(config_path);
  const ll::Model m = ll::Model::random(c, seed);
  m.save(out, !f32);
  if (!tokenizer_path.empty()) {
    const ll::Tokenizer tok(tokenizer_path);  // validates it
    if (tok.vocab_size() > c.vocab_size)
      throw ll::Error(tokenizer_path + ": tokenizer has more tokens than vocab_size in " + config_path);
    ll::write_file_atomic((fs::path(out) / "tokenizer.model").string(), tok.serialized());
  }
  std::fprintf(stderr, "wrote %s: %zu parameters\n", out.c_str(), m.parameter_count());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"longllama: LongLLaMA inference with unbounded memory"};
  app.require_subcommand(1);

  std::string model, prompt, prompt_file, doc, tmpl = "plain", system = ll::kDefaultSystemPrompt, tokenizer;
  std::vector<std::string> stop;
  int n = 128, lcl = -1;
  bool as_json = false;
  SamplingFlags sf;

  auto* gen = app.add_subcommand("generate", "Generate text from a prompt");
  gen->add_option("-m,--model", model, "Model directory")->required();
  gen->add_option("-p,--prompt", prompt, "Prompt text");
  gen->add_option("-f,--file", prompt_file, "Read the prompt from a file");
  gen->add_option("--doc", doc, "Long document loaded into memory before the prompt");
  gen->add_option("-n,--n-predict", n, "Tokens to generate")->capture_default_str();
  gen->add_option("--template", tmpl, "Prompt format: plain, instruct or chat")->capture_default_str();
  gen->add_option("--system", system, "System prompt of the instruct template");
  gen->add_option("--tokenizer", tokenizer, "tokenizer.model to use instead of the model's");
  gen->add_option("--stop", stop, "Stop before this string (repeatable)");
  gen->add_option("--last-context-length", lcl, "Override last_context_length");
  gen->add_flag("--json", as_json, "Print one JSON object instead of streaming text");
  sf.add(gen);

  auto* chat = app.add_subcommand("chat", "Interactive chat; memory persists across turns");
  chat->add_option("-m,--model", model, "Model directory")->required();
  chat->add_option("--doc", doc, "Long document loaded into memory first");
  chat->add_option("-n,--n-predict", n, "Maximum tokens per answer")->capture_default_str();
  chat->add_option("--tokenizer", tokenizer, "tokenizer.model to use instead of the model's");
  chat->add_option("--last-context-length", lcl, "Override last_context_length");
  sf.add(chat);

  std::string text;
  auto* tokc = app.add_subcommand("tokenize", "Print token ids as JSON");
  tokc->add_option("-m,--model", model, "Model directory or tokenizer.model")->required();
  tokc->add_option("--text", text, "Text to tokenize")->required();
  tokc->add_option("--template", tmpl, "Build a prompt: plain, instruct or chat (default: raw text, no BOS)");
  tokc->add_option("--system", system, "System prompt of the instruct template");

  std::string case_dir;
  double tol = 1e-4;
  auto* ver = app.add_subcommand("verify-reference", "Compare with the official implementation's outputs");
  ver->add_option("case_dir", case_dir, "A directory in the layout of shared/reference/parity/<case>")->required();
  ver->add_option("--tolerance", tol, "Largest allowed absolute logit error")->capture_default_str();
  ver->add_flag("--json", as_json, "Print the report as JSON");

  std::string config, out;
  uint64_t seed = 0;
  bool f32 = false;
  auto* init = app.add_subcommand("init-random", "Write a random model in Hugging Face layout");
  init->add_option("--config", config, "config.json with the model shape")->required();
  init->add_option("--seed", seed, "Random seed")->capture_default_str();
  init->add_option("-o,--out", out, "Output directory")->required();
  init->add_option("--tokenizer", tokenizer, "tokenizer.model to copy into the directory");
  init->add_flag("--f32", f32, "Store float32 weights (default bf16, like the released checkpoints)");

  bool tmpl_given = false;
  try {
    app.parse(argc, argv);
    tmpl_given = tokc->count("--template") > 0;
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (*gen) return cmd_generate(model, prompt, prompt_file, doc, n, tmpl, system, tokenizer, stop, lcl, sf.p, as_json);
    if (*chat) return cmd_chat(model, doc, n, tokenizer, lcl, sf.p);
    if (*tokc) return cmd_tokenize(model, text, tmpl_given ? tmpl : "", system);
    if (*ver) return cmd_verify(case_dir, tol, as_json);
    if (*init) return cmd_init_random(config, seed, out, tokenizer, f32);
  } catch (const ll::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return 0;
}
