// The usage log: SQLite tables for records, per-sink cursors and dead letters.
//
// One UsageLog is one SQLite connection plus the prepared statements its owner uses. With
// durability: disk every thread of the pipeline opens its own connection on the same file (WAL:
// the sinks read while the writer commits, nobody waits on a reader); with durability: memory
// there is a single in-memory database, so all threads share one UsageLog. Each public method
// takes the object's mutex, which makes both cases the same code path: uncontended on disk,
// serialising in memory. Only this file and usage_log.cpp know SQL; the pipeline and the ledger
// speak in records, cursors and rows.
//
// Durability (disk): journal_mode=WAL with synchronous=NORMAL. A committed transaction is in the
// WAL file when the commit returns, so it survives kill -9 of the process; the WAL is fsync'ed
// only at checkpoints, so an OS crash or power loss can lose the last commits (never corrupt the
// file). This trades the last few hundred milliseconds on a power cut for commits that cost
// microseconds instead of an fsync each.
//
// Records are stored one row per group commit (see kSchema in usage_log.cpp), numbered by seq.
// The head (the last seq assigned) is the newest row's last seq, or log_head's when deletes took
// that row: a trigger raises log_head on every delete (a commit does not write it: that would be
// a third page per commit). So a seq never repeats, even after deletes: a cursor names
// "everything up to seq N is done" forever. Retention and pruning delete whole commit groups.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "usage/record.h"

struct sqlite3;
struct sqlite3_stmt;

namespace llmproxy::usage {

class SqliteError : public std::runtime_error {
 public:
  SqliteError(int code, const std::string& what) : std::runtime_error(what), code_(code) {}
  int code() const noexcept { return code_; }
  bool busy() const noexcept;     // SQLITE_BUSY or SQLITE_LOCKED: retry later
  bool damaged() const noexcept;  // SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged
 private:
  int code_;
};

// A record as the writer hands it to the log: its times and its row (append_row in record.h; an
// object, as logs before version 4 stored them, is read back as well).
struct PendingRecord {
  std::int64_t timestamp_ms;  // request start
  std::int64_t end_ms;        // timestamp + duration
  std::string_view stored;
};

// Records as a sink reads them back: their JSON back to back with a ',' between two (so a batch's
// POST body is '[' + json + ']', and no record costs an allocation of its own), and per record its
// seq, end and place in `json`.
struct LoggedRecords {
  struct Entry {
    std::int64_t seq = 0;
    std::int64_t end_ms = 0;  // timestamp + duration: the request's end (delivery latency origin)
    std::size_t begin = 0;    // the record's JSON is json[begin, end)
    std::size_t end = 0;
  };
  std::string json;
  std::vector<Entry> entries;

