// SseScanner: events come out the same whatever way the bytes were split, with every line
// ending backends use, and memory stays bounded on an endless line.
#include "llm/sse_scanner.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace llmproxy::llm {
namespace {

struct Seen {
  std::string event, data, id;
  bool truncated;
  bool operator==(const Seen&) const = default;
};

std::vector<Seen> scan(const std::vector<std::string_view>& feeds, std::size_t max = 1 << 20) {
  SseScanner s(max);
  std::vector<Seen> out;
  for (auto f : feeds) {
    s.feed(f, [&](const SseEvent& e) {
      out.push_back({std::string(e.event), std::string(e.data), std::string(e.id), e.truncated});
    });
  }
  return out;
}

// A stream mixing what real backends send: OpenAI/vLLM "data: {", TGI "data:{", CRLF and bare CR
// line endings, a keep-alive comment, a named event with an id, and a two-line data field.
constexpr std::string_view kStream =
    ": ping\n\n"
    "data: {\"a\":1}\n\n"
    "data:{\"b\":2}\r\n\r\n"
    "event: response.completed\r"
    "id: 7\r"
    "data: line1\r"
    "data: line2\r\r"
    "data: [DONE]\n\n";

const std::vector<Seen> kExpected = {
    {"", "{\"a\":1}", "", false},
    {"", "{\"b\":2}", "", false},
    {"response.completed", "line1\nline2", "7", false},
    {"", "[DONE]", "7", false},  // the last event id persists, as the spec says
};

TEST(SseScanner, WholeStreamInOneFeed) {
  EXPECT_EQ(scan({kStream}), kExpected);
}

TEST(SseScanner, EverySplitPointGivesTheSameEvents) {
  for (std::size_t i = 0; i <= kStream.size(); ++i) {
    ASSERT_EQ(scan({kStream.substr(0, i), kStream.substr(i)}), kExpected) << "split at " << i;
  }
}

TEST(SseScanner, EveryPairOfSplitPointsGivesTheSameEvents) {
  for (std::size_t i = 0; i <= kStream.size(); ++i) {
    for (std::size_t j = i; j <= kStream.size(); ++j) {
      ASSERT_EQ(scan({kStream.substr(0, i), kStream.substr(i, j - i), kStream.substr(j)}),
                kExpected)
          << "splits at " << i << " and " << j;
    }
  }
}

TEST(SseScanner, OneByteAtATime) {
  std::vector<std::string_view> feeds;
  for (std::size_t i = 0; i < kStream.size(); ++i) feeds.push_back(kStream.substr(i, 1));
  EXPECT_EQ(scan(feeds), kExpected);
}

// A byte order mark opening the stream is skipped (the spec strips it), at every split; one
// anywhere else is part of its line.
TEST(SseScanner, LeadingByteOrderMarkIsSkipped) {
  const std::string stream =
      "\xEF\xBB\xBF"
      "data: {\"a\":1}\n\n\xEF\xBB\xBF"
      "data: x\n\ndata: y\n\n";
  const std::vector<Seen> expected = {{"", "{\"a\":1}", "", false}, {"", "y", "", false}};
  const std::string_view v(stream);
  for (std::size_t i = 0; i <= v.size(); ++i) {
    for (std::size_t j = i; j <= v.size(); ++j) {
      ASSERT_EQ(scan({v.substr(0, i), v.substr(i, j - i), v.substr(j)}), expected)
          << "splits at " << i << " and " << j;
    }
  }
  // The start of a mark, then other bytes: what came of the mark is dropped as well.
  EXPECT_EQ(scan({"\xEF\xBB", "data: z\n\n"}), (std::vector<Seen>{{"", "z", "", false}}));
}

TEST(SseScanner, CrAtTheEndOfAFeedAndLfAtTheStartOfTheNextAreOneLineEnding) {
  // Were the \n taken as a second line ending, the blank line would dispatch "a" early and the
  // next data line would form an event of its own.
  EXPECT_EQ(scan({"data: a\r", "\ndata: b\r", "\n\r", "\n"}),
            (std::vector<Seen>{{"", "a\nb", "", false}}));
}

TEST(SseScanner, UnfinishedEventIsNotDelivered) {
  SseScanner s;
  int n = 0;
  s.feed("data: {\"partial\":", [&](const SseEvent&) { ++n; });
  EXPECT_EQ(n, 0);
  EXPECT_GT(s.pending_bytes(), 0u);
  s.feed("true}\n\n", [&](const SseEvent& e) {
    ++n;
    EXPECT_EQ(e.data, "{\"partial\":true}");
  });
  EXPECT_EQ(n, 1);
  EXPECT_EQ(s.pending_bytes(), 0u);
}

TEST(SseScanner, BlankLinesAndCommentsAloneAreNoEvents) {
  EXPECT_TRUE(scan({"\n\n\r\n: keep-alive\n\nevent: x\n\n"}).empty());
}

TEST(SseScanner, FieldWithoutColonAndUnknownFieldsAreIgnored) {
  EXPECT_EQ(scan({"data\nretry: 10\nfoo: bar\ndata: x\n\n"}),
            (std::vector<Seen>{{"", "\nx", "", false}}));
}

// llama.cpp's server reports a failure inside a stream as `error: {json}` (no data line): read
// as an event named "error", whatever else the block has, and only that block.
TEST(SseScanner, LlamaCppErrorFieldIsAnEventNamedError) {
  constexpr std::string_view kError =
      R"({"code":500,"message":"context full","type":"server_error"})";
  const std::string stream = "data: {\"a\":1}\n\nerror: " + std::string(kError) +
                             "\n\ndata: {\"b\":2}\n\nerror: x\ndata: y\n\ndata: [DONE]\n\n";
  const std::vector<Seen> expected = {
      {"", "{\"a\":1}", "", false},
      {"error", std::string(kError), "", false},
      {"", "{\"b\":2}", "", false},
      {"error", "y", "", false},  // a block's own data wins over the error line's value
      {"", "[DONE]", "", false},
  };
  EXPECT_EQ(scan({stream}), expected);
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    ASSERT_EQ(scan({std::string_view(stream).substr(0, i), std::string_view(stream).substr(i)}),
              expected)
        << "split at " << i;
  }
  EXPECT_EQ(scan({"data: y\nerror: x\n\n"}), (std::vector<Seen>{{"error", "y", "", false}}));
}

