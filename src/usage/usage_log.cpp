// The usage log's SQL. Plain SQLite C API, prepared statements cached per connection (a record
// insert is bind + step + reset, no parsing), and explicit BEGIN IMMEDIATE transactions so a
// writer takes the file's write lock before doing work it would have to throw away. See
// usage_log.h for the threading and durability model.
#include "usage/usage_log.h"

#include <sqlite3.h>

#include <filesystem>
#include <system_error>

namespace llmproxy::usage {

namespace {

constexpr int kSchemaVersion = 1;
// A lock held by another process (an operator's sqlite3 shell, a backup) is waited for this long
// before an operation reports busy; the pipeline then retries from its own loop, where stop()
// can interrupt it.
constexpr int kBusyTimeoutMs = 1000;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS records (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  ts_ms INTEGER NOT NULL,
  end_ms INTEGER NOT NULL,
  request_id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  api_key TEXT NOT NULL,
  model TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  backend TEXT NOT NULL,
  is_stream INTEGER NOT NULL,
  status INTEGER NOT NULL,
  finish TEXT NOT NULL,
  usage_source TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  total_tokens INTEGER NOT NULL,
  cached_tokens INTEGER,
  reasoning_tokens INTEGER,
  json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts_ms);
CREATE TABLE IF NOT EXISTS sink_cursors (
  name TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY,
  sink TEXT NOT NULL,
  first_seq INTEGER NOT NULL,
  last_seq INTEGER NOT NULL,
  request_ids TEXT NOT NULL,
  status INTEGER NOT NULL,
  response TEXT NOT NULL,
  at_ms INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters(at_ms);
)sql";

enum StatementIndex {
  kInsert,
  kHead,
  kCursorGet,
  kCursorSet,
  kReadAfter,
  kDeadLetterInsert,
  kDeleteRecords,
  kDeleteRecordsBefore,
  kDeleteDeadLetters,
  kCount,
  kStatementCount
};

std::string column_text(sqlite3_stmt* s, int i) {
  auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s, i));
  return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s, i))) : std::string();
}

}  // namespace

bool SqliteError::busy() const noexcept {
  int primary = code_ & 0xff;
  return primary == SQLITE_BUSY || primary == SQLITE_LOCKED;
}

// A cached prepared statement (finalized with the connection).
struct UsageLog::Statement {
  sqlite3_stmt* s = nullptr;
  ~Statement() { sqlite3_finalize(s); }
};

namespace {
// Resets a statement when the scope ends, so that a read does not hold a snapshot open.
struct Use {
  sqlite3_stmt* s;
  explicit Use(sqlite3_stmt* st) : s(st) {}
  ~Use() {
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
  }
  void text(int i, std::string_view v) {
    sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
  }
  void i64(int i, std::int64_t v) { sqlite3_bind_int64(s, i, v); }
  void opt_i64(int i, std::int64_t v) {
    if (v >= 0) {
      sqlite3_bind_int64(s, i, v);
    } else {
      sqlite3_bind_null(s, i);
    }
  }
};

// BEGIN IMMEDIATE ... COMMIT, rolled back when the scope ends without commit().
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) {
    begin_rc_ = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
    if (begin_rc_ != SQLITE_OK) done_ = true;  // nothing to roll back
  }
  ~Transaction() {
    if (!done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  int begin_rc() const { return begin_rc_; }
  int commit() {
    int rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr);
    if (rc == SQLITE_OK) done_ = true;
    return rc;
  }

 private:
  sqlite3* db_;
  int begin_rc_;
  bool done_ = false;
};
}  // namespace

