// The webhook client's Beast/Asio code, all of it (see webhook_client.h for why it is alone).
//
// One request = one coroutine on the client's private io_context, run to completion by post().
// Every socket operation goes through beast::tcp_stream with one absolute expiry set before the
// first of them, so connect + TLS handshake + write + read share a single deadline; when it
// passes, Beast closes the socket and the pending operation completes with error::timeout.
// Name resolution is the one step Asio cannot cancel (getaddrinfo runs in a helper thread and
// cannot be interrupted): it runs in a detached thread of its own and is abandoned at the
// deadline, so a slow DNS server costs one thread for a while, never the sink's deadline.
// IP literals skip it entirely.
//
// The response body is read in 4 KiB pieces through buffer_body and only its first 1 KiB is
// kept (for dead letters), so a receiver answering with a large body costs no memory; at most
// 64 KiB of it is read at all. The deadline is also checked between reads, not only by Beast's
// timer: reads that complete at once, one after the other (a receiver sending fast and without
// end), each re-arm that timer, whose expiry is then always judged stale and never cuts them.
// A shutdown cuts a POST in flight (cut_at): run() polls it while the io_context works.
#include "usage/webhook_client.h"

#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "http/tls_peer.h"

namespace llmproxy::usage {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
using Clock = std::chrono::steady_clock;

constexpr auto use_nothrow = asio::as_tuple(asio::use_awaitable);
// How often run() looks at cut_at while a POST is in flight.
constexpr auto kCutPoll = std::chrono::milliseconds(100);

// Retry-After as delta-seconds (RFC 9110 10.2.3), at most a day; 0 for anything else (an HTTP
// date, which a receiver's clock would have to agree on, or garbage).
std::uint32_t retry_after_seconds(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  if (v.empty() || v.size() > 9) return 0;
  std::uint32_t n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return 0;
    n = n * 10 + static_cast<std::uint32_t>(c - '0');
  }
  return std::min<std::uint32_t>(n, 86'400);
}

struct Resolved {
  std::vector<tcp::endpoint> endpoints;
  std::string error;
};

bool passed(const std::atomic<Clock::rep>& cut_at) {
  const Clock::rep at = cut_at.load(std::memory_order_acquire);
  return at != 0 && Clock::now() >= Clock::time_point(Clock::duration(at));
}

// getaddrinfo in a thread that may outlive the wait; it owns everything it touches.
Resolved resolve(const std::string& host, std::uint16_t port, Clock::time_point deadline,
                 const std::atomic<Clock::rep>& cut_at) {
  Resolved out;
  error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (!ec) {
    out.endpoints.emplace_back(addr, port);
    return out;
  }
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Resolved result;
  };
  auto shared = std::make_shared<Shared>();
  try {
    std::thread([shared, host, port] {
      Resolved r;
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* list = nullptr;
      int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &list);
      if (rc != 0) {
        r.error = std::string("cannot resolve ") + host + ": " + ::gai_strerror(rc);
      } else {
        for (auto* p = list; p; p = p->ai_next) {
          if (p->ai_family != AF_INET && p->ai_family != AF_INET6) continue;
          tcp::endpoint ep;
          std::memcpy(ep.data(), p->ai_addr, p->ai_addrlen);
          ep.resize(p->ai_addrlen);
          r.endpoints.push_back(ep);
        }
        ::freeaddrinfo(list);
        if (r.endpoints.empty()) r.error = "cannot resolve " + host + ": no address";
      }
      std::lock_guard lk(shared->mu);
      shared->result = std::move(r);
      shared->done = true;
      shared->cv.notify_all();
    }).detach();
  } catch (const std::system_error& e) {
    out.error = std::string("cannot resolve ") + host + ": " + e.what();
    return out;
  }
  std::unique_lock lk(shared->mu);
  for (;;) {
    if (shared->cv.wait_until(lk, std::min(deadline, Clock::now() + kCutPoll),
                              [&] { return shared->done; })) {
      return std::move(shared->result);
    }
    if (Clock::now() >= deadline) {
      out.error = "timeout resolving " + host;
      return out;
    }
    if (passed(cut_at)) {
      out.error = "cut";  // run() reports it as such
      return out;
    }
  }
}

