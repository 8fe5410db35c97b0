// An allocator for the header fields of the messages a worker parses (Beast's basic_fields
// allocates one block per field, and one for the target). Each request freed its fields to
// malloc and took new ones for the next: with many requests in flight, freed blocks overflowed
// glibc's per-thread cache into its fast bins, which the next large block (a coroutine frame)
// then made malloc consolidate. Here small blocks go back to a free list per thread and size
// class instead, and are taken from it again.
//
// Bounded: a list keeps at most kKeep blocks; more are given back to operator delete, as are
// blocks over kMaxBytes. Blocks are only ever reused by the thread that freed them (a block
// freed on another thread goes to that thread's list: the lists hold plain memory).
#pragma once

#include <array>
#include <cstddef>
#include <new>
#include <type_traits>

namespace llmproxy::proxy {

class FieldPool {
 public:
  static constexpr std::size_t kGranule = 32;  // size classes: 32, 64, ..., kMaxBytes
  static constexpr std::size_t kMaxBytes = 256;
  static constexpr std::size_t kKeep = 512;  // blocks kept per class and thread
  static constexpr std::size_t kClasses = kMaxBytes / kGranule;

  static void* take(std::size_t bytes) {
    if (!pooled(bytes)) return ::operator new(bytes);
    List& l = lists()[index(bytes)];
    if (Node* n = l.head) {
      l.head = n->next;
      --l.count;
      return n;
    }
    return ::operator new(class_bytes(bytes));
  }

  static void give(void* p, std::size_t bytes) noexcept {
    if (!pooled(bytes)) {
      ::operator delete(p);
      return;
    }
    List& l = lists()[index(bytes)];
    if (l.count == kKeep) {
      ::operator delete(p);
      return;
    }
    l.head = new (p) Node{l.head};
    ++l.count;
  }

  // Blocks kept by this thread for `bytes` (for tests); 0 for sizes the pool does not keep.
  static std::size_t kept(std::size_t bytes) {
    return pooled(bytes) ? lists()[index(bytes)].count : 0;
  }

 private:
  struct Node {
    Node* next;
  };
  struct List {
    Node* head = nullptr;
    std::size_t count = 0;
    ~List() {
      while (head) {
        Node* n = head;
        head = n->next;
        ::operator delete(n);
      }
    }
  };
  static bool pooled(std::size_t bytes) { return bytes != 0 && bytes <= kMaxBytes; }
  static std::size_t index(std::size_t bytes) { return (bytes - 1) / kGranule; }
  static std::size_t class_bytes(std::size_t bytes) { return (index(bytes) + 1) * kGranule; }
  static std::array<List, kClasses>& lists() {
    thread_local std::array<List, kClasses> l;
    return l;
  }
};

// A stateless standard allocator over FieldPool, for bhttp::basic_fields<PoolAllocator<char>>.
template <class T>
struct PoolAllocator {
  // Blocks come from operator new(size_t): aligned for anything not over-aligned.
  static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
  using value_type = T;
  using is_always_equal = std::true_type;
  PoolAllocator() = default;
  template <class U>
  PoolAllocator(const PoolAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(FieldPool::take(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) noexcept { FieldPool::give(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const PoolAllocator<U>&) const noexcept {
    return true;
  }
};

}  // namespace llmproxy::proxy
