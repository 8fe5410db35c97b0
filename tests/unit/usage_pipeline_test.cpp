// The usage pipeline end to end: records submitted, committed to a real SQLite file, POSTed to
// an HTTP receiver on 127.0.0.1 (usage_test_support.h). Assertions are on what the receiver got
// (bytes, headers), what the log holds (rows read back) and the counters; waits are on
// conditions, never fixed sleeps.
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <simdjson.h>

#include <atomic>
#include <fstream>
#include <future>
#include <map>
#include <set>

#include "usage/pipeline.h"
#include "usage/usage_log.h"
#include "usage_test_support.h"

namespace llmproxy::usage {
namespace {

using namespace std::chrono_literals;
using testing::Db;
using testing::make_record;
using testing::make_sink;
using testing::now_ms;
using testing::Receiver;
using testing::request_id;
using testing::submit_range;
using testing::TempDir;

auto soon() {
  return std::chrono::steady_clock::now() + 10s;
}

std::vector<std::string> ids_in(const std::string& body) {
  simdjson::dom::parser p;
  simdjson::dom::element e = p.parse(body);
  std::vector<std::string> out;
  if (e.is_array()) {
    for (auto item : e.get_array()) out.emplace_back(std::string_view(item["request_id"]));
  } else {
    out.emplace_back(std::string_view(e["request_id"]));
  }
  return out;
}

// request_ids of every 2xx-acknowledged POST, in arrival order.
std::vector<std::string> delivered_ids(const Receiver& r) {
  std::vector<std::string> out;
  for (const auto& req : r.accepted()) {
    for (auto& id : ids_in(req.body)) out.push_back(std::move(id));
  }
  return out;
}

std::vector<std::string> expected_ids(int from, int to) {
  std::vector<std::string> out;
  for (int i = from; i < to; ++i) out.push_back(request_id(i));
  return out;
}

const metrics::SinkStats& sink(const metrics::UsageStats& st, const std::string& name) {
  for (const auto& s : st.sinks) {
    if (s.name == name) return s;
  }
  throw std::runtime_error("no sink " + name);
}

std::uint64_t delivered(const Pipeline& p, const std::string& name = "hook") {
  return sink(p.stats(), name).delivered;
}

// The sink "hook" posting to `url` in batches of up to `size`, waiting at most `interval`.
config::SinkConfig batched_sink(const std::string& url, int size,
                                std::chrono::milliseconds interval) {
  auto cfg = make_sink("hook", url);
  cfg.batch_size = size;
  cfg.batch_interval = interval;
  return cfg;
}

// A receiver that takes every request and never answers it (until release_hangs()).
void hang_every_request(Receiver& rx) {
  rx.set_script([](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    r.kind = Receiver::Reply::hang;
    return r;
  });
}

std::string hmac_hex(const std::string& key, const std::string& data) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, &len);
  std::string out;
  char buf[3];
  for (unsigned i = 0; i < len; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", mac[i]);
    out += buf;
  }
  return out;
}

// A backlog (records queued while the writer could not commit) is committed in groups of at most
// 4096 records: one group is one SQLite value, which must stay far below SQLite's 1 GB limit.
TEST(UsagePipeline, ABacklogIsCommittedInBoundedGroups) {
  TempDir dir;
  auto u = testing::disk_config(dir.file("usage.db"));
  u.queue_size = 20'000;
  Pipeline p(u, {});
  constexpr int N = 10'000;
  for (int i = 0; i < N; ++i) ASSERT_TRUE(p.submit(make_record(i)));
  p.start();
  WAIT_FOR(p.stats().logged == N);
  EXPECT_GE(p.stats().commits, 3u);
  p.stop(soon());
  Db db(dir.file("usage.db"));
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), N);
  EXPECT_EQ(db.number("SELECT max(last_seq - first_seq + 1) FROM record_batches"), 4096);
}

TEST(UsagePipeline, DeliversEveryRecordOnceInOrder) {
  TempDir dir;
  Receiver rx;
  auto cfg = make_sink("hook", rx.url("/hooks/usage"));
  cfg.headers = {{"Authorization", "Bearer t0ken"}, {"X-Env", "test"}};
  Pipeline p(testing::disk_config(dir.file("data/usage.db")), {cfg});
  p.start();
  constexpr int N = 200;
  for (int i = 0; i < N; ++i) ASSERT_TRUE(p.submit(make_record(i)));
  WAIT_FOR(delivered(p) == N);

  auto got = rx.accepted();
  ASSERT_EQ(got.size(), static_cast<std::size_t>(N));  // one POST per record, none repeated
  EXPECT_EQ(rx.connections(), 1u);                     // all on one kept-alive connection
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  for (int i = 0; i < N; ++i) {
    const auto& req = got[static_cast<std::size_t>(i)];
    EXPECT_EQ(req.method, "POST");
    EXPECT_EQ(req.target, "/hooks/usage");
    EXPECT_EQ(req.header("content-type"), "application/json");
    EXPECT_EQ(req.header("user-agent"), std::string("llmproxy/") + LLMPROXY_VERSION);
    EXPECT_EQ(req.header("idempotency-key"), request_id(i));
    EXPECT_EQ(req.header("authorization"), "Bearer t0ken");
    EXPECT_EQ(req.header("x-env"), "test");
    EXPECT_EQ(req.header("host"), "127.0.0.1:" + std::to_string(rx.port()));
    EXPECT_EQ(req.header("x-llmproxy-signature"), "");  // no secret configured
    EXPECT_EQ(req.body.front(), '{');  // batch_size 1: the bare object, the seed's format
  }
  auto st = p.stats();
  EXPECT_EQ(st.logged, static_cast<std::uint64_t>(N));
  EXPECT_EQ(st.dropped, 0u);
  EXPECT_GE(st.commits, 1u);
  EXPECT_LE(st.commits, static_cast<std::uint64_t>(N));
  EXPECT_EQ(st.queue_depth, 0);
  EXPECT_EQ(sink(st, "hook").failed, 0u);
  EXPECT_EQ(sink(st, "hook").backlog, 0);
  EXPECT_EQ(sink(st, "hook").delivery_latency.count(), static_cast<std::uint64_t>(N));
  p.stop(soon());

  Db db(dir.file("data/usage.db"));
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), N);
  EXPECT_EQ(db.number("SELECT seq FROM sink_cursors WHERE name='hook'"), N);
  EXPECT_EQ(db.scalar("PRAGMA journal_mode"), "wal");
  // The body is exactly the JSON stored for the record.
  EXPECT_EQ(db.scalar("SELECT json FROM records WHERE seq=1"), got[0].body);
}

TEST(UsagePipeline, BodyIsTheRecordsJson) {
  TempDir dir;
  Receiver rx;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  auto r = make_record(7, 1768386600000);
  r.user_id = "quote\" and \\ and \n";
  ASSERT_TRUE(p.submit(UsageRecord(r)));
  WAIT_FOR(delivered(p) == 1);
  EXPECT_EQ(rx.accepted().at(0).body, to_json(r));
  p.stop(soon());
}

TEST(UsagePipeline, RetriesFailuresUntilDelivered) {
  TempDir dir;
  Receiver rx;
  // Every kind of temporary failure, then success.
  const std::vector<unsigned> failures = {500, 503, 429, 408, 302, 502};
  rx.set_script([&](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n < failures.size()) r.status = failures[n];
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  constexpr int N = 20;
  submit_range(p, 0, N);
  WAIT_FOR(delivered(p) == N);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  auto st = sink(p.stats(), "hook");
  EXPECT_EQ(st.failed, failures.size());  // one record per failed attempt
  EXPECT_EQ(st.dead_letters, 0u);
  // The failed attempts all carried the first record, then it went through once.
  auto all = rx.requests();
  for (std::size_t i = 0; i <= failures.size(); ++i) {
    EXPECT_EQ(all[i].header("idempotency-key"), request_id(0));
  }
  p.stop(soon());
}

TEST(UsagePipeline, ReceiverDownThenUp) {
  TempDir dir;
  std::uint16_t port;
  {
    Receiver probe;  // find a free port, then leave it closed
    port = probe.port();
  }
  auto cfg = make_sink("hook", "http://127.0.0.1:" + std::to_string(port) + "/hook");
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  constexpr int N = 30;
  submit_range(p, 0, N);
  WAIT_FOR(sink(p.stats(), "hook").failed >= 3);  // connection refused, several times
  EXPECT_EQ(delivered(p), 0u);
  EXPECT_EQ(sink(p.stats(), "hook").backlog, N);
  Receiver rx(port);
  WAIT_FOR(delivered(p) == N);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 0);
  p.stop(soon());
}

