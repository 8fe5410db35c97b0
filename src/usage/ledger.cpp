// Ledger queries and their output formats (see ledger.h). Totals are summed here from the
// records' JSON (the log stores one row per commit group, not per record); a group key names a
// fixed JSON field, never user text.
#include "usage/ledger.h"

#include <fmt/format.h>
#include <simdjson.h>
#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <ctime>
#include <iterator>
#include <map>
#include <stdexcept>

#include "http/errors.h"
#include "usage/record.h"

namespace llmproxy::usage {

namespace {

struct KeyInfo {
  GroupKey key;
  std::string_view name;
  std::string_view field;  // the record's JSON field ("" for day: from the timestamp)
};

constexpr KeyInfo kKeys[] = {
    {GroupKey::user, "user", "user_id"},
    {GroupKey::model, "model", "model"},
    {GroupKey::api_key, "api_key", "api_key"},
    {GroupKey::backend, "backend", "backend"},
    {GroupKey::endpoint, "endpoint", "endpoint"},
    {GroupKey::finish, "finish", "finish"},
    {GroupKey::day, "day", ""},
};

const KeyInfo& info(GroupKey k) {
  for (const auto& i : kKeys) {
    if (i.key == k) return i;
  }
  return kKeys[0];
}

void json_string(std::string& out, std::string_view v) {
  out += '"';
  http::append_json_escaped(out, v);
  out += '"';
}

// A cell a spreadsheet would run as a formula (its first character = + - @, or a tab or CR
// before one) is written with a ' first, as OWASP advises: user ids, models and keys come from
// clients. Numbers are the ledger's own and never start so.
void csv_field(std::string& out, std::string_view v) {
  const bool formula =
      !v.empty() && std::string_view("=+-@\t\r").find(v.front()) != std::string_view::npos;
  // ';' too: Excel in locales with a decimal comma splits CSV there.
  if (!formula && v.find_first_of(",;\"\r\n") == std::string_view::npos) {
    out += v;
    return;
  }
  out += '"';
  if (formula) out += '\'';
  for (char c : v) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
}

// Display width of a UTF-8 string, counting code points (good enough for ids and model names).
std::size_t width(std::string_view s) {
  std::size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// `s` for a terminal: control characters (C0, DEL, C1), which clients can put in user ids and
// model names, shown as \xNN (C1: \u00NN) instead of being sent to the operator's terminal,
// where escape sequences would recolour, retitle or rewrite the screen, and line breaks would
// break rows.
std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    const auto next = i + 1 < s.size() ? static_cast<unsigned char>(s[i + 1]) : 0;
    if (c < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", c);
    } else if (c == 0xc2 && next >= 0x80 && next <= 0x9f) {
      out += fmt::format("\\u{:04x}", next);
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// A plain aligned table: text columns left-aligned, numbers right-aligned, every cell printable.
std::string render_table(const std::vector<std::string>& header,
                         std::vector<std::vector<std::string>> rows,
                         const std::vector<bool>& numeric) {
  for (auto& r : rows) {
    for (auto& cell : r) cell = printable(cell);
  }
  std::vector<std::size_t> w(header.size());
  for (std::size_t c = 0; c < header.size(); ++c) w[c] = width(header[c]);
  for (const auto& r : rows) {
    for (std::size_t c = 0; c < r.size(); ++c) w[c] = std::max(w[c], width(r[c]));
  }
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (std::size_t c = 0; c < cells.size(); ++c) {
      if (c) l += "  ";
      std::string pad(w[c] - width(cells[c]), ' ');
      if (numeric[c]) {
        l += pad + cells[c];
      } else {
        l += cells[c];
        if (c + 1 < cells.size()) l += pad;
      }
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l;
    out += '\n';
  };
  line(header);
  std::vector<std::string> rule;
  for (auto n : w) rule.emplace_back(n, '-');
  line(rule);
  for (const auto& r : rows) line(r);
  return out;
}

bool digits(std::string_view s, std::size_t pos, std::size_t n) {
  if (pos + n > s.size()) return false;
  for (std::size_t i = pos; i < pos + n; ++i) {
    if (!std::isdigit(static_cast<unsigned char>(s[i]))) return false;
  }
  return true;
}

int num(std::string_view s, std::size_t pos, std::size_t n) {
  int v = 0;
  for (std::size_t i = pos; i < pos + n; ++i) v = v * 10 + (s[i] - '0');
  return v;
}

std::optional<std::int64_t> parse_absolute(std::string_view s) {
  if (!digits(s, 0, 4) || s.size() < 10 || s[4] != '-' || !digits(s, 5, 2) || s[7] != '-' ||
      !digits(s, 8, 2)) {
    return std::nullopt;
  }
  std::tm tm{};
  tm.tm_year = num(s, 0, 4) - 1900;
  tm.tm_mon = num(s, 5, 2) - 1;
  tm.tm_mday = num(s, 8, 2);
  // A day the month has (timegm() would roll 2026-02-30 over into March).
  namespace chr = std::chrono;
  if (!chr::year_month_day(chr::year(tm.tm_year + 1900), chr::month(tm.tm_mon + 1),
                           chr::day(tm.tm_mday))
           .ok()) {
    return std::nullopt;
  }
  std::int64_t ms = 0;
  std::int64_t offset_s = 0;
  if (s.size() > 10) {
    if ((s[10] != 'T' && s[10] != 't' && s[10] != ' ') || !digits(s, 11, 2) || s.size() < 19 ||
        s[13] != ':' || !digits(s, 14, 2) || s[16] != ':' || !digits(s, 17, 2)) {
      return std::nullopt;
    }
    tm.tm_hour = num(s, 11, 2);
    tm.tm_min = num(s, 14, 2);
    tm.tm_sec = num(s, 17, 2);
    if (tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60) return std::nullopt;
    std::size_t i = 19;
    if (i < s.size() && s[i] == '.') {
      ++i;
      std::size_t start = i;
      int scale = 100;
      while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
        ms += (s[i] - '0') * scale;
        scale /= 10;
        ++i;
      }
      if (i == start) return std::nullopt;
    }
    if (i == s.size()) return std::nullopt;  // RFC 3339 requires a zone
    if (s[i] == 'Z' || s[i] == 'z') {
      if (i + 1 != s.size()) return std::nullopt;
    } else if (s[i] == '+' || s[i] == '-') {
      if (s.size() != i + 6 || !digits(s, i + 1, 2) || s[i + 3] != ':' || !digits(s, i + 4, 2) ||
          num(s, i + 1, 2) > 23 || num(s, i + 4, 2) > 59) {
        return std::nullopt;
      }
      offset_s = (num(s, i + 1, 2) * 3600 + num(s, i + 4, 2) * 60) * (s[i] == '+' ? 1 : -1);
    } else {
      return std::nullopt;
    }
  }
  std::time_t t = timegm(&tm);
  return (static_cast<std::int64_t>(t) - offset_s) * 1000 + ms;
}

}  // namespace

std::optional<GroupKey> parse_group_key(std::string_view name) {
  if (name == "user_id") return GroupKey::user;
  if (name == "key") return GroupKey::api_key;
  for (const auto& i : kKeys) {
    if (i.name == name) return i.key;
  }
  return std::nullopt;
}

std::string_view group_key_name(GroupKey key) {
  return info(key).name;
}

std::optional<OutputFormat> parse_output_format(std::string_view name) {
  if (name == "table") return OutputFormat::table;
  if (name == "json") return OutputFormat::json;
  if (name == "csv") return OutputFormat::csv;
  return std::nullopt;
}

Ledger::Ledger(const std::string& path)
    : log_(std::make_unique<UsageLog>(UsageLog::Mode::read_only, path, false)) {
  auto lk = log_->lock();
  sqlite3_stmt* s = nullptr;
  int rc = sqlite3_prepare_v2(
      log_->raw(), "SELECT 1 FROM sqlite_master WHERE type='table' AND name='record_batches'", -1,
      &s, nullptr);
  bool ok = rc == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW;
  std::string why = rc == SQLITE_OK ? "" : std::string(": ") + sqlite3_errmsg(log_->raw());
  sqlite3_finalize(s);
  if (!ok) {
    throw std::runtime_error(path + ": not a usage log of this version" + why +
                             " (a log written by an older gateway is converted when the gateway "
                             "opens it)");
  }
}

Ledger::~Ledger() = default;

std::vector<LedgerRow> Ledger::totals(const LedgerQuery& q) {
  std::map<std::vector<std::string>, LedgerRow> groups;
  simdjson::dom::parser parser;
  std::string padded;
  std::vector<std::string> keys(q.group_by.size());
  std::string error;
  const auto facts = log_->for_each_record(
      q.since_ms.value_or(INT64_MIN), q.until_ms.value_or(INT64_MAX),
      [&](std::int64_t ts_ms, std::string_view json) {
        if (!error.empty()) return;
        padded.assign(json);
        padded.reserve(json.size() + simdjson::SIMDJSON_PADDING);
        simdjson::dom::element doc;
        if (parser.parse(padded.data(), padded.size(), false).get(doc)) {
          error = "a record in the log is not valid JSON";
          return;
        }
        for (std::size_t i = 0; i < q.group_by.size(); ++i) {
          const auto& k = info(q.group_by[i]);
          if (k.field.empty()) {
            keys[i] = rfc3339(ts_ms).substr(0, 10);  // the UTC date
          } else {
            std::string_view v;
            keys[i] = doc[k.field].get_string().get(v) ? std::string() : std::string(v);
          }
        }
        auto& row = groups[keys];
        std::int64_t n;
        row.requests += 1;
        // A sum past int64 (counts up to 2^53 each) fails the report.
        const auto add = [&](std::int64_t& sum) {
          if (__builtin_add_overflow(sum, n, &sum)) {
            error = "a token sum exceeds 2^63 - 1 (records with absurd counts)";
          }
        };
        if (!doc["prompt_tokens"].get_int64().get(n)) add(row.prompt_tokens);
        if (!doc["completion_tokens"].get_int64().get(n)) add(row.completion_tokens);
        if (!doc["total_tokens"].get_int64().get(n)) add(row.total_tokens);
      });
  if (!error.empty()) throw std::runtime_error("usage ledger: " + error);
  incomplete_ = deleted_in_window(q.since_ms, facts.deleted_ts_ms);
  const auto note = [&](std::optional<std::string> why) {
    if (why) incomplete_ = incomplete_ ? *incomplete_ + "; " + *why : *why;
  };
  note(unsettled_window(q.until_ms, facts.settled_ms));
  if (facts.gap) {
    note(
        "the gateway stopped without settling (a crash, kill -9, power loss, or a second stop "
        "signal that cut requests): requests that "
        "started between " +
        rfc3339(facts.gap->first / 1000 * 1000) + " and " + rfc3339(facts.gap->second) +
        " and were still running then were lost, not logged");
  }
  std::vector<LedgerRow> out;
  if (q.group_by.empty() && groups.empty()) out.emplace_back();  // one total, even of nothing
  for (auto& [k, row] : groups) {
    row.keys = k;
    out.push_back(std::move(row));
  }
  return out;
}

std::optional<std::string> deleted_in_window(std::optional<std::int64_t> since_ms,
                                             std::optional<std::int64_t> deleted_ts_ms) {
  if (!deleted_ts_ms || (since_ms && *since_ms > *deleted_ts_ms)) return std::nullopt;
  if (*deleted_ts_ms == INT64_MAX) {
    return "records were deleted from this log (retention, or by hand) and the log does not say "
           "when they started (an older gateway deleted them): the totals cover only the "
           "records kept";
  }
  // Whole seconds, rounded up: every deleted record started at or before the time printed.
  const std::int64_t up_to = *deleted_ts_ms / 1000 * 1000 + (*deleted_ts_ms % 1000 > 0 ? 1000 : 0);
  return "records that started up to " + rfc3339(up_to) +
         " were deleted from this log (retention, or by hand), and the window starts " +
         (since_ms ? "at " + rfc3339(*since_ms) : std::string("at the beginning")) +
         ": the totals cover only the records kept";
}

std::optional<std::string> unsettled_window(std::optional<std::int64_t> until_ms,
                                            std::optional<std::int64_t> settled_ms) {
  if (!until_ms || !settled_ms || *until_ms <= *settled_ms) return std::nullopt;
  if (*settled_ms == INT64_MIN) {
    return "the window ends at " + rfc3339(*until_ms) +
           ", but the gateway writing this log has not yet told up to when its requests are all "
           "in it (it has just started): run the report again in a few seconds";
  }
  // Whole seconds, rounded down: every request that started before the time printed is logged.
  return "the window ends at " + rfc3339(*until_ms) +
         ", but only the requests that started before " + rfc3339(*settled_ms / 1000 * 1000) +
         " are all in the log (later ones may still be running, or the gateway stopped or "
         "crashed then): run the report again once the gateway is past the window's end";
}

std::vector<DeadLetterRow> Ledger::dead_letters(std::optional<std::int64_t> since_ms,
                                                std::optional<std::int64_t> until_ms) {
  return log_->dead_letters(since_ms, until_ms);
}

std::string format_totals(const std::vector<GroupKey>& group_by, const std::vector<LedgerRow>& rows,
                          OutputFormat format) {
  static constexpr std::string_view kNumbers[] = {"requests", "prompt_tokens", "completion_tokens",
                                                  "total_tokens"};
  auto numbers = [](const LedgerRow& r) {
    return std::array<std::int64_t, 4>{r.requests, r.prompt_tokens, r.completion_tokens,
                                       r.total_tokens};
  };
  std::string out;
  if (format == OutputFormat::json) {
    out += '[';
    for (std::size_t i = 0; i < rows.size(); ++i) {
      out += i ? ",\n " : "\n ";
      out += '{';
      for (std::size_t k = 0; k < group_by.size(); ++k) {
        json_string(out, group_key_name(group_by[k]));
        out += ':';
        json_string(out, rows[i].keys[k]);
        out += ',';
      }
      auto n = numbers(rows[i]);
      for (std::size_t c = 0; c < 4; ++c) {
        fmt::format_to(std::back_inserter(out), "{}\"{}\":{}", c ? "," : "", kNumbers[c], n[c]);
      }
      out += '}';
    }
    out += rows.empty() ? "]\n" : "\n]\n";
    return out;
  }
  if (format == OutputFormat::csv) {
    for (auto k : group_by) {
      out += group_key_name(k);
      out += ',';
    }
    out += "requests,prompt_tokens,completion_tokens,total_tokens\n";
    for (const auto& r : rows) {
      for (const auto& key : r.keys) {
        csv_field(out, key);
        out += ',';
      }
      auto n = numbers(r);
      fmt::format_to(std::back_inserter(out), "{},{},{},{}\n", n[0], n[1], n[2], n[3]);
    }
    return out;
  }
  std::vector<std::string> header;
  std::vector<bool> numeric;
  for (auto k : group_by) {
    header.emplace_back(group_key_name(k));
    numeric.push_back(false);
  }
  for (auto n : {"requests", "prompt", "completion", "total"}) {
    header.emplace_back(n);
    numeric.push_back(true);
  }
  std::vector<std::vector<std::string>> cells;
  std::array<std::int64_t, 4> sum{};
  for (const auto& r : rows) {
    std::vector<std::string> line;
    for (const auto& key : r.keys) line.push_back(key.empty() ? "-" : key);
    auto n = numbers(r);
    for (std::size_t c = 0; c < 4; ++c) {
      line.push_back(std::to_string(n[c]));
      // Each group's sum fits (the query checks); their total may not: it fails the report too.
      if (__builtin_add_overflow(sum[c], n[c], &sum[c])) {
        throw std::runtime_error("usage ledger: the total of the " + header[group_by.size() + c] +
                                 " column exceeds 2^63 - 1 (records with absurd counts)");
      }
    }
    cells.push_back(std::move(line));
  }
  if (!group_by.empty() && rows.size() > 1) {
    std::vector<std::string> line(group_by.size(), "");
    line[0] = "(total)";
    for (auto v : sum) line.push_back(std::to_string(v));
    cells.push_back(std::move(line));
  }
  return render_table(header, cells, numeric);
}

std::string format_dead_letters(const std::vector<DeadLetterRow>& rows, OutputFormat format) {
  std::string out;
  auto count = [](const DeadLetterRow& r) {
    return r.request_ids.empty()
               ? 0
               : 1 + static_cast<long>(std::count(r.request_ids.begin(), r.request_ids.end(), ','));
  };
  if (format == OutputFormat::json) {
    out += '[';
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      out += i ? ",\n " : "\n ";
      fmt::format_to(std::back_inserter(out), "{{\"id\":{},\"at\":\"{}\",\"sink\":", r.id,
                     rfc3339(r.at_ms));
      json_string(out, r.sink);
      fmt::format_to(std::back_inserter(out),
                     ",\"status\":{},\"first_seq\":{},\"last_seq\":{},\"records\":{},"
                     "\"request_ids\":",
                     r.status, r.first_seq, r.last_seq, count(r));
      json_string(out, r.request_ids);
      out += ",\"response\":";
      json_string(out, r.response);
      out += ",\"body\":";
      json_string(out, r.body);
      out += '}';
    }
    out += rows.empty() ? "]\n" : "\n]\n";
    return out;
  }
  if (format == OutputFormat::csv) {
    out += "id,at,sink,status,first_seq,last_seq,records,request_ids,response,body\n";
    for (const auto& r : rows) {
      fmt::format_to(std::back_inserter(out), "{},{},", r.id, rfc3339(r.at_ms));
      csv_field(out, r.sink);
      fmt::format_to(std::back_inserter(out), ",{},{},{},{},", r.status, r.first_seq, r.last_seq,
                     count(r));
      csv_field(out, r.request_ids);
      out += ',';
      csv_field(out, r.response);
      out += ',';
      csv_field(out, r.body);
      out += '\n';
    }
    return out;
  }
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : rows) {
    std::string response = r.response;
    for (auto& c : response) {
      if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    }
    if (width(response) > 60) {
      std::size_t cut = 57;
      while (cut > 0 && (static_cast<unsigned char>(response[cut]) & 0xC0) == 0x80) --cut;
      response = response.substr(0, cut) + "...";
    }
    std::string ids = r.request_ids;
    if (ids.size() > 40) ids = ids.substr(0, 37) + "...";
    cells.push_back({std::to_string(r.id), rfc3339(r.at_ms), r.sink, std::to_string(r.status),
                     std::to_string(count(r)), ids, response});
  }
  return render_table({"id", "at", "sink", "status", "records", "request_ids", "response"}, cells,
                      {true, false, false, true, true, false, false});
}

