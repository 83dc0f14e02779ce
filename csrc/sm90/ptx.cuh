// PTX helpers of the sm90 family: one small typed function per instruction.
//
// Kernel bodies (csrc/sm90/*.cuh above this file) contain no inline asm; everything that touches
// an sm_90a-only instruction goes through a helper here or in wgmma.cuh. Shared-memory operands
// are 32-bit shared-window addresses (`smem_addr`), global tensors are reached only through TMA
// descriptors (`CUtensorMap`, passed to the kernel as `__grid_constant__` parameters).
#pragma once

#include <cuda.h>  // CUtensorMap (a 64-byte aligned, 128-byte opaque struct)
#include <stdint.h>

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "csrc/sm90 uses wgmma and setmaxnreg: compile it with -gencode arch=compute_90a,code=sm_90a"
#endif

// Debug switch: compile with -DFA_DEBUG_HANG to make every mbarrier wait trap (after printing the
// barrier, parity, block and thread) when it has not completed after FA_DEBUG_HANG_CYCLES clock
// cycles, instead of hanging the GPU. Every mbarrier wait in this kernel is bounded by a few
// main-loop steps (about 10^4 cycles), so 2^20 cycles (~0.5 ms) only trips on a real deadlock.
#ifndef FA_DEBUG_HANG_CYCLES
#define FA_DEBUG_HANG_CYCLES (1ll << 20)
#endif
#ifdef FA_DEBUG_HANG
#include <stdio.h>
#endif

namespace fa::sm90 {

// ---- addresses ---------------------------------------------------------------------------------

// Shared-window address of a pointer into shared memory (what every PTX smem operand takes).
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---- mbarrier (shared::cta, 64-bit) ------------------------------------------------------------

// Initialises a barrier that completes a phase after `arrivals` arrivals (and all expected
// transaction bytes). One thread, before any other thread touches the barrier.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}

// Makes preceding mbarrier.init visible to the async proxy (TMA complete_tx) and to other
// threads once followed by a CTA barrier.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Plain arrival (release semantics at CTA scope).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Arrival that also announces `bytes` of TMA transactions the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// True once the phase of parity `parity` has completed (acquire semantics at CTA scope).
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

// Blocks until the phase of parity `parity` has completed. With -DFA_DEBUG_HANG it traps instead
// of hanging forever (see FA_DEBUG_HANG_CYCLES).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#ifdef FA_DEBUG_HANG
    long long const start = clock64();
    while (!mbarrier_try_wait(bar, parity)) {
        if (clock64() - start > FA_DEBUG_HANG_CYCLES) {
            printf("fa_sm90 hang: mbarrier smem 0x%x parity %u, block %d thread %d\n", bar, parity,
                   static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));
            __trap();
        }
    }
#else
    while (!mbarrier_try_wait(bar, parity)) {
    }
#endif
}

// ---- shared memory -------------------------------------------------------------------------------

__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t value) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
    uint32_t value;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(value) : "r"(addr) : "memory");
    return value;
}

__device__ __forceinline__ void st_shared_v2_b32(uint32_t addr, uint32_t a, uint32_t b) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};" ::"r"(addr), "r"(a), "r"(b) : "memory");
}

__device__ __forceinline__ void ld_shared_v2_b32(uint32_t addr, uint32_t& a, uint32_t& b) {
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "r"(addr) : "memory");
}

// ---- TMA (cp.async.bulk.tensor) ----------------------------------------------------------------

// Pulls a descriptor into the TMA unit's cache ahead of its first use.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// 5-D tiled load of one box into shared memory at `dst`, completing `bytes` of transactions on
// the mbarrier `bar` (the box size; out-of-range elements are zero-filled and still counted).
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3, int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
        : "memory");
}

// 1-D bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory
// into shared memory at `dst`, completing `bytes` of transactions on the mbarrier `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
                 : "memory");
}

// Orders this thread's generic-proxy shared-memory accesses before later async-proxy accesses
// (wgmma or TMA reading what st.shared wrote).
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- named barriers ------------------------------------------------------------------------------

// Waits until `threads` threads (a multiple of 32, counting this warp) arrived at barrier `id`.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at barrier `id` (expecting `threads` in all) without waiting.
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- register reallocation -----------------------------------------------------------------------

// Raises this warpgroup's per-thread register limit to N (all 128 threads execute it).
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_inc() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}

// Lowers this warpgroup's per-thread register limit to N, returning registers to the pool.
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_dec() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}

// ---- warp ------------------------------------------------------------------------------------------

// True in exactly one active lane of the (converged) warp.
__device__ __forceinline__ bool elect_one() {
    uint32_t pred;
    asm volatile(
        "{\n"
        ".reg .b32 rx;\n"
        ".reg .pred px;\n"
        "elect.sync rx|px, %1;\n"
        "selp.u32 %0, 1, 0, px;\n"
        "}\n"
        : "=r"(pred)
        : "r"(0xffffffffu));
    return pred != 0;
}

// ---- wgmma synchronisation ---------------------------------------------------------------------

// Orders prior register writes (accumulators, A fragments) before the next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

// Closes the current group of wgmma.mma_async of this warpgroup.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// Waits until at most N committed wgmma groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Compiler-only fences on registers that an in-flight wgmma reads or writes: nvcc treats inline
// asm as instantaneous, so without these it may move reads of an accumulator above the
// wgmma.wait_group that makes it valid, or overwrite an A-fragment register before the wgmma
// reading it has completed (undefined behaviour per the PTX ISA).
__device__ __forceinline__ void fence_operand(float& reg) { asm volatile("" : "+f"(reg)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& reg) { asm volatile("" : "+r"(reg)::"memory"); }

// Hides a value's origin from the optimiser, so that what is computed from it is computed here
// and not hoisted out of the enclosing loops (where it would stay live, and spill, across the
// whole main loop).
__device__ __forceinline__ int opaque(int x) {
    asm volatile("" : "+r"(x));
    return x;
}
__device__ __forceinline__ float opaque(float x) {
    asm volatile("" : "+f"(x));
    return x;
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&regs)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) fence_operand(regs[i]);
}

template <int N, int M>
__device__ __forceinline__ void fence_operands(uint32_t (&regs)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int j = 0; j < M; ++j) fence_operand(regs[i][j]);
    }
}

// ---- special functions -------------------------------------------------------------------------

// 2^x on the MUFU (relative error ~2^-22; ex2(-inf) = +0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 1 / x on the MUFU (~1 ulp; 0 -> +inf). Used instead of IEEE division, whose slow path is a
// subroutine call: registers live across a call are saved to the stack (spills).
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) on the MUFU (used once per row for the LSE).
__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace fa::sm90