UsageLog::UsageLog(Mode mode, const std::string& path, bool create_schema) {
  int flags = SQLITE_OPEN_NOMUTEX;  // one thread at a time, by mu_
  std::string name = path;
  if (mode == Mode::memory) {
    name = ":memory:";
    path_ = ":memory:";
    flags |= SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
  } else {
    path_ = path;
    if (path.empty()) throw std::runtime_error("usage log: empty path");
    std::error_code ec;
    if (mode == Mode::read_only) {
      if (!std::filesystem::exists(path, ec)) {
        throw std::runtime_error("usage log " + path + ": no such file");
      }
      flags |= SQLITE_OPEN_READONLY;
    } else {
      auto parent = std::filesystem::path(path).parent_path();
      if (!parent.empty()) {
        std::filesystem::create_directories(parent, ec);
        if (ec) {
          throw std::runtime_error("usage log " + path + ": cannot create directory " +
                                   parent.string() + ": " + ec.message());
        }
      }
      flags |= SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
    }
  }
  int rc = sqlite3_open_v2(name.c_str(), &db_, flags, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
    sqlite3_close_v2(db_);
    db_ = nullptr;
    throw SqliteError(rc, "usage log " + path_ + ": cannot open: " + msg);
  }
  try {
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, mode == Mode::read_only ? 5 * kBusyTimeoutMs : kBusyTimeoutMs);
    if (mode == Mode::disk) {
      // journal_mode=WAL is persistent in the file; asking again is cheap and checks it.
      sqlite3_stmt* s = nullptr;
      rc = sqlite3_prepare_v2(db_, "PRAGMA journal_mode=WAL", -1, &s, nullptr);
      if (rc != SQLITE_OK) fail(rc, "set WAL mode");
      rc = sqlite3_step(s);
      std::string jm = rc == SQLITE_ROW ? column_text(s, 0) : "";
      sqlite3_finalize(s);
      if (rc != SQLITE_ROW) fail(rc, "set WAL mode");
      if (jm != "wal") {
        throw std::runtime_error("usage log " + path_ + ": cannot use WAL mode (got " + jm + ")");
      }
      exec("PRAGMA synchronous=NORMAL");
    }
    if (mode != Mode::read_only && create_schema) {
      sqlite3_stmt* s = nullptr;
      rc = sqlite3_prepare_v2(db_, "PRAGMA user_version", -1, &s, nullptr);
      if (rc != SQLITE_OK) fail(rc, "read schema version");
      int version = sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int(s, 0) : 0;
      sqlite3_finalize(s);
      if (version > kSchemaVersion) {
        throw std::runtime_error("usage log " + path_ + ": schema version " +
                                 std::to_string(version) + " is newer than this build's (" +
                                 std::to_string(kSchemaVersion) + ")");
      }
      exec("BEGIN IMMEDIATE");
      try {
        exec(kSchema);
        exec(("PRAGMA user_version=" + std::to_string(kSchemaVersion)).c_str());
        exec("COMMIT");
      } catch (...) {
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        throw;
      }
    }
    statements_.resize(kStatementCount);
  } catch (...) {
    statements_.clear();
    sqlite3_close_v2(db_);
    db_ = nullptr;
    throw;
  }
}

UsageLog::~UsageLog() {
  statements_.clear();
  if (db_) sqlite3_close_v2(db_);
}

void UsageLog::step_done(sqlite3_stmt* st, const char* what) {
  int rc = sqlite3_step(st);
  if (rc != SQLITE_DONE) fail(rc, what);
}

void UsageLog::fail(int rc, const char* what) {
  throw SqliteError(rc, "usage log " + path_ + ": " + what + ": " + sqlite3_errmsg(db_));
}

void UsageLog::exec(const char* sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    throw SqliteError(rc, "usage log " + path_ + ": " + msg);
  }
}

UsageLog::Statement& UsageLog::stmt(int index, const char* sql) {
  auto& slot = statements_[static_cast<std::size_t>(index)];
  if (!slot) {
    auto st = std::make_unique<Statement>();
    int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &st->s, nullptr);
    if (rc != SQLITE_OK) fail(rc, "prepare");
    slot = std::move(st);
  }
  return *slot;
}

