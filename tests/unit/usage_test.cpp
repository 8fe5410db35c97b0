// Usage extraction from bodies and streams, with fixtures written after each backend's wire
// format (shared/docs/wire-formats.md): the numbers must equal what the backend reported.
#include "llm/usage.h"

#include <gtest/gtest.h>
#include <simdjson.h>

#include <functional>
#include <optional>
#include <random>
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
  s.feed(sse, [&](const SseEvent& e) { t.on_event(e.data, e.event); });
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

// The text reader must agree with simdjson on every object it accepts, and accept what servers
// write (else the fast path would never run).
struct TextRead {
  std::optional<bool> reported;
  Usage usage;
};
TextRead text_read(const std::string& object) {
  TextRead t;
  t.reported = read_usage_text(object, t.usage);
  return t;
}
void expect_same_as_simdjson(const std::string& object) {
  SCOPED_TRACE(object);
  Usage want;
  simdjson::dom::parser p;
  simdjson::dom::element doc;
  const std::string wrapped = "{\"usage\":" + object + "}";
  const bool parses = p.parse(wrapped).get(doc) == simdjson::SUCCESS;
  const bool want_reported = parses && read_usage(doc, want);
  const TextRead got = text_read(object);
  if (!got.reported) return;  // left to simdjson
  ASSERT_TRUE(parses) << "accepted text simdjson rejects";
  EXPECT_EQ(*got.reported, want_reported);
  if (!want_reported) return;
  EXPECT_EQ(got.usage.prompt_tokens, want.prompt_tokens);
  EXPECT_EQ(got.usage.completion_tokens, want.completion_tokens);
  EXPECT_EQ(got.usage.total_tokens, want.total_tokens);
  EXPECT_EQ(got.usage.cached_tokens, want.cached_tokens);
  EXPECT_EQ(got.usage.reasoning_tokens, want.reasoning_tokens);
}

TEST(UsageText, ServersObjectsTakeTheFastPathAndAgree) {
  const std::vector<std::string> servers = {
      // OpenAI, with details
      R"({"prompt_tokens":15,"completion_tokens":42,"total_tokens":57,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":3,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}})",
      // vLLM (details null), llama.cpp, TGI, embeddings, pretty-printed
      R"({"prompt_tokens":9,"total_tokens":21,"completion_tokens":12,"prompt_tokens_details":null})",
      R"({"completion_tokens":7,"prompt_tokens":5,"total_tokens":12})",
      R"({"prompt_tokens":9,"total_tokens":9})",
      "{\n  \"prompt_tokens\" : 3 ,\n  \"completion_tokens\": 0,\n  \"total_tokens\": 3\n}",
      // Responses API names
      R"({"input_tokens":11,"output_tokens":4,"total_tokens":15,"input_tokens_details":{"cached_tokens":2},"output_tokens_details":{"reasoning_tokens":1}})",
      R"({})",
      R"({"prompt_tokens":null,"completion_tokens":null})",
  };
  for (const auto& o : servers) {
    EXPECT_TRUE(text_read(o).reported.has_value()) << o;
    expect_same_as_simdjson(o);
  }
  auto t = text_read(servers[0]);
  EXPECT_EQ(t.usage.cached_tokens, 8);
  EXPECT_EQ(t.usage.reasoning_tokens, 3);
  t = text_read(servers[5]);
  EXPECT_EQ(t.usage.prompt_tokens, 11);
  EXPECT_EQ(t.usage.cached_tokens, 2);
}

TEST(UsageText, OtherFormsAreLeftToSimdjson) {
  for (const std::string o :
       {R"({"prompt_tokens":-1})", R"({"prompt_tokens":1.5})", R"({"prompt_tokens":1e3})",
        R"({"prompt_tokens":"7"})", R"({"prompt_tokens":[1]})", R"({"prompt_tokens":true})",
        R"({"pro\u006dpt_tokens":7})", R"({"a":{"b":{"c":1}}})", R"({"prompt_tokens":07})",
        R"({"prompt_tokens":12345678901234567890})", R"({"prompt_tokens":1,})",
        R"({"prompt_tokens":1} x)", R"({"prompt_tokens" 1})", R"({"prompt_tokens":1)"}) {
    EXPECT_FALSE(text_read(o).reported.has_value()) << o;
    expect_same_as_simdjson(o);
  }
}

