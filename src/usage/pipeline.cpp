// The usage pipeline's threads: one writer, one per sink (see pipeline.h for the data flow).
//
// Why threads and not the gateway's event loops: the writer blocks in SQLite and the sinks block
// on their receivers; neither may ever delay a request. Plain threads with condition variables
// keep that separation obvious, cost nothing while idle, and make the shutdown order explicit:
// the writer drains first, then the sinks deliver what the drain added, then everyone joins.
//
// Delivery contract (per sink):
//   - Records go out in seq order. The cursor moves (and is stored in the log) only after a 2xx,
//     or after a permanent rejection (4xx other than 408 and 429), which stores the POST in
//     dead_letters. So a record is delivered at least once, and exactly once unless the process
//     dies between a 2xx and the cursor's commit; receivers de-duplicate on request_id /
//     Idempotency-Key. The cursor is committed before the sink waits for records, and while it
//     delivers without waiting (a backlog, a steady flow that fills every batch) at most every
//     kCursorEvery: a transaction per POST cost more than the POST's share of the sink's work, and
//     a kill -9 then re-sends at most that much.
//   - batch_size 1: the body is the record's JSON object (the seed's format); batch_size > 1: a
//     JSON array of up to batch_size objects, sent when it is full or batch_interval after the
//     first record became available. A batch that failed is resent unchanged (same body, same
//     Idempotency-Key) until it succeeds or is rejected for good; except that a batch answered
//     413 (too large for the receiver) is split: its records go again in batches of half its
//     size, and the size doubles back after each success. A single record answered 413 is a
//     dead letter.
//   - Headers: Content-Type: application/json, User-Agent: llmproxy/<version>, Idempotency-Key:
//     <request_id> (single) or <first request_id>+<count> (batch), then the sink's own headers
//     (which replace ours of the same name), then, with a secret, X-LLMProxy-Timestamp: <unix
//     seconds> and X-LLMProxy-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>,
//     recomputed for each attempt.
//   - Failures (no answer, timeout, 3xx, 5xx, 408, 429): the attempt's records count in
//     `failed`; the next attempt waits a random time in [0, min(max_backoff, 100ms * 2^(n-1))]
//     for the first `retry` retries (full jitter), then in [cap/2, cap] with the same cap (the
//     slow lane: never a tight loop against a receiver that is down); and at least the answer's
//     Retry-After (seconds), up to max_backoff. stop() cuts a wait short;
//     the sink then exits and its records stay in the log.
//   - delivery_latency: from the record's end (timestamp + duration) to the 2xx, in ms; it is
//     stored in the log, so it stays meaningful for records delivered after a restart.
//
// Counters (stats()): queue_depth: submitted, not yet committed; logged: committed; commits:
// transactions (one per group); dropped: refused by submit() (on_backlog: serve over the bound,
// or after stop()) plus records still uncommitted when stop()'s deadline passed. Per sink:
// delivered (2xx), failed (records of failed attempts, every attempt), dead_letters (records
// rejected for good), backlog (head seq - cursor, from two atomics).
//
// Retention (writer thread, at start and hourly): records older than retention_days whose seq is
// at or below every configured sink's cursor are deleted, in chunks so that commits go on in
// between; dead letters older than retention_days too. With durability: memory, records are
// deleted as soon as every sink has passed them, and the writer takes no more from the queue
// while memory_max_records undelivered records are held (so the backlog policy applies).
#include "usage/pipeline.h"

#include <fmt/format.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>

#include "log/log.h"
#include "usage/usage_log.h"
#include "usage/webhook_client.h"

namespace llmproxy::usage {

namespace {

// Records per transaction at most: a burst this large is committed without waiting out the
// commit window.
constexpr std::size_t kGroupMax = 4096;
// Packed bytes in one group: its JSON is at most ~6 times this (every byte escaped), far below
// SQLite's 1 GB limit on one value.
constexpr std::size_t kGroupBytes = std::size_t{32} << 20;
// Buffers (packed records, their JSON) keep at most this much capacity between commits: a
// burst's growth is given back (a full group of large records is a few MiB).
constexpr std::size_t kKeepBytes = std::size_t{1} << 20;
// A sink's batch stops at this much JSON (at least one record), whatever batch_size says: its
// POST body, and the signed copy, are then bounded too (records reach ~60 KiB each).
constexpr std::size_t kMaxBatchBytes = std::size_t{8} << 20;

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr int kRetentionChunk = 5000;
// How often the settled time is taken (and, once its records are committed, stored), and how
// often at most it is stored when no record came since.
constexpr auto kSettledEvery = std::chrono::seconds(1);
constexpr auto kSettledIdleEvery = std::chrono::seconds(30);
// A settled time this far behind the clock when stored was held back by a request (the usual
// lag: the 1 s margin, a sweep, a candidate's age).
constexpr std::int64_t kSettledLag = 3000;
constexpr auto kRetentionPeriod = std::chrono::hours(1);
constexpr auto kLogEvery = std::chrono::seconds(10);
// The writer looks at most this often whether the log's file is still at log_path.
constexpr auto kFileCheckEvery = std::chrono::seconds(1);
// A batch sent whole this many times without an answer in time is sent in halves.
constexpr int kUnansweredToHalve = 3;
// How long a 413 keeps batches under half the size it refused.
constexpr auto kForgetTooLarge = std::chrono::minutes(10);
constexpr milliseconds kFirstBackoff{100};
constexpr milliseconds kCursorEvery{100};

using log::unix_ms_now;

std::string hmac_sha256_hex(std::string_view key, std::string_view data) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
            reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, &len)) {
    throw std::runtime_error("HMAC-SHA256 failed");
  }
  static constexpr char hex[] = "0123456789abcdef";
  std::string out(len * 2, '\0');
  for (unsigned i = 0; i < len; ++i) {
    out[2 * i] = hex[mac[i] >> 4];
    out[2 * i + 1] = hex[mac[i] & 0xf];
  }
  return out;
}

// 408 and 429 say "later"; 409 is what receivers implementing Idempotency-Key answer while an
// earlier attempt with the same key is still being processed (a retry after a timeout), and 425
// "too early": neither refuses the records.
bool permanent_rejection(unsigned status) {
  return status >= 400 && status < 500 && status != 408 && status != 409 && status != 425 &&
         status != 429;
}

// A rejection of the endpoint rather than of the records in the POST (credentials, a wrong
// URL): a batch so refused is not split to find the records at fault; all of them are.
bool rejects_the_endpoint(unsigned status) {
  return status == 401 || status == 403 || status == 404 || status == 405 || status == 410;
}

// Throws std::runtime_error for a sink without a name or a valid URL, or a name used twice.
void check_sinks(const std::vector<config::SinkConfig>& sinks) {
  for (std::size_t i = 0; i < sinks.size(); ++i) {
    std::string why;
    if (sinks[i].name.empty()) throw std::runtime_error("usage sink without a name");
    if (!config::parse_url(sinks[i].url, &why, true)) {
      throw std::runtime_error("usage sink " + sinks[i].name + ": " + why);
    }
    for (std::size_t k = 0; k < i; ++k) {
      if (sinks[k].name == sinks[i].name) {
        throw std::runtime_error("usage sink \"" + sinks[i].name + "\" is configured twice");
      }
    }
  }
}

}  // namespace

class Sink {
 public:
  config::SinkConfig cfg;
  config::Url url;
  std::unique_ptr<UsageLog> own_log;  // durability: disk: this thread's connection
  UsageLog* log = nullptr;
  std::unique_ptr<WebhookClient> client;
  std::thread thread;
  std::atomic<bool> retire{false};  // a reload removed or changed it: stop after this POST
  // When a POST in flight is cut (steady_clock count; 0: never): now when the sink retires, the
  // stop deadline when the pipeline stops. See WebhookClient.
  std::atomic<Clock::rep> cut_at{0};
  bool replaced = false;  // reconfigure(): a changed sink, whose successor took its counters

