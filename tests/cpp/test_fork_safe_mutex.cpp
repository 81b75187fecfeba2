// A fork() while another thread holds a ForkSafeMutex waits for it to let go, so the child
// can take the mutex; the child's hook runs in the child only.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "check.h"
#include "jit/fork_safe_mutex.h"

using dc::ForkSafeMutex;

int main() {
  int in_child_calls = 0;
  ForkSafeMutex mu([&] { ++in_child_calls; });
  std::atomic<bool> held{false};
  std::thread holder([&] {
    std::lock_guard<ForkSafeMutex> lock(mu);
    held = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  });
  while (!held) std::this_thread::yield();
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(5);  // a mutex copied held would block this child for good
    std::lock_guard<ForkSafeMutex> lock(mu);
    _exit(in_child_calls == 1 ? 0 : 2);
  }
  holder.join();
  CHECK(pid > 0, "fork failed");
  CHECK(in_child_calls == 0, "the child's hook ran in the parent");
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child ended with wait status %d", status);
  TEST_MAIN_END("test_fork_safe_mutex");
}
