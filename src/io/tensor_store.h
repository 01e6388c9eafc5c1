#pragma once
// Named tensors read from checkpoint files, zero-copy: data points into read-only mmaps that the
// store keeps alive. Readers validate everything (header sizes, offsets, dtypes, shapes) and throw
// ll::Error naming the file and the tensor; they never read outside a mapping.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "util/error.h"

namespace ll {

enum class DType : uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL, Q8_0, Q4_0 };

// Bytes per element of a plain type; for the block-quantized types (Q8_0, Q4_0: blocks of 32
// elements along the last dimension, GGML layouts) the bytes of one block.
size_t dtype_size(DType t);
int64_t dtype_block_elems(DType t);  // 1, or 32 for Q8_0 / Q4_0
bool dtype_is_quantized(DType t);
// Bytes of a row-major tensor; throws ll::Error when the last dimension is not a whole number of
// blocks or the size overflows.
size_t tensor_nbytes(DType t, const std::vector<int64_t>& shape);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", ... ("Q8_0", "Q4_0")

// A read-only memory mapping of a whole file (or an owned buffer, for tests and writers).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws ll::Error naming path
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorRef {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // contiguous, row-major, little-endian; valid while the store lives
  size_t nbytes = 0;
  std::string file;  // where it came from, for error messages
  int64_t numel() const;
};

class TensorStore {
 public:
  const TensorRef* find(const std::string& name) const;
  const TensorRef& get(const std::string& name) const;  // throws ll::Error if absent
  const std::map<std::string, TensorRef>& all() const { return tensors_; }
  size_t size() const { return tensors_.size(); }

  // Used by readers. add() throws on a duplicate name.
  void add(TensorRef t);
  void keep_alive(std::shared_ptr<const void> owner) { owners_.push_back(std::move(owner)); }
  void merge(TensorStore&& other);  // throws on duplicate names

 private:
  std::map<std::string, TensorRef> tensors_;
  std::vector<std::shared_ptr<const void>> owners_;
};

// model.safetensors (or any single safetensors file).
TensorStore read_safetensors(const std::string& path);
// pytorch_model.bin as written by torch.save (zip + pickle protocol 2), read directly.
TensorStore read_torch_bin(const std::string& path);
// A Hugging Face model directory: model.safetensors, model.safetensors.index.json (shards),
// pytorch_model.bin or pytorch_model.bin.index.json, tried in that order.
TensorStore read_checkpoint_dir(const std::string& dir);

// Element conversion to float32 (F32, F16, BF16; other dtypes throw naming the tensor).
std::vector<float> to_f32(const TensorRef& t);
void to_f32(const TensorRef& t, float* out);  // out holds t.numel() floats

// Writing safetensors: the file is written to a temp name next to `path` and renamed, so a crash
// never leaves a half-written file behind.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;
};
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Atomic write of a small text/binary file (temp + rename).
void write_file_atomic(const std::string& path, const std::string& contents);
// Writes via fill(fd) into path.tmp.<pid>, fsyncs and renames over `path` (then fsyncs the
// directory); on any failure removes the temp file, so no half-written file is left behind.
void write_atomic(const std::string& path, const std::function<void(int fd)>& fill);
// write(2) until done; throws ll::Error naming path.
void write_all(int fd, const void* data, size_t n, const std::string& path);

}  // namespace ll