  std::atomic<std::int64_t> cursor{0};
  // The cursor as stored (written by the sink's thread). Retention deletes only what stored
  // cursors passed, so that a sink restarted after a crash never finds records it was not told
  // it had delivered gone.
  std::atomic<std::int64_t> persisted{0};
  // make_sink(): a cursor created (new sink) or moved (past deleted records), stored with the
  // others of the same start or reload in one transaction (store_new_cursors()).
  bool cursor_unstored = false;
  Clock::time_point persisted_at{};

  std::atomic<std::uint64_t> delivered{0};
  std::atomic<std::uint64_t> failed{0};
  std::atomic<std::uint64_t> dead_letters{0};
  std::atomic<std::uint64_t> reads_damaged{0};  // reads of the log that found it damaged
  std::atomic<std::uint64_t> reads_failed{0};   // other failed reads (a lock held outside)
  mutable std::mutex latency_mu;
  metrics::Histogram latency{metrics::kLatencyBoundsMs.size()};

  // Rate-limited failure reports (sink thread only).
  std::uint64_t consecutive_failures = 0;
  std::uint64_t unreported = 0;
  Clock::time_point last_report{};
  Clock::time_point last_dead_report{};
  Clock::time_point last_cursor_warning{};  // a cursor that cannot be stored: once per kLogEvery
  std::uint64_t dead_unreported = 0;
  Clock::time_point last_read_report{};
};

struct Pipeline::Impl {
  config::UsageConfig cfg;
  std::string cfg_log_path;
  bool memory = false;
  std::atomic<std::int64_t>* depth = nullptr;
  std::unique_ptr<UsageLog> log;  // the writer's connection; with durability: memory, everyone's
  // Changed only by reconfigure(), under both lifecycle_mu and sinks_mu; read under either.
  std::vector<std::unique_ptr<Sink>> sinks;
  mutable std::mutex sinks_mu;
  std::uint64_t removed_delivered = 0;  // under sinks_mu: counts of sinks a reload removed
  std::uint64_t removed_failed = 0;

  std::mutex mu;  // queue, writer_gone, writer_idle
  std::condition_variable writer_cv;
  PackedRecords queue;
  Clock::time_point queue_since{};          // when the oldest queued record arrived
  std::atomic<Clock::rep> deadline_rep{0};  // stop()'s deadline, stored before stop_requested
  std::atomic<bool> stop_requested{false};
  bool writer_gone = false;  // under mu: submit() after the writer exited drops
  // Under mu: the writer sleeps with nothing to do and no timer set for the queue, so submit()
  // must wake it for the first record. Otherwise it looks at the queue on its own.
  bool writer_idle = false;

  std::mutex sink_mu;  // sinks sleep on sink_cv for new records, writer_done or stop
  std::condition_variable sink_cv;
  std::atomic<std::int64_t> head{0};
  std::atomic<bool> writer_done{false};
  std::atomic<std::int64_t> pruned{0};  // durability: memory: records up to here are deleted
  // While a reload makes its new sinks, which are not yet in `sinks`: min_cursor() is then 0, so
  // neither pruning nor retention deletes what they may read, wherever they start.
  std::atomic<bool> reload_hold{false};

  std::atomic<std::uint64_t> logged{0};
  std::atomic<std::uint64_t> dropped{0};
  std::uint64_t submitted = 0;  // records ever queued (under mu): compared with `logged`

  // The settled time (see set_settled_source), writer thread only: a candidate is stored once
  // every record queued before it was read is committed (commits keep the queue's order).
  std::function<std::int64_t()> settled_source;
  struct SettledCandidate {
    std::int64_t ms;
    std::uint64_t queued;
  };
  std::optional<SettledCandidate> settled_candidate;
  std::atomic<bool> requests_lost{false};  // note_requests_lost(): the stop is not clean
  // open_settled() done (retried until it is: until then nothing is stored, so that the span
  // an unclean stop before lost is kept first), at the start's wall time.
  bool settled_opened = false;
  std::int64_t settled_opened_at = 0;
  std::int64_t settled_stored = 0;          // the log's value (loaded by open_settled)
  std::uint64_t settled_stored_logged = 0;  // `logged` when it was stored
  std::optional<Clock::time_point> settled_stored_at;
  bool settled_held_back = false;  // the value stored lagged the clock: no idle pause then
  Clock::time_point settled_next{};
  Clock::time_point settled_warned{};
  bool settles() const { return settled_source && log && !memory; }
  void track_settled();
  // Stores the settled time (with a heartbeat); a failure is logged at most every kLogEvery
  // (only the ledger's warning is late: the next try may succeed).
  bool store_settled(std::int64_t ms, bool clean);
  void warn_settled(const char* what, const std::exception& e);
  Clock::time_point settled_due() const {
    return settles() && !settled_candidate ? settled_next : Clock::time_point::max();
  }
  std::atomic<std::uint64_t> commits{0};
  // The file at log_path is no longer the one the log writes (deleted or replaced): checked by
  // the writer after commits (at most every kFileCheckEvery) and at every scrape.
  mutable std::atomic<bool> file_lost{false};
  mutable std::atomic<Clock::rep> file_checked_rep{0};
  mutable std::atomic<Clock::rep> file_reported_rep{0};
  void check_file() const;

  std::thread writer;
  std::mutex lifecycle_mu;
  bool started = false;
  bool stopped = false;

  // Writer-thread state.
  // The rows of the records taken, back to back in one buffer (kept between commits: no
  // allocation per record); row_ends[i] is where record i's ends.
  std::string row_text;
  std::vector<std::size_t> row_ends;
  std::vector<UsageRecordView> views;
  std::vector<PendingRecord> pending;
  std::uint64_t commit_failures = 0;
  Clock::time_point last_commit_report{};

  // `hold`: with the reload's hold, as what pruning may delete; without, as what sinks still need.
  // `stored`: the cursors as stored in the log rather than as delivered (retention's).
  std::int64_t min_cursor(bool hold = true, bool stored = false) const {
    std::int64_t m = head.load();  // before reload_hold (see reconfigure)
    if (hold && reload_hold.load()) return 0;
    std::lock_guard lk(sinks_mu);
    for (const auto& s : sinks) {
      m = std::min(m, (stored ? s->persisted : s->cursor).load(std::memory_order_acquire));
    }
    return m;
  }

  // Records the writer may still add before durability: memory holds memory_max_records.
  std::int64_t capacity() const {
    if (!memory) return std::numeric_limits<std::int64_t>::max();
    // Not the reload's hold: it keeps records a moment longer, it does not make them needed.
    std::int64_t held = head.load(std::memory_order_acquire) - min_cursor(false);
    return std::max<std::int64_t>(0, cfg.memory_max_records - held);
  }

  void wake_sinks() {
    { std::lock_guard lk(sink_mu); }
    sink_cv.notify_all();
  }

  void wake_writer() {
    { std::lock_guard lk(mu); }
    writer_cv.notify_all();
  }

  Clock::time_point stop_deadline() const {
    return Clock::time_point(Clock::duration(deadline_rep.load(std::memory_order_acquire)));
  }

  bool commit(PackedRecords& taken);
  void clear_rows() {
    row_ends.clear();
    row_text.clear();
    // A burst's buffer is not kept for ever (a full group is ~2 MiB).
    if (row_text.capacity() > kKeepBytes) std::string().swap(row_text);
    // The per-record vectors too (~200 bytes a record of capacity after a large take).
    if (views.capacity() > kKeepBytes / sizeof(UsageRecordView)) {
      std::vector<UsageRecordView>().swap(views);
      std::vector<PendingRecord>().swap(pending);
      std::vector<std::size_t>().swap(row_ends);
    }
  }
  bool retention_chunk(std::int64_t& deleted);
  void writer_loop();

