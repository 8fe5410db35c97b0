// Test support for the usage pipeline: a scriptable HTTP receiver on plain POSIX sockets, a
// fresh temporary directory per test, a condition poller and record/config factories.
//
// The receiver is deliberately independent of the code under test (no Beast, no Asio): what it
// records is what went over the wire. It binds 127.0.0.1 (port 0 or a given port, so that a
// receiver can go down and come back on the same address), serves keep-alive connections, one
// thread each, and asks a script what to do with each request: answer with a status, hang
// without answering until stop() or release_hangs(), or close the connection. Given an OpenSSL
// server context it speaks HTTPS instead (blocking SSL_accept/SSL_read/SSL_write on the socket).
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "usage/record.h"

namespace llmproxy::usage::testing {

// Polls `pred` every 5 ms for up to `limit`: waits on a condition, never on a fixed time.
template <class Pred>
::testing::AssertionResult eventually(Pred pred,
                                      std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > until) {
      return ::testing::AssertionFailure() << "condition not met within " << limit.count() << " ms";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return ::testing::AssertionSuccess();
}

#define WAIT_FOR(cond)                                                        \
  ASSERT_TRUE(::llmproxy::usage::testing::eventually([&] { return (cond); })) \
      << "waiting for: " #cond

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "llmproxy-usage-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

class Receiver {
 public:
  struct Request {
    std::string method;
    std::string target;
    std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
    std::string body;
    unsigned answered = 0;  // the status sent back; 0: hung or closed without an answer
    std::string header(std::string_view name) const {
      for (const auto& [k, v] : headers) {
        if (k == name) return v;
      }
      return {};
    }
  };
  struct Reply {
    // endless: the status and a chunked body sent as fast as the sender reads, until it hangs up.
    enum Kind { respond, hang, close, endless } kind = respond;
    unsigned status = 200;
    std::string body = "ok";
    std::string interim;  // sent before the answer, as it is ("HTTP/1.1 100 Continue\r\n\r\n")
    std::string fields;   // more header lines, each ending in \r\n
  };
  // Called for every request, with its 0-based index among all requests received.
  using Script = std::function<Reply(const Request&, std::size_t)>;

  explicit Receiver(std::uint16_t port = 0, SSL_CTX* tls = nullptr) : tls_(tls) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::listen(listen_fd_, 128) != 0) {
      ::close(listen_fd_);
      throw std::runtime_error("receiver: cannot listen on port " + std::to_string(port));
    }
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    accept_thread_ = std::thread([this] { accept_loop(); });
  }
  ~Receiver() { stop(); }

  std::uint16_t port() const { return port_; }
  std::string url(const std::string& path = "/hook") const {
    return "http://127.0.0.1:" + std::to_string(port_) + path;
  }

  void set_script(Script s) {
    std::lock_guard lk(mu_);
    script_ = std::move(s);
  }
  void release_hangs() {
    std::lock_guard lk(mu_);
    released_ = true;
    cv_.notify_all();
  }

  std::vector<Request> requests() const {
    std::lock_guard lk(mu_);
    return requests_;
  }
  std::size_t count() const {
    std::lock_guard lk(mu_);
    return requests_.size();
  }
  std::size_t failed_handshakes() const {
    std::lock_guard lk(mu_);
    return failed_handshakes_;
  }
  // The SNI name of the last TLS handshake that completed ("" when none was sent).
  std::string server_name() const {
    std::lock_guard lk(mu_);
    return server_name_;
  }
  std::size_t connections() const {
    std::lock_guard lk(mu_);
    return connections_;
  }
  // Requests answered with a 2xx.
  std::vector<Request> accepted() const {
    std::lock_guard lk(mu_);
    std::vector<Request> out;
    for (const auto& r : requests_) {
      if (r.answered >= 200 && r.answered < 300) out.push_back(r);
    }
    return out;
  }

  // Closes the listener and every connection: the port refuses connections afterwards.
  void stop() {
    {
      std::lock_guard lk(mu_);
      if (stopped_) return;
      stopped_ = true;
      cv_.notify_all();
    }
    ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
    accept_thread_.join();
    ::close(listen_fd_);
    {
      std::lock_guard lk(mu_);
      for (int fd : conns_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : threads_) t.join();
  }

 private:
  void accept_loop() {
    for (;;) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      std::lock_guard lk(mu_);
      if (stopped_) {
        if (fd >= 0) ::close(fd);
        return;
      }
      if (fd < 0) continue;
      conns_.insert(fd);
      ++connections_;
      threads_.emplace_back([this, fd] { serve(fd); });
    }
  }

  static bool send_all(int fd, SSL* ssl, const std::string& data) {
    std::size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ssl ? ::SSL_write(ssl, data.data() + off, static_cast<int>(data.size() - off))
                      : ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<std::size_t>(n);
    }
    return true;
  }

  void serve(int fd) {
    SSL* ssl = nullptr;
    if (tls_) {
      ssl = ::SSL_new(tls_);
      ::SSL_set_fd(ssl, fd);
      if (::SSL_accept(ssl) <= 0) {
        ::SSL_free(ssl);
        std::lock_guard lk(mu_);
        ++failed_handshakes_;
        conns_.erase(fd);
        ::close(fd);
        return;
      }
      const char* sni = ::SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
      std::lock_guard lk(mu_);
      server_name_ = sni ? sni : "";
    }
    serve_http(fd, ssl);
    if (ssl) ::SSL_free(ssl);
    std::lock_guard lk(mu_);
    conns_.erase(fd);
    ::close(fd);
  }

  void serve_http(int fd, SSL* ssl) {
    std::string buf;
    char tmp[65536];
    auto fill = [&]() {
      ssize_t n = ssl ? ::SSL_read(ssl, tmp, sizeof tmp) : ::recv(fd, tmp, sizeof tmp, 0);
      if (n <= 0) return false;
      buf.append(tmp, static_cast<std::size_t>(n));
      return true;
    };
    for (;;) {
      std::size_t end;
      bool ok = true;
      while ((end = buf.find("\r\n\r\n")) == std::string::npos && (ok = fill())) {
      }
      if (!ok) return;
      Request req;
      std::size_t content_length = 0;
      std::size_t line_end = buf.find("\r\n");
      std::string first = buf.substr(0, line_end);
      auto sp1 = first.find(' ');
      auto sp2 = first.find(' ', sp1 + 1);
      req.method = first.substr(0, sp1);
      req.target = first.substr(sp1 + 1, sp2 - sp1 - 1);
      std::size_t pos = line_end + 2;
      while (pos < end) {
        std::size_t e = buf.find("\r\n", pos);
        std::string line = buf.substr(pos, e - pos);
        pos = e + 2;
        auto colon = line.find(':');
        std::string name = line.substr(0, colon);
        std::transform(name.begin(), name.end(), name.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        std::string value = line.substr(colon + 1);
        while (!value.empty() && value.front() == ' ') value.erase(0, 1);
        if (name == "content-length") content_length = std::stoul(value);
        req.headers.emplace_back(name, value);
      }
      while (buf.size() < end + 4 + content_length && (ok = fill())) {
      }
      if (!ok) return;
      req.body = buf.substr(end + 4, content_length);
      buf.erase(0, end + 4 + content_length);

      Reply reply;
      std::size_t index;
      {
        std::lock_guard lk(mu_);
        index = requests_.size();
        if (script_) reply = script_(req, index);
        if (reply.kind == Reply::respond) req.answered = reply.status;
        requests_.push_back(req);  // recorded before the answer leaves
      }
      if (reply.kind == Reply::close) return;
      if (reply.kind == Reply::hang) {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stopped_ || released_; });
        return;
      }
      if (reply.kind == Reply::endless) {
        std::string head = "HTTP/1.1 " + std::to_string(reply.status) +
                           " Scripted\r\nTransfer-Encoding: chunked\r\n\r\n";
        const std::string chunk = "1000\r\n" + std::string(4096, 'x') + "\r\n";
        if (!send_all(fd, ssl, head)) return;
        while (send_all(fd, ssl, chunk)) {
        }
        return;
      }
      std::string out =
          reply.interim + "HTTP/1.1 " + std::to_string(reply.status) + " Scripted\r\n" +
          reply.fields +
          "Content-Type: text/plain\r\nContent-Length: " + std::to_string(reply.body.size()) +
          "\r\n\r\n" + reply.body;
      if (!send_all(fd, ssl, out)) return;
    }
  }

  SSL_CTX* tls_ = nullptr;
  std::size_t failed_handshakes_ = 0;
  std::string server_name_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::thread accept_thread_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false;
  bool released_ = false;
  Script script_;
  std::vector<Request> requests_;
  std::set<int> conns_;
  std::size_t connections_ = 0;  // accepted so far
  std::vector<std::thread> threads_;
};

