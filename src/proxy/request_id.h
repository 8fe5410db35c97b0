// Request ids: "req_" + 16 hex digits of per-generator randomness + 8 hex digits of a counter.
// One generator per worker thread, so ids are unique across threads (different random
// prefixes), across restarts (new prefixes) and cost no lock or syscall per request. When the
// counter wraps (2^32 ids: weeks at thousands per second) the prefix is drawn anew: receivers
// drop records by request_id, so an id must never come again.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace llmproxy::proxy {

class RequestIdGenerator {
 public:
  // `first`: the counter's start (tests start it near the wrap).
  explicit RequestIdGenerator(std::uint32_t first = 0);
  std::string next();

 private:
  void draw_prefix();

  char prefix_[16];
  std::uint32_t counter_ = 0;
};

// A client-sent X-Request-Id is kept when it is 1..128 visible ASCII characters; anything else
// (empty, huge, control characters) is replaced by a generated id.
bool acceptable_client_request_id(std::string_view id);

}  // namespace llmproxy::proxy