  std::unique_ptr<Sink> make_sink(config::SinkConfig cfg, std::int64_t head, std::string& summary);
  // Stores the cursors make_sink() created, all or none (throws when none could be).
  void store_new_cursors(const std::vector<std::unique_ptr<Sink>>& made) {
    std::vector<std::pair<std::string, std::int64_t>> cursors;
    for (const auto& s : made) {
      if (s->cursor_unstored) cursors.emplace_back(s->cfg.name, s->persisted.load());
    }
    log->set_cursors(cursors, unix_ms_now());
    for (const auto& s : made) s->cursor_unstored = false;
  }
  void start_sink(Sink& s) {
    Sink* sp = &s;
    s.thread = std::thread([this, sp] {
      log::name_thread("sink-" + sp->cfg.name);
      sink_loop(*sp);
    });
  }
  void sink_loop(Sink& s);
  void prune_memory();
  void report_failure(Sink& s, std::size_t records, const std::string& why);
  void persist_cursor(Sink& s);
};

// ---------------------------------------------------------------------------------------------
// Writer

void Pipeline::Impl::check_file() const {
  if (memory || !log) return;
  const auto now = Clock::now();
  file_checked_rep.store(now.time_since_epoch().count(), std::memory_order_relaxed);
  const bool lost = log->file_replaced();
  const bool was = file_lost.exchange(lost, std::memory_order_relaxed);
  if (!lost) {
    if (was)
      log::line("info", "usage log {}: the file is back where the gateway writes it", log->path());
    return;
  }
  const Clock::time_point reported{
      Clock::duration{file_reported_rep.load(std::memory_order_relaxed)}};
  if (!was || now - reported >= std::chrono::minutes(1)) {
    file_reported_rep.store(now.time_since_epoch().count(), std::memory_order_relaxed);
    log::line("error",
              "usage log {}: the file was deleted or replaced while the gateway writes it; "
              "records still go into the file the gateway opened, which nothing will open again: "
              "whatever is not delivered when the gateway stops is lost. Restore the file "
              "(e.g. from /proc/<pid>/fd) before a restart",
              log->path());
  }
}

bool Pipeline::Impl::commit(PackedRecords& taken) {
  // Serialize what was not serialized by an earlier failed attempt.
  views.clear();
  taken.views(views);
  for (std::size_t i = row_ends.size(); i < views.size(); ++i) {
    append_row(row_text, views[i]);
    row_ends.push_back(row_text.size());
  }
  pending.clear();
  for (std::size_t i = 0, from = 0; i < views.size(); from = row_ends[i++]) {
    const UsageRecordView& r = views[i];
    const std::int64_t end_ms =
        r.timestamp_ms + static_cast<std::int64_t>(r.duration_ms > 0 ? r.duration_ms : 0);
    pending.push_back(
        {r.timestamp_ms, end_ms, std::string_view(row_text).substr(from, row_ends[i] - from)});
  }
  std::int64_t last = 0;
  try {
    last = log->append(pending);
  } catch (const std::exception& e) {
    ++commit_failures;
    auto now = Clock::now();
    if (commit_failures == 1 || now - last_commit_report >= kLogEvery) {
      log::line("error", "usage log: cannot commit {} records ({} attempts so far), retrying: {}",
                taken.size(), commit_failures, e.what());
      last_commit_report = now;
    }
    return false;
  }
  if (commit_failures > 0) {
    log::line("info", "usage log: committing again after {} failed attempts", commit_failures);
    commit_failures = 0;
  }
  auto n = static_cast<std::int64_t>(taken.size());
  depth->fetch_sub(n, std::memory_order_relaxed);
  logged.fetch_add(static_cast<std::uint64_t>(n), std::memory_order_relaxed);
  commits.fetch_add(1, std::memory_order_relaxed);
  head.store(last, std::memory_order_release);
  if (Clock::now() -
          Clock::time_point{Clock::duration{file_checked_rep.load(std::memory_order_relaxed)}} >=
      kFileCheckEvery) {
    check_file();
  }
  taken.clear();
  taken.trim(kKeepBytes);
  clear_rows();
  bool unread;
  {
    std::lock_guard lk(sinks_mu);
    unread = sinks.empty();
  }
  if (unread) prune_memory();  // nothing will read these (unless a reload adds a sink now)
  wake_sinks();
  return true;
}

void Pipeline::Impl::warn_settled(const char* what, const std::exception& e) {
  const auto now = Clock::now();
  if (settled_warned != Clock::time_point{} && now - settled_warned < kLogEvery) return;
  settled_warned = now;
  log::line("warn", "usage log: cannot {} the settled time: {}", what, e.what());
}

bool Pipeline::Impl::store_settled(std::int64_t ms, bool clean) {
  const std::int64_t wall = unix_ms_now();
  try {
    log->store_settled(ms, clean, wall);
  } catch (const std::exception& e) {
    warn_settled("store", e);
    return false;
  }
  settled_stored = ms;
  settled_stored_at = Clock::now();
  settled_held_back = wall - ms > kSettledLag;
  return true;
}

void Pipeline::Impl::track_settled() {
  if (!settles()) return;
  const auto now = Clock::now();
  if (!settled_opened) {
    try {
      settled_stored = log->open_settled(settled_opened_at);
      settled_opened = true;
    } catch (const std::exception& e) {
      warn_settled("read", e);
      return;  // again at the next turn (at least every kSettledEvery)
    }
  }
  if (!settled_candidate && now >= settled_next) {
    settled_next = now + kSettledEvery;
    // The time first, then the count: a request that started before the time ended before it
    // was taken, so its record was queued before the count was read.
    const std::int64_t ms = settled_source();
    std::lock_guard lk(mu);
    settled_candidate = SettledCandidate{ms, submitted};
  }
  const std::uint64_t done = logged.load(std::memory_order_relaxed);
  if (settled_candidate && done >= settled_candidate->queued) {
    // Stored when it moved and records came since (or the last value stored lagged the clock,
    // a request having held it back), else every kSettledIdleEvery: an idle gateway does not
    // write its log every second, and each store is also a heartbeat (how late a crash can
    // have been, for the span it loses).
    const bool idle_due = !settled_stored_at || now - *settled_stored_at >= kSettledIdleEvery;
    const bool moved = settled_candidate->ms > settled_stored;
    if (((moved && (done != settled_stored_logged || settled_held_back)) || idle_due) &&
        store_settled(std::max(settled_stored, settled_candidate->ms), false)) {
      settled_stored_logged = done;
    }
    settled_candidate.reset();
  }
}

bool Pipeline::Impl::retention_chunk(std::int64_t& deleted) {
  if (cfg.retention_days <= 0) return false;
  std::int64_t cutoff = unix_ms_now() - static_cast<std::int64_t>(cfg.retention_days) * 86'400'000;
  try {
    std::int64_t n = log->delete_records(min_cursor(true, true), cutoff, kRetentionChunk);
    deleted += n;
    if (n >= kRetentionChunk) return true;
    std::int64_t dl = log->delete_dead_letters(cutoff);
    if (deleted > 0 || dl > 0) {
      log::line("info",
                "usage log: retention ({} days) deleted {} records every enabled sink had "
                "received, and {} dead letters",
                cfg.retention_days, deleted, dl);
    }
  } catch (const std::exception& e) {
    log::line("error", "usage log: retention: {}", e.what());
  }
  return false;
}

