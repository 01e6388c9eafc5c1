#pragma once
// Replays the four scenarios of a ../shared/reference/parity/<case> directory (prompt with cache,
// greedy generation across flushes, scoring without cache, continued call) and compares every
// logit, generated id and cache length with what the official implementation produced.
#include <optional>
#include <string>
#include <vector>

#include "io/tensor_store.h"
#include "model/config.h"

namespace ll {

struct ScenarioResult {
  explicit ScenarioResult(std::string n = "") : name(std::move(n)) {}
  std::string name;
  double max_abs_error = 0.0;
  double mean_kl = 0.0;  // mean over logit rows of KL(reference softmax || ours)
  int64_t rows = 0;
  bool passed = true;
  std::vector<std::string> problems;  // ids or cache lengths that differ
};

struct ReferenceReport {
  std::string case_dir;
  double tolerance = 0.0;
  std::vector<ScenarioResult> scenarios;
  bool passed() const;
  std::string to_json() const;
};

// weight_type / mem_type (optional) run the case with converted weights or another memory
// storage type, to measure what they cost against the official outputs.
struct ReferenceOptions {
  std::optional<DType> weight_type;
  std::optional<MemDType> mem_type;
};
ReferenceReport verify_reference(const std::string& case_dir, double tolerance, const ReferenceOptions& opt = {});

}  // namespace ll
