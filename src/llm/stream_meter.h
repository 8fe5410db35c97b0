// Follows one event stream on its way to the client: picks up token usage wherever the backend
// puts it and, when the gateway itself asked the backend for usage (stream_options.include_usage
// added upstream), removes from the client's stream only the usage-only chunk that this caused.
//
// Nothing waits: every byte before the stream's tail goes out in the write it arrived in, whole
// events or not. Only in the tail (after a chunk with a finish_reason, where backends put the
// usage chunk) is the unfinished part of a read held until its blank line arrives (it may be the
// usage chunk, which can only be removed whole), and at most kMaxHeld of it: past that it is
// sent on and that event is never removed (a usage-only chunk is a few hundred bytes). When a
// read is sent unchanged, the read's own bytes are sent (no copy).
#pragma once

#include <simdjson.h>

#include <string>
#include <string_view>

#include "llm/sse_scanner.h"
#include "llm/usage.h"

namespace llmproxy::llm {

class StreamMeter {
 public:
  static constexpr std::size_t kMaxHeld = 16 * 1024;

  // `remove_injected_usage`: the client did not ask for usage, the gateway did.
  StreamMeter(simdjson::dom::parser* parser, bool remove_injected_usage)
      : tracker_(parser), filter_(remove_injected_usage) {}

  // Feeds bytes read from the backend; returns the bytes to send to the client now (a view of
  // `in` or of an internal buffer, valid until the next call).
  std::string_view relay(std::string_view in);
  // The backend's message ended: whatever is still held goes to the client, and an event left
  // without its blank line is read for usage (not sent again).
  std::string_view finish();

  const StreamUsageTracker& tracker() const { return tracker_; }
  void want_model() { tracker_.want_model(); }
  std::uint64_t removed_events() const { return removed_; }

 private:
  SseScanner scanner_;
  StreamUsageTracker tracker_;
  bool filter_;
  bool skip_lf_ = false;  // the next read's leading \n ends an event that was removed
  bool flushed_ = false;
  bool saw_finish_ = false;  // the stream's tail: the unfinished part of a read may be held  //
                             // part of the current block already went out: it cannot be removed
  std::string held_;         // the unfinished block's bytes from earlier reads
  std::string out_;
  std::string tail_;
  std::uint64_t removed_ = 0;
};

}  // namespace llmproxy::llm