std::int64_t UsageLog::append(std::span<const PendingRecord> records) {
  std::lock_guard lk(mu_);
  Transaction tx(db_);
  if (tx.begin_rc() != SQLITE_OK) fail(tx.begin_rc(), "begin transaction");
  auto& st = stmt(kInsert,
                  "INSERT INTO records(ts_ms, end_ms, request_id, user_id, api_key, model, "
                  "endpoint, backend, is_stream, status, finish, usage_source, prompt_tokens, "
                  "completion_tokens, total_tokens, cached_tokens, reasoning_tokens, json) "
                  "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
  for (const auto& p : records) {
    const UsageRecord& r = *p.record;
    Use u(st.s);
    u.i64(1, r.timestamp_ms);
    u.i64(2, r.timestamp_ms + static_cast<std::int64_t>(r.duration_ms > 0 ? r.duration_ms : 0));
    u.text(3, r.request_id);
    u.text(4, r.user_id);
    u.text(5, r.api_key);
    u.text(6, r.model);
    u.text(7, r.endpoint);
    u.text(8, r.backend);
    u.i64(9, r.is_stream ? 1 : 0);
    u.i64(10, r.status_code);
    u.text(11, r.finish);
    u.text(12, r.usage_source);
    u.i64(13, r.prompt_tokens);
    u.i64(14, r.completion_tokens);
    u.i64(15, r.total_tokens);
    u.opt_i64(16, r.cached_tokens);
    u.opt_i64(17, r.reasoning_tokens);
    u.text(18, p.json);
    step_done(st.s, "insert record");
  }
  std::int64_t last = sqlite3_last_insert_rowid(db_);
  int rc = tx.commit();
  if (rc != SQLITE_OK) fail(rc, "commit");
  return last;
}

std::int64_t UsageLog::head() {
  std::lock_guard lk(mu_);
  auto& st = stmt(kHead, "SELECT seq FROM sqlite_sequence WHERE name='records'");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc == SQLITE_ROW) return sqlite3_column_int64(st.s, 0);
  if (rc == SQLITE_DONE) return 0;
  fail(rc, "read head");
}

std::optional<std::int64_t> UsageLog::cursor(const std::string& sink) {
  std::lock_guard lk(mu_);
  auto& st = stmt(kCursorGet, "SELECT seq FROM sink_cursors WHERE name=?");
  Use u(st.s);
  u.text(1, sink);
  int rc = sqlite3_step(st.s);
  if (rc == SQLITE_ROW) return sqlite3_column_int64(st.s, 0);
  if (rc == SQLITE_DONE) return std::nullopt;
  fail(rc, "read cursor");
}

void UsageLog::set_cursor(const std::string& sink, std::int64_t seq, std::int64_t now_ms) {
  std::lock_guard lk(mu_);
  store_cursor(sink, seq, now_ms);
}

void UsageLog::store_cursor(const std::string& sink, std::int64_t seq, std::int64_t now_ms) {
  auto& st =
      stmt(kCursorSet,
           "INSERT INTO sink_cursors(name, seq, updated_ms) VALUES(?,?,?) "
           "ON CONFLICT(name) DO UPDATE SET seq=excluded.seq, updated_ms=excluded.updated_ms");
  Use u(st.s);
  u.text(1, sink);
  u.i64(2, seq);
  u.i64(3, now_ms);
  step_done(st.s, "store cursor");
}

void UsageLog::read_after(std::int64_t after, int limit, std::vector<LoggedRecord>& out) {
  std::lock_guard lk(mu_);
  auto& st = stmt(kReadAfter,
                  "SELECT seq, request_id, end_ms, json FROM records WHERE seq > ? "
                  "ORDER BY seq LIMIT ?");
  Use u(st.s);
  u.i64(1, after);
  u.i64(2, limit);
  int rc;
  while ((rc = sqlite3_step(st.s)) == SQLITE_ROW) {
    LoggedRecord r;
    r.seq = sqlite3_column_int64(st.s, 0);
    r.request_id = column_text(st.s, 1);
    r.end_ms = sqlite3_column_int64(st.s, 2);
    r.json = column_text(st.s, 3);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) fail(rc, "read records");
}

