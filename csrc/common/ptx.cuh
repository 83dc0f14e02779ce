// Typed one-instruction PTX helpers shared by the sm80-family kernels (forward and backward).
//
// One helper per instruction (and per operand shape), each a few lines of inline asm with the
// operand roles in its signature. Kernel bodies call these and never write asm themselves.
// Everything here is available from sm_80 on (mma.sync m16n8k16 bf16/f16, ldmatrix, cp.async),
// so the same code serves the sm_80 and sm_90 SASS and the compute_80 PTX image.
//
// Conventions
// - Shared-memory operands are 32-bit shared-window addresses (`smem_u32addr`), which is what
//   ldmatrix / cp.async / ld.shared take and saves a 64-bit register per pointer.
// - Fragments are arrays of 32-bit registers holding two 16-bit elements each, lower column in the
//   low half (the mma.sync convention).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/common/ptx.cuh needs sm_80 or newer (mma.sync m16n8k16 bf16, ldmatrix, cp.async)"
#endif

namespace fa {
namespace ptx {

// The 16-bit element types the mma helpers accept.
template <class T>
inline constexpr bool kIsMmaElem = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// ---- addresses ---------------------------------------------------------------------------------

// Generic pointer into shared memory -> 32-bit shared-window address.
__device__ __forceinline__ uint32_t smem_u32addr(const void* smem_ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
}

// ---- register-pressure control ------------------------------------------------------------------
// In a kernel whose accumulators fill most of the 255 registers, every loop-invariant value the
// compiler hoists out of the hot loop costs a register for the loop's whole length (ptxas
// spills such values rather than recomputing them). These helpers return values through
// volatile asm, so the compiler sees a new value at each call and recomputes what derives from
// it: an S2R or IMAD per step instead of a held register.

// x, opaque to the compiler (e.g. a row stride whose per-chunk multiples would be hoisted).
__device__ __forceinline__ int64_t opaque_i64(int64_t x) {
    int64_t y;
    asm volatile("mov.b64 %0, %1;\n" : "=l"(y) : "l"(x));
    return y;
}

// threadIdx.x / blockIdx.{x,y,z}, re-read from the special registers at each call.
__device__ __forceinline__ int thread_idx_x() {
    uint32_t v;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(v));
    __builtin_assume(v < 1024);  // blocks have <= 1024 threads: lets tid / 32 etc. be shifts
    return static_cast<int>(v);
}
__device__ __forceinline__ int block_idx_x() {
    uint32_t v;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(v));
    return static_cast<int>(v);
}
__device__ __forceinline__ int block_idx_y() {
    uint32_t v;
    asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(v));
    return static_cast<int>(v);
}
__device__ __forceinline__ int block_idx_z() {
    uint32_t v;
    asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(v));
    return static_cast<int>(v);
}

// ---- ldmatrix: four / two 8x8 b16 matrices from shared memory ------------------------------------
// Lane i supplies the address of row (i % 8) of matrix (i / 8). Result register m holds matrix m:
// lane l gets row l / 4, elements 2 * (l % 4) and 2 * (l % 4) + 1. The .trans forms deliver the
// transpose: lane l gets column l / 4, rows 2 * (l % 4) and 2 * (l % 4) + 1.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

// Lanes 0-15 supply the addresses (rows of matrix 0 then matrix 1); the others are ignored.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr));
}

// ---- mma.sync m16n8k16, 16-bit inputs, fp32 accumulate (in place) --------------------------------
// A (16x16, row): a[0] = (row g, k 2t..2t+1), a[1] = (row g+8, k 2t..), a[2] = (row g, k 2t+8..),
//                 a[3] = (row g+8, k 2t+8..)                           with g = lane / 4, t = lane % 4
// B (16x8, col):  b[0] = (k 2t..2t+1, col g), b[1] = (k 2t+8.., col g)
// C/D (16x8 f32): c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g+8, cols 2t, 2t+1)
// A pure function of its register operands (no memory), so it is not volatile: the compiler may
// schedule it freely.
template <class T>
__device__ __forceinline__ void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
    static_assert(kIsMmaElem<T>, "mma_m16n8k16_f32 takes __half or __nv_bfloat16 inputs");
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// ---- cp.async (global -> shared, bypassing registers) ---------------------------------------------