struct Attempt {
  WebhookResponse response;
  bool answered = false;    // bytes of an answer arrived (false: nothing came back at all)
  bool keep_alive = false;  // the server lets the connection be used again
};

}  // namespace

struct WebhookClient::Impl {
  explicit Impl(const std::atomic<Clock::rep>& cut) : cut_at(cut) {}
  const std::atomic<Clock::rep>& cut_at;
  config::Url url;
  std::string target;
  std::string host_header;
  asio::io_context ioc{1};
  std::optional<ssl::context> tls_ctx;
  std::optional<beast::tcp_stream> plain;
  std::optional<beast::ssl_stream<beast::tcp_stream>> tls;
  beast::flat_buffer buffer;
  bool connected = false;

  beast::tcp_stream& lowest() { return plain ? *plain : beast::get_lowest_layer(*tls); }

  void drop() {
    error_code ignored;
    if (plain) plain->socket().close(ignored);
    if (tls) beast::get_lowest_layer(*tls).socket().close(ignored);
    plain.reset();
    tls.reset();
    buffer.clear();
    connected = false;
  }

  asio::awaitable<std::string> connect(Clock::time_point deadline) {
    auto resolved = resolve(url.host, url.port, deadline, cut_at);
    if (!resolved.error.empty()) co_return resolved.error;
    if (url.tls) {
      tls.emplace(ioc, *tls_ctx);
    } else {
      plain.emplace(ioc);
    }
    auto& s = lowest();
    s.expires_at(deadline);
    auto [cec, ep] = co_await s.async_connect(resolved.endpoints, use_nothrow);
    if (cec) {
      co_return cec == beast::error::timeout ? "timeout connecting" : "connect: " + cec.message();
    }
    error_code ignored;
    s.socket().set_option(tcp::no_delay(true), ignored);
    if (url.tls) {
      if (!llmproxy::http::set_tls_peer(tls->native_handle(), url.host, true)) {
        const unsigned long e = ::ERR_get_error();
        ::ERR_clear_error();
        const char* why = ::ERR_reason_error_string(e);
        co_return std::string("TLS: cannot set the server's name or address: ") +
            (why ? why : "unknown OpenSSL error");
      }
      tls->set_verify_mode(ssl::verify_peer);
      auto [hec] = co_await tls->async_handshake(ssl::stream_base::client, use_nothrow);
      if (hec) {
        if (hec == beast::error::timeout) co_return "timeout in the TLS handshake";
        std::string refusal = llmproxy::http::tls_refusal(tls->native_handle());
        co_return "TLS handshake: " + hec.message() + (refusal.empty() ? "" : ": " + refusal);
      }
    }
    connected = true;
    co_return std::string();
  }

  bool cut_due() const { return passed(cut_at); }

  template <class Stream>
  asio::awaitable<void> exchange(Stream& s, http::request<http::string_body>& req,
                                 Clock::time_point deadline, Attempt& out) {
    auto [wec, wn] = co_await http::async_write(s, req, use_nothrow);
    if (wec == beast::error::timeout) {
      out.response.error = "timeout sending";
      out.response.slow = true;
      co_return;
    }
    // A receiver that refuses a POST from its header (413 over a body limit, 401) often answers
    // and closes before the body is all sent: the send fails (reset, broken pipe), but the
    // answer is there to be read, and decides (a 413 splits the batch, a 401 is a dead letter).
    const std::string send_error = wec ? "send: " + wec.message() : std::string();
    std::optional<http::response_parser<http::buffer_body>> parser;
    // Interim answers (100 Continue, 103 Early Hints) come before the final one (RFC 9110
    // 15.2): each is read and skipped, so that the next answer is never taken for this one's.
    for (;;) {
      if (Clock::now() >= deadline) {  // interim answers sent without end
        out.response.error = "timeout waiting for the answer";
        out.response.unanswered = true;
        co_return;
      }
      parser.emplace();
      parser->body_limit(boost::none);  // the body is read piecewise and mostly discarded
      auto [hec, hn] = co_await http::async_read_header(s, buffer, *parser, use_nothrow);
      if (hec) {
        out.answered = out.answered || hn > 0 || buffer.size() > 0;
        out.response.unanswered = send_error.empty() && hec == beast::error::timeout;
        out.response.error = !send_error.empty()            ? send_error
                             : hec == beast::error::timeout ? "timeout waiting for the answer"
                                                            : "receive: " + hec.message();
        co_return;
      }
      out.answered = true;
      const unsigned status = parser->get().result_int();
      if (status < 100 || status >= 200 || status == 101) break;
    }
    auto& p = *parser;
    // The receiver has answered: its status stands, whatever becomes of the body.
    out.response.status = p.get().result_int();
    out.response.retry_after_s = retry_after_seconds(p.get()[http::field::retry_after]);
    char piece[4096];
    std::size_t drained = 0;
    while (!p.is_done()) {
      if (drained >= WebhookResponse::kMaxDrainedBody || Clock::now() >= deadline) co_return;
      p.get().body().data = piece;
      p.get().body().size = sizeof piece;
      auto [bec, bn] = co_await http::async_read(s, buffer, p, use_nothrow);
      if (bec == http::error::need_buffer) bec = {};
      if (bec) co_return;  // the connection is not kept
      std::size_t got = sizeof piece - p.get().body().size;
      drained += got;
      std::size_t room = WebhookResponse::kMaxKeptBody - out.response.body.size();
      out.response.body.append(piece, std::min(got, room));
    }
    // After a 101 the connection no longer speaks HTTP; after a failed send it is broken.
    out.keep_alive = p.get().keep_alive() && out.response.status != 101 && send_error.empty();
  }

