#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/tensor_store.h"
#include "util/error.h"

namespace fs = std::filesystem;

namespace ll::train {

namespace {

void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) throw Error(p.string() + ": cannot open to fsync");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw Error(p.string() + ": fsync failed");
}

// ".NAME.tag-PID": hidden, and never mistaken for a checkpoint (those are "step-*").
std::string sibling_name(const fs::path& dir, const char* tag) {
  std::string n = ".";
  n += dir.filename().string();
  n += tag;
  n += std::to_string(::getpid());
  return n;
}

// Fills a fresh temporary sibling of `dir` via fill(tmp), fsyncs it, then renames it to dir.
// An existing dir is moved aside first and removed after the rename.
template <typename Fill>
void write_dir_atomic(const fs::path& dir, Fill fill) {
  const fs::path parent = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  fs::create_directories(parent);
  const fs::path tmp = parent / sibling_name(dir, ".tmp-");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp);
    for (const auto& e : fs::directory_iterator(tmp)) fsync_path(e.path());
    fsync_path(tmp);
    fs::path old;
    if (fs::exists(dir)) {
      old = parent / sibling_name(dir, ".old-");
      fs::remove_all(old);
      fs::rename(dir, old);
    }
    fs::rename(tmp, dir);
    fsync_path(parent);
    if (!old.empty()) fs::remove_all(old);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", (long long)step);
  return buf;
}

std::vector<fs::path> checkpoints(const fs::path& root) {
  std::vector<fs::path> r;
  if (!fs::is_directory(root)) return r;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && fs::exists(e.path() / "state.json")) r.push_back(e.path());
  }
  std::sort(r.begin(), r.end());  // zero-padded: lexical = numeric order
  return r;
}

void write_model_files(const fs::path& dir, const Model& m, bool bf16, const std::string& tokenizer_bytes) {
  m.save(dir.string(), bf16);
  if (!tokenizer_bytes.empty()) write_file_atomic((dir / "tokenizer.model").string(), tokenizer_bytes);
}

}  // namespace

void save_model_dir(const std::string& dir, const Model& m, bool bf16, const std::string& tokenizer_bytes) {
  write_dir_atomic(fs::path(dir), [&](const fs::path& tmp) { write_model_files(tmp, m, bf16, tokenizer_bytes); });
}

std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& ck, int keep) {
  const fs::path dir = fs::path(root) / step_name(step);
  write_dir_atomic(dir, [&](const fs::path& tmp) {
    write_model_files(tmp, ck.model, false, ck.tokenizer_bytes);
    const int64_t n = int64_t(ck.adam_m.size());
    write_safetensors((tmp / "optimizer.safetensors").string(),
                      {{"adam.m", DType::F32, {n}, ck.adam_m.data(), ck.adam_m.size() * 4},
                       {"adam.v", DType::F32, {n}, ck.adam_v.data(), ck.adam_v.size() * 4}});
    write_file_atomic((tmp / "state.json").string(), ck.state.dump(2) + "\n");
  });
  std::vector<fs::path> all = checkpoints(root);
  for (size_t i = 0; i + keep < all.size(); ++i) fs::remove_all(all[i]);
  return dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& root) {
  const auto all = checkpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back().string();
}

CheckpointData load_checkpoint(const std::string& dir) {
  CheckpointData ck;
  ck.model = Model::load(dir);
  TensorStore opt = read_safetensors((fs::path(dir) / "optimizer.safetensors").string());
  ck.adam_m = to_f32(opt.get("adam.m"));
  ck.adam_v = to_f32(opt.get("adam.v"));
  std::ifstream f(fs::path(dir) / "state.json");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    ck.state = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error(dir + "/state.json: not valid JSON: " + e.what());
  }
  const fs::path tok = fs::path(dir) / "tokenizer.model";
  if (fs::exists(tok)) {
    std::ifstream t(tok, std::ios::binary);
    std::stringstream ts;
    ts << t.rdbuf();
    ck.tokenizer_bytes = ts.str();
  }
  return ck;
}

}  // namespace ll::train
