// Conversions between the fp32 accumulators and the 16-bit element types of the sm90 kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fa::sm90 {

// Packs two floats into one b32 of two 16-bit elements: `lo` in bits 0..15 (the lower column of
// a wgmma A fragment pair or of a memory pair), `hi` in bits 16..31. Round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 const v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
    __half2 const v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace fa::sm90
