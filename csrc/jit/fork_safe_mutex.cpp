#include "jit/fork_safe_mutex.h"

#include <pthread.h>

#include <algorithm>
#include <vector>

namespace dc {

struct ForkSafeMutex::Registry {
  std::mutex mu;  // guards `all`, and is held across fork() like the mutexes it lists
  std::vector<ForkSafeMutex*> all;
};

// One registry and one set of fork handlers for the process, made with the first mutex.
ForkSafeMutex::Registry& ForkSafeMutex::registry() {
  static Registry* r = [] {
    auto* made = new Registry();  // never destroyed: a fork may come during static destruction
    pthread_atfork(&before_fork, [] { after_fork(false); }, [] { after_fork(true); });
    return made;
  }();
  return *r;
}

ForkSafeMutex::ForkSafeMutex(std::function<void()> in_child) : in_child_(std::move(in_child)) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.all.push_back(this);
}

ForkSafeMutex::~ForkSafeMutex() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.all.erase(std::find(r.all.begin(), r.all.end(), this));
}

void ForkSafeMutex::before_fork() {
  Registry& r = registry();
  r.mu.lock();
  for (ForkSafeMutex* m : r.all) m->mu_.lock();
}

void ForkSafeMutex::after_fork(bool in_child) {
  Registry& r = registry();
  for (auto it = r.all.rbegin(); it != r.all.rend(); ++it) {
    if (in_child && (*it)->in_child_) (*it)->in_child_();
    (*it)->mu_.unlock();
  }
  r.mu.unlock();
}

}  // namespace dc