  bool empty() const noexcept { return entries.empty(); }
  std::size_t size() const noexcept { return entries.size(); }
  void clear() noexcept {
    json.clear();
    entries.clear();
  }
  std::string_view json_of(std::size_t i) const {
    return std::string_view(json).substr(entries[i].begin, entries[i].end - entries[i].begin);
  }
  // The gateway's own id: the JSON's first field (no escapes in it).
  std::string_view request_id(std::size_t i) const;
};

struct DeadLetterRow {
  std::int64_t id = 0;
  std::string sink;
  std::int64_t first_seq = 0;
  std::int64_t last_seq = 0;
  std::string request_ids;  // comma-separated
  unsigned status = 0;
  std::string response;  // the first 1 KiB of the receiver's answer
  std::int64_t at_ms = 0;
  std::string body;  // what was POSTed
};

// How long a gateway waits for another process to release its usage log at start.
inline constexpr std::chrono::milliseconds kLogLockWait{60'000};

// An exclusive flock(2) on "<log path>.lock", held while the object lives: one gateway process
// per usage log. Two would each keep their own head and sink cursors in memory and deliver each
// other's records again. The kernel drops the lock when the process dies (kill -9 included).
class LogLock {
 public:
  LogLock() = default;
  // Waits up to `wait` for another process to release it (logging once that it waits), then
  // throws std::runtime_error naming the holder's pid.
  LogLock(const std::string& log_path, std::chrono::milliseconds wait);
  ~LogLock();
  LogLock(LogLock&& other) noexcept;
  LogLock& operator=(LogLock&& other) noexcept;

 private:
  int fd_ = -1;
};

class UsageLog {
 public:
  enum class Mode { disk, memory, read_only };

  // disk: creates parent directories and the file, sets WAL; `create_schema` creates the tables
  // and takes the process's LogLock (the first connection of a process does it, the others only
  // attach). memory: `path` is
  // ignored. read_only: the file must exist; nothing is created. Throws SqliteError or
  // std::runtime_error with the path in the message.
  UsageLog(Mode mode, const std::string& path, bool create_schema = true,
           std::chrono::milliseconds lock_wait = kLogLockWait);
  ~UsageLog();
  UsageLog(const UsageLog&) = delete;
  UsageLog& operator=(const UsageLog&) = delete;

  const std::string& path() const { return path_; }
  // Whether the file at path() is no longer the one this log writes (deleted, or replaced by
  // another file): the log then goes on in a file nothing will open again, and everything not
  // delivered before the process ends is lost. Always false in memory.
  bool file_replaced() const;

  // Inserts every record in one transaction; returns the last seq assigned. On error nothing is
  // committed and SqliteError is thrown (busy() for a lock held by someone else).
  std::int64_t append(std::span<const PendingRecord> records);

  // The highest seq ever assigned (0 for an empty log), deleted records included.
  std::int64_t head();
  // The highest seq a delete has taken (0 before the first): deletes of every kind (retention,
  // pruning, SQL typed by hand) raise it. A seq missing from the log above it was never deleted:
  // the file lost it.
  std::int64_t deleted_through();
  // Throws the error for records from..to absent from the file although no delete took them:
  // SqliteError, damaged().
  [[noreturn]] void missing(std::int64_t from, std::int64_t to) const;

  std::optional<std::int64_t> cursor(const std::string& sink);
  void set_cursor(const std::string& sink, std::int64_t seq, std::int64_t now_ms);
  // Several cursors in one transaction: all are stored or none.
  void set_cursors(std::span<const std::pair<std::string, std::int64_t>> cursors,
                   std::int64_t now_ms);

  // Up to `limit` records with seq > after, in seq order, appended to `out`; no more once
  // out.json holds `max_bytes` (so at least one). Records deleted after `after` are skipped;
  // records missing that no delete took are damage (SqliteError, damaged()), as is a stored
  // record this build cannot read.
  void read_after(std::int64_t after, int limit, LoggedRecords& out,
                  std::size_t max_bytes = std::numeric_limits<std::size_t>::max());

  // Stores the dead letter and moves the sink's cursor to its last_seq in one transaction. In
  // memory only the cursor moves: no row is kept.
  void dead_letter(const DeadLetterRow& row);

  // Deletes, oldest first, commit groups whose records all have seq <= max_seq and (when
  // before_ms is set) ts_ms < *before_ms, as long as fewer than `limit` records were deleted
  // before a group (so at most limit - 1 plus one group's); returns how many were deleted.
  std::int64_t delete_records(std::int64_t max_seq, std::optional<std::int64_t> before_ms,
                              int limit);
  // Deletes dead letters older than `before_ms`.
  std::int64_t delete_dead_letters(std::int64_t before_ms);

  // Rows for tests and the ledger.
  std::int64_t count_records();
  // The oldest seq still in the log (none when it holds no record).
  std::optional<std::int64_t> first_seq();
  // Calls fn(ts_ms, json) for every record with since_ms <= ts_ms < until_ms, in seq order, all
  // read in one snapshot. Records missing right before a batch it reads, which no delete took,
  // are damage (SqliteError, damaged()), as is a stored record this build cannot read.
  // Returns, from the same snapshot, the newest ts_ms among the records deletes took (none when
  // nothing was deleted): a window starting after it lost nothing to them. Where older builds
  // deleted records, their times are not known: the time a writer of this version first opened
  // the file stands in for them (they started before it), INT64_MAX when none has yet.
  // Also the settled time, from the same snapshot (store_settled).
  struct WindowFacts {
    std::optional<std::int64_t> deleted_ts_ms;
    std::optional<std::int64_t> settled_ms;
    // The newest gap (open_settled) that overlaps the window: [from_ms, to_ms).
    std::optional<std::pair<std::int64_t, std::int64_t>> gap;
  };
  WindowFacts for_each_record(std::int64_t since_ms, std::int64_t until_ms,
                              const std::function<void(std::int64_t, std::string_view)>& fn);

  // The gateway's settled time (Unix ms): every request that started before it has its record
  // committed here. The writer stores it as it advances; a report whose window ends later warns.
  // `clean`: stored at a clean stop (every request ended and logged); `beat_ms`: the wall time
  // of the store (a heartbeat, at least every 30 s while the writer runs).
  void store_settled(std::int64_t ms, bool clean, std::int64_t beat_ms);
  // A writer starting: when the last one did not stop cleanly, the requests it had in flight
  // (started at or after its settled time, before it crashed: at most 31 s after its last
  // heartbeat) were lost: the span is kept as a gap. A log with no settled time gets now.
  // Returns the settled time stored.
  std::int64_t open_settled(std::int64_t now_ms);
  std::vector<DeadLetterRow> dead_letters(std::optional<std::int64_t> since_ms = {},
                                          std::optional<std::int64_t> until_ms = {});

  // The raw connection for read-only queries (the ledger); the caller holds lock().
  sqlite3* raw() { return db_; }
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mu_); }