TEST(UsageText, FirstOfDuplicateKeysAndDetailsWinAsInSimdjson) {
  for (
      const std::string o : {
          R"({"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":3})",
          R"({"prompt_tokens":{"x":1},"prompt_tokens":2,"completion_tokens":3})",
          R"({"prompt_tokens":null,"input_tokens":4,"completion_tokens":3})",
          R"({"prompt_tokens":1,"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":5}})",
          R"({"prompt_tokens":1,"prompt_tokens_details":3,"prompt_tokens_details":{"cached_tokens":5}})",
          R"({"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":5,"cached_tokens":6}})",
          R"({"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":null},"input_tokens_details":{"cached_tokens":5}})",
          R"({"completion_tokens":1,"output_tokens_details":{"reasoning_tokens":2},"completion_tokens_details":{}})",
      }) {
    EXPECT_TRUE(text_read(o).reported.has_value()) << o;
    expect_same_as_simdjson(o);
  }
}

TEST(UsageText, RandomObjectsAgreeWithSimdjson) {
  // Random keys (the known ones, others, duplicates), values (numbers, null, objects, strings,
  // floats), whitespace: whatever the text reader accepts must read as simdjson reads it.
  std::mt19937 rng(12345);
  const std::vector<std::string> keys = {"prompt_tokens",         "completion_tokens",
                                         "total_tokens",          "input_tokens",
                                         "output_tokens",         "prompt_tokens_details",
                                         "input_tokens_details",  "completion_tokens_details",
                                         "output_tokens_details", "cached_tokens",
                                         "reasoning_tokens",      "other"};
  const std::vector<std::string> spaces = {"", " ", "\n  ", "\t"};
  auto pick = [&](const auto& v) { return v[rng() % v.size()]; };
  std::function<std::string(int)> value = [&](int depth) -> std::string {
    switch (rng() % 8) {
      case 0:
        return "null";
      case 1:
        return "\"s\"";
      case 2:
        return "2.5";
      case 3:
      case 4: {
        if (depth >= 2) return "1";
        std::string o = "{";
        const int n = static_cast<int>(rng() % 4);
        for (int k = 0; k < n; ++k) {
          if (k) o += ",";
          o += pick(spaces) + "\"" + pick(keys) + "\"" + pick(spaces) + ":" + pick(spaces) +
               value(depth + 1);
        }
        return o + pick(spaces) + "}";
      }
      default:
        return std::to_string(rng() % 100000);
    }
  };
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string o = "{";
    const int n = static_cast<int>(rng() % 7);
    for (int k = 0; k < n; ++k) {
      if (k) o += ",";
      o += pick(spaces) + "\"" + pick(keys) + "\"" + pick(spaces) + ":" + pick(spaces) + value(1);
    }
    o += "}";
    if (text_read(o).reported) ++accepted;
    expect_same_as_simdjson(o);
  }
  EXPECT_GT(accepted, 300);  // the generator reaches the fast path often
}

TEST(Usage, TotalIsFilledWhenLeftOut) {
  auto u = from_body(R"({"usage":{"prompt_tokens":4,"completion_tokens":6}})");
  EXPECT_EQ(u.total_tokens, 10);
}

TEST(Usage, CountsAbove2To53AreNotReported) {
  // Two counts of 2^62 once summed to a negative total (signed overflow); 2^64-1 read negative.
  EXPECT_FALSE(
      from_body(
          R"({"usage":{"prompt_tokens":4611686018427387904,"completion_tokens":4611686018427387904}})")
          .reported());
  auto u = from_body(
      R"({"usage":{"prompt_tokens":9007199254740992,"completion_tokens":9007199254740993,)"
      R"("total_tokens":18446744073709551615,"prompt_tokens_details":{"cached_tokens":1e300}}})");
  EXPECT_EQ(u.prompt_tokens, kMaxTokenCount);
  EXPECT_EQ(u.completion_tokens, -1);
  EXPECT_EQ(u.cached_tokens, -1);
  // The text reader takes up to 18 digits: past 2^53 it must read them as simdjson's path does.
  const std::string o = R"({"prompt_tokens":100000000000000000,"completion_tokens":3,)"
                        R"("completion_tokens_details":{"reasoning_tokens":9007199254740993}})";
  const TextRead t = text_read(o);
  ASSERT_TRUE(t.reported.has_value());
  EXPECT_EQ(t.usage.prompt_tokens, -1);
  EXPECT_EQ(t.usage.completion_tokens, 3);
  EXPECT_EQ(t.usage.reasoning_tokens, -1);
  expect_same_as_simdjson(o);
}

