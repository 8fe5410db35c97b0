#include "proxy/admin_access.h"

#include <gtest/gtest.h>

namespace {

using llmproxy::proxy::admin_access;
using llmproxy::proxy::AdminAccess;

TEST(AdminAccess, WithoutATokenOnlyLoopbackClients) {
  EXPECT_EQ(admin_access("", "", true), AdminAccess::allowed);
  EXPECT_EQ(admin_access("", "", false), AdminAccess::loopback_only);
  // A bearer of anything is no token when none is configured.
  EXPECT_EQ(admin_access("", "Bearer x", false), AdminAccess::loopback_only);
}

TEST(AdminAccess, WithATokenItsBearerFromAnywhere) {
  for (bool loopback : {true, false}) {
    EXPECT_EQ(admin_access("s3cret", "Bearer s3cret", loopback), AdminAccess::allowed);
    EXPECT_EQ(admin_access("s3cret", "bearer s3cret", loopback), AdminAccess::allowed);
    EXPECT_EQ(admin_access("s3cret", "", loopback), AdminAccess::bad_token);
    EXPECT_EQ(admin_access("s3cret", "Bearer s3cre", loopback), AdminAccess::bad_token);
    EXPECT_EQ(admin_access("s3cret", "Bearer s3cret ", loopback), AdminAccess::bad_token);
    EXPECT_EQ(admin_access("s3cret", "Bearer s3creT", loopback), AdminAccess::bad_token);
    EXPECT_EQ(admin_access("s3cret", "Basic s3cret12", loopback), AdminAccess::bad_token);
  }
}

}  // namespace
