// The usage record's JSON: the seed's webhook fields byte for byte (names, order, types), then
// the additions; escaping checked by parsing the output back with simdjson, a real JSON parser.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <simdjson.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "usage/record.h"

namespace llmproxy::usage {
namespace {

// 2026-01-14T10:30:00Z
constexpr std::int64_t kSeedTimeMs = 1768386600000;

UsageRecord seed_record() {
  UsageRecord r;
  r.request_id = "req_abc123";
  r.user_id = "user_alice";
  r.api_key = "sk-prod-xxx";
  r.model = "meta-llama/Llama-3-8b";
  r.prompt_tokens = 15;
  r.completion_tokens = 42;
  r.total_tokens = 57;
  r.is_stream = true;
  r.endpoint = "/v1/chat/completions";
  r.timestamp_ms = kSeedTimeMs;
  r.backend_url = "http://vllm:8000";
  r.backend = "vllm";
  r.status_code = 200;
  r.duration_ms = 1234.5678;
  r.ttft_ms = 87.25;
  return r;
}

std::vector<std::string> keys_of(const std::string& json) {
  simdjson::dom::parser p;
  simdjson::dom::object obj = p.parse(json).get_object();
  std::vector<std::string> keys;
  for (auto field : obj) keys.emplace_back(field.key);
  return keys;
}

TEST(UsageRecord, SeedExampleIsThePrefix) {
  const std::string seed =
      R"({"request_id":"req_abc123","user_id":"user_alice","api_key":"sk-prod-xxx",)"
      R"("model":"meta-llama/Llama-3-8b","prompt_tokens":15,"completion_tokens":42,)"
      R"("total_tokens":57,"is_stream":true,"endpoint":"/v1/chat/completions",)"
      R"("timestamp":"2026-01-14T10:30:00Z","backend_url":"http://vllm:8000")";
  std::string json = to_json(seed_record());
  ASSERT_GT(json.size(), seed.size());
  EXPECT_EQ(json.substr(0, seed.size()), seed);
  EXPECT_EQ(json[seed.size()], ',');
  EXPECT_EQ(json.back(), '}');
}

TEST(UsageRecord, FieldOrderAndTypes) {
  auto r = seed_record();
  r.client_request_id = "client-1";
  r.cached_tokens = 8;
  r.reasoning_tokens = 3;
  r.finish = "client_disconnected";
  r.usage_source = "estimated";
  std::string json = to_json(r);
  EXPECT_EQ(keys_of(json),
            (std::vector<std::string>{
                "request_id",    "user_id",           "api_key",       "model",
                "prompt_tokens", "completion_tokens", "total_tokens",  "is_stream",
                "endpoint",      "timestamp",         "backend_url",   "client_request_id",
                "backend",       "status_code",       "duration_ms",   "ttft_ms",
                "finish",        "usage_source",      "cached_tokens", "reasoning_tokens"}));
  simdjson::dom::parser p;
  simdjson::dom::element e = p.parse(json);
  EXPECT_EQ(std::string_view(e["client_request_id"]), "client-1");
  EXPECT_EQ(std::string_view(e["backend"]), "vllm");
  EXPECT_EQ(int64_t(e["status_code"]), 200);
  EXPECT_TRUE(e["status_code"].is_int64());
  EXPECT_TRUE(e["prompt_tokens"].is_int64());
  EXPECT_TRUE(e["is_stream"].is_bool());
  EXPECT_DOUBLE_EQ(double(e["duration_ms"]), 1234.568);
  EXPECT_DOUBLE_EQ(double(e["ttft_ms"]), 87.25);
  EXPECT_NE(json.find(R"("duration_ms":1234.568,"ttft_ms":87.25,)"), std::string::npos) << json;
  EXPECT_EQ(std::string_view(e["finish"]), "client_disconnected");
  EXPECT_EQ(std::string_view(e["usage_source"]), "estimated");
  EXPECT_EQ(int64_t(e["cached_tokens"]), 8);
  EXPECT_EQ(int64_t(e["reasoning_tokens"]), 3);
}

TEST(UsageRecord, NullsAndOmissions) {
  UsageRecord r;  // everything unknown
  r.timestamp_ms = 0;
  std::string json = to_json(r);
  EXPECT_EQ(json, R"({"request_id":"","user_id":"","api_key":"","model":"","prompt_tokens":0,)"
                  R"("completion_tokens":0,"total_tokens":0,"is_stream":false,"endpoint":"",)"
                  R"("timestamp":"1970-01-01T00:00:00Z","backend_url":"","client_request_id":null,)"
                  R"("backend":"","status_code":0,"duration_ms":0,"ttft_ms":null,)"
                  R"("finish":"completed","usage_source":"backend"})");
  r.cached_tokens = 0;  // reported as zero: present
  EXPECT_NE(to_json(r).find(R"("cached_tokens":0})"), std::string::npos);
}

TEST(UsageRecord, MillisecondsHaveAtMostThreeDecimals) {
  UsageRecord r;
  auto field = [&](double d) {
    r.duration_ms = d;
    std::string json = to_json(r);
    auto at = json.find("\"duration_ms\":") + 14;
    return json.substr(at, json.find(',', at) - at);
  };
  EXPECT_EQ(field(12.0), "12");
  EXPECT_EQ(field(12.5), "12.5");
  EXPECT_EQ(field(0.0004), "0");
  EXPECT_EQ(field(0.0126), "0.013");
  EXPECT_EQ(field(99999.9999), "100000");
  EXPECT_EQ(field(std::numeric_limits<double>::quiet_NaN()), "0");
  EXPECT_EQ(field(-2.5), "-2.5");
  EXPECT_EQ(field(1e300), "0");  // beyond the 64-byte buffer: written as 0
  // Against to_chars (fixed, 3 decimals, trailing zeros dropped) over values of every magnitude,
  // ties (x.xxx5 are rarely exact in binary) and their neighbours included.
  auto expected = [](double d) {
    char buf[400];
    auto end = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::fixed, 3).ptr;
    std::string t(buf, end);
    while (t.back() == '0') t.pop_back();
    if (t.back() == '.') t.pop_back();
    return t == "-0" ? std::string("0") : t;
  };
  std::mt19937_64 rng(7);
  std::vector<double> values;
  for (int i = 0; i < 20000; ++i) {
    double scale = std::pow(10.0, std::uniform_int_distribution<int>(-4, 12)(rng));
    values.push_back(std::uniform_real_distribution<double>(0, scale)(rng));
    // Half-thousandths: 0.0005, 1.2345, ... and the doubles around them.
    double tie = (static_cast<double>(rng() % 100'000'000) + 0.5) / 1000;
    values.push_back(tie);
    values.push_back(std::nextafter(tie, 0.0));
    values.push_back(std::nextafter(tie, 1e18));
  }
  for (double d : {0.0, 0.001, 0.0015, 1.0005, 2.0005, 1099511627.7765, 0x1p30, 0x1p40 / 1000}) {
    values.push_back(d);
  }
  int mismatches = 0;
  for (double d : values) {
    if (field(d) != expected(d) && ++mismatches <= 5) {
      ADD_FAILURE() << fmt::format("{:.17g}: {} vs to_chars {}", d, field(d), expected(d));
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(UsageRecord, StringEscaping) {
  UsageRecord r;
  r.user_id =
      "a\"b\\c\nd\te\x01"
      "f\x1f"
      "g/h";
  r.model = "模型-ü-😀";         // valid UTF-8 passes through unchanged
  r.api_key = "bad\xff\xc3(x";  // invalid bytes become U+FFFD
  std::string json = to_json(r);
  EXPECT_NE(json.find(R"("user_id":"a\"b\\c\nd\te\u0001f\u001fg/h")"), std::string::npos) << json;
  EXPECT_NE(json.find("\"model\":\"模型-ü-😀\""), std::string::npos) << json;
  EXPECT_NE(json.find(R"("api_key":"bad\ufffd\ufffd(x")"), std::string::npos) << json;
  simdjson::dom::parser p;
  simdjson::dom::element e;
  ASSERT_EQ(p.parse(json).get(e), simdjson::SUCCESS) << json;
  EXPECT_EQ(std::string_view(e["user_id"]), std::string_view(r.user_id));
  EXPECT_EQ(std::string_view(e["model"]), r.model);
}

TEST(UsageRecord, Rfc3339) {
  EXPECT_EQ(rfc3339(kSeedTimeMs), "2026-01-14T10:30:00Z");
  EXPECT_EQ(rfc3339(kSeedTimeMs + 999), "2026-01-14T10:30:00Z");  // second precision
  EXPECT_EQ(rfc3339(0), "1970-01-01T00:00:00Z");
  EXPECT_EQ(rfc3339(-1), "1969-12-31T23:59:59Z");
  EXPECT_EQ(rfc3339(951782400000), "2000-02-29T00:00:00Z");
  // The date arithmetic against the C library, every ~9 hours from 1950 to 2150 (leap years,
  // century rules, times before 1970).
  for (std::int64_t t = -631152000000; t < 5680281600000; t += 32'399'999) {
    std::time_t secs = static_cast<std::time_t>(t / 1000 - (t % 1000 < 0 ? 1 : 0));
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char want[32];
    std::strftime(want, sizeof want, "%Y-%m-%dT%H:%M:%SZ", &tm);
    ASSERT_EQ(rfc3339(t), want) << t;
  }
}

TEST(UsageRecord, AppendJsonAppends) {
  std::string out = "[";
  append_json(out, seed_record());
  out += ",";
  append_json(out, seed_record());
  out += "]";
  simdjson::dom::parser p;
  simdjson::dom::array a;
  ASSERT_EQ(p.parse(out).get(a), simdjson::SUCCESS);
  EXPECT_EQ(a.size(), 2u);
}

// PackedRecords is how records travel from the request path to the writer: every field must come
// back as it went in, whatever the strings hold (empty, long, NUL and non-ASCII bytes), and the
// JSON written from the packed form must be the JSON of the record itself.
UsageRecord varied_record(int i) {
  UsageRecord r = seed_record();
  r.request_id = "req_" + std::to_string(i);
  r.client_request_id = i % 3 == 0 ? "" : std::string(static_cast<std::size_t>(i % 200), 'c');
  r.user_id = i % 4 == 0 ? std::string() : "user\"" + std::to_string(i) + std::string(1, '\0');
  r.api_key = std::string(static_cast<std::size_t>(i * 37 % 5000), 'k');
  r.model = i % 2 ? "模型-ü" : "m";
  r.prompt_tokens = i;
  r.completion_tokens = -i;
  r.total_tokens = INT64_MAX - i;
  r.cached_tokens = i % 5 ? -1 : i;
  r.reasoning_tokens = i % 7 ? -1 : 2 * i;
  r.is_stream = i % 2 == 0;
  r.endpoint = i % 3 ? "/v1/completions" : "/v1/embeddings";
  r.timestamp_ms = kSeedTimeMs + i;
  r.backend_url = "http://b" + std::to_string(i) + ":8000";
  r.backend = i % 2 ? "" : "b";
  r.status_code = static_cast<unsigned>(200 + i % 400);
  r.duration_ms = 0.125 * i;
  r.ttft_ms = i % 2 ? -1 : 1.5 * i;
  r.finish = i % 4 == 1 ? "client_disconnected" : "completed";
  r.usage_source = i % 2 ? "estimated" : "backend";
  return r;
}

void expect_same(const UsageRecordView& got, const UsageRecord& w) {
  EXPECT_EQ(got.request_id, w.request_id);
  EXPECT_EQ(got.client_request_id, w.client_request_id);
  EXPECT_EQ(got.user_id, w.user_id);
  EXPECT_EQ(got.api_key, w.api_key);
  EXPECT_EQ(got.model, w.model);
  EXPECT_EQ(got.prompt_tokens, w.prompt_tokens);
  EXPECT_EQ(got.completion_tokens, w.completion_tokens);
  EXPECT_EQ(got.total_tokens, w.total_tokens);
  EXPECT_EQ(got.cached_tokens, w.cached_tokens);
  EXPECT_EQ(got.reasoning_tokens, w.reasoning_tokens);
  EXPECT_EQ(got.is_stream, w.is_stream);
  EXPECT_EQ(got.endpoint, w.endpoint);
  EXPECT_EQ(got.timestamp_ms, w.timestamp_ms);
  EXPECT_EQ(got.backend_url, w.backend_url);
  EXPECT_EQ(got.backend, w.backend);
  EXPECT_EQ(got.status_code, w.status_code);
  EXPECT_EQ(got.duration_ms, w.duration_ms);
  EXPECT_EQ(got.ttft_ms, w.ttft_ms);
  EXPECT_EQ(got.finish, w.finish);
  EXPECT_EQ(got.usage_source, w.usage_source);
  std::string a, b;
  append_json(a, got);
  append_json(b, w);
  EXPECT_EQ(a, b);
}

// The usage log stores rows: expanding one must give exactly the object the record's own JSON is
// (every string, number and optional field), whatever the record holds.
TEST(UsageRecordRow, ExpandsToTheRecordsJsonByteForByte) {
  std::vector<UsageRecord> records{seed_record(), UsageRecord{}};
  for (int i = 0; i < 300; ++i) records.push_back(varied_record(i));
  UsageRecord odd = seed_record();
  odd.user_id = "a,b]c[\\\"\\";  // the row's own punctuation inside strings
  odd.api_key = "bad\xff\xc3(x";
  odd.client_request_id = "\",null,\"";
  odd.duration_ms = 1e15;
  odd.timestamp_ms = -1;
  odd.cached_tokens = -1;
  odd.reasoning_tokens = 7;  // reported without cached_tokens: the row holds null before it
  records.push_back(odd);
  std::size_t row_bytes = 0, json_bytes = 0;
  for (const auto& r : records) {
    std::string row, expanded;
    append_row(row, r);
    ASSERT_TRUE(append_stored_json(expanded, row)) << row;
    ASSERT_EQ(expanded, to_json(r)) << row;
    // The row is an array a JSON parser reads, with the documented values at their indexes.
    simdjson::dom::parser p;
    simdjson::dom::array a;
    ASSERT_EQ(p.parse(row).get(a), simdjson::SUCCESS) << row;
    EXPECT_EQ(std::string_view(a.at(0)), r.request_id);
    EXPECT_EQ(std::int64_t(a.at(5)), r.completion_tokens);
    EXPECT_EQ(std::int64_t(a.at(9)), r.timestamp_ms);
    EXPECT_EQ(std::string_view(a.at(17)), r.usage_source);
    row_bytes += row.size();
    json_bytes += expanded.size();
  }
  // The seed's example record: what the row saves.
  std::string row;
  append_row(row, seed_record());
  EXPECT_LT(row.size() * 2, to_json(seed_record()).size()) << row;
  EXPECT_LT(row_bytes, json_bytes);
}

TEST(UsageRecordRow, AnObjectIsCopiedAndAnythingElseRefused) {
  const std::string object = to_json(seed_record());
  std::string out = "x";
  ASSERT_TRUE(append_stored_json(out, object));
  EXPECT_EQ(out, "x" + object);
  std::string row;
  append_row(row, seed_record());
  std::vector<std::string> bad{
      "", "[]", "null", row.substr(0, row.size() - 1),            // cut short
      row.substr(0, row.find(",\"/v1")) + "]",                    // too few values
      "[" + row.substr(1, row.size() - 2) + ",1,2,3]",            // too many
      "[" + row.substr(1, row.size() - 2) + ",]",                 // a trailing comma
      std::string(row).replace(row.find(",15,"), 4, ",,"),        // an empty value
      std::string(row).replace(row.find(",15,"), 4, ",\"15\","),  // a string for a number
      std::string(row).replace(row.find(",1,\""), 3, ",2,"),      // is_stream neither 0 nor 1
      std::string(row).replace(0, 2, "[1"),                       // request_id not a string
      "[\"req\\\"]",                                              // its closing quote escaped
      std::string(row).replace(row.find("\","), 2, "\"x,"),       // a string, then not a ','
      std::string(row).replace(row.find(std::to_string(kSeedTimeMs)),
                               std::to_string(kSeedTimeMs).size(), "1.5"),  // not whole ms
      // Damage that keeps the row's shape, found by the values' contents.
      std::string(row).replace(2, 3, "\xa5\xa5\xa5"),          // not UTF-8
      std::string(row).replace(2, 1, "\t"),                    // a raw control byte
      std::string(row).replace(2, 2, "\\x"),                   // no such escape
      std::string(row).replace(row.find(",15,"), 4, ",1-5,"),  // not a number
      std::string(row).replace(row.find(",15,"), 4, ",015,"),  // a leading zero
      std::string(row).replace(row.find(",15,"), 4, ",15.,"),  // no digit after '.'
      std::string(row).replace(row.find(",15,"), 4, ",-,"),    // a sign alone
  };
  for (const auto& b : bad) {
    std::string o = "kept";
    EXPECT_FALSE(append_stored_json(o, b)) << b;
    EXPECT_EQ(o, "kept");
  }
}

TEST(PackedRecords, EveryFieldComesBack) {
  PackedRecords q;
  std::vector<UsageRecord> want;
  for (int i = 0; i < 300; ++i) {
    want.push_back(varied_record(i));
    q.push(want.back());
  }
  ASSERT_EQ(q.size(), want.size());
  std::vector<UsageRecordView> got;
  q.views(got);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(i);
    expect_same(got[i], want[i]);
  }
}

TEST(PackedRecords, FrontFittingCountsWholeRecordsWithinBothLimits) {
  PackedRecords q;
  EXPECT_EQ(q.front_fitting(10, 1 << 20), 0u);
  UsageRecord big = varied_record(0);
  big.user_id.assign(1000, 'u');
  for (int i = 0; i < 6; ++i) q.push(big);
  const std::size_t one = q.bytes() / 6;
  EXPECT_EQ(q.front_fitting(100, q.bytes()), 6u);
  EXPECT_EQ(q.front_fitting(4, q.bytes()), 4u);
  EXPECT_EQ(q.front_fitting(100, 3 * one), 3u);
  EXPECT_EQ(q.front_fitting(100, 3 * one - 1), 2u);
  EXPECT_EQ(q.front_fitting(100, 1), 1u) << "a record larger than the limit still goes alone";
}

TEST(PackedRecords, MoveFrontSwapClearTrim) {
  PackedRecords q, taken;
  for (int i = 0; i < 10; ++i) q.push(varied_record(i));
  q.move_front(4, taken);
  EXPECT_EQ(q.size(), 6u);
  EXPECT_EQ(taken.size(), 4u);
  q.move_front(1, taken);  // appended behind what `taken` holds
  std::vector<UsageRecordView> v;
  taken.views(v);
  ASSERT_EQ(v.size(), 5u);
  for (int i = 0; i < 5; ++i) expect_same(v[static_cast<std::size_t>(i)], varied_record(i));
  v.clear();
  q.views(v);
  ASSERT_EQ(v.size(), 5u);
  for (int i = 0; i < 5; ++i) expect_same(v[static_cast<std::size_t>(i)], varied_record(i + 5));

  q.swap(taken);
  EXPECT_EQ(q.size(), 5u);
  v.clear();
  q.views(v);
  expect_same(v.at(0), varied_record(0));
  const std::size_t bytes = q.bytes();
  q.trim(0);  // gives back spare capacity, keeps the records
  EXPECT_EQ(q.bytes(), bytes);
  v.clear();
  q.views(v);
  expect_same(v.at(4), varied_record(4));
  q.clear();
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.bytes(), 0u);
  v.clear();
  q.views(v);
  EXPECT_TRUE(v.empty());
}

TEST(PackedRecords, TakingGroupsFromTheFrontLeavesTheRestInPlace) {
  // A backlog is cut into groups from its front: the records behind must not be moved each
  // time (that made draining a long backlog quadratic).
  PackedRecords q, taken;
  for (int i = 0; i < 100; ++i) q.push(varied_record(i));
  std::vector<UsageRecordView> before;
  q.views(before);
  int next = 0;
  for (std::size_t group : {7u, 30u, 1u, 50u}) {
    q.move_front(group, taken);
    std::vector<UsageRecordView> t, rest;
    taken.views(t);
    ASSERT_EQ(t.size(), group);
    for (const auto& v : t) expect_same(v, varied_record(next++));
    taken.clear();
    q.views(rest);
    ASSERT_EQ(rest.size(), 100u - static_cast<std::size_t>(next));
    EXPECT_EQ(rest.front().user_id.data(), before[static_cast<std::size_t>(next)].user_id.data())
        << "the records behind the group were moved";
    expect_same(rest.front(), varied_record(next));
  }
  // Pushing behind a taken front (the space is reclaimed on the way) keeps the order.
  for (int i = 100; i < 160; ++i) q.push(varied_record(i));
  std::vector<UsageRecordView> rest;
  q.views(rest);
  ASSERT_EQ(rest.size(), 160u - static_cast<std::size_t>(next));
  for (std::size_t k = 0; k < rest.size(); ++k) {
    SCOPED_TRACE(k);
    expect_same(rest[k], varied_record(next + static_cast<int>(k)));
  }
  EXPECT_EQ(q.front_fitting(1000, 1 << 30), rest.size());
  const std::size_t bytes = q.bytes();
  q.trim(0);
  EXPECT_EQ(q.bytes(), bytes);
  q.move_front(q.size(), taken);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.bytes(), 0u);
  EXPECT_EQ(taken.size(), rest.size());
}

}  // namespace
}  // namespace llmproxy::usage
