// Incremental Server-Sent Events scanner, for reading a stream as it passes through the proxy
// (usage metering, per-event metrics) without delaying or altering it.
//
// Bytes are fed exactly as they were read from the socket: an event may be split across any
// number of feeds and one feed may hold many events. Lines end in \n, \r\n or \r (also when the
// \r and the \n arrive in different feeds). `data:` takes one optional space; several data lines
// of one event are joined with \n; comments (":") are skipped; `event:` and `id:` are kept; a
// leading UTF-8 byte order mark is skipped.
// One field outside the spec is read: llama.cpp's server writes a failure inside a stream as
// `error: {json}`, a field the spec says to ignore (and clients do). A block with an `error:`
// line is an event named "error"; its data is its data lines, or else the `error:` value.
// Memory is bounded: a line or an event's data longer than `max_event_bytes` is truncated (the
// event is still delivered, flagged) instead of growing without limit on an endless line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace llmproxy::llm {

struct SseEvent {
  std::string_view event;  // value of the last `event:` line, empty when none
  std::string_view data;   // data lines joined by \n
  std::string_view id;     // value of the last `id:` line
  bool truncated = false;  // some line or the data exceeded max_event_bytes
  // Where the event's bytes are in the current feed: [begin, end), end just past the blank
  // line that dispatched it. `continued`: it began in an earlier feed (begin is then 0).
  // Blocks without data (comments, stray blank lines) are not events, but end at boundaries.
  std::size_t begin = 0;
  std::size_t end = 0;
  bool continued = false;
};

class SseScanner {
 public:
  explicit SseScanner(std::size_t max_event_bytes = 256 * 1024) : max_(max_event_bytes) {}

  // Scans `bytes`; calls on_event(const SseEvent&) for every event completed by them. The views
  // in the event are valid only during the call.
  template <class OnEvent>
  void feed(std::string_view bytes, OnEvent&& on_event);

  std::uint64_t events() const { return events_; }
  std::uint64_t truncated_events() const { return truncated_events_; }
  // Offset just past the last blank line of the latest feed (npos when it had none): the
  // bytes before it are complete blocks, the bytes after it start an unfinished one.
  std::size_t last_boundary() const { return last_boundary_; }
  // Bytes held for an unfinished line or event (what a cut-off stream left behind).
  std::size_t pending_bytes() const { return line_.size() + data_.size(); }
  // Memory the scanner keeps for lines and data between feeds.
  std::size_t room() const { return line_.capacity() + data_.capacity(); }

 private:
  // Handles one complete line (without its terminator); returns true when it ended an event.
  bool line(std::string_view text);
  void append_line_bytes(std::string_view part);

  static constexpr unsigned char kBom[3] = {0xEF, 0xBB, 0xBF};

  std::size_t max_;
  std::uint8_t bom_ = 0;  // bytes of a leading byte order mark passed; 3 once past the start
  std::string line_;      // an unfinished line carried over from the previous feed
  bool line_truncated_ = false;
  bool skip_lf_ = false;             // the previous feed ended in \r: a leading \n belongs to it
  bool skip_lf_ends_block_ = false;  // ... and that \r ended a blank line
  std::string data_, event_, id_;
  bool has_data_ = false;
  bool error_field_ = false;  // the block has an `error:` line (llama.cpp)
  bool event_truncated_ = false;
  bool block_continued_ = false;  // the current block began in an earlier feed
  std::size_t block_start_ = 0;   // where the current block began in this feed
  std::size_t last_boundary_ = std::string_view::npos;
  bool blank_ = false;  // set by line() when the line was blank (a block boundary)
  std::uint64_t events_ = 0;
  std::uint64_t truncated_events_ = 0;
};

// Room a stream's buffer keeps between events: streams whose events are all large (logprobs,
// long tool-call arguments) do not allocate per event.
inline constexpr std::size_t kKeptRoom = 64 * 1024;

// Empties `s`, and gives its memory back when one large event grew it past kKeptRoom: a stream
// keeps what its usual events need, not the most its largest one took, for the rest of its life.
inline void clear_releasing(std::string& s) {
  if (s.capacity() > kKeptRoom) {
    std::string().swap(s);
  } else {
    s.clear();
  }
}

// The first \r or \n at or after `pos`, or npos: two memchr calls per line (find_first_of
// would call memchr on its two-byte set once per byte of the line).
inline std::size_t line_end(std::string_view bytes, std::size_t pos) {
  const char* const p = bytes.data() + pos;
  const std::size_t n = bytes.size() - pos;
  const void* lf = std::memchr(p, '\n', n);
  const std::size_t before_lf = lf ? static_cast<std::size_t>(static_cast<const char*>(lf) - p) : n;
  if (const void* cr = std::memchr(p, '\r', before_lf)) {
    return pos + static_cast<std::size_t>(static_cast<const char*>(cr) - p);
  }
  return lf ? pos + before_lf : std::string_view::npos;
}

template <class OnEvent>
void SseScanner::feed(std::string_view bytes, OnEvent&& on_event) {
  std::size_t pos = 0;
  last_boundary_ = std::string_view::npos;
  block_start_ = 0;
  block_continued_ = true;
  // A UTF-8 byte order mark opening the stream is not part of its first field name (the spec
  // strips one); it may arrive a byte at a time.
  while (bom_ < 3 && pos < bytes.size()) {
    if (static_cast<unsigned char>(bytes[pos]) != kBom[bom_]) {
      bom_ = 3;
      break;
    }
    ++bom_;
    ++pos;
  }
  if (skip_lf_ && !bytes.empty()) {
    skip_lf_ = false;
    if (bytes.front() == '\n') {
      pos = 1;
      if (skip_lf_ends_block_) {  // the \n completes a blank line: the next block starts after it
        block_start_ = 1;
        block_continued_ = false;
        last_boundary_ = 1;
      }
    }
  }
  while (pos < bytes.size()) {
    std::size_t end = line_end(bytes, pos);
    if (end == std::string_view::npos) {
      append_line_bytes(bytes.substr(pos));
      return;
    }
    bool ended;
    if (line_.empty() && !line_truncated_) {
      ended = line(bytes.substr(pos, end - pos));  // common case: the whole line is in this feed
    } else {
      append_line_bytes(bytes.substr(pos, end - pos));
      ended = line(line_);
      clear_releasing(line_);
    }
    if (bytes[end] == '\r') {
      if (end + 1 < bytes.size()) {
        if (bytes[end + 1] == '\n') ++end;
      } else {
        skip_lf_ = true;
        skip_lf_ends_block_ = blank_;
      }
    }
    pos = end + 1;
    if (ended) {
      SseEvent e{
          event_, data_,           id_, event_truncated_, block_continued_ ? 0 : block_start_,
          pos,    block_continued_};
      ++events_;
      if (event_truncated_) ++truncated_events_;
      on_event(static_cast<const SseEvent&>(e));
      clear_releasing(data_);
      event_.clear();
      has_data_ = false;
      error_field_ = false;
      event_truncated_ = false;
    }
    if (blank_) {
      blank_ = false;
      last_boundary_ = pos;
      block_start_ = pos;
      block_continued_ = false;
    }
  }
}

}  // namespace llmproxy::llm
