// The stream meter on recorded streams split at every byte offset (Beast's "fail matrix" idea
// applied to SSE): the client's bytes must be the backend's bytes minus exactly the usage-only
// chunk the gateway caused, and the usage read must not depend on how the bytes were cut.
#include "llm/stream_meter.h"

#include <gtest/gtest.h>
#include <simdjson.h>

#include <random>
#include <string>
#include <vector>

#include "llm/request_rewrite.h"
#include "llm/token_estimate.h"
#include "llm/usage.h"

namespace llmproxy::llm {
namespace {

const std::string kContent1 =
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},"
    "\"finish_reason\":null}],\"usage\":null}\n\n";
const std::string kPing = ": ping\n\n";
const std::string kContent2 =
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},"
    "\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
const std::string kUsageOnly =
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":15,"
    "\"completion_tokens\":2,\"total_tokens\":17}}\n\n";
const std::string kDone = "data: [DONE]\n\n";

struct Result {
  std::string out;
  Usage usage;
  std::uint64_t removed = 0;
};

// Feeds `stream` cut at the given offsets; returns what the client would receive.
Result run(const std::string& stream, bool filter, std::vector<std::size_t> cuts) {
  simdjson::dom::parser parser;
  StreamMeter m(&parser, filter);
  Result r;
  std::size_t prev = 0;
  cuts.push_back(stream.size());
  for (std::size_t cut : cuts) {
    r.out.append(m.relay(std::string_view(stream).substr(prev, cut - prev)));
    prev = cut;
  }
  r.out.append(m.finish());
  r.usage = m.tracker().usage();
  r.removed = m.removed_events();
  return r;
}

TEST(StreamMeter, RemovesOnlyTheInjectedUsageChunkAtEverySplit) {
  const std::string stream = kContent1 + kPing + kContent2 + kUsageOnly + kDone;
  const std::string expected = kContent1 + kPing + kContent2 + kDone;
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    Result r = run(stream, true, {i});
    ASSERT_EQ(r.out, expected) << "split at " << i;
    ASSERT_EQ(r.usage.prompt_tokens, 15) << "split at " << i;
    ASSERT_EQ(r.usage.completion_tokens, 2) << "split at " << i;
    ASSERT_EQ(r.removed, 1u);
  }
}

TEST(StreamMeter, TwoSplitsEverywhereAndCrLf) {
  std::string stream = kContent1 + kContent2 + kUsageOnly + kDone;
  std::string expected = kContent1 + kContent2 + kDone;
  for (std::string* s : {&stream, &expected}) {
    std::string crlf;
    for (char c : *s) {
      if (c == '\n') crlf += '\r';
      crlf += c;
    }
    *s = crlf;
  }
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    for (std::size_t j = i; j <= stream.size(); j += 7) {
      Result r = run(stream, true, {i, j});
      ASSERT_EQ(r.out, expected) << "splits at " << i << ", " << j;
      ASSERT_EQ(r.usage.total_tokens, 17);
    }
  }
}

TEST(StreamMeter, AnyJsonWhitespaceAfterTheColonAtEverySplit) {
  // Pretty-printed JSON sent as one `data:` line per line (joined with \n) or with tabs: the
  // finish_reason must start the tail, and the usage chunk must be billed and removed.
  const std::string finish =
      "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},"
      "\"finish_reason\":\ndata: \"stop\"}],\"usage\":null}\n\n";
  const std::string usage =
      "{\"prompt_tokens\":15,\"completion_tokens\":2,\"total_tokens\":17}}\n\n";
  for (const std::string& usage_only :
       {"data: {\"id\":\"c1\",\"choices\":[],\"usage\":\t" + usage,
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":\ndata: " + usage,
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\" \t:\ndata: \t " + usage}) {
    const std::string stream = kContent1 + finish + usage_only + kDone;
    for (std::size_t i = 0; i <= stream.size(); ++i) {
      Result r = run(stream, true, {i});
      ASSERT_EQ(r.out, kContent1 + finish + kDone) << usage_only << "split at " << i;
      ASSERT_EQ(r.usage.prompt_tokens, 15) << usage_only << "split at " << i;
      ASSERT_EQ(r.removed, 1u);
    }
  }
}