void UsageLog::dead_letter(const DeadLetterRow& row) {
  std::lock_guard lk(mu_);
  Transaction tx(db_);
  if (tx.begin_rc() != SQLITE_OK) fail(tx.begin_rc(), "begin transaction");
  {
    auto& st = stmt(kDeadLetterInsert,
                    "INSERT INTO dead_letters(sink, first_seq, last_seq, request_ids, status, "
                    "response, at_ms, body) VALUES(?,?,?,?,?,?,?,?)");
    Use u(st.s);
    u.text(1, row.sink);
    u.i64(2, row.first_seq);
    u.i64(3, row.last_seq);
    u.text(4, row.request_ids);
    u.i64(5, row.status);
    u.text(6, row.response);
    u.i64(7, row.at_ms);
    u.text(8, row.body);
    step_done(st.s, "insert dead letter");
  }
  store_cursor(row.sink, row.last_seq, row.at_ms);
  int rc = tx.commit();
  if (rc != SQLITE_OK) fail(rc, "commit");
}

std::int64_t UsageLog::delete_records(std::int64_t max_seq, std::optional<std::int64_t> before_ms,
                                      int limit) {
  std::lock_guard lk(mu_);
  // seq is the rowid: the range scan is on the primary key; the time condition uses records_ts
  // when it is the narrower one.
  auto& st = before_ms
                 ? stmt(kDeleteRecordsBefore,
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE seq <= ? "
                        "AND ts_ms < ? LIMIT ?)")
                 : stmt(kDeleteRecords,
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE seq <= ? "
                        "ORDER BY seq LIMIT ?)");
  Use u(st.s);
  u.i64(1, max_seq);
  if (before_ms) {
    u.i64(2, *before_ms);
    u.i64(3, limit);
  } else {
    u.i64(2, limit);
  }
  step_done(st.s, "delete records");
  return sqlite3_changes64(db_);
}

std::int64_t UsageLog::delete_dead_letters(std::int64_t before_ms) {
  std::lock_guard lk(mu_);
  auto& st = stmt(kDeleteDeadLetters, "DELETE FROM dead_letters WHERE at_ms < ?");
  Use u(st.s);
  u.i64(1, before_ms);
  step_done(st.s, "delete dead letters");
  return sqlite3_changes64(db_);
}

std::int64_t UsageLog::count_records() {
  std::lock_guard lk(mu_);
  auto& st = stmt(kCount, "SELECT count(*) FROM records");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc != SQLITE_ROW) fail(rc, "count records");
  return sqlite3_column_int64(st.s, 0);
}

std::vector<DeadLetterRow> UsageLog::dead_letters(std::optional<std::int64_t> since_ms,
                                                  std::optional<std::int64_t> until_ms) {
  std::lock_guard lk(mu_);
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v2(db_,
                              "SELECT id, sink, first_seq, last_seq, request_ids, status, "
                              "response, at_ms, body FROM dead_letters WHERE at_ms >= ? AND "
                              "at_ms < ? ORDER BY id",
                              -1, &s, nullptr);
  if (rc != SQLITE_OK) fail(rc, "prepare");
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> guard(s, sqlite3_finalize);
  sqlite3_bind_int64(s, 1, since_ms.value_or(INT64_MIN));
  sqlite3_bind_int64(s, 2, until_ms.value_or(INT64_MAX));
  std::vector<DeadLetterRow> out;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    DeadLetterRow r;
    r.id = sqlite3_column_int64(s, 0);
    r.sink = column_text(s, 1);
    r.first_seq = sqlite3_column_int64(s, 2);
    r.last_seq = sqlite3_column_int64(s, 3);
    r.request_ids = column_text(s, 4);
    r.status = static_cast<unsigned>(sqlite3_column_int(s, 5));
    r.response = column_text(s, 6);
    r.at_ms = sqlite3_column_int64(s, 7);
    r.body = column_text(s, 8);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) fail(rc, "read dead letters");
  return out;
}

}  // namespace llmproxy::usage