TEST(UsagePipeline, HangingReceiverTimesOutThenRecovers) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n < 2) r.kind = Receiver::Reply::hang;  // never answers, keeps the connection open
    return r;
  });
  auto cfg = make_sink("hook", rx.url());
  cfg.timeout = 150ms;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  constexpr int N = 10;
  submit_range(p, 0, N);
  WAIT_FOR(delivered(p) == N);
  // Two timeouts (more only if this machine is too loaded to answer within 150 ms).
  EXPECT_GE(sink(p.stats(), "hook").failed, 2u);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  auto all = rx.requests();
  ASSERT_GE(all.size(), static_cast<std::size_t>(N + 2));
  EXPECT_EQ(all[0].answered, 0u);
  EXPECT_EQ(all[1].answered, 0u);
  p.stop(soon());
  rx.release_hangs();
}

TEST(UsagePipeline, ClosedWithoutAnswerIsAFailure) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n < 3) r.kind = Receiver::Reply::close;
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 5);
  WAIT_FOR(delivered(p) == 5);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 5));
  EXPECT_GE(sink(p.stats(), "hook").failed, 1u);
  p.stop(soon());
}

TEST(UsagePipeline, PermanentRejectionIsDeadLetteredNotRetried) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request& req, std::size_t) {
    Receiver::Reply r;
    if (req.header("idempotency-key") == request_id(2)) {
      r.status = 400;
      r.body = std::string("{\"error\":\"bad record\"}") + std::string(2000, 'x');
    }
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 5);
  WAIT_FOR(delivered(p) == 4);
  auto st = sink(p.stats(), "hook");
  EXPECT_EQ(st.dead_letters, 1u);
  EXPECT_EQ(st.failed, 0u);
  EXPECT_EQ(st.backlog, 0);
  // Exactly one POST per record: the rejected one was not retried.
  auto all = rx.requests();
  ASSERT_EQ(all.size(), 5u);
  std::vector<std::string> keys;
  for (const auto& r : all) keys.push_back(r.header("idempotency-key"));
  EXPECT_EQ(keys, expected_ids(0, 5));
  p.stop(soon());

  UsageLog log(UsageLog::Mode::read_only, dir.file("usage.db"));
  auto dead = log.dead_letters();
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].sink, "hook");
  EXPECT_EQ(dead[0].first_seq, 3);
  EXPECT_EQ(dead[0].last_seq, 3);
  EXPECT_EQ(dead[0].request_ids, request_id(2));
  EXPECT_EQ(dead[0].status, 400u);
  EXPECT_EQ(dead[0].response.size(), 1024u);  // the first KiB of the answer
  EXPECT_TRUE(dead[0].response.starts_with("{\"error\":\"bad record\"}"));
  EXPECT_EQ(dead[0].body, all[2].body);
  EXPECT_EQ(log.cursor("hook"), 5);
}

// A rejected record is past the sink's cursor only once its dead letter is stored: while the log
// is locked it stays in the backlog (held against pruning and retention), then is stored.
TEST(UsagePipeline, ARejectionLeavesTheBacklogOnlyWithItsDeadLetterStored) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  Receiver rx;
  std::optional<Db> lock;  // taken by the receiver before it answers the rejection
  rx.set_script([&lock, path](const Receiver::Request&, std::size_t) {
    if (!lock) {
      lock.emplace(path);
      lock->exec("BEGIN IMMEDIATE");
    }
    Receiver::Reply r;
    r.status = 400;
    return r;
  });
  Pipeline p(testing::disk_config(path), {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(sink(p.stats(), "hook").dead_letters == 1);
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 1) << "past the cursor before the dead letter";
  lock->exec("COMMIT");
  WAIT_FOR(sink(p.stats(), "hook").backlog == 0);
  p.stop(soon());
  UsageLog log(UsageLog::Mode::read_only, path);
  ASSERT_EQ(log.dead_letters().size(), 1u);
  EXPECT_EQ(log.cursor("hook"), 1);
  EXPECT_EQ(rx.requests().size(), 1u);
}

// A dead letter ends the failures before it: the next record that fails starts a new outage,
// with its quick retries, instead of going on in the slow lane where the rejected one left off.
// Record 0 is answered 500, 500, then 400; record 1 500, then 204.
TEST(UsagePipeline, ADeadLetterEndsTheFailuresBeforeIt) {
  TempDir dir;
  Receiver rx;
  std::map<std::string, int> seen;
  rx.set_script([&](const Receiver::Request& req, std::size_t) {
    Receiver::Reply r;
    const std::string id = req.header("idempotency-key");
    const int nth = seen[id]++;
    r.status = id == request_id(0) ? (nth < 2 ? 500 : 400) : (nth < 1 ? 500 : 204);
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  ::testing::internal::CaptureStderr();
  p.start();
  submit_range(p, 0, 2);
  const bool done = testing::eventually([&] { return delivered(p) == 1; });
  p.stop(soon());
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(done) << log;
  EXPECT_EQ(sink(p.stats(), "hook").dead_letters, 1u);
  // Each outage is reported when it starts, and the recovery counts its own failure only.
  EXPECT_NE(log.find("delivering again after 1 failed attempt\""), std::string::npos) << log;
  std::size_t reported = 0;
  for (auto at = log.find("failed: HTTP 500"); at != std::string::npos;
       at = log.find("failed: HTTP 500", at + 1)) {
    ++reported;
  }
  EXPECT_EQ(reported, 2u) << log;
}

// A receiver whose body limit a batch exceeds answers 413: the batch is split, not dead-lettered.
// This one takes at most 2 records per POST; batches of 8 must all arrive, in order.
TEST(UsagePipeline, ABatchTooLargeForTheReceiverIsSplit) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request& req, std::size_t) {
    Receiver::Reply r;
    if (ids_in(req.body).size() > 2) r.status = 413;
    return r;
  });
  auto cfg = batched_sink(rx.url(), 8, 100ms);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 8);
  WAIT_FOR(delivered(p) == 8);
  submit_range(p, 8, 16);
  WAIT_FOR(delivered(p) == 16);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 16));
  EXPECT_EQ(sink(p.stats(), "hook").dead_letters, 0u);
  for (const auto& req : rx.accepted()) EXPECT_LE(ids_in(req.body).size(), 2u);
  // Once refused, batches grow back to half the size refused only: the second round had no
  // 413 (doubling back to 4 after each success had every other POST refused).
  const auto all_requests = rx.requests();
  std::size_t refused_in_second_round = 0;
  bool second_round = false;
  for (const auto& req : all_requests) {
    for (const auto& id : ids_in(req.body)) second_round = second_round || id == request_id(8);
    if (second_round && req.answered == 413) ++refused_in_second_round;
  }
  EXPECT_EQ(refused_in_second_round, 0u);
  // Each refused POST failed: its records count in webhook_failure_total, as any failure's.
  std::uint64_t refused = 0;
  for (const auto& req : rx.requests()) {
    if (req.answered == 413) refused += ids_in(req.body).size();
  }
  EXPECT_GT(refused, 0u);
  EXPECT_EQ(sink(p.stats(), "hook").failed, refused);
  // A single record the receiver refuses as too large is a dead letter, as any 4xx.
  Receiver tiny;
  tiny.set_script([](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    r.status = 413;
    return r;
  });
  TempDir dir2;
  Pipeline q(testing::disk_config(dir2.file("usage.db")), {batched_sink(tiny.url(), 4, 100ms)});
  q.start();
  submit_range(q, 0, 4);
  WAIT_FOR(sink(q.stats(), "hook").dead_letters == 4);
  q.stop(soon());
  EXPECT_EQ(tiny.count(), 6u);  // 4 records, then 2, then one at a time: 4 dead letters
}

// A batch refused for one record in it (400, 422) is split until that record is alone: it
// alone is a dead letter, the others are delivered. A refusal of the endpoint (401) is not split.
TEST(UsagePipeline, ARejectedBatchIsSplitToFindTheRecordAtFault) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request& req, std::size_t) {
    Receiver::Reply r;
    for (const auto& id : ids_in(req.body)) {
      if (id == request_id(5)) r.status = 422;
    }
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {batched_sink(rx.url(), 8, 100ms)});
  p.start();
  submit_range(p, 0, 8);
  WAIT_FOR(delivered(p) == 7 && sink(p.stats(), "hook").dead_letters == 1);
  p.stop(soon());
  auto got = delivered_ids(rx);
  std::sort(got.begin(), got.end());
  auto want = expected_ids(0, 8);
  want.erase(want.begin() + 5);
  EXPECT_EQ(got, want);
  UsageLog log(UsageLog::Mode::read_only, dir.file("usage.db"));
  auto dead = log.dead_letters();
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].request_ids, request_id(5));
  EXPECT_EQ(dead[0].status, 422u);
  EXPECT_EQ(log.cursor("hook"), 8);

  Receiver locked;  // a wrong secret: every POST 401
  locked.set_script([](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    r.status = 401;
    return r;
  });
  TempDir dir2;
  Pipeline q(testing::disk_config(dir2.file("usage.db")), {batched_sink(locked.url(), 4, 100ms)});
  q.start();
  submit_range(q, 0, 4);
  WAIT_FOR(sink(q.stats(), "hook").dead_letters == 4);
  q.stop(soon());
  EXPECT_EQ(locked.count(), 1u);
}

