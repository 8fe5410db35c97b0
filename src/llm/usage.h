// Token usage as backends report it, read from a response body or from stream events.
//
// Where usage is (see shared/docs/wire-formats.md): a top-level `usage` object in non-stream
// bodies and in stream chunks (OpenAI's final `choices: []` chunk, vLLM's cumulative usage on
// every chunk, TGI's chunk with `"id": ""`, llama.cpp's finish chunk that also carries content),
// `response.usage` with input/output names in the Responses API's terminal events, and
// `details.{input_length,generated_tokens}` in TGI's native stream. Cumulative reports make the
// last value the right one: a tracker replaces, never sums.
#pragma once

#include <simdjson.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "llm/token_estimate.h"

namespace llmproxy::llm {

// The largest count taken from a backend: 2^53, the largest integer a JavaScript receiver of the
// record holds exactly (no model has such a context). A larger one is read as not reported, as a
// negative or fractional one is, so that no sum of counts can overflow.
inline constexpr std::int64_t kMaxTokenCount = std::int64_t{1} << 53;

struct Usage {
  std::int64_t prompt_tokens = -1;  // -1: not reported
  std::int64_t completion_tokens = -1;
  std::int64_t total_tokens = -1;
  std::int64_t cached_tokens = -1;     // prompt_tokens_details.cached_tokens
  std::int64_t reasoning_tokens = -1;  // completion_tokens_details.reasoning_tokens
  bool reported() const { return prompt_tokens >= 0 || completion_tokens >= 0; }
};

// Reads usage from one parsed JSON object (a body or one event's data). Returns true when the
// object carries a non-null usage report; `out` is then replaced by it (the total filled in when
// the backend left it out and reported both counts).
bool read_usage(simdjson::dom::element object, Usage& out);

// The counts a record bills for a backend's report: a count it left out (or wrote as something
// that is not a count) takes its estimate, and the total is always the sum of the two counts,
// whatever total the backend wrote. Returns true when a count was estimated: the record's numbers
// are then not the backend's own.
bool complete_usage(Usage& u, std::int64_t prompt_estimate, std::int64_t completion_estimate);

// Follows one stream: feed every event's data in order. Only events whose bytes can hold usage
// are parsed as JSON; the others cost one substring search. Events after `[DONE]` are counted
// but not read: the response ended there. Not thread-safe (one per stream).
class StreamUsageTracker {
 public:
  // `parser`: a parser shared by the streams of one thread (its buffers are reused); when null
  // the tracker makes its own on first use.
  explicit StreamUsageTracker(simdjson::dom::parser* parser = nullptr) : shared_(parser) {}

  // Returns true when the event was the usage-only chunk of include_usage (see below).
  // `event`: the event's `event:` field, empty when it had none.
  bool on_event(std::string_view data, std::string_view event = {});

  const Usage& usage() const { return usage_; }
  // Read the `model` of the stream's first data event (see answer_model): the request named none.
  void want_model() { want_model_ = true; }
  const std::string& model() const { return model_; }
  bool saw_done() const { return saw_done_; }
  // The backend reported an error inside the stream, after its 200 (vLLM, TGI and OpenAI write
  // one as a data event whose object has a top-level `error`, or vLLM's older
  // `"object":"error"`; some servers name the event `error`, and SseScanner reads llama.cpp's
  // `error:` line as one): the response did not complete.
  bool saw_error() const { return saw_error_; }
  // A data event other than an error report or [DONE] was read: the stream's first token.
  bool token_seen() const { return token_seen_; }
  // The last event read had a `finish_reason` with a string value (a choice finished).
  bool last_event_finished() const { return finished_; }
  std::uint64_t events() const { return events_; }
  std::uint64_t parsed_events() const { return parsed_; }
  // Characters of generated text that streamed (content/text/reasoning deltas, JSON-escaped
  // length), the basis of an estimate when no usage ever arrives.
  std::uint64_t content_chars() const { return content_chars_; }
  const TextCount& content_text() const { return content_text_; }

 private:
  Usage usage_;
  bool saw_done_ = false;
  bool saw_error_ = false;
  bool finished_ = false;
  std::uint64_t events_ = 0;
  std::uint64_t parsed_ = 0;
  std::uint64_t content_chars_ = 0;
  TextCount content_text_;
  bool token_seen_ = false;
  bool want_model_ = false;
  std::string model_;
  std::string scratch_;  // padded copy for simdjson, reused across events
  simdjson::dom::parser* shared_ = nullptr;
  std::unique_ptr<simdjson::dom::parser> own_;
};

// Reads the text of one usage object (`{"prompt_tokens":...}`) without a JSON parser, when it has
// the simple form servers write: ASCII keys without escapes, values that are unsigned integers or
// null, or one level of objects of those. nullopt: not that form (parse it with simdjson and
// read_usage()); otherwise whether it is a report, `out` replaced when it is, exactly as
// read_usage() would.
std::optional<bool> read_usage_text(std::string_view object, Usage& out);

// Usage of a non-stream response from the copy the gateway kept of it: the whole body, or its
// tail when the body was larger than the copy. Found textually: the last `"usage":{...}` parsed
// alone (OpenAI-compatible servers write it at the top level, after the choices; escaped quotes
// keep it from matching inside strings). `content` receives the generated text's size, the basis
// of an estimate, counted only when no usage is found or it lacks a count. `whole`: the copy is
// the whole body, parsed whole when a usage key in it could not be read alone (an object past
// the window a usage object is searched in).
bool read_body_usage(std::string_view copy, simdjson::dom::parser& parser, Usage& out,
                     TextCount& content, bool whole = false);

// Is a whole non-stream body an error report (an `error` object or message, or `"object":
// "error"`)? Some servers answer errors with 200; such a body is billed like an error status.
bool body_reports_error(std::string_view body, simdjson::dom::parser& parser);

// The top-level `model` a response names, for a request that named none (its backend ran its
// default one), or empty: none, not a string, escaped, or longer than an identifier a record
// keeps (kMaxIdentifierBytes). answer_model() reads a parsed event; body_model() reads a body
// or a piece of one as text, without a parser: the first `"model":"..."` key in it, or the last
// (`last`: a large body's tail, where embeddings put it after their data).
std::string answer_model(simdjson::dom::element doc);
std::string body_model(std::string_view text, bool last = false);

// The prompt's token count in a /tokenize answer, read as text without a parser (a DOM of a
// long token list would take about 15 times its bytes): the top-level `"count"` (vLLM), else
// the number of ids in `"tokens":[...]` (vLLM, llama.cpp). -1: neither, a count past
// kMaxTokenCount, or a token list that is not ids alone.
std::int64_t tokenize_count(std::string_view answer);

// The start of the last `"usage"` key in `s` that begins before `end` and has an object for its
// value, or npos: the word as a value (`"decoded_token":"usage"`) is passed over, at the cost of
// its quotes (the search goes backwards from quote to quote, each byte once). With the
// kUsageWindowBytes after it, a piece of a large body that read_body_usage() reads as it reads a
// tail.
std::size_t rfind_usage_object(std::string_view s, std::size_t end);
inline constexpr std::size_t kUsageWindowBytes = 16 * 1024 + 64;

// Is this event the usage-only chunk that `stream_options.include_usage` adds (OpenAI, vLLM,
// TGI): `choices` present and empty, `usage` non-null? A chunk with content or a finish_reason
// is never one.
bool is_usage_only_chunk(simdjson::dom::element object);

}  // namespace llmproxy::llm
