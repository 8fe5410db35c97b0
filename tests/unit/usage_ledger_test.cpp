// The ledger over a real log file written by the pipeline: grouped sums, time windows, output
// formats, dead letters, and the --since/--until time syntax.
#include <fmt/format.h>
#include <simdjson.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <thread>

#include "log/log.h"
#include "usage/ledger.h"
#include "usage/pipeline.h"
#include "usage/usage_log.h"
#include "usage_test_support.h"

namespace llmproxy::usage {
namespace {

using namespace std::chrono_literals;
using testing::make_record;
using testing::TempDir;

constexpr std::int64_t kDay = 86'400'000;
constexpr std::int64_t kJan14 = 1768348800000;  // 2026-01-14T00:00:00Z

// Writes records through the pipeline (no sinks) and returns the file.
std::string write_log(const TempDir& dir, const std::vector<UsageRecord>& records) {
  std::string path = dir.file("usage.db");
  Pipeline p(testing::disk_config(path), {});
  p.start();
  for (auto r : records) p.submit(std::move(r));
  p.stop(std::chrono::steady_clock::now() + 10s);
  return path;
}

UsageRecord rec(const std::string& user, const std::string& model, std::int64_t ts,
                std::int64_t prompt, std::int64_t completion) {
  UsageRecord r = make_record(0, ts);
  r.user_id = user;
  r.model = model;
  r.prompt_tokens = prompt;
  r.completion_tokens = completion;
  r.total_tokens = prompt + completion;
  return r;
}

std::vector<UsageRecord> sample() {
  return {
      rec("alice", "llama", kJan14 + 1000, 10, 20),      rec("alice", "llama", kJan14 + 2000, 1, 2),
      rec("alice", "qwen", kJan14 + kDay + 5, 100, 200), rec("bob", "llama", kJan14 + 3000, 7, 0),
      rec("", "llama", kJan14 + kDay + 10, 3, 4),  // no user known
  };
}

TEST(UsageLedger, TotalsWithoutGrouping) {
  TempDir dir;
  Ledger ledger(write_log(dir, sample()));
  auto rows = ledger.totals({});
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_TRUE(rows[0].keys.empty());
  EXPECT_EQ(rows[0].requests, 5);
  EXPECT_EQ(rows[0].prompt_tokens, 121);
  EXPECT_EQ(rows[0].completion_tokens, 226);
  EXPECT_EQ(rows[0].total_tokens, 347);
}

TEST(UsageLedger, GroupsByUserAndModel) {
  TempDir dir;
  Ledger ledger(write_log(dir, sample()));
  LedgerQuery q;
  q.group_by = {GroupKey::user, GroupKey::model};
  auto rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 4u);
  auto expect = [&](std::size_t i, std::vector<std::string> keys, std::int64_t n, std::int64_t p,
                    std::int64_t c) {
    EXPECT_EQ(rows[i].keys, keys);
    EXPECT_EQ(rows[i].requests, n);
    EXPECT_EQ(rows[i].prompt_tokens, p);
    EXPECT_EQ(rows[i].completion_tokens, c);
    EXPECT_EQ(rows[i].total_tokens, p + c);
  };
  expect(0, {"", "llama"}, 1, 3, 4);
  expect(1, {"alice", "llama"}, 2, 11, 22);
  expect(2, {"alice", "qwen"}, 1, 100, 200);
  expect(3, {"bob", "llama"}, 1, 7, 0);
}

TEST(UsageLedger, GroupsByDayAndFiltersByTime) {
  TempDir dir;
  Ledger ledger(write_log(dir, sample()));
  LedgerQuery q;
  q.group_by = {GroupKey::day};
  auto rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].keys[0], "2026-01-14");
  EXPECT_EQ(rows[0].requests, 3);
  EXPECT_EQ(rows[1].keys[0], "2026-01-15");
  EXPECT_EQ(rows[1].total_tokens, 307);

  q.since_ms = kJan14 + 2000;       // inclusive
  q.until_ms = kJan14 + kDay + 10;  // exclusive
  rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].requests, 2);
  EXPECT_EQ(rows[1].requests, 1);
  EXPECT_EQ(rows[1].total_tokens, 300);
}

TEST(UsageLedger, OtherKeys) {
  TempDir dir;
  auto records = sample();
  records[0].finish = "client_disconnected";
  records[1].backend = "b2";
  Ledger ledger(write_log(dir, records));
  LedgerQuery q;
  q.group_by = {GroupKey::finish};
  auto rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].keys[0], "client_disconnected");
  EXPECT_EQ(rows[1].requests, 4);
  q.group_by = {GroupKey::backend, GroupKey::endpoint, GroupKey::api_key};
  rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].keys, (std::vector<std::string>{"b2", "/v1/chat/completions", "sk-0"}));
}

