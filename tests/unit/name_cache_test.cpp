// Unit tests for the backend name cache (proxy/name_cache.h): a lookup that never returns holds
// no caller and no other name, one lookup per name at a time, fresh answers reused, stale ones
// used while a refresh runs, errors passed on, nothing called after close().
#include "proxy/name_cache.h"

#include <gtest/gtest.h>

#include <boost/asio/error.hpp>
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace llmproxy::proxy {
namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;

// A lookup the test controls: each call waits until its host is released, then answers with
// the address set for it (none: host_not_found).
struct ScriptedLookup {
  std::mutex m;
  std::condition_variable cv;
  std::map<std::string, bool> released;
  std::map<std::string, std::string> address;
  std::map<std::string, int> calls;
  int active = 0;  // lookups inside fn(): the object outlives them (the cache's threads do not)

  ~ScriptedLookup() {
    std::unique_lock lock(m);
    for (auto& [host, r] : released) r = true;
    all_released = true;
    cv.notify_all();
    cv.wait(lock, [&] { return active == 0; });
  }

  NameCache::Lookup fn() {
    return [this](const std::string& host, std::uint16_t port) {
      std::unique_lock lock(m);
      ++active;
      ++calls[host];
      cv.notify_all();
      cv.wait(lock, [&] { return all_released || released[host]; });
      NameCache::Answer a;
      if (auto it = address.find(host); it != address.end()) {
        a.endpoints.emplace_back(asio::ip::make_address(it->second), port);
      } else {
        a.error = asio::error::host_not_found;
      }
      --active;
      cv.notify_all();
      return a;
    };
  }
  bool all_released = false;
  void release(const std::string& host, const std::string& addr = "") {
    std::lock_guard lock(m);
    released[host] = true;
    if (!addr.empty()) address[host] = addr;
    cv.notify_all();
  }
  void block(const std::string& host) {
    std::lock_guard lock(m);
    released[host] = false;
  }
  void wait_calls(const std::string& host, int n) {
    std::unique_lock lock(m);
    ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return calls[host] >= n; })) << host;
  }
  int calls_of(const std::string& host) {
    std::lock_guard lock(m);
    return calls[host];
  }
};

// Until no lookup runs (a lookup's end raises no event the test can wait on).
void wait_idle(const NameCache& cache) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (cache.lookups_in_flight() != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(cache.lookups_in_flight(), 0u);
}

struct Answered {
  std::promise<NameCache::Answer> promise;
  std::future<NameCache::Answer> future = promise.get_future();
  NameCache::Callback callback() {
    return [this](const NameCache::Answer& a) { promise.set_value(a); };
  }
  NameCache::Answer get() {
    EXPECT_EQ(future.wait_for(10s), std::future_status::ready);
    return future.get();
  }
};

TEST(NameCache, ASlowNameHoldsNeitherItsCallerNorAnotherName) {
  ScriptedLookup lookup;
  {
    NameCache cache(5s, 10min, lookup.fn());
    Answered slow, fast;
    // Returns at once although its lookup has not answered (it never does in this test).
    EXPECT_FALSE(cache.find("slow.example", 80, slow.callback()));
    lookup.wait_calls("slow.example", 1);
    EXPECT_FALSE(cache.find("fast.example", 81, fast.callback()));
    lookup.release("fast.example", "10.0.0.2");
    const auto a = fast.get();
    ASSERT_FALSE(a.error);
    ASSERT_EQ(a.endpoints.size(), 1u);
    EXPECT_EQ(a.endpoints[0], asio::ip::tcp::endpoint(asio::ip::make_address("10.0.0.2"), 81));
    EXPECT_EQ(slow.future.wait_for(0s), std::future_status::timeout);
    EXPECT_EQ(cache.lookups_in_flight(), 1u);
    cache.close();
  }
  // The cache is gone; its lookup ends now and calls nobody.
  lookup.release("slow.example", "10.0.0.1");
}

TEST(NameCache, OneLookupPerNameAndFreshAnswersReused) {
  ScriptedLookup lookup;
  NameCache cache(1h, 10min, lookup.fn());
  Answered a, b;
  EXPECT_FALSE(cache.find("h", 80, a.callback()));
  EXPECT_FALSE(cache.find("h", 80, b.callback()));
  lookup.wait_calls("h", 1);
  lookup.release("h", "10.0.0.3");
  EXPECT_FALSE(a.get().error);
  EXPECT_FALSE(b.get().error);
  EXPECT_EQ(lookup.calls_of("h"), 1);
  // Fresh: answered from the cache, no lookup, no callback.
  const auto known = cache.find("h", 80, [](const NameCache::Answer&) { FAIL() << "called"; });
  ASSERT_TRUE(known);
  EXPECT_EQ(known->at(0).address(), asio::ip::make_address("10.0.0.3"));
  EXPECT_EQ(lookup.calls_of("h"), 1);
  // Another port is another name.
  Answered c;
  EXPECT_FALSE(cache.find("h", 443, c.callback()));
  EXPECT_FALSE(c.get().error);
  EXPECT_EQ(lookup.calls_of("h"), 2);
}

