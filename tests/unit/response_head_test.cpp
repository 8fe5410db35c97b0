// The direct response-header reader against Beast's parser: whatever it accepts must read as
// Beast reads it (status, version, fields in order, framing, keep-alive), and it must accept
// what servers send, or the fast path would never run.
#include "http/response_head.h"

#include <gtest/gtest.h>

#include <boost/beast/http.hpp>
#include <boost/optional/optional_io.hpp>
#include <cctype>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace llmproxy::http {
namespace {

namespace bhttp = boost::beast::http;

struct BeastHead {
  bool ok = false;
  bhttp::response_parser<bhttp::empty_body> p;
};

void parse_with_beast(const std::string& bytes, BeastHead& b) {
  b.p.eager(false);
  b.p.body_limit(boost::none);  // as the gateway's parser: a length is not refused
  boost::system::error_code ec;
  b.p.put(boost::asio::buffer(bytes), ec);
  b.ok = !ec && b.p.is_header_done();
}

// Compares what parse_response_head() accepted with Beast's reading of the same bytes.
void expect_same_as_beast(const std::string& bytes) {
  SCOPED_TRACE(::testing::PrintToString(bytes));
  ResponseHead head;
  const HeadParse r = parse_response_head(bytes, head);
  if (r != HeadParse::done) return;  // left to Beast
  BeastHead b;
  parse_with_beast(bytes, b);
  ASSERT_TRUE(b.ok) << "accepted a header Beast rejects";
  const auto& m = b.p.get();
  EXPECT_EQ(head.status, m.result_int());
  EXPECT_EQ(head.version, m.version());
  // Beast stands in the obsolete phrase for an empty one (the gateway does the same).
  EXPECT_EQ(
      head.reason.empty() ? std::string_view(bhttp::obsolete_reason(m.result())) : head.reason,
      std::string_view(m.reason()));
  // The same fields, in wire order here; Beast groups fields of one name, so compare the order
  // of the values of each name.
  auto by_name = [](auto&& fields) {
    std::map<std::string, std::vector<std::string>> out;
    for (const auto& [name, value] : fields) {
      std::string key(name);
      for (auto& c : key) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      out[key].emplace_back(value);
    }
    return out;
  };
  std::vector<std::pair<std::string, std::string>> want, got;
  for (const auto& f : m.base()) want.emplace_back(f.name_string(), f.value());
  for (std::size_t i = 0; i < head.count; ++i) {
    got.emplace_back(head.fields[i].name_string(), head.fields[i].value());
    // The code, where given, is Beast's (ClassifiesTheFieldsTheGatewayActsOn: which are given).
    if (head.fields[i].name() != bhttp::field::unknown) {
      EXPECT_EQ(head.fields[i].name(), bhttp::string_to_field(head.fields[i].name_string()));
    }
  }
  EXPECT_EQ(by_name(got), by_name(want));
  EXPECT_EQ(head.content_length.has_value(), b.p.content_length().has_value());
  if (head.content_length && b.p.content_length()) {
    EXPECT_EQ(*head.content_length, *b.p.content_length());
  }
  EXPECT_EQ(head.chunked, b.p.chunked());
  EXPECT_EQ(head.connection, m[bhttp::field::connection]);
  // Beast given only the framing header reads the framing and keep-alive as from the original.
  const std::string framing(head.framing_header());
  BeastHead short_head;
  parse_with_beast(framing, short_head);
  ASSERT_TRUE(short_head.ok) << framing;
  EXPECT_EQ(short_head.p.keep_alive(), b.p.keep_alive()) << framing;
  EXPECT_EQ(short_head.p.chunked(), b.p.chunked());
  EXPECT_EQ(short_head.p.content_length(), b.p.content_length());
  EXPECT_EQ(short_head.p.need_eof(), b.p.need_eof());
  EXPECT_EQ(short_head.p.is_done(), b.p.is_done());
  EXPECT_EQ(short_head.p.get().result_int(), m.result_int());
  // The header ends where Beast's does: the body starts at head.size.
  BeastHead again;
  again.p.eager(false);
  again.p.body_limit(boost::none);
  boost::system::error_code ec;
  const std::size_t used = again.p.put(boost::asio::buffer(bytes.data(), head.size), ec);
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(used, head.size);
}

TEST(ResponseHead, ServersHeadersAreReadAndAgreeWithBeast) {
  const std::vector<std::string> servers = {
      // vLLM / uvicorn, non-stream and stream
      "HTTP/1.1 200 OK\r\ndate: Fri, 27 Nov 2026 05:00:00 GMT\r\nserver: uvicorn\r\n"
      "content-length: 356\r\ncontent-type: application/json\r\n\r\n{\"id\":1}",
      "HTTP/1.1 200 OK\r\ndate: Fri, 27 Nov 2026 05:00:00 GMT\r\nserver: uvicorn\r\n"
      "content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n",
      // llama.cpp, TGI, Node, an error, HTTP/1.0 without a length, an interim response
      "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Type: application/json; "
      "charset=utf-8\r\nServer: llama.cpp\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: "
      "\r\n\r\n{}",
      "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nx-error-type: "
      "overloaded\r\ncontent-length: 0\r\nvary: origin, access-control-request-method\r\n\r\n",
      "HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 5\r\n\r\noops!",
      "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
      "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
      "HTTP/1.1 204 \r\nX-Empty-Reason: yes\r\n\r\n",
      "HTTP/1.1 200 OK\r\nX-Obs-Text: caf\xc3\xa9\r\nX-Spaces:   padded \t \r\n\r\n",
  };
  for (const auto& h : servers) {
    ResponseHead head;
    EXPECT_EQ(parse_response_head(h, head), HeadParse::done) << h;
    expect_same_as_beast(h);
  }
  ResponseHead head;
  ASSERT_EQ(parse_response_head(servers[0], head), HeadParse::done);
  EXPECT_EQ(head[bhttp::field::content_type], "application/json");
  EXPECT_EQ(head.content_length, 356u);
  EXPECT_EQ(servers[0].substr(head.size), "{\"id\":1}");
}

TEST(ResponseHead, ClassifiesTheFieldsTheGatewayActsOn) {
  // Framing, hop-by-hop and Content-Type have their codes, in any case; others are unknown.
  // (Proxy-Connection is left to Beast: OtherFormsAreLeftToBeast.)
  std::string h = "HTTP/1.1 200 OK\r\n";
  const std::vector<std::string> acted_on = {
      "connection", "KEEP-ALIVE", "Proxy-Authenticate", "proxy-authorization", "Te",
      "Trailer",    "Upgrade",    "Content-Type",       "Transfer-Encoding"};
  for (const auto& n : acted_on) h += n + ": close\r\n";
  h += "Server: x\r\nDate: y\r\nX-Request-Id: z\r\n\r\n";
  h.replace(h.find("Transfer-Encoding: close"), 24, "Transfer-Encoding: chunked");
  ResponseHead head;
  ASSERT_EQ(parse_response_head(h, head), HeadParse::done) << h;
  ASSERT_EQ(head.count, acted_on.size() + 3);
  for (std::size_t i = 0; i < head.count; ++i) {
    const auto beast = bhttp::string_to_field(head.fields[i].name_string());
    EXPECT_EQ(head.fields[i].name(), i < acted_on.size() ? beast : bhttp::field::unknown)
        << head.fields[i].name_string();
  }
}

TEST(ResponseHead, IncompleteHeadersNeedMore) {
  const std::string full = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: x\r\n\r\n";
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    ResponseHead head;
    EXPECT_EQ(parse_response_head(full.substr(0, cut), head), HeadParse::need_more) << cut;
  }
}