TEST(UsageLedger, Formats) {
  std::vector<GroupKey> keys = {GroupKey::user};
  std::vector<LedgerRow> rows = {{{"al,ice"}, 2, 11, 22, 33}, {{""}, 1, 3, 4, 7}};
  EXPECT_EQ(format_totals(keys, rows, OutputFormat::csv),
            "user,requests,prompt_tokens,completion_tokens,total_tokens\n"
            "\"al,ice\",2,11,22,33\n"
            ",1,3,4,7\n");
  std::string json = format_totals(keys, rows, OutputFormat::json);
  simdjson::dom::parser p;
  simdjson::dom::array a = p.parse(json).get_array();
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(std::string_view(a.at(0)["user"]), "al,ice");
  EXPECT_EQ(int64_t(a.at(0)["total_tokens"]), 33);
  EXPECT_EQ(format_totals(keys, rows, OutputFormat::table),
            "user     requests  prompt  completion  total\n"
            "-------  --------  ------  ----------  -----\n"
            "al,ice          2      11          22     33\n"
            "-               1       3           4      7\n"
            "(total)         3      14          26     40\n");
  EXPECT_EQ(format_totals({}, {}, OutputFormat::json), "[]\n");
  // A client's id that a spreadsheet would run as a formula gets a ' first, quoted.
  std::vector<LedgerRow> formulas = {{{"=HYPERLINK(\"http://x\",\"b\")"}, 1, 1, 1, 2},
                                     {{"+1"}, 1, 1, 1, 2},
                                     {{"-"}, 1, 1, 1, 2},
                                     {{"@sum"}, 1, 1, 1, 2},
                                     {{"\tx"}, 1, 1, 1, 2},
                                     {{"a=b"}, 1, 1, 1, 2},
                                     {{"x;=cmd"}, 1, 1, 1, 2}};
  EXPECT_EQ(format_totals(keys, formulas, OutputFormat::csv),
            "user,requests,prompt_tokens,completion_tokens,total_tokens\n"
            "\"'=HYPERLINK(\"\"http://x\"\",\"\"b\"\")\",1,1,1,2\n"
            "\"'+1\",1,1,1,2\n"
            "\"'-\",1,1,1,2\n"
            "\"'@sum\",1,1,1,2\n"
            "\"'\tx\",1,1,1,2\n"
            "a=b,1,1,1,2\n"
            "\"x;=cmd\",1,1,1,2\n");
  // Two groups each within int64 whose total is not: the report fails, not a negative total.
  const std::int64_t big = std::int64_t(1) << 62;
  std::vector<LedgerRow> huge = {{{"a"}, 1, big, 0, big}, {{"b"}, 1, big, 0, big}};
  EXPECT_THROW(format_totals(keys, huge, OutputFormat::table), std::runtime_error);
  // Control characters a client put in its user id reach the table as escapes, never raw.
  std::vector<LedgerRow> odd = {{{"\x1b]0;pwned\x07\x1b[31mred"}, 1, 1, 1, 2},
                                {{"two\nlines\x7f\xc2\x9b"}, 1, 1, 1, 2}};
  EXPECT_EQ(format_totals(keys, odd, OutputFormat::table),
            "user                         requests  prompt  completion  total\n"
            "---------------------------  --------  ------  ----------  -----\n"
            "\\x1b]0;pwned\\x07\\x1b[31mred         1       1           1      2\n"
            "two\\x0alines\\x7f\\u009b              1       1           1      2\n"
            "(total)                             2       2           2      4\n");
}

TEST(UsageLedger, DeadLetters) {
  TempDir dir;
  std::string path = dir.file("usage.db");
  {
    testing::Receiver rx;
    // 401 refuses the endpoint, not a record: the batch is one dead letter (a 422 would be
    // split to find the record at fault).
    rx.set_script([](const testing::Receiver::Request&, std::size_t) {
      testing::Receiver::Reply r;
      r.status = 401;
      r.body = "unauthorized";
      return r;
    });
    auto sink = testing::make_sink("hook", rx.url());
    sink.batch_size = 2;
    sink.batch_interval = 1s;
    Pipeline p(testing::disk_config(path), {sink});
    p.submit(make_record(0));
    p.submit(make_record(1));
    p.start();
    ASSERT_TRUE(testing::eventually([&] { return p.stats().sinks[0].dead_letters == 2; }));
    p.stop(std::chrono::steady_clock::now() + 10s);
  }
  Ledger ledger(path);
  auto dead = ledger.dead_letters(std::nullopt, std::nullopt);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].request_ids, "req-00000,req-00001");
  EXPECT_EQ(dead[0].status, 401u);
  EXPECT_EQ(dead[0].response, "unauthorized");
  EXPECT_EQ(dead[0].first_seq, 1);
  EXPECT_EQ(dead[0].last_seq, 2);
  EXPECT_TRUE(dead[0].body.starts_with("[{\"request_id\":\"req-00000\""));
  EXPECT_TRUE(ledger.dead_letters(testing::now_ms() + 60'000, std::nullopt).empty());
  std::string table = format_dead_letters(dead, OutputFormat::table);
  EXPECT_NE(table.find("401"), std::string::npos);
  EXPECT_NE(table.find("req-00000,req-00001"), std::string::npos);
  simdjson::dom::parser p;
  simdjson::dom::array a = p.parse(format_dead_letters(dead, OutputFormat::json)).get_array();
  EXPECT_EQ(int64_t(a.at(0)["records"]), 2);
  EXPECT_EQ(std::string_view(a.at(0)["sink"]), "hook");
}

TEST(UsageLedger, MissingOrForeignFileIsAClearError) {
  TempDir dir;
  try {
    Ledger ledger(dir.file("nope.db"));
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no such file"), std::string::npos) << e.what();
  }
  {
    std::FILE* f = std::fopen(dir.file("text.db").c_str(), "w");
    std::fputs("hello, not a database", f);
    std::fclose(f);
  }
  try {
    Ledger ledger(dir.file("text.db"));
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("file is not a database"), std::string::npos) << e.what();
  }
  {
    // A log a newer gateway wrote: its totals could mean something else, so it is not read.
    { UsageLog log(UsageLog::Mode::disk, dir.file("newer.db"), true); }
    testing::Db(dir.file("newer.db")).exec("PRAGMA user_version=9");
    try {
      Ledger ledger(dir.file("newer.db"));
      FAIL();
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("schema version 9 is newer than this build's"),
                std::string::npos)
          << e.what();
    }
  }
  {
    testing::Db other(dir.file("other.db"), true);  // a valid SQLite file without our tables
    other.exec("CREATE TABLE t(x)");
  }
  try {
    Ledger ledger(dir.file("other.db"));
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not a usage log"), std::string::npos) << e.what();
  }
}

