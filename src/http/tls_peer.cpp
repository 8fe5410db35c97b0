#include "http/tls_peer.h"

#include <arpa/inet.h>
#include <openssl/x509v3.h>

namespace llmproxy::http {

bool set_tls_peer(SSL* ssl, const std::string& host, bool verify) {
  unsigned char addr[16];
  const bool ip_host = ::inet_pton(AF_INET, host.c_str(), addr) == 1 ||
                       ::inet_pton(AF_INET6, host.c_str(), addr) == 1;
  if (!ip_host && !SSL_set_tlsext_host_name(ssl, host.c_str())) return false;
  if (!verify) return true;
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  return (ip_host ? X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str())
                  : X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0)) == 1;
}

std::string tls_refusal(const SSL* ssl) {
  const long result = SSL_get_verify_result(ssl);
  return result == X509_V_OK ? std::string() : X509_verify_cert_error_string(result);
}

}  // namespace llmproxy::http
