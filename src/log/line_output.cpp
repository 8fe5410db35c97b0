#include "log/line_output.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <string>

namespace llmproxy::log {

namespace {

// The longest run of whole lines at the start of `lines` that fits in one atomic pipe write;
// a first line longer than that goes alone.
std::size_t chunk_length(std::string_view lines) {
  if (lines.size() <= PIPE_BUF) return lines.size();
  std::size_t end = lines.rfind('\n', PIPE_BUF - 1);
  if (end == std::string_view::npos) end = lines.find('\n', PIPE_BUF);
  return end == std::string_view::npos ? lines.size() : end + 1;
}

}  // namespace

LineOutput::Identity LineOutput::identify(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return {};
  return {true, st.st_dev, st.st_ino, st.st_mode};
}

LineOutput::LineOutput(int fd, LineOutput* same_file_as)
    : fd_(fd), out_(fd), same_file_as_(same_file_as) {
  setup(identify(fd));
}

void LineOutput::setup(const Identity& id) {
  if (owned_) ::close(out_);
  owned_ = false;
  out_ = fd_;
  id_ = id;
  rest_.clear();  // the end of a line owed to another file
  kind_ = Kind::plain;
  if (!id.open) {
    kind_ = Kind::closed;
    return;
  }
  if (S_ISSOCK(id.mode)) {
    kind_ = Kind::socket;  // send(MSG_DONTWAIT): non-blocking per call
    return;
  }
  const bool pipe = S_ISFIFO(id.mode);
  if (pipe || ::isatty(fd_)) {
    // A description of our own, non-blocking, leaves fd 1's (shared with whatever else writes
    // it, and with the parent) as it is. Refused (a pipe of another user, no /proc): a pipe is
    // polled first; a terminal is written as it is.
    const std::string self = "/proc/self/fd/" + std::to_string(fd_);
    const int own = ::open(self.c_str(), O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (own >= 0) {
      out_ = own;
      owned_ = true;
      kind_ = Kind::nonblocking;
    } else if (pipe) {
      kind_ = Kind::pipe_polled;
    }
  }
}

LineOutput::~LineOutput() {
  // A line cut by a short write is finished if the reader takes it within a second of the first
  // output's end (one second for both: the exit waits no longer): a reader must not see the last
  // line cut off.
  static const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  if (!rest_.empty() && kind_ != Kind::closed) {
    while (!finish_cut_line() && std::chrono::steady_clock::now() < deadline) {
      pollfd pfd{out_, POLLOUT, 0};
      ::poll(&pfd, 1, 10);
    }
  }
  if (owned_) ::close(out_);
}

long LineOutput::put(const char* p, std::size_t n) {
  for (;;) {
    ssize_t got = -1;
    switch (kind_) {
      case Kind::closed:
        return -1;
      case Kind::socket:
        got = ::send(out_, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
      case Kind::pipe_polled: {
        // POLLOUT on a pipe promises room for PIPE_BUF bytes; nothing else here writes to it
        // while the lock is held.
        pollfd pfd{out_, POLLOUT, 0};
        if (::poll(&pfd, 1, 0) != 1 || (pfd.revents & POLLOUT) == 0) return -1;
        got = ::write(out_, p, std::min<std::size_t>(n, PIPE_BUF));
        break;
      }
      case Kind::nonblocking:
      case Kind::plain:
        got = ::write(out_, p, n);
        break;
    }
    if (got > 0) return static_cast<long>(got);
    if (got < 0 && errno == EINTR) continue;
    return -1;  // EAGAIN (the reader is behind), EPIPE, a full disk...: not now
  }
}

bool LineOutput::finish_cut_line() {
  while (!rest_.empty()) {
    const long n = put(rest_.data(), rest_.size());
    if (n < 0) return false;
    rest_.erase(0, static_cast<std::size_t>(n));
  }
  return true;
}

std::size_t LineOutput::write(std::string_view lines) {
  if (lines.empty()) return 0;
  // stderr on stdout's file (2>&1): one writer, so that nothing comes between a cut line's
  // parts. Asked at each write, as the file is: a descriptor may be pointed elsewhere (dup2).
  if (same_file_as_ != nullptr) {
    const Identity mine = identify(fd_);
    if (mine.open && mine == identify(same_file_as_->fd_)) {
      return same_file_as_->emit(lines, dropped_);
    }
  }
  return emit(lines, dropped_);
}

std::size_t LineOutput::emit(std::string_view lines, std::atomic<std::uint64_t>& dropped) {
  const auto drop = [&dropped](std::string_view rest) {
    auto n = static_cast<std::size_t>(std::count(rest.begin(), rest.end(), '\n'));
    if (!rest.empty() && rest.back() != '\n') ++n;
    dropped.fetch_add(n, std::memory_order_relaxed);
    return n;
  };
  std::lock_guard lock(mu_);
  // The descriptor names another file than it did (dup2): written as that one is.
  if (const Identity now = identify(fd_); !(now == id_)) setup(now);
  // Another line's end first: nothing may come between its two parts.
  if (!finish_cut_line()) return drop(lines);
  while (!lines.empty()) {
    // A pipe in whole lines of at most PIPE_BUF: atomic against its other writers.
    const std::size_t len = S_ISFIFO(id_.mode) ? chunk_length(lines) : lines.size();
    const long n = put(lines.data(), len);
    if (n < 0) return drop(lines);
    auto done = static_cast<std::size_t>(n);
    if (done < len && lines[done - 1] != '\n') {
      // A short write cut a line: its end is owed before anything else.
      const std::size_t eol = lines.find('\n', done);
      const std::size_t end = eol == std::string_view::npos ? lines.size() : eol + 1;
      rest_.assign(lines.substr(done, end - done));
      done = end;
      lines.remove_prefix(done);
      if (!finish_cut_line()) return drop(lines);
      continue;
    }
    lines.remove_prefix(done);
  }
  return 0;
}

LineOutput& stdout_lines() {
  static LineOutput out(STDOUT_FILENO);
  return out;
}

LineOutput& stderr_lines() {
  static LineOutput out(STDERR_FILENO, &stdout_lines());
  return out;
}

}  // namespace llmproxy::log
