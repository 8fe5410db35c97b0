// The usage log's SQL. Plain SQLite C API, prepared statements cached per connection (a record
// insert is bind + step + reset, no parsing), and explicit BEGIN IMMEDIATE transactions so a
// writer takes the file's write lock before doing work it would have to throw away. See
// usage_log.h for the threading and durability model.
#include "usage/usage_log.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <thread>
#include <utility>

#include "log/log.h"

namespace llmproxy::usage {

namespace {

// 1: one row per record (columns + json). 2: one row per group commit (record_batches), which
// costs the writer a fraction per record; a version-1 file is converted on open. 3: commits no
// longer store the head in log_head (a trigger raises it on delete); a version-2 build would take
// log_head alone for the head and give seqs out again, so the version tells it to refuse the
// file. A version-2 file needs no conversion: its log_head is the head, and the schema adds the
// trigger. 4: records are stored as rows (append_row in record.h) instead of objects; batches of
// objects stay as they are (readers take both), and a version-3 build, which would send a row to
// a webhook as it is, refuses the file.
constexpr int kSchemaVersion = 4;
// A lock held by another process (an operator's sqlite3 shell, a backup) is waited for this long
// before an operation reports busy; the pipeline then retries from its own loop, where stop()
// can interrupt it.
constexpr int kBusyTimeoutMs = 1000;

// Records are stored one row per group commit: the writer's cost per record is then a memcpy
// into the batch, not a B-tree insert with eighteen bound columns. `records` holds the batch's
// records as a JSON array whose elements are the records' rows (record.h: values without keys;
// logs written before version 4 hold the objects a sink POSTs); `meta` has, per record, 20 bytes
// little-endian: the end offset of its element in `records` (u32), its ts_ms (i64, request start)
// and end_ms (i64). The view `records` (records_view_sql()) shows one record per row, as the
// object a sink POSTs, for ad-hoc SQL.
constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS record_batches (
  first_seq INTEGER PRIMARY KEY,
  last_seq INTEGER NOT NULL,
  min_ts_ms INTEGER NOT NULL,
  max_ts_ms INTEGER NOT NULL,
  records TEXT NOT NULL,
  meta BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS record_batches_ts ON record_batches(max_ts_ms);
CREATE TABLE IF NOT EXISTS log_head (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  seq INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS record_batches_keep_head AFTER DELETE ON record_batches BEGIN
  INSERT INTO log_head(id, seq) VALUES(1, old.last_seq)
    ON CONFLICT(id) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > log_head.seq;
END;
-- The newest request start (ts_ms) among deleted records, raised by every delete like log_head:
-- the ledger tells from it whether a window reaches back to what deletes took.
CREATE TABLE IF NOT EXISTS deleted_times (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  max_ts_ms INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS record_batches_keep_deleted_time AFTER DELETE ON record_batches BEGIN
  INSERT INTO deleted_times(id, max_ts_ms) VALUES(1, old.max_ts_ms)
    ON CONFLICT(id) DO UPDATE SET max_ts_ms = excluded.max_ts_ms
    WHERE excluded.max_ts_ms > deleted_times.max_ts_ms;
END;
-- The gateway's settled time: every request that started before it has its record in this
-- log (the ledger warns of a window that ends later: its requests may still be running).
CREATE TABLE IF NOT EXISTS settled (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  ms INTEGER NOT NULL,
  clean INTEGER NOT NULL DEFAULT 0,  -- 1: stored at a clean stop
  beat_ms INTEGER NOT NULL DEFAULT 0  -- the wall time of the store: at least every 30 s
);
-- A writer that started after one that did not stop cleanly: requests in flight then, which
-- started in [from_ms, to_ms), were lost with the process (the ledger warns of a window over it).
CREATE TABLE IF NOT EXISTS unsettled_gaps (
  from_ms INTEGER NOT NULL,
  to_ms INTEGER NOT NULL
);
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

// The view `records`: one row per record, `seq` and `json`, the object a sink POSTs (the same keys,
// order and values; SQLite writes non-ASCII characters and reals its own way), built from
// row_fields(). Made again at every start, with plain json_extract rather than the -> operator,
// so that an older sqlite3 shell can still read the file.
std::string records_view_sql() {
  std::string fields, optional;  // json_patch's second object: a null there leaves the key out
  const auto row = row_fields();
  for (std::size_t i = 0; i < row.size(); ++i) {
    std::string value = "json_extract(r.value, '$[" + std::to_string(i) + "]')";
    if (row[i].value == RowValue::flag) {
      value = "json(CASE WHEN " + value + " THEN 'true' ELSE 'false' END)";
    } else if (row[i].value == RowValue::unix_ms) {
      value = "strftime('%Y-%m-%dT%H:%M:%SZ', " + value + " / 1000.0, 'unixepoch')";
    }
    std::string& into = row[i].value == RowValue::optional_number ? optional : fields;
    if (!into.empty()) into += ", ";
    into += "'" + std::string(row[i].key) + "', " + value;
  }
  return "DROP VIEW IF EXISTS records;\n"
         "CREATE VIEW records AS SELECT b.first_seq + r.key AS seq, CASE WHEN r.type = 'object' "
         "THEN r.value ELSE json_patch(json_object(" +
         fields + "), json_object(" + optional +
         ")) END AS json FROM record_batches AS b, json_each(b.records) AS r;\n";
}

// The tables, the trigger and the view.
const std::string& schema_sql() {
  static const std::string sql = kSchema + records_view_sql();
  return sql;
}

constexpr std::size_t kMetaBytes = 20;

// Little-endian into p[0, bytes).
void put_le(char* p, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

std::uint64_t get_le(const unsigned char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

// One record's entry in a batch's `meta` (layout in kSchema's comment).
void put_meta(std::string& meta, std::size_t end_offset, std::int64_t ts_ms, std::int64_t end_ms) {
  char entry[kMetaBytes];  // one append per record, not one per byte
  put_le(entry, end_offset, 4);
  put_le(entry + 4, static_cast<std::uint64_t>(ts_ms), 8);
  put_le(entry + 12, static_cast<std::uint64_t>(end_ms), 8);
  meta.append(entry, kMetaBytes);
}

// Calls fn(index, json, ts_ms, end_ms) for each record of a batch of `count`, in order, until fn
// returns false. Returns the index of the first record whose place in the batch is not as
// append() wrote it (a damaged file: an entry of `meta` pointing elsewhere, no ',' between two
// records, fewer or more entries than records), or npos when every record it came to was whole.
template <class Fn>
std::size_t for_each_in_batch(std::string_view text, std::string_view meta, std::int64_t count,
                              Fn&& fn) {
  constexpr std::size_t kWhole = std::string_view::npos;
  const std::size_t n = meta.size() / kMetaBytes;
  if (meta.size() % kMetaBytes != 0 || count < 1 || n != static_cast<std::uint64_t>(count) ||
      text.size() < 3 || text.front() != '[' || text.back() != ']') {
    return 0;
  }
  const auto* m = reinterpret_cast<const unsigned char*>(meta.data());
  const std::size_t close = text.size() - 1;  // the ']'
  std::size_t begin = 1;                      // after '['
  for (std::size_t i = 0; i < n; ++i, m += kMetaBytes) {
    const std::size_t end = get_le(m, 4);
    const bool whole = end > begin && (i + 1 == n ? end == close : end < close && text[end] == ',');
    if (!whole) return i;
    if (!fn(i, text.substr(begin, end - begin), static_cast<std::int64_t>(get_le(m + 4, 8)),
            static_cast<std::int64_t>(get_le(m + 12, 8)))) {
      return kWhole;
    }
    begin = end + 1;  // skip ','
  }
  return kWhole;
}

// The request_id of a record's JSON: its first field, always the gateway's own id (no escapes).
std::string_view request_id_of(std::string_view json) {
  constexpr std::string_view kPrefix = R"({"request_id":")";
  if (json.substr(0, kPrefix.size()) != kPrefix) return {};
  auto rest = json.substr(kPrefix.size());
  auto end = rest.find('"');
  return end == std::string_view::npos ? std::string_view() : rest.substr(0, end);
}

enum StatementIndex {
  kInsert,
  kHead,
  kCursorGet,
  kCursorSet,
  kReadAfter,
  kDeadLetterInsert,
  kDeleteRecords,
  kDeleteDeadLetters,
  kCountAll,
  kFirstSeq,
  kReadBatches,
  kDeletedThrough,
  kBatchBefore,
  kSettledSet,
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

bool SqliteError::damaged() const noexcept {
  int primary = code_ & 0xff;
  return primary == SQLITE_CORRUPT || primary == SQLITE_NOTADB;
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

// BEGIN IMMEDIATE ... COMMIT, rolled back when the scope ends without commit(). With `begin`
// "BEGIN": a read snapshot, ended with the scope.
class Transaction {
 public:
  explicit Transaction(sqlite3* db, const char* begin = "BEGIN IMMEDIATE") : db_(db) {
    begin_rc_ = sqlite3_exec(db_, begin, nullptr, nullptr, nullptr);
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

LogLock::LogLock(const std::string& log_path, std::chrono::milliseconds wait) {
  const std::string lock_path = log_path + ".lock";
  fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw std::runtime_error("usage log " + log_path + ": cannot open " + lock_path + ": " +
                             std::strerror(errno));
  }
  auto holder = [this] {
    char text[32] = {};
    const ssize_t n = ::pread(fd_, text, sizeof text - 1, 0);
    std::string pid(text, n > 0 ? static_cast<std::size_t>(n) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    return pid.empty() ? std::string("another gateway process")
                       : "another gateway process (pid " + pid + ")";
  };
  // A gateway replacing one that still drains on the same log (a rolling restart on a shared
  // volume) waits for it, up to `wait`, polling: flock has no timed wait.
  const auto until = std::chrono::steady_clock::now() + wait;
  bool said = false;
  while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EWOULDBLOCK && std::chrono::steady_clock::now() < until) {
      if (!said) {
        log::line("warn", "usage log {} is in use by {}; waiting up to {} s for it to exit",
                  log_path, holder(), wait.count() / 1000);
        said = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    const std::string who = err == EWOULDBLOCK ? holder() : std::string();
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) {
      throw std::runtime_error("usage log " + log_path + " is in use by " + who +
                               ": each gateway needs its own usage.log_path");
    }
    throw std::runtime_error("usage log " + log_path + ": cannot lock " + lock_path + ": " +
                             std::strerror(err));
  }
  // The holder's pid, for the messages above; the lock itself is the flock, not the content.
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] ssize_t written = ::pwrite(fd_, pid.data(), pid.size(), 0);
  }
}

LogLock::~LogLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

LogLock::LogLock(LogLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

LogLock& LogLock::operator=(LogLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

UsageLog::UsageLog(Mode mode, const std::string& path, bool create_schema,
                   std::chrono::milliseconds lock_wait) {
  int flags = SQLITE_OPEN_NOMUTEX;  // one thread at a time, by mu_
  std::string name = path;
  if (mode == Mode::memory) {
    name = ":memory:";
    path_ = ":memory:";
    memory_ = true;
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
      if (create_schema) lock_ = LogLock(path, lock_wait);
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
    if (mode == Mode::read_only) {
      // Reading is the first access to the file: a reader learns here that it cannot read it,
      // or that a newer gateway wrote it, before it reports totals it does not understand.
      refuse_newer_schema(user_version());
    }
    if (mode != Mode::read_only && create_schema) {
      const int version = user_version();
      refuse_newer_schema(version);
      exec("BEGIN IMMEDIATE");
      try {
        if (version == 1) migrate_v1();
        exec(schema_sql().c_str());
        add_settled_columns();
        mark_untimed_deletes();
        exec(("PRAGMA user_version=" + std::to_string(kSchemaVersion)).c_str());
        exec("COMMIT");
      } catch (...) {
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        throw;
      }
    }
    statements_.resize(kStatementCount);
    if (!memory_) {
      struct stat st {};
      if (::stat(path_.c_str(), &st) == 0) {
        file_dev_ = static_cast<std::uint64_t>(st.st_dev);
        file_ino_ = static_cast<std::uint64_t>(st.st_ino);
      }
    }
  } catch (...) {
    statements_.clear();
    sqlite3_close_v2(db_);
    db_ = nullptr;
    throw;
  }
}

bool UsageLog::file_replaced() const {
  if (memory_ || file_ino_ == 0) return false;
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) return errno == ENOENT || errno == ENOTDIR;
  return static_cast<std::uint64_t>(st.st_dev) != file_dev_ ||
         static_cast<std::uint64_t>(st.st_ino) != file_ino_;
}

int UsageLog::user_version() {
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v2(db_, "PRAGMA user_version", -1, &s, nullptr);
  if (rc != SQLITE_OK) fail(rc, "read schema version");
  rc = sqlite3_step(s);
  const int version = rc == SQLITE_ROW ? sqlite3_column_int(s, 0) : 0;
  sqlite3_finalize(s);
  if (rc != SQLITE_ROW) fail(rc, "read schema version");
  return version;
}

void UsageLog::refuse_newer_schema(int version) const {
  if (version > kSchemaVersion) {
    throw std::runtime_error("usage log " + path_ + ": schema version " + std::to_string(version) +
                             " is newer than this build's (" + std::to_string(kSchemaVersion) +
                             "): use the gateway that wrote it");
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

void UsageLog::damaged(std::int64_t seq) const {
  throw SqliteError(SQLITE_CORRUPT,
                    "usage log " + path_ + ": record " + std::to_string(seq) +
                        " is damaged: its bytes are not a record as the gateway writes one");
}

void UsageLog::missing(std::int64_t from, std::int64_t to) const {
  throw SqliteError(SQLITE_CORRUPT, "usage log " + path_ + ": records " + std::to_string(from) +
                                        ".." + std::to_string(to) +
                                        " are missing from the file, and no delete took them");
}

void UsageLog::fail(int rc, const char* what) {
  std::string message = "usage log " + path_ + ": " + what + ": " + sqlite3_errmsg(db_);
  // A WAL-mode file is read through its -shm index, which a reader creates beside it: an open
  // file it cannot read is a read-only directory without one.
  if ((rc & 0xff) == SQLITE_CANTOPEN) {
    message +=
        " (reading a usage log needs its directory writable, or its -shm file present, as "
        "SQLite's WAL mode requires)";
  }
  throw SqliteError(rc, message);
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
  if (records.empty()) return head_locked();
  Transaction tx(db_);
  if (tx.begin_rc() != SQLITE_OK) fail(tx.begin_rc(), "begin transaction");
  const std::int64_t first = head_locked() + 1;
  const std::int64_t last = first + static_cast<std::int64_t>(records.size()) - 1;
  std::string& text = batch_text_;
  std::string& meta = batch_meta_;
  text.clear();
  meta.clear();
  std::size_t size = 2 + records.size();
  for (const auto& p : records) size += p.stored.size();
  text.reserve(size);
  meta.reserve(records.size() * kMetaBytes);
  std::int64_t min_ts = INT64_MAX, max_ts = INT64_MIN;
  text += '[';
  for (std::size_t i = 0; i < records.size(); ++i) {
    const PendingRecord& r = records[i];
    if (i) text += ',';
    text += r.stored;
    put_meta(meta, text.size(), r.timestamp_ms, r.end_ms);
    min_ts = std::min(min_ts, r.timestamp_ms);
    max_ts = std::max(max_ts, r.timestamp_ms);
  }
  text += ']';
  insert_batch(first, last, min_ts, max_ts, text, meta);
  int rc = tx.commit();
  if (rc != SQLITE_OK) fail(rc, "commit");
  return last;
}

void UsageLog::insert_batch(std::int64_t first, std::int64_t last, std::int64_t min_ts,
                            std::int64_t max_ts, std::string_view text, std::string_view meta) {
  auto& st = stmt(kInsert,
                  "INSERT INTO record_batches(first_seq, last_seq, min_ts_ms, max_ts_ms, "
                  "records, meta) VALUES(?,?,?,?,?,?)");
  Use u(st.s);
  u.i64(1, first);
  u.i64(2, last);
  u.i64(3, min_ts);
  u.i64(4, max_ts);
  u.text(5, text);
  sqlite3_bind_blob(st.s, 6, meta.data(), static_cast<int>(meta.size()), SQLITE_STATIC);
  step_done(st.s, "insert records");
}

// Version 1 (one row per record, AUTOINCREMENT seq) to version 2, inside the caller's
// transaction: every record becomes a batch of one, the head and the cursors stay as they were.
void UsageLog::migrate_v1() {
  exec("ALTER TABLE records RENAME TO records_v1");
  exec(schema_sql().c_str());
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v2(db_, "SELECT seq, ts_ms, end_ms, json FROM records_v1 ORDER BY seq",
                              -1, &s, nullptr);
  if (rc != SQLITE_OK) fail(rc, "migrate the usage log from version 1");
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> guard(s, sqlite3_finalize);
  statements_.resize(kStatementCount);
  std::string text, meta;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    const std::int64_t seq = sqlite3_column_int64(s, 0);
    const std::int64_t ts = sqlite3_column_int64(s, 1);
    text = "[" + column_text(s, 3) + "]";
    meta.clear();
    put_meta(meta, text.size() - 1, ts, sqlite3_column_int64(s, 2));
    insert_batch(seq, seq, ts, ts, text, meta);
  }
  if (rc != SQLITE_DONE) fail(rc, "migrate the usage log from version 1");
  guard.reset();
  // The head: AUTOINCREMENT's, which counts deleted records too.
  exec(
      "INSERT INTO log_head(id, seq) SELECT 1, seq FROM sqlite_sequence WHERE name='records_v1' "
      "ON CONFLICT(id) DO UPDATE SET seq=max(seq, excluded.seq)");
  statements_.clear();
  exec("DROP TABLE records_v1");
}

std::int64_t UsageLog::head() {
  std::lock_guard lk(mu_);
  return head_locked();
}

std::int64_t UsageLog::head_locked() {
  // The newest batch's last seq, unless deletes took it: then log_head, which the trigger on
  // record_batches raises on every delete, by SQL typed by hand too (a commit need not write
  // it: one page less per commit).
  auto& st = stmt(kHead,
                  "SELECT max(coalesce((SELECT last_seq FROM record_batches ORDER BY first_seq "
                  "DESC LIMIT 1), 0), coalesce((SELECT seq FROM log_head WHERE id=1), 0))");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc == SQLITE_ROW) return sqlite3_column_int64(st.s, 0);
  if (rc == SQLITE_DONE) return 0;
  fail(rc, "read head");
}

std::int64_t UsageLog::deleted_through() {
  std::lock_guard lk(mu_);
  return deleted_through_locked();
}

std::int64_t UsageLog::deleted_through_locked() {
  auto& st = stmt(kDeletedThrough, "SELECT coalesce((SELECT seq FROM log_head WHERE id=1), 0)");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc != SQLITE_ROW) fail(rc, "read the last deleted seq");
  return sqlite3_column_int64(st.s, 0);
}

namespace {
// True when seqs below the oldest kept record are missing (or the log kept none of those it
// gave out): deletes took records.
constexpr const char* kRecordsDeletedBelowKept =
    " WHERE coalesce((SELECT min(first_seq) FROM record_batches), (SELECT seq FROM log_head "
    "WHERE id=1) + 1, 1) > 1";
}  // namespace

void UsageLog::mark_untimed_deletes() {
  // Records missing below the oldest kept one (or all of them) were deleted before the file had
  // deleted_times, by an older build: they started before now, which bounds their times. Once
  // the row exists the trigger keeps it, so this inserts at most once per file.
  const std::string sql = "INSERT OR IGNORE INTO deleted_times(id, max_ts_ms) SELECT 1, " +
                          std::to_string(log::unix_ms_now()) + kRecordsDeletedBelowKept;
  exec(sql.c_str());
}

std::optional<std::int64_t> UsageLog::deleted_times_locked() {
  // A file no writer of this version has opened has no table: whether records were deleted is
  // then known (seqs missing below the oldest kept one), their times are not.
  bool has_table = false;
  {
    sqlite3_stmt* s = nullptr;
    int rc = sqlite3_prepare_v2(
        db_, "SELECT 1 FROM sqlite_master WHERE type='table' AND name='deleted_times'", -1, &s,
        nullptr);
    if (rc != SQLITE_OK) fail(rc, "prepare");
    rc = sqlite3_step(s);
    sqlite3_finalize(s);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) fail(rc, "read the schema");
    has_table = rc == SQLITE_ROW;
  }
  sqlite3_stmt* s = nullptr;
  const std::string sql =
      has_table ? "SELECT max_ts_ms FROM deleted_times WHERE id=1"
                : std::string("SELECT 9223372036854775807") + kRecordsDeletedBelowKept;
  int rc = sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr);
  if (rc != SQLITE_OK) fail(rc, "prepare");
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> guard(s, sqlite3_finalize);
  rc = sqlite3_step(s);
  if (rc == SQLITE_ROW) return sqlite3_column_int64(s, 0);
  if (rc != SQLITE_DONE) fail(rc, "read the deleted records' times");
  return std::nullopt;
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

void UsageLog::set_cursors(std::span<const std::pair<std::string, std::int64_t>> cursors,
                           std::int64_t now_ms) {
  if (cursors.empty()) return;
  std::lock_guard lk(mu_);
  Transaction tx(db_);
  if (tx.begin_rc() != SQLITE_OK) fail(tx.begin_rc(), "begin transaction");
  for (const auto& [sink, seq] : cursors) store_cursor(sink, seq, now_ms);
  int rc = tx.commit();
  if (rc != SQLITE_OK) fail(rc, "commit");
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

std::string_view LoggedRecords::request_id(std::size_t i) const {
  return request_id_of(json_of(i));
}

void UsageLog::read_after(std::int64_t after, int limit, LoggedRecords& out,
                          std::size_t max_bytes) {
  std::lock_guard lk(mu_);
  int left = limit;
  const std::size_t had = out.size();  // `out` may hold records already: this read's are after
  // A sink usually reads the batch it read last time again (batch_size < records per commit):
  // the last batch read stays decoded here.
  auto take = [&](const CachedBatch& b) {
    if (b.last_seq <= after || b.first_seq > after + 1) return;
    const std::size_t bad = for_each_in_batch(
        b.text, b.meta, b.last_seq - b.first_seq + 1,
        [&](std::size_t i, std::string_view json, std::int64_t, std::int64_t end_ms) {
          const std::int64_t seq = b.first_seq + static_cast<std::int64_t>(i);
          if (seq <= after) return true;
          if (!out.json.empty()) out.json += ',';
          const std::size_t begin = out.json.size();
          if (!append_stored_json(out.json, json)) damaged(seq);
          out.entries.push_back({seq, end_ms, begin, out.json.size()});
          after = seq;
          --left;
          if (out.json.size() >= max_bytes) left = 0;  // at least one record: it is in
          return left > 0;
        });
    // The first record this read cannot have (a batch whose shape is wrong reports its first).
    if (bad != std::string_view::npos) {
      damaged(std::max(b.first_seq + static_cast<std::int64_t>(bad), after + 1));
    }
  };
  if (left > 0) take(cached_);
  if (left <= 0) return;
  auto& st = stmt(kReadBatches,
                  // From the batch holding seq after+1 on: a seek on the rowid, not a scan.
                  "SELECT first_seq, last_seq, records, meta FROM record_batches "
                  "WHERE first_seq >= coalesce((SELECT max(first_seq) FROM record_batches "
                  "WHERE first_seq <= ?1 + 1), 0) ORDER BY first_seq");
  Use u(st.s);
  u.i64(1, after);
  int rc;
  while (left > 0 && (rc = sqlite3_step(st.s)) == SQLITE_ROW) {
    cached_.first_seq = sqlite3_column_int64(st.s, 0);
    cached_.last_seq = sqlite3_column_int64(st.s, 1);
    cached_.text = column_text(st.s, 2);
    auto* blob = static_cast<const char*>(sqlite3_column_blob(st.s, 3));
    cached_.meta.assign(blob ? blob : "", static_cast<std::size_t>(sqlite3_column_bytes(st.s, 3)));
    if (cached_.first_seq > after + 1) {  // a gap
      if (out.size() > had) break;        // the next call goes on from here
      // Deleted records are skipped. Records no delete took were lost by the file (SQLite does
      // not notice every damaged page): delivery stops there, as at any other damage.
      if (const std::int64_t deleted = deleted_through_locked(); deleted < cached_.first_seq - 1) {
        missing(std::max(after, deleted) + 1, cached_.first_seq - 1);
      }
      after = cached_.first_seq - 1;
    }
    take(cached_);
  }
  if (left > 0 && rc != SQLITE_DONE && rc != SQLITE_ROW) fail(rc, "read records");
}

void UsageLog::dead_letter(const DeadLetterRow& row) {
  std::lock_guard lk(mu_);
  if (memory_) {
    // Nothing outside this process could read the row, and the rows would grow with every
    // rejection: only the cursor moves (the sink counts and logs the rejection).
    store_cursor(row.sink, row.last_seq, row.at_ms);
    return;
  }
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
  // Whole batches only: every record of one must be at or below max_seq (and, with before_ms,
  // the newest one older than it). first_seq is the rowid; max_ts_ms has an index. A batch is
  // taken while the ones before it hold fewer than `limit` records: batches of up to 4,096
  // records must not make one call delete millions (it runs on the writer's thread).
  auto& st = stmt(kDeleteRecords,
                  "DELETE FROM record_batches WHERE first_seq IN (SELECT first_seq FROM (SELECT "
                  "first_seq, sum(n) OVER (ORDER BY first_seq) - n AS before FROM (SELECT "
                  "first_seq, last_seq - first_seq + 1 AS n FROM record_batches WHERE first_seq "
                  "<= ?1 AND last_seq <= ?1 AND max_ts_ms < ?2 ORDER BY first_seq LIMIT ?3)) "
                  "WHERE before < ?3) RETURNING last_seq - first_seq + 1");
  Use u(st.s);
  u.i64(1, max_seq);
  u.i64(2, before_ms.value_or(INT64_MAX));
  u.i64(3, limit);
  std::int64_t n = 0;
  int rc;
  while ((rc = sqlite3_step(st.s)) == SQLITE_ROW) n += sqlite3_column_int64(st.s, 0);
  if (rc != SQLITE_DONE) fail(rc, "delete records");
  if (cached_.last_seq <= max_seq) cached_ = CachedBatch{};
  return n;
}

void UsageLog::store_settled(std::int64_t ms, bool clean, std::int64_t beat_ms) {
  std::lock_guard lk(mu_);
  auto& st = stmt(kSettledSet,
                  "INSERT INTO settled(id, ms, clean, beat_ms) VALUES(1, ?1, ?2, ?3) ON "
                  "CONFLICT(id) DO UPDATE SET ms = excluded.ms, clean = excluded.clean, beat_ms = "
                  "excluded.beat_ms");
  Use u(st.s);
  u.i64(1, ms);
  u.i64(2, clean ? 1 : 0);
  u.i64(3, beat_ms);
  step_done(st.s, "store the settled time");
}

UsageLog::OneOff UsageLog::prepare_one_off(const char* sql, bool missing_ok) {
  sqlite3_stmt* s = nullptr;
  const int rc = sqlite3_prepare_v2(db_, sql, -1, &s, nullptr);
  OneOff st(s, sqlite3_finalize);
  if (rc != SQLITE_OK) {
    if (missing_ok) return OneOff(nullptr, sqlite3_finalize);
    fail(rc, "prepare");
  }
  return st;
}

void UsageLog::add_settled_columns() {
  // A `settled` table made by a development build before these columns (same schema version:
  // the table is additive).
  bool clean = false, beat = false;
  auto st = prepare_one_off("SELECT name FROM pragma_table_info('settled')");
  int rc;
  while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
    const std::string name = column_text(st.get(), 0);
    clean = clean || name == "clean";
    beat = beat || name == "beat_ms";
  }
  if (rc != SQLITE_DONE) fail(rc, "read the settled table's columns");
  st.reset();
  if (!clean) exec("ALTER TABLE settled ADD COLUMN clean INTEGER NOT NULL DEFAULT 0");
  if (!beat) exec("ALTER TABLE settled ADD COLUMN beat_ms INTEGER NOT NULL DEFAULT 0");
}

std::int64_t UsageLog::open_settled(std::int64_t now_ms) {
  std::lock_guard lk(mu_);
  Transaction tx(db_, "BEGIN IMMEDIATE");
  if (tx.begin_rc() != SQLITE_OK) fail(tx.begin_rc(), "begin");
  // The requests lost started at or after the settled time, before the crash: at most 31 s
  // after the last store (a heartbeat at least every 30 s), and before this start. Then a log
  // without a settled time (new, or last written by an older build) is settled up to now:
  // requests before this start are another process's, logged or lost with it (a crash before
  // this writer's first store leaves a gap from here).
  for (const char* sql :
       {"INSERT INTO unsettled_gaps(from_ms, to_ms) SELECT ms, CASE WHEN beat_ms > 0 AND "
        "beat_ms + 31000 < ?1 THEN max(ms, beat_ms + 31000) ELSE ?1 END FROM settled WHERE id = "
        "1 AND clean = 0 AND ms < ?1",
        "UPDATE settled SET clean = 0 WHERE id = 1",
        "INSERT OR IGNORE INTO settled(id, ms, clean, beat_ms) VALUES(1, ?1, 0, ?1)"}) {
    auto st = prepare_one_off(sql);
    if (sqlite3_bind_parameter_count(st.get()) > 0) sqlite3_bind_int64(st.get(), 1, now_ms);
    step_done(st.get(), "open the settled time");
  }
  const std::int64_t ms = settled_locked().value_or(now_ms);  // the row exists now
  const int rc = tx.commit();
  if (rc != SQLITE_OK) fail(rc, "commit");
  return ms;
}

std::optional<std::pair<std::int64_t, std::int64_t>> UsageLog::gap_locked(std::int64_t since_ms,
                                                                          std::int64_t until_ms) {
  // No table: no writer of this version opened the file.
  auto st = prepare_one_off(
      "SELECT from_ms, to_ms FROM unsettled_gaps WHERE from_ms < ?1 AND to_ms > ?2 ORDER BY "
      "from_ms DESC LIMIT 1",
      true);
  if (!st) return std::nullopt;
  sqlite3_bind_int64(st.get(), 1, until_ms);
  sqlite3_bind_int64(st.get(), 2, since_ms);
  const int rc = sqlite3_step(st.get());
  if (rc == SQLITE_ROW) {
    return std::pair{sqlite3_column_int64(st.get(), 0), sqlite3_column_int64(st.get(), 1)};
  }
  if (rc != SQLITE_DONE) fail(rc, "read the unsettled gaps");
  return std::nullopt;
}

std::optional<std::int64_t> UsageLog::settled_locked() {
  // No table: no writer of this version opened the file, nothing is known.
  auto st = prepare_one_off("SELECT ms FROM settled WHERE id = 1", true);
  if (!st) return std::nullopt;
  const int rc = sqlite3_step(st.get());
  if (rc == SQLITE_ROW) return sqlite3_column_int64(st.get(), 0);
  if (rc != SQLITE_DONE) fail(rc, "read the settled time");
  return INT64_MIN;  // a writer of this version opened the file and has settled nothing yet
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
  auto& st =
      stmt(kCountAll, "SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM record_batches");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc != SQLITE_ROW) fail(rc, "count records");
  return sqlite3_column_int64(st.s, 0);
}

std::optional<std::int64_t> UsageLog::first_seq() {
  std::lock_guard lk(mu_);
  auto& st = stmt(kFirstSeq, "SELECT min(first_seq) FROM record_batches");
  Use u(st.s);
  int rc = sqlite3_step(st.s);
  if (rc != SQLITE_ROW) fail(rc, "read the first record");
  if (sqlite3_column_type(st.s, 0) == SQLITE_NULL) return std::nullopt;
  return sqlite3_column_int64(st.s, 0);
}

UsageLog::WindowFacts UsageLog::for_each_record(
    std::int64_t since_ms, std::int64_t until_ms,
    const std::function<void(std::int64_t, std::string_view)>& fn) {
  std::lock_guard lk(mu_);
  // One snapshot for the scan and its checks: a delete in between (the gateway's retention)
  // would otherwise look like records lost.
  Transaction snapshot(db_, "BEGIN");
  if (snapshot.begin_rc() != SQLITE_OK) fail(snapshot.begin_rc(), "begin a read");
  const std::int64_t deleted = deleted_through_locked();
  WindowFacts facts;
  facts.deleted_ts_ms = deleted_times_locked();
  facts.settled_ms = settled_locked();
  facts.gap = gap_locked(since_ms, until_ms);
  // The batch before each batch the window reads (one lookup by key): records missing right
  // before a batch of the window, which no delete took, may have belonged to it. A batch
  // contiguous with the one read before it needs no lookup.
  auto& before = stmt(kBatchBefore,
                      "SELECT last_seq FROM record_batches WHERE first_seq < ? ORDER BY first_seq "
                      "DESC LIMIT 1");
  std::int64_t read_through = -1;  // the last seq of the batch read before
  const auto check_before = [&](std::int64_t first) {
    if (first - 1 <= deleted || first - 1 == read_through) return;
    Use u(before.s);
    u.i64(1, first);
    const int rc = sqlite3_step(before.s);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) fail(rc, "read the batch before");
    const std::int64_t prev = rc == SQLITE_ROW ? sqlite3_column_int64(before.s, 0) : 0;
    if (prev < first - 1) missing(std::max(prev, deleted) + 1, first - 1);
  };
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v2(db_,
                              "SELECT records, meta, first_seq, last_seq FROM record_batches WHERE "
                              "max_ts_ms >= ? AND min_ts_ms < ? ORDER BY first_seq",
                              -1, &s, nullptr);
  if (rc != SQLITE_OK) fail(rc, "prepare");
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> guard(s, sqlite3_finalize);
  sqlite3_bind_int64(s, 1, since_ms);
  sqlite3_bind_int64(s, 2, until_ms);
  std::string json;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    std::string_view text(reinterpret_cast<const char*>(sqlite3_column_text(s, 0)),
                          static_cast<std::size_t>(sqlite3_column_bytes(s, 0)));
    std::string_view meta(static_cast<const char*>(sqlite3_column_blob(s, 1)),
                          static_cast<std::size_t>(sqlite3_column_bytes(s, 1)));
    const std::int64_t first = sqlite3_column_int64(s, 2);
    check_before(first);
    read_through = sqlite3_column_int64(s, 3);
    const std::size_t bad = for_each_in_batch(
        text, meta, sqlite3_column_int64(s, 3) - first + 1,
        [&](std::size_t i, std::string_view stored, std::int64_t ts, std::int64_t) {
          if (ts >= since_ms && ts < until_ms) {
            json.clear();
            if (!append_stored_json(json, stored)) damaged(first + static_cast<std::int64_t>(i));
            fn(ts, json);
          }
          return true;
        });
    if (bad != std::string_view::npos) damaged(first + static_cast<std::int64_t>(bad));
  }
  if (rc != SQLITE_DONE) fail(rc, "read records");
  return facts;
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
