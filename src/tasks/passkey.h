#pragma once
// Passkey retrieval with the prompt of the LongLLaMA evaluation (examples/utils/landmark_prompt.py,
// from Landmark Attention): lines joined with "\n":
//   There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.
//   <the first n_prefix characters of the filler>
//   The pass key is K. Remember it. K is the pass key.
//   <the first n_garbage - n_prefix characters of the filler>
//   What is the pass key? The pass key is
// where the filler is "The grass is green. The sky is blue. The sun is yellow. Here we go. There
// and back again." repeated, joined by single spaces (the official one stops at 5000 repeats; here
// it is as long as needed). The prompt is tokenized whole with BOS; the answer is
// tokenizer(str(K)) without BOS, generated greedily, correct iff every token matches.
#include <cstdint>
#include <string>
#include <vector>

#include "train/tasks.h"

namespace ll {
class Tokenizer;
}

namespace ll::tasks {

extern const char* const kPasskeyIntro;
extern const char* const kPasskeyFiller;
extern const char* const kPasskeyQuestion;

// The prompt text for n_garbage filler characters, n_prefix of them before the key line.
std::string passkey_text(int64_t n_garbage, int64_t n_prefix, int key);

struct PasskeyPrompt {
  std::vector<int> ids;     // BOS + the tokenized prompt
  std::vector<int> answer;  // tokenizer(str(key)) without BOS
  int key = 0;
  double depth = 0.0;  // n_prefix / n_garbage as asked
  int64_t n_garbage = 0, n_prefix = 0;
};

// The prompt of the largest n_garbage whose token count (with BOS) is <= tokens, with
// n_prefix = floor(depth · n_garbage) (depth in [0, 1]). Throws when even n_garbage = 0 is longer.
// chars_per_token: the filler's characters per token (the search's first guess), computed by
// passkey_chars_per_token when 0; pass it when making many prompts.
PasskeyPrompt passkey_prompt(const Tokenizer& tok, int64_t tokens, double depth, int key, double chars_per_token = 0);
double passkey_chars_per_token(const Tokenizer& tok);

// A key as the official evaluation draws it: uniform in [1, 50000].
int passkey_random_key(train::Rng& rng);

// The trainer's task "passkey": documents = a prompt of a length drawn uniformly in
// [min_length, length] tokens, a random depth and key, then the answer tokens and EOS; loss only on
// the answer tokens. Needs the run's tokenizer (data.tokenizer).
class PasskeyTask : public train::DocumentSource {
 public:
  PasskeyTask(const nlohmann::json& options, const Tokenizer* tok, const std::string& where);
  train::Document next(train::Rng& rng) const override;
  int vocab_needed() const override;

 private:
  const Tokenizer* tok_;
  int length_ = 512, min_length_ = -1;
  double chars_per_token_ = 0;
};

}  // namespace ll::tasks
