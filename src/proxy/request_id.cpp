#include "proxy/request_id.h"

#include <random>

namespace llmproxy::proxy {

namespace {
constexpr char kHex[] = "0123456789abcdef";
}

RequestIdGenerator::RequestIdGenerator(std::uint32_t first) : counter_(first) {
  draw_prefix();
}

void RequestIdGenerator::draw_prefix() {
  std::random_device rd;
  std::uint64_t r = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  for (int i = 0; i < 16; ++i) prefix_[i] = kHex[(r >> (i * 4)) & 0xf];
}

std::string RequestIdGenerator::next() {
  std::string id(4 + 16 + 8, '\0');
  id[0] = 'r';
  id[1] = 'e';
  id[2] = 'q';
  id[3] = '_';
  for (int i = 0; i < 16; ++i) id[4 + i] = prefix_[i];
  std::uint32_t c = counter_++;
  for (int i = 0; i < 8; ++i) id[20 + 7 - i] = kHex[(c >> (i * 4)) & 0xf];
  if (counter_ == 0) draw_prefix();  // wrapped: the next ids get another prefix
  return id;
}

bool acceptable_client_request_id(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (char ch : id) {
    if (ch < 0x21 || ch > 0x7e) return false;
  }
  return true;
}

}  // namespace llmproxy::proxy
