// The usage record's JSON: the seed's webhook fields byte for byte (names, order, types), then
// the additions; escaping checked by parsing the output back with simdjson, a real JSON parser.
#include <gtest/gtest.h>
#include <simdjson.h>

#include <ctime>
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

}  // namespace
}  // namespace llmproxy::usage
