// The usage pipeline: from the request path to every sink, without losing a record.
//
//   request path --submit()--> bounded queue --writer thread--> usage log (SQLite, WAL)
//                                                                  |  one cursor per sink
//                                                sink threads <----+  (advance only on success)
//
// The request path only copies a record into an in-memory queue (PackedRecords: its bytes appended
// to a buffer, a mutex held for that).
// A writer thread takes everything queued and commits it in one transaction (group commit), so
// a record is durable within one commit of the request ending. Each sink reads the log in order
// from its own cursor, POSTs, and moves the cursor only after a 2xx: outages, restarts and
// kill -9 lose nothing that was committed. With durability: memory the log lives in memory
// (fast, no disk), and what was not yet delivered is lost on exit.
//
// Bounds: `queue_size` records may wait for the writer. When the queue holds that many,
// accepting() turns false (usage.on_backlog: reject -> the server answers new requests 503)
// but submit() still takes records of requests already in flight, so none is dropped; the queue
// is then bounded by queue_size + the connections in flight. With on_backlog: serve, records
// over the bound are dropped and counted.
//
// depth_ counts records submitted and not yet committed (queued, or taken by the writer and
// waiting for a commit that cannot happen right now, e.g. a lock held on the file), so a writer
// that stalls turns accepting() false as much as a slow one does.
//
// Sinks: every SinkConfig with enabled == true gets a thread and a cursor named after it;
// disabled ones are ignored (so callers may pass usage_hook as configured). See pipeline.cpp
// for the delivery rules (headers, signature, batching, retries, dead letters).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "metrics/metrics.h"
#include "usage/record.h"

namespace llmproxy::usage {

class UsageLog;
class Sink;

class Pipeline {
 public:
  // Opens (creates) the log and reads each sink's cursor; throws std::runtime_error with a
  // clear message when the log cannot be opened.
  Pipeline(const config::UsageConfig& usage, std::vector<config::SinkConfig> sinks);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  void start();
  // Drains the queue into the log, gives sinks until `deadline` to deliver what they can,
  // then stops every thread. Undelivered records stay in the log (disk) for the next start.
  void stop(std::chrono::steady_clock::time_point deadline);

  // Hot reload: a sink with the same name and settings keeps running; a removed or changed one
  // finishes the POST it is in and stops (its cursor stays in the log); an added one starts at
  // its stored cursor or, new to the log, at the head (at the start with replay); a changed one
  // resumes at its cursor with its counters. Throws std::runtime_error, changing nothing, when
  // a sink is invalid. Returns a summary for the log ("" when nothing changed).
  std::string reconfigure(std::vector<config::SinkConfig> sinks);

  // Before start(): where the writer learns the settled time (Unix ms), a time before which
  // every request has ended and submitted its record (the gateway: the oldest start among the
  // requests its workers serve). About every second the writer takes it and, once every record
  // queued by then is committed, stores it in the log for the ledger (UsageLog::store_settled),
  // and once more at the stop, marked clean unless note_requests_lost() was called. Called on
  // the writer's thread.
  void set_settled_source(std::function<std::int64_t()> source);
  // Before stop(): requests ended without a record (the gateway stopped before they could end):
  // the stop is stored as not clean, and the next start keeps the span as a gap.
  void note_requests_lost();

  // False while the queue is at its bound and on_backlog is reject: refuse new requests.
  bool accepting() const noexcept {
    return !reject_on_backlog_ || depth_.load(std::memory_order_relaxed) < soft_limit_;
  }
  // Never blocks on I/O: copies the record's bytes into the queue (the record's endpoint,
  // finish and usage_source views are read here and not kept). Returns false only when the
  // record was dropped (on_backlog: serve, queue full), which is counted.
  bool submit(const UsageRecordView& record);
  bool submit(const UsageRecord& record) { return submit(view_of(record)); }

  // For /metrics (called off the request path).
  metrics::UsageStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<std::int64_t> depth_{0};
  std::int64_t soft_limit_ = 0;
  bool reject_on_backlog_ = true;
};

}  // namespace llmproxy::usage
