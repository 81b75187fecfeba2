// A generated kernel and the generator that emits it.
//
// The generator (an Xbyak::CodeGenerator) reserves a buffer for its largest possible code
// and keeps label and allocation bookkeeping on the heap. None of that is needed to run
// the code, so build() copies the finished code into a mapping of its own, exactly
// page-rounded, and the generator can go: a cached kernel costs its pages and its name.
#pragma once

#include <xbyak/xbyak.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dc {

// Finished code in its own read+execute mapping; it is never writable while executable (W^X).
class JitKernel {
 public:
  // Copies `bytes` of position-independent code into a new mapping.
  JitKernel(std::string name, const uint8_t* code, size_t bytes);
  ~JitKernel();
  JitKernel(const JitKernel&) = delete;
  JitKernel& operator=(const JitKernel&) = delete;

  const std::string& name() const { return name_; }
  const uint8_t* code() const { return code_; }
  size_t code_bytes() const { return code_bytes_; }
  // What the mapping takes: code_bytes() rounded up to whole pages.
  size_t reserved_bytes() const { return reserved_bytes_; }
  template <typename Fn>
  Fn entry() const {
    return reinterpret_cast<Fn>(const_cast<uint8_t*>(code_));
  }

 private:
  std::string name_;
  uint8_t* code_ = nullptr;
  size_t code_bytes_ = 0;
  size_t reserved_bytes_ = 0;
};

// Emits one kernel. Generators use labels and relative jumps only, with no absolute address
// and no call out of the code, so the code runs wherever build() copies it.
class JitGenerator : public Xbyak::CodeGenerator {
 public:
  // The buffer stays read+write: code is only ever executed from the copy.
  JitGenerator(std::string name, size_t max_code_bytes)
      : Xbyak::CodeGenerator(max_code_bytes, Xbyak::DontSetProtectRWE), name_(std::move(name)) {}
  ~JitGenerator() override = default;

  const std::string& name() const { return name_; }
  // Emits the code (once per generator) and returns its copy.
  std::unique_ptr<JitKernel> build();

 protected:
  virtual void generate() = 0;

 private:
  std::string name_;
};

}  // namespace dc
