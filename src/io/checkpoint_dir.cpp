// Hugging Face model directories: single-file or sharded, safetensors or torch.save.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "io/tensor_store.h"

namespace ll {

namespace fs = std::filesystem;

namespace {

using Reader = TensorStore (*)(const std::string&);

// Reads every shard an index names (each once), checks that each listed tensor is in the shard
// the index says, and merges. Tensors a shard holds beyond the index are kept.
TensorStore read_sharded(const fs::path& index_path, Reader read) {
  const std::string index = index_path.string();
  std::ifstream in(index_path, std::ios::binary);
  if (!in) throw Error(index + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) throw Error(index + ": not a valid JSON object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) throw Error(index + ": missing \"weight_map\" object");

  std::map<std::string, std::vector<std::string>> by_shard;  // shard -> tensors the index puts there
  std::vector<std::string> order;                           // shards in first-mention order
  for (const auto& [name, shard_j] : wm->items()) {
    if (!shard_j.is_string()) throw Error(index + ": tensor '" + name + "': shard name is not a string");
    const std::string shard = shard_j.get<std::string>();
    // Shards must sit next to the index: no directories, no escaping via "..".
    if (shard.empty() || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos ||
        shard.find("..") != std::string::npos || shard.find('\0') != std::string::npos)
      throw Error(index + ": tensor '" + name + "': invalid shard name '" + shard +
                  "' (must be a plain file name in the same directory)");
    auto [it, fresh] = by_shard.try_emplace(shard);
    if (fresh) order.push_back(shard);
    it->second.push_back(name);
  }
  if (order.empty()) throw Error(index + ": \"weight_map\" is empty");

  TensorStore all;
  for (const std::string& shard : order) {
    const fs::path sp = index_path.parent_path() / shard;
    std::error_code ec;
    if (!fs::is_regular_file(sp, ec))
      throw Error(index + ": shard '" + shard + "' is missing (expected " + sp.string() + ")");
    TensorStore part = read(sp.string());
    for (const std::string& name : by_shard[shard])
      if (!part.find(name))
        throw Error(index + ": tensor '" + name + "' is listed in shard '" + shard + "' but " + sp.string() +
                    " does not contain it");
    all.merge(std::move(part));
  }
  return all;
}

}  // namespace

TensorStore read_checkpoint_dir(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) throw Error(dir + ": not a directory");
  auto has = [&](const char* name) { return fs::is_regular_file(d / name, ec); };
  if (has("model.safetensors")) return read_safetensors((d / "model.safetensors").string());
  if (has("model.safetensors.index.json")) return read_sharded(d / "model.safetensors.index.json", read_safetensors);
  if (has("pytorch_model.bin")) return read_torch_bin((d / "pytorch_model.bin").string());
  if (has("pytorch_model.bin.index.json")) return read_sharded(d / "pytorch_model.bin.index.json", read_torch_bin);
  throw Error(dir + ": no model weights found (looked for model.safetensors, model.safetensors.index.json, "
              "pytorch_model.bin, pytorch_model.bin.index.json)");
}

}  // namespace ll