TEST(NameCache, AStaleAnswerIsUsedWhileARefreshRunsAndKeptWhenTheRefreshFails) {
  ScriptedLookup lookup;
  NameCache cache(0ms, 10min, lookup.fn());  // every answer is stale at once
  Answered first;
  EXPECT_FALSE(cache.find("h", 80, first.callback()));
  lookup.release("h", "10.0.0.4");
  EXPECT_FALSE(first.get().error);
  lookup.block("h");
  // Stale: the old addresses at once, and one refresh started (not one per call).
  for (int i = 0; i < 3; ++i) {
    const auto known = cache.find("h", 80, {});
    ASSERT_TRUE(known);
    EXPECT_EQ(known->at(0).address(), asio::ip::make_address("10.0.0.4"));
  }
  lookup.wait_calls("h", 2);
  EXPECT_EQ(lookup.calls_of("h"), 2);
  // The refresh fails (the name server stopped answering the name): the addresses stay.
  {
    std::lock_guard lock(lookup.m);
    lookup.address.erase("h");
  }
  lookup.release("h");
  wait_idle(cache);
  const auto known = cache.find("h", 80, {});
  ASSERT_TRUE(known);
  EXPECT_EQ(known->at(0).address(), asio::ip::make_address("10.0.0.4"));
  wait_idle(cache);  // a refresh that find() may have started ends before `lookup` goes
}

TEST(NameCache, AFailedRefreshIsNotRetriedAtEveryCall) {
  ScriptedLookup lookup;
  NameCache cache(500ms, 10min, lookup.fn());
  lookup.release("h", "10.0.0.6");
  Answered first;
  EXPECT_FALSE(cache.find("h", 80, first.callback()));
  EXPECT_FALSE(first.get().error);
  {
    std::lock_guard lock(lookup.m);
    lookup.address.erase("h");  // from now on the name server answers errors at once
  }
  std::this_thread::sleep_for(600ms);    // the answer goes stale (time passing, not a sync)
  ASSERT_TRUE(cache.find("h", 80, {}));  // stale: used, and one refresh started
  wait_idle(cache);
  // The failed refresh counts as one for the next 500 ms: these calls start none.
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(cache.find("h", 80, {}));
  EXPECT_EQ(cache.lookups_in_flight(), 0u);
  EXPECT_EQ(lookup.calls_of("h"), 2);
}

TEST(NameCache, AnUnknownNameIsAnErrorAndIsLookedUpAgainNextTime) {
  ScriptedLookup lookup;
  NameCache cache(1h, 10min, lookup.fn());
  lookup.release("nx");
  Answered a;
  EXPECT_FALSE(cache.find("nx", 80, a.callback()));
  EXPECT_EQ(a.get().error, asio::error::host_not_found);
  Answered b;
  EXPECT_FALSE(cache.find("nx", 80, b.callback()));
  EXPECT_EQ(b.get().error, asio::error::host_not_found);
  EXPECT_EQ(lookup.calls_of("nx"), 2);
}

TEST(NameCache, NoCallbackAfterClose) {
  ScriptedLookup lookup;
  NameCache cache(1h, 10min, lookup.fn());
  bool called = false;
  EXPECT_FALSE(cache.find("h", 80, [&](const NameCache::Answer&) { called = true; }));
  lookup.wait_calls("h", 1);
  cache.close();
  lookup.release("h", "10.0.0.5");
  wait_idle(cache);
  EXPECT_FALSE(called);
}

TEST(NameCache, ResolvesLocalhostWithGetaddrinfo) {
  const auto a = NameCache::resolve("localhost", 8080);
  ASSERT_FALSE(a.error) << a.error.message();
  ASSERT_FALSE(a.endpoints.empty());
  for (const auto& ep : a.endpoints) {
    EXPECT_TRUE(ep.address().is_loopback()) << ep;
    EXPECT_EQ(ep.port(), 8080);
  }
  EXPECT_TRUE(NameCache::resolve("name.invalid", 80).error);
}

}  // namespace
}  // namespace llmproxy::proxy