 private:
  struct Statement;
  Statement& stmt(int index, const char* sql);
  void exec(const char* sql);
  [[noreturn]] void fail(int rc, const char* what);
  // A stored record this build cannot read: SqliteError with SQLITE_CORRUPT (damaged()).
  [[noreturn]] void damaged(std::int64_t seq) const;
  // Runs a statement that returns no rows; throws (fail) unless it completed.
  void step_done(sqlite3_stmt* st, const char* what);
  // The cursor upsert, inside the caller's lock (and transaction, when it has one).
  void store_cursor(const std::string& sink, std::int64_t seq, std::int64_t now_ms);
  std::int64_t head_locked();
  std::int64_t deleted_through_locked();
  std::optional<std::int64_t> deleted_times_locked();
  std::optional<std::int64_t> settled_locked();
  void add_settled_columns();
  // A statement run once (not kept with stmt()'s); null when `missing_ok` and it cannot be
  // prepared (a table that a file written by an older build lacks).
  using OneOff = std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)>;
  OneOff prepare_one_off(const char* sql, bool missing_ok = false);
  std::optional<std::pair<std::int64_t, std::int64_t>> gap_locked(std::int64_t since_ms,
                                                                  std::int64_t until_ms);
  void mark_untimed_deletes();
  void insert_batch(std::int64_t first, std::int64_t last, std::int64_t min_ts, std::int64_t max_ts,
                    std::string_view text, std::string_view meta);
  void migrate_v1();
  int user_version();
  void refuse_newer_schema(int version) const;

  struct CachedBatch {
    std::int64_t first_seq = 0;
    std::int64_t last_seq = 0;
    std::string text;
    std::string meta;
  };

  LogLock lock_;  // disk, first connection of the process only
  std::mutex mu_;
  sqlite3* db_ = nullptr;
  std::string path_;
  bool memory_ = false;  // Mode::memory
  // The file's identity when it was opened (st_dev, st_ino), for file_replaced().
  std::uint64_t file_dev_ = 0, file_ino_ = 0;
  std::vector<std::unique_ptr<Statement>> statements_;
  std::string batch_text_;  // append's buffers, kept between commits
  std::string batch_meta_;
  CachedBatch cached_;  // read_after's last batch
};

}  // namespace llmproxy::usage
