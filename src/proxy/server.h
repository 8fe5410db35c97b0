// The gateway: listeners, worker threads, the request lifecycle and upstream connections.
//
// Threading: one io_context per worker thread, each with its own SO_REUSEPORT acceptor, its own
// upstream connection pool, balancer state, JSON parser and access log. A connection lives on
// one thread from accept to close, so the request path takes no lock. The main thread runs a
// control io_context: signals, active health checks, drain on shutdown.
#pragma once

#include <memory>

#include "config/config.h"

namespace llmproxy::proxy {

// run()'s exit status when the stop cut requests still in flight (a second signal, or requests
// that did not end by the drain deadline and its grace): with metering on, they have no usage
// record. 1 stays "did not start" (configuration, bind, usage log).
inline constexpr int kExitRequestsCut = 3;

class Gateway {
 public:
  explicit Gateway(config::Config config);
  ~Gateway();
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  // Binds, starts workers and health checks, prints "llmproxy: listening on http://HOST:PORT",
  // and blocks until SIGTERM/SIGINT has drained in-flight requests (or the drain timeout passed).
  // Returns the process exit code: 0, kExitRequestsCut, or 1 when it could not start.
  int run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmproxy::proxy