TEST(Usage, BilledTotalIsTheSumOfTheBilledCounts) {
  // Reports as QA's fake upstream sent them, in a body and in a stream's usage chunk, billed with
  // estimates of 9 prompt and 1 completion tokens: the total must be the sum of what is billed,
  // and a count taken from the estimate must make the record "estimated".
  struct Case {
    std::string usage;
    std::int64_t prompt, completion, total;
    bool estimated;
  };
  const std::vector<Case> cases = {
      {R"({"completion_tokens":3})", 9, 3, 12, true},
      {R"({"prompt_tokens":-10,"completion_tokens":3,"total_tokens":3})", 9, 3, 12, true},
      {R"({"prompt_tokens":"10","completion_tokens":3,"total_tokens":13})", 9, 3, 12, true},
      {R"({"prompt_tokens":10.0,"completion_tokens":3,"total_tokens":13})", 9, 3, 12, true},
      {R"({"prompt_tokens":9223372036854775808,"completion_tokens":3,"total_tokens":13})", 9, 3, 12,
       true},
      {R"({"prompt_tokens":10,"completion_tokens":-3,"total_tokens":7})", 10, 1, 11, true},
      {R"({"prompt_tokens":10,"completion_tokens":3,"total_tokens":20})", 10, 3, 13, false},
      {R"({"prompt_tokens":10,"completion_tokens":3})", 10, 3, 13, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.usage);
    const Usage from_stream =
        track("data: {\"choices\":[],\"usage\":" + c.usage + "}\n\ndata: [DONE]\n\n").usage();
    for (Usage u : {from_body("{\"usage\":" + c.usage + "}"), from_stream}) {
      ASSERT_TRUE(u.reported());
      EXPECT_EQ(complete_usage(u, 9, 1), c.estimated);
      EXPECT_EQ(u.prompt_tokens, c.prompt);
      EXPECT_EQ(u.completion_tokens, c.completion);
      EXPECT_EQ(u.total_tokens, c.total);
    }
  }
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

// An error inside a 200 stream, in the shapes servers write it; text that merely says "error"
// (quoted inside a string, a key of tool-call arguments) is not one.
TEST(StreamUsage, ErrorEventsInsideTheStreamAreSeen) {
  const std::string content =
      R"(data: {"id":"c","choices":[{"index":0,"delta":{"content":"an \"error\": 1"}}]})"
      "\n\n";
  const std::string args =
      R"(data: {"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,)"
      R"("function":{"arguments":"{\"error\":null}"}}]}}]})"
      "\n\n";
  const std::string errors[] = {
      // OpenAI's shape (newer vLLM)
      R"(data: {"error":{"message":"engine died","type":"InternalServerError","code":500}})"
      "\n\n",
      // vLLM's older ErrorResponse
      R"(data: {"object":"error","message":"engine died","type":"InternalServerError","code":500})"
      "\n\n",
      // TGI
      R"(data: {"error":"Request failed during generation","error_type":"generation"})"
      "\n\n",
      // a named event
      "event: error\ndata: engine died\n\n",
      // llama.cpp's server: an `error:` field, no data line
      R"(error: {"code":500,"message":"engine died","type":"server_error"})"
      "\n\n",
  };
  {
    auto t = track(content + args + "data: [DONE]\n\n");
    EXPECT_FALSE(t.saw_error());
    EXPECT_GT(t.content_chars(), 0u);
  }
  for (const char* not_an_error : {
           R"(data: {"id":"c","error":null,"choices":[]})",
           R"(data: {"id":"c","error":"","choices":[]})",
           R"(data: {"id":"c","error":false,"choices":[]})",
           R"(data: {"id":"c","choices":[{"index":0,"delta":{"content":"error"}}]})",
           R"(data: {"id":"c","choices":[{"index":0,"delta":{"error":{"x":1}}}]})",
       }) {
    auto t = track(content + not_an_error + "\n\ndata: [DONE]\n\n");
    EXPECT_FALSE(t.saw_error()) << not_an_error;
  }
  for (const auto& e : errors) {
    auto t = track(content + e + "data: [DONE]\n\n");
    EXPECT_TRUE(t.saw_error()) << e;
    EXPECT_TRUE(t.saw_done());
  }
  // Usage that a server sends along with its error is still read: it is the backend's count.
  auto with_usage = track(
      content +
      R"(data: {"error":{"message":"aborted"},"usage":{"prompt_tokens":9,"completion_tokens":1}})"
      "\n\n");
  EXPECT_TRUE(with_usage.saw_error());
  EXPECT_EQ(with_usage.usage().prompt_tokens, 9);
  EXPECT_EQ(with_usage.usage().completion_tokens, 1);
  // After [DONE] nothing belongs to the response any more.
  auto late = track(content + "data: [DONE]\n\n" + errors[0]);
  EXPECT_FALSE(late.saw_error());
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

