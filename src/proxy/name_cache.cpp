#include "proxy/name_cache.h"

#include <netdb.h>
#include <sys/socket.h>

#include <boost/asio/error.hpp>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>

namespace llmproxy::proxy {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxWaiters = 4096;

struct NameCache::State {
  struct Entry {
    std::optional<Endpoints> endpoints;  // the last addresses found
    Clock::time_point fresh_until{};
    Clock::time_point used{};
    bool looking = false;
    std::vector<Callback> waiters;
  };

  std::chrono::milliseconds fresh_for;
  std::chrono::milliseconds forget_after;
  Lookup lookup;
  mutable std::mutex mutex;
  bool closed = false;
  std::size_t in_flight = 0;
  std::unordered_map<std::string, Entry> entries;  // by "host port"

  // A lookup of `e` ended with `answer` (under the lock): its waiters hear it, unless closed.
  // Called under the lock, so close() never returns while one runs.
  void finish(Entry& e, const Answer& answer) {
    e.looking = false;
    --in_flight;
    auto waiters = std::move(e.waiters);
    e.waiters.clear();
    if (closed) return;
    for (auto& w : waiters) w(answer);
  }
};

NameCache::NameCache(std::chrono::milliseconds fresh_for, std::chrono::milliseconds forget_after,
                     Lookup lookup)
    : state_(std::make_shared<State>()) {
  state_->fresh_for = fresh_for;
  state_->forget_after = forget_after;
  state_->lookup = lookup ? std::move(lookup) : Lookup(&NameCache::resolve);
}

NameCache::~NameCache() {
  close();
}

void NameCache::close() {
  std::lock_guard lock(state_->mutex);
  state_->closed = true;
  for (auto& [key, entry] : state_->entries) entry.waiters.clear();
}

std::size_t NameCache::lookups_in_flight() const {
  std::lock_guard lock(state_->mutex);
  return state_->in_flight;
}

std::optional<NameCache::Endpoints> NameCache::find(const std::string& host, std::uint16_t port,
                                                    Callback done) {
  const auto now = Clock::now();
  std::string key = host;
  key += ' ';
  key += std::to_string(port);
  std::unique_lock lock(state_->mutex);
  auto& entries = state_->entries;
  auto it = entries.find(key);
  if (it == entries.end()) {
    // A new name: names no longer used (backends removed by reloads) are dropped first.
    std::erase_if(entries, [&](const auto& kv) {
      return !kv.second.looking && now - kv.second.used > state_->forget_after;
    });
    it = entries.emplace(std::move(key), State::Entry{}).first;
  }
  State::Entry& entry = it->second;
  entry.used = now;
  std::optional<Endpoints> known = entry.endpoints;
  if (known && now < entry.fresh_until) return known;
  // A caller past the bound gets no answer and waits for its deadline: a storm of new
  // connections to a name that does not resolve holds no more than this.
  if (!known && !state_->closed && entry.waiters.size() < kMaxWaiters) {
    entry.waiters.push_back(std::move(done));
  }
  if (entry.looking || state_->closed) return known;

  entry.looking = true;
  ++state_->in_flight;
  // The thread holds the state, not the cache: it may outlive both the cache and the caller.
  const auto run = [](std::shared_ptr<State> state, std::string key, std::string host,
                      std::uint16_t port) {
    Answer answer = state->lookup(host, port);
    std::lock_guard lock(state->mutex);
    // The entry is still there: find() drops only entries with no lookup running.
    State::Entry& e = state->entries.at(key);
    if (!answer.error && answer.endpoints.empty()) answer.error = asio::error::host_not_found;
    if (!answer.error) e.endpoints = answer.endpoints;
    // A failed refresh keeps the addresses, and the next one waits as long as a success would:
    // a name server that answers errors at once is not asked again at every connect.
    if (!answer.error || e.endpoints) e.fresh_until = Clock::now() + state->fresh_for;
    state->finish(e, answer);
  };
  try {
    std::thread(run, state_, it->first, host, port).detach();
  } catch (...) {
    // No thread (or no memory) to be had: the gateway's own shortage, told to the waiters as
    // one (no_memory: not the backend's fault, it is not marked down for it).
    Answer answer;
    answer.error = asio::error::no_memory;
    state_->finish(entry, answer);
  }
  return known;
}

NameCache::Answer NameCache::resolve(const std::string& host, std::uint16_t port) {
  Answer out;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;  // no AI_ADDRCONFIG (as Asio's resolver): localhost keeps ::1
  addrinfo* list = nullptr;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &list);
  if (rc != 0) {
    switch (rc) {
      case EAI_AGAIN:
        out.error = asio::error::host_not_found_try_again;
        break;
      case EAI_FAIL:
        out.error = asio::error::no_recovery;
        break;
      case EAI_MEMORY:
        out.error = asio::error::no_memory;
        break;
      case EAI_SYSTEM:
        out.error = boost::system::error_code(errno, boost::system::system_category());
        break;
      default:  // EAI_NONAME, EAI_NODATA, ...
        out.error = asio::error::host_not_found;
    }
    return out;
  }
  for (const addrinfo* a = list; a; a = a->ai_next) {
    if (a->ai_family == AF_INET || a->ai_family == AF_INET6) {
      asio::ip::tcp::endpoint ep;
      if (a->ai_addrlen > ep.capacity()) continue;
      std::memcpy(ep.data(), a->ai_addr, a->ai_addrlen);
      ep.resize(a->ai_addrlen);
      out.endpoints.push_back(ep);
    }
  }
  ::freeaddrinfo(list);
  return out;
}

}  // namespace llmproxy::proxy
