#include "proxy/admin_access.h"

#include <boost/beast/core/string.hpp>

namespace llmproxy::proxy {

AdminAccess admin_access(std::string_view token, std::string_view authorization,
                         bool client_loopback) {
  if (token.empty()) return client_loopback ? AdminAccess::allowed : AdminAccess::loopback_only;
  constexpr std::string_view kBearer = "Bearer ";  // the scheme in any case (RFC 9110 11.1)
  if (authorization.size() != kBearer.size() + token.size() ||
      !boost::beast::iequals(authorization.substr(0, kBearer.size()), kBearer)) {
    return AdminAccess::bad_token;
  }
  // Constant time in the token's length: no early exit on the first differing byte.
  unsigned char diff = 0;
  for (std::size_t i = 0; i < token.size(); ++i) {
    diff |= static_cast<unsigned char>(authorization[kBearer.size() + i] ^ token[i]);
  }
  return diff == 0 ? AdminAccess::allowed : AdminAccess::bad_token;
}

}  // namespace llmproxy::proxy
