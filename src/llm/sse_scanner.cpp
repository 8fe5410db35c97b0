#include "llm/sse_scanner.h"

namespace llmproxy::llm {

void SseScanner::append_line_bytes(std::string_view part) {
  std::size_t room = max_ > line_.size() ? max_ - line_.size() : 0;
  if (part.size() > room) {
    line_truncated_ = true;
    part = part.substr(0, room);
  }
  line_.append(part);
}

bool SseScanner::line(std::string_view text) {
  if (line_truncated_) {
    event_truncated_ = true;
    line_truncated_ = false;
  }
  if (text.empty()) {
    blank_ = true;
    // A blank line dispatches the event; one without data lines is no event (spec 9.2.6), unless
    // it had an `error:` line (then that line's value is its data).
    if (error_field_) event_.assign("error");
    if (!has_data_ && !error_field_) {
      event_.clear();
      return false;
    }
    return true;
  }
  if (text.front() == ':') return false;  // comment, e.g. a keep-alive ": ping"
  std::string_view field = text, value;
  if (auto colon = text.find(':'); colon != std::string_view::npos) {
    field = text.substr(0, colon);
    value = text.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  }
  if (field == "data") {
    if (!has_data_) data_.clear();  // it may hold an `error:` value, which data lines replace
    std::size_t need = value.size() + (has_data_ ? 1 : 0);
    if (data_.size() + need > max_) {
      event_truncated_ = true;
      std::size_t room = max_ > data_.size() ? max_ - data_.size() : 0;
      if (has_data_ && room > 0) {
        data_ += '\n';
        --room;
      }
      data_.append(value.substr(0, std::min(room, value.size())));
    } else {
      if (has_data_) data_ += '\n';
      data_.append(value);
    }
    has_data_ = true;
  } else if (field == "event") {
    event_.assign(value);
  } else if (field == "id") {
    id_.assign(value);
  } else if (field == "error") {
    // llama.cpp's in-stream failure. Kept as data only while the block has none of its own (the
    // line, like any, is at most max_ bytes).
    if (!has_data_ && !error_field_) data_.assign(value);
    error_field_ = true;
  }
  return false;
}

}  // namespace llmproxy::llm