// A receiver that refuses every record (400/422 after a schema change): the first split finds no
// record it takes, so the batches after it are dead-lettered whole, not one POST per record; its
// next 2xx ends that.
TEST(UsagePipeline, AReceiverRefusingEveryRecordIsNotSentThemOneByOne) {
  TempDir dir;
  Receiver rx;
  std::atomic<bool> accept{false};
  rx.set_script([&](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    r.status = accept ? 200 : 422;
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {batched_sink(rx.url(), 16, 100ms)});
  submit_range(p, 0, 32);
  p.start();
  WAIT_FOR(sink(p.stats(), "hook").dead_letters == 32);
  EXPECT_LE(rx.count(), 8u);  // 16, 8, 4, 2, 1, then two whole batches
  accept = true;
  submit_range(p, 32, 40);
  WAIT_FOR(delivered(p) == 8);
  submit_range(p, 40, 56);
  WAIT_FOR(delivered(p) == 24);
  p.stop(soon());
  UsageLog log(UsageLog::Mode::read_only, dir.file("usage.db"));
  EXPECT_LE(log.dead_letters().size(), 3u);
}

// A single record answered 413 is a dead letter of its own; the batches after it grow back (the
// size of the split that isolated it says nothing about the receiver's limit).
TEST(UsagePipeline, ARecordTooLargeAloneDoesNotKeepBatchesSmall) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request& req, std::size_t) {
    Receiver::Reply r;
    for (const auto& id : ids_in(req.body)) {
      if (id == request_id(3)) r.status = 413;
    }
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {batched_sink(rx.url(), 16, 100ms)});
  submit_range(p, 0, 16);
  p.start();
  WAIT_FOR(delivered(p) == 15 && sink(p.stats(), "hook").dead_letters == 1);
  submit_range(p, 16, 64);
  WAIT_FOR(delivered(p) == 63);
  p.stop(soon());
  std::size_t largest_after = 0;
  bool after = false;
  for (const auto& req : rx.requests()) {
    const auto ids = ids_in(req.body);
    if (std::find(ids.begin(), ids.end(), request_id(20)) != ids.end()) after = true;
    if (after) largest_after = std::max(largest_after, ids.size());
  }
  EXPECT_GE(largest_after, 8u);
}

// 409 is what a receiver implementing Idempotency-Key answers while an earlier attempt with the
// same key is still being processed (425: too early): retried, not a dead letter.
TEST(UsagePipeline, ConflictAndTooEarlyAreRetried) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t i) {
    Receiver::Reply r;
    r.status = i == 0 ? 409 : i == 1 ? 425 : 200;
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(delivered(p) == 1);
  p.stop(soon());
  EXPECT_EQ(sink(p.stats(), "hook").dead_letters, 0u);
  EXPECT_EQ(rx.count(), 3u);
}

// A receiver on a raw socket that takes POSTs up to `limit` bytes of body (200) and treats a larger
// one as `large` says: answer 413 from the header and close with the body unread (which resets the
// sender's write), or stop reading and never answer (the sender's write stalls). It records each
// POST's Content-Length, in order.
class LimitedReceiver {
 public:
  enum class Large { refuse_early, stall };
  LimitedReceiver(std::size_t limit, Large large) : limit_(limit), large_(large) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 16) != 0) {
      throw std::runtime_error("LimitedReceiver: cannot listen");
    }
    socklen_t alen = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &alen);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~LimitedReceiver() {
    stopping_ = true;
    thread_.join();
    ::close(fd_);
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/hook"; }
  std::vector<std::size_t> lengths() {
    std::lock_guard lk(mu_);
    return lengths_;
  }

 private:
  void run() {
    std::vector<int> stalled;  // connections left unread until the end
    while (!stopping_) {
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, 50) <= 0) continue;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      if (!serve(c)) {
        stalled.push_back(c);
        continue;
      }
      ::close(c);
    }
    for (int c : stalled) ::close(c);
  }
  // false: the connection stalls (left open, unread).
  bool serve(int c) {
    for (;;) {  // requests on this connection
      std::string in;
      char buf[65536];
      std::size_t end;
      while ((end = in.find("\r\n\r\n")) == std::string::npos) {
        pollfd pfd{c, POLLIN, 0};
        if (stopping_) return true;
        if (::poll(&pfd, 1, 50) <= 0) continue;
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) return true;
        in.append(buf, static_cast<std::size_t>(n));
      }
      std::string head = in.substr(0, end);
      for (auto& ch : head) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      const auto at = head.find("content-length:");
      const std::size_t length = at == std::string::npos ? 0 : std::stoul(head.substr(at + 15));
      {
        std::lock_guard lk(mu_);
        lengths_.push_back(length);
      }
      if (length > limit_) {
        if (large_ == Large::stall) return false;
        const std::string no = "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n";
        ::send(c, no.data(), no.size(), MSG_NOSIGNAL);
        return true;  // closed with the body unread: the sender's write is reset
      }
      std::size_t have = in.size() - end - 4;
      while (have < length) {
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) return true;
        have += static_cast<std::size_t>(n);
      }
      const std::string ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
      ::send(c, ok.data(), ok.size(), MSG_NOSIGNAL);
    }
  }

  std::size_t limit_;
  Large large_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::size_t> lengths_;
};

// Sends ~5 MB of records in one batch to `rx` and expects all delivered, the sizes over the limit
// decreasing, none sent more than `max_repeat` times.
void expect_halved_until_taken(LimitedReceiver& rx, std::size_t limit,
                               std::chrono::milliseconds timeout, int max_repeat) {
  TempDir dir;
  auto cfg = batched_sink(rx.url(), 20000, 100ms);
  cfg.timeout = timeout;
  cfg.max_backoff = 200ms;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  constexpr int kRecords = 12000;  // ~5 MB in one batch
  submit_range(p, 0, kRecords);    // all logged before the sink reads the first batch
  p.start();
  const bool done = testing::eventually([&] { return delivered(p) == kRecords; });
  p.stop(soon());
  ASSERT_TRUE(done);
  EXPECT_EQ(sink(p.stats(), "hook").dead_letters, 0u);
  std::map<std::size_t, int> sent;  // POSTs per size over the limit
  std::size_t last = SIZE_MAX;
  for (const std::size_t length : rx.lengths()) {
    if (length <= limit) continue;
    EXPECT_LE(length, last) << "a larger batch after a smaller one was refused";
    last = length;
    EXPECT_LE(++sent[length], max_repeat) << length << " bytes sent again";
  }
  EXPECT_GE(sent.size(), 1u);
  EXPECT_LE(sent.size(), 5u);
}

// A receiver that refuses a large POST from its header (413 by Content-Length) answers and closes
// without reading the body: the sender's write fails, but the answer is read and the batch split.
// Before, the failed send was a network error and the same batch went again, unchanged.
TEST(UsagePipeline, AnAnswerSentBeforeTheBodyWasReadIsRead) {
  constexpr std::size_t kLimit = 512 * 1024;
  LimitedReceiver rx(kLimit, LimitedReceiver::Large::refuse_early);
  expect_halved_until_taken(rx, kLimit, 10s, 1);
}

// A batch whose body cannot all be sent within `timeout` (the receiver stops reading) is retried
// in halves, not unchanged for ever; one sent whole whose answer does not come in time is sent
// again unchanged, with the same Idempotency-Key (the receiver may have taken it), and in halves
// only after three such POSTs.
TEST(UsagePipeline, ABatchThatCannotBeSentInTimeIsRetriedInHalves) {
  constexpr std::size_t kLimit = 512 * 1024;
  LimitedReceiver rx(kLimit, LimitedReceiver::Large::stall);
  expect_halved_until_taken(rx, kLimit, 500ms, 3);

  TempDir dir;
  Receiver slow;  // answers the first POST too late, then at once
  slow.set_script([](const Receiver::Request&, std::size_t i) {
    Receiver::Reply r;
    if (i == 0) r.kind = Receiver::Reply::hang;
    return r;
  });
  auto cfg = batched_sink(slow.url(), 8, 100ms);
  cfg.timeout = 300ms;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  submit_range(p, 0, 8);
  p.start();
  const bool done = testing::eventually([&] { return delivered(p) == 8; });
  slow.release_hangs();
  p.stop(soon());
  ASSERT_TRUE(done);
  const auto all = slow.requests();
  ASSERT_GE(all.size(), 2u);
  EXPECT_EQ(all[1].header("idempotency-key"), all[0].header("idempotency-key"));
  EXPECT_EQ(all[1].body, all[0].body);
}

