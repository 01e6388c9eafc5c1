#pragma once
// One exception type for every user-facing failure: bad files, bad arguments, bad shapes.
// The message always names what was wrong (file, tensor, field or argument).
#include <stdexcept>
#include <string>

namespace ll {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace ll
