// The header of an HTTP/1.x response from a backend, read in one pass without allocating: the
// status line and the fields, as views into the bytes given. Beast's parser spends ~1,000
// instructions a field (a search tree insert and an allocation each); this handles the plain
// form servers write in a few hundred for the whole header. Anything else (obsolete line
// folding, bare LF line ends, control bytes in a value, Content-Length and Transfer-Encoding
// together, a transfer coding other than "chunked" or in HTTP/1.0, several Content-Length fields,
// Proxy-Connection (Beast reads it like Connection), 101) is
// reported as unsupported: the caller gives the header to Beast's parser, whose rules then apply.
#pragma once

#include <array>
#include <boost/beast/http/field.hpp>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace llmproxy::http {

// One field, with the accessors of a Beast field (name(), name_string(), value()), so that code
// written for either reads both.
struct HeadField {
  // The field's code for the fields the gateway acts on (framing, hop-by-hop, Content-Type);
  // unknown for the others, which it only forwards.
  boost::beast::http::field code = boost::beast::http::field::unknown;
  std::string_view name_text;
  std::string_view value_text;

  boost::beast::http::field name() const { return code; }
  std::string_view name_string() const { return name_text; }
  std::string_view value() const { return value_text; }
};

struct ResponseHead {
  static constexpr std::size_t kMaxFields = 48;

  unsigned version = 11;  // 10 or 11
  unsigned status = 0;
  std::string_view reason;
  std::array<HeadField, kMaxFields> fields;
  std::size_t count = 0;
  std::optional<std::uint64_t> content_length;
  bool chunked = false;
  std::string_view connection;  // the Connection field's value, "" when absent
  std::size_t size = 0;         // bytes of the header, its final empty line included

  // The fields read, in order (as Beast's message.base()).
  std::span<const HeadField> base() const { return {fields.data(), count}; }
  // The first field named `f` (a known name), "" when absent.
  std::string_view operator[](boost::beast::http::field f) const {
    for (const auto& field : base()) {
      if (field.code == f) return field.value_text;
    }
    return {};
  }
  // The short header a parser of the body is given in place of the one read: the status line
  // and the framing fields (Transfer-Encoding, Content-Length, Connection), so that the body's
  // framing and the connection's keep-alive are read as from the original. Written into this
  // object (no allocation per response); valid until the next call or parse.
  std::string_view framing_header();

 private:
  // "HTTP/1.1 SSS R", one framing field (chunked and a length never come together) with at most
  // 18 digits, Connection of at most 128 bytes, the line ends.
  std::array<char, 256> framing_{};
};

enum class HeadParse { done, need_more, unsupported };

// Parses the header at the start of `bytes` into `out` (views into `bytes`).
HeadParse parse_response_head(std::string_view bytes, ResponseHead& out);

}  // namespace llmproxy::http
