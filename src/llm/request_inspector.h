// What makes the proxy LLM-aware on the way in: a validating parse of the request body (simdjson)
// that extracts the few fields routing and metering need. The body itself is never modified.
#pragma once

#include <simdjson.h>

#include <string>
#include <string_view>

#include "http/errors.h"
#include "llm/token_estimate.h"

namespace llmproxy::llm {

enum class Endpoint { chat_completions, completions, embeddings };
std::string_view to_string(Endpoint e);

// The longest `model` and `user` a request may carry. They are routing and billing keys, held in
// every usage record until it is delivered: an unbounded one would let a single client fill the
// usage queue's memory (and the ledger) with megabytes per request. Longer ones are refused with
// 400 string_above_max_length, as OpenAI refuses strings over its field limits, rather than cut:
// two users whose ids share the first bytes must not be billed as one.
inline constexpr std::size_t kMaxIdentifierBytes = 1024;

struct RequestInfo {
  bool stream = false;
  bool include_usage = false;       // stream_options.include_usage was true
  std::string model;                // empty when absent
  std::string user;                 // the OpenAI `user` field, empty when absent
  bool has_stream_options = false;  // the key is present (any value)
  // stream_options.continuous_usage_stats was true and include_usage absent: the client wants
  // usage (vLLM reads it so), though only vLLM defaults include_usage to true.
  bool continuous_usage = false;
  // The prompt's text (message contents, prompt, input), for an estimate when the backend
  // reports no usage; token-id prompts are counted exactly in prompt_token_ids.
  TextCount prompt_text;
  std::int64_t prompt_token_ids = 0;
  int messages = 0;
  // Tool definitions (`tools`, legacy `functions`) as JSON text, and the names and arguments of
  // the tool calls in assistant messages: templates write both into the prompt.
  TextCount tool_text;
  int tools = 0;
  int tool_calls = 0;
};

// What chat templates add for tools, beyond the tools' own JSON (bench/results/estimate.md:
// Qwen3's template; others differ by some tens of tokens): the tool-use instruction, once, and
// the markup around each call.
inline constexpr std::int64_t kToolsPromptTokens = 80;
inline constexpr std::int64_t kToolCallTokens = 10;

// The prompt's tokens as the gateway estimates them when neither the backend's usage nor its
// /tokenize count is available: text, token ids, per-message template overhead, tools.
std::int64_t estimate_prompt_tokens(const RequestInfo& info);

struct InspectError {
  http::ErrorSpec spec;
  std::string message;
  std::string_view param;  // the request field at fault (OpenAI's error.param), else empty
};

// One per worker thread: the parser keeps its buffers between requests, so steady traffic
// allocates nothing here. Not thread-safe.
class RequestInspector {
 public:
  explicit RequestInspector(std::size_t max_body_size);

  // `body` must be followed by at least simdjson::SIMDJSON_PADDING readable bytes when
  // `padded` is true (the server reserves them); otherwise the body is copied once.
  // Returns false and fills `error` when the request must be refused with 400. The prompt's
  // text is counted (prompt_text, prompt_token_ids: the usage estimate) only with `count_text`:
  // a gateway that meters nothing does not read a large prompt twice.
  bool inspect(Endpoint endpoint, std::string_view body, bool padded, RequestInfo& info,
               InspectError& error, bool count_text = true);

 private:
  simdjson::dom::parser parser_;
};

}  // namespace llmproxy::llm
