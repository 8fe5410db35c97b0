// One usage record: what a request that reached a backend consumed, as billed.
//
// The seed's webhook fields keep their names and JSON types (request_id, user_id, api_key, model,
// prompt_tokens, completion_tokens, total_tokens, is_stream, endpoint, timestamp, backend_url);
// the rest are additions. Exactly one record is made per LLM request that was sent to a backend,
// however it ended; requests the gateway refused itself are counted in metrics, not billed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace llmproxy::usage {

struct UsageRecord {
  std::string request_id;         // the gateway's own id, unique: receivers de-duplicate on it
  std::string client_request_id;  // the client's X-Request-Id, when it sent one (may repeat)
  std::string user_id;            // usage.user_header, else the body's `user`
  std::string api_key;            // as usage.api_key says: full, masked or sha256
  std::string model;
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t total_tokens = 0;
  std::int64_t cached_tokens = -1;     // -1: not reported (field left out of the JSON)
  std::int64_t reasoning_tokens = -1;  // -1: not reported
  bool is_stream = false;
  std::string endpoint;           // e.g. /v1/chat/completions
  std::int64_t timestamp_ms = 0;  // request start, Unix milliseconds (JSON: RFC 3339 UTC)
  std::string backend_url;
  std::string backend;       // the backend's name
  unsigned status_code = 0;  // what the client got
  double duration_ms = 0;
  double ttft_ms = -1;                   // streams: first body byte to the client; -1: none
  std::string finish = "completed";      // completed, client_disconnected, upstream_error, timeout
  std::string usage_source = "backend";  // backend or estimated
};

// The webhook's JSON object: the seed's fields first, in the seed's order, then the additions.
std::string to_json(const UsageRecord& r);
void append_json(std::string& out, const UsageRecord& r);

// RFC 3339 UTC with second precision, as in the seed's example: 2026-01-14T10:30:00Z.
std::string rfc3339(std::int64_t unix_ms);

}  // namespace llmproxy::usage
