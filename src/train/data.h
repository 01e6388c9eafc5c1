#pragma once
// Training data: plain-text corpora, mixtures of sources, and the document-aware k-packing of
// the released JAX pipeline (DocAwareDataPipeline + KPackingDAPipeline).
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "train/tasks.h"

namespace ll::train {

// Plain-text files cut into documents ("file": each file; "paragraph": blocks separated by blank
// lines; "line": each non-empty line), each tokenized as [BOS] + sp(text) + [EOS] with no loss on
// BOS, as EasyLM's TextProcessor. A seeded hash puts about eval_fraction of the documents aside
// for evaluation (at least one when there are two or more).
class TextCorpus {
 public:
  TextCorpus(const std::vector<std::string>& files, const std::string& split, const Tokenizer& tok,
             double eval_fraction, uint64_t seed);
  const std::vector<Document>& train() const { return train_; }
  const std::vector<Document>& eval() const { return eval_; }
  int vocab_size() const { return vocab_; }
  int64_t train_tokens() const;

 private:
  std::vector<Document> train_, eval_;
  int vocab_ = 0;
};

// Documents drawn uniformly (with replacement) from one half of a corpus.
class TextSource : public DocumentSource {
 public:
  TextSource(std::shared_ptr<const TextCorpus> corpus, bool eval) : corpus_(std::move(corpus)), eval_(eval) {}
  Document next(Rng& rng) const override;
  int vocab_needed() const override { return corpus_->vocab_size(); }

 private:
  std::shared_ptr<const TextCorpus> corpus_;
  bool eval_;
};

// Each document comes from one of several sources, picked with probability ∝ weight.
class MixtureSource : public DocumentSource {
 public:
  void add(std::shared_ptr<const DocumentSource> s, double weight);
  Document next(Rng& rng) const override;
  int vocab_needed() const override;

 private:
  std::vector<std::shared_ptr<const DocumentSource>> sources_;
  std::vector<double> cumulative_;
};

// The k-packing document-aware pipeline. Each of `streams` batch slots owns a token stream made
// of whole documents concatenated without padding (…EOS BOS…, no masking at the boundary); a
// step takes the next k·S tokens of every stream and cuts them into k consecutive entries, so
// entries s·k .. s·k+k-1 are consecutive chunks of stream s. Targets are the inputs shifted by
// one (the last target of a step is the first input of the next). Documents are numbered in the
// order streams ask for them and document i is generated from Rng(mix_seed(seed, i)), so the
// whole state is (next document number, and per stream its document number and offset).
class PackedStreams {
 public:
  PackedStreams(std::shared_ptr<const DocumentSource> src, uint64_t seed, int streams, int k, int S);
  // inputs, targets, loss mask: [streams·k·S] each. With `attend`, also the attention targets of
  // the rows (Document::attend as rows of this batch: the input row of the key, -1 for none or
  // for a key before this step).
  void next(std::vector<int>& inputs, std::vector<int>& targets, std::vector<uint8_t>& mask,
            std::vector<int32_t>* attend = nullptr);
  nlohmann::json state() const;
  void restore(const nlohmann::json& state);  // throws ll::Error if it does not fit

 private:
  struct Stream {
    uint64_t index = 0;
    Document doc;
    size_t pos = 0;
  };
  Document document(uint64_t index) const;
  void pull(Stream& s);
  std::shared_ptr<const DocumentSource> src_;
  uint64_t seed_;
  int k_, S_;
  uint64_t next_doc_ = 0;
  std::vector<Stream> streams_;
};

}  // namespace ll::train
