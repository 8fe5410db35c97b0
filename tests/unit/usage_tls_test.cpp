// https:// sinks: delivery over TLS, and the two checks that make it worth having — the chain
// must lead to a trusted certificate and the certificate must name the host in the URL.
//
// Certificates are made in the test with OpenSSL (P-256, self-signed, SAN as given) and trusted
// through SSL_CERT_FILE, which OpenSSL's default verify paths (the client's system store) honour.
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <csignal>
#include <fstream>

#include "usage/pipeline.h"
#include "usage_test_support.h"

namespace llmproxy::usage {
namespace {

using namespace std::chrono_literals;
using testing::make_record;
using testing::make_sink;
using testing::Receiver;
using testing::submit_range;
using testing::TempDir;

struct Cert {
  EVP_PKEY* key = nullptr;
  X509* x509 = nullptr;
  SSL_CTX* server = nullptr;
  explicit Cert(const std::string& san) {
    key = EVP_EC_gen("P-256");
    x509 = X509_new();
    X509_set_version(x509, 2);
    static long serial = 1;
    ASN1_INTEGER_set(X509_get_serialNumber(x509), serial++);
    X509_gmtime_adj(X509_getm_notBefore(x509), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x509), 86400);
    X509_set_pubkey(x509, key);
    X509_NAME* name = X509_get_subject_name(x509);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>("llmproxy test"), -1, -1, 0);
    X509_set_issuer_name(x509, name);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x509, x509, nullptr, nullptr, 0);
    for (auto [nid, value] : {std::pair{NID_subject_alt_name, san.c_str()},
                              std::pair{NID_basic_constraints, "critical,CA:TRUE"}}) {
      X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
      X509_add_ext(x509, ext, -1);
      X509_EXTENSION_free(ext);
    }
    X509_sign(x509, key, EVP_sha256());
    server = SSL_CTX_new(TLS_server_method());
    SSL_CTX_use_certificate(server, x509);
    SSL_CTX_use_PrivateKey(server, key);
  }
  ~Cert() {
    SSL_CTX_free(server);
    X509_free(x509);
    EVP_PKEY_free(key);
  }
  void write_pem(const std::string& path) const {
    BIO* bio = BIO_new_file(path.c_str(), "w");
    PEM_write_bio_X509(bio, x509);
    BIO_free(bio);
  }
};

// Points OpenSSL's default trust store file at `path` for the scope.
class TrustOnly {
 public:
  explicit TrustOnly(const std::string& path) {
    if (const char* old = std::getenv("SSL_CERT_FILE")) old_ = old;
    ::setenv("SSL_CERT_FILE", path.c_str(), 1);
  }
  ~TrustOnly() {
    if (old_) {
      ::setenv("SSL_CERT_FILE", old_->c_str(), 1);
    } else {
      ::unsetenv("SSL_CERT_FILE");
    }
  }

 private:
  std::optional<std::string> old_;
};

class UsageTls : public ::testing::Test {
 protected:
  void SetUp() override { std::signal(SIGPIPE, SIG_IGN); }  // the receiver's SSL_write
  std::string https(const Receiver& rx) { return url(rx, "127.0.0.1"); }
  static std::string url(const Receiver& rx, const std::string& host) {
    return "https://" + host + ":" + std::to_string(rx.port()) + "/hook";
  }
  // A sink to `host` (the receiver serving `cert`, trusting only `trusted_pem`) that fails its
  // handshake twice without sending a request: the gateway's log of it, which says why.
  std::string refusal_log(const Cert& cert, const std::string& trusted_pem,
                          const std::string& host) {
    TrustOnly trust(trusted_pem);
    Receiver rx(0, cert.server);
    Pipeline p(testing::disk_config(dir_.file("usage.db")), {make_sink("hook", url(rx, host))});
    ::testing::internal::CaptureStderr();
    p.start();
    p.submit(make_record(0));
    EXPECT_TRUE(testing::eventually(
        [&] { return p.stats().sinks[0].failed >= 2 && rx.failed_handshakes() >= 2; }));
    p.stop(std::chrono::steady_clock::now() + 50ms);
    EXPECT_EQ(rx.count(), 0u);  // no request ever went out
    EXPECT_EQ(p.stats().sinks[0].delivered, 0u);
    return ::testing::internal::GetCapturedStderr();
  }
  TempDir dir_;
};

TEST_F(UsageTls, DeliversOverVerifiedHttps) {
  Cert cert("IP:127.0.0.1");
  cert.write_pem(dir_.file("ca.pem"));
  TrustOnly trust(dir_.file("ca.pem"));
  Receiver rx(0, cert.server);
  Pipeline p(testing::disk_config(dir_.file("usage.db")), {make_sink("hook", https(rx))});
  p.start();
  submit_range(p, 0, 5);
  WAIT_FOR(p.stats().sinks[0].delivered == 5);
  p.stop(std::chrono::steady_clock::now() + 10s);
  auto got = rx.accepted();
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(got[4].header("idempotency-key"), testing::request_id(4));
  EXPECT_TRUE(got[0].body.starts_with("{\"request_id\":\"req-00000\"")) << got[0].body;
  EXPECT_EQ(rx.connections(), 1u);  // kept alive across POSTs
  EXPECT_EQ(p.stats().sinks[0].failed, 0u);
}

TEST_F(UsageTls, RefusesAnUntrustedCertificate) {
  Cert cert("IP:127.0.0.1");
  Cert other("IP:127.0.0.1");
  other.write_pem(dir_.file("other.pem"));
  const std::string log = refusal_log(cert, dir_.file("other.pem"), "127.0.0.1");
  EXPECT_NE(log.find("certificate verify failed (SSL routines): self-signed certificate"),
            std::string::npos)
      << log;
}

TEST_F(UsageTls, RefusesACertificateForAnotherHost) {
  Cert cert("DNS:other.example");
  cert.write_pem(dir_.file("ca.pem"));
  const std::string log = refusal_log(cert, dir_.file("ca.pem"), "127.0.0.1");
  EXPECT_NE(log.find("IP address mismatch"), std::string::npos) << log;
}

TEST_F(UsageTls, RefusesAMismatchedHostName) {
  Cert cert("DNS:other.example");
  cert.write_pem(dir_.file("ca.pem"));
  const std::string log = refusal_log(cert, dir_.file("ca.pem"), "localhost");
  EXPECT_NE(log.find("hostname mismatch"), std::string::npos) << log;
}

// A host name in the URL: sent as SNI and matched against the certificate's DNS names.
TEST_F(UsageTls, MatchesAHostName) {
  Cert cert("DNS:localhost");
  cert.write_pem(dir_.file("ca.pem"));
  TrustOnly trust(dir_.file("ca.pem"));
  Receiver rx(0, cert.server);
  Pipeline p(testing::disk_config(dir_.file("usage.db")),
             {make_sink("hook", url(rx, "localhost"))});
  p.start();
  submit_range(p, 0, 2);
  WAIT_FOR(p.stats().sinks[0].delivered == 2);
  p.stop(std::chrono::steady_clock::now() + 10s);
  ASSERT_EQ(rx.accepted().size(), 2u);
  EXPECT_EQ(rx.server_name(), "localhost");
}

}  // namespace
}  // namespace llmproxy::usage
