// One usage record: what a request that reached a backend consumed, as billed.
//
// The seed's webhook fields keep their names and JSON types (request_id, user_id, api_key, model,
// prompt_tokens, completion_tokens, total_tokens, is_stream, endpoint, timestamp, backend_url);
// the rest are additions. Exactly one record is made per LLM request that was sent to a backend,
// however it ended; requests the gateway refused itself are counted in metrics, not billed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace llmproxy::usage {

// The fields, over a string type: std::string (UsageRecord, what the request path fills) or
// std::string_view (UsageRecordView, a record read back from PackedRecords without a copy).
template <class Str>
struct BasicUsageRecord {
  Str request_id;         // the gateway's own id, unique: receivers de-duplicate on it
  Str client_request_id;  // the client's X-Request-Id, when it sent one (may repeat)
  Str user_id;            // usage.user_header, else the body's `user`
  Str api_key;            // as usage.api_key says: full, masked or sha256
  Str model;
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t total_tokens = 0;
  std::int64_t cached_tokens = -1;     // -1: not reported (field left out of the JSON)
  std::int64_t reasoning_tokens = -1;  // -1: not reported
  bool is_stream = false;
  // endpoint, finish and usage_source take their values from fixed sets: in a UsageRecord,
  // views of string literals (static storage), so a record costs no allocation for them.
  std::string_view endpoint;      // e.g. /v1/chat/completions
  std::int64_t timestamp_ms = 0;  // request start, Unix milliseconds (JSON: RFC 3339 UTC)
  Str backend_url;
  Str backend;               // the backend's name
  unsigned status_code = 0;  // what the client got
  double duration_ms = 0;
  double ttft_ms = -1;                    // streams: first body byte to the client; -1: none
  std::string_view finish = "completed";  // completed, client_disconnected, upstream_error, timeout
  std::string_view usage_source = "backend";  // backend or estimated
};

using UsageRecord = BasicUsageRecord<std::string>;
using UsageRecordView = BasicUsageRecord<std::string_view>;

// A view of every field of `r` (valid while `r` is unchanged).
UsageRecordView view_of(const UsageRecord& r);

// The webhook's JSON object: the seed's fields first, in the seed's order, then the additions.
// append_json is defined for UsageRecord and UsageRecordView.
std::string to_json(const UsageRecord& r);
template <class Str>
void append_json(std::string& out, const BasicUsageRecord<Str>& r);

// The form the usage log stores a record in: a JSON array of the values in the order of
// row_fields(), without keys (~40 % of the object's bytes, which the log writes twice: to the WAL
// and at the checkpoint). Values are only ever added at the end, with a new schema version of the
// log (a reader refuses a row with more values than it knows); a reader takes the optional ones a
// row lacks as not reported.
template <class Str>
void append_row(std::string& out, const BasicUsageRecord<Str>& r);

// A row's values, in order: the object's key for each and how the row holds it.
enum class RowValue : std::uint8_t {
  string,          // a JSON string, as in the object
  number,          // a JSON number, as in the object
  string_or_null,  // the same, or null (null in the object too)
  number_or_null,
  flag,             // 0 or 1: false or true in the object
  unix_ms,          // integer milliseconds: an RFC 3339 string in the object
  optional_number,  // a number, or null or left out: then the object has no such key
};
struct RowField {
  std::string_view key;
  RowValue value;
};
std::span<const RowField> row_fields();

// Appends the webhook JSON of a record as the log stores it: a row is expanded into exactly the
// bytes append_json writes for the record, an object (a log written before rows) is copied.
// Returns false, having appended nothing, for anything else (a damaged row).
bool append_stored_json(std::string& out, std::string_view stored);

// RFC 3339 UTC with second precision, as in the seed's example: 2026-01-14T10:30:00Z.
std::string rfc3339(std::int64_t unix_ms);

// Records packed back to back in one byte buffer: how the request path hands records to the log
// writer. push() copies a record's fields into the buffer (one memcpy per string, no allocation
// once the buffer has grown), so the strings the request path allocated are freed by the thread
// that allocated them, and the writer reads the records in place (views). A buffer and its
// capacity are reused: the pipeline swaps two of them between the request path and the writer.
// Records taken from the front are not erased at once (that moved the rest each time, quadratic
// over a backlog taken group by group): the front advances, and the space is reclaimed when the
// buffer empties or a push finds more than half of it taken.
class PackedRecords {
 public:
  void push(const UsageRecordView& r);
  void push(const UsageRecord& r) { push(view_of(r)); }
  std::size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  std::size_t bytes() const noexcept { return data_.size() - front_; }
  void clear() noexcept {
    data_.clear();
    front_ = 0;
    count_ = 0;
  }
  void swap(PackedRecords& o) noexcept {
    data_.swap(o.data_);
    std::swap(front_, o.front_);
    std::swap(count_, o.count_);
  }
  // Frees the buffer when it holds more than `keep` bytes of capacity (after a burst).
  void trim(std::size_t keep);
  // How many records from the front fit in `max_bytes` (at least one when not empty), at most
  // `max_n`.
  std::size_t front_fitting(std::size_t max_n, std::size_t max_bytes) const noexcept;
  // Moves the first n records (n <= size()) to the end of `to`: a copy of those n only.
  void move_front(std::size_t n, PackedRecords& to);
  // Appends a view of every record, in order, to `out` (valid until this buffer changes).
  void views(std::vector<UsageRecordView>& out) const;

 private:
  std::string data_;
  std::size_t front_ = 0;  // data_ before this offset was moved out
  std::size_t count_ = 0;
};

}  // namespace llmproxy::usage