TEST(StreamMeter, PassesEverythingWhenTheClientAskedForUsage) {
  const std::string stream = kContent1 + kContent2 + kUsageOnly + kDone;
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    Result r = run(stream, false, {i});
    ASSERT_EQ(r.out, stream);
    ASSERT_EQ(r.usage.prompt_tokens, 15);
    ASSERT_EQ(r.removed, 0u);
  }
}

TEST(StreamMeter, NeverRemovesAChunkWithContentOrFinishReason) {
  // llama.cpp: usage rides on the finish chunk, whose choices are not empty.
  const std::string finish_with_usage =
      "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],"
      "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9,\"total_tokens\":13},"
      "\"timings\":{}}\n\n";
  const std::string stream = kContent1 + finish_with_usage + kDone;
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    Result r = run(stream, true, {i});
    ASSERT_EQ(r.out, stream);
    ASSERT_EQ(r.usage.completion_tokens, 9);
  }
}

// Current llama.cpp puts its `timings` on its last chunk: with the injected include_usage that is
// the usage chunk, removed all the same (a `choices: []` chunk the client did not ask for breaks
// clients that read choices[0]; the README says what is lost).
TEST(StreamMeter, LlamaCppsUsageChunkWithTimingsIsRemovedToo) {
  const std::string with_timings =
      "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],"
      "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6},"
      "\"timings\":{\"predicted_per_second\":50.1}}\n\n";
  const std::string stream = kContent1 + kContent2 + with_timings + kDone;
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    Result r = run(stream, true, {i});
    ASSERT_EQ(r.out, kContent1 + kContent2 + kDone) << "split at " << i;
    ASSERT_EQ(r.usage.total_tokens, 6);
  }
}

TEST(StreamMeter, TgiUsageChunkWithEmptyIdIsRemoved) {
  const std::string tgi_usage =
      "data:{\"id\":\"\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,"
      "\"total_tokens\":8}}\n\n";
  Result r = run(kContent2 + tgi_usage + kDone, true, {10});
  EXPECT_EQ(r.out, kContent2 + kDone);
  EXPECT_EQ(r.usage.total_tokens, 8);
}

TEST(StreamMeter, CumulativeUsageTakesTheLastValue) {
  // vLLM continuous_usage_stats: every chunk carries the running totals.
  std::string stream;
  for (int i = 1; i <= 5; ++i) {
    stream +=
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"t\"}}],\"usage\":"
        "{\"prompt_tokens\":7,\"completion_tokens\":" +
        std::to_string(i) + ",\"total_tokens\":" + std::to_string(7 + i) + "}}\n\n";
  }
  Result r = run(stream + kDone, true, {33});
  EXPECT_EQ(r.out, stream + kDone);
  EXPECT_EQ(r.usage.completion_tokens, 5);
  EXPECT_EQ(r.usage.total_tokens, 12);
}

TEST(StreamMeter, NothingIsHeldBeforeTheStreamsTail) {
  simdjson::dom::parser parser;
  StreamMeter m(&parser, true);
  std::string_view in = kContent1;
  std::string_view out = m.relay(in);
  EXPECT_EQ(out.data(), in.data());  // the read's own bytes, no copy
  EXPECT_EQ(out.size(), in.size());
  // Before a finish_reason, part of an event goes out at once (zero buffering).
  std::string_view part = std::string_view(kContent1).substr(0, 10);
  EXPECT_EQ(m.relay(part), part);
  EXPECT_EQ(std::string(m.relay(std::string_view(kContent1).substr(10))), kContent1.substr(10));
  // After it, an unfinished event is held until it is whole: it may be the usage chunk.
  EXPECT_EQ(std::string(m.relay(kContent2 + kUsageOnly.substr(0, 12))), kContent2);
  EXPECT_EQ(std::string(m.relay(std::string_view(kUsageOnly).substr(12))), "");
  EXPECT_EQ(std::string(m.relay(kDone)), kDone);
  EXPECT_EQ(m.removed_events(), 1u);
}

TEST(StreamMeter, HeldBytesAreBounded) {
  simdjson::dom::parser parser;
  StreamMeter m(&parser, true);
  ASSERT_EQ(std::string(m.relay(kContent2)), kContent2);  // the tail: holding applies
  std::string huge = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1},\"pad\":\"" +
                     std::string(StreamMeter::kMaxHeld + 100, 'x');
  std::string sent(m.relay(huge));
  EXPECT_EQ(sent, huge);  // over the bound: sent on, not held
  // The rest of that event completes it; it cannot be removed any more.
  std::string rest = "\"}\n\n";
  EXPECT_EQ(std::string(m.relay(rest)), rest);
  EXPECT_EQ(m.removed_events(), 0u);
}

