#include "llm/stream_meter.h"

namespace llmproxy::llm {

std::string_view StreamMeter::relay(std::string_view in) {
  if (!filter_) {
    scanner_.feed(in, [this](const SseEvent& e) { tracker_.on_event(e.data, e.event); });
    return in;
  }
  clear_releasing(out_);   // the view of it returned last time is no longer used
  bool copied = false;     // out_ is in use (something was removed)
  std::size_t cursor = 0;  // bytes of `in` before it are decided
  if (skip_lf_ && !in.empty()) {
    // A removed event ended in \r at the end of the previous read: its \n is removed too.
    skip_lf_ = false;
    if (in.front() == '\n') {
      cursor = 1;
      copied = true;
    }
  }
  const bool held_before = !held_.empty();
  scanner_.feed(in, [&](const SseEvent& e) {
    const bool usage_only = tracker_.on_event(e.data, e.event);
    const bool removable = usage_only && !(e.continued && flushed_);
    if (e.continued) flushed_ = false;
    // A choice finished (`"finish_reason":"stop"`, not `null`): the stream is in its tail,
    // where only the usage chunk and [DONE] are still to come.
    if (!saw_finish_ && !usage_only && tracker_.last_event_finished()) saw_finish_ = true;
    if (!removable) return;
    ++removed_;
    copied = true;
    if (!e.continued) {
      out_.append(held_);
      out_.append(in.substr(cursor, e.begin - cursor));
    }
    held_.clear();
    cursor = e.end;
    skip_lf_ = e.end == in.size() && in.back() == '\r';
  });
  const std::size_t boundary = scanner_.last_boundary();
  if (boundary != std::string_view::npos) flushed_ = false;  // a new block began
  // Only in the stream's tail is an unfinished event held back (it may be the usage chunk);
  // before that every byte goes out as it arrives, and that event can no longer be removed.
  const bool hold_tail = saw_finish_ && !flushed_;
  const std::size_t complete_end =
      boundary == std::string_view::npos ? cursor : std::max(cursor, boundary);
  if (!copied && !held_before && (complete_end == in.size() || !hold_tail)) {
    if (complete_end < in.size()) flushed_ = true;
    return in;  // the read's own bytes: nothing removed, nothing held
  }
  if (complete_end > cursor) {
    out_.append(held_);
    held_.clear();
    out_.append(in.substr(cursor, complete_end - cursor));
    cursor = complete_end;
  }
  if (hold_tail) {
    held_.append(in.substr(cursor));
    if (held_.size() > kMaxHeld) {
      out_.append(held_);
      held_.clear();
      flushed_ = true;
    }
  } else {
    out_.append(held_);
    held_.clear();
    out_.append(in.substr(cursor));
    if (cursor < in.size()) flushed_ = true;
  }
  return out_;
}

std::string_view StreamMeter::finish() {
  // The message may have ended inside an event (no blank line after its last bytes): clients
  // drop that event, but a usage report in it is still the backend's count of what it generated.
  // It is read as if a blank line had followed; nothing is sent for that. Usage is read only
  // from whole JSON (an event cut in the middle reports none); the text it streamed counts
  // towards an estimate like any other, as the backend generated it.
  scanner_.feed("\n\n", [this](const SseEvent& e) { tracker_.on_event(e.data, e.event); });
  tail_.swap(held_);  // not out_: the caller may still hold a view of it
  held_.clear();
  return tail_;
}

}  // namespace llmproxy::llm
