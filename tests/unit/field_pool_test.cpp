// Unit tests for the per-thread pool of header-field blocks (proxy/field_pool.h): blocks are
// reused by size class, the lists are bounded, large blocks bypass the pool, and Beast's fields
// work over the allocator.
#include "proxy/field_pool.h"

#include <gtest/gtest.h>

#include <boost/beast/http/fields.hpp>
#include <string>
#include <thread>
#include <vector>

namespace llmproxy::proxy {
namespace {

TEST(FieldPool, AFreedBlockIsTakenAgainBySizesOfItsClass) {
  void* a = FieldPool::take(40);  // class 64
  const std::size_t before = FieldPool::kept(40);
  FieldPool::give(a, 40);
  EXPECT_EQ(FieldPool::kept(40), before + 1);
  void* b = FieldPool::take(64);  // same class: the same block
  EXPECT_EQ(a, b);
  EXPECT_EQ(FieldPool::kept(40), before);
  FieldPool::give(b, 64);
  void* c = FieldPool::take(65);  // the next class: not that block
  EXPECT_NE(c, b);
  FieldPool::give(c, 65);
}

TEST(FieldPool, ListsKeepAtMostKKeepBlocks) {
  std::vector<void*> blocks;
  for (std::size_t i = 0; i < FieldPool::kKeep + 10; ++i) blocks.push_back(FieldPool::take(200));
  for (void* p : blocks) FieldPool::give(p, 200);
  EXPECT_EQ(FieldPool::kept(200), FieldPool::kKeep);
  // Taken again, all of the kept ones come from the list.
  std::vector<void*> again;
  for (std::size_t i = 0; i < FieldPool::kKeep; ++i) again.push_back(FieldPool::take(200));
  EXPECT_EQ(FieldPool::kept(200), 0u);
  for (void* p : again) FieldPool::give(p, 200);
}

TEST(FieldPool, BlocksOverTheLargestClassAreNotKept) {
  const std::size_t before = FieldPool::kept(FieldPool::kMaxBytes);
  void* p = FieldPool::take(FieldPool::kMaxBytes + 1);
  FieldPool::give(p, FieldPool::kMaxBytes + 1);
  EXPECT_EQ(FieldPool::kept(FieldPool::kMaxBytes), before);
}

TEST(FieldPool, EachThreadHasItsOwnLists) {
  void* mine = FieldPool::take(100);
  FieldPool::give(mine, 100);
  void* theirs = nullptr;
  std::thread([&] {
    theirs = FieldPool::take(100);
    FieldPool::give(theirs, 100);
  }).join();
  EXPECT_NE(theirs, mine);  // the other thread's list was empty: a new block
  void* again = FieldPool::take(100);
  EXPECT_EQ(again, mine);
  FieldPool::give(again, 100);
}

TEST(FieldPool, BeastFieldsOverThePoolReuseTheirBlocks) {
  using Fields = boost::beast::http::basic_fields<PoolAllocator<char>>;
  const std::string value(60, 'v');
  {
    Fields f;
    f.insert("X-One", value);
    f.insert("X-Two", value);
    EXPECT_EQ(f["X-One"], value);
    EXPECT_EQ(f["X-Two"], value);
  }
  // Both elements went back to the pool; a second message takes them instead of new ones.
  const auto kept_in_all_classes = [] {
    std::size_t kept = 0;
    for (std::size_t bytes = FieldPool::kGranule; bytes <= FieldPool::kMaxBytes;
         bytes += FieldPool::kGranule) {
      kept += FieldPool::kept(bytes);
    }
    return kept;
  };
  const std::size_t kept = kept_in_all_classes();
  Fields g;
  g.insert("X-One", value);
  g.insert("X-Two", value);
  EXPECT_EQ(kept_in_all_classes() + 2, kept);
  EXPECT_EQ(g["X-Two"], value);
}

}  // namespace
}  // namespace llmproxy::proxy
