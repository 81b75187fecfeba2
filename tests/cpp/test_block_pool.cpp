// The block pool's policy (conv/block_pool.h): reuse by size with bounded slack, LIFO, the
// cap, a miss that returns kept blocks before it maps past its bound, empty(), and threads.
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "check.h"
#include "conv/block_pool.h"

using dc::BlockPool;

namespace {

constexpr int64_t kPage = BlockPool::kPage;

void reuse_by_size_lifo() {
  BlockPool pool(1024 * kPage);
  int64_t a_bytes = 0, b_bytes = 0, c_bytes = 0;
  void* a = pool.allocate(10 * kPage - 100, &a_bytes);
  void* b = pool.allocate(10 * kPage, &b_bytes);
  CHECK(a_bytes == 10 * kPage && b_bytes == 10 * kPage, "blocks are whole pages: %lld, %lld",
        static_cast<long long>(a_bytes), static_cast<long long>(b_bytes));
  CHECK(reinterpret_cast<uintptr_t>(a) % kPage == 0, "blocks are page-aligned");
  std::memset(a, 1, static_cast<size_t>(a_bytes));
  pool.release(a, a_bytes);
  pool.release(b, b_bytes);
  void* c = pool.allocate(10 * kPage, &c_bytes);
  CHECK(c == b, "the most recently freed block of the size comes back first");
  dc::BlockPoolStats s = pool.stats();
  CHECK(s.hits == 1 && s.misses == 2, "hits %lld misses %lld", static_cast<long long>(s.hits),
        static_cast<long long>(s.misses));
  CHECK(s.held_bytes == 10 * kPage && s.held_blocks == 1 && s.in_use_bytes == 10 * kPage, "held %lld in use %lld",
        static_cast<long long>(s.held_bytes), static_cast<long long>(s.in_use_bytes));
  pool.release(c, c_bytes);
}

void slack_is_bounded() {
  BlockPool pool(2048 * kPage);
  int64_t bytes = 0, got = 0;
  void* big = pool.allocate(160 * kPage, &bytes);
  pool.release(big, bytes);
  // 150 pages may take a 160-page block (1/16 slack: down to 150), 149 may not.
  void* p = pool.allocate(150 * kPage, &got);
  CHECK(p == big && got == 160 * kPage, "a request within the slack takes the larger block");
  pool.release(p, got);
  void* q = pool.allocate(149 * kPage, &got);
  CHECK(q != big && got == 149 * kPage, "a request past the slack maps a block of its own");
  pool.release(q, got);
  // The smallest block that fits wins.
  void* exact = pool.allocate(160 * kPage, &got);
  CHECK(got == 160 * kPage, "an exact fit is taken");
  pool.release(exact, got);
}

void cap_is_honoured() {
  BlockPool pool(100 * kPage);
  std::vector<std::pair<void*, int64_t>> blocks(10);
  for (auto& b : blocks) b.first = pool.allocate(12 * kPage, &b.second);
  for (auto& b : blocks) pool.release(b.first, b.second);
  dc::BlockPoolStats s = pool.stats();
  CHECK(s.held_bytes == 96 * kPage && s.held_blocks == 8, "at most the cap is held: %lld pages",
        static_cast<long long>(s.held_bytes / kPage));
  CHECK(s.released_blocks == 2, "the blocks past the cap went back to the OS: %lld",
        static_cast<long long>(s.released_blocks));
  pool.empty();
  int64_t got = 0;
  void* big = pool.allocate(13 * kPage, &got);
  pool.release(big, got);
  s = pool.stats();
  CHECK(s.held_bytes == 0, "a block of more than an eighth of the cap is not held");
  void* fits = pool.allocate(12 * kPage, &got);
  pool.release(fits, got);
  CHECK(pool.stats().held_blocks == 1, "a block of an eighth of the cap is held");
  pool.set_cap_bytes(0);
  CHECK(pool.stats().held_bytes == 0, "a cap of zero holds nothing");
}

void miss_keeps_the_mapped_memory_bounded() {
  BlockPool pool(1024 * kPage);
  int64_t got = 0;
  std::vector<std::pair<void*, int64_t>> small(8);
  for (auto& b : small) b.first = pool.allocate(8 * kPage, &b.second);
  for (auto& b : small) pool.release(b.first, b.second);
  dc::BlockPoolStats s = pool.stats();
  CHECK(s.in_use_peak_bytes == 64 * kPage && s.peak_bytes == 64 * kPage, "peak %lld",
        static_cast<long long>(s.peak_bytes));
  // A new size: 40 pages in use + 64 kept would pass 1.5x the in-use peak (96 pages), so the
  // oldest kept block goes back to the OS first.
  void* p = pool.allocate(40 * kPage, &got);
  s = pool.stats();
  CHECK(s.peak_bytes == 96 * kPage, "a miss mapped past 1.5x the in-use peak: %lld pages",
        static_cast<long long>(s.peak_bytes / kPage));
  CHECK(s.held_blocks == 7 && s.released_blocks == 1, "held %lld blocks, released %lld",
        static_cast<long long>(s.held_blocks), static_cast<long long>(s.released_blocks));
  void* again = pool.allocate(8 * kPage, &got);
  CHECK(again == small[7].first, "the most recently freed block stayed, and comes back first");
  pool.release(again, got);
  pool.release(p, 40 * kPage);
  pool.empty();
  s = pool.stats();
  CHECK(s.held_bytes == 0 && s.held_blocks == 0, "empty() holds nothing");
}

void threads_share_the_pool() {
  // Without the pool's lock this crashed or corrupted the pool in most runs.
  constexpr int kThreads = 8, kCalls = 20000;
  BlockPool pool(4096 * kPage);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  // Each thread frees what another made, as autograd's threads do.
  std::vector<std::vector<std::pair<void*, int64_t>>> made(kThreads);
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        int64_t got = 0;
        const int64_t pages = 1 + (i * 7 + t) % 13;
        auto* p = static_cast<unsigned char*>(pool.allocate(pages * kPage, &got));
        std::memset(p, t + 1, static_cast<size_t>(got));
        for (int64_t j = 0; j < got; j += kPage)
          if (p[j] != t + 1) ++bad;
        if (i % 2) made[t].push_back({p, got});
        else pool.release(p, got);
      }
    });
  for (auto& th : threads) th.join();
  threads.clear();
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (auto& b : made[(t + 1) % kThreads]) pool.release(b.first, b.second);
    });
  for (auto& th : threads) th.join();
  const dc::BlockPoolStats s = pool.stats();
  CHECK(bad == 0, "a block was handed out twice at once");
  CHECK(s.in_use_bytes == 0 && s.hits + s.misses == kThreads * kCalls, "in use %lld, requests %lld",
        static_cast<long long>(s.in_use_bytes), static_cast<long long>(s.hits + s.misses));
  CHECK(s.hits > 0, "nothing was reused");
}

}  // namespace

int main() {
  reuse_by_size_lifo();
  slack_is_bounded();
  cap_is_honoured();
  miss_keeps_the_mapped_memory_bounded();
  threads_share_the_pool();
  TEST_MAIN_END("test_block_pool");
}
