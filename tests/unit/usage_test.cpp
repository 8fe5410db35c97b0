// Usage extraction from bodies and streams, with fixtures written after each backend's wire
// format (shared/docs/wire-formats.md): the numbers must equal what the backend reported.
#include "llm/usage.h"

#include <gtest/gtest.h>
#include <simdjson.h>

#include <string>
#include <vector>

#include "llm/sse_scanner.h"

namespace llmproxy::llm {
namespace {

Usage from_body(const std::string& json) {
  simdjson::dom::parser p;
  Usage u;
  read_usage(p.parse(json), u);
  return u;
}

// Runs a raw SSE stream through the scanner and the tracker, as the relay will.
StreamUsageTracker track(const std::string& sse) {
  StreamUsageTracker t;
  SseScanner s;
  s.feed(sse, [&](const SseEvent& e) { t.on_event(e.data); });
  return t;
}

TEST(Usage, NonStreamChatBody) {
  auto u = from_body(
      R"({"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],)"
      R"("usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57,)"
      R"("prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":3}}})");
  EXPECT_EQ(u.prompt_tokens, 15);
  EXPECT_EQ(u.completion_tokens, 42);
  EXPECT_EQ(u.total_tokens, 57);
  EXPECT_EQ(u.cached_tokens, 8);
  EXPECT_EQ(u.reasoning_tokens, 3);
}

TEST(Usage, EmbeddingsHaveNoCompletionTokens) {
  auto u = from_body(R"({"object":"list","data":[],"usage":{"prompt_tokens":9,"total_tokens":9}})");
  EXPECT_EQ(u.prompt_tokens, 9);
  EXPECT_EQ(u.completion_tokens, -1);
  EXPECT_EQ(u.total_tokens, 9);
}

TEST(Usage, MissingOrNullUsageIsNotReported) {
  EXPECT_FALSE(from_body(R"({"choices":[]})").reported());
  EXPECT_FALSE(from_body(R"({"choices":[],"usage":null})").reported());
  EXPECT_FALSE(from_body(R"([1,2])").reported());
}

TEST(Usage, TotalIsFilledWhenLeftOut) {
  auto u = from_body(R"({"usage":{"prompt_tokens":4,"completion_tokens":6}})");
  EXPECT_EQ(u.total_tokens, 10);
}

TEST(Usage, ResponsesApiNames) {
  auto u = from_body(
      R"({"type":"response.completed","response":{"id":"r","usage":{"input_tokens":11,"output_tokens":7,)"
      R"("total_tokens":18,"input_tokens_details":{"cached_tokens":2},"output_tokens_details":{"reasoning_tokens":5}}}})");
  EXPECT_EQ(u.prompt_tokens, 11);
  EXPECT_EQ(u.completion_tokens, 7);
  EXPECT_EQ(u.cached_tokens, 2);
  EXPECT_EQ(u.reasoning_tokens, 5);
}

constexpr const char* kChunk =
    R"(data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]%s}

)";

std::string chunk(const std::string& extra = "") {
  std::string s = kChunk;
  return s.replace(s.find("%s"), 2, extra);
}

TEST(StreamUsage, OpenAiFinalUsageOnlyChunk) {
  std::string sse =
      chunk(R"(,"usage":null)") + chunk(R"(,"usage":null)") +
      R"(data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null})"
      "\n\n"
      R"(data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}})"
      "\n\ndata: [DONE]\n\n";
  auto t = track(sse);
  EXPECT_EQ(t.usage().prompt_tokens, 5);
  EXPECT_EQ(t.usage().completion_tokens, 2);
  EXPECT_TRUE(t.saw_done());
  EXPECT_EQ(t.parsed_events(), 1u) << "usage:null chunks must not be parsed";
}

TEST(StreamUsage, VllmContinuousUsageLastValueWinsNeverTheSum) {
  std::string sse;
  for (int i = 1; i <= 5; ++i) {
    sse += chunk(R"(,"usage":{"prompt_tokens":10,"completion_tokens":)" + std::to_string(i) +
                 R"(,"total_tokens":)" + std::to_string(10 + i) + "}");
  }
  sse += "data: [DONE]\n\n";
  auto t = track(sse);
  EXPECT_EQ(t.usage().prompt_tokens, 10);
  EXPECT_EQ(t.usage().completion_tokens, 5);
  EXPECT_EQ(t.usage().total_tokens, 15);
}

TEST(StreamUsage, TgiUsageChunkWithEmptyId) {
  std::string sse =
      chunk() + chunk() +
      R"(data: {"id":"","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}})"
      "\n\ndata: [DONE]\n\n";
  auto t = track(sse);
  EXPECT_EQ(t.usage().completion_tokens, 2);
}

TEST(StreamUsage, LlamaCppUsageRidesOnTheFinishChunkWithContent) {
  std::string sse =
      chunk() +
      R"(data: {"choices":[{"index":0,"delta":{"content":"end"},"finish_reason":"stop"}],)"
      R"("usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14},"timings":{"predicted_ms":3.1}})"
      "\n\ndata: [DONE]\n\n";
  auto t = track(sse);
  EXPECT_EQ(t.usage().prompt_tokens, 12);
  EXPECT_EQ(t.usage().completion_tokens, 2);
}

TEST(StreamUsage, TgiNativeStreamDetailsWithoutDone) {
  std::string sse =
      R"(data:{"token":{"id":1,"text":" a"},"generated_text":null,"details":null})"
      "\n\n"
      R"(data:{"token":{"id":2,"text":" b"},"generated_text":" a b","details":{"finish_reason":"length","generated_tokens":2,"input_length":6}})"
      "\n\n";
  auto t = track(sse);
  EXPECT_EQ(t.usage().prompt_tokens, 6);
  EXPECT_EQ(t.usage().completion_tokens, 2);
  EXPECT_FALSE(t.saw_done());
}

TEST(StreamUsage, NoUsageAtAllCountsStreamedContent) {
  auto t = track(chunk() + chunk() + chunk() + "data: [DONE]\n\n");
  EXPECT_FALSE(t.usage().reported());
  EXPECT_EQ(t.content_chars(), 12u);  // three "tok " deltas
  EXPECT_EQ(t.parsed_events(), 0u);
}

TEST(StreamUsage, UsageOnlyChunkDetection) {
  simdjson::dom::parser p;
  EXPECT_TRUE(is_usage_only_chunk(
      p.parse(std::string(R"({"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}})"))));
  EXPECT_FALSE(is_usage_only_chunk(p.parse(std::string(R"({"choices":[],"usage":null})"))));
  // llama.cpp's finish chunk carries usage and content: never the injected usage-only chunk.
  EXPECT_FALSE(is_usage_only_chunk(p.parse(std::string(
      R"({"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}})"))));
  EXPECT_FALSE(is_usage_only_chunk(p.parse(std::string(R"({"usage":{"prompt_tokens":1}})"))));
}

}  // namespace
}  // namespace llmproxy::llm