void Pipeline::Impl::writer_loop() {
  // `backlog`: the queue as the writer last swapped it out, not yet taken into groups. Swapping
  // the whole queue costs the request path's lock nothing, however long the queue; the groups
  // are cut from it outside the lock. `taken`: the group being committed.
  PackedRecords backlog;
  PackedRecords taken;
  auto next_retention = Clock::now();  // once at start, then hourly
  bool retention_running = false;
  std::int64_t retention_deleted = 0;
  std::mt19937 rng(std::random_device{}());
  milliseconds backoff{10};
  // Whether the writer has already waited one commit window for records since its last group:
  // then what came meanwhile is committed at once (it is no older than the window).
  bool looked_again = false;
  for (;;) {
    track_settled();
    bool stopping = false;
    bool settle = false;   // woken to take or store the settled time
    std::size_t take = 0;  // records the next group may hold (0: none taken)
    if (taken.empty()) {
      std::unique_lock lk(mu);
      for (;;) {
        stopping = stop_requested.load(std::memory_order_acquire);
        auto deadline = stop_deadline();
        bool late = stopping && Clock::now() >= deadline;
        std::int64_t cap = capacity();
        if (backlog.empty() && !queue.empty() && cap > 0 && !stopping && queue.size() < kGroupMax &&
            !looked_again && Clock::now() < queue_since + cfg.commit_interval) {
          // Group commit: a transaction costs about as much as a hundred inserts, so gather
          // what arrives within the window (a kill -9 can lose at most this window).
          writer_cv.wait_until(lk, queue_since + cfg.commit_interval);
          continue;
        }
        if ((!backlog.empty() || !queue.empty()) && (cap > 0 || late)) {
          if (late && cap <= 0) break;  // durability: memory, full at the deadline: give up
          // The queue gets the backlog's empty buffer; a burst's capacity goes with the last
          // group into `taken`, which is trimmed after its commit.
          if (backlog.empty()) backlog.swap(queue);
          take = static_cast<std::size_t>(std::min<std::int64_t>(cap, kGroupMax));
          looked_again = false;
          break;
        }
        if (stopping) {
          if ((backlog.empty() && queue.empty()) || late) break;
          writer_cv.wait_until(lk, deadline);  // sinks make room (durability: memory)
          continue;
        }
        if (retention_running || Clock::now() >= next_retention) break;
        if (Clock::now() >= settled_due()) {
          settle = true;
          break;
        }
        if (!looked_again) {
          // Nothing queued, often because the request path could not run while this thread
          // committed (one core for both). Under load the next records come within moments:
          // look again after one window instead of having the request path wake this thread for
          // the first of them, which would cost it a system call and two switches per group.
          looked_again = true;
          writer_cv.wait_until(
              lk, std::min({Clock::now() + cfg.commit_interval, next_retention, settled_due()}));
          continue;
        }
        // A whole window brought nothing: sleep until submit() wakes the writer.
        writer_idle = true;
        writer_cv.wait_until(lk, std::min(next_retention, settled_due()));
        writer_idle = false;
        looked_again = false;
      }
    }
    if (settle) continue;
    if (take > 0) {
      // One group is at most kGroupMax records and kGroupBytes: the group is one SQLite value,
      // and a backlog taken whole after a stall could pass SQLite's 1 GB limit, which would fail
      // that commit on every retry.
      const std::size_t n = backlog.front_fitting(take, kGroupBytes);
      if (n == backlog.size()) {
        taken.swap(backlog);
      } else {
        backlog.move_front(n, taken);
      }
    }
    if (!taken.empty()) {
      if (commit(taken)) {
        backoff = milliseconds{10};
        continue;
      }
      // The file is locked by someone else, or the disk is full: keep the records (depth keeps
      // counting them) and try again; give up only at the stop deadline.
      std::unique_lock lk(mu);
      auto deadline = stop_deadline();
      if (stop_requested.load() && Clock::now() >= deadline) {
        std::size_t lost = taken.size() + backlog.size() + queue.size();
        depth->fetch_sub(static_cast<std::int64_t>(lost), std::memory_order_relaxed);
        dropped.fetch_add(lost, std::memory_order_relaxed);
        log::line("error",
                  "usage log: stopping with {} records that could not be committed (counted as "
                  "dropped)",
                  lost);
        taken.clear();
        backlog.clear();
        queue.clear();
        clear_rows();
        break;
      }
      auto wait = milliseconds(std::uniform_int_distribution<int>(
          static_cast<int>(backoff.count()) / 2, static_cast<int>(backoff.count()))(rng));
      backoff = std::min(backoff * 2, milliseconds{1000});
      auto until = Clock::now() + wait;
      if (stop_requested.load()) until = std::min(until, deadline);
      writer_cv.wait_until(lk, until);
      continue;
    }
    if (stopping) {
      std::lock_guard lk(mu);
      if (backlog.empty() && queue.empty() && settles()) {
        // Every record queued is committed and the workers have stopped: the source's last
        // value (a request the drain deadline abandoned holds it back) is final, and the stop
        // is clean (a start after one that was not says so to the ledger).
        if (settled_opened) {
          store_settled(std::max(settled_stored, settled_source()), !requests_lost.load());
        }
      }
      if (const std::size_t left = backlog.size() + queue.size(); left > 0) {
        depth->fetch_sub(static_cast<std::int64_t>(left), std::memory_order_relaxed);
        dropped.fetch_add(left, std::memory_order_relaxed);
        log::line("error",
                  "usage log: stopping with {} records not logged (durability: memory, the "
                  "sinks did not make room before the deadline; counted as dropped)",
                  left);
        backlog.clear();
        queue.clear();
      }
      break;
    }
    if (!retention_running) {
      retention_running = true;
      retention_deleted = 0;
      next_retention = Clock::now() + kRetentionPeriod;
    }
    retention_running = retention_chunk(retention_deleted);
  }
  {
    std::lock_guard lk(mu);
    writer_gone = true;
    // Records submitted after the writer left are counted as dropped by submit(); none can be
    // queued here, but keep depth exact regardless.
    if (!queue.empty()) {
      depth->fetch_sub(static_cast<std::int64_t>(queue.size()), std::memory_order_relaxed);
      dropped.fetch_add(queue.size(), std::memory_order_relaxed);
      queue.clear();
    }
  }
  writer_done.store(true, std::memory_order_release);
  wake_sinks();
}

// ---------------------------------------------------------------------------------------------
// Sinks

void Pipeline::Impl::prune_memory() {
  if (!memory) return;
  std::int64_t m = min_cursor();
  if (m > pruned.load(std::memory_order_relaxed)) {
    try {
      log->delete_records(m, std::nullopt, std::numeric_limits<int>::max());
      // Several sinks may prune at once: keep the highest.
      std::int64_t old = pruned.load(std::memory_order_relaxed);
      while (old < m && !pruned.compare_exchange_weak(old, m)) {
      }
    } catch (const std::exception& e) {
      log::line("error", "usage log: {}", e.what());
    }
  }
  wake_writer();  // it may be waiting for room
}

void Pipeline::Impl::persist_cursor(Sink& s) {
  std::int64_t c = s.cursor.load(std::memory_order_relaxed);
  if (c == s.persisted.load()) return;
  try {
    s.log->set_cursor(s.cfg.name, c, unix_ms_now());
    s.persisted.store(c, std::memory_order_release);
    s.persisted_at = Clock::now();
  } catch (const std::exception& e) {
    // Delivered but not yet recorded as such: retried with the next delivery or at exit; if the
    // process dies first, these records are delivered again (receivers de-duplicate).
    const auto now = Clock::now();
    if (s.last_cursor_warning == Clock::time_point{} || now - s.last_cursor_warning >= kLogEvery) {
      s.last_cursor_warning = now;
      log::line("warn", "usage sink {}: cannot store the cursor ({}), will retry: {}", s.cfg.name,
                c, e.what());
    }
  }
}

