// Whole lines to a file descriptor, from any thread, never blocking on a pipe, socket or
// terminal whose reader stopped (a stalled `docker logs`, journald's backpressure, a suspended
// `| tee`, a terminal held by Ctrl-S).
//
// What the output cannot take at once is dropped, whole lines only, and counted: a worker that
// waited for its log reader would stall every request it holds, and with it the scrapes, reloads
// and drain that wait for that worker. One writer at a time per file (stdout and stderr on the
// same pipe share one), and a line cut by a short write is finished before any other line goes
// out, so lines never interleave mid-line. A pipe or terminal is written through a non-blocking
// description of its own (fd 1 itself stays as it is), a pipe in writes of whole lines of at most
// PIPE_BUF bytes where the lines allow, which the kernel makes atomic against other writers of
// the pipe too. Regular files are written as they are (a full disk drops lines), and so is a
// terminal that cannot be reopened (another user's: it may block).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace llmproxy::log {

class LineOutput {
 public:
  // `same_file_as`: an output that may be the same file (stderr given stdout's): when it is, it
  // writes for this one, which keeps its own count of drops.
  explicit LineOutput(int fd, LineOutput* same_file_as = nullptr);
  ~LineOutput();
  LineOutput(const LineOutput&) = delete;
  LineOutput& operator=(const LineOutput&) = delete;

  // `lines`: whole lines, each ending in '\n'. Returns how many of them were dropped.
  std::size_t write(std::string_view lines);
  // Lines dropped since the start.
  std::uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  enum class Kind { plain, nonblocking, pipe_polled, socket, closed };
  struct Identity {
    bool open = false;
    dev_t dev = 0;
    ino_t ino = 0;
    mode_t mode = 0;
    bool operator==(const Identity& o) const {
      return open == o.open && dev == o.dev && ino == o.ino;
    }
  };
  static Identity identify(int fd);
  void setup(const Identity& id);  // how to write the file fd_ names now (under mu_)
  // Writes `lines` (as the writer of this file) and counts what it drops in `dropped`.
  std::size_t emit(std::string_view lines, std::atomic<std::uint64_t>& dropped);
  // One write that never blocks (pipe, socket, terminal): bytes taken, or -1 when none could be.
  long put(const char* p, std::size_t n);
  bool finish_cut_line();  // writes rest_; false when the output cannot take all of it now

  std::mutex mu_;
  const int fd_;  // the descriptor given (1, 2)
  int out_;       // what is written: fd_, or a non-blocking reopen of its file
  Identity id_;   // the file fd_ named at setup()
  Kind kind_ = Kind::plain;
  bool owned_ = false;  // out_ is a reopen, closed with this object or at the next setup()
  LineOutput* const same_file_as_;
  std::string rest_;  // the end of a line that a short write cut
  std::atomic<std::uint64_t> dropped_{0};
};

// The process's two outputs: stdout (the access log) and stderr (the process log).
LineOutput& stdout_lines();
LineOutput& stderr_lines();

}  // namespace llmproxy::log