TEST(UsageLedger, TimeArguments) {
  const std::int64_t now = kJan14 + 12 * 3'600'000;
  EXPECT_EQ(parse_time_arg("24h", now), now - kDay);
  EXPECT_EQ(parse_time_arg("7d", now), now - 7 * kDay);
  EXPECT_EQ(parse_time_arg("1d12h", now), now - kDay - 12 * 3'600'000);
  EXPECT_EQ(parse_time_arg("30m", now), now - 30 * 60'000);
  EXPECT_EQ(parse_time_arg("2w", now), now - 14 * kDay);
  EXPECT_EQ(parse_time_arg("2026-01-14T10:30:00Z", now), 1768386600000);
  EXPECT_EQ(parse_time_arg("2026-01-14T12:30:00+02:00", now), 1768386600000);
  EXPECT_EQ(parse_time_arg("2026-01-14T10:30:00.250Z", now), 1768386600250);
  EXPECT_EQ(parse_time_arg("2026-01-14", now), kJan14);
  EXPECT_FALSE(parse_time_arg("", now));
  EXPECT_FALSE(parse_time_arg("yesterday", now));
  EXPECT_FALSE(parse_time_arg("24", now));
  EXPECT_FALSE(parse_time_arg("2026-01-14T10:30:00", now));  // no zone
  EXPECT_FALSE(parse_time_arg("2026-13-01", now));
  // Days the month does not have are refused, not rolled over into the next month.
  EXPECT_FALSE(parse_time_arg("2026-02-29", now));
  EXPECT_FALSE(parse_time_arg("2026-02-30T00:00:00Z", now));
  EXPECT_FALSE(parse_time_arg("2026-11-31", now));
  EXPECT_FALSE(parse_time_arg("1900-02-29", now));
  EXPECT_EQ(parse_time_arg("2028-02-29", now), parse_time_arg("2028-03-01", now).value() - kDay);
  EXPECT_EQ(parse_time_arg("2000-02-29", now), parse_time_arg("2000-03-01", now).value() - kDay);
  EXPECT_EQ(parse_time_arg("2026-12-31", now), parse_time_arg("2027-01-01", now).value() - kDay);
}

TEST(UsageLedger, GroupKeyNames) {
  EXPECT_EQ(parse_group_key("user"), GroupKey::user);
  EXPECT_EQ(parse_group_key("user_id"), GroupKey::user);
  EXPECT_EQ(parse_group_key("day"), GroupKey::day);
  EXPECT_EQ(parse_group_key("api_key"), GroupKey::api_key);
  EXPECT_FALSE(parse_group_key("users"));
  EXPECT_EQ(group_key_name(GroupKey::endpoint), "endpoint");
}

}  // namespace
}  // namespace llmproxy::usage

namespace llmproxy::usage {
namespace {

// Retention deletes by records, not by commit groups: groups of 3 records, a budget of 4 takes
// two groups (the second starts before the budget is spent), never all of them at once.
TEST(UsageLog, DeleteRecordsStopsAtItsRecordBudget) {
  TempDir dir;
  UsageLog log(UsageLog::Mode::disk, dir.file("usage.db"), true);
  std::vector<std::string> jsons;
  for (int i = 0; i < 15; ++i) jsons.push_back(to_json(make_record(i)));
  for (int group = 0; group < 5; ++group) {  // seq 1-3, 4-6, 7-9, 10-12, 13-15
    PendingRecord p[3];
    for (int k = 0; k < 3; ++k) {
      p[k] = {kJan14, kJan14 + 1, jsons[static_cast<std::size_t>(3 * group + k)]};
    }
    log.append(std::span(p, 3));
  }
  EXPECT_EQ(log.delete_records(15, std::nullopt, 4), 6);
  EXPECT_EQ(log.delete_records(15, std::nullopt, 1), 3);  // one group at least
  EXPECT_EQ(log.delete_records(15, std::nullopt, 3), 3);  // the budget spent by the first
  EXPECT_EQ(log.count_records(), 3);
  EXPECT_EQ(log.delete_records(15, std::nullopt, 1000), 3);
  EXPECT_EQ(log.count_records(), 0);
}

// A log written by a version-1 gateway (one row per record, AUTOINCREMENT seq) is converted on
// open: its records, head (deleted records included), cursors and dead letters stay; new
// records follow the old head; the ledger reads old and new alike.
// read_after appends: records deleted before the cursor (retention) are skipped, also when the
// LoggedRecords passed in holds records already.
TEST(UsageLog, ReadAfterSkipsDeletedRecordsWhileAppending) {
  TempDir dir;
  UsageLog log(UsageLog::Mode::disk, dir.file("usage.db"), true);
  std::vector<std::string> jsons;
  for (int i = 0; i < 6; ++i) jsons.push_back(to_json(make_record(i)));
  for (int group = 0; group < 3; ++group) {  // three commit groups: seq 1-2, 3-4, 5-6
    PendingRecord p[2];
    for (int k = 0; k < 2; ++k) {
      p[k] = {kJan14, kJan14 + 1, jsons[static_cast<std::size_t>(2 * group + k)]};
    }
    log.append(std::span(p, 2));
  }
  EXPECT_EQ(log.delete_records(4, std::nullopt, 100), 4);  // the first two groups
  LoggedRecords got;
  got.json = "{}";
  got.entries.push_back({99, 0, 0, 2});  // held from an earlier read
  log.read_after(0, 10, got);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got.entries[1].seq, 5);
  EXPECT_EQ(got.entries[2].seq, 6);
  EXPECT_EQ(got.json_of(1), jsons[4]);
  EXPECT_EQ(got.json_of(2), jsons[5]);
  EXPECT_EQ(got.json, "{}," + jsons[4] + "," + jsons[5]);
}

TEST(UsageLog, ConvertsAVersion1Log) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  std::vector<std::string> jsons;
  {
    testing::Db db(path, true);
    db.exec(R"sql(
      PRAGMA journal_mode=WAL;
      CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL, request_id TEXT NOT NULL, user_id TEXT NOT NULL,
        api_key TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, backend TEXT NOT NULL,
        is_stream INTEGER NOT NULL, status INTEGER NOT NULL, finish TEXT NOT NULL,
        usage_source TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL, cached_tokens INTEGER,
        reasoning_tokens INTEGER, json TEXT NOT NULL);
      CREATE INDEX records_ts ON records(ts_ms);
      CREATE TABLE sink_cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL);
      CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL,
        first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, request_ids TEXT NOT NULL,
        status INTEGER NOT NULL, response TEXT NOT NULL, at_ms INTEGER NOT NULL,
        body TEXT NOT NULL);
      PRAGMA user_version=1;)sql");
    for (int i = 0; i < 4; ++i) {
      auto r = rec("alice", "llama", kJan14 + i * 1000, 10 + i, 1);
      r.request_id = testing::request_id(i);
      jsons.push_back(to_json(r));
      db.exec(fmt::format(
          "INSERT INTO records(ts_ms, end_ms, request_id, user_id, api_key, model, endpoint, "
          "backend, is_stream, status, finish, usage_source, prompt_tokens, completion_tokens, "
          "total_tokens, json) VALUES({}, {}, '{}', 'alice', '', 'llama', '/v1/chat/completions', "
          "'b', 0, 200, 'completed', 'backend', {}, 1, {}, '{}')",
          r.timestamp_ms, r.timestamp_ms + 7, r.request_id, 10 + i, 11 + i, jsons.back()));
    }
    db.exec("DELETE FROM records WHERE seq = 1");  // delivered and pruned: seq 1 is gone
    jsons.erase(jsons.begin());
    db.exec("INSERT INTO sink_cursors VALUES('hook', 2, 0)");
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(log.head(), 4);
    EXPECT_EQ(log.count_records(), 3);
    EXPECT_EQ(log.cursor("hook"), 2);
    LoggedRecords got;
    log.read_after(0, 2, got);
    log.read_after(3, 10, got);  // appended behind the first read
    ASSERT_EQ(got.size(), 3u);
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got.entries[i].seq, static_cast<std::int64_t>(i) + 2);
      EXPECT_EQ(got.json_of(i), jsons[i]);  // byte for byte what a sink sends
      EXPECT_EQ(got.request_id(i), testing::request_id(static_cast<int>(i) + 1));
      EXPECT_EQ(got.entries[i].end_ms, kJan14 + static_cast<std::int64_t>(i + 1) * 1000 + 7);
    }
    // The records joined by ',': a batch's body is '[' + json + ']'.
    EXPECT_EQ(got.json, jsons[0] + "," + jsons[1] + "," + jsons[2]);
    auto r = rec("bob", "qwen", kJan14 + 9000, 5, 5);
    std::string json = to_json(r);
    PendingRecord p{r.timestamp_ms, r.timestamp_ms + static_cast<std::int64_t>(r.duration_ms),
                    json};
    EXPECT_EQ(log.append(std::span(&p, 1)), 5);  // after the old head
  }
  testing::Db db(path);
  EXPECT_EQ(db.number("PRAGMA user_version"), 4);
  EXPECT_EQ(db.scalar("SELECT group_concat(seq) FROM (SELECT seq FROM records ORDER BY seq)"),
            "2,3,4,5");
  EXPECT_EQ(db.scalar("SELECT json FROM records WHERE seq=3"), jsons[1]);
  Ledger ledger(path);
  LedgerQuery q;
  q.group_by = {GroupKey::user};
  auto rows = ledger.totals(q);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].keys[0], "alice");
  EXPECT_EQ(rows[0].requests, 3);
  EXPECT_EQ(rows[0].prompt_tokens, 11 + 12 + 13);
  EXPECT_EQ(rows[1].keys[0], "bob");
  EXPECT_EQ(rows[1].total_tokens, 10);
}

