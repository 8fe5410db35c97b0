#include "log/line_output.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <pty.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using llmproxy::log::LineOutput;

// Everything the read end holds now (it is made non-blocking).
std::string drain(int fd) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t from = 0;
  while (from < text.size()) {
    const std::size_t eol = text.find('\n', from);
    EXPECT_NE(eol, std::string::npos) << "a line without its end";
    if (eol == std::string::npos) break;
    lines.push_back(text.substr(from, eol - from));
    from = eol + 1;
  }
  return lines;
}

std::string numbered_line(int i, std::size_t width) {
  std::string line = "line-" + std::to_string(i) + "-";
  line.resize(width, 'x');
  return line + "\n";
}

// Writes batches of lines into an output whose reader never reads, then checks that nothing
// blocked, that the lines read afterwards are whole and in order, and that read + dropped is
// everything.
void fill_and_check(int write_fd, int read_fd) {
  LineOutput out(write_fd);
  int written = 0;
  std::size_t dropped = 0;
  for (int batch = 0; batch < 200; ++batch) {
    std::string lines;
    for (int k = 0; k < 40; ++k) lines += numbered_line(written++, 150);
    dropped += out.write(lines);
  }
  EXPECT_GT(dropped, 0u);
  EXPECT_EQ(out.dropped(), dropped);
  // Once the reader has read, one more line: a line a short write cut (a terminal takes part
  // of a write) is finished first.
  std::string text = drain(read_fd);
  EXPECT_EQ(out.write(numbered_line(written++, 150)), 0u);
  text += drain(read_fd);
  const auto lines = split_lines(text);
  EXPECT_EQ(lines.size() + dropped, static_cast<std::size_t>(written));
  int last = -1;
  for (const auto& line : lines) {
    ASSERT_EQ(line.size(), 150u) << line.substr(0, 40);
    const int n = std::stoi(line.substr(5));
    EXPECT_GT(n, last);
    EXPECT_EQ(line, numbered_line(n, 150).substr(0, 150));
    last = n;
  }
}

TEST(LineOutput, PipeWhoseReaderStoppedDropsWholeLinesWithoutBlocking) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  fill_and_check(p[1], p[0]);
  ::close(p[0]);
  ::close(p[1]);
}

TEST(LineOutput, SocketWhoseReaderStoppedDropsWholeLinesWithoutBlocking) {
  int s[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, s), 0);
  fill_and_check(s[1], s[0]);
  ::close(s[0]);
  ::close(s[1]);
}

TEST(LineOutput, TerminalWhoseReaderStoppedDropsWholeLinesWithoutBlocking) {
  int master = -1;
  int slave = -1;
  ASSERT_EQ(::openpty(&master, &slave, nullptr, nullptr, nullptr), 0);
  termios raw{};
  ASSERT_EQ(::tcgetattr(slave, &raw), 0);
  ::cfmakeraw(&raw);  // no echo, no newline translation: the bytes read are the bytes written
  ASSERT_EQ(::tcsetattr(slave, TCSANOW, &raw), 0);
  fill_and_check(slave, master);
  ::close(master);
  ::close(slave);
}

// stdout and stderr on one pipe (2>&1): one writer, so that a line of one cut by a short write
// is finished before a line of the other goes out; each counts its own drops.
TEST(LineOutput, TwoOutputsOnOneFileShareTheirWriter) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  ASSERT_EQ(::fcntl(p[1], F_SETPIPE_SZ, 8192), 8192);
  const int p2 = ::dup(p[1]);
  LineOutput out(p[1]);
  LineOutput err(p2, &out);
  const std::string a = std::string(3999, 'a') + "\n";
  const std::string b = std::string(5999, 'b') + "\n";
  EXPECT_EQ(out.write(a), 0u);
  EXPECT_EQ(out.write(b), 0u);       // cut: its end is owed
  EXPECT_EQ(err.write("e1\n"), 1u);  // not written into b
  std::string got = drain(p[0]);
  EXPECT_EQ(err.write("e2\n"), 0u);  // b's end, then e2
  got += drain(p[0]);
  EXPECT_EQ(got, a + b + "e2\n");
  EXPECT_EQ(out.dropped(), 0u);
  EXPECT_EQ(err.dropped(), 1u);
  ::close(p[0]);
  ::close(p[1]);
  ::close(p2);
}

TEST(LineOutput, LineCutByAShortWriteIsFinishedBeforeAnyOther) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  ASSERT_EQ(::fcntl(p[1], F_SETPIPE_SZ, 8192), 8192);
  LineOutput out(p[1]);
  const std::string a = std::string(3999, 'a') + "\n";
  const std::string b = std::string(5999, 'b') + "\n";  // longer than PIPE_BUF: written alone
  EXPECT_EQ(out.write(a), 0u);
  // 8,192 bytes of room take a and the start of b; b's end waits for the reader.
  EXPECT_EQ(out.write(b), 0u);
  EXPECT_EQ(out.write("c\n"), 1u);  // b's end is owed first, and does not fit: c is dropped
  std::string got = drain(p[0]);
  EXPECT_EQ(out.write("d\n"), 0u);  // b's end, then d
  got += drain(p[0]);
  EXPECT_EQ(got, a + b + "d\n");
  EXPECT_EQ(out.dropped(), 1u);
  ::close(p[0]);
  ::close(p[1]);
}

// A descriptor pointed at another file (dup2, as a test's stderr capture does) is written as
// that file is, not through the reopen of the first one.
TEST(LineOutput, FollowsTheDescriptorToAnotherFile) {
  int first[2];
  int second[2];
  ASSERT_EQ(::pipe(first), 0);
  ASSERT_EQ(::pipe(second), 0);
  const int fd = ::dup(first[1]);
  LineOutput out(fd);
  EXPECT_EQ(out.write("one\n"), 0u);
  ASSERT_EQ(::dup2(second[1], fd), fd);
  EXPECT_EQ(out.write("two\n"), 0u);
  EXPECT_EQ(drain(first[0]), "one\n");
  EXPECT_EQ(drain(second[0]), "two\n");
  for (int f : {first[0], first[1], second[0], second[1], fd}) ::close(f);
}

TEST(LineOutput, RegularFileGetsEveryLine) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  LineOutput out(::fileno(f));
  std::string lines;
  for (int i = 0; i < 1000; ++i) lines += numbered_line(i, 100);
  EXPECT_EQ(out.write(lines), 0u);
  std::string back(lines.size(), '\0');
  ASSERT_EQ(::pread(::fileno(f), back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, lines);
  std::fclose(f);
}

TEST(LineOutput, ClosedDescriptorDropsAndCounts) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  ::close(p[0]);
  ::close(p[1]);
  LineOutput out(p[1]);
  EXPECT_EQ(out.write("one\ntwo\n"), 2u);
  EXPECT_EQ(out.dropped(), 2u);
}

}  // namespace