void Pipeline::Impl::report_failure(Sink& s, std::size_t records, const std::string& why) {
  ++s.consecutive_failures;
  ++s.unreported;
  auto now = Clock::now();
  if (s.consecutive_failures == 1 || now - s.last_report >= kLogEvery) {
    std::int64_t backlog = head.load() - s.cursor.load();
    log::line("warn",
              "usage sink {}: POST of {} record{} failed: {} ({} failed attempt{} since the last "
              "report, backlog {}); retrying",
              s.cfg.name, records, records == 1 ? "" : "s", why, s.unreported,
              s.unreported == 1 ? "" : "s", backlog);
    s.unreported = 0;
    s.last_report = now;
  }
}

void Pipeline::Impl::sink_loop(Sink& s) {
  const int batch_size = std::max(1, s.cfg.batch_size);
  // Records per POST now: batch_size, halved by each 413 a batch gets (a receiver's body limit),
  // doubled back by each success.
  int batch_cap = batch_size;
  bool told_too_large = false;
  // The smallest batch a 413 refused, and when: batches grow back below it only (doubling up to
  // it would have every other POST refused), until kForgetTooLarge has passed (the receiver's
  // limit may have been raised).
  int refused_size = 0;
  Clock::time_point refused_at{};
  const auto remember_refused = [&](int size) {
    refused_size = refused_size > 0 ? std::min(refused_size, size) : size;
    refused_at = Clock::now();
  };
  // Finding the record a 4xx refused (400, 422) by halves: `splitting` from the first refused
  // batch until a single record is refused; `split_delivered` if any POST since was taken. A
  // split that ends without one means the receiver refuses everything (a schema it no longer
  // accepts): until its next 2xx, `refuses_all` dead-letters batches whole instead of sending
  // each record alone.
  bool splitting = false, split_delivered = false, refuses_all = false;
  int unanswered = 0;   // POSTs of the batch in flight sent whole and not answered in time
  LoggedRecords batch;  // in flight: resent unchanged until it is done
  std::string body;
  std::string key;
  std::optional<DeadLetterRow> unsaved_dead;  // rejected, not yet stored (the log was busy)
  std::mt19937_64 rng(std::random_device{}());
  std::vector<std::pair<std::string, std::string>> headers;

  // Waits until `until` or stop; false when stop() interrupted the wait.
  auto pause = [&](Clock::time_point until) {
    std::unique_lock lk(sink_mu);
    return !sink_cv.wait_until(lk, until, [&] { return stop_requested.load() || s.retire.load(); });
  };

  for (;;) {
    if (unsaved_dead) {
      try {
        s.log->dead_letter(*unsaved_dead);
        s.persisted.store(unsaved_dead->last_seq, std::memory_order_release);
        s.cursor.store(unsaved_dead->last_seq, std::memory_order_release);
        unsaved_dead.reset();
        prune_memory();
      } catch (const std::exception& e) {
        log::line("error", "usage sink {}: cannot store a dead letter, will retry: {}", s.cfg.name,
                  e.what());
        if (!pause(Clock::now() + milliseconds(500))) break;
        continue;
      }
    }
    if (batch.empty()) {
      // Wait for records (and, in batch mode, for a batch to fill or batch_interval to pass).
      std::optional<Clock::time_point> fill_until;
      bool done = false;
      bool stored = false;  // the cursor was stored (or tried) before this wait
      {
        std::unique_lock lk(sink_mu);
        for (;;) {
          if (s.retire.load(std::memory_order_acquire)) {
            done = true;
            break;
          }
          bool stopping = stop_requested.load(std::memory_order_acquire);
          std::int64_t avail = head.load(std::memory_order_acquire) - s.cursor.load();
          if (stopping) {
            auto dl = stop_deadline();
            if (Clock::now() >= dl) {
              done = true;
              break;
            }
            if (avail > 0) break;  // deliver what there is, no batch wait
            if (writer_done.load(std::memory_order_acquire)) {
              done = true;  // drained and delivered
              break;
            }
            sink_cv.wait_until(lk, dl);
            continue;
          }
          if (avail >= batch_cap) break;
          if (!stored && s.cursor.load() != s.persisted.load()) {
            // About to wait: the cursor is stored first (deliveries that need no wait store it
            // at most every kCursorEvery).
            stored = true;
            lk.unlock();
            persist_cursor(s);
            prune_memory();
            lk.lock();
            continue;
          }
          if (avail > 0) {
            if (!fill_until) fill_until = Clock::now() + s.cfg.batch_interval;
            if (Clock::now() >= *fill_until) break;
            sink_cv.wait_until(lk, *fill_until);
            continue;
          }
          sink_cv.wait(lk);
        }
      }
      if (done) break;
      try {
        std::int64_t head_seen = head.load(std::memory_order_acquire);
        s.log->read_after(s.cursor.load(), batch_cap, batch, kMaxBatchBytes);
        if (batch.empty()) {
          // Nothing after the cursor although head is beyond it: the records are gone. Deleted
          // outside of the pipeline: skip to what was the head. Never deleted: the file lost
          // them, damage like any other.
          if (const std::int64_t deleted = s.log->deleted_through(); deleted < head_seen) {
            s.log->missing(std::max(s.cursor.load(), deleted) + 1, head_seen);
          }
          log::line("warn", "usage sink {}: records {}..{} are missing from the log, skipped",
                    s.cfg.name, s.cursor.load() + 1, head_seen);
          s.cursor.store(head_seen);
          persist_cursor(s);
          continue;
        }
      } catch (const std::exception& e) {
        batch.clear();
        // Retried every 500 ms (a lock held by someone else passes), reported at most once per
        // kLogEvery. A damaged file does not heal: delivery waits at the damage, every record
        // kept, until an operator repairs or replaces the file (LLMProxyUsageSinkStalled fires).
        auto now = Clock::now();
        const auto* se = dynamic_cast<const SqliteError*>(&e);
        const bool damaged = se != nullptr && se->damaged();
        (damaged ? s.reads_damaged : s.reads_failed).fetch_add(1, std::memory_order_relaxed);
        if (s.last_read_report == Clock::time_point{} || now - s.last_read_report >= kLogEvery) {
          if (damaged) {
            log::line("error",
                      "usage sink {}: the usage log file is damaged: the records after seq {} "
                      "cannot be read, and this sink's delivery waits there until the file is "
                      "repaired or replaced: {}",
                      s.cfg.name, s.cursor.load(), e.what());
          } else {
            log::line("error", "usage sink {}: cannot read the log: {}", s.cfg.name, e.what());
          }
          s.last_read_report = now;
        }
        if (!pause(now + milliseconds(500))) break;
        continue;
      }
      body.clear();
      if (batch_size == 1) {
        body = batch.json;
        key = batch.request_id(0);
      } else {
        body.reserve(batch.json.size() + 2);
        body += '[';
        body += batch.json;  // the records joined by ','
        body += ']';
        key = fmt::format("{}+{}", batch.request_id(0), batch.size());
      }
    }

    // One attempt.
    if (s.retire.load(std::memory_order_acquire)) break;  // its successor resumes at the cursor
    auto timeout = s.cfg.timeout;
    if (stop_requested.load(std::memory_order_acquire)) {
      auto left = std::chrono::duration_cast<milliseconds>(stop_deadline() - Clock::now());
      if (left <= milliseconds::zero()) break;
      timeout = std::min(timeout, left);
    }
    headers.clear();
    headers.emplace_back("Content-Type", "application/json");
    headers.emplace_back("User-Agent", "llmproxy/" LLMPROXY_VERSION);
    headers.emplace_back("Idempotency-Key", key);
    for (const auto& h : s.cfg.headers) headers.push_back(h);
    if (!s.cfg.secret.empty()) {
      std::string ts = std::to_string(unix_ms_now() / 1000);
      std::string signed_text;
      signed_text.reserve(ts.size() + 1 + body.size());
      signed_text += ts;
      signed_text += '.';
      signed_text += body;
      headers.emplace_back("X-LLMProxy-Timestamp", ts);
      headers.emplace_back("X-LLMProxy-Signature",
                           "sha256=" + hmac_sha256_hex(s.cfg.secret, signed_text));
    }
    WebhookResponse resp = s.client->post(body, headers, timeout);
    unanswered = resp.unanswered ? unanswered + 1 : 0;  // consecutive, of the batch in flight
    // Cut by a reload or the shutdown: not the receiver failing. The records stay in the log.
    if (resp.cut) break;
    const std::size_t n = batch.size();
    if (resp.status >= 200 && resp.status < 300) {
      if (s.consecutive_failures > 0) {
        log::line("info", "usage sink {}: delivering again after {} failed attempt{}", s.cfg.name,
                  s.consecutive_failures, s.consecutive_failures == 1 ? "" : "s");
        s.consecutive_failures = 0;
        s.unreported = 0;
      }
      std::int64_t now_ms = unix_ms_now();
      {
        std::lock_guard lk(s.latency_mu);
        for (const auto& r : batch.entries) {
          s.latency.observe(static_cast<double>(std::max<std::int64_t>(0, now_ms - r.end_ms)),
                            metrics::kLatencyBoundsMs);
        }
      }
      s.cursor.store(batch.entries.back().seq, std::memory_order_release);
      s.delivered.fetch_add(n, std::memory_order_relaxed);
      batch.clear();
      split_delivered = true;
      refuses_all = false;
      if (refused_size > 0 && Clock::now() - refused_at >= kForgetTooLarge) refused_size = 0;
      batch_cap = std::min(batch_size, batch_cap * 2);
      if (refused_size > 0) batch_cap = std::min(batch_cap, std::max(1, refused_size / 2));
      // At most every kCursorEvery (and before the next wait for records, below); with
      // durability: memory at once: no disk, and pruning keeps memory_max_records true.
      if (memory || Clock::now() - s.persisted_at >= kCursorEvery) {
        persist_cursor(s);
        prune_memory();
      }
      continue;
    }
    if (resp.status == 413 && n > 1) {
      // Too large for the receiver, not wrong: the same records again in smaller batches. Only
      // a single record it refuses becomes a dead letter. The POST failed all the same.
      s.failed.fetch_add(n, std::memory_order_relaxed);
      batch_cap = static_cast<int>(n / 2);
      remember_refused(static_cast<int>(n));
      if (!told_too_large) {
        told_too_large = true;
        log::line("warn",
                  "usage sink {}: receiver refused a batch of {} records as too large (HTTP "
                  "413); sending smaller batches (halved at each 413, doubled back at each "
                  "success up to half the smallest size refused in the last {} min; not "
                  "reported again)",
                  s.cfg.name, n,
                  std::chrono::duration_cast<std::chrono::minutes>(kForgetTooLarge).count());
      }
      batch.clear();
      continue;
    }
    if (permanent_rejection(resp.status) && n > 1 && !rejects_the_endpoint(resp.status) &&
        !refuses_all) {
      // A batch refused for what is in it (400, 422): one bad record must not take the others
      // with it. The same records again in halves, as after a 413, until the ones refused on
      // their own are found; those alone become dead letters.
      s.failed.fetch_add(n, std::memory_order_relaxed);
      if (!splitting) {
        splitting = true;
        split_delivered = false;
      }
      batch_cap = static_cast<int>(n / 2);
      batch.clear();
      continue;
    }
    if (permanent_rejection(resp.status)) {
      if (n == 1 && splitting) {
        // The split found its record. Nothing taken since it began: the receiver refuses every
        // record, so the next batches go whole (and whole into the dead letters).
        splitting = false;
        if (!split_delivered) {
          refuses_all = true;
          batch_cap = batch_size;
        }
      }
      if (n == 1 && resp.status == 413) refused_size = 0;  // that record, not the batches
      DeadLetterRow row;
      row.sink = s.cfg.name;
      row.first_seq = batch.entries.front().seq;
      row.last_seq = batch.entries.back().seq;
      for (std::size_t i = 0; i < n; ++i) {
        if (i) row.request_ids += ',';
        row.request_ids += batch.request_id(i);
      }
      row.status = resp.status;
      row.response = std::move(resp.body);
      row.at_ms = unix_ms_now();
      row.body = body;
      // The cursor moves past them with the dead letter stored (the top of the loop), not
      // before: until then they are still held against pruning and retention, and counted in
      // the backlog.
      s.dead_letters.fetch_add(n, std::memory_order_relaxed);
      // The receiver answered, so the failures before are over: a next failure starts afresh,
      // with quick retries, and is reported as a new outage.
      s.consecutive_failures = 0;
      ++s.dead_unreported;
      auto now = Clock::now();
      // The first rejection, then at most one report per kLogEvery: a receiver that rejects
      // everything (a wrong secret: 401) must not log a line per request.
      if (s.last_dead_report == Clock::time_point{} || now - s.last_dead_report >= kLogEvery) {
        log::line("error",
                  "usage sink {}: receiver rejected {} record{} with HTTP {} (first {}); {} "
                  "dead letter, not retried ({} rejected POSTs since the last report)",
                  s.cfg.name, n, n == 1 ? "" : "s", resp.status, batch.request_id(0),
                  memory ? "counted as" : "stored as", s.dead_unreported);
        s.dead_unreported = 0;
        s.last_dead_report = now;
      }
      batch.clear();
      unsaved_dead = std::move(row);  // stored (with the cursor) at the top of the loop
      continue;
    }
    s.failed.fetch_add(n, std::memory_order_relaxed);
    report_failure(s, n, resp.status ? fmt::format("HTTP {}", resp.status) : resp.error);
    // A body that could not all be sent within `timeout`, or was sent whole kUnansweredToHalve
    // times and never answered in time: perhaps too large for the receiver to take in time.
    // The next attempt sends half and, as after a 413, batches grow back only to half this size
    // for a while. A body sent whole and not answered goes again unchanged first: the receiver
    // may have taken it, and must see the same Idempotency-Key (one that took it answers the
    // retry from what it stored); halving changes the key.
    if (n > 1 && (resp.slow || unanswered >= kUnansweredToHalve)) {
      unanswered = 0;
      batch_cap = static_cast<int>(n / 2);
      remember_refused(static_cast<int>(n));
      batch.clear();
    }
    if (stop_requested.load(std::memory_order_acquire) || s.retire.load()) {
      break;  // the records stay in the log
    }
    auto k = s.consecutive_failures;
    auto cap = std::min<std::int64_t>(s.cfg.max_backoff.count(),
                                      kFirstBackoff.count() << std::min<std::uint64_t>(k - 1, 20));
    cap = std::max<std::int64_t>(cap, 1);
    std::int64_t lo = k <= static_cast<std::uint64_t>(std::max(0, s.cfg.retry)) ? 0 : cap / 2;
    auto wait = milliseconds(std::uniform_int_distribution<std::int64_t>(lo, cap)(rng));
    // A receiver that says when to come back (429, 503) is not asked before, up to max_backoff.
    if (resp.retry_after_s > 0) {
      wait = std::max(wait, std::min<milliseconds>(std::chrono::seconds(resp.retry_after_s),
                                                   s.cfg.max_backoff));
    }
    // A backoff is a wait too: what was delivered before the failure is stored first (nothing
    // when it is stored already), so an outage never leaves a delivered cursor only in memory.
    persist_cursor(s);
    if (!pause(Clock::now() + wait)) break;
  }
  if (unsaved_dead) {
    try {
      s.log->dead_letter(*unsaved_dead);
      s.persisted.store(unsaved_dead->last_seq, std::memory_order_release);
      s.cursor.store(unsaved_dead->last_seq, std::memory_order_release);
    } catch (const std::exception& e) {
      // Neither delivered nor stored: the cursor stays before them, so that the next start (or
      // a reload's successor) sends them again and stores the rejection then.
      log::line("error",
                "usage sink {}: dead letter for records {}..{} not stored ({}); they will be "
                "sent again",
                s.cfg.name, unsaved_dead->first_seq, unsaved_dead->last_seq, e.what());
    }
  }
  persist_cursor(s);
  s.client->close();
}

