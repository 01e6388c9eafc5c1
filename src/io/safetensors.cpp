// safetensors reader: 8-byte little-endian header length, JSON header, raw data section.
// Every field is validated before any pointer into the mapping is formed.
#include <limits>
#include <nlohmann/json.hpp>

#include "io/tensor_store.h"

namespace ll {

namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the official library's limit

bool parse_dtype(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> table[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"F64", DType::F64},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL}};
  for (const auto& [name, t] : table)
    if (s == name) {
      out = t;
      return true;
    }
  return false;
}

// A JSON integer that fits int64 (unsigned values above INT64_MAX are rejected), else false.
bool json_int(const nlohmann::json& j, int64_t& out) {
  if (j.is_number_unsigned()) {
    uint64_t u = j.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
    out = int64_t(u);
    return true;
  }
  if (j.is_number_integer()) {
    out = j.get<int64_t>();
    return true;
  }
  return false;
}

}  // namespace

TensorStore read_safetensors(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  const uint8_t* base = file->data();
  const size_t size = file->size();
  auto fail = [&](const std::string& what) -> Error { return Error(path + ": " + what); };

  if (size < 8) throw fail("file too small for a safetensors header (" + std::to_string(size) + " bytes)");
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t(base[i]) << (8 * i);
  if (hlen > size - 8)
    throw fail("header length " + std::to_string(hlen) + " exceeds the file size " + std::to_string(size) +
               " (truncated or not a safetensors file)");
  if (hlen > kMaxHeader) throw fail("header length " + std::to_string(hlen) + " exceeds 100 MB");

  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  nlohmann::json header = nlohmann::json::parse(hbegin, hbegin + hlen, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) throw fail("header is not valid JSON");
  if (!header.is_object()) throw fail("header is not a JSON object");

  const uint8_t* data = base + 8 + hlen;
  const uint64_t data_size = size - 8 - hlen;
  TensorStore store;
  for (const auto& [name, e] : header.items()) {
    if (name == "__metadata__") continue;
    auto bad = [&](const std::string& what) -> Error { return fail("tensor '" + name + "': " + what); };
    if (!e.is_object()) throw bad("entry is not an object");
    auto dt = e.find("dtype"), sh = e.find("shape"), off = e.find("data_offsets");
    if (dt == e.end() || !dt->is_string()) throw bad("missing or non-string \"dtype\"");
    if (sh == e.end() || !sh->is_array()) throw bad("missing or non-array \"shape\"");
    if (off == e.end() || !off->is_array() || off->size() != 2) throw bad("\"data_offsets\" must be [begin, end]");

    TensorRef t;
    t.name = name;
    t.file = path;
    if (!parse_dtype(dt->get<std::string>(), t.dtype)) throw bad("unknown dtype '" + dt->get<std::string>() + "'");
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      int64_t v;
      if (!json_int(d, v) || v < 0) throw bad("shape entries must be non-negative integers, got " + d.dump());
      if (__builtin_mul_overflow(numel, uint64_t(v), &numel) || numel > uint64_t(std::numeric_limits<int64_t>::max()))
        throw bad("shape " + sh->dump() + " overflows");
      t.shape.push_back(v);
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, uint64_t(dtype_size(t.dtype)), &nbytes)) throw bad("byte size overflows");
    int64_t b, en;
    if (!json_int((*off)[0], b) || !json_int((*off)[1], en) || b < 0 || en < 0)
      throw bad("data_offsets must be non-negative integers, got " + off->dump());
    if (b > en) throw bad("data_offsets begin " + std::to_string(b) + " > end " + std::to_string(en));
    if (uint64_t(en) > data_size)
      throw bad("data_offsets end " + std::to_string(en) + " is past the data section (" +
                std::to_string(data_size) + " bytes; file truncated?)");
    if (uint64_t(en - b) != nbytes)
      throw bad("data_offsets span " + std::to_string(en - b) + " bytes but " + dt->get<std::string>() +
                " shape " + sh->dump() + " needs " + std::to_string(nbytes));
    t.data = data + b;
    t.nbytes = size_t(nbytes);
    store.add(std::move(t));
  }
  store.keep_alive(std::move(file));
  return store;
}

}  // namespace ll
