// Scratch memory of the drivers: blocked copies, packed weights, private weight gradients.
//
// Each thread has a few numbered slots. A slot's buffer stays with its thread between calls,
// so that repeated calls do not fault in fresh pages, but the buffers kept between calls
// add up to at most scratch_cap_bytes() over the whole process (TORCH_DIRECTCONV_SCRATCH_MB,
// default 64). A buffer that does not fit under that cap when its call ends is returned to
// the OS then, as is every buffer of a thread that exits. Buffers are mapped pages of their
// own, so returning them really lowers the resident memory (malloc's arenas would keep it).
#pragma once

#include <cstdint>

namespace dc {

// The scratch slots: a call uses each for one purpose at a time.
enum ScratchSlot { kScratchSrc = 0, kScratchDst = 1, kScratchWei = 2, kScratchUnit = 3, kScratchSlots = 4 };

// Slot `slot` of the calling thread, at least `floats` floats, valid until the outermost
// ScratchScope of this thread ends (or the slot is asked for again with more floats).
// Its contents are undefined.
float* scratch_floats(ScratchSlot slot, int64_t floats);

// Marks a call: when the outermost scope of a thread ends, its buffers that do not fit
// under the process-wide cap are returned to the OS.
class ScratchScope {
 public:
  ScratchScope();
  ~ScratchScope();
  ScratchScope(const ScratchScope&) = delete;
  ScratchScope& operator=(const ScratchScope&) = delete;
};

int64_t scratch_cap_bytes();
void set_scratch_cap_bytes(int64_t cap);
// Bytes of scratch kept between calls now, over all threads.
int64_t scratch_kept_bytes();

}  // namespace dc