// ---------------------------------------------------------------------------------------------
// Pipeline

Pipeline::Pipeline(const config::UsageConfig& usage, std::vector<config::SinkConfig> sinks)
    : impl_(std::make_unique<Impl>()) {
  soft_limit_ = std::max(1, usage.queue_size);
  reject_on_backlog_ = usage.on_backlog == config::OnBacklog::reject;
  auto& im = *impl_;
  im.cfg = usage;
  im.cfg.sinks.clear();
  im.cfg_log_path = usage.log_path;
  im.depth = &depth_;
  im.memory = usage.durability == config::Durability::memory;
  im.log = std::make_unique<UsageLog>(im.memory ? UsageLog::Mode::memory : UsageLog::Mode::disk,
                                      usage.log_path, true);
  std::int64_t head = im.log->head();
  im.head.store(head);
  std::string summary;
  std::erase_if(sinks, [](const config::SinkConfig& c) { return !c.enabled; });
  check_sinks(sinks);
  for (auto& cfg : sinks) im.sinks.push_back(im.make_sink(std::move(cfg), head, summary));
  im.store_new_cursors(im.sinks);
  im.pruned.store(0);
  log::line("info", "usage log {} opened ({}, head seq {}); {}", im.log->path(),
            im.memory ? "durability: memory" : "durability: disk, WAL", head,
            im.sinks.empty() ? std::string("no webhook sinks") : "sinks: " + summary);
}

