// Torch-free top-k selection under the order "score descending, then id ascending" (the lower id wins
// a tie), shared by the CPU memory-bank kernels. The order is total, so the result of merging
// candidates does not depend on the order they are visited in: every backend agrees exactly.
#pragma once

#include <cstdint>
#include <limits>

#include "mvpp/common.h"

namespace mvpp {

// Empty slots hold (-inf, kNoId) while selecting; they are reported as id -1.
constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();

template <typename acc_t>
MVPP_HOST_DEVICE MVPP_INLINE bool topk_better(acc_t s1, int64_t i1, acc_t s2, int64_t i2) {
  return s1 > s2 || (s1 == s2 && i1 < i2);
}

// s[0..k) / ids[0..k) sorted best first. Inserts (v, id) if it beats the current k-th entry.
template <typename acc_t>
MVPP_HOST_DEVICE MVPP_INLINE void topk_insert(acc_t* s, int64_t* ids, int k, acc_t v, int64_t id) {
  if (!topk_better(v, id, s[k - 1], ids[k - 1])) return;
  int j = k - 1;
  while (j > 0 && topk_better(v, id, s[j - 1], ids[j - 1])) {
    s[j] = s[j - 1];
    ids[j] = ids[j - 1];
    --j;
  }
  s[j] = v;
  ids[j] = id;
}

template <typename acc_t>
MVPP_HOST_DEVICE MVPP_INLINE void topk_init(acc_t* s, int64_t* ids, int k) {
  for (int j = 0; j < k; ++j) {
    s[j] = -std::numeric_limits<acc_t>::infinity();
    ids[j] = kNoId;
  }
}

}  // namespace mvpp
