// A minimal HTTP/1.1 POST client for webhook sinks: http:// and https://, keep-alive, one
// deadline per request.
//
// Each sink thread owns one client and calls post() in a loop; the client owns its own
// io_context and runs it for the duration of one request, so there is no shared event loop to
// coordinate with and no locking. The interface has no Boost types: Beast and Asio are included by
// webhook_client.cpp only, the one translation unit that pays their compile time.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"

namespace llmproxy::usage {

struct WebhookResponse {
  unsigned status = 0;  // 0: no valid HTTP answer (connect, TLS, timeout, malformed)
  std::string error;    // what went wrong when status == 0
  std::string body;     // the first kMaxKeptBody bytes of the answer's body
  // The answer's Retry-After in seconds (delta-seconds form only; 0: none, or an HTTP date).
  std::uint32_t retry_after_s = 0;
  bool cut = false;  // cut_at passed before an answer came (status 0)
  // The timeout passed while the body was still being sent (status 0): a batch too large for
  // the receiver to take within it, or a receiver that stopped reading.
  bool slow = false;
  // The body was sent whole, and no answer came within the timeout (status 0).
  bool unanswered = false;
  static constexpr std::size_t kMaxKeptBody = 1024;
  static constexpr std::size_t kMaxDrainedBody = 64 * 1024;
};

class WebhookClient {
 public:
  // `url`: scheme, host and port (url.base_path is not used); `target`: the request-target,
  // e.g. "/hooks/usage". HTTPS verifies the certificate chain against the system store (OpenSSL's
  // default paths; SSL_CERT_FILE / SSL_CERT_DIR override them) and the host name or IP address.
  //
  // `cut_at` is a steady_clock deadline (its time_since_epoch().count(); 0: none) that outlives
  // the client and that another thread may set at any time (the pipeline: the shutdown deadline,
  // or now when a reload retires the sink): a POST still running then, name resolution included, is
  // cut within ~100 ms, whatever its own timeout.
  WebhookClient(const config::Url& url, std::string target,
                const std::atomic<std::chrono::steady_clock::rep>& cut_at);
  ~WebhookClient();
  WebhookClient(const WebhookClient&) = delete;
  WebhookClient& operator=(const WebhookClient&) = delete;

  // POSTs `body` with `headers` (Host and Content-Length are added) and waits for the answer.
  // Everything (name resolution, connect, TLS handshake, send, receive) finishes within
  // `timeout`. The answer is its status line and header: once they have arrived, the status
  // stands, and the body is read only to keep the connection (its first kMaxKeptBody bytes are
  // kept); a body longer than kMaxDrainedBody, cut, or still arriving at the deadline closes the
  // connection instead. The connection is kept for the next call when the server allows it; a
  // kept connection the server has closed in the meantime is replaced transparently once.
  WebhookResponse post(const std::string& body,
                       const std::vector<std::pair<std::string, std::string>>& headers,
                       std::chrono::milliseconds timeout);

  // Drops the kept connection.
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmproxy::usage