TEST(ResponseHead, OtherFormsAreLeftToBeast) {
  for (const std::string h : {
           "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
           "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
           "HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
           "HTTP/1.1 200 OK\nContent-Length: 0\n\n",
           "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
           "HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\n\r\n",
           "HTTP/1.1 200 OK\r\n: empty-name\r\n\r\n",
           "HTTP/2 200 OK\r\n\r\n",
           "HTTP/1.1 20 OK\r\n\r\n",
           "HTTP/1.1 200\r\n\r\n",
           "HTTP/1.1 200 OK\r\nProxy-Connection: close\r\n\r\n",
           "FOO\r\n",
       }) {
    ResponseHead head;
    EXPECT_EQ(parse_response_head(h, head), HeadParse::unsupported) << h;
  }
}

TEST(ResponseHead, EveryByteOfALongValueIsChecked) {
  // Values are checked sixteen bytes at a time, then byte by byte: a byte that is not allowed
  // anywhere in a long value (or in the reason phrase) sends the header to Beast; an allowed
  // one anywhere is read as part of the value.
  const std::string filler(40, 'v');
  for (std::size_t at = 0; at < filler.size(); ++at) {
    for (const char bad : {'\x00', '\x01', '\n', '\r', '\x1f', '\x7f'}) {
      std::string value = filler;
      value[at] = bad;
      ResponseHead head;
      const std::string field = "HTTP/1.1 200 OK\r\nX-Long: " + value + "\r\n\r\n";
      EXPECT_EQ(parse_response_head(field, head), HeadParse::unsupported)
          << "byte " << int(bad) << " at " << at;
      const std::string reason = "HTTP/1.1 200 " + value + "\r\n\r\n";
      EXPECT_EQ(parse_response_head(reason, head), HeadParse::unsupported)
          << "reason: byte " << int(bad) << " at " << at;
    }
    for (const char good : {'\t', ' ', '~', '\x80', '\xff'}) {
      std::string value = filler;
      value[at] = good;
      const std::string h = "HTTP/1.1 200 OK\r\nX-Long: " + value + "\r\n\r\n";
      ResponseHead head;
      ASSERT_EQ(parse_response_head(h, head), HeadParse::done)
          << "byte " << int(good) << " at " << at;
      ASSERT_EQ(head.count, 1u);
      // Spaces and tabs at either end are the field's optional whitespace, not its value.
      const auto first = value.find_first_not_of(" \t");
      const auto last = value.find_last_not_of(" \t");
      EXPECT_EQ(head.fields[0].value(), value.substr(first, last - first + 1))
          << "byte " << int(good) << " at " << at;
      expect_same_as_beast(h);
    }
  }
}