TEST(StreamMeter, UnterminatedTailIsFlushedAtTheEnd) {
  Result r = run(kContent1 + "data: {\"partial\":", true, {5});
  EXPECT_EQ(r.out, kContent1 + "data: {\"partial\":");
}

// A message that ends inside its last event (no blank line, or no line end at all): the bytes
// go out as they came, and usage in that event, when its JSON is whole, is still read; an
// event cut in the middle of its JSON adds nothing.
TEST(StreamMeter, UsageInALastEventWithoutItsBlankLineIsRead) {
  const std::string usage_event = kUsageOnly.substr(0, kUsageOnly.size() - 2);
  for (const std::string end : {"", "\n", "\r", "\r\n"}) {
    const std::string stream = kContent1 + kContent2 + usage_event + end;
    for (bool filter : {true, false}) {
      for (std::size_t i = 0; i <= stream.size(); ++i) {
        Result r = run(stream, filter, {i});
        ASSERT_EQ(r.out, stream) << "split at " << i;
        ASSERT_EQ(r.usage.prompt_tokens, 15) << "split at " << i;
        ASSERT_EQ(r.usage.completion_tokens, 2) << "split at " << i;
      }
    }
  }
  Result cut = run(kContent1 + kContent2 + kUsageOnly.substr(0, kUsageOnly.size() - 10), true, {});
  EXPECT_FALSE(cut.usage.reported());
}

TEST(RequestRewrite, InsertsIncludeUsageKeepingTheRestByteForByte) {
  simdjson::dom::parser p;
  auto out = with_include_usage(R"(  {"model":"m","stream":true,"messages":[]})", false, false, p);
  ASSERT_TRUE(out);
  EXPECT_EQ(
      *out,
      R"(  {"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]})");
}

TEST(RequestRewrite, MergesIntoExistingStreamOptions) {
  simdjson::dom::parser p;
  auto out = with_include_usage(
      R"({"model":"m","stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true}})",
      true, false, p);
  ASSERT_TRUE(out);
  auto doc = p.parse(*out);
  EXPECT_EQ(bool(doc["stream_options"]["include_usage"]), true);
  // The client turned usage off: it must not get usage on every chunk either (vLLM sends
  // continuous stats only with include_usage).
  EXPECT_EQ(doc["stream_options"]["continuous_usage_stats"].error(), simdjson::NO_SUCH_FIELD);
  EXPECT_EQ(std::string_view(doc["model"]), "m");
}

TEST(RequestRewrite, NullStreamOptionsBecomeAnObject) {
  simdjson::dom::parser p;
  auto out = with_include_usage(R"({"stream":true,"stream_options":null})", true, false, p);
  ASSERT_TRUE(out);
  auto doc = p.parse(*out);
  EXPECT_EQ(bool(doc["stream_options"]["include_usage"]), true);
}

TEST(RequestRewrite, KeepsContinuousStatsTheClientAskedFor) {
  simdjson::dom::parser p;
  auto out = with_include_usage(
      R"({"stream":true,"stream_options":{"continuous_usage_stats":true,"x":1}})", true, true, p);
  ASSERT_TRUE(out);
  EXPECT_EQ(
      *out,
      R"({"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true,"x":1}})");
}

TEST(RequestRewrite, TheLastDuplicatedStreamOptionsIsTheOneKept) {
  simdjson::dom::parser p;
  auto out = with_include_usage(
      R"({"stream_options":{"a":1},"stream":true,"stream_options":{"b":2}})", true, false, p);
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, R"({"stream":true,"stream_options":{"include_usage":true,"b":2}})");
}

TEST(TokenEstimate, AsciiAndOtherScripts) {
  TextCount t;
  t.add_utf8("Hello, world");  // 12 ASCII bytes -> 3 tokens
  EXPECT_EQ(t.tokens(), 3);
  TextCount c;
  c.add_utf8("\xe4\xbd\xa0\xe5\xa5\xbd");  // two CJK characters
  EXPECT_EQ(c.other, 2u);
  EXPECT_EQ(c.tokens(), 2);
  TextCount e;
  e.add_json_escaped(R"(\u4f60\u597d a\n)");
  EXPECT_EQ(e.other, 2u);
  EXPECT_EQ(e.ascii, 3u);
}

