#include "model/weights.h"
#include "util/error.h"

namespace ll {
Weights Weights::load_gguf(const std::string& path, std::optional<DType>, bool) {
  throw Error(path + ": GGUF loading is not built yet");
}
}  // namespace ll
