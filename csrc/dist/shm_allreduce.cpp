#include "dist/shm_allreduce.h"

#include <fcntl.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace dc {

namespace {

constexpr uint64_t kMagic = 0x6463'7368'6d61'7231ULL;  // "dcshmar1"
constexpr size_t kPage = 4096;
constexpr int64_t kAlign = 16;  // slice bounds, in floats (one cache line)

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

std::runtime_error sys_error(const std::string& what, const std::string& name) {
  return std::runtime_error("torch_directconv shm all-reduce: " + what + " '" + name + "': " + std::strerror(errno));
}

// A process that has exited (a zombie until its parent reaps it counts as exited).
bool process_alive(int pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return true;  // no /proc: only kill's answer
  char buf[512];
  size_t got = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[got] = 0;
  const char* end = std::strrchr(buf, ')');  // the state follows the command's closing paren
  return !(end && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X'));
}

// Shared (not process-private) futexes: the flags live in a segment mapped by several processes.
void futex_wait(std::atomic<uint32_t>* word, uint32_t seen, const timespec* timeout) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, timeout, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Whether a count of barriers has reached `step` (counts wrap around).
bool reached(uint32_t count, uint32_t step) { return static_cast<int32_t>(count - step) >= 0; }

// Slice k of a chunk of m floats: [bound(k), bound(k + 1)).
int64_t bound(int64_t m, int k, int world) {
  if (k >= world) return m;
  return std::min(m, m * k / world / kAlign * kAlign);
}

// fn(lo, hi) over [lo0, hi0) in `threads` shares of `run`.
template <typename Fn>
void in_shares(const RunShares& run, int threads, int64_t lo0, int64_t hi0, const Fn& fn) {
  const int64_t n = hi0 - lo0;
  if (n <= 0) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 4096)));
  if (nt == 1) return fn(lo0, hi0);
  run(nt, [&](int tid, int t) {
    int64_t lo = lo0 + n * tid / t / kAlign * kAlign, hi = tid + 1 == t ? hi0 : lo0 + n * (tid + 1) / t / kAlign * kAlign;
    if (hi > lo) fn(lo, hi);
  });
}

}  // namespace

// The first page: the geometry, then a cache line per rank (its flag and pid).
struct ShmAllReduce::Header {
  std::atomic<uint64_t> magic;
  int64_t world, chunk;
  struct alignas(64) Rank {
    std::atomic<uint32_t> steps;     // barriers passed (a futex word)
    std::atomic<uint32_t> sleepers;  // ranks asleep on `steps`
    std::atomic<int32_t> pid;
  };
  Rank ranks[1];  // world of them: the header's size is the segment layout's business
};

