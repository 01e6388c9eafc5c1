#pragma once
// LongLLaMA prompt formats, built exactly as the official instruction tuning built them
// (instruction_fine_tuning/data_processing.py): every text segment is encoded separately, so each
// gets its own SentencePiece dummy-prefix space.
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace ll {

enum class PromptTemplate { Plain, Instruct, Chat };
PromptTemplate parse_template(const std::string& name);  // "plain" | "instruct" | "chat"
const char* template_name(PromptTemplate t);

extern const char* const kDefaultSystemPrompt;  // OpenOrca-style system prompt of LongLLaMA-Instruct
extern const char* const kChatIntro;            // chat_initial_prompt
extern const char* const kChatUserPrefix;       // "\nUSER: "
extern const char* const kChatAssistantPrefix;  // "\nASSISTANT: "

// BOS + sp(text)
std::vector<int> build_plain(const Tokenizer& tok, const std::string& text);
// BOS + sp(system + "\n" + question + "\n"), one string; the model then writes sp(answer) EOS.
std::vector<int> build_instruct(const Tokenizer& tok, const std::string& system, const std::string& question);

struct ChatTurn {
  std::string role;  // "user" | "assistant"
  std::string text;
};
// BOS + sp(intro), then per turn sp(prefix) + sp(text) (+ EOS after assistant turns); when the last
// turn is the user's, ends with sp("\nASSISTANT: ") for the model to answer.
std::vector<int> build_chat(const Tokenizer& tok, const std::string& intro, const std::vector<ChatTurn>& turns);
// Ids appended to an ongoing chat for one new user message: sp("\nUSER: ") sp(text) sp("\nASSISTANT: ").
std::vector<int> chat_user_turn(const Tokenizer& tok, const std::string& text);
// Ids that close an assistant answer before the next user turn: EOS (append when generation stopped
// for another reason than EOS, e.g. a token limit or a stop string).
std::vector<int> chat_assistant_end(const Tokenizer& tok);

}  // namespace ll