// A sink's thread state, its cursor read from the log (or created: at `head`, or at the start with
// replay). Throws std::runtime_error for an invalid sink.
std::unique_ptr<Sink> Pipeline::Impl::make_sink(config::SinkConfig cfg, std::int64_t head,
                                                std::string& summary) {
  auto s = std::make_unique<Sink>();
  std::string why;
  auto url = config::parse_url(cfg.url, &why, true);
  if (!url) throw std::runtime_error("usage sink " + cfg.name + ": " + why);
  s->url = *url;
  s->client = std::make_unique<WebhookClient>(s->url, config::origin_form(cfg.url).value_or("/"),
                                              s->cut_at);
  if (memory) {
    s->log = log.get();
  } else {
    s->own_log = std::make_unique<UsageLog>(UsageLog::Mode::disk, cfg_log_path, false);
    s->log = s->own_log.get();
  }
  auto c = s->log->cursor(cfg.name);
  const bool stored = c.has_value();
  std::string origin = "stored cursor";
  if (!c) {
    // New to this log: from its head, or from the beginning with replay. Stored before the sink
    // starts, so that a restart before its first delivery does not skip what arrived in
    // between; and only when the whole start or reload succeeds (store_new_cursors()), so that
    // a reload rolled back leaves no cursor for a sink that never ran.
    c = cfg.replay ? 0 : head;
    origin = cfg.replay ? "new, replaying the log" : "new, starting at the head";
    s->cursor_unstored = true;
  }
  if (*c > head) {
    // Past the head: the file lost records this sink had (a repair, an older copy put back).
    // New records get seqs from head + 1 on, so the sink must resume at the head to send them.
    log::line("warn",
              "usage sink {}: its cursor (seq {}) is past the log's head (seq {}): the log lost "
              "records this sink had delivered; it resumes at the head",
              cfg.name, *c, head);
    c = head;
    s->cursor_unstored = true;
  }
  // Records after the cursor that were deleted (retention, or by hand, while this sink was not
  // configured): the cursor moves past them, so the backlog counts only what the sink will
  // deliver; said once for a sink that had a cursor (a new one replaying never had them).
  // Records missing that no delete took stay ahead of it: the sink stops there as at damage.
  const std::int64_t first = s->log->first_seq().value_or(head + 1);
  const std::int64_t deleted = std::min({first - 1, head, s->log->deleted_through()});
  if (*c < deleted) {
    if (stored) {
      log::line("warn",
                "usage sink {}: records {}..{} are no longer in the log (retention, pruning, or "
                "deleted by hand) and were not delivered by this sink; it resumes after seq {}",
                cfg.name, *c + 1, deleted, deleted);
    }
    c = deleted;
    s->cursor_unstored = true;
  }
  s->cursor.store(*c);
  s->persisted.store(*c, std::memory_order_release);
  summary +=
      fmt::format("{}{} -> {} (seq {}, {}, backlog {})", summary.empty() ? "" : "; ", cfg.name,
                  config::redact_query(cfg.url), *c, origin, std::max<std::int64_t>(0, head - *c));
  s->cfg = std::move(cfg);
  return s;
}

Pipeline::~Pipeline() {
  bool running;
  {
    std::lock_guard lk(impl_->lifecycle_mu);
    running = !impl_->stopped;
  }
  if (running) stop(Clock::now());
}

void Pipeline::start() {
  auto& im = *impl_;
  std::lock_guard life(im.lifecycle_mu);
  if (im.started || im.stopped) return;
  im.started = true;
  // Done by the writer (track_settled), which retries it until the log lets it.
  im.settled_opened_at = unix_ms_now();
  im.writer = std::thread([&im] {
    log::name_thread("usage-writer");
    im.writer_loop();
  });
  for (auto& s : im.sinks) im.start_sink(*s);
}

namespace {

bool same_sink(const config::SinkConfig& a, const config::SinkConfig& b) {
  return a.name == b.name && a.url == b.url && a.timeout == b.timeout && a.retry == b.retry &&
         a.max_backoff == b.max_backoff && a.batch_size == b.batch_size &&
         a.batch_interval == b.batch_interval && a.headers == b.headers && a.secret == b.secret &&
         a.replay == b.replay;
}

}  // namespace