// `read` must throw the damage error (SqliteError, damaged()) whose message holds `says`.
void expect_damage(const std::function<void()>& read, const std::string& says) {
  try {
    read();
    ADD_FAILURE() << "read past the damage (" << says << ")";
  } catch (const SqliteError& e) {
    EXPECT_TRUE(e.damaged());
    EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
  }
}

// simdjson's rendering of a JSON text: two texts with the same keys in the same order and the
// same values render the same.
std::string canonical(const std::string& json) {
  simdjson::dom::parser p;
  simdjson::dom::element e;
  if (p.parse(json).get(e) != simdjson::SUCCESS) return "unparsable: " + json;
  return simdjson::to_string(e);
}

// Version 4 stores rows; a log of version 3 holds objects. After the upgrade both kinds are read
// back as the exact JSON a sink sends, by sinks and by the ledger, and the view `records` shows
// each as that object; a row this build cannot read is reported as damage, not sent.
TEST(UsageLog, RowsAndObjectsReadBackAsTheJsonASinkSends) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  std::vector<UsageRecord> records;
  for (int i = 0; i < 6; ++i) {
    UsageRecord r = rec(i % 2 ? "alice" : "bob\"\n", "llama", kJan14 + i * 1000, 10 + i, i);
    r.request_id = testing::request_id(i);
    r.client_request_id = i == 3 ? "client-3" : "";
    r.is_stream = i % 2 == 0;
    r.ttft_ms = i % 2 ? -1 : 3.25;
    r.cached_tokens = i == 4 ? 8 : -1;
    r.reasoning_tokens = i == 5 ? 9 : -1;
    if (i == 4) r.timestamp_ms = -1500;  // before 1970: 23:59:58, the second it falls in
    records.push_back(r);
  }
  auto append = [&](UsageLog& log, int from, int to, bool rows) {
    std::vector<std::string> texts;
    for (int i = from; i < to; ++i) {
      std::string t;
      if (rows) {
        append_row(t, records[static_cast<std::size_t>(i)]);
      } else {
        append_json(t, records[static_cast<std::size_t>(i)]);
      }
      texts.push_back(std::move(t));
    }
    std::vector<PendingRecord> pending;
    for (int i = from; i < to; ++i) {
      const auto& r = records[static_cast<std::size_t>(i)];
      pending.push_back(
          {r.timestamp_ms, r.timestamp_ms + 1, texts[static_cast<std::size_t>(i - from)]});
    }
    log.append(pending);
  };
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append(log, 0, 3, false);  // objects, as version 3 wrote them
  }
  {
    testing::Db db(path);
    db.exec("PRAGMA user_version=3");
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append(log, 3, 6, true);
    LoggedRecords got;
    log.read_after(0, 100, got);
    ASSERT_EQ(got.size(), 6u);
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got.json_of(i), to_json(records[i]));
      EXPECT_EQ(got.request_id(i), records[i].request_id);
    }
    std::vector<std::string> seen;
    log.for_each_record(INT64_MIN, INT64_MAX,
                        [&](std::int64_t, std::string_view json) { seen.emplace_back(json); });
    ASSERT_EQ(seen.size(), 6u);
    for (std::size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], to_json(records[i]));
  }
  testing::Db db(path);
  EXPECT_EQ(db.number("PRAGMA user_version"), 4);
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), 6);
  for (std::size_t i = 0; i < records.size(); ++i) {
    EXPECT_EQ(canonical(db.scalar(fmt::format("SELECT json FROM records WHERE seq={}", i + 1))),
              canonical(to_json(records[i])))
        << i;
  }
  Ledger ledger(path);
  auto totals = ledger.totals({});
  ASSERT_EQ(totals.size(), 1u);
  EXPECT_EQ(totals[0].requests, 6);
  EXPECT_EQ(totals[0].prompt_tokens, 10 + 11 + 12 + 13 + 14 + 15);
  // A damaged row (its tokens overwritten by a string).
  db.exec(
      "UPDATE record_batches SET records = replace(records, ',13,3,16,', ',\"x\",3,16,') "
      "WHERE first_seq = 4");
  UsageLog log(UsageLog::Mode::disk, path, true);
  LoggedRecords got;
  expect_damage([&] { log.read_after(3, 100, got); }, "record 4 is damaged");
}

