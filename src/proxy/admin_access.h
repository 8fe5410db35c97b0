// Who may use the admin API (/admin/backends, /admin/config, /admin/reload).
#pragma once

#include <string_view>

namespace llmproxy::proxy {

enum class AdminAccess {
  allowed,
  bad_token,      // 401: admin.token is set and the request does not carry it
  loopback_only,  // 403: no admin.token, and the client is not on this host's loopback
};

// With `token` set: `Authorization: Bearer <token>` (the scheme in any case), compared in
// constant time in the token's length. Without one, the API is open to loopback clients only:
// the shipped configs listen on every address, and an open /admin/reload there is anyone's.
AdminAccess admin_access(std::string_view token, std::string_view authorization,
                         bool client_loopback);

}  // namespace llmproxy::proxy
