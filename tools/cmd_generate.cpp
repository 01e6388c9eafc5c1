// generate and chat: text generation, optionally with a long document loaded into memory first.
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "generate/generate.h"
#include "model/session.h"
#include "tokenizer/prompt.h"
#include "util/error.h"

namespace cli {

namespace {

struct GenerateArgs {
  std::string model, prompt, prompt_file, doc, tmpl = "plain", system = ll::kDefaultSystemPrompt, tokenizer;
  std::vector<std::string> stop;
  int n = 128;
  bool json = false;
  LoadFlags load;
  ll::SamplingParams sampling;
};

// Fails early, naming the document, when its memory would not fit in the RAM available now.
void check_fits(const ll::Session& s, int64_t tokens, const std::string& what) {
  const size_t need = s.memory_bytes_for(tokens), avail = available_ram_bytes();
  if (avail > 0 && need > avail / 10 * 9)
    throw ll::Error(what + ": " + std::to_string(tokens) + " tokens need " + std::to_string(need >> 20) +
                    " MiB of memory-layer keys/values, but only " + std::to_string(avail >> 20) +
                    " MiB of RAM are available (--mem-type float16/bfloat16 halves float32; or shorten it)");
}

// Loads BOS + document into the session's memory, as the official Colab does.
void ingest_document(ll::Session& s, const ll::Tokenizer& tok, const std::string& path) {
  std::vector<int> ids = {tok.bos()};
  const std::vector<int> doc = tok.encode(read_text_file(path, "--doc"));
  ids.insert(ids.end(), doc.begin(), doc.end());
  check_fits(s, int64_t(ids.size()), "--doc " + path);
  ProgressLine progress("ingest " + path);
  s.forward(ids, true, ll::LogitsWanted::None, std::ref(progress));
}

void check_vocab(const ll::Tokenizer& tok, const ll::Weights& m) {
  if (tok.vocab_size() > m.config.vocab_size)
    throw ll::Error(tok.name() + ": tokenizer has " + std::to_string(tok.vocab_size()) +
                    " tokens, more than the model's vocab_size " + std::to_string(m.config.vocab_size));
}

// What generate and chat share: the model, its tokenizer, a session with the --doc in memory.
// Built in place (the session points at the model).
struct Loaded {
  explicit Loaded(const GenerateArgs& a)
      : model((ll::validate(a.sampling), load_model(a.model, a.load))), tok(open_tokenizer(model, a.tokenizer)), session(model) {
    check_vocab(tok, model);
    if (!a.doc.empty()) ingest_document(session, tok, a.doc);
  }
  Loaded(const Loaded&) = delete;
  ll::Weights model;
  ll::Tokenizer tok;
  ll::Session session;
};

void print_text(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

int run_generate(const GenerateArgs& a) {
  if (a.prompt.empty() == a.prompt_file.empty()) throw ll::Error("generate: give exactly one of -p TEXT or -f FILE");
  const std::string text = a.prompt_file.empty() ? a.prompt : read_text_file(a.prompt_file, "-f");
  const ll::PromptTemplate tmpl = ll::parse_template(a.tmpl);
  Loaded l(a);
  const ll::Weights& model = l.model;
  const ll::Tokenizer& tok = l.tok;
  ll::Session& session = l.session;

  ll::GenerateOptions opt;
  opt.max_new_tokens = a.n;
  opt.sampling = a.sampling;
  opt.stop = a.stop;
  std::vector<int> prompt;
  switch (tmpl) {
    case ll::PromptTemplate::Plain: prompt = ll::build_plain(tok, text); break;
    case ll::PromptTemplate::Instruct: prompt = ll::build_instruct(tok, a.system, text); break;
    case ll::PromptTemplate::Chat:
      prompt = ll::build_chat(tok, ll::kChatIntro, {{"user", text}});
      opt.stop.push_back("USER:");  // as the official chat demo
      opt.stop.push_back("ASSISTANT:");
      break;
  }
  check_fits(session, int64_t(prompt.size()), "the prompt");
  ProgressLine progress("prompt");
  const ll::GenerateResult r =
      ll::generate(session, tok, prompt, opt, a.json ? std::function<void(const std::string&)>() : print_text,
                   std::ref(progress));
  if (a.json) {
    const auto& ml = model.config.mem_layers;
    nlohmann::json j = {{"text", r.text},
                        {"ids", r.ids},
                        {"stop_reason", r.stop_reason},
                        {"prompt_tokens", r.prompt_tokens},
                        {"memory_tokens", ml.empty() ? 0 : session.memory_length(ml[0])},
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

int run_chat(const GenerateArgs& a) {
  Loaded l(a);
  const ll::Tokenizer& tok = l.tok;
  ll::Session& session = l.session;
  ll::GenerateOptions opt;
  opt.max_new_tokens = a.n;
  opt.sampling = a.sampling;
  opt.stop = {"USER:", "ASSISTANT:"};
  std::vector<int> unfed;  // tokens sampled but not yet fed (the end of the last answer)
  bool first = true;
  std::string line;
  std::fprintf(stderr, "Chat with %s. An empty line or EOF ends it.\n", a.model.c_str());
  while (true) {
    std::fprintf(stderr, "USER: ");
    if (!std::getline(std::cin, line) || line.empty()) break;
    std::vector<int> ids = unfed;
    if (!unfed.empty() && unfed.back() != tok.eos()) ids.push_back(tok.eos());  // close the answer
    const std::vector<int> turn =
        first ? ll::build_chat(tok, ll::kChatIntro, {{"user", line}}) : ll::chat_user_turn(tok, line);
    ids.insert(ids.end(), turn.begin(), turn.end());
    first = false;
    std::fprintf(stderr, "ASSISTANT: ");
    unfed = ll::generate(session, tok, ids, opt, print_text).unfed;
    std::cout << std::endl;
  }
  return 0;
}

}  // namespace

void add_generate_commands(CLI::App& app, Commands& out) {
  auto a = std::make_shared<GenerateArgs>();
  auto* gen = app.add_subcommand("generate", "Generate text from a prompt");
  gen->add_option("-m,--model", a->model, "Model directory or .gguf file")->required();
  gen->add_option("-p,--prompt", a->prompt, "Prompt text");
  gen->add_option("-f,--file", a->prompt_file, "Read the prompt from a file");
  gen->add_option("--doc", a->doc, "Long document loaded into memory before the prompt");
  gen->add_option("-n,--n-predict", a->n, "Tokens to generate")->capture_default_str()->check(CLI::Range(0, 1 << 30));
  gen->add_option("--template", a->tmpl, "Prompt format: plain, instruct or chat")->capture_default_str();
  gen->add_option("--system", a->system, "System prompt of the instruct template");
  gen->add_option("--tokenizer", a->tokenizer, "tokenizer.model to use instead of the model's");
  gen->add_option("--stop", a->stop, "Stop before this string (repeatable)");
  a->load.add(gen);
  gen->add_flag("--json", a->json, "Print one JSON object instead of streaming text");
  add_sampling_flags(gen, a->sampling);
  out.push_back({gen, [a] { return run_generate(*a); }});

  auto* chat = app.add_subcommand("chat", "Interactive chat; memory persists across turns");
  chat->add_option("-m,--model", a->model, "Model directory or .gguf file")->required();
  chat->add_option("--doc", a->doc, "Long document loaded into memory first");
  chat->add_option("-n,--n-predict", a->n, "Maximum tokens per answer")->capture_default_str()->check(CLI::Range(1, 1 << 30));
  chat->add_option("--tokenizer", a->tokenizer, "tokenizer.model to use instead of the model's");
  a->load.add(chat);
  add_sampling_flags(chat, a->sampling);
  out.push_back({chat, [a] { return run_chat(*a); }});
}

}  // namespace cli