// Appends `n` records of `prompt` tokens after the log's head; returns the new head.
std::int64_t append_some(UsageLog& log, int n, std::int64_t prompt = 1) {
  std::vector<std::string> jsons;
  std::vector<PendingRecord> pending;
  for (int i = 0; i < n; ++i) {
    jsons.push_back(to_json(rec("carol", "llama", kJan14 + i, prompt, 2)));
  }
  for (const auto& j : jsons) pending.push_back({kJan14, kJan14 + 1, j});
  return log.append(pending);
}

// A batch's pieces that do not fit together (damage on disk in its `meta` or between its
// records) are damage at the first record they touch: the records before it are read, none after
// it is skipped or sent.
TEST(UsageLog, ABatchWhosePiecesDoNotFitIsDamage) {
  struct Case {
    const char* what;
    const char* sql;  // on the batch of seq 4-6
    std::int64_t damaged_seq;
  };
  const std::vector<Case> cases{
      {"an entry pointing past the text",
       "UPDATE record_batches SET meta = substr(meta, 1, 20) || x'A5A5A5A5' || substr(meta, 25)",
       5},
      {"an entry pointing inside a record",
       "UPDATE record_batches SET meta = substr(meta, 1, 20) || x'05000000' || substr(meta, 25)",
       5},
      {"an entry missing", "UPDATE record_batches SET meta = substr(meta, 1, 40)", 4},
      {"an entry too many", "UPDATE record_batches SET meta = meta || substr(meta, 41, 20)", 4},
      {"no ',' between records",
       "UPDATE record_batches SET records = replace(records, '},{', '} {')", 4},
      {"no ']' at the end",
       "UPDATE record_batches SET records = substr(records, 1, length(records) - 1) || ' '", 4},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir dir;
    const std::string path = dir.file("usage.db");
    {
      UsageLog log(UsageLog::Mode::disk, path, true);
      for (int i = 0; i < 3; ++i) append_some(log, 3);  // seq 1-3, 4-6, 7-9
    }
    testing::Db(path).exec(std::string(c.sql) + " WHERE first_seq = 4");
    UsageLog log(UsageLog::Mode::disk, path, true);
    LoggedRecords got;
    log.read_after(0, static_cast<int>(c.damaged_seq - 1), got);  // up to the damage: read
    EXPECT_EQ(got.size(), static_cast<std::size_t>(c.damaged_seq - 1));
    const std::string says = fmt::format("record {} is damaged", c.damaged_seq);
    expect_damage(
        [&] {
          LoggedRecords rest;
          log.read_after(c.damaged_seq - 1, 100, rest);
        },
        says);
    expect_damage(
        [&] { log.for_each_record(INT64_MIN, INT64_MAX, [](std::int64_t, std::string_view) {}); },
        says);
  }
}

// Damage anywhere in the file (one page overwritten, as a failing disk or a bad copy leaves it):
// a sink gets the records before the damage exactly as written, in order, none skipped, then an
// error that says the file is damaged; never a record that differs, never a gap. SQLite finds
// most such damage itself; not the last page of a long batch's overflow chain, whose bytes it
// reads without a check, nor a damaged page the next batch's read lands on by chance.
TEST(UsageLog, DamageOnAnyPageStopsReadingWithoutSkippingOrAltering) {
  TempDir dir;
  const std::string clean = dir.file("clean.db");
  constexpr int kRecords = 1500;
  std::vector<std::string> rows(kRecords), want(kRecords);
  for (int i = 0; i < kRecords; ++i) {
    const UsageRecord r = make_record(i, kJan14 + i);
    append_row(rows[static_cast<std::size_t>(i)], r);
    want[static_cast<std::size_t>(i)] = to_json(r);
  }
  {
    UsageLog log(UsageLog::Mode::disk, clean, true);
    std::size_t at = 0, size = 1;
    while (at < rows.size()) {  // batches of 1 to 67 records: some fit a page, most overflow
      std::vector<PendingRecord> batch;
      for (; batch.size() < size && at < rows.size(); ++at) {
        batch.push_back({kJan14, kJan14 + 1, rows[at]});
      }
      log.append(batch);
      size = size % 61 + 7;
    }
  }
  ASSERT_FALSE(std::filesystem::exists(clean + "-wal")) << "the WAL folded into the file";
  std::string bytes;
  {
    std::ifstream in(clean, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto page = static_cast<std::size_t>(testing::Db(clean).number("PRAGMA page_size"));
  const std::size_t pages = bytes.size() / page;
  ASSERT_GT(pages, 50u);
  std::size_t stopped = 0;
  for (std::size_t p = 1; p < pages; ++p) {  // page 1 (index 0) is the header: see below
    SCOPED_TRACE(fmt::format("page {} of {}", p + 1, pages));
    const std::string path = dir.file(fmt::format("damaged-{}.db", p));
    {
      std::string copy = bytes;
      std::fill_n(copy.begin() + static_cast<std::ptrdiff_t>(p * page), page, '\xa5');
      std::ofstream(path, std::ios::binary) << copy;
    }
    std::size_t next = 0;  // index of the next record expected
    try {
      UsageLog log(UsageLog::Mode::disk, path, true);
      for (;;) {
        LoggedRecords got;
        log.read_after(static_cast<std::int64_t>(next), 100, got);
        if (got.size() == 0) break;
        for (std::size_t i = 0; i < got.size(); ++i, ++next) {
          ASSERT_EQ(got.entries[i].seq, static_cast<std::int64_t>(next + 1));
          ASSERT_EQ(got.json_of(i), want[next]);
        }
      }
      EXPECT_EQ(next, want.size()) << "no damage reported, so every record was read";
    } catch (const SqliteError& e) {
      ASSERT_TRUE(e.damaged()) << e.what();
      ++stopped;
    }
    std::filesystem::remove(path);
  }
  // Most pages hold records (the rest: the schema, the index on timestamps, the small tables).
  EXPECT_GT(stopped * 2, pages) << stopped << " of " << pages;
}

// Records missing from the file that no delete took (a damaged page SQLite did not notice, rows
// deleted around the log's trigger) are damage; records a delete took are skipped.
TEST(UsageLog, RecordsMissingThatNoDeleteTookAreDamage) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    for (int i = 0; i < 3; ++i) append_some(log, 3);  // seq 1-3, 4-6, 7-9
    EXPECT_EQ(log.delete_records(3, std::nullopt, 100), 3);
    EXPECT_EQ(log.deleted_through(), 3);
  }
  testing::Db(path).exec(
      "DROP TRIGGER record_batches_keep_head; DELETE FROM record_batches WHERE first_seq = 4");
  UsageLog log(UsageLog::Mode::disk, path, true);
  EXPECT_EQ(log.deleted_through(), 3);
  LoggedRecords got;
  expect_damage([&] { log.read_after(0, 100, got); }, "records 4..6 are missing");
  EXPECT_EQ(got.size(), 0u);
  log.read_after(6, 100, got);  // past the loss (an operator's decision): read as before
  EXPECT_EQ(got.size(), 3u);
  // The ledger's sums would leave them out silently: a window that reads the batch right after
  // them stops too. One that reads no batch next to them reports (a lookup per batch read, not
  // a scan of the whole log).
  expect_damage([&] { Ledger(path).totals({}); }, "records 4..6 are missing");
  LedgerQuery around;
  around.since_ms = kJan14;
  around.until_ms = kJan14 + 1;
  expect_damage([&] { Ledger(path).totals(around); }, "records 4..6 are missing");
  LedgerQuery later;
  later.since_ms = kJan14 + kDay;
  EXPECT_EQ(Ledger(path).totals(later)[0].requests, 0);
}

