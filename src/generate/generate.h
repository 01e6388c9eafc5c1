#pragma once
// The generation loop: feed a prompt into a Session, sample tokens, stream text, stop at EOS,
// a stop string or the token limit.
#include <functional>
#include <string>
#include <vector>

#include "generate/sampler.h"
#include "model/session.h"
#include "tokenizer/tokenizer.h"

namespace ll {

struct GenerateOptions {
  int max_new_tokens = 128;
  SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any of these
  bool stop_at_eos = true;
};

struct GenerateResult {
  std::vector<int> ids;      // generated ids (EOS not included)
  std::string text;          // decoded text, cut before a stop string
  std::string stop_reason;   // "eos", "stop", "length"
  int64_t prompt_tokens = 0;
  double prompt_seconds = 0, generate_seconds = 0;
  // Sampled ids not yet fed to the session (the last token, or EOS): a chat feeds them first
  // on the next turn so the memory holds the whole conversation.
  std::vector<int> unfed;
};

// Streams text pieces to on_text as soon as they cannot be part of a stop string.
GenerateResult generate(Session& session, const Tokenizer& tok, const std::vector<int>& prompt,
                        const GenerateOptions& opt, const std::function<void(const std::string&)>& on_text,
                        const ProgressFn& progress = {});

// Holds back streamed text that might still turn out to be the start of a stop string.
class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Adds text; returns what can be emitted now. Sets stopped() once a stop string is complete.
  std::string push(const std::string& text);
  std::string flush();  // the held-back remainder (at the end of generation)
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace ll
