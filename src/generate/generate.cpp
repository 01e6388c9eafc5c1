#include "generate/generate.h"

#include <chrono>

namespace ll {

std::string StopStringFilter::push(const std::string& text) {
  if (stopped_) return "";
  held_ += text;
  size_t cut = std::string::npos;
  for (const auto& s : stops_)
    if (!s.empty()) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest tail of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const auto& s : stops_)
    for (size_t k = std::min(s.size() - (s.empty() ? 0 : 1), held_.size()); k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStringFilter::flush() {
  std::string out = stopped_ ? "" : held_;
  held_.clear();
  return out;
}

GenerateResult generate(Session& session, const Tokenizer& tok, const std::vector<int>& prompt,
                        const GenerateOptions& opt, const std::function<void(const std::string&)>& on_text,
                        const ProgressFn& progress) {
  using clock = std::chrono::steady_clock;
  validate(opt.sampling);
  GenerateResult r;
  r.prompt_tokens = int64_t(prompt.size());
  const int V = session.config().vocab_size;
  auto t0 = clock::now();
  std::vector<float> logits = session.forward(prompt, true, LogitsWanted::Last, progress);
  r.prompt_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  t0 = clock::now();

  Sampler sampler(opt.sampling);
  StreamDecoder decoder(tok);
  StopStringFilter filter(opt.stop);
  std::vector<int> history = prompt;
  r.stop_reason = "length";
  auto emit = [&](const std::string& s) {
    if (s.empty()) return;
    r.text += s;
    if (on_text) on_text(s);
  };
  for (int i = 0; i < opt.max_new_tokens; ++i) {
    const int id = sampler.sample(logits.data(), V, history);
    if (opt.stop_at_eos && id == tok.eos()) {
      r.stop_reason = "eos";
      r.unfed = {id};
      break;
    }
    r.ids.push_back(id);
    history.push_back(id);
    emit(filter.push(decoder.push(id)));
    if (filter.stopped()) r.stop_reason = "stop";
    if (filter.stopped() || i + 1 == opt.max_new_tokens) {
      r.unfed = {id};
      break;
    }
    logits = session.forward({id}, true, LogitsWanted::Last);
  }
  if (!filter.stopped()) emit(filter.push(decoder.flush()));
  emit(filter.flush());
  r.generate_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return r;
}

}  // namespace ll
