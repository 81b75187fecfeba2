// The gradient all-reduce of processes on one host, through a shared-memory segment.
//
// gloo all-reduces over TCP, even between two processes of one machine: every byte crosses the
// loopback socket twice per direction, and gloo's threads take the cores that the backward
// needs. Here the processes of a host map one segment, and a sum costs a few passes over memory.
//
// The segment holds, per rank, a flag and two buffers of `chunk` floats. A tensor is summed
// chunk by chunk, and each chunk's elements are split into one slice per rank:
//   1. every rank copies its values of the other ranks' slices into its buffer;
//   2. (all arrive)
//   3. rank r sums its slice over the ranks, in rank order (its own values from its tensor, the
//      others' from their buffers), scales the sum, and writes it to its tensor and its buffer;
//   4. (all arrive)
//   5. every rank copies the other slices' results from their owners' buffers.
// A slice's result is computed once, by its owner, so every rank ends with the same bits.
// Chunks alternate between the two buffers: a rank writes a buffer again only two chunks
// later, when every rank has passed step 4 of the chunk between, so no one still reads it.
//
// Arriving is a store of the rank's flag (a count of the barriers it has passed); waiting spins
// briefly on the others' flags, then sleeps on them (a futex, shared between the processes), so
// that a rank that waits leaves the core to others: with more processes than cores a spinning
// rank would take the time of the very peer it waits for. A rank that does not arrive within the timeout, or
// whose process has exited, makes the wait throw std::runtime_error naming it, so the others
// never hang on a dead peer.
#pragma once

#include <cstdint>
#include <string>

#include "conv/parallel.h"

namespace dc {

class ShmAllReduce {
 public:
  // Rank 0 creates the segment `name` (shm_open: "/..."), the others open it once it exists
  // (they wait for it up to timeout_s). Throws std::runtime_error, with errno's text, when
  // the segment cannot be made or mapped, or when its geometry differs from the arguments.
  ShmAllReduce(const std::string& name, int rank, int world, int64_t chunk_elems, double timeout_s);
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  // Removes the name (the mapping stays): call once every rank has opened the segment, so that
  // nothing is left behind in /dev/shm however the processes end.
  void unlink();

  // data[0, n) <- (sum over the ranks of their data[0, n)) / divisor, on every rank, each
  // rank's copies and sums shared among `threads` shares of `run`. Every rank must call it
  // with the same n and divisor, in the same order as the others' calls.
  void allreduce_mean(float* data, int64_t n, float divisor, int threads, const RunShares& run);

  int rank() const { return rank_; }
  int world() const { return world_; }
  int64_t chunk_elems() const { return chunk_; }

 private:
  struct Header;
  float* buffer(int rank, int which) const;
  void arrive_and_wait(uint64_t step);

  std::string name_;
  int rank_, world_;
  int64_t chunk_;
  double timeout_s_;
  size_t bytes_ = 0;
  void* base_ = nullptr;
  Header* header_ = nullptr;
  uint64_t steps_ = 0;  // barriers passed: 2 per chunk
};

}  // namespace dc