TEST(SseScanner, EndlessLineIsBoundedAndFlagged) {
  SseScanner s(64);
  std::string chunk(1000, 'x');
  int n = 0;
  s.feed("data: ", [&](const SseEvent&) { ++n; });
  for (int i = 0; i < 100; ++i) {
    s.feed(chunk, [&](const SseEvent&) { ++n; });
    ASSERT_LE(s.pending_bytes(), 64u);  // 100 KB arrived; the scanner holds at most its bound
  }
  s.feed("\n\ndata: ok\n\n", [&](const SseEvent& e) {
    ++n;
    if (n == 1) {
      EXPECT_TRUE(e.truncated);
      EXPECT_LE(e.data.size(), 64u);
    } else {
      EXPECT_FALSE(e.truncated);
      EXPECT_EQ(e.data, "ok");
    }
  });
  EXPECT_EQ(n, 2);
  EXPECT_EQ(s.events(), 2u);
  EXPECT_EQ(s.truncated_events(), 1u);
}

TEST(SseScanner, ManyDataLinesAreBoundedToo) {
  SseScanner s(32);
  std::string stream;
  for (int i = 0; i < 50; ++i) stream += "data: 0123456789\n";
  stream += "\n";
  int n = 0;
  s.feed(stream, [&](const SseEvent& e) {
    ++n;
    EXPECT_TRUE(e.truncated);
    EXPECT_LE(e.data.size(), 32u);
  });
  EXPECT_EQ(n, 1);
}

}  // namespace
}  // namespace llmproxy::llm

namespace llmproxy::llm {
namespace {

// One large event (a 200 KB line split over feeds) does not keep its memory for the rest of the
// stream: after it, the scanner holds what small events need.
TEST(SseScanner, LargeEventsMemoryIsGivenBack) {
  SseScanner s;
  std::size_t seen = 0;
  const auto count = [&](const SseEvent& e) { seen += e.data.size(); };
  const std::string big = "data: " + std::string(200'000, 'x');
  s.feed(std::string_view(big).substr(0, 100'000), count);
  EXPECT_GE(s.room(), 100'000u);  // the unfinished line is held
  s.feed(std::string_view(big).substr(100'000), count);
  s.feed("\n\n", count);
  EXPECT_EQ(seen, 200'000u);
  s.feed("data: {\"small\":1}\n\n", count);
  EXPECT_LE(s.room(), 2 * kKeptRoom) << "the large event's room was kept";
}

}  // namespace
}  // namespace llmproxy::llm
