// The client side of a TLS connection's peer check, shared by the request path (upstreams) and
// the webhook sinks: SNI for host names (never for an address, RFC 6066 3), and the name or
// address handed to OpenSSL itself, so that a mismatch is reported as what it is ("hostname
// mismatch", "IP address mismatch") instead of as an unspecified failure of a verify callback.
#pragma once

#include <openssl/ssl.h>

#include <string>

namespace llmproxy::http {

// Sets SNI (for a name) and, with `verify`, the name or address the certificate must match
// (`host` as a URL gives it, an IPv6 address without brackets). Returns false, with OpenSSL's
// error queue set, when OpenSSL refuses either.
bool set_tls_peer(SSL* ssl, const std::string& host, bool verify);

// Why the peer's certificate was refused ("self-signed certificate", "hostname mismatch"), or
// empty when it was not (the handshake failed for another reason, which its error says).
std::string tls_refusal(const SSL* ssl);

}  // namespace llmproxy::http
