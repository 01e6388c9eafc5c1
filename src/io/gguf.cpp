// GGUF v3 reader (zero-copy over a read-only mmap, every field validated) and atomic writer.
#include "io/gguf.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <set>

namespace ll {

static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

using VT = GGUFValue::Type;

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kDefaultAlignment = 32;
constexpr uint32_t kMaxAlignment = 1u << 16;
constexpr uint32_t kMaxDims = 4;
constexpr int64_t kMaxI64 = std::numeric_limits<int64_t>::max();

bool valid_type_id(uint32_t t) { return t <= uint32_t(VT::F64); }

// Bytes of one scalar element on disk (strings: their 8-byte length prefix, the minimum).
size_t scalar_disk_size(VT t) {
  switch (t) {
    case VT::U8: case VT::I8: case VT::BOOL: return 1;
    case VT::U16: case VT::I16: return 2;
    case VT::U32: case VT::I32: case VT::F32: return 4;
    case VT::U64: case VT::I64: case VT::F64: case VT::STRING: return 8;
    case VT::ARRAY: return 12;  // u32 type + u64 count
  }
  return 1;
}

bool is_unsigned(VT t) { return t == VT::U8 || t == VT::U16 || t == VT::U32 || t == VT::U64; }
bool is_signed(VT t) { return t == VT::I8 || t == VT::I16 || t == VT::I32 || t == VT::I64; }
bool is_integer(VT t) { return is_unsigned(t) || is_signed(t); }
bool is_float(VT t) { return t == VT::F32 || t == VT::F64; }

// ggml type ids <-> DType.
struct GgmlType {
  uint32_t id;
  DType dtype;
};
constexpr GgmlType kGgmlTypes[] = {
    {0, DType::F32}, {1, DType::F16},  {2, DType::Q4_0},  {8, DType::Q8_0},  {24, DType::I8},
    {25, DType::I16}, {26, DType::I32}, {27, DType::I64}, {28, DType::F64}, {30, DType::BF16},
};

bool ggml_to_dtype(uint32_t id, DType& out) {
  for (const auto& g : kGgmlTypes)
    if (g.id == id) {
      out = g.dtype;
      return true;
    }
  return false;
}

bool dtype_to_ggml(DType t, uint32_t& out) {
  for (const auto& g : kGgmlTypes)
    if (g.dtype == t) {
      out = g.id;
      return true;
    }
  return false;
}

std::string quote(const std::string& s) {
  // Names come from untrusted files: keep messages printable and bounded.
  std::string q = "'";
  size_t n = 0;
  for (unsigned char c : s) {
    if (++n > 200) {
      q += "...";
      break;
    }
    if (c >= 0x20 && c != 0x7f) {
      q += char(c);
    } else {
      static const char* hex = "0123456789abcdef";
      q += "\\x";
      q += hex[c >> 4];
      q += hex[c & 15];
    }
  }
  return q + "'";
}

// --- reading ---------------------------------------------------------------------------------

class Reader {
 public:
  Reader(const uint8_t* base, size_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

  // Context for error messages ("metadata key 'x'", "tensor 'y'").
  std::string ctx;

  Error fail(const std::string& what) const {
    return Error(path_ + ": " + (ctx.empty() ? "" : ctx + ": ") + what);
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const char* what) const {
    if (n > remaining())
      throw fail(std::string(what) + " at offset " + std::to_string(pos_) + " needs " + std::to_string(n) +
                 " bytes but the file ends at " + std::to_string(size_) + " (truncated?)");
  }

  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string str(const char* what) {
    const uint64_t n = get<uint64_t>(what);
    if (n > remaining())
      throw fail(std::string(what) + " length " + std::to_string(n) + " at offset " + std::to_string(pos_ - 8) +
                 " runs past the end of the file (" + std::to_string(size_) + " bytes)");
    std::string s(reinterpret_cast<const char*>(base_ + pos_), size_t(n));
    pos_ += size_t(n);
    return s;
  }

  std::string raw(size_t n, const char* what) {
    need(n, what);
    std::string s(reinterpret_cast<const char*>(base_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  const uint8_t* base_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

// Reads one scalar of type t into v (v.type is set by the caller for scalars).
void read_scalar(Reader& r, VT t, GGUFValue& v) {
  switch (t) {
    case VT::U8: v.u = r.get<uint8_t>("u8 value"); break;
    case VT::I8: v.i = r.get<int8_t>("i8 value"); break;
    case VT::U16: v.u = r.get<uint16_t>("u16 value"); break;
    case VT::I16: v.i = r.get<int16_t>("i16 value"); break;
    case VT::U32: v.u = r.get<uint32_t>("u32 value"); break;
    case VT::I32: v.i = r.get<int32_t>("i32 value"); break;
    case VT::U64: v.u = r.get<uint64_t>("u64 value"); break;
    case VT::I64: v.i = r.get<int64_t>("i64 value"); break;
    case VT::F32: v.f = r.get<float>("f32 value"); break;
    case VT::F64: v.f = r.get<double>("f64 value"); break;
    case VT::BOOL: {
      uint8_t b = r.get<uint8_t>("bool value");
      if (b > 1) throw r.fail("bool value is " + std::to_string(b) + ", not 0 or 1");
      v.b = b != 0;
      break;
    }
    case VT::STRING: v.s = r.str("string value"); break;
    case VT::ARRAY: throw r.fail("internal: array read as scalar");
  }
}

GGUFValue read_value(Reader& r, uint32_t type_id) {
  if (!valid_type_id(type_id)) throw r.fail("unknown value type " + std::to_string(type_id));
  GGUFValue v;
  v.type = VT(type_id);
  if (v.type != VT::ARRAY) {
    read_scalar(r, v.type, v);
    return v;
  }
  const uint32_t et = r.get<uint32_t>("array element type");
  if (et == uint32_t(VT::ARRAY)) throw r.fail("nested arrays are not supported");
  if (!valid_type_id(et)) throw r.fail("unknown array element type " + std::to_string(et));
  v.elem_type = VT(et);
  const uint64_t count = r.get<uint64_t>("array count");
  // Every element takes at least scalar_disk_size bytes, so this bounds both the loop and any
  // allocation by the file size (and rules out overflow in count * size).
  const size_t esize = scalar_disk_size(v.elem_type);
  if (count > r.remaining() / esize)
    throw r.fail("array of " + std::to_string(count) + " " + gguf_type_name(v.elem_type) +
                 " elements runs past the end of the file");
  const size_t n = size_t(count);
  switch (v.elem_type) {
    case VT::U8: case VT::I8: v.bytes = r.raw(n, "array data"); break;
    case VT::STRING:
      v.strings.reserve(n);
      for (size_t k = 0; k < n; ++k) v.strings.push_back(r.str("array string"));
      break;
    case VT::F32: case VT::F64: {
      v.floats.reserve(n);
      GGUFValue e;
      for (size_t k = 0; k < n; ++k) {
        read_scalar(r, v.elem_type, e);
        v.floats.push_back(e.f);
      }
      break;
    }
    case VT::BOOL: {
      v.ints.reserve(n);
      GGUFValue e;
      for (size_t k = 0; k < n; ++k) {
        read_scalar(r, v.elem_type, e);
        v.ints.push_back(e.b ? 1 : 0);
      }
      break;
    }
    default: {
      v.ints.reserve(n);
      GGUFValue e;
      for (size_t k = 0; k < n; ++k) {
        read_scalar(r, v.elem_type, e);
        v.ints.push_back(is_unsigned(v.elem_type) ? int64_t(e.u) : e.i);  // U64 bit-cast
      }
      break;
    }
  }
  return v;
}

struct TensorInfo {
  TensorRef ref;
  uint64_t offset = 0;
};

// --- writing ---------------------------------------------------------------------------------

void put_raw(std::string& out, const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
template <class T>
void put(std::string& out, T v) {
  put_raw(out, &v, sizeof(T));
}
void put_str(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

bool int_fits(VT t, int64_t v) {
  switch (t) {
    case VT::U8: return v >= 0 && v <= 0xff;
    case VT::I8: return v >= -128 && v <= 127;
    case VT::U16: return v >= 0 && v <= 0xffff;
    case VT::I16: return v >= -32768 && v <= 32767;
    case VT::U32: return v >= 0 && v <= int64_t(0xffffffffu);
    case VT::I32: return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
    case VT::U64: case VT::I64: return true;  // U64 elements are bit-cast
    case VT::BOOL: return v == 0 || v == 1;
    default: return false;
  }
}

void put_int(std::string& out, VT t, int64_t v) {
  switch (t) {
    case VT::U8: case VT::BOOL: put<uint8_t>(out, uint8_t(v)); break;
    case VT::I8: put<int8_t>(out, int8_t(v)); break;
    case VT::U16: put<uint16_t>(out, uint16_t(v)); break;
    case VT::I16: put<int16_t>(out, int16_t(v)); break;
    case VT::U32: put<uint32_t>(out, uint32_t(v)); break;
    case VT::I32: put<int32_t>(out, int32_t(v)); break;
    case VT::U64: put<uint64_t>(out, uint64_t(v)); break;
    case VT::I64: put<int64_t>(out, v); break;
    default: break;
  }
}

bool f32_fits(double d) { return !std::isfinite(d) || std::fabs(d) <= double(FLT_MAX); }

void put_value(std::string& out, const GGUFValue& v, const std::string& path, const std::string& key) {
  auto fail = [&](const std::string& what) -> Error {
    return Error(path + ": metadata key " + quote(key) + ": " + what);
  };
  if (!valid_type_id(uint32_t(v.type))) throw fail("invalid value type " + std::to_string(uint32_t(v.type)));
  put<uint32_t>(out, uint32_t(v.type));
  const uint64_t umax[] = {0xff, 0, 0xffff, 0, 0xffffffffu};
  switch (v.type) {
    case VT::U8: case VT::U16: case VT::U32:
      if (v.u > umax[uint32_t(v.type)])
        throw fail(std::to_string(v.u) + " does not fit a " + gguf_type_name(v.type));
      put_int(out, v.type, int64_t(v.u));
      break;
    case VT::U64: put<uint64_t>(out, v.u); break;
    case VT::I8: case VT::I16: case VT::I32: case VT::I64:
      if (!int_fits(v.type, v.i)) throw fail(std::to_string(v.i) + " does not fit a " + gguf_type_name(v.type));
      put_int(out, v.type, v.i);
      break;
    case VT::F32:
      if (!f32_fits(v.f)) throw fail("value does not fit an f32");
      put<float>(out, float(v.f));
      break;
    case VT::F64: put<double>(out, v.f); break;
    case VT::BOOL: put<uint8_t>(out, v.b ? 1 : 0); break;
    case VT::STRING: put_str(out, v.s); break;
    case VT::ARRAY: {
      const VT et = v.elem_type;
      if (et == VT::ARRAY) throw fail("nested arrays are not supported");
      if (!valid_type_id(uint32_t(et))) throw fail("invalid array element type " + std::to_string(uint32_t(et)));
      put<uint32_t>(out, uint32_t(et));
      put<uint64_t>(out, v.array_size());
      switch (et) {
        case VT::U8: case VT::I8: out += v.bytes; break;
        case VT::STRING:
          for (const auto& s : v.strings) put_str(out, s);
          break;
        case VT::F32:
          for (double d : v.floats) {
            if (!f32_fits(d)) throw fail("array element does not fit an f32");
            put<float>(out, float(d));
          }
          break;
        case VT::F64:
          for (double d : v.floats) put<double>(out, d);
          break;
        default:
          for (int64_t x : v.ints) {
            if (!int_fits(et, x))
              throw fail("array element " + std::to_string(x) + " does not fit a " + gguf_type_name(et));
            put_int(out, et, x);
          }
          break;
      }
      break;
    }
  }
}

bool valid_alignment(uint64_t a) { return a >= 1 && a <= kMaxAlignment && (a & (a - 1)) == 0; }

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }  // callers keep x small

// Validates everything and writes; `data(i, buf)` returns tensor i's bytes (possibly in buf).
void write_impl(const std::string& path, const std::map<std::string, GGUFValue>& metadata,
                const std::vector<GGUFTensorToWrite>& tensors, uint32_t alignment, bool need_data,
                const std::function<const uint8_t*(size_t, std::vector<uint8_t>&)>& data) {
  if (!valid_alignment(alignment))
    throw Error(path + ": alignment " + std::to_string(alignment) + " is not a power of two in [1, 65536]");

  // Metadata, general.architecture first, general.alignment added or checked.
  std::vector<std::pair<const std::string*, const GGUFValue*>> kvs;
  const GGUFValue align_value = GGUFValue::u32(alignment);
  static const std::string kAlignKey = "general.alignment", kArchKey = "general.architecture";
  if (auto it = metadata.find(kArchKey); it != metadata.end()) kvs.push_back({&it->first, &it->second});
  for (const auto& [k, v] : metadata) {
    if (k.empty()) throw Error(path + ": empty metadata key");
    if (k == kArchKey) continue;
    if (k == kAlignKey) {
      if (v.type != VT::U32 || v.u != alignment)
        throw Error(path + ": metadata key 'general.alignment' must be a u32 equal to the alignment " +
                    std::to_string(alignment));
    }
    kvs.push_back({&k, &v});
  }
  if (alignment != kDefaultAlignment && !metadata.count(kAlignKey)) kvs.push_back({&kAlignKey, &align_value});

  std::string header;
  put<uint32_t>(header, kMagic);
  put<uint32_t>(header, 3);
  put<uint64_t>(header, tensors.size());
  put<uint64_t>(header, kvs.size());
  for (const auto& [k, v] : kvs) {
    put_str(header, *k);
    put_value(header, *v, path, *k);
  }

  // Tensor infos, offsets aligned.
  std::set<std::string> seen;
  std::vector<uint64_t> offsets;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    auto fail = [&](const std::string& what) -> Error { return Error(path + ": tensor " + quote(t.name) + ": " + what); };
    if (t.name.empty()) throw Error(path + ": tensor with an empty name");
    if (!seen.insert(t.name).second) throw fail("duplicate name");
    uint32_t ggml;
    if (!dtype_to_ggml(t.dtype, ggml)) throw fail(std::string("dtype ") + dtype_name(t.dtype) + " has no GGUF type");
    if (t.shape.empty() || t.shape.size() > kMaxDims)
      throw fail("GGUF tensors need 1 to 4 dimensions, got " + std::to_string(t.shape.size()));
    size_t nb;
    try {
      nb = tensor_nbytes(t.dtype, t.shape);
    } catch (const Error& e) {
      throw fail(e.what());
    }
    if (nb != t.nbytes)
      throw fail("nbytes " + std::to_string(t.nbytes) + " does not match " + dtype_name(t.dtype) + " shape (" +
                 std::to_string(nb) + " bytes)");
    if (need_data && t.nbytes && !t.data) throw fail("null data");
    off = align_up(off, alignment);
    offsets.push_back(off);
    if (__builtin_add_overflow(off, uint64_t(t.nbytes), &off) || off > (uint64_t(1) << 62))
      throw fail("data section too large");

    put_str(header, t.name);
    put<uint32_t>(header, uint32_t(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<uint64_t>(header, uint64_t(*it));
    put<uint32_t>(header, ggml);
    put<uint64_t>(header, offsets.back());
  }
  header.append(size_t(align_up(header.size(), alignment) - header.size()), '\0');

  write_atomic(path, [&](int fd) {
    write_all(fd, header.data(), header.size(), path);
    const std::string zeros(alignment, '\0');
    std::vector<uint8_t> buf;
    uint64_t pos = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      write_all(fd, zeros.data(), size_t(offsets[i] - pos), path);
      pos = offsets[i];
      if (tensors[i].nbytes == 0) continue;
      const uint8_t* p = data(i, buf);
      write_all(fd, p, tensors[i].nbytes, path);
      pos += tensors[i].nbytes;
    }
    write_all(fd, zeros.data(), size_t(align_up(pos, alignment) - pos), path);
  });
}

}  // namespace

// --- GGUFValue -------------------------------------------------------------------------------

const char* gguf_type_name(VT t) {
  switch (t) {
    case VT::U8: return "u8";
    case VT::I8: return "i8";
    case VT::U16: return "u16";
    case VT::I16: return "i16";
    case VT::U32: return "u32";
    case VT::I32: return "i32";
    case VT::F32: return "f32";
    case VT::BOOL: return "bool";
    case VT::STRING: return "string";
    case VT::ARRAY: return "array";
    case VT::U64: return "u64";
    case VT::I64: return "i64";
    case VT::F64: return "f64";
  }
  return "?";
}

static GGUFValue scalar_u(VT t, uint64_t v) {
  GGUFValue r;
  r.type = t;
  r.u = v;
  return r;
}
static GGUFValue scalar_i(VT t, int64_t v) {
  GGUFValue r;
  r.type = t;
  r.i = v;
  return r;
}
static GGUFValue array_of(VT et) {
  GGUFValue r;
  r.type = VT::ARRAY;
  r.elem_type = et;
  return r;
}

GGUFValue GGUFValue::u8(uint8_t v) { return scalar_u(VT::U8, v); }
GGUFValue GGUFValue::i8(int8_t v) { return scalar_i(VT::I8, v); }
GGUFValue GGUFValue::u16(uint16_t v) { return scalar_u(VT::U16, v); }
GGUFValue GGUFValue::i16(int16_t v) { return scalar_i(VT::I16, v); }
GGUFValue GGUFValue::u32(uint32_t v) { return scalar_u(VT::U32, v); }
GGUFValue GGUFValue::i32(int32_t v) { return scalar_i(VT::I32, v); }
GGUFValue GGUFValue::u64(uint64_t v) { return scalar_u(VT::U64, v); }
GGUFValue GGUFValue::i64(int64_t v) { return scalar_i(VT::I64, v); }
GGUFValue GGUFValue::f32(float v) {
  GGUFValue r;
  r.type = VT::F32;
  r.f = v;
  return r;
}
GGUFValue GGUFValue::f64(double v) {
  GGUFValue r;
  r.type = VT::F64;
  r.f = v;
  return r;
}
GGUFValue GGUFValue::boolean(bool v) {
  GGUFValue r;
  r.type = VT::BOOL;
  r.b = v;
  return r;
}
GGUFValue GGUFValue::string(std::string v) {
  GGUFValue r;
  r.type = VT::STRING;
  r.s = std::move(v);
  return r;
}
GGUFValue GGUFValue::string_array(std::vector<std::string> v) {
  GGUFValue r = array_of(VT::STRING);
  r.strings = std::move(v);
  return r;
}
GGUFValue GGUFValue::f32_array(std::vector<float> v) {
  GGUFValue r = array_of(VT::F32);
  r.floats.assign(v.begin(), v.end());
  return r;
}
GGUFValue GGUFValue::f64_array(std::vector<double> v) {
  GGUFValue r = array_of(VT::F64);
  r.floats = std::move(v);
  return r;
}
GGUFValue GGUFValue::i32_array(std::vector<int32_t> v) {
  GGUFValue r = array_of(VT::I32);
  r.ints.assign(v.begin(), v.end());
  return r;
}
GGUFValue GGUFValue::u8_array(std::string b) {
  GGUFValue r = array_of(VT::U8);
  r.bytes = std::move(b);
  return r;
}
GGUFValue GGUFValue::i8_array(std::string b) {
  GGUFValue r = array_of(VT::I8);
  r.bytes = std::move(b);
  return r;
}
GGUFValue GGUFValue::bool_array(std::vector<bool> v) {
  GGUFValue r = array_of(VT::BOOL);
  for (bool x : v) r.ints.push_back(x ? 1 : 0);
  return r;
}
GGUFValue GGUFValue::int_array(Type elem, std::vector<int64_t> v) {
  if (!is_integer(elem) || elem == VT::U8 || elem == VT::I8)
    throw Error(std::string("GGUFValue::int_array: element type ") + gguf_type_name(elem) +
                " is not one of u16 i16 u32 i32 u64 i64 (use u8_array / i8_array for bytes)");
  GGUFValue r = array_of(elem);
  r.ints = std::move(v);
  return r;
}

size_t GGUFValue::array_size() const {
  if (type != VT::ARRAY) return 0;
  switch (elem_type) {
    case VT::U8: case VT::I8: return bytes.size();
    case VT::STRING: return strings.size();
    case VT::F32: case VT::F64: return floats.size();
    default: return ints.size();
  }
}

static bool same_double(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

bool GGUFValue::operator==(const GGUFValue& o) const {
  if (type != o.type) return false;
  switch (type) {
    case VT::U8: case VT::U16: case VT::U32: case VT::U64: return u == o.u;
    case VT::I8: case VT::I16: case VT::I32: case VT::I64: return i == o.i;
    case VT::F32: case VT::F64: return same_double(f, o.f);
    case VT::BOOL: return b == o.b;
    case VT::STRING: return s == o.s;
    case VT::ARRAY:
      if (elem_type != o.elem_type) return false;
      switch (elem_type) {
        case VT::U8: case VT::I8: return bytes == o.bytes;
        case VT::STRING: return strings == o.strings;
        case VT::F32: case VT::F64:
          return floats.size() == o.floats.size() &&
                 std::equal(floats.begin(), floats.end(), o.floats.begin(), same_double);
        default: return ints == o.ints;
      }
  }
  return false;
}

// --- GGUFFile getters ------------------------------------------------------------------------

bool GGUFFile::has(const std::string& key) const { return metadata.count(key) != 0; }

const GGUFValue& GGUFFile::get(const std::string& key) const {
  auto it = metadata.find(key);
  if (it == metadata.end()) throw Error(path + ": metadata key " + quote(key) + " not found");
  return it->second;
}

static Error wrong_type(const std::string& path, const std::string& key, const GGUFValue& v, const char* want) {
  std::string got = gguf_type_name(v.type);
  if (v.type == VT::ARRAY) got += std::string(" of ") + gguf_type_name(v.elem_type);
  return Error(path + ": metadata key " + quote(key) + " is " + got + ", expected " + want);
}

int64_t GGUFFile::get_int(const std::string& key) const {
  const GGUFValue& v = get(key);
  if (is_signed(v.type)) return v.i;
  if (is_unsigned(v.type)) {
    if (v.u > uint64_t(kMaxI64)) throw Error(path + ": metadata key " + quote(key) + ": value " + std::to_string(v.u) + " is too large");
    return int64_t(v.u);
  }
  throw wrong_type(path, key, v, "an integer");
}

double GGUFFile::get_float(const std::string& key) const {
  const GGUFValue& v = get(key);
  if (is_float(v.type)) return v.f;
  if (is_signed(v.type)) return double(v.i);
  if (is_unsigned(v.type)) return double(v.u);
  throw wrong_type(path, key, v, "a number");
}

bool GGUFFile::get_bool(const std::string& key) const {
  const GGUFValue& v = get(key);
  if (v.type != VT::BOOL) throw wrong_type(path, key, v, "bool");
  return v.b;
}

const std::string& GGUFFile::get_string(const std::string& key) const {
  const GGUFValue& v = get(key);
  if (v.type != VT::STRING) throw wrong_type(path, key, v, "string");
  return v.s;
}

const GGUFValue& GGUFFile::get_array(const std::string& key, GGUFValue::Type elem) const {
  const GGUFValue& v = get(key);
  if (v.type != VT::ARRAY || v.elem_type != elem)
    throw wrong_type(path, key, v, (std::string("array of ") + gguf_type_name(elem)).c_str());
  return v;
}

// --- read_gguf -------------------------------------------------------------------------------

GGUFFile read_gguf(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  const uint8_t* base = file->data();
  const size_t size = file->size();
  Reader r(base, size, path);

  GGUFFile out;
  out.path = path;

  if (size < 4) throw r.fail("file too small for a GGUF header (" + std::to_string(size) + " bytes)");
  const uint32_t magic = r.get<uint32_t>("magic");
  if (magic != kMagic) throw r.fail("bad magic (not a GGUF file)");
  const uint32_t version = r.get<uint32_t>("version");
  if (version == 1) throw r.fail("GGUF version 1 is not supported (re-convert the file)");
  if (version != 2 && version != 3) {
    std::string hint = (version & 0xffff) == 0 ? " (a big-endian GGUF file?)" : "";
    throw r.fail("unsupported GGUF version " + std::to_string(version) + hint);
  }
  out.version = version;
  const uint64_t n_tensors = r.get<uint64_t>("tensor count");
  const uint64_t n_kv = r.get<uint64_t>("metadata count");
  // Minimum on-disk sizes: a KV is key length (8) + type (4) + a 1-byte value; a tensor info is
  // name length (8) + n_dims (4) + one ne (8) + type (4) + offset (8).
  const uint64_t rem = r.remaining();
  if (n_kv > rem / 13 || n_tensors > rem / 32 || n_kv * 13 + n_tensors * 32 > rem)
    throw r.fail("header claims " + std::to_string(n_kv) + " metadata entries and " + std::to_string(n_tensors) +
                 " tensors, more than the file (" + std::to_string(size) + " bytes) can hold");

  for (uint64_t k = 0; k < n_kv; ++k) {
    r.ctx = "metadata entry #" + std::to_string(k);
    std::string key = r.str("key");
    if (key.empty()) throw r.fail("empty key");
    r.ctx = "metadata key " + quote(key);
    if (out.metadata.count(key)) throw r.fail("duplicate key");
    const uint32_t type = r.get<uint32_t>("value type");
    GGUFValue v = read_value(r, type);
    out.metadata.emplace(std::move(key), std::move(v));
  }
  r.ctx.clear();

  if (auto it = out.metadata.find("general.alignment"); it != out.metadata.end()) {
    r.ctx = "metadata key 'general.alignment'";
    if (it->second.type != VT::U32) throw r.fail(std::string("must be a u32, got ") + gguf_type_name(it->second.type));
    if (!valid_alignment(it->second.u))
      throw r.fail(std::to_string(it->second.u) + " is not a power of two in [1, 65536]");
    out.alignment = uint32_t(it->second.u);
    r.ctx.clear();
  }

  std::vector<TensorInfo> infos;
  std::set<std::string> names;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    r.ctx = "tensor info #" + std::to_string(k);
    TensorInfo ti;
    ti.ref.name = r.str("tensor name");
    if (ti.ref.name.empty()) throw r.fail("empty tensor name");
    r.ctx = "tensor " + quote(ti.ref.name);
    if (!names.insert(ti.ref.name).second) throw r.fail("duplicate tensor name");
    const uint32_t n_dims = r.get<uint32_t>("n_dims");
    if (n_dims < 1 || n_dims > kMaxDims) throw r.fail("n_dims is " + std::to_string(n_dims) + ", expected 1 to 4");
    std::vector<int64_t> ne(n_dims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t v = r.get<uint64_t>("dimension");
      if (v > uint64_t(kMaxI64)) throw r.fail("dimension " + std::to_string(d) + " is negative or huge (" + std::to_string(v) + ")");
      if (__builtin_mul_overflow(numel, v, &numel) || numel > uint64_t(kMaxI64))
        throw r.fail("element count overflows");
      ne[d] = int64_t(v);
    }
    ti.ref.shape.assign(ne.rbegin(), ne.rend());
    const uint32_t type = r.get<uint32_t>("ggml type");
    if (!ggml_to_dtype(type, ti.ref.dtype)) throw r.fail("unsupported ggml type " + std::to_string(type));
    const uint64_t block = uint64_t(dtype_block_elems(ti.ref.dtype));
    if (uint64_t(ne[0]) % block != 0)
      throw r.fail(std::string(dtype_name(ti.ref.dtype)) + " needs the innermost dimension (" + std::to_string(ne[0]) +
                   ") to be a multiple of " + std::to_string(block));
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel / block, uint64_t(dtype_size(ti.ref.dtype)), &nbytes))
      throw r.fail("byte size overflows");
    ti.ref.nbytes = size_t(nbytes);
    ti.offset = r.get<uint64_t>("data offset");
    if (ti.offset % out.alignment != 0)
      throw r.fail("data offset " + std::to_string(ti.offset) + " is not a multiple of the alignment " +
                   std::to_string(out.alignment));
    ti.ref.file = path;
    infos.push_back(std::move(ti));
  }
  r.ctx.clear();

  if (!infos.empty()) {
    const uint64_t data_start = align_up(r.pos(), out.alignment);  // pos <= size, no overflow
    if (data_start > size)
      throw r.fail("tensor data section would start at " + std::to_string(data_start) + ", past the end of the file (" +
                   std::to_string(size) + " bytes; truncated?)");
    const uint64_t data_size = size - data_start;
    for (auto& ti : infos) {
      if (ti.offset > data_size || ti.ref.nbytes > data_size - ti.offset)
        throw Error(path + ": tensor " + quote(ti.ref.name) + ": data [" + std::to_string(ti.offset) + ", +" +
                    std::to_string(ti.ref.nbytes) + ") runs past the end of the data section (" +
                    std::to_string(data_size) + " bytes; truncated?)");
      ti.ref.data = base + data_start + ti.offset;
    }
    std::vector<const TensorInfo*> order;
    for (const auto& ti : infos)
      if (ti.ref.nbytes) order.push_back(&ti);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
    for (size_t k = 1; k < order.size(); ++k)
      if (order[k - 1]->offset + order[k - 1]->ref.nbytes > order[k]->offset)
        throw Error(path + ": tensors " + quote(order[k - 1]->ref.name) + " and " + quote(order[k]->ref.name) +
                    " overlap in the data section");
  }

  for (auto& ti : infos) out.tensors.add(std::move(ti.ref));
  out.tensors.keep_alive(std::move(file));
  return out;
}

// --- writers ---------------------------------------------------------------------------------

void write_gguf(const std::string& path, const std::map<std::string, GGUFValue>& metadata,
                const std::vector<GGUFTensorToWrite>& tensors, uint32_t alignment) {
  write_impl(path, metadata, tensors, alignment, /*need_data=*/true,
             [&](size_t i, std::vector<uint8_t>&) { return static_cast<const uint8_t*>(tensors[i].data); });
}

void write_gguf_streaming(const std::string& path, const std::map<std::string, GGUFValue>& metadata,
                          const std::vector<GGUFTensorToWrite>& tensors,
                          const std::function<void(size_t index, uint8_t* out)>& fill, uint32_t alignment) {
  if (!fill) throw Error(path + ": write_gguf_streaming needs a fill callback");
  write_impl(path, metadata, tensors, alignment, /*need_data=*/false, [&](size_t i, std::vector<uint8_t>& buf) {
    buf.assign(tensors[i].nbytes, 0);
    fill(i, buf.data());
    return static_cast<const uint8_t*>(buf.data());
  });
}

}  // namespace ll
