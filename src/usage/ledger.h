// The ledger: what `llmproxy usage` reports from the usage log.
//
// Queries run on a read-only connection to the log file (WAL lets them run while the gateway
// writes), so an operator can ask "who used what" at any time without stopping anything. The
// totals are SQL aggregates over the records table; the formatting (table, json, csv) lives here
// too so that main.cpp stays a thin argument parser and the output can be unit tested.
// Records deleted by retention are no longer counted: the ledger covers usage.retention_days, and
// says when a window reaches back to records that deletes took.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "usage/usage_log.h"

namespace llmproxy::usage {

enum class GroupKey { user, model, api_key, backend, endpoint, finish, day };

// user (or user_id), model, api_key (or key), backend, endpoint, finish, day (UTC date).
std::optional<GroupKey> parse_group_key(std::string_view name);
std::string_view group_key_name(GroupKey key);

struct LedgerQuery {
  std::vector<GroupKey> group_by;        // empty: one row with the grand total
  std::optional<std::int64_t> since_ms;  // record timestamp >= since (Unix ms)
  std::optional<std::int64_t> until_ms;  // record timestamp < until
};

struct LedgerRow {
  std::vector<std::string> keys;  // one per group_by entry, in order
  std::int64_t requests = 0;
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t total_tokens = 0;
};

class Ledger {
 public:
  // Opens the log read-only; throws std::runtime_error ("no such file", "not a usage log", ...).
  explicit Ledger(const std::string& path);
  ~Ledger();

  // Rows sorted by their keys.
  std::vector<LedgerRow> totals(const LedgerQuery& query);
  // After totals(): what deletes (retention, or SQL by hand) took from that window, as a
  // sentence for the operator, or none when the window starts after every deleted record.
  const std::optional<std::string>& incomplete() const { return incomplete_; }
  std::vector<DeadLetterRow> dead_letters(std::optional<std::int64_t> since_ms,
                                          std::optional<std::int64_t> until_ms);

 private:
  std::unique_ptr<UsageLog> log_;
  std::optional<std::string> incomplete_;
};

// The sentence for incomplete(): deleted_ts_ms as UsageLog::for_each_record returns it.
std::optional<std::string> deleted_in_window(std::optional<std::int64_t> since_ms,
                                             std::optional<std::int64_t> deleted_ts_ms);

// The sentence for incomplete() when the window ends after the log's settled time (requests
// that started before the window's end may still be running); none without --until.
std::optional<std::string> unsettled_window(std::optional<std::int64_t> until_ms,
                                            std::optional<std::int64_t> settled_ms);

enum class OutputFormat { table, json, csv };
std::optional<OutputFormat> parse_output_format(std::string_view name);

std::string format_totals(const std::vector<GroupKey>& group_by, const std::vector<LedgerRow>& rows,
                          OutputFormat format);
std::string format_dead_letters(const std::vector<DeadLetterRow>& rows, OutputFormat format);

// A point in time for --since/--until: a duration back from now ("90s", "30m", "24h", "7d",
// "2w", combined as "1d12h"), an RFC 3339 time ("2026-01-14T10:30:00Z", "...+02:00", fractions
// allowed) or a UTC date ("2026-01-14"). Returns Unix milliseconds.
std::optional<std::int64_t> parse_time_arg(std::string_view text, std::int64_t now_ms);

}  // namespace llmproxy::usage