// The log's file deleted or replaced while the gateway writes it: the gateway goes on in the file
// it opened (nothing is lost while it runs), but says so, in the log and in its stats (a metric),
// and says when the file is back.
TEST(UsagePipeline, ALogFileDeletedOrReplacedIsReported) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  Pipeline p(testing::disk_config(path), {});
  ::testing::internal::CaptureStderr();
  p.start();
  submit_range(p, 0, 3);
  WAIT_FOR(p.stats().logged == 3);
  EXPECT_FALSE(p.stats().log_file_lost);
  std::filesystem::rename(path, path + ".moved");
  EXPECT_TRUE(p.stats().log_file_lost);
  submit_range(p, 3, 6);
  WAIT_FOR(p.stats().logged == 6);  // still committed, to the file it opened
  {
    std::ofstream other(path);  // another file in its place is no better
    other << "x";
  }
  EXPECT_TRUE(p.stats().log_file_lost);
  std::filesystem::rename(path + ".moved", path);
  EXPECT_FALSE(p.stats().log_file_lost);
  p.stop(soon());
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("the file was deleted or replaced while the gateway writes it"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("the file is back"), std::string::npos) << log;
  UsageLog reread(UsageLog::Mode::read_only, path);
  EXPECT_EQ(reread.count_records(), 6);
}

// A receiver that answers 200 and then sends its body without end (a streaming endpoint behind
// a wrong URL): the status is the answer, the body is drained only up to a bound, and the next
// POST goes out on a new connection. Before, the sink read that body for ever, busy, with the
// record never counted and every later one waiting behind it.
TEST(UsagePipeline, AnAnswerBodyWithoutEndDoesNotHoldTheSink) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n == 0) r.kind = Receiver::Reply::endless;
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  // On a failed wait the receiver stops before the pipeline is destroyed, or that would wait on
  // a sink still reading.
  struct StopFirst {
    Receiver& r;
    ~StopFirst() { r.stop(); }
  } stop_first{rx};
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(delivered(p) == 1);
  submit_range(p, 1, 3);
  WAIT_FOR(delivered(p) == 3);
  p.stop(soon());
  EXPECT_EQ(rx.count(), 3u);  // no POST sent twice
  EXPECT_EQ(rx.connections(), 2u);
  EXPECT_EQ(sink(p.stats(), "hook").failed, 0u);
}

// A POST in flight when the pipeline stops is cut at the stop deadline, not at its own timeout
// (here 10 minutes): a shutdown takes the few seconds documented, and the record waits in the
// log for the next start.
TEST(UsagePipeline, StopCutsAPostInFlightAtItsDeadline) {
  TempDir dir;
  Receiver rx;
  hang_every_request(rx);
  auto cfg = make_sink("hook", rx.url());
  cfg.timeout = std::chrono::minutes(10);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(rx.count() == 1);
  auto stopped = std::async(std::launch::async, [&p] { p.stop(std::chrono::steady_clock::now()); });
  // Bounded wait, far below the POST's timeout; on failure the receiver lets the POST go.
  const bool in_time = stopped.wait_for(std::chrono::minutes(2)) == std::future_status::ready;
  if (!in_time) rx.release_hangs();
  stopped.wait();
  EXPECT_TRUE(in_time) << "stop() waited for the POST's own timeout";
  EXPECT_EQ(delivered(p), 0u);
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 1);
  rx.release_hangs();
}

// A webhook URL's query goes out in the request-target, also when the URL has no path.
TEST(UsagePipeline, PostsToTheUrlsQuery) {
  TempDir dir;
  Receiver rx;
  auto bare = make_sink("bare", "http://127.0.0.1:" + std::to_string(rx.port()) + "?code=a%2Fb");
  Pipeline p(testing::disk_config(dir.file("usage.db")),
             {make_sink("hook", rx.url("/hooks/usage?token=t1&x=y")), bare});
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(delivered(p, "hook") == 1 && delivered(p, "bare") == 1);
  p.stop(soon());
  std::multiset<std::string> targets;
  for (const auto& r : rx.requests()) targets.insert(r.target);
  EXPECT_EQ(targets, (std::multiset<std::string>{"/?code=a%2Fb", "/hooks/usage?token=t1&x=y"}));
}

TEST(UsagePipeline, BatchesAreArraysAndEveryRecordArrivesOnce) {
  TempDir dir;
  Receiver rx;
  auto cfg = batched_sink(rx.url(), 7, 30ms);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  constexpr int N = 100;
  submit_range(p, 0, N);
  WAIT_FOR(delivered(p) == N);
  p.stop(soon());
  auto got = rx.accepted();
  for (const auto& req : got) {
    ASSERT_EQ(req.body.front(), '[');
    auto ids = ids_in(req.body);
    EXPECT_GE(ids.size(), 1u);
    EXPECT_LE(ids.size(), 7u);
    EXPECT_EQ(req.header("idempotency-key"), ids.front() + "+" + std::to_string(ids.size()));
  }
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  EXPECT_EQ(rx.requests().size(), got.size());
}

// A sink stores its cursor at most every 100 ms while batches follow each other, but always
// before it waits for records: once everything is delivered the stored cursor is the head,
// with the gateway still running (a kill -9 now would re-send nothing).
TEST(UsagePipeline, CursorIsStoredBeforeTheSinkWaits) {
  TempDir dir;
  Receiver rx;
  auto cfg = batched_sink(rx.url(), 10, 20ms);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  constexpr int N = 2000;
  submit_range(p, 0, N);
  WAIT_FOR(delivered(p) == N);
  UsageLog log(UsageLog::Mode::read_only, dir.file("usage.db"));
  WAIT_FOR(log.cursor("hook").value_or(0) == N);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
}

// The sink's backoff after a failure is a wait too: what it delivered before the failure is
// stored then, not only at exit (deliveries within 100 ms of a store are otherwise not stored).
TEST(UsagePipeline, CursorIsStoredBeforeABackoff) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n >= 5) r.status = 503;  // five records go through, then the receiver fails
    return r;
  });
  auto cfg = make_sink("hook", rx.url());
  cfg.max_backoff = 50ms;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 10);
  WAIT_FOR(sink(p.stats(), "hook").failed >= 1);
  EXPECT_EQ(delivered(p), 5u);
  UsageLog log(UsageLog::Mode::read_only, dir.file("usage.db"));
  WAIT_FOR(log.cursor("hook").value_or(0) == 5);
  p.stop(soon());
}

TEST(UsagePipeline, BatchFillsUpToBatchIntervalThenGoes) {
  TempDir dir;
  Receiver rx;
  auto cfg = batched_sink(rx.url(), 1000, 50ms);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 3);
  // Far fewer than batch_size: sent anyway once batch_interval has passed.
  WAIT_FOR(delivered(p) == 3);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 3));
  p.stop(soon());
}

TEST(UsagePipeline, FailedBatchIsResentUnchanged) {
  TempDir dir;
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n < 3) r.status = 503;
    return r;
  });
  auto cfg = batched_sink(rx.url(), 5, 500ms);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  // Queue everything before start so that the first batch is full.
  submit_range(p, 0, 12);
  p.start();
  WAIT_FOR(delivered(p) == 12);
  auto all = rx.requests();
  ASSERT_GE(all.size(), 4u);
  for (std::size_t i = 1; i < 4; ++i) {
    EXPECT_EQ(all[i].body, all[0].body);
    EXPECT_EQ(all[i].header("idempotency-key"), all[0].header("idempotency-key"));
  }
  EXPECT_EQ(all[0].header("idempotency-key"), request_id(0) + "+5");
  EXPECT_EQ(sink(p.stats(), "hook").failed, 15u);  // 3 attempts x 5 records
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 12));
  p.stop(soon());
}