// Counts are at most 2^53 each; a sum past 2^63 - 1 fails the report instead of wrapping.
TEST(UsageLedger, ASumPastInt64FailsTheReport) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append_some(log, 1030, std::int64_t{1} << 53);
  }
  try {
    Ledger(path).totals({});
    ADD_FAILURE() << "the sum wrapped";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds"), std::string::npos) << e.what();
  }
}

// durability: memory keeps no dead letter row (nothing outside the process could read it, and
// the rows would grow with every rejection): only the cursor moves. On disk the row is kept.
TEST(UsageLog, InMemoryADeadLetterMovesTheCursorOnly) {
  TempDir dir;
  for (const bool memory : {true, false}) {
    SCOPED_TRACE(memory ? "memory" : "disk");
    UsageLog log(memory ? UsageLog::Mode::memory : UsageLog::Mode::disk, dir.file("dl.db"), true);
    DeadLetterRow row;
    row.sink = "hook";
    row.first_seq = 1;
    row.last_seq = 2;
    row.request_ids = "a,b";
    row.status = 400;
    row.at_ms = kJan14;
    row.body = std::string(100'000, 'x');
    log.dead_letter(row);
    EXPECT_EQ(log.cursor("hook"), 2);
    EXPECT_EQ(log.dead_letters().size(), memory ? 0u : 1u);
  }
}

// A read stops once its JSON reaches max_bytes: the record that crossed it is in, the next is
// not; a first record larger than the bound comes alone. A sink's batch is so bounded in bytes.
TEST(UsageLog, ReadAfterStopsAtMaxBytes) {
  TempDir dir;
  UsageLog log(UsageLog::Mode::disk, dir.file("usage.db"), true);
  append_some(log, 10);
  LoggedRecords one;
  log.read_after(0, 100, one);
  ASSERT_EQ(one.size(), 10u);
  const std::size_t record = one.json_of(0).size();
  LoggedRecords got;
  log.read_after(0, 100, got, 3 * record + 2);  // three records and their two commas
  EXPECT_EQ(got.size(), 3u);
  got = LoggedRecords{};
  log.read_after(0, 100, got, 3 * record + 3);  // one byte more: the fourth crosses it
  EXPECT_EQ(got.size(), 4u);
  got = LoggedRecords{};
  log.read_after(2, 100, got, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got.entries[0].seq, 3);
}

// What a commit costs on disk is bounded: the WAL grows by two pages per one-record commit (the
// batch's B-tree leaf and the index leaf; the head is not stored by commits, only by deletes).
TEST(UsageLog, ASmallCommitWritesTwoPages) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  UsageLog log(UsageLog::Mode::disk, path, true);
  append_some(log, 1);
  const auto wal = [&] { return std::filesystem::file_size(path + "-wal"); };
  const auto before = wal();
  constexpr int kCommits = 20;
  for (int i = 0; i < kCommits; ++i) append_some(log, 1);
  const auto frame = static_cast<double>(24 + testing::Db(path).number("PRAGMA page_size"));
  const double frames = static_cast<double>(wal() - before) / frame / kCommits;
  EXPECT_GE(frames, 1.0);
  EXPECT_LE(frames, 2.5);  // 3 when every commit also stored the head
}

// The head survives deletes of every record and a restart: a seq is never given out twice.
TEST(UsageLog, HeadOutlivesDeletedRecords) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(append_some(log, 3), 3);
    EXPECT_EQ(append_some(log, 3), 6);
    EXPECT_EQ(log.delete_records(6, std::nullopt, 100), 6);
    EXPECT_EQ(log.count_records(), 0);
    EXPECT_EQ(log.head(), 6);
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(log.head(), 6);
    EXPECT_EQ(append_some(log, 1), 7);
    EXPECT_EQ(log.delete_records(3, std::nullopt, 100), 0);  // no batch lies wholly below 3
    EXPECT_EQ(log.head(), 7);
    EXPECT_EQ(append_some(log, 2), 9);
  }
  // An operator's own SQL deleting the newest batches keeps the head too.
  testing::Db(path).exec("DELETE FROM record_batches WHERE last_seq >= 8");
  UsageLog log(UsageLog::Mode::disk, path, true);
  EXPECT_EQ(log.head(), 9);
  EXPECT_EQ(append_some(log, 1), 10);
}