TEST(ResponseHead, RandomHeadersAgreeWithBeast) {
  std::mt19937 rng(99);
  const std::vector<std::string> names = {"Content-Type",
                                          "content-length",
                                          "Transfer-Encoding",
                                          "Connection",
                                          "Server",
                                          "X-Request-Id",
                                          "date",
                                          "X-Weird_Name!",
                                          "Keep-Alive",
                                          "Vary",
                                          "a",
                                          "TE",
                                          "Upgrade",
                                          "Proxy-Connection",
                                          "Trailer",
                                          "Proxy-Authorization"};
  const std::vector<std::string> values = {
      "application/json", "12", "chunked",      "close", "keep-alive", "",   " spaced ", "a,b, c",
      "caf\xc3\xa9",      "0",  "999999999999", "x\ty",  "Chunked",    "007"};
  const std::vector<std::string> lines = {"HTTP/1.1 200 OK",        "HTTP/1.0 200 OK",
                                          "HTTP/1.1 404 Not Found", "HTTP/1.1 204 No Content",
                                          "HTTP/1.1 304 ",          "HTTP/1.1 100 Continue"};
  int done = 0;
  for (int i = 0; i < 4000; ++i) {
    std::string h = lines[rng() % lines.size()] + "\r\n";
    const int n = static_cast<int>(rng() % 6);
    for (int k = 0; k < n; ++k) {
      h += names[rng() % names.size()] + ":" + (rng() % 2 ? " " : "") +
           values[rng() % values.size()] + "\r\n";
    }
    if (rng() % 8 == 0) {  // now and then a malformed line: folding, no colon, a bare LF...
      static const std::vector<std::string> bad = {" folded\r\n",     "NoColon\r\n",
                                                   "X: a\nY: b\r\n",  "X: a\x01\r\n",
                                                   "Bad Name: v\r\n", "\r\n\r\n"};
      h += bad[rng() % bad.size()];
    }
    h += "\r\n";
    ResponseHead head;
    const HeadParse r = parse_response_head(h, head);
    if (r == HeadParse::done) {
      ++done;
      // Every shorter prefix of an accepted header asks for more bytes.
      for (std::size_t cut = 0; cut < head.size; cut += 1 + rng() % 7) {
        ResponseHead part;
        ASSERT_EQ(parse_response_head(h.substr(0, cut), part), HeadParse::need_more)
            << cut << " " << h;
      }
    }
    expect_same_as_beast(h);
  }
  EXPECT_GT(done, 1000);
}

}  // namespace
}  // namespace llmproxy::http
