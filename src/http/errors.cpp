#include "http/errors.h"

namespace llmproxy::http {

void append_json_escaped(std::string& out, std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  for (char ch : text) {
    auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xf];
        } else {
          out += ch;
        }
    }
  }
}

std::string error_body(const ErrorSpec& spec, std::string_view message) {
  std::string out;
  out.reserve(96 + message.size() + spec.type.size() + spec.code.size());
  out += R"({"error":{"message":")";
  append_json_escaped(out, message);
  out += R"(","type":")";
  out += spec.type;
  out += R"(","param":null,"code":")";
  out += spec.code;
  out += "\"}}";
  return out;
}

}  // namespace llmproxy::http
