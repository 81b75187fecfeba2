// A generated kernel: Xbyak code that is writable while emitted, then read+execute (W^X).
#pragma once

#include <xbyak/xbyak.h>

#include <string>

namespace dc {

class JitKernel : public Xbyak::CodeGenerator {
 public:
  JitKernel(std::string name, size_t max_code_bytes)
      : Xbyak::CodeGenerator(max_code_bytes, Xbyak::DontSetProtectRWE), name_(std::move(name)) {}
  ~JitKernel() override = default;

  const std::string& name() const { return name_; }
  size_t code_bytes() const { return getSize(); }
  template <typename Fn>
  Fn entry() const {
    return reinterpret_cast<Fn>(const_cast<uint8_t*>(getCode()));
  }
  // Emits the code, then flips the pages from read+write to read+execute.
  void build() {
    generate();
    setProtectModeRE();
  }

 protected:
  virtual void generate() = 0;

 private:
  std::string name_;
};

}  // namespace dc