// One gateway per log: a second writer is refused before it touches the file, naming the
// holder; the lock goes with the first (here its object; in production its process, kill -9
// included), and read-only readers (the ledger) and the writer's own sink connections need none.
TEST(UsageLog, ASecondWriterIsRefusedWhileTheFirstHoldsTheLog) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog first(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(append_some(first, 2), 2);
    try {
      UsageLog second(UsageLog::Mode::disk, path, true, std::chrono::milliseconds(0));
      ADD_FAILURE() << "a second writer opened the log";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("is in use by another gateway process (pid " +
                                           std::to_string(::getpid()) + ")"),
                std::string::npos)
          << e.what();
    }
    UsageLog sink_connection(UsageLog::Mode::disk, path, false);
    EXPECT_EQ(sink_connection.head(), 2);
    UsageLog reader(UsageLog::Mode::read_only, path, false);
    EXPECT_EQ(reader.count_records(), 2);
    EXPECT_EQ(append_some(first, 1), 3);
  }
  UsageLog next(UsageLog::Mode::disk, path, true);
  EXPECT_EQ(append_some(next, 1), 4);
}

// A writer that finds the log held waits for it (a gateway replacing one that still drains): it
// opens the log once the holder lets go, never before.
TEST(UsageLog, ASecondWriterWaitsForTheFirstToLetGo) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  auto first = std::make_unique<UsageLog>(UsageLog::Mode::disk, path, true);
  EXPECT_EQ(append_some(*first, 2), 2);
  std::atomic<bool> released{false};
  bool released_when_opened = false;
  std::string error;
  std::int64_t head = -1;
  std::thread second([&] {
    try {
      UsageLog log(UsageLog::Mode::disk, path, true, std::chrono::seconds(30));
      released_when_opened = released.load();
      head = log.head();
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  // Not a synchronisation: the second writer cannot get the log before the release, whenever
  // it gets there; the pause only makes it likely that it waits.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  released = true;
  first.reset();
  second.join();
  EXPECT_EQ(error, "");
  EXPECT_TRUE(released_when_opened);
  EXPECT_EQ(head, 2);
}

// A version-2 file (its head stored by every commit) is used as it is, and marked as this build's
// version so that a version-2 build, which would take the head from log_head alone, refuses it.
TEST(UsageLog, OpensAVersion2LogAndVersion2BuildsRefuseTheResult) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(append_some(log, 4), 4);
    EXPECT_EQ(log.delete_records(4, std::nullopt, 100), 4);
  }
  {
    testing::Db db(path);
    db.exec("DROP TRIGGER record_batches_keep_head; PRAGMA user_version=2");
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(log.head(), 4);
    EXPECT_EQ(append_some(log, 1), 5);
  }
  testing::Db db(path);
  EXPECT_EQ(db.number("PRAGMA user_version"), 4);
  EXPECT_EQ(db.number("SELECT count(*) FROM sqlite_master WHERE name='record_batches_keep_head'"),
            1);
  // What a build that knows only version 2 does with it: refuse, with the versions in the message.
  db.exec("PRAGMA user_version=5");
  try {
    UsageLog newer(UsageLog::Mode::disk, path, true);
    ADD_FAILURE() << "a newer schema was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("schema version 5 is newer than this build's (4)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace llmproxy::usage

namespace llmproxy::usage {
namespace {

// One commit group of records that started at `starts`.
void append_started(UsageLog& log, std::initializer_list<std::int64_t> starts) {
  std::vector<std::string> jsons;
  std::vector<PendingRecord> pending;
  for (auto ts : starts) jsons.push_back(to_json(rec("dave", "llama", ts, 1, 1)));
  auto ts = starts.begin();
  for (const auto& j : jsons) pending.push_back({*ts, *ts + 1, j}), ++ts;
  log.append(pending);
}

// The writer's settled time: a report whose --until is past it may miss requests still running
// (they are logged when they end) and says so; one without --until is "so far" and does not.
TEST(UsageLedger, AWindowEndingAfterTheSettledTimeIsIncomplete) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append_started(log, {kJan14 + 1000});
  }
  Ledger ledger(path);
  LedgerQuery q;
  q.until_ms = kJan14 + 2000;
  EXPECT_EQ(ledger.totals(q)[0].requests, 1);
  ASSERT_TRUE(ledger.incomplete());  // nothing settled yet
  EXPECT_NE(ledger.incomplete()->find("has not yet told"), std::string::npos);
  UsageLog(UsageLog::Mode::disk, path, true).store_settled(kJan14 + 1999, false, kJan14 + 3000);
  ledger.totals(q);
  ASSERT_TRUE(ledger.incomplete());
  EXPECT_NE(ledger.incomplete()->find("ends at 2026-01-14T00:00:02Z, but only the requests that "
                                      "started before 2026-01-14T00:00:01Z are all in the log"),
            std::string::npos)
      << *ledger.incomplete();
  UsageLog(UsageLog::Mode::disk, path, true).store_settled(kJan14 + 2000, false, kJan14 + 3000);
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
  UsageLog(UsageLog::Mode::disk, path, true).store_settled(kJan14, false, kJan14 + 3000);
  q.until_ms.reset();
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
  // A log no writer of this version opened has no settled time: nothing is said.
  testing::Db(path).exec("DROP TABLE settled");
  q.until_ms = kJan14 + 2000;
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
}

// A writer that starts after one that did not stop cleanly keeps the span whose requests in
// flight were lost; a window over it is incomplete. After a clean stop there is none.
TEST(UsageLedger, AStartAfterAnUncleanStopMarksTheLostSpan) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append_started(log, {kJan14 + 1000});
    log.store_settled(kJan14 + 5000, true, kJan14 + 5000);      // a clean stop
    EXPECT_EQ(log.open_settled(kJan14 + 9000), kJan14 + 5000);  // no gap
    log.store_settled(kJan14 + 20000, false, kJan14 + 21000);
    log.open_settled(kJan14 + 30000);  // the last writer crashed: [20 s, 30 s) lost
    log.store_settled(kJan14 + 40000, false, kJan14 + 41000);
    // Down for a day after a crash: the span ends 31 s after the last heartbeat, not at the start.
    log.open_settled(kJan14 + kDay);
    log.store_settled(kJan14 + kDay + 1000, false, kJan14 + kDay + 2000);
  }
  Ledger ledger(path);
  LedgerQuery q;
  q.until_ms = kJan14 + 10000;
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
  q.until_ms = kJan14 + 25000;
  ledger.totals(q);
  ASSERT_TRUE(ledger.incomplete());
  EXPECT_NE(
      ledger.incomplete()->find(
          "stopped without settling (a crash, kill -9, power loss, or a second stop signal that "
          "cut requests): "
          "requests that started between 2026-01-14T00:00:20Z and "
          "2026-01-14T00:00:30Z"),
      std::string::npos)
      << *ledger.incomplete();
  q.since_ms = kJan14 + 30000;
  q.until_ms = kJan14 + 40000;
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
  q.until_ms = kJan14 + 60000;
  ledger.totals(q);
  ASSERT_TRUE(ledger.incomplete());
  EXPECT_NE(ledger.incomplete()->find("between 2026-01-14T00:00:40Z and 2026-01-14T00:01:12Z"),
            std::string::npos)
      << *ledger.incomplete();
  q.since_ms = kJan14 + 80000;  // the rest of the day: nothing was running
  q.until_ms = kJan14 + kDay;
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
}

