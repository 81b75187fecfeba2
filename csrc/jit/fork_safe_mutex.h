// A mutex that fork() never copies while another thread holds it.
//
// fork() copies a process with only the thread that called it. A mutex that another thread
// held at that moment would stay locked in the child for good, and what it guards could be
// half changed. So before every fork() the forking thread takes every ForkSafeMutex, in the
// order they were made, and releases them after it, in the parent and in the child. No code
// path holds two of them at once, so no order can deadlock. In the child `in_child` runs
// first, with the mutex held: it drops what only the parent's other threads would finish.
//
// A ForkSafeMutex made while other threads run could still be caught half made by a fork,
// so the long-lived ones are made at load (see the caches).
#pragma once

#include <functional>
#include <mutex>

namespace dc {

class ForkSafeMutex {
 public:
  explicit ForkSafeMutex(std::function<void()> in_child = nullptr);
  ~ForkSafeMutex();
  ForkSafeMutex(const ForkSafeMutex&) = delete;
  ForkSafeMutex& operator=(const ForkSafeMutex&) = delete;

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  struct Registry;
  static Registry& registry();
  static void before_fork();
  static void after_fork(bool in_child);

  std::mutex mu_;
  std::function<void()> in_child_;
};

}  // namespace dc