  asio::awaitable<void> attempt(http::request<http::string_body>& req, Clock::time_point deadline,
                                Attempt& out) {
    if (!connected) {
      auto error = co_await connect(deadline);
      if (!error.empty()) {
        out.response.error = std::move(error);
        co_return;
      }
    }
    lowest().expires_at(deadline);
    if (plain) {
      co_await exchange(*plain, req, deadline, out);
    } else {
      co_await exchange(*tls, req, deadline, out);
    }
  }

  Attempt run(http::request<http::string_body>& req, Clock::time_point deadline) {
    Attempt out;
    ioc.restart();
    asio::co_spawn(ioc, attempt(req, deadline, out), [&](std::exception_ptr e) {
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          out.response.error = ex.what();
        }
      }
    });
    for (;;) {
      ioc.run_for(kCutPoll);
      if (ioc.stopped()) break;
      if (cut_due() && (plain || tls)) {
        // The pending operation completes with an error, the coroutine ends, run_for returns.
        error_code ignored;
        lowest().socket().close(ignored);
      }
    }
    if (out.response.status == 0 && cut_due()) {
      out.response.cut = true;
      out.response.error = "cut";
    }
    if (out.response.status == 0 || !out.keep_alive) drop();
    return out;
  }
};

WebhookClient::WebhookClient(const config::Url& url, std::string target,
                             const std::atomic<Clock::rep>& cut_at)
    : impl_(std::make_unique<Impl>(cut_at)) {
  impl_->url = url;
  impl_->target = target.empty() ? "/" : std::move(target);
  impl_->host_header = url.authority();
  if (url.tls) {
    impl_->tls_ctx.emplace(ssl::context::tls_client);
    impl_->tls_ctx->set_default_verify_paths();
    impl_->tls_ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                                ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                                ssl::context::no_tlsv1_1);
  }
}

WebhookClient::~WebhookClient() {
  impl_->drop();
}

void WebhookClient::close() {
  impl_->drop();
}

WebhookResponse WebhookClient::post(const std::string& body,
                                    const std::vector<std::pair<std::string, std::string>>& headers,
                                    std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  http::request<http::string_body> req{http::verb::post, impl_->target, 11};
  req.set(http::field::host, impl_->host_header);
  for (const auto& [name, value] : headers) req.set(name, value);
  req.keep_alive(true);
  req.body() = body;
  req.prepare_payload();
  bool reused = impl_->connected;
  Attempt a = impl_->run(req, deadline);
  // A kept connection may have been closed by the server while idle: the request then fails
  // without a byte of answer. That is not the receiver failing; send once more on a new one.
  if (reused && a.response.status == 0 && !a.answered && Clock::now() < deadline &&
      !impl_->cut_due()) {
    a = impl_->run(req, deadline);
  }
  return std::move(a.response);
}

}  // namespace llmproxy::usage