TEST(UsagePipeline, SignsBodiesWithHmac) {
  TempDir dir;
  Receiver rx;
  auto cfg = make_sink("hook", rx.url());
  cfg.secret = "s3cret-key";
  for (int batch : {1, 4}) {
    cfg.name = "hook" + std::to_string(batch);
    cfg.batch_size = batch;
    Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
    p.start();
    submit_range(p, 0, 8);
    WAIT_FOR(delivered(p, cfg.name) == 8);
    p.stop(soon());
  }
  auto all = rx.accepted();
  ASSERT_FALSE(all.empty());
  std::int64_t now_s = now_ms() / 1000;
  for (const auto& req : all) {
    std::string ts = req.header("x-llmproxy-timestamp");
    ASSERT_FALSE(ts.empty());
    EXPECT_LE(std::abs(std::stoll(ts) - now_s), 60);
    EXPECT_EQ(req.header("x-llmproxy-signature"),
              "sha256=" + hmac_hex("s3cret-key", ts + "." + req.body));
    EXPECT_NE(req.header("x-llmproxy-signature"),
              "sha256=" + hmac_hex("other-key", ts + "." + req.body));
  }
}

TEST(UsagePipeline, RestartResumesFromTheStoredCursor) {
  TempDir dir;
  std::string path = dir.file("usage.db");
  std::vector<std::string> received;
  std::uint16_t port;
  {
    Receiver rx;
    port = rx.port();
    auto cfg = make_sink("hook", rx.url());
    Pipeline p(testing::disk_config(path), {cfg});
    p.start();
    submit_range(p, 0, 10);
    WAIT_FOR(delivered(p) == 10);
    rx.stop();  // the receiver goes away
    submit_range(p, 10, 25);
    WAIT_FOR(p.stats().logged == 25 && sink(p.stats(), "hook").failed > 0);
    p.stop(std::chrono::steady_clock::now() + 100ms);
    EXPECT_EQ(sink(p.stats(), "hook").backlog, 15);
    received = delivered_ids(rx);
  }
  {
    Db db(path);
    EXPECT_EQ(db.number("SELECT seq FROM sink_cursors WHERE name='hook'"), 10);
    EXPECT_EQ(db.number("SELECT count(*) FROM records"), 25);
  }
  Receiver rx(port);
  Pipeline p(testing::disk_config(path),
             {make_sink("hook", "http://127.0.0.1:" + std::to_string(port) + "/hook")});
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 15);
  p.start();
  WAIT_FOR(delivered(p) == 15);
  p.stop(soon());
  for (auto& id : delivered_ids(rx)) received.push_back(id);
  EXPECT_EQ(received, expected_ids(0, 25));  // each once, in order, across the restart
}

TEST(UsagePipeline, StopDeliversTheBacklogBeforeTheDeadline) {
  TempDir dir;
  Receiver rx;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 50);
  p.stop(soon());  // right away: the queue is drained into the log, then delivered
  EXPECT_EQ(p.stats().logged, 50u);
  EXPECT_EQ(delivered(p), 50u);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 50));
  p.stop(soon());                           // twice is fine
  EXPECT_FALSE(p.submit(make_record(99)));  // after stop: dropped and counted
  EXPECT_EQ(p.stats().dropped, 1u);
}

TEST(UsagePipeline, StopWithoutStartStillCommits) {
  TempDir dir;
  {
    Pipeline p(testing::disk_config(dir.file("usage.db")), {});
    submit_range(p, 0, 5);
  }  // destructor stops
  Db db(dir.file("usage.db"));
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), 5);
}

TEST(UsagePipeline, NewSinkStartsAtHeadUnlessReplay) {
  TempDir dir;
  std::string path = dir.file("usage.db");
  Receiver a, b, c;
  {
    Pipeline p(testing::disk_config(path), {make_sink("a", a.url())});
    p.start();
    submit_range(p, 0, 5);
    WAIT_FOR(delivered(p, "a") == 5);
    p.stop(soon());
  }
  auto sb = make_sink("b", b.url());
  auto sc = make_sink("c", c.url());
  sc.replay = true;
  auto disabled = make_sink("off", a.url());
  disabled.enabled = false;
  Pipeline p(testing::disk_config(path), {make_sink("a", a.url()), sb, sc, disabled});
  EXPECT_EQ(p.stats().sinks.size(), 3u);  // the disabled sink is not run
  p.start();
  submit_range(p, 5, 8);
  WAIT_FOR(delivered(p, "a") == 3 && delivered(p, "b") == 3 && delivered(p, "c") == 8);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(a), expected_ids(0, 8));
  EXPECT_EQ(delivered_ids(b), expected_ids(5, 8));
  EXPECT_EQ(delivered_ids(c), expected_ids(0, 8));
}

// A sink that comes back after retention deleted records it had not delivered resumes after the
// gap: its cursor moves past it (stored), and its backlog counts only what it will deliver.
TEST(UsagePipeline, ASinkResumesAfterRecordsDeletedBeforeItDeliveredThem) {
  TempDir dir;
  std::string path = dir.file("usage.db");
  {
    Receiver rx;
    Pipeline p(testing::disk_config(path), {make_sink("old", rx.url())});
    p.start();
    submit_range(p, 0, 2);
    WAIT_FOR(delivered(p, "old") == 2);
    p.stop(soon());
  }
  {
    Pipeline p(testing::disk_config(path), {});  // "old" not configured meanwhile
    p.start();
    for (int i = 2; i < 10; ++i) {
      p.submit(make_record(i));
      WAIT_FOR(p.stats().logged == static_cast<std::uint64_t>(i - 1));  // one commit each
    }
    p.stop(soon());
  }
  {
    UsageLog log(UsageLog::Mode::disk, path, true);
    // seq 1..6: 1 and 2 delivered to "old", 3..6 never
    EXPECT_EQ(log.delete_records(6, std::nullopt, 100), 6);
  }
  Receiver rx;
  Pipeline p(testing::disk_config(path), {make_sink("old", rx.url())});
  EXPECT_EQ(sink(p.stats(), "old").backlog, 4);  // seq 7..10, not 8
  EXPECT_EQ(UsageLog(UsageLog::Mode::read_only, path, false).cursor("old"), 6);
  p.start();
  WAIT_FOR(delivered(p, "old") == 4);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(rx), expected_ids(6, 10));
}

// A stored cursor past the log's head (the file lost its newest records after the sink had them:
// a repair, an older copy put back): the sink resumes at the head, so the records that now get
// those seqs are delivered, not taken for delivered.
TEST(UsagePipeline, ACursorPastTheHeadResumesAtTheHead) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  {
    Pipeline p(testing::disk_config(path), {});
    submit_range(p, 0, 3);
    p.stop(soon());
  }
  Db(path).exec("INSERT INTO sink_cursors(name, seq, updated_ms) VALUES('hook', 50, 0)");
  Receiver rx;
  Pipeline p(testing::disk_config(path), {make_sink("hook", rx.url())});
  EXPECT_EQ(UsageLog(UsageLog::Mode::read_only, path, false).cursor("hook"), 3);
  p.start();
  submit_range(p, 3, 5);
  WAIT_FOR(delivered(p) == 2);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(rx), expected_ids(3, 5));
}

// Records that vanish from the file, not deleted (damage SQLite does not notice, rows deleted
// around the log's trigger), stop a sink as damage does: never skipped, counted in
// llmproxy_usage_sink_read_errors_total{kind="damaged"}. Both places a sink meets them: ahead of
// its cursor at start, and after it while running.
TEST(UsagePipeline, RecordsLostFromTheFileStopTheSinkWithoutSkippingThem) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  Receiver rx;
  rx.set_script([](const Receiver::Request&, std::size_t n) {
    Receiver::Reply r;
    if (n == 0) r.kind = Receiver::Reply::hang;  // record 1's first POST waits
    return r;
  });
  {
    Pipeline p(testing::disk_config(path), {make_sink("hook", rx.url())});
    p.start();
    submit_range(p, 0, 1);
    WAIT_FOR(rx.count() == 1);
    submit_range(p, 1, 5);
    WAIT_FOR(p.stats().logged == 5);
    Db(path).exec(
        "DROP TRIGGER record_batches_keep_head; DELETE FROM record_batches WHERE last_seq > 1");
    rx.release_hangs();  // record 1 is sent again and delivered; 2..5 are gone
    WAIT_FOR(sink(p.stats(), "hook").reads_damaged > 0);
    EXPECT_EQ(delivered(p), 1u);
    EXPECT_EQ(sink(p.stats(), "hook").backlog, 4);
    p.stop(soon());
  }
  EXPECT_EQ(UsageLog(UsageLog::Mode::read_only, path, false).cursor("hook"), 1);
  // At start: seq 1-3 deleted (retention), 4-6 lost, 7-9 in the log, the sink's cursor at 0. It
  // moves past the deleted records only, and stops at 4.
  const std::string start_path = dir.file("start.db");
  {
    UsageLog log(UsageLog::Mode::disk, start_path, true);
    std::vector<std::string> jsons;
    for (int i = 0; i < 9; ++i) jsons.push_back(to_json(make_record(i)));
    for (int group = 0; group < 3; ++group) {
      std::vector<PendingRecord> batch;
      for (int k = 0; k < 3; ++k) {
        batch.push_back({0, 1, jsons[static_cast<std::size_t>(3 * group + k)]});
      }
      log.append(batch);
    }
    log.set_cursor("hook", 0, 0);
    EXPECT_EQ(log.delete_records(3, std::nullopt, 100), 3);
  }
  Db(start_path)
      .exec(
          "DROP TRIGGER record_batches_keep_head; DELETE FROM record_batches WHERE first_seq = 4");
  Receiver rx2;
  Pipeline p(testing::disk_config(start_path), {make_sink("hook", rx2.url())});
  EXPECT_EQ(UsageLog(UsageLog::Mode::read_only, start_path, false).cursor("hook"), 3);
  p.start();
  WAIT_FOR(sink(p.stats(), "hook").reads_damaged > 0);
  EXPECT_EQ(delivered(p), 0u);
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 6);
  p.stop(soon());
  EXPECT_EQ(rx2.count(), 0u);
}

