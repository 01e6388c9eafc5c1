#include "tasks/passkey.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <unordered_map>

#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace ll::tasks {

const char* const kPasskeyIntro =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there.";
const char* const kPasskeyFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const char* const kPasskeyQuestion = "What is the pass key? The pass key is";

namespace {
// The first n characters of " ".join([filler] * enough).
std::string filler_prefix(int64_t n) {
  static const std::string unit = std::string(" ") + kPasskeyFiller;
  std::string s;
  s.reserve(size_t(n) + unit.size());
  s = kPasskeyFiller;
  while (int64_t(s.size()) < n) s += unit;
  s.resize(size_t(n));
  return s;
}
}  // namespace

std::string passkey_text(int64_t n_garbage, int64_t n_prefix, int key) {
  if (n_prefix < 0 || n_prefix > n_garbage) throw Error("passkey: n_prefix must be in [0, n_garbage]");
  const std::string k = std::to_string(key);
  std::string t = kPasskeyIntro;
  t += "\n";
  t += filler_prefix(n_prefix);
  t += "\nThe pass key is " + k + ". Remember it. " + k + " is the pass key.\n";
  t += filler_prefix(n_garbage - n_prefix);
  t += "\n";
  t += kPasskeyQuestion;
  return t;
}

int passkey_random_key(train::Rng& rng) { return 1 + int(rng.below(50000)); }

double passkey_chars_per_token(const Tokenizer& tok) {
  return double(filler_prefix(9000).size()) / double(tok.encode(filler_prefix(9000)).size());
}

namespace {
// Token counts by words. SentencePiece splits its input at spaces before encoding
// (split_by_whitespace), so a text's token count is the sum of its space-separated words' counts,
// each word encoded alone (with the dummy prefix, as after a space). A prompt of 1M tokens repeats a
// few dozen distinct words: counting it this way takes milliseconds where a full encode takes
// seconds, and the search below needs ~10 counts. passkey_prompt checks the result against one
// full encode and falls back to full encodes for a tokenizer where it does not hold.
class WordCounter {
 public:
  explicit WordCounter(const Tokenizer& tok) : tok_(tok) {}
  int64_t count(const std::string& text) {
    int64_t n = 0;
    size_t i = 0;
    while (i < text.size()) {
      while (i < text.size() && text[i] == ' ') ++i;
      size_t j = i;
      while (j < text.size() && text[j] != ' ') ++j;
      if (j > i) {
        auto [it, fresh] = cache_.try_emplace(text.substr(i, j - i), 0);
        if (fresh) it->second = int64_t(tok_.encode(it->first).size());
        n += it->second;
      }
      i = j;
    }
    return n;
  }

 private:
  const Tokenizer& tok_;
  std::unordered_map<std::string, int64_t> cache_;
};

// The largest g with count(g) <= tokens (count grows with g, up to a token of jitter at cut words):
// secant steps from the filler's characters per token, then a bisection.
int64_t largest_fit(const std::function<int64_t(int64_t)>& count, int64_t tokens, int64_t base, double r) {
  int64_t lo = 0, hi = -1;  // count(lo) <= tokens < count(hi)
  int64_t g = int64_t(double(tokens - base) * r);
  for (int it = 0; it < 8 && g > lo && (hi < 0 || g < hi); ++it) {
    const int64_t c = count(g);
    if (c <= tokens) lo = g;
    else hi = g;
    if (c == tokens) break;
    g += int64_t(std::floor(double(tokens - c) * r));
    if (g == lo) ++g;
    if (hi >= 0 && g >= hi) g = hi - 1;
    if (g <= lo) g = lo + 1;
  }
  if (hi < 0) {  // no upper bracket yet: grow until one
    int64_t step = std::max<int64_t>(16, int64_t(r * 4));
    while (count(lo + step) <= tokens) {
      lo += step;
      step *= 2;
    }
    hi = lo + step;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (count(mid) <= tokens) lo = mid;
    else hi = mid;
  }
  return lo;
}
}  // namespace

PasskeyPrompt passkey_prompt(const Tokenizer& tok, int64_t tokens, double depth, int key, double chars_per_token) {
  if (!(depth >= 0.0 && depth <= 1.0)) throw Error("passkey: depth must be in [0, 1]");
  auto prefix_of = [&](int64_t g) { return std::min(g, int64_t(std::floor(depth * double(g)))); };
  auto text_of = [&](int64_t g) { return passkey_text(g, prefix_of(g), key); };
  auto exact = [&](int64_t g) { return 1 + int64_t(tok.encode(text_of(g)).size()); };
  WordCounter words(tok);
  auto by_words = [&](int64_t g) { return 1 + words.count(text_of(g)); };
  const int64_t base = exact(0);
  if (base > tokens)
    throw Error("passkey: a prompt needs at least " + std::to_string(base) + " tokens, asked for " +
                std::to_string(tokens));
  const double r = chars_per_token > 0 ? chars_per_token : passkey_chars_per_token(tok);
  const bool additive = by_words(0) == base;
  int64_t g = additive ? largest_fit(by_words, tokens, base, r) : largest_fit(exact, tokens, base, r);
  auto body = tok.encode(text_of(g));
  if (additive && 1 + int64_t(body.size()) != by_words(g)) {  // not additive here after all
    g = largest_fit(exact, tokens, base, r);
    body = tok.encode(text_of(g));
  }
  PasskeyPrompt p;
  p.key = key;
  p.depth = depth;
  p.n_garbage = g;
  p.n_prefix = prefix_of(g);
  p.ids.push_back(tok.bos());
  p.ids.insert(p.ids.end(), body.begin(), body.end());
  p.answer = tok.encode(std::to_string(key));
  return p;
}

PasskeyTask::PasskeyTask(const nlohmann::json& o, const Tokenizer* tok, const std::string& where) : tok_(tok) {
  train::check_task_options(o, {"length", "min_length"}, where);
  train::task_option(o, "length", length_, where, 64);
  train::task_option(o, "min_length", min_length_, where, 64);
  if (min_length_ < 0) min_length_ = length_;
  if (min_length_ > length_) throw Error(where + ": task option 'min_length' must be <= 'length'");
  if (!tok_) throw Error(where + ": task 'passkey' needs a tokenizer (data.tokenizer)");
  chars_per_token_ = passkey_chars_per_token(*tok_);
}

train::Document PasskeyTask::next(train::Rng& rng) const {
  const int64_t n = min_length_ + int64_t(rng.below(uint32_t(length_ - min_length_ + 1)));
  const double depth = rng.uniform();
  const int key = passkey_random_key(rng);
  const PasskeyPrompt p = passkey_prompt(*tok_, n, depth, key, chars_per_token_);
  train::Document d;
  d.tokens = p.ids;
  d.loss.assign(d.tokens.size(), 0);
  for (int t : p.answer) {
    d.tokens.push_back(t);
    d.loss.push_back(1);
  }
  d.tokens.push_back(tok_->eos());
  d.loss.push_back(0);
  return d;
}

int PasskeyTask::vocab_needed() const { return tok_->vocab_size(); }

}  // namespace ll::tasks
