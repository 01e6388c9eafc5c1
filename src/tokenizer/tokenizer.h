#pragma once
// SentencePiece tokenizer (OpenLLaMA v1/v2, Code Llama) and a streaming detokenizer.
#include <memory>
#include <string>
#include <vector>

namespace ll {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);  // throws ll::Error naming the path
  // For models embedded in other files; name_for_errors identifies the source in messages.
  static Tokenizer from_bytes(const std::string& serialized_model_proto, const std::string& name_for_errors);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int> encode(const std::string& text) const;  // no BOS/EOS, with the dummy prefix
  std::string decode(const std::vector<int>& ids) const;   // throws on ids outside the vocab
  int bos() const;
  int eos() const;
  int unk() const;
  int vocab_size() const;
  std::string piece(int id) const;
  float score(int id) const;
  // GGUF token type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
  int token_type(int id) const;
  const std::string& serialized() const;  // the model proto bytes, for embedding
  const std::string& name() const;        // path or name used in error messages

 private:
  struct Impl;
  Tokenizer() = default;
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer: push ids one at a time and get the newly completed text.
// Concatenating every push() and the final flush() equals tok.decode(all ids). Text is held back
// while it ends in an incomplete UTF-8 sequence (byte-fallback pieces).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok);
  std::string push(int id);
  std::string flush();  // emits whatever is held back (incomplete bytes decode to U+FFFD)
  void reset();

 private:
  std::string window_text(size_t from, size_t to) const;
  const Tokenizer* tok_;
  std::vector<int> ids_;
  size_t prefix_ = 0;  // start of the decode window (a token already emitted, for context)
  size_t read_ = 0;    // end of what has been emitted
  int sentinel_ = -1;  // piece decoded ahead of a mid-stream window so it never counts as text start
  std::string sentinel_text_;
};

}  // namespace ll