// An interim answer (100 Continue, 103 Early Hints) is skipped, not taken for the final one: a
// client that did would read every later answer one POST late and count a record as delivered
// on the answer to the one before. The first POST gets "100, 103, then 204"; every later
// record's first POST a 500 and its retry a 204.
TEST(UsagePipeline, SkipsInterimAnswers) {
  TempDir dir;
  Receiver rx;
  std::map<std::string, int> seen;
  rx.set_script([&](const Receiver::Request& req, std::size_t index) {
    Receiver::Reply r;
    r.body.clear();
    if (index == 0) {
      r.interim = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n";
      r.status = 204;
    } else {
      r.status = seen[ids_in(req.body).front()]++ == 0 ? 500 : 204;
    }
    return r;
  });
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("hook", rx.url())});
  p.start();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(p.submit(make_record(i)));
    WAIT_FOR(delivered(p) == static_cast<std::uint64_t>(i + 1));
  }
  p.stop(soon());
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 3));
  EXPECT_EQ(rx.count(), 5u);  // 204; 500, 204; 500, 204
  EXPECT_EQ(sink(p.stats(), "hook").failed, 2u);
  EXPECT_EQ(rx.connections(), 1u);  // the connection stayed in step, so it was kept
}

// A receiver's Retry-After (seconds) is waited out before the next attempt, although the quick
// retries would come back at once: the retry arrives no earlier than the answer asked.
TEST(UsagePipeline, WaitsOutRetryAfter) {
  TempDir dir;
  Receiver rx;
  std::vector<std::chrono::steady_clock::time_point> at;
  rx.set_script([&](const Receiver::Request&, std::size_t index) {
    at.push_back(std::chrono::steady_clock::now());
    Receiver::Reply r;
    if (index == 0) {
      r.status = 429;
      r.fields = "Retry-After: 1\r\n";
    }
    return r;
  });
  auto cfg = make_sink("hook", rx.url());
  cfg.max_backoff = std::chrono::milliseconds(5000);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  ASSERT_TRUE(p.submit(make_record(0)));
  WAIT_FOR(delivered(p) == 1);
  p.stop(soon());
  ASSERT_EQ(rx.count(), 2u);
  EXPECT_GE(at[1] - at[0], std::chrono::seconds(1));
}

// Hot reload: a sink kept as it was keeps going, an added one starts at the head, a changed one
// resumes at its own cursor (nothing delivered twice, nothing skipped) with its counters, and a
// removed one stops; its deliveries stay in the totals.
TEST(UsagePipeline, ReconfigureAddsChangesAndRemovesSinks) {
  TempDir dir;
  Receiver a, a2, b;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("a", a.url())});
  p.start();
  submit_range(p, 0, 5);
  WAIT_FOR(delivered(p, "a") == 5);

  EXPECT_NE(p.reconfigure({make_sink("a", a.url()), make_sink("b", b.url())}), "");
  submit_range(p, 5, 10);
  WAIT_FOR(delivered(p, "a") == 10 && delivered(p, "b") == 5);
  EXPECT_EQ(a.connections(), 1u);  // "a" was not restarted: same kept-alive connection

  p.reconfigure({make_sink("a", a2.url("/moved"))});  // "a" changed, "b" removed
  submit_range(p, 10, 15);
  WAIT_FOR(delivered(p, "a") == 15);
  auto st = p.stats();
  ASSERT_EQ(st.sinks.size(), 1u);
  EXPECT_EQ(st.sinks[0].name, "a");
  EXPECT_EQ(st.removed_delivered, 5u);  // "b"'s deliveries stay in the seed's totals
  p.stop(soon());
  EXPECT_EQ(delivered_ids(a), expected_ids(0, 10));
  EXPECT_EQ(delivered_ids(a2), expected_ids(10, 15));
  EXPECT_EQ(a2.accepted().front().target, "/moved");
  EXPECT_EQ(delivered_ids(b), expected_ids(5, 10));  // nothing after its removal
  Db db(dir.file("usage.db"));
  EXPECT_EQ(db.number("SELECT seq FROM sink_cursors WHERE name='a'"), 15);
  EXPECT_EQ(db.number("SELECT seq FROM sink_cursors WHERE name='b'"), 10);
}

TEST(UsagePipeline, ReconfigureWithAnInvalidSinkChangesNothing) {
  TempDir dir;
  Receiver a;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("a", a.url())});
  p.start();
  EXPECT_THROW(p.reconfigure({make_sink("a", "ftp://nowhere/x")}), std::runtime_error);
  EXPECT_THROW(p.reconfigure({make_sink("a", a.url()), make_sink("a", a.url("/2"))}),
               std::runtime_error);
  submit_range(p, 0, 3);
  WAIT_FOR(delivered(p, "a") == 3);
  EXPECT_EQ(a.connections(), 1u);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(a), expected_ids(0, 3));
}

// The settled time is stored about every second, after the records queued before it was taken
// (here held back by another process's lock on the log), and once more at a clean stop.
TEST(UsagePipeline, TheSettledTimeWaitsForTheRecordsQueuedBeforeIt) {
  TempDir dir;
  const std::string path = dir.file("usage.db");
  // Times after the start (which a new log is settled up to): one a minute ahead, and so on.
  const std::int64_t t0 = now_ms() + 60'000;
  const auto at = [&](int k) { return std::to_string(t0 + 1000 * k); };
  std::atomic<std::int64_t> source{t0};
  auto owned =
      std::make_unique<Pipeline>(testing::disk_config(path), std::vector<config::SinkConfig>{});
  Pipeline& p = *owned;
  p.set_settled_source([&] { return source.load(); });
  p.start();
  Db db(path);
  const auto settled = [&] { return db.scalar("SELECT coalesce(max(ms), 0) FROM settled"); };
  WAIT_FOR(settled() == at(0));
  {
    Db lock(path);
    lock.exec("BEGIN IMMEDIATE");
    submit_range(p, 0, 1);
    source = t0 + 1000;
    // Two candidates' worth of time (one a second): nothing is stored before the record.
    std::this_thread::sleep_for(2500ms);
    EXPECT_EQ(settled(), at(0));
    lock.exec("COMMIT");
  }
  WAIT_FOR(settled() == at(1));
  EXPECT_EQ(db.scalar("SELECT count(*) FROM record_batches"), "1");
  // A clean stop stores the source's last time, marked clean (a start after it finds no gap).
  source = t0 + 2000;
  p.stop(soon());
  EXPECT_EQ(settled(), at(2));
  EXPECT_EQ(db.scalar("SELECT clean FROM settled"), "1");
  owned.reset();  // its lock on the log goes with it
  // A start that fails before its workers run (the source says 0) does not move it back.
  {
    std::atomic<std::int64_t> none{0};
    Pipeline again(testing::disk_config(path), {});
    again.set_settled_source([&] { return none.load(); });
    again.start();
    again.stop(soon());
  }
  EXPECT_EQ(settled(), at(2));
  EXPECT_EQ(db.scalar("SELECT count(*) FROM unsettled_gaps"), "0");
}