// A stream cut in its thinking phase sends no usage: the reasoning that streamed is what the
// completion estimate counts, under either name servers give it (vLLM renamed
// "reasoning_content" to "reasoning"), and tool-call arguments too.
TEST(StreamUsage, NoUsageCountsReasoningAndToolArguments) {
  const auto delta = [](std::string_view d) {
    return "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
           "\"delta\":" +
           std::string(d) + ",\"finish_reason\":null}]}\n\n";
  };
  auto t = track(delta(R"({"reasoning":"think"})") + delta(R"({"reasoning_content":"more"})") +
                 delta(R"({"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]})"));
  EXPECT_FALSE(t.usage().reported());
  EXPECT_EQ(t.content_chars(), 5u + 4u + 2u);
}

// A whole non-stream body that is an error report (servers that answer errors with 200), and
// bodies that only mention the word.
TEST(Usage, BodyReportsError) {
  simdjson::dom::parser p;
  for (std::string_view body : {R"({"error":{"message":"CUDA out of memory","code":500}})",
                                R"({"object":"error","message":"engine dead","code":500})",
                                R"({"error":"Input validation error"})"}) {
    EXPECT_TRUE(llm::body_reports_error(body, p)) << body;
  }
  for (std::string_view body :
       {R"({"choices":[{"message":{"content":"error"}}],"error":null})", R"({"error":""})",
        R"({"id":"x","choices":[{"message":{"content":"an \"error\": here"}}]})",
        R"({"error":{"message":"cut)", ""}) {
    EXPECT_FALSE(llm::body_reports_error(body, p)) << body;
  }
}

TEST(StreamUsage, EventsAfterDoneAreIgnored) {
  std::string sse =
      chunk() +
      R"(data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}})"
      "\n\ndata: [DONE]\n\n" +
      R"(data: {"choices":[],"usage":{"prompt_tokens":99,"completion_tokens":99,"total_tokens":198}})"
      "\n\n" +
      chunk();
  auto t = track(sse);
  EXPECT_TRUE(t.saw_done());
  EXPECT_EQ(t.usage().prompt_tokens, 10);
  EXPECT_EQ(t.usage().completion_tokens, 3);
  EXPECT_EQ(t.usage().total_tokens, 13);
  EXPECT_EQ(t.content_chars(), 4u);  // the one "tok " before [DONE]
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

namespace llmproxy::llm {
namespace {

// The tracker reads each event in one pass over its quotes; bodies are read with a scan per word.
// Both must find the same text and the same error reports: random events built from the words
// either looks for, as keys and as values, with escapes, nesting and whitespace.
TEST(StreamUsageTracker, OnePassOverAnEventFindsWhatTheScansPerWordFind) {
  std::mt19937 rng(20261129);
  const std::vector<std::string> words = {
      "content", "text",  "reasoning", "reasoning_content", "arguments", "error",
      "object",  "usage", "role",      "reasoning_tokens",  "contents",  "delta"};
  const std::vector<std::string> strings = {"hi",
                                            "a \\\"quoted\\\" word",
                                            "\\\"content\\\": \\\"x\\\"",
                                            "error",
                                            "\\u00e9t\\u00e9",
                                            "tab\\tand\\\\backslash",
                                            "\\\"text\\\"",
                                            "",
                                            "reasoning_content"};
  const auto pick = [&](const auto& v) { return v[rng() % v.size()]; };
  const auto space = [&] { return std::string(rng() % 3 == 0 ? " " : ""); };
  std::function<std::string(int)> value = [&](int depth) -> std::string {
    switch (rng() % (depth > 2 ? 3 : 6)) {
      case 0:
        return "\"" + pick(strings) + "\"";
      case 1:
        return rng() % 2 ? "null" : "12";
      case 2:
        return "\"" + pick(words) + "\"";
      case 3: {
        std::string o = "{";
        for (int i = 0, n = static_cast<int>(rng() % 4); i < n; ++i) {
          o += (i ? "," : "") + space() + "\"" + pick(words) + "\"" + space() + ":" + space() +
               value(depth + 1);
        }
        return o + "}";
      }
      default: {
        std::string a = "[";
        for (int i = 0, n = static_cast<int>(rng() % 3); i < n; ++i) {
          a += (i ? "," : "") + value(depth + 1);
        }
        return a + "]";
      }
    }
  };
  simdjson::dom::parser parser;
  int with_text = 0, with_error = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string event = "{";
    for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k) {
      event +=
          (k ? "," : "") + space() + "\"" + pick(words) + "\"" + space() + ":" + space() + value(0);
    }
    event += "}";
    StreamUsageTracker tracker(&parser);
    tracker.on_event(event);
    // A body without usage: read_body_usage counts its text with the scans per word.
    Usage none;
    TextCount body_text;
    if (read_body_usage(event, parser, none, body_text)) continue;  // usage found: no count
    ASSERT_EQ(tracker.content_text().ascii, body_text.ascii) << event;
    ASSERT_EQ(tracker.content_text().other, body_text.other) << event;
    const bool body_error = body_reports_error(event, parser);
    ASSERT_EQ(tracker.saw_error(), body_error) << event;
    with_text += body_text.empty() ? 0 : 1;
    with_error += body_error ? 1 : 0;
  }
  EXPECT_GT(with_text, 1000);  // the corpus exercises both
  EXPECT_GT(with_error, 1000);
}

}  // namespace
}  // namespace llmproxy::llm

