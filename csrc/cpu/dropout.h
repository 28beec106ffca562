// Dropout on the CPU: a counter-based mask (a hash of one seed and the entry's index), so that the
// mask does not depend on the thread count or the chunking, and every thread draws its entries at
// once (torch's own CPU bernoulli_ draws them one after another from one mt19937 stream, which was
// the largest single cost of a training step of a recommendation tower).
#pragma once

#include <cstdint>

namespace fastmtl::cpu {

// splitmix64's finaliser of seed + (index + 1) * golden ratio: a statistically good 64-bit hash;
// its upper 32 bits are the entry's uniform draw.
inline uint32_t dropout_draw(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

// One 64-bit seed from torch's default CPU generator (torch.manual_seed reproduces the masks).
uint64_t dropout_seed();

// out[i] = keep[i] ? in[i] * scale : 0 with keep[i] = draw >= p * 2^32 (probability 1 - p).
template <typename T>
void dropout_forward(double p, uint64_t seed, int64_t n, const T* in, bool* keep, T* out);

// out[i] = keep[i] ? in[i] * scale : 0.
template <typename T>
void dropout_apply(double p, int64_t n, const bool* keep, const T* in, T* out);

}  // namespace fastmtl::cpu