// 16 bytes, cached in L2 only (.cg). When `valid` is false the source size is 0: nothing is read
// and the 16 destination bytes are zero-filled (ragged rows); `gmem_src` is then not accessed
// and may point past the allocation (the sm80 backward's Q / dO / statistics tails rely on it;
// nvFuser's predicated cp.async does the same).
__device__ __forceinline__ void cp_async_cg_16(uint32_t smem_dst, const void* gmem_src, bool valid) {
    const uint32_t src_bytes = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
                 "r"(src_bytes)
                 : "memory");
}

// Closes the group of cp.async issued by this thread since the last commit (an empty group is legal).
__device__ __forceinline__ void cp_async_commit_group() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `kPending` of this thread's committed groups are still in flight. Other
// threads' copies become visible only after a barrier that follows this wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
    static_assert(kPending >= 0, "cp.async.wait_group takes a non-negative group count");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// ---- shared / global vector access ---------------------------------------------------------------

__device__ __forceinline__ void st_shared_b32(uint32_t smem_addr, uint32_t value) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(smem_addr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_shared_v4_b32(uint32_t smem_addr, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4_b32(uint32_t smem_addr) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(smem_addr)
                 : "memory");
    return v;
}

__device__ __forceinline__ void st_global_v4_b32(void* gmem_dst, uint4 v) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(gmem_dst), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}

// ---- conversions -----------------------------------------------------------------------------------

// Two fp32 -> one register of two 16-bit T (round to nearest even); `lo` lands in the low half.
template <class T>
__device__ __forceinline__ uint32_t pack_f32x2(float lo, float hi) {
    static_assert(kIsMmaElem<T>, "pack_f32x2 produces __half2 or __nv_bfloat162 bits");
    uint32_t r;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// ---- special functions (MUFU) --------------------------------------------------------------------

// 2^x; ex2.approx(-inf) = +0, relative error 2^-22 (ftz: denormal results flush to 0).
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// log2(x); lg2.approx(0) = -inf.
__device__ __forceinline__ float lg2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 1/x, approximate (max 1 ulp); rcp.approx(inf) = 0.
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---- global reductions and flags (the backward's dQ accumulation) --------------------------------

// *addr += v in fp32, relaxed, no return value (RED: the L2 performs the add).
__device__ __forceinline__ void red_add_f32(float* gmem_addr, float v) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(gmem_addr), "f"(v) : "memory");
}

// addr[0] += a, addr[1] += b (8-byte aligned): one vector RED on sm_90, two scalar ones before it.
__device__ __forceinline__ void red_add_f32x2(float* gmem_addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(gmem_addr), "f"(a), "f"(b) : "memory");
#else
    red_add_f32(gmem_addr, a);
    red_add_f32(gmem_addr + 1, b);
#endif
}

// addr[0..3] += v.x..v.w (16-byte aligned): one vector RED on sm_90, four scalar ones before it.
__device__ __forceinline__ void red_add_f32x4(float* gmem_addr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(gmem_addr), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
#else
    red_add_f32(gmem_addr, a);
    red_add_f32(gmem_addr + 1, b);
    red_add_f32(gmem_addr + 2, c);
    red_add_f32(gmem_addr + 3, d);
#endif
}

// A 32-bit flag read with acquire semantics at GPU scope (pairs with red_release_add_s32).
__device__ __forceinline__ int ld_acquire_s32(const int* gmem_addr) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(gmem_addr) : "memory");
    return v;
}

// *addr += v with release semantics at GPU scope: the caller's earlier writes (and, through a
// preceding barrier, its block's) are visible to whoever acquires the new value.
__device__ __forceinline__ void red_release_add_s32(int* gmem_addr, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(gmem_addr), "r"(v) : "memory");
}

// Orders this thread's earlier global writes and reductions before its later ones, GPU-wide.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

}  // namespace ptx
}  // namespace fa