ShmAllReduce::ShmAllReduce(const std::string& name, int rank, int world, int64_t chunk_elems, double timeout_s)
    : name_(name), rank_(rank), world_(world), chunk_(chunk_elems), timeout_s_(timeout_s) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("torch_directconv shm all-reduce: rank " + std::to_string(rank) +
                                " is not in [0, world = " + std::to_string(world) + ")");
  if (chunk_elems < kAlign * world || chunk_elems % kAlign)
    throw std::invalid_argument("torch_directconv shm all-reduce: chunk_elems must be a multiple of 16 and at least " +
                                std::to_string(kAlign * world) + ", got " + std::to_string(chunk_elems));
  const size_t header = round_up(offsetof(Header, ranks) + sizeof(Header::Rank) * world, kPage);
  const size_t buf = round_up(static_cast<size_t>(chunk_elems) * sizeof(float), kPage);
  bytes_ = header + buf * 2 * world;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);

  int fd;
  if (rank == 0) {
    fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) throw sys_error("cannot create the segment", name);
    if (ftruncate(fd, static_cast<off_t>(bytes_)) != 0) {
      close(fd);
      shm_unlink(name.c_str());
      throw sys_error("cannot size the segment", name);
    }
  } else {
    for (;;) {  // rank 0 may not have made it yet
      fd = shm_open(name.c_str(), O_RDWR, 0600);
      struct stat st {};
      if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= bytes_) break;
      if (fd >= 0) close(fd);
      if (fd < 0 && errno != ENOENT) throw sys_error("cannot open the segment", name);
      if (std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error("torch_directconv shm all-reduce: the segment '" + name +
                                 "' of rank 0 did not appear within the timeout");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    if (rank == 0) shm_unlink(name.c_str());
    throw sys_error("cannot map the segment", name);
  }
  header_ = static_cast<Header*>(base_);
  if (rank == 0) {
    header_->world = world;
    header_->chunk = chunk_elems;
    header_->magic.store(kMagic, std::memory_order_release);
  } else {
    while (header_->magic.load(std::memory_order_acquire) != kMagic) {
      if (std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error("torch_directconv shm all-reduce: the segment '" + name + "' was never initialised");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (header_->world != world || header_->chunk != chunk_elems)
      throw std::runtime_error("torch_directconv shm all-reduce: the segment '" + name + "' is for " +
                               std::to_string(header_->world) + " ranks of chunks of " +
                               std::to_string(header_->chunk) + ", not " + std::to_string(world) + " of " +
                               std::to_string(chunk_elems));
  }
  header_->ranks[rank].pid.store(static_cast<int32_t>(getpid()), std::memory_order_release);
}

ShmAllReduce::~ShmAllReduce() {
  if (base_) munmap(base_, bytes_);
}

void ShmAllReduce::unlink() {
  if (rank_ == 0) shm_unlink(name_.c_str());
}

float* ShmAllReduce::buffer(int rank, int which) const {
  const size_t header = round_up(offsetof(Header, ranks) + sizeof(Header::Rank) * world_, kPage);
  const size_t buf = round_up(static_cast<size_t>(chunk_) * sizeof(float), kPage);
  return reinterpret_cast<float*>(static_cast<char*>(base_) + header + buf * (2 * rank + which));
}

void ShmAllReduce::arrive_and_wait(uint64_t step64) {
  const auto step = static_cast<uint32_t>(step64);
  auto& me = header_->ranks[rank_];
  // seq_cst store then load, against the sleeper's increment then load: either it sees the
  // step, or this sees it and wakes it.
  me.steps.store(step);
  if (me.sleepers.load() > 0) futex_wake_all(&me.steps);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int k = 0; k < world_; ++k) {
    if (k == rank_) continue;
    auto& peer = header_->ranks[k];
    // A short spin: in a step's sums the ranks arrive within microseconds of each other.
    for (int spins = 0; spins < 2000 && !reached(peer.steps.load(std::memory_order_acquire), step); ++spins)
      _mm_pause();
    while (true) {
      uint32_t seen = peer.steps.load(std::memory_order_acquire);
      if (reached(seen, step)) break;
      // Asleep on the peer's flag, waking every 100 ms to see whether it is alive.
      peer.sleepers.fetch_add(1);
      seen = peer.steps.load();
      if (!reached(seen, step)) {
        const timespec tenth{0, 100'000'000};
        futex_wait(&peer.steps, seen, &tenth);
      }
      peer.sleepers.fetch_sub(1);
      if (reached(peer.steps.load(std::memory_order_acquire), step)) break;
      const int pid = peer.pid.load(std::memory_order_acquire);
      if (pid > 0 && !process_alive(pid))
        throw std::runtime_error("torch_directconv shm all-reduce: rank " + std::to_string(k) + " (pid " +
                                 std::to_string(pid) + ") has exited");
      if (std::chrono::duration<double>(clock::now() - start).count() > timeout_s_)
        throw std::runtime_error("torch_directconv shm all-reduce: rank " + std::to_string(k) +
                                 " did not arrive within the timeout (" + std::to_string(timeout_s_) + " s)");
    }
  }
}

void ShmAllReduce::allreduce_mean(float* data, int64_t n, float divisor, int threads, const RunShares& run) {
  const int r = rank_, w = world_;
  for (int64_t o = 0; o < n; o += chunk_) {
    const int64_t m = std::min(chunk_, n - o);
    const int which = static_cast<int>((steps_ / 2) % 2);
    float* x = data + o;
    float* mine = buffer(r, which);
    // 1. my values of the others' slices, for them to sum
    in_shares(run, threads, 0, bound(m, r, w), [&](int64_t lo, int64_t hi) {
      std::memcpy(mine + lo, x + lo, (hi - lo) * sizeof(float));
    });
    in_shares(run, threads, bound(m, r + 1, w), m, [&](int64_t lo, int64_t hi) {
      std::memcpy(mine + lo, x + lo, (hi - lo) * sizeof(float));
    });
    arrive_and_wait(++steps_);
    // 3. my slice's sum, in rank order
    in_shares(run, threads, bound(m, r, w), bound(m, r + 1, w), [&](int64_t lo, int64_t hi) {
      constexpr int64_t kBlock = 256;
      alignas(64) float acc[kBlock];
      for (int64_t b = lo; b < hi; b += kBlock) {
        const int64_t len = std::min(kBlock, hi - b);
        const float* first = r == 0 ? x + b : buffer(0, which) + b;
        for (int64_t i = 0; i < len; ++i) acc[i] = first[i];
        for (int k = 1; k < w; ++k) {
          const float* v = k == r ? x + b : buffer(k, which) + b;
          for (int64_t i = 0; i < len; ++i) acc[i] += v[i];
        }
        for (int64_t i = 0; i < len; ++i) {
          const float s = acc[i] / divisor;
          x[b + i] = s;
          mine[b + i] = s;
        }
      }
    });
    arrive_and_wait(++steps_);
    // 5. the others' slices' results
    for (int k = 0; k < w; ++k) {
      if (k == r) continue;
      const float* theirs = buffer(k, which);
      in_shares(run, threads, bound(m, k, w), bound(m, k + 1, w), [&](int64_t lo, int64_t hi) {
        std::memcpy(x + lo, theirs + lo, (hi - lo) * sizeof(float));
      });
    }
  }
}

}  // namespace dc
