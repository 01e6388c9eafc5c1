#pragma once
// Replays the four scenarios of a ../shared/reference/parity/<case> directory (prompt with cache,
// greedy generation across flushes, scoring without cache, continued call) and compares every
// logit, generated id and cache length with what the official implementation produced.
#include <string>
#include <vector>

namespace ll {

struct ScenarioResult {
  explicit ScenarioResult(std::string n = "") : name(std::move(n)) {}
  std::string name;
  double max_abs_error = 0.0;
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

ReferenceReport verify_reference(const std::string& case_dir, double tolerance);

}  // namespace ll
