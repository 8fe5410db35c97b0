// Backend host names, resolved off the event loops and remembered.
//
// Asio runs every getaddrinfo of an io_context on one thread of its own and cannot interrupt
// one: a name server that never answers held a connect past its timeout, and every other name's
// lookup (health checks included) queued behind it, so healthy backends were marked down.
// Here each name has at most one lookup in flight, on a thread of its own, which a caller never
// waits for past its own deadline; the addresses found are kept, used at once while fresh and,
// once stale, used still while a lookup in the background refreshes them (a name server that
// stops answering does not take away addresses that worked).
#pragma once

#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace llmproxy::proxy {

class NameCache {
 public:
  using Endpoints = std::vector<boost::asio::ip::tcp::endpoint>;
  struct Answer {
    Endpoints endpoints;
    boost::system::error_code error;  // as Asio's resolver reports it (host_not_found, ...)
  };
  // Called on the lookup's thread, at most once.
  using Callback = std::function<void(const Answer&)>;
  // A lookup of one host: getaddrinfo by default; tests give a slow or failing one.
  using Lookup = std::function<Answer(const std::string& host, std::uint16_t port)>;

  // Addresses are fresh for `fresh_for`; a name unused for `forget_after` is dropped.
  explicit NameCache(std::chrono::milliseconds fresh_for = std::chrono::seconds(5),
                     std::chrono::milliseconds forget_after = std::chrono::minutes(10),
                     Lookup lookup = {});
  ~NameCache();
  NameCache(const NameCache&) = delete;
  NameCache& operator=(const NameCache&) = delete;

  // The addresses of host:port when known (a stale answer starts a refresh); otherwise nullopt,
  // and `done` gets the answer of the lookup started or joined (unless close() comes first).
  std::optional<Endpoints> find(const std::string& host, std::uint16_t port, Callback done);

  // No callback is made after this returns (lookups still running finish unheard). Call it
  // before whatever the callbacks post to is destroyed.
  void close();

  // Lookups running now (for tests).
  std::size_t lookups_in_flight() const;

  // getaddrinfo (TCP, any family, flags as Asio's resolver), its error as Asio names it.
  static Answer resolve(const std::string& host, std::uint16_t port);

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace llmproxy::proxy