namespace llmproxy::llm {
namespace {

// For a request that named no model: the answer's top-level `model`, from a whole body or from a
// stream's first data event (later events are not parsed for it).
TEST(AnswerModel, FromBodyAndFirstStreamEvent) {
  simdjson::dom::parser parser;
  EXPECT_EQ(body_model(R"({"id":"x","model" : "qwen3-8b","choices":[]})"), "qwen3-8b");
  EXPECT_EQ(body_model(R"({"model":7})"), "");
  // A top-level model that is no string: nothing, not a nested one further on.
  EXPECT_EQ(body_model(R"({"model":null,"choices":[{"arguments":{"model":"chosen"}}]})"), "");
  EXPECT_EQ(body_model(R"({"model":")" + std::string(1025, 'm') + R"("})"), "");
  EXPECT_EQ(body_model(R"({"model":"cut)"), "");
  EXPECT_EQ(body_model(R"({"model":"a\"b"})"), "");  // escaped: left out, not read wrong
  // The word as a value, or quoted inside a string, is no key.
  EXPECT_EQ(body_model(R"({"x":"model","c":"say \"model\": \"no\"","model":"yes"})"), "yes");
  // Embeddings put it after their data: a tail read takes the last one.
  EXPECT_EQ(body_model(R"(3]}],"model":"emb-1","usage":{}})", true), "emb-1");
  EXPECT_EQ(body_model(R"({"model":"first","model":"second"})", true), "second");

  StreamUsageTracker t(&parser);
  t.want_model();
  t.on_event(R"({"model":"first","choices":[{"delta":{"content":"a"}}]})");
  t.on_event(
      R"({"model":"second","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}})");
  EXPECT_EQ(t.model(), "first");
  EXPECT_EQ(t.parsed_events(), 2u);  // the first for its model, the second for its usage

  StreamUsageTracker unasked(&parser);
  unasked.on_event(R"({"model":"first","choices":[{"delta":{"content":"a"}}]})");
  EXPECT_EQ(unasked.model(), "");
  EXPECT_EQ(unasked.parsed_events(), 0u);  // nothing asked: a content chunk is not parsed
}

}  // namespace
}  // namespace llmproxy::llm

namespace llmproxy::llm {
namespace {

// /tokenize answers as vLLM and llama.cpp write them, read without a parser.
TEST(TokenizeCount, CountOrTokenIds) {
  EXPECT_EQ(tokenize_count(R"({"count":7,"max_model_len":4096,"tokens":[1,2,3,4,5,6,7]})"), 7);
  EXPECT_EQ(tokenize_count(R"({"tokens": [101, 2023, 2003]})"), 3);
  EXPECT_EQ(tokenize_count(R"({"tokens":[]})"), 0);
  EXPECT_EQ(tokenize_count("{\"tokens\":[\n 1,\n 22\n]}"), 2);
  // token_strs may hold the word as a value: only a key followed by a colon counts.
  EXPECT_EQ(tokenize_count(R"({"token_strs":["count"],"count" : 12})"), 12);
  EXPECT_EQ(tokenize_count(R"({"count":-1})"), -1);
  EXPECT_EQ(tokenize_count(R"({"count":9007199254740993})"), -1);  // past 2^53
  EXPECT_EQ(tokenize_count(R"({"count":"7"})"), -1);
  EXPECT_EQ(tokenize_count(R"({"tokens":[{"id":1,"piece":"a"}]})"), -1);  // pieces: no ids
  EXPECT_EQ(tokenize_count(R"({"tokens":[1,2)"), -1);                     // never ends
  EXPECT_EQ(tokenize_count(R"({"other":1})"), -1);
}

}  // namespace
}  // namespace llmproxy::llm
