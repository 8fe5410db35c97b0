// Unit tests for the duration and size scalars of the config file (config/duration.h).
#include "config/duration.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace llmproxy::config {
namespace {

using std::chrono::milliseconds;

// Returns the parsed value in milliseconds, or -1 when the text was rejected, so that a failing
// expectation prints both the input and what came out.
std::int64_t ms(std::string_view text) {
  auto d = parse_duration(text);
  return d ? d->count() : -1;
}

TEST(ParseDuration, SingleUnits) {
  EXPECT_EQ(ms("500ms"), 500);
  EXPECT_EQ(ms("1s"), 1'000);
  EXPECT_EQ(ms("2m"), 120'000);
  EXPECT_EQ(ms("1h"), 3'600'000);
  EXPECT_EQ(ms("0ms"), 0);
  EXPECT_EQ(ms("30s"), 30'000);
}

TEST(ParseDuration, CompoundGroups) {
  EXPECT_EQ(ms("1m30s"), 90'000);
  EXPECT_EQ(ms("1h2m3s"), 3'723'000);
  EXPECT_EQ(ms("1s500ms"), 1'500);
}

TEST(ParseDuration, Fractions) {
  EXPECT_EQ(ms("1.5s"), 1'500);
  EXPECT_EQ(ms("0.5m"), 30'000);
  EXPECT_EQ(ms("0.25s"), 250);
}

TEST(ParseDuration, BareZeroIsZero) {
  auto d = parse_duration("0");
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(*d, milliseconds{0});
}

TEST(ParseDuration, RejectsMalformed) {
  EXPECT_FALSE(parse_duration("10").has_value()) << "a bare number other than 0 is ambiguous";
  EXPECT_FALSE(parse_duration("").has_value());
  EXPECT_FALSE(parse_duration("5x").has_value());
  EXPECT_FALSE(parse_duration("s").has_value());
  EXPECT_FALSE(parse_duration("-1s").has_value());
  EXPECT_FALSE(parse_duration("1S").has_value()) << "units are lower case";
  EXPECT_FALSE(parse_duration("1 s").has_value());
  EXPECT_FALSE(parse_duration(".s").has_value());
  EXPECT_FALSE(parse_duration("1s ").has_value());
  EXPECT_FALSE(parse_duration("1m30").has_value()) << "every group needs a unit";
  EXPECT_FALSE(parse_duration("1.2.3s").has_value());
  EXPECT_FALSE(parse_duration("00").has_value());
}

std::int64_t bytes(std::string_view text) {
  auto s = parse_size(text);
  return s ? static_cast<std::int64_t>(*s) : -1;
}

TEST(ParseSize, PlainAndUnits) {
  EXPECT_EQ(bytes("4096"), 4096);
  EXPECT_EQ(bytes("0"), 0);
  EXPECT_EQ(bytes("100B"), 100);
  EXPECT_EQ(bytes("512KiB"), 512 * 1024);
  EXPECT_EQ(bytes("10MiB"), 10 * 1024 * 1024);
  EXPECT_EQ(bytes("1GiB"), 1024LL * 1024 * 1024);
  EXPECT_EQ(bytes("2KB"), 2'000);
  EXPECT_EQ(bytes("1MB"), 1'000'000);
  EXPECT_EQ(bytes("3GB"), 3'000'000'000LL);
  EXPECT_EQ(bytes("4K"), 4 * 1024);
  EXPECT_EQ(bytes("5M"), 5 * 1024 * 1024);
  EXPECT_EQ(bytes("1G"), 1024LL * 1024 * 1024);
}

TEST(ParseSize, RejectsMalformed) {
  EXPECT_FALSE(parse_size("").has_value());
  EXPECT_FALSE(parse_size("10mb").has_value()) << "units are case-sensitive";
  EXPECT_FALSE(parse_size("x").has_value());
  EXPECT_FALSE(parse_size("MiB").has_value());
  EXPECT_FALSE(parse_size("-1").has_value());
  EXPECT_FALSE(parse_size("1.5MiB").has_value());
  EXPECT_FALSE(parse_size("10TiB").has_value());
}

TEST(ParseSize, RejectsOverflow) {
  EXPECT_FALSE(parse_size("99999999999999999999999").has_value());
  EXPECT_FALSE(parse_size("18446744073709551615GiB").has_value());
}

TEST(FormatDuration, CanonicalForms) {
  EXPECT_EQ(format_duration(milliseconds{0}), "0s");
  EXPECT_EQ(format_duration(milliseconds{250}), "250ms");
  EXPECT_EQ(format_duration(milliseconds{1'500}), "1500ms");
  EXPECT_EQ(format_duration(milliseconds{1'000}), "1s");
  EXPECT_EQ(format_duration(milliseconds{90'000}), "1m30s");
  EXPECT_EQ(format_duration(milliseconds{120'000}), "2m");
  EXPECT_EQ(format_duration(milliseconds{3'600'000}), "1h");
  EXPECT_EQ(format_duration(milliseconds{7'200'000}), "2h");
}

TEST(FormatDuration, RoundTripsThroughParse) {
  for (std::int64_t v : {0LL, 1LL, 250LL, 999LL, 1'000LL, 1'500LL, 59'000LL, 60'000LL, 90'000LL,
                         3'599'000LL, 3'600'000LL, 5'400'000LL, 86'400'000LL, 300'000LL}) {
    const milliseconds d{v};
    const std::string text = format_duration(d);
    auto back = parse_duration(text);
    ASSERT_TRUE(back.has_value()) << v << " formatted as \"" << text << "\" does not parse";
    EXPECT_EQ(back->count(), v) << "via \"" << text << "\"";
  }
}

TEST(FormatDuration, ParseThenFormatIsStable) {
  for (const char* text : {"500ms", "1s", "2m", "1h", "1m30s", "10s", "5m", "30s"}) {
    auto d = parse_duration(text);
    ASSERT_TRUE(d.has_value()) << text;
    EXPECT_EQ(format_duration(*d), text);
  }
}

}  // namespace
}  // namespace llmproxy::config