std::optional<std::int64_t> parse_time_arg(std::string_view s, std::int64_t now_ms) {
  if (s.empty()) return std::nullopt;
  if (auto abs = parse_absolute(s)) return abs;
  // A duration back from now: <n><unit> groups.
  std::int64_t total = 0;
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t start = i;
    std::int64_t n = 0;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
      n = n * 10 + (s[i] - '0');
      if (n > 1'000'000'000) return std::nullopt;
      ++i;
    }
    if (i == start || i == s.size()) return std::nullopt;
    std::int64_t unit;
    if (s.substr(i).starts_with("ms")) {
      unit = 1;
      i += 2;
    } else {
      switch (s[i]) {
        case 's':
          unit = 1000;
          break;
        case 'm':
          unit = 60'000;
          break;
        case 'h':
          unit = 3'600'000;
          break;
        case 'd':
          unit = 86'400'000;
          break;
        case 'w':
          unit = 7 * 86'400'000LL;
          break;
        default:
          return std::nullopt;
      }
      ++i;
    }
    std::int64_t part;
    if (__builtin_mul_overflow(n, unit, &part) || __builtin_add_overflow(total, part, &total)) {
      return std::nullopt;  // past any date a log holds
    }
  }
  std::int64_t at;
  if (__builtin_sub_overflow(now_ms, total, &at)) return std::nullopt;
  return at;
}

}  // namespace llmproxy::usage
