#pragma once
// GGUF v3, the single-file model format of llama.cpp / ggml (little-endian):
//   "GGUF" u32 version u64 tensor_count u64 kv_count
//   kv_count x { string key, u32 value_type, value }
//   tensor_count x { string name, u32 n_dims, u64 ne[n_dims] (innermost first), u32 ggml_type, u64 offset }
//   padding to general.alignment (default 32), tensor data section (offsets relative to its start).
// Strings are u64 length + bytes (no NUL). Arrays are u32 element type + u64 count + elements.
//
// read_gguf maps the file read-only and validates everything before forming any pointer into it
// (untrusted input): versions 2 and 3 are accepted, nested arrays are rejected, tensors must have
// 1..4 dims, known types, aligned non-overlapping in-file data. Errors are ll::Error naming the file
// and the key or tensor. Tensors are zero-copy (data points into the mapping, which the returned
// TensorStore keeps alive) and their shapes are row-major, outermost first (the reverse of ggml's ne).
//
// ggml types supported: F32=0 F16=1 Q4_0=2 Q8_0=8 I8=24 I16=25 I32=26 I64=27 F64=28 BF16=30.
// DType::U8 and DType::BOOL have no ggml type and cannot be written.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "io/tensor_store.h"

namespace ll {

// A metadata value: a scalar, a string, or an array of one scalar/string type.
// Storage by type (only the one field that matches is meaningful):
//   U8 U16 U32 U64           -> u
//   I8 I16 I32 I64           -> i
//   F32 F64                  -> f
//   BOOL                     -> b
//   STRING                   -> s
//   ARRAY of U8 / I8         -> bytes (raw bytes; I8 elements are the bytes reinterpreted as int8)
//   ARRAY of other integers  -> ints (U64 elements are stored bit-cast to int64)
//   ARRAY of BOOL            -> ints (0 / 1)
//   ARRAY of F32 / F64       -> floats
//   ARRAY of STRING          -> strings
// Nested arrays (elem_type ARRAY) are not supported, on read or write.
struct GGUFValue {
  enum class Type : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12
  };
  Type type = Type::U32;
  Type elem_type = Type::U8;  // for ARRAY

  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  bool b = false;
  std::string s;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
  std::string bytes;

  static GGUFValue u8(uint8_t v);
  static GGUFValue i8(int8_t v);
  static GGUFValue u16(uint16_t v);
  static GGUFValue i16(int16_t v);
  static GGUFValue u32(uint32_t v);
  static GGUFValue i32(int32_t v);
  static GGUFValue u64(uint64_t v);
  static GGUFValue i64(int64_t v);
  static GGUFValue f32(float v);
  static GGUFValue f64(double v);
  static GGUFValue boolean(bool v);
  static GGUFValue string(std::string v);
  static GGUFValue string_array(std::vector<std::string> v);
  static GGUFValue f32_array(std::vector<float> v);
  static GGUFValue f64_array(std::vector<double> v);
  static GGUFValue i32_array(std::vector<int32_t> v);
  static GGUFValue u8_array(std::string bytes);
  static GGUFValue i8_array(std::string bytes);
  static GGUFValue bool_array(std::vector<bool> v);
  // Any integer element type (U16 I16 U32 I32 U64 I64; U64 values bit-cast to int64). The writer
  // checks each element fits the type.
  static GGUFValue int_array(Type elem, std::vector<int64_t> v);

  size_t array_size() const;  // element count of an ARRAY (0 for scalars)
  bool operator==(const GGUFValue& o) const;  // compares only the fields the type uses
};

const char* gguf_type_name(GGUFValue::Type t);  // "u32", "string", "array", ...

struct GGUFFile {
  std::map<std::string, GGUFValue> metadata;
  TensorStore tensors;  // zero-copy into the mapping, shapes row-major
  std::string path;
  uint32_t alignment = 32;
  uint32_t version = 3;

  // Typed getters; throw ll::Error naming the file and the key when missing or of the wrong type.
  const GGUFValue& get(const std::string& key) const;
  bool has(const std::string& key) const;
  int64_t get_int(const std::string& key) const;     // any integer scalar (U64 above INT64_MAX throws)
  double get_float(const std::string& key) const;    // F32 / F64 or any integer scalar
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  // An ARRAY of the given element type (for U8/I8 read .bytes, for integers .ints, ...).
  const GGUFValue& get_array(const std::string& key, GGUFValue::Type elem) const;
};

GGUFFile read_gguf(const std::string& path);

struct GGUFTensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // row-major, 1..4 dims
  const void* data;            // nbytes bytes (ignored by write_gguf_streaming)
  size_t nbytes;               // must equal tensor_nbytes(dtype, shape)
};

// Writes GGUF v3 atomically (temp file next to path, fsync, rename; the temp file is removed on
// any failure). Metadata keys are written with general.architecture first, then in map order;
// general.alignment (u32) is added when alignment != 32 (an existing general.alignment must agree).
// Tensor infos and data are in the given order, each tensor's data at an offset that is a multiple
// of `alignment` (a power of two in [1, 65536]), padded with zeros after each tensor as llama.cpp
// does. Everything is validated before the temp file is created.
void write_gguf(const std::string& path, const std::map<std::string, GGUFValue>& metadata,
                const std::vector<GGUFTensorToWrite>& tensors, uint32_t alignment = 32);

// Same file, but each tensor's bytes are produced on demand: fill(index, out) is called once per
// tensor, in order, with a zeroed buffer of tensors[index].nbytes bytes to fill (not called for
// zero-size tensors), so a converter holds at most one tensor in memory. An exception thrown by fill
// aborts the write and removes the temp file.
void write_gguf_streaming(const std::string& path, const std::map<std::string, GGUFValue>& metadata,
                          const std::vector<GGUFTensorToWrite>& tensors,
                          const std::function<void(size_t index, uint8_t* out)>& fill,
                          uint32_t alignment = 32);

}  // namespace ll