// A reload whose new sink cannot start (here: the log is locked by another writer, so its cursor
// cannot be stored) changes nothing: the sink it would have changed runs again as it was, instead
// of being left stopped with its records unprotected, and the reload fails.
TEST(UsagePipeline, ReconfigureThatCannotStartASinkKeepsTheSinksAsTheyWere) {
  TempDir dir;
  Receiver a, a2, b;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("a", a.url())});
  p.start();
  submit_range(p, 0, 3);
  WAIT_FOR(delivered(p, "a") == 3);
  {
    Db lock(dir.file("usage.db"));
    lock.exec("BEGIN IMMEDIATE");
    EXPECT_THROW(p.reconfigure({make_sink("a", a2.url("/moved")), make_sink("b", b.url())}),
                 std::runtime_error);
    lock.exec("COMMIT");
  }
  submit_range(p, 3, 6);
  WAIT_FOR(delivered(p, "a") == 6);
  auto st = p.stats();
  ASSERT_EQ(st.sinks.size(), 1u);
  EXPECT_EQ(st.sinks[0].name, "a");
  p.stop(soon());
  EXPECT_EQ(delivered_ids(a), expected_ids(0, 6));
  EXPECT_TRUE(a2.accepted().empty());
  EXPECT_TRUE(b.accepted().empty());
}

// A reload rolled back stores no cursor for the sinks it would have added: added later, such a
// sink starts at the head of that later time, not where the failed reload stood.
TEST(UsagePipeline, ReconfigureRolledBackLeavesNoCursorForItsNewSinks) {
  TempDir dir;
  Receiver a, b, c;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {make_sink("a", a.url())});
  p.start();
  submit_range(p, 0, 3);
  WAIT_FOR(delivered(p, "a") == 3);
  {
    Db lock(dir.file("usage.db"));
    lock.exec("BEGIN IMMEDIATE");
    EXPECT_THROW(
        p.reconfigure({make_sink("a", a.url()), make_sink("b", b.url()), make_sink("c", c.url())}),
        std::runtime_error);
    lock.exec("COMMIT");
  }
  {
    Db db(dir.file("usage.db"));
    EXPECT_EQ(db.number("SELECT count(*) FROM sink_cursors WHERE name IN ('b','c')"), 0);
  }
  submit_range(p, 3, 6);
  WAIT_FOR(delivered(p, "a") == 6);
  p.reconfigure({make_sink("a", a.url()), make_sink("b", b.url())});
  submit_range(p, 6, 8);
  WAIT_FOR(delivered(p, "b") == 2);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(b), expected_ids(6, 8));
  EXPECT_EQ(delivered_ids(a), expected_ids(0, 8));
  EXPECT_TRUE(c.accepted().empty());
}

// A sink stuck retrying (receiver failing, backoff) is replaced at once by a reload that fixes
// its URL, and the new one delivers the backlog from the cursor.
TEST(UsagePipeline, ReconfigureReplacesASinkInBackoff) {
  TempDir dir;
  Receiver bad, good;
  bad.set_script([](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    r.status = 500;
    return r;
  });
  auto cfg = make_sink("hook", bad.url());
  cfg.retry = 0;
  cfg.max_backoff = std::chrono::milliseconds(60'000);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 4);
  WAIT_FOR(sink(p.stats(), "hook").failed >= 2);  // in the slow lane now
  p.reconfigure({make_sink("hook", good.url())});
  WAIT_FOR(delivered(p) == 4);
  EXPECT_GE(sink(p.stats(), "hook").failed, 2u);  // counters carried over
  p.stop(soon());
  EXPECT_EQ(delivered_ids(good), expected_ids(0, 4));
}

// A reload that changes a sink whose receiver hangs cuts the POST in flight: reconfigure() runs
// on the thread of health checks and signals, and waited out the POST's timeout (here 10
// minutes) before. The successor sends the record again, to the new URL.
TEST(UsagePipeline, ReconfigureCutsAPostInFlight) {
  TempDir dir;
  Receiver hung, good;
  hang_every_request(hung);
  auto cfg = make_sink("hook", hung.url());
  cfg.timeout = std::chrono::minutes(10);
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  submit_range(p, 0, 1);
  WAIT_FOR(hung.count() == 1);
  auto next = cfg;
  next.url = good.url();
  auto reloaded = std::async(std::launch::async, [&p, next] { p.reconfigure({next}); });
  // Bounded wait, far below the POST's timeout; on failure the receiver lets the POST go.
  const bool in_time = reloaded.wait_for(std::chrono::minutes(2)) == std::future_status::ready;
  if (!in_time) hung.release_hangs();
  reloaded.wait();
  EXPECT_TRUE(in_time) << "reconfigure() waited for the POST's own timeout";
  WAIT_FOR(delivered(p) == 1);
  p.stop(soon());
  EXPECT_EQ(delivered_ids(good), expected_ids(0, 1));
  EXPECT_EQ(sink(p.stats(), "hook").failed, 0u);  // a cut is not the receiver failing
  hung.release_hangs();
}

TEST(UsagePipeline, MemoryDurabilityDelivers) {
  Receiver rx;
  config::UsageConfig u;
  u.durability = config::Durability::memory;
  Pipeline p(u, {make_sink("hook", rx.url())});
  p.start();
  submit_range(p, 0, 50);
  WAIT_FOR(delivered(p) == 50);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, 50));
  EXPECT_EQ(p.stats().logged, 50u);
  p.stop(soon());
}

// durability: memory holding at most 5 records, a queue of 10, and one sink whose receiver answers
// 500 while `failing`: of the 30 records submitted, 5 are logged and the rest wait in the queue.
constexpr int kStalledRecords = 30;
std::unique_ptr<Pipeline> stalled_memory_pipeline(Receiver& rx, const std::atomic<bool>& failing) {
  rx.set_script([&failing](const Receiver::Request&, std::size_t) {
    Receiver::Reply r;
    if (failing) r.status = 500;
    return r;
  });
  config::UsageConfig u;
  u.durability = config::Durability::memory;
  u.memory_max_records = 5;
  u.queue_size = 10;
  u.on_backlog = config::OnBacklog::reject;
  auto p = std::make_unique<Pipeline>(u, std::vector{make_sink("hook", rx.url())});
  p->start();
  for (int i = 0; i < kStalledRecords; ++i) EXPECT_TRUE(p->submit(make_record(i)));
  return p;
}

TEST(UsagePipeline, MemoryDurabilityHoldsAtMostMemoryMaxRecords) {
  Receiver rx;
  std::atomic<bool> failing{true};
  auto pp = stalled_memory_pipeline(rx, failing);
  Pipeline& p = *pp;
  constexpr int N = kStalledRecords;
  WAIT_FOR(p.stats().logged == 5 && sink(p.stats(), "hook").failed > 0);
  EXPECT_EQ(p.stats().queue_depth, N - 5);  // the writer stopped taking
  EXPECT_FALSE(p.accepting());
  failing = false;
  WAIT_FOR(delivered(p) == N);
  EXPECT_EQ(delivered_ids(rx), expected_ids(0, N));
  EXPECT_TRUE(p.accepting());
  EXPECT_EQ(p.stats().queue_depth, 0);
  p.stop(soon());
}

// The sink that filled memory_max_records is removed by a reload: its records are freed at once
// and the writer, waiting for room that no other sink would make, takes the queue again (it
// used to sleep until the hourly retention pass, refusing requests all along).
TEST(UsagePipeline, MemoryDurabilityRemovingTheStalledSinkFreesRoomAtOnce) {
  Receiver rx;
  const std::atomic<bool> failing{true};
  auto pp = stalled_memory_pipeline(rx, failing);
  Pipeline& p = *pp;
  WAIT_FOR(p.stats().logged == 5 && sink(p.stats(), "hook").failed > 0);
  EXPECT_FALSE(p.accepting());
  p.reconfigure({});
  WAIT_FOR(p.stats().logged == kStalledRecords);
  EXPECT_EQ(p.stats().queue_depth, 0);
  EXPECT_TRUE(p.accepting());
  p.stop(soon());
}

