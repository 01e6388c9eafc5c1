// TensorStore bookkeeping, dtype helpers, float conversion and atomic writers.
#include "io/tensor_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "util/half.h"

namespace ll {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
    case DType::Q8_0: return 34;  // f16 scale + 32 x int8
    case DType::Q4_0: return 18;  // f16 scale + 32 x 4 bits
  }
  return 0;
}

int64_t dtype_block_elems(DType t) { return dtype_is_quantized(t) ? 32 : 1; }

bool dtype_is_quantized(DType t) { return t == DType::Q8_0 || t == DType::Q4_0; }

size_t tensor_nbytes(DType t, const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0 || __builtin_mul_overflow(n, uint64_t(s), &n)) throw Error("tensor shape is negative or overflows");
  }
  const int64_t block = dtype_block_elems(t);
  if (block > 1 && (shape.empty() || shape.back() % block != 0))
    throw Error(std::string("a ") + dtype_name(t) + " tensor needs its last dimension to be a multiple of " +
                std::to_string(block));
  uint64_t bytes;
  if (__builtin_mul_overflow(n / uint64_t(block), uint64_t(dtype_size(t)), &bytes)) throw Error("tensor size overflows");
  return size_t(bytes);
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
    case DType::Q8_0: return "Q8_0";
    case DType::Q4_0: return "Q4_0";
  }
  return "?";
}

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // readers have already checked for overflow
  return n;
}

const TensorRef* TensorStore::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const TensorRef& TensorStore::get(const std::string& name) const {
  if (const TensorRef* t = find(name)) return *t;
  std::string from;
  if (!tensors_.empty()) from = " (read from " + tensors_.begin()->second.file + ", ...)";
  throw Error("tensor '" + name + "' not found in checkpoint" + from);
}

static Error duplicate(const std::string& name, const std::string& a, const std::string& b) {
  if (a == b) return Error(b + ": tensor '" + name + "' appears twice");
  return Error("tensor '" + name + "' appears twice: in " + a + " and in " + b);
}

void TensorStore::add(TensorRef t) {
  if (auto it = tensors_.find(t.name); it != tensors_.end()) throw duplicate(t.name, it->second.file, t.file);
  std::string key = t.name;
  tensors_.emplace(std::move(key), std::move(t));
}

void TensorStore::merge(TensorStore&& other) {
  // Check first so a failed merge leaves *this untouched.
  for (const auto& [name, t] : other.tensors_)
    if (auto it = tensors_.find(name); it != tensors_.end()) throw duplicate(name, it->second.file, t.file);
  tensors_.merge(other.tensors_);
  for (auto& o : other.owners_) owners_.push_back(std::move(o));
  other.owners_.clear();
}

static void check_convertible(const TensorRef& t) {
  if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
    throw Error(t.file + ": tensor '" + t.name + "': cannot convert dtype " + dtype_name(t.dtype) +
                " to float32");
  if (t.nbytes != size_t(t.numel()) * dtype_size(t.dtype))
    throw Error(t.file + ": tensor '" + t.name + "': byte size does not match its shape");
}

void to_f32(const TensorRef& t, float* out) {
  check_convertible(t);
  const size_t n = size_t(t.numel());
  const auto* src = static_cast<const uint8_t*>(t.data);
  if (t.dtype == DType::F32) {
    if (n) std::memcpy(out, src, n * 4);  // also handles unaligned safetensors data
    return;
  }
  const bool bf = t.dtype == DType::BF16;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    out[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
  }
}

std::vector<float> to_f32(const TensorRef& t) {
  check_convertible(t);
  std::vector<float> v(size_t(t.numel()));
  to_f32(t, v.data());
  return v;
}

// --- atomic writing -----------------------------------------------------------------------

void write_atomic(const std::string& path, const std::function<void(int fd)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(path + ": cannot create temp file " + tmp + ": " + std::strerror(errno));
  try {
    fill(fd);
    if (::fsync(fd) != 0) throw Error(path + ": fsync failed: " + std::strerror(errno));
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw Error(path + ": close failed: " + std::strerror(errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw Error(path + ": cannot rename temp file into place: " + std::strerror(errno));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; failure here does not undo the write.
  std::string dir = std::filesystem::path(path).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error(path + ": write failed: " + std::strerror(errno));
    p += w;
    n -= size_t(w);
  }
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomic(path, [&](int fd) { write_all(fd, contents.data(), contents.size(), path); });
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    auto fail = [&](const std::string& what) {
      throw Error(path + ": tensor '" + t.name + "': " + what);
    };
    if (t.name == "__metadata__") fail("reserved name");
    if (!seen.insert(t.name).second) fail("duplicate name");
    uint64_t n = 1;
    for (int64_t d : t.shape) {
      if (d < 0) fail("negative dimension");
      if (__builtin_mul_overflow(n, uint64_t(d), &n)) fail("shape overflows");
    }
    if (__builtin_mul_overflow(n, uint64_t(dtype_size(t.dtype)), &n) || n != t.nbytes)
      fail("nbytes " + std::to_string(t.nbytes) + " does not match dtype and shape");
    if (t.nbytes && !t.data) fail("null data");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // pad so the data section starts 8-byte aligned
  write_atomic(path, [&](int fd) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
    write_all(fd, len, 8, path);
    write_all(fd, h.data(), h.size(), path);
    for (const auto& t : tensors)
      if (t.nbytes) write_all(fd, t.data, t.nbytes, path);
  });
}

}  // namespace ll