// A read connection to a log file for assertions (separate from the pipeline's).
class Db {
 public:
  explicit Db(const std::string& path, bool create = false) {
    int flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0);
    if (sqlite3_open_v2(path.c_str(), &db_, flags, nullptr) != SQLITE_OK) {
      throw std::runtime_error("cannot open " + path);
    }
    sqlite3_busy_timeout(db_, 5000);
  }
  ~Db() { sqlite3_close_v2(db_); }
  // The first column of the first row as text ("" when there is none).
  std::string scalar(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      throw std::runtime_error(std::string("prepare: ") + sqlite3_errmsg(db_));
    }
    std::string out;
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0)) {
      out = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
    }
    sqlite3_finalize(s);
    return out;
  }
  std::int64_t number(const std::string& sql) {
    auto v = scalar(sql);
    return v.empty() ? 0 : std::stoll(v);
  }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(msg);
    }
  }

 private:
  sqlite3* db_ = nullptr;
};

inline std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

inline std::string request_id(int i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "req-%05d", i);
  return buf;
}

inline UsageRecord make_record(int i, std::int64_t ts_ms = now_ms()) {
  UsageRecord r;
  r.request_id = request_id(i);
  r.user_id = "user-" + std::to_string(i % 3);
  r.api_key = "sk-" + std::to_string(i % 2);
  r.model = i % 2 ? "model-b" : "model-a";
  r.prompt_tokens = i;
  r.completion_tokens = 2 * i;
  r.total_tokens = 3 * i;
  r.endpoint = "/v1/chat/completions";
  r.timestamp_ms = ts_ms;
  r.backend_url = "http://backend:8000";
  r.backend = "backend";
  r.status_code = 200;
  r.duration_ms = 12.5;
  return r;
}

// Submits make_record(from) .. make_record(to - 1) to a pipeline, ignoring what submit returns.
template <class Pipeline>
void submit_range(Pipeline& p, int from, int to) {
  for (int i = from; i < to; ++i) p.submit(make_record(i));
}

inline config::SinkConfig make_sink(const std::string& name, const std::string& url) {
  config::SinkConfig s;
  s.name = name;
  s.enabled = true;
  s.url = url;
  s.timeout = std::chrono::milliseconds(3000);
  s.retry = 2;
  s.max_backoff = std::chrono::milliseconds(40);
  s.batch_size = 1;
  s.batch_interval = std::chrono::milliseconds(20);
  return s;
}

inline config::UsageConfig disk_config(const std::string& path) {
  config::UsageConfig u;
  u.durability = config::Durability::disk;
  u.log_path = path;
  u.retention_days = 0;
  return u;
}

}  // namespace llmproxy::usage::testing
