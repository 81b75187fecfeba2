#include "jit/jit_kernel.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace dc {

namespace {

size_t page_round(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (std::max<size_t>(bytes, 1) + page - 1) / page * page;
}

[[noreturn]] void fail(const std::string& what, const std::string& name, int err) {
  throw std::runtime_error("jit: cannot " + what + " for kernel " + name + ": " + std::strerror(err));
}

}  // namespace

JitKernel::JitKernel(std::string name, const uint8_t* code, size_t bytes)
    : name_(std::move(name)), code_bytes_(bytes), reserved_bytes_(page_round(bytes)) {
  void* p = mmap(nullptr, reserved_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("map " + std::to_string(reserved_bytes_) + " bytes", name_, errno);
  std::memcpy(p, code, bytes);
  if (mprotect(p, reserved_bytes_, PROT_READ | PROT_EXEC) != 0) {
    const int err = errno;
    munmap(p, reserved_bytes_);
    fail("make the code executable", name_, err);
  }
  code_ = static_cast<uint8_t*>(p);
}

JitKernel::~JitKernel() { munmap(code_, reserved_bytes_); }

std::unique_ptr<JitKernel> JitGenerator::build() {
  generate();
  // A jump to a label never defined is patched nowhere, in the buffer or in the copy.
  if (hasUndefinedLabel()) throw std::logic_error("jit: kernel " + name_ + " jumps to an undefined label");
  return std::make_unique<JitKernel>(name_, getCode(), getSize());
}

}  // namespace dc
