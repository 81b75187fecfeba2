// A 16 x 16 transpose of 32-bit elements in AVX-512 registers, for the copies that reorder
// bf16 data (conv/bf16_pack.cpp, conv/bf16_upd.cpp). Callers compile it where the CPU has
// AVX-512 (the functions carry their target).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dc {

// Four rounds of swapping the off-diagonal blocks of s x s elements, s = 8, 4, 2, 1. Round
// i's two-source permutes: row i (bit s clear) keeps its columns without bit s and takes row
// i + s's columns without it; row i + s the rest.
struct TransposeIndices {
  alignas(64) int32_t lo[4][16], hi[4][16];
  constexpr TransposeIndices() : lo(), hi() {
    for (int round = 0; round < 4; ++round) {
      const int s = 8 >> round;
      for (int col = 0; col < 16; ++col) {
        lo[round][col] = (col & s) ? 16 + col - s : col;
        hi[round][col] = (col & s) ? 16 + col : col + s;
      }
    }
  }
};
inline constexpr TransposeIndices kTransposeIndices;

__attribute__((target("avx512f"))) inline void transpose16_epi32(__m512i r[16]) {
  for (int round = 0; round < 4; ++round) {
    const int s = 8 >> round;
    const __m512i lo = _mm512_load_si512(kTransposeIndices.lo[round]);
    const __m512i hi = _mm512_load_si512(kTransposeIndices.hi[round]);
    for (int i = 0; i < 16; ++i) {
      if (i & s) continue;
      const __m512i ri = r[i], rj = r[i + s];
      r[i] = _mm512_permutex2var_epi32(ri, lo, rj);
      r[i + s] = _mm512_permutex2var_epi32(ri, hi, rj);
    }
  }
}

}  // namespace dc