// Deletes, retention's or SQL typed by hand, leave the newest start time they took in the log: a
// report whose window reaches back to it says that its totals cover only what was kept.
TEST(UsageLedger, SaysWhenAWindowReachesBackToDeletedRecords) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append_started(log, {kJan14 + 1000, kJan14 + 4500});  // seq 1-2
    append_started(log, {kJan14 + 3000});                 // seq 3, started before seq 2
    append_started(log, {kJan14 + kDay});                 // seq 4
  }
  {
    Ledger ledger(path);
    EXPECT_EQ(ledger.totals({})[0].requests, 4);
    EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    EXPECT_EQ(log.delete_records(3, std::nullopt, 100), 3);
  }
  Ledger ledger(path);
  LedgerQuery q;
  EXPECT_EQ(ledger.totals(q)[0].requests, 1);
  ASSERT_TRUE(ledger.incomplete());
  // The newest start among the deleted, rounded up to the second.
  EXPECT_NE(ledger.incomplete()->find("started up to 2026-01-14T00:00:05Z"), std::string::npos)
      << *ledger.incomplete();
  EXPECT_NE(ledger.incomplete()->find("starts at the beginning"), std::string::npos);
  q.since_ms = kJan14 + 4500;  // a deleted record started then: in the window
  ledger.totals(q);
  ASSERT_TRUE(ledger.incomplete());
  EXPECT_NE(ledger.incomplete()->find("starts at 2026-01-14T00:00:04Z"), std::string::npos);
  q.since_ms = kJan14 + 4501;
  EXPECT_EQ(ledger.totals(q)[0].requests, 1);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();

  // A delete by hand raises it too.
  testing::Db(path).exec("DELETE FROM record_batches WHERE first_seq = 4");
  EXPECT_EQ(ledger.totals(q)[0].requests, 0);
  ASSERT_TRUE(ledger.incomplete());
  EXPECT_NE(ledger.incomplete()->find("started up to 2026-01-15T00:00:00Z"), std::string::npos)
      << *ledger.incomplete();
}

// A file in which an older build deleted records does not say when those started: until a writer
// of this version opens it, every report says so; then the time of that opening bounds them.
TEST(UsageLedger, RecordsDeletedBeforeTheirTimesWereKept) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    append_started(log, {kJan14});
    append_started(log, {kJan14 + kDay});
  }
  {
    testing::Db db(path);  // as an older build left it, then its retention
    db.exec("DROP TRIGGER record_batches_keep_deleted_time; DROP TABLE deleted_times");
    db.exec("DELETE FROM record_batches WHERE first_seq = 1");
  }
  LedgerQuery q;
  q.since_ms = kJan14 + 2 * kDay;
  {
    Ledger ledger(path);
    EXPECT_EQ(ledger.totals(q)[0].requests, 0);
    ASSERT_TRUE(ledger.incomplete());
    EXPECT_NE(ledger.incomplete()->find("does not say when they started"), std::string::npos)
        << *ledger.incomplete();
  }
  const std::int64_t before_open = log::unix_ms_now();
  { UsageLog log(UsageLog::Mode::disk, path, true); }
  const std::int64_t after_open = log::unix_ms_now();
  Ledger ledger(path);
  ledger.totals(q);
  ASSERT_TRUE(ledger.incomplete());
  // The opening's date (either side of a midnight the opening may straddle).
  EXPECT_TRUE(ledger.incomplete()->find(rfc3339(before_open).substr(0, 10)) != std::string::npos ||
              ledger.incomplete()->find(rfc3339(after_open + 1000).substr(0, 10)) !=
                  std::string::npos)
      << *ledger.incomplete();
  q.since_ms = after_open + 1000;
  ledger.totals(q);
  EXPECT_FALSE(ledger.incomplete()) << *ledger.incomplete();

  // A log whose records were all kept gets no time at that opening.
  TempDir other;
  const std::string kept = other.file("usage.db");
  {
    UsageLog log(UsageLog::Mode::disk, kept, true);
    append_started(log, {kJan14});
  }
  testing::Db(kept).exec("DROP TRIGGER record_batches_keep_deleted_time; DROP TABLE deleted_times");
  { UsageLog log(UsageLog::Mode::disk, kept, true); }
  Ledger all(kept);
  EXPECT_EQ(all.totals({})[0].requests, 1);
  EXPECT_FALSE(all.incomplete()) << *all.incomplete();
}

}  // namespace
}  // namespace llmproxy::usage
