#pragma once
// Documents for training, and the synthetic task generators.
//
// A Document is what a data source produces: token ids with BOS first and EOS last, and per
// token a loss flag saying whether PREDICTING that token counts in the loss (BOS never does, as
// in EasyLM's TextProcessor). Sources are pure functions of an Rng, so document i of a run is
// regenerated from (seed, i) alone: that is all the data state a checkpoint needs.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace ll {
class Tokenizer;
}

namespace ll::train {

// splitmix64: tiny, fast, and its whole state is one integer.
struct Rng {
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next();
  uint32_t below(uint32_t n);  // uniform in [0, n)
  double uniform();            // [0, 1)
  uint64_t s;
};
uint64_t mix_seed(uint64_t a, uint64_t b);  // for independent streams: Rng(mix_seed(seed, i))

struct Document {
  std::vector<int> tokens;
  std::vector<uint8_t> loss;  // loss[i]: the weight of predicting tokens[i] in the loss (0: not counted)
  // Optional (empty, or one per token): attend[i] >= 0 is the position of the key that the memory
  // layers' query predicting tokens[i] should attend to (the training option
  // memory_attention_loss); -1: none. Tasks that know where the answer is (dictionary) fill it.
  std::vector<int32_t> attend;
};

class DocumentSource {
 public:
  virtual ~DocumentSource() = default;
  virtual Document next(Rng& rng) const = 0;
  // Smallest vocab_size a model needs for these documents.
  virtual int vocab_needed() const = 0;
};

// Synthetic tasks: a name, options (a JSON object; unknown keys are errors) and optionally the
// tokenizer of the run (for tasks made of text). Token ids 0, 1, 2 are UNK/PAD, BOS, EOS as in
// the LLaMA tokenizers; a task without a tokenizer uses ids from 3 up.
using TaskFactory = std::function<std::unique_ptr<DocumentSource>(const nlohmann::json& options, const Tokenizer* tok,
                                                                  const std::string& where)>;
// The registry: add a task with one register_task call in tasks.cpp (task_registry()).
std::map<std::string, TaskFactory>& task_registry();
std::unique_ptr<DocumentSource> make_task(const std::string& name, const nlohmann::json& options, const Tokenizer* tok,
                                          const std::string& where);

// Reads option `key` of a task into out (keeps the default when absent); errors name `where`.
void task_option(const nlohmann::json& options, const char* key, int& out, const std::string& where, int min_value);
void check_task_options(const nlohmann::json& options, const std::vector<std::string>& known, const std::string& where);

}  // namespace ll::train