// add_utf8 counts sixteen bytes at a time and folds its lane counters every 255 rounds: it must
// agree with the plain definition (ASCII bytes; non-ASCII lead bytes) on any bytes, at any length
// and alignment, across the folds.
TEST(TokenEstimate, WordAtATimeCountMatchesBytewise) {
  std::mt19937 rng(7);
  std::string buf(16 * 255 * 3 + 64, '\0');
  for (int round = 0; round < 400; ++round) {
    const int kind = round % 4;  // ASCII only, UTF-8 text, all 0x80..0xff, any byte
    for (auto& c : buf) {
      unsigned v = rng();
      c = static_cast<char>(kind == 0   ? 0x20 + v % 0x5f
                            : kind == 1 ? (v % 3 ? 0x61 + v % 26 : 0x80 + v % 0x80)
                            : kind == 2 ? 0x80 + v % 0x80
                                        : v & 0xff);
    }
    const std::size_t start = rng() % 8;
    const std::size_t len = round < 8 ? 16 * 255 * 3 : rng() % (buf.size() - start);
    std::string_view text(buf.data() + start, len);
    std::uint64_t ascii = 0, other = 0;
    for (unsigned char c : text) {
      if (c < 0x80) {
        ++ascii;
      } else if ((c & 0xC0) != 0x80) {
        ++other;
      }
    }
    TextCount t;
    t.add_utf8(text);
    ASSERT_EQ(t.ascii, ascii) << "round " << round << " len " << len;
    ASSERT_EQ(t.other, other) << "round " << round << " len " << len;
  }
}

TEST(BodyUsage, FoundInTheTailOfALargeResponse) {
  simdjson::dom::parser p;
  std::string tail = R"(0.12,0.5]}],"model":"e","usage":{"prompt_tokens":900,"total_tokens":900}})";
  Usage u;
  TextCount content;
  ASSERT_TRUE(read_body_usage(tail, p, u, content));
  EXPECT_EQ(u.prompt_tokens, 900);
  EXPECT_EQ(u.total_tokens, 900);
}

TEST(BodyUsage, AHostileBodyIsSearchedForABoundedNumberOfCandidates) {
  // A backend's body of `"usage":{` repeated: each candidate is an object that never closes.
  // Searched to the end of the body each, 1 MiB of them took minutes of a worker thread; now at
  // most 16 candidates of at most 16 KiB are tried, from the end.
  simdjson::dom::parser p;
  const std::string real =
      R"({"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},"junk":)";
  auto junk = [](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += R"("usage":{)";
    return s;
  };
  Usage u;
  TextCount content;
  ASSERT_TRUE(read_body_usage(real + junk(15), p, u, content));
  EXPECT_EQ(u.total_tokens, 7);
  Usage none;
  EXPECT_FALSE(read_body_usage(real + junk(120'000), p, none, content));
  EXPECT_EQ(none.total_tokens, -1);
}

TEST(BodyUsage, AUsageObjectPastItsWindowIsReadFromAWholeBody) {
  // A usage object with a 20 KB field of its own: longer than a usage object is searched for.
  simdjson::dom::parser p;
  const std::string body = R"({"id":"x","choices":[],"usage":{"prompt_tokens":11,"note":")" +
                           std::string(20'000, 'n') +
                           R"(","completion_tokens":22,"total_tokens":33}})";
  Usage whole;
  TextCount content;
  ASSERT_TRUE(read_body_usage(body, p, whole, content, true));
  EXPECT_EQ(whole.prompt_tokens, 11);
  EXPECT_EQ(whole.completion_tokens, 22);
  Usage part;  // a tail or a piece cannot be parsed whole: left to the estimate
  EXPECT_FALSE(read_body_usage(body, p, part, content, false));
}

TEST(BodyUsage, TextCutOffInsideItsStringIsCounted) {
  // A client hang-up stops the copy inside the content: what was relayed was still generated.
  simdjson::dom::parser p;
  const std::string head = R"({"choices":[{"message":{"content":")";
  for (const std::string& cut : {std::string(300'000, 'x'), std::string(299'999, 'x') + "\\"}) {
    Usage u;
    TextCount content;
    EXPECT_FALSE(read_body_usage(head + cut, p, u, content));
    EXPECT_EQ(content.ascii, 300'000u);
    EXPECT_EQ(content.tokens(), 75'000);
  }
}

}  // namespace
}  // namespace llmproxy::llm
