// Host stand-in for <cuda_bf16.h>; the emulation instantiates the kernels for float only.
#pragma once
#include <cstdint>
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16) { return 0.f; }
inline __nv_bfloat16 __float2bfloat16_rn(float) { return __nv_bfloat16{0}; }