std::string Pipeline::reconfigure(std::vector<config::SinkConfig> wanted) {
  auto& im = *impl_;
  std::lock_guard life(im.lifecycle_mu);
  if (im.stopped) throw std::runtime_error("the usage pipeline is stopping");
  std::erase_if(wanted, [](const config::SinkConfig& c) { return !c.enabled; });
  check_sinks(wanted);  // before touching anything: a bad sink changes nothing
  auto find_wanted = [&](const std::string& name) -> const config::SinkConfig* {
    for (const auto& c : wanted) {
      if (c.name == name) return &c;
    }
    return nullptr;
  };
  // Stop the sinks that go away or change: each cuts the POST it is in (the reload runs on the
  // thread that also runs health checks and signals: it must not wait out a receiver's timeout)
  // and stores its cursor. A cut POST may have reached the receiver: the successor sends it
  // again, which receivers de-duplicate.
  std::vector<Sink*> leaving;
  for (auto& s : im.sinks) {
    const auto* w = find_wanted(s->cfg.name);
    if (!w || !same_sink(*w, s->cfg)) {
      s->cut_at.store(Clock::now().time_since_epoch().count(), std::memory_order_release);
      s->retire.store(true, std::memory_order_release);
      leaving.push_back(s.get());
    }
  }
  im.wake_sinks();
  for (Sink* s : leaving) {
    if (s->thread.joinable()) s->thread.join();
  }
  // Make the new and changed ones while the stopped ones are still in the set: their cursors keep
  // holding records (durability: memory prunes, retention deletes) until their successors hold
  // them. A changed sink keeps its counters and resumes at its cursor.
  std::string summary, removed;
  // The hold is stored before the head the new sinks start at is read: a prune under way that
  // missed it read the head earlier, so it deletes nothing a sink starting at the head needs
  // (both seq_cst). One starting below (replay, or a cursor stored earlier) may miss what that
  // one prune takes: with durability: memory those records had been delivered to every sink
  // running. Lifted once they are in the set, or on any way out of here.
  im.reload_hold.store(true);
  struct LiftHold {
    std::atomic<bool>& hold;
    ~LiftHold() { hold.store(false); }
  } lift_hold{im.reload_hold};
  const std::int64_t head = im.head.load();
  std::vector<std::unique_ptr<Sink>> fresh;
  // All or nothing: on a failure the sinks stopped for this reload run again as they were (a
  // sink left stopped would neither deliver nor hold its records against retention), no new
  // cursor is stored, and the reload fails, keeping the running configuration.
  auto roll_back = [&] {
    for (Sink* s : leaving) {
      s->retire.store(false, std::memory_order_release);
      s->cut_at.store(0, std::memory_order_release);
      s->replaced = false;
      if (im.started) im.start_sink(*s);
    }
  };
  for (auto& cfg : wanted) {
    bool running = false;
    for (const auto& s : im.sinks) running = running || (s->cfg.name == cfg.name && !s->retire);
    if (running) continue;
    try {
      fresh.push_back(im.make_sink(cfg, head, summary));
    } catch (const std::exception& e) {
      roll_back();
      throw std::runtime_error("usage sink " + cfg.name + ": cannot start: " + e.what());
    }
    for (Sink* old : leaving) {
      if (old->cfg.name != cfg.name) continue;
      Sink& s = *fresh.back();
      s.delivered.store(old->delivered.load());
      s.failed.store(old->failed.load());
      s.dead_letters.store(old->dead_letters.load());
      s.reads_damaged.store(old->reads_damaged.load());
      s.reads_failed.store(old->reads_failed.load());
      s.latency = old->latency;
      old->replaced = true;
    }
  }
  try {
    im.store_new_cursors(fresh);
  } catch (const std::exception& e) {
    roll_back();
    throw std::runtime_error(std::string("usage sinks: cannot store their cursors: ") + e.what());
  }
  std::vector<Sink*> starting;
  std::vector<std::unique_ptr<Sink>> kept, gone;
  {
    std::lock_guard lk(im.sinks_mu);
    for (auto& s : im.sinks) (s->retire.load() ? gone : kept).push_back(std::move(s));
    for (auto& s : fresh) {
      starting.push_back(s.get());
      kept.push_back(std::move(s));
    }
    im.sinks = std::move(kept);
    // In the same step: a scrape sees a removed sink's counts either in it or in the totals of
    // removed sinks, never in neither (the webhook counters would seem to reset).
    for (const auto& old : gone) {
      if (old->replaced) continue;
      im.removed_delivered += old->delivered.load();
      im.removed_failed += old->failed.load() + old->dead_letters.load();
    }
    im.reload_hold.store(false);  // the new sinks' cursors hold their records now
  }
  if (im.started) {
    for (Sink* s : starting) im.start_sink(*s);
  }
  // A removed sink no longer holds records: with durability: memory they are freed now, and a
  // writer that waited for room (no other sink would wake it) takes the queue again.
  im.prune_memory();
  for (auto& old : gone) {
    if (!old->replaced) removed += (removed.empty() ? "" : ", ") + old->cfg.name;
  }
  std::string out;
  if (!summary.empty()) out += "started " + summary;
  if (!removed.empty()) out += (out.empty() ? "removed " : "; removed ") + removed;
  return out;
}

void Pipeline::stop(std::chrono::steady_clock::time_point deadline) {
  auto& im = *impl_;
  std::lock_guard life(im.lifecycle_mu);
  if (im.stopped) return;
  im.stopped = true;
  {
    std::lock_guard lk(im.mu);
    im.deadline_rep.store(deadline.time_since_epoch().count(), std::memory_order_release);
    for (auto& s : im.sinks) {
      s->cut_at.store(deadline.time_since_epoch().count(), std::memory_order_release);
    }
    im.stop_requested.store(true, std::memory_order_release);
  }
  im.writer_cv.notify_all();
  im.wake_sinks();
  if (im.started) {
    im.writer.join();
  } else {
    im.writer_loop();  // never started: still commit what was submitted
  }
  for (auto& s : im.sinks) {
    if (s->thread.joinable()) s->thread.join();
  }
  std::string state;
  for (const auto& s : im.sinks) {
    state += fmt::format(", sink {}: {} delivered, backlog {}", s->cfg.name, s->delivered.load(),
                         std::max<std::int64_t>(0, im.head.load() - s->cursor.load()));
  }
  log::line("info", "usage pipeline stopped: {} records logged{}", im.logged.load(), state);
}

void Pipeline::set_settled_source(std::function<std::int64_t()> source) {
  impl_->settled_source = std::move(source);
}

void Pipeline::note_requests_lost() {
  impl_->requests_lost.store(true);
}

bool Pipeline::submit(const UsageRecordView& record) {
  auto& im = *impl_;
  std::unique_lock lk(im.mu);
  if (im.writer_gone ||
      (!reject_on_backlog_ && depth_.load(std::memory_order_relaxed) >= soft_limit_)) {
    lk.unlock();
    im.dropped.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  im.queue.push(record);
  ++im.submitted;
  const bool first = im.queue.size() == 1;
  if (first) im.queue_since = Clock::now();
  // An idle writer is woken by the first record and waits out the commit window from there;
  // otherwise it is already on a timer. A full group is committed at once.
  const bool wake = (first && im.writer_idle) || im.queue.size() == kGroupMax;
  depth_.fetch_add(1, std::memory_order_relaxed);
  lk.unlock();
  if (wake) im.writer_cv.notify_one();
  return true;
}

metrics::UsageStats Pipeline::stats() const {
  const auto& im = *impl_;
  metrics::UsageStats st;
  st.enabled = im.cfg.enabled;
  st.queue_depth = depth_.load(std::memory_order_relaxed);
  st.logged = im.logged.load(std::memory_order_relaxed);
  st.dropped = im.dropped.load(std::memory_order_relaxed);
  st.commits = im.commits.load(std::memory_order_relaxed);
  im.check_file();
  st.log_file_lost = im.file_lost.load(std::memory_order_relaxed);
  std::int64_t head = im.head.load(std::memory_order_acquire);
  std::lock_guard lk(im.sinks_mu);
  st.removed_delivered = im.removed_delivered;
  st.removed_failed = im.removed_failed;
  for (const auto& s : im.sinks) {
    metrics::SinkStats ss;
    ss.name = s->cfg.name;
    ss.delivered = s->delivered.load(std::memory_order_relaxed);
    ss.failed = s->failed.load(std::memory_order_relaxed);
    ss.dead_letters = s->dead_letters.load(std::memory_order_relaxed);
    ss.reads_damaged = s->reads_damaged.load(std::memory_order_relaxed);
    ss.reads_failed = s->reads_failed.load(std::memory_order_relaxed);
    ss.backlog = std::max<std::int64_t>(0, head - s->cursor.load(std::memory_order_acquire));
    {
      std::lock_guard lk(s->latency_mu);
      ss.delivery_latency = s->latency;
    }
    st.sinks.push_back(std::move(ss));
  }
  return st;
}

}  // namespace llmproxy::usage
