#include "train/tasks.h"

#include <algorithm>

#include "tasks/dictionary.h"
#include "tasks/passkey.h"
#include "util/error.h"

namespace ll::train {

uint64_t Rng::next() {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint32_t Rng::below(uint32_t n) { return uint32_t((unsigned __int128)(next() >> 32) * n >> 32); }

double Rng::uniform() { return double(next() >> 11) * 0x1.0p-53; }

uint64_t mix_seed(uint64_t a, uint64_t b) {
  Rng r(a ^ (b * 0xD1B54A32D192ED03ull));
  r.next();
  return r.next();
}

void check_task_options(const nlohmann::json& options, const std::vector<std::string>& known,
                        const std::string& where) {
  if (options.is_null()) return;
  if (!options.is_object()) throw Error(where + ": task options must be a JSON object");
  for (const auto& [key, value] : options.items())
    if (std::find(known.begin(), known.end(), key) == known.end())
      throw Error(where + ": unknown task option '" + key + "'");
}

void task_option(const nlohmann::json& options, const char* key, int& out, const std::string& where, int min_value) {
  if (options.is_null() || !options.contains(key)) return;
  const auto& v = options[key];
  if (!v.is_number_integer()) throw Error(where + ": task option '" + key + "' must be an integer");
  out = v.get<int>();
  if (out < min_value) throw Error(where + ": task option '" + key + "' must be >= " + std::to_string(min_value));
}

namespace {

// "copy": remember a key, recall it much later. A document of `length` tokens is
//   BOS <key> k1..kn  f f f ... f  <recall> k1..kn EOS
// with random symbols k and filler f; only the recalled k1..kn count in the loss. When
// the filler spans more than the local context, the key is only reachable through memory
// (crossbatch positives in training, the memory at inference): a minimal FoT task.
class CopyTask : public DocumentSource {
 public:
  CopyTask(const nlohmann::json& o, const std::string& where) {
    check_task_options(o, {"length", "key_length", "symbols"}, where);
    task_option(o, "length", length_, where, 1);
    task_option(o, "key_length", key_length_, where, 1);
    task_option(o, "symbols", symbols_, where, 2);
    if (length_ < 2 * key_length_ + 4)
      throw Error(where +
                  ": task option 'length' must be at least 2·key_length + 4 = " + std::to_string(2 * key_length_ + 4));
  }
  Document next(Rng& rng) const override {
    Document d;
    std::vector<int> key(key_length_);
    for (int& k : key) k = kFirstSymbol + int(rng.below(symbols_));
    auto put = [&](int tok, bool loss) {
      d.tokens.push_back(tok);
      d.loss.push_back(loss);
    };
    put(kBos, false);
    put(kKeyMark, false);
    for (int k : key) put(k, false);  // random: unpredictable, not in the loss
    const int filler = length_ - 2 * key_length_ - 4;
    for (int i = 0; i < filler; ++i) put(kFirstSymbol + int(rng.below(symbols_)), false);
    put(kRecallMark, false);
    for (int k : key) put(k, true);
    put(kEos, false);
    return d;
  }
  int vocab_needed() const override { return kFirstSymbol + symbols_; }

 private:
  static constexpr int kBos = 1, kEos = 2, kKeyMark = 3, kRecallMark = 4, kFirstSymbol = 5;
  int length_ = 64, key_length_ = 4, symbols_ = 16;
};

}  // namespace

std::map<std::string, TaskFactory>& task_registry() {
  static std::map<std::string, TaskFactory> r = {
      {"copy", [](const nlohmann::json& o, const Tokenizer*,
                  const std::string& where) { return std::unique_ptr<DocumentSource>(new CopyTask(o, where)); }},
      // src/tasks/: the paper's dictionary lookup and the LongLLaMA passkey prompt (docs/tasks.md).
      {"dictionary", [](const nlohmann::json& o, const Tokenizer*,
                        const std::string& where) { return std::unique_ptr<DocumentSource>(new tasks::DictionaryTask(o, where)); }},
      {"passkey", [](const nlohmann::json& o, const Tokenizer* tok,
                     const std::string& where) { return std::unique_ptr<DocumentSource>(new tasks::PasskeyTask(o, tok, where)); }},
  };
  return r;
}

std::unique_ptr<DocumentSource> make_task(const std::string& name, const nlohmann::json& options, const Tokenizer* tok,
                                          const std::string& where) {
  auto& r = task_registry();
  auto it = r.find(name);
  if (it == r.end()) {
    std::string known;
    for (const auto& [n, f] : r) known += (known.empty() ? "" : ", ") + n;
    throw Error(where + ": unknown task '" + name + "' (known: " + known + ")");
  }
  return it->second(options, tok, where);
}

}  // namespace ll::train