// With durability: memory a record is deleted once every sink has passed it. A sink that a reload
// changes is stopped and started again from its cursor; in between, its records must stay held
// although a faster sink keeps delivering (and pruning) all along. Reloads go on while records
// arrive; the changed sink's two receivers together must get every record, none skipped.
TEST(UsagePipeline, MemoryDurabilityKeepsAChangedSinksRecordsOverReloads) {
  Receiver fast, slow1, slow2;
  auto lag = [](const Receiver::Request&, std::size_t) {
    // A receiver slower than the other sink's, so that its cursor trails.
    std::this_thread::sleep_for(std::chrono::microseconds(300));
    return Receiver::Reply{};
  };
  slow1.set_script(lag);
  slow2.set_script(lag);
  config::UsageConfig u;
  u.durability = config::Durability::memory;
  u.memory_max_records = 1'000'000;
  Pipeline p(u, {make_sink("a", fast.url()), make_sink("b", slow1.url())});
  p.start();
  std::atomic<bool> done{false};
  std::atomic<int> submitted{0};
  std::thread producer([&] {
    for (int i = 0; i < 2000 && !done.load(); ++i) {
      ASSERT_TRUE(p.submit(make_record(i)));
      submitted.store(i + 1);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  });
  for (int round = 0; round < 40; ++round) {
    const int seen = submitted.load();
    WAIT_FOR(delivered(p, "a") >= static_cast<std::uint64_t>(seen));
    p.reconfigure({make_sink("a", fast.url()), make_sink("b", (round % 2 ? slow1 : slow2).url())});
  }
  done.store(true);
  producer.join();
  const int n = submitted.load();
  WAIT_FOR(sink(p.stats(), "a").backlog == 0 && sink(p.stats(), "b").backlog == 0);
  p.stop(soon());
  std::vector<std::string> b;
  for (const Receiver* r : {&slow1, &slow2}) {
    for (const auto& id : delivered_ids(*r)) b.push_back(id);
  }
  std::sort(b.begin(), b.end());
  EXPECT_EQ(b.size(), static_cast<std::size_t>(n));  // none skipped, none twice
  EXPECT_EQ(b, expected_ids(0, n));
  EXPECT_EQ(delivered_ids(fast), expected_ids(0, n));
}

TEST(UsagePipeline, MemoryDurabilityWithoutSinks) {
  config::UsageConfig u;
  u.durability = config::Durability::memory;
  u.memory_max_records = 3;
  Pipeline p(u, {});
  p.start();
  for (int i = 0; i < 20; ++i) EXPECT_TRUE(p.submit(make_record(i)));
  WAIT_FOR(p.stats().logged == 20);  // nothing is held, so the bound never stops the writer
  p.stop(soon());
}

// The writer cannot commit while another connection holds the file's write lock.
class UsageStalledWriter : public ::testing::Test {
 protected:
  void SetUp() override { path_ = dir_.file("usage.db"); }
  TempDir dir_;
  std::string path_;
};

TEST_F(UsageStalledWriter, ServeModeDropsAndCounts) {
  auto u = testing::disk_config(path_);
  u.queue_size = 10;
  u.on_backlog = config::OnBacklog::serve;
  Pipeline p(u, {});
  Db locker(path_);
  locker.exec("BEGIN EXCLUSIVE");
  p.start();
  int accepted = 0, refused = 0;
  for (int i = 0; i < 30; ++i) (p.submit(make_record(i)) ? accepted : refused)++;
  EXPECT_EQ(accepted, 10);
  EXPECT_EQ(refused, 20);
  EXPECT_TRUE(p.accepting());  // serve: never refuses requests
  EXPECT_EQ(p.stats().dropped, 20u);
  EXPECT_EQ(p.stats().queue_depth, 10);
  locker.exec("COMMIT");
  WAIT_FOR(p.stats().logged == 10);
  EXPECT_EQ(p.stats().queue_depth, 0);
  p.stop(soon());
  Db db(path_);
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), 10);
}

TEST_F(UsageStalledWriter, RejectModeKeepsEveryRecord) {
  auto u = testing::disk_config(path_);
  u.queue_size = 10;
  u.on_backlog = config::OnBacklog::reject;
  Pipeline p(u, {});
  Db locker(path_);
  locker.exec("BEGIN EXCLUSIVE");
  p.start();
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(p.accepting(), i < 10) << i;
    EXPECT_TRUE(p.submit(make_record(i)));  // in-flight requests' records are never dropped
  }
  EXPECT_FALSE(p.accepting());
  EXPECT_EQ(p.stats().queue_depth, 30);
  EXPECT_EQ(p.stats().dropped, 0u);
  locker.exec("COMMIT");
  WAIT_FOR(p.stats().logged == 30);
  EXPECT_TRUE(p.accepting());
  p.stop(soon());
  Db db(path_);
  EXPECT_EQ(db.number("SELECT count(*) FROM records"), 30);
}

TEST(UsagePipeline, RetentionDeletesOnlyDeliveredOldRecords) {
  TempDir dir;
  std::string path = dir.file("usage.db");
  auto u = testing::disk_config(path);
  u.retention_days = 30;
  const std::int64_t old = now_ms() - 40LL * 86'400'000;
  std::uint16_t port;
  {
    Receiver rx;
    port = rx.port();
    Pipeline p(u, {make_sink("hook", rx.url())});
    p.start();
    for (int i = 0; i < 5; ++i) p.submit(make_record(i, old));  // seq 1..5: old
    WAIT_FOR(p.stats().logged == 5);  // retention deletes whole commit groups: keep them apart
    p.submit(make_record(5));         // seq 6: recent
    WAIT_FOR(delivered(p) == 6);
    p.stop(soon());
  }
  // The receiver is gone: what comes now stays undelivered.
  auto url = "http://127.0.0.1:" + std::to_string(port) + "/hook";
  Pipeline p(u, {make_sink("hook", url)});
  p.start();                                                  // retention runs at start
  for (int i = 6; i < 9; ++i) p.submit(make_record(i, old));  // seq 7..9: old, undelivered
  WAIT_FOR(p.stats().logged == 3);
  Db db(path);
  WAIT_FOR(db.number("SELECT count(*) FROM records") == 4);
  EXPECT_EQ(db.scalar("SELECT group_concat(seq) FROM (SELECT seq FROM records ORDER BY seq)"),
            "6,7,8,9");
  p.stop(std::chrono::steady_clock::now() + 100ms);
}

TEST(UsagePipeline, HttpsToAPlainReceiverFails) {
  TempDir dir;
  Receiver rx;
  auto cfg = make_sink("hook", "https://127.0.0.1:" + std::to_string(rx.port()) + "/hook");
  cfg.timeout = 200ms;
  Pipeline p(testing::disk_config(dir.file("usage.db")), {cfg});
  p.start();
  p.submit(make_record(0));
  WAIT_FOR(sink(p.stats(), "hook").failed >= 2);
  EXPECT_EQ(delivered(p), 0u);
  p.stop(std::chrono::steady_clock::now() + 50ms);
  EXPECT_EQ(sink(p.stats(), "hook").backlog, 1);
}

TEST(UsagePipeline, BadLogPathThrowsAClearError) {
  TempDir dir;
  {
    std::FILE* f = std::fopen(dir.file("file").c_str(), "w");
    std::fclose(f);
  }
  try {
    Pipeline p(testing::disk_config(dir.file("file/usage.db")), {});
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("file/usage.db"), std::string::npos) << e.what();
  }
}

// Not a test: a measurement (run with --gtest_also_run_disabled_tests). Prints the rate at which
// batches are delivered to the local receiver; no assertion on time.
TEST(UsagePipeline, DISABLED_BatchThroughput) {
  for (int batch : {1, 100, 1000}) {
    TempDir dir;
    Receiver rx;
    auto cfg = make_sink("hook", rx.url());
    cfg.batch_size = batch;
    cfg.batch_interval = 5ms;
    auto u = testing::disk_config(dir.file("usage.db"));
    u.queue_size = 1'000'000;
    Pipeline p(u, {cfg});
    const int n = batch == 1 ? 20'000 : 200'000;
    submit_range(p, 0, n);  // queued before start
    auto t0 = std::chrono::steady_clock::now();
    p.start();
    WAIT_FOR(p.stats().logged == static_cast<std::uint64_t>(n));
    auto t1 = std::chrono::steady_clock::now();
    ASSERT_TRUE(testing::eventually([&] { return delivered(p) == static_cast<std::uint64_t>(n); },
                                    std::chrono::seconds(120)));
    auto t2 = std::chrono::steady_clock::now();
    p.stop(soon());
    double log_s = std::chrono::duration<double>(t1 - t0).count();
    double all_s = std::chrono::duration<double>(t2 - t0).count();
    std::printf(
        "batch_size %4d: %d records, logged in %.3f s (%.0f/s), delivered in %.3f s (%.0f/s), "
        "%zu POSTs\n",
        batch, n, log_s, n / log_s, all_s, n / all_s, rx.count());
    // Delivery alone: a new sink replaying the records already in the log.
    Receiver rx2;
    auto replay = make_sink("replay", rx2.url());
    replay.batch_size = batch;
    replay.batch_interval = 5ms;
    replay.replay = true;
    Pipeline p2(u, {replay});
    auto t3 = std::chrono::steady_clock::now();
    p2.start();
    ASSERT_TRUE(testing::eventually(
        [&] { return delivered(p2, "replay") == static_cast<std::uint64_t>(n); },
        std::chrono::seconds(120)));
    double replay_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t3).count();
    p2.stop(soon());
    std::printf("batch_size %4d: replay of %d logged records delivered in %.3f s (%.0f/s)\n", batch,
                n, replay_s, n / replay_s);
  }
}

}  // namespace
}  // namespace llmproxy::usage
