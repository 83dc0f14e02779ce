// wgmma.mma_async wrappers of the sm90 family: one typed function per instruction shape.
//
//   WgmmaSS<T, N>::mma(d, desc_a, desc_b, accumulate)
//       wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T, A and B from shared memory, both K-major
//       (Q·K^T: A = Q [64 x 16], B = K [N x 16]).
//   WgmmaRSTransB<T, N>::mma(d, a, desc_b, accumulate)
//       the same with A from registers (4 x b32 per thread) and B MN-major (imm-trans-b = 1)
//       (P·V: A = P [64 x 16] in registers, B = V [16 x N] stored [key][head dim] in smem).
//   WgmmaSSTransB<T, N>::mma(d, desc_a, desc_b, accumulate)
//       A from shared memory K-major, B MN-major (imm-trans-b = 1)
//       (the wide backward's dV += P^T dO: A = P^T [64 x 16] stored [key][query], B = dO
//       [16 x N] stored [query][head dim]).
//   WgmmaSSTransAB<T, N>::mma(d, desc_a, desc_b, accumulate)
//       A and B from shared memory, both MN-major (imm-trans-a = imm-trans-b = 1)
//       (the backward's dQ = dS K: A = dS [64 x 16] stored [key][query], B = K [16 x N] stored
//       [key][head dim]).
//
// d is the warpgroup's fp32 accumulator fragment: float[N / 2] per thread. `accumulate` = 0
// overwrites d (D = A·B), 1 accumulates (D += A·B). WgmmaSS and WgmmaRSTransB exist for
// N = 16, 32, ..., 256, the backward's two for the N its kernels use (listed below); an
// unsupported (T, N) fails to compile (the primary templates are declared, not defined).
//
// The asm operand lists are long (N / 2 accumulators), so they are spelled by the
// FA_WGMMA_ACC_{STR,OPS}_k macros below (k = N / 16 groups of 8 registers), written out once;
// the operands after the accumulators are numbered explicitly in each FA_WGMMA_*_DEFINE line
// (N / 2, N / 2 + 1, ...).
//
// Completion: these only issue. Callers bracket a batch with wgmma_fence() / wgmma_commit() and
// wait with wgmma_wait<k>() (ptx.cuh), and fence the register operands (fence_operands) so the
// compiler cannot move their uses across the wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "sm90/ptx.cuh"

namespace fa::sm90 {

template <typename T, int N>
struct WgmmaSS;  // defined below for N = 16, 32, ..., 256 and T = __half, __nv_bfloat16
template <typename T, int N>
struct WgmmaRSTransB;  // likewise
template <typename T, int N>
struct WgmmaSSTransAB;  // likewise
template <typename T, int N>
struct WgmmaSSTransB;  // likewise

// clang-format off
#define FA_WGMMA_ACC_STR_H "%0, %1, %2, %3"
#define FA_WGMMA_ACC_STR_1 "%0, %1, %2, %3, %4, %5, %6, %7"
#define FA_WGMMA_ACC_STR_2 FA_WGMMA_ACC_STR_1 ", " "%8, %9, %10, %11, %12, %13, %14, %15"
#define FA_WGMMA_ACC_STR_3 FA_WGMMA_ACC_STR_2 ", " "%16, %17, %18, %19, %20, %21, %22, %23"
#define FA_WGMMA_ACC_STR_4 FA_WGMMA_ACC_STR_3 ", " "%24, %25, %26, %27, %28, %29, %30, %31"
#define FA_WGMMA_ACC_STR_5 FA_WGMMA_ACC_STR_4 ", " "%32, %33, %34, %35, %36, %37, %38, %39"
#define FA_WGMMA_ACC_STR_6 FA_WGMMA_ACC_STR_5 ", " "%40, %41, %42, %43, %44, %45, %46, %47"
#define FA_WGMMA_ACC_STR_7 FA_WGMMA_ACC_STR_6 ", " "%48, %49, %50, %51, %52, %53, %54, %55"
#define FA_WGMMA_ACC_STR_8 FA_WGMMA_ACC_STR_7 ", " "%56, %57, %58, %59, %60, %61, %62, %63"
#define FA_WGMMA_ACC_STR_9 FA_WGMMA_ACC_STR_8 ", " "%64, %65, %66, %67, %68, %69, %70, %71"
#define FA_WGMMA_ACC_STR_10 FA_WGMMA_ACC_STR_9 ", " "%72, %73, %74, %75, %76, %77, %78, %79"
#define FA_WGMMA_ACC_STR_11 FA_WGMMA_ACC_STR_10 ", " "%80, %81, %82, %83, %84, %85, %86, %87"
#define FA_WGMMA_ACC_STR_12 FA_WGMMA_ACC_STR_11 ", " "%88, %89, %90, %91, %92, %93, %94, %95"
#define FA_WGMMA_ACC_STR_13 FA_WGMMA_ACC_STR_12 ", " "%96, %97, %98, %99, %100, %101, %102, %103"
#define FA_WGMMA_ACC_STR_14 FA_WGMMA_ACC_STR_13 ", " "%104, %105, %106, %107, %108, %109, %110, %111"
#define FA_WGMMA_ACC_STR_15 FA_WGMMA_ACC_STR_14 ", " "%112, %113, %114, %115, %116, %117, %118, %119"
#define FA_WGMMA_ACC_STR_16 FA_WGMMA_ACC_STR_15 ", " "%120, %121, %122, %123, %124, %125, %126, %127"
#define FA_WGMMA_ACC_OPS_H(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define FA_WGMMA_ACC_OPS_1(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define FA_WGMMA_ACC_OPS_2(d) FA_WGMMA_ACC_OPS_1(d), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define FA_WGMMA_ACC_OPS_3(d) FA_WGMMA_ACC_OPS_2(d), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define FA_WGMMA_ACC_OPS_4(d) FA_WGMMA_ACC_OPS_3(d), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FA_WGMMA_ACC_OPS_5(d) FA_WGMMA_ACC_OPS_4(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define FA_WGMMA_ACC_OPS_6(d) FA_WGMMA_ACC_OPS_5(d), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define FA_WGMMA_ACC_OPS_7(d) FA_WGMMA_ACC_OPS_6(d), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
#define FA_WGMMA_ACC_OPS_8(d) FA_WGMMA_ACC_OPS_7(d), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FA_WGMMA_ACC_OPS_9(d) FA_WGMMA_ACC_OPS_8(d), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71])
#define FA_WGMMA_ACC_OPS_10(d) FA_WGMMA_ACC_OPS_9(d), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79])
#define FA_WGMMA_ACC_OPS_11(d) FA_WGMMA_ACC_OPS_10(d), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
#define FA_WGMMA_ACC_OPS_12(d) FA_WGMMA_ACC_OPS_11(d), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
#define FA_WGMMA_ACC_OPS_13(d) FA_WGMMA_ACC_OPS_12(d), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103])
#define FA_WGMMA_ACC_OPS_14(d) FA_WGMMA_ACC_OPS_13(d), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
#define FA_WGMMA_ACC_OPS_15(d) FA_WGMMA_ACC_OPS_14(d), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119])
#define FA_WGMMA_ACC_OPS_16(d) FA_WGMMA_ACC_OPS_15(d), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

#define FA_WGMMA_SS_ONE(T, TSTR, N, K8, IA, IB, IS)                                                    \
    template <>                                                                                        \
    struct WgmmaSS<T, N> {                                                                             \
        __device__ __forceinline__ static void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,  \
                                                   uint32_t accumulate) {                              \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                             \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TSTR "." TSTR " {"           \
                         FA_WGMMA_ACC_STR_##K8 "}, %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"            \
                         : FA_WGMMA_ACC_OPS_##K8(d)                                                    \
                         : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                 \
        }                                                                                              \
    };

#define FA_WGMMA_SST_ONE(T, TSTR, N, K8, IA, IB, IS)                                                   \
    template <>                                                                                        \
    struct WgmmaSSTransAB<T, N> {                                                                      \
        __device__ __forceinline__ static void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,  \
                                                   uint32_t accumulate) {                              \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                             \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TSTR "." TSTR " {"           \
                         FA_WGMMA_ACC_STR_##K8 "}, %" #IA ", %" #IB ", p, 1, 1, 1, 1;\n}\n"            \
                         : FA_WGMMA_ACC_OPS_##K8(d)                                                    \
                         : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                 \
        }                                                                                              \
    };

#define FA_WGMMA_SSB_ONE(T, TSTR, N, K8, IA, IB, IS)                                                   \
    template <>                                                                                        \
    struct WgmmaSSTransB<T, N> {                                                                       \
        __device__ __forceinline__ static void mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,  \
                                                   uint32_t accumulate) {                              \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                             \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TSTR "." TSTR " {"           \
                         FA_WGMMA_ACC_STR_##K8 "}, %" #IA ", %" #IB ", p, 1, 1, 0, 1;\n}\n"            \
                         : FA_WGMMA_ACC_OPS_##K8(d)                                                    \
                         : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                 \
        }                                                                                              \
    };

#define FA_WGMMA_RS_ONE(T, TSTR, N, K8, A0, A1, A2, A3, IB, IS)                                        \
    template <>                                                                                        \
    struct WgmmaRSTransB<T, N> {                                                                       \
        __device__ __forceinline__ static void mma(float (&d)[N / 2], const uint32_t (&a)[4],           \
                                                   uint64_t desc_b, uint32_t accumulate) {             \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                             \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TSTR "." TSTR " {"           \
                         FA_WGMMA_ACC_STR_##K8 "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #IB     \
                         ", p, 1, 1, 1;\n}\n"                                                          \
                         : FA_WGMMA_ACC_OPS_##K8(d)                                                    \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));  \
        }                                                                                              \
    };

#define FA_WGMMA_SS_DEFINE(N, K8, IA, IB, IS)                    \
    FA_WGMMA_SS_ONE(__nv_bfloat16, "bf16", N, K8, IA, IB, IS)    \
    FA_WGMMA_SS_ONE(__half, "f16", N, K8, IA, IB, IS)

#define FA_WGMMA_SST_DEFINE(N, K8, IA, IB, IS)                   \
    FA_WGMMA_SST_ONE(__nv_bfloat16, "bf16", N, K8, IA, IB, IS)   \
    FA_WGMMA_SST_ONE(__half, "f16", N, K8, IA, IB, IS)

#define FA_WGMMA_SSB_DEFINE(N, K8, IA, IB, IS)                   \
    FA_WGMMA_SSB_ONE(__nv_bfloat16, "bf16", N, K8, IA, IB, IS)   \
    FA_WGMMA_SSB_ONE(__half, "f16", N, K8, IA, IB, IS)

#define FA_WGMMA_RS_DEFINE(N, K8, A0, A1, A2, A3, IB, IS)                    \
    FA_WGMMA_RS_ONE(__nv_bfloat16, "bf16", N, K8, A0, A1, A2, A3, IB, IS)    \
    FA_WGMMA_RS_ONE(__half, "f16", N, K8, A0, A1, A2, A3, IB, IS)

FA_WGMMA_SS_DEFINE(16, 1, 8, 9, 10)
FA_WGMMA_SS_DEFINE(32, 2, 16, 17, 18)
FA_WGMMA_SS_DEFINE(48, 3, 24, 25, 26)
FA_WGMMA_SS_DEFINE(64, 4, 32, 33, 34)
FA_WGMMA_SS_DEFINE(80, 5, 40, 41, 42)
FA_WGMMA_SS_DEFINE(96, 6, 48, 49, 50)
FA_WGMMA_SS_DEFINE(112, 7, 56, 57, 58)
FA_WGMMA_SS_DEFINE(128, 8, 64, 65, 66)
FA_WGMMA_SS_DEFINE(144, 9, 72, 73, 74)
FA_WGMMA_SS_DEFINE(160, 10, 80, 81, 82)
FA_WGMMA_SS_DEFINE(176, 11, 88, 89, 90)
FA_WGMMA_SS_DEFINE(192, 12, 96, 97, 98)
FA_WGMMA_SS_DEFINE(208, 13, 104, 105, 106)
FA_WGMMA_SS_DEFINE(224, 14, 112, 113, 114)
FA_WGMMA_SS_DEFINE(240, 15, 120, 121, 122)
FA_WGMMA_SS_DEFINE(256, 16, 128, 129, 130)

// The backward's dQ GEMM (N = the column chunks of BwdHalfCols, csrc/sm90/bwd.cuh).
FA_WGMMA_SST_DEFINE(8, H, 4, 5, 6)
FA_WGMMA_SST_DEFINE(16, 1, 8, 9, 10)
FA_WGMMA_SST_DEFINE(32, 2, 16, 17, 18)
FA_WGMMA_SST_DEFINE(64, 4, 32, 33, 34)
FA_WGMMA_SST_DEFINE(128, 8, 64, 65, 66)

// The wide backward's dV and dK GEMMs (N = the column chunks of BwdHalfCols).
FA_WGMMA_SSB_DEFINE(32, 2, 16, 17, 18)
FA_WGMMA_SSB_DEFINE(64, 4, 32, 33, 34)
FA_WGMMA_SSB_DEFINE(128, 8, 64, 65, 66)

FA_WGMMA_RS_DEFINE(16, 1, 8, 9, 10, 11, 12, 13)
FA_WGMMA_RS_DEFINE(32, 2, 16, 17, 18, 19, 20, 21)
FA_WGMMA_RS_DEFINE(48, 3, 24, 25, 26, 27, 28, 29)
FA_WGMMA_RS_DEFINE(64, 4, 32, 33, 34, 35, 36, 37)
FA_WGMMA_RS_DEFINE(80, 5, 40, 41, 42, 43, 44, 45)
FA_WGMMA_RS_DEFINE(96, 6, 48, 49, 50, 51, 52, 53)
FA_WGMMA_RS_DEFINE(112, 7, 56, 57, 58, 59, 60, 61)
FA_WGMMA_RS_DEFINE(128, 8, 64, 65, 66, 67, 68, 69)
FA_WGMMA_RS_DEFINE(144, 9, 72, 73, 74, 75, 76, 77)
FA_WGMMA_RS_DEFINE(160, 10, 80, 81, 82, 83, 84, 85)
FA_WGMMA_RS_DEFINE(176, 11, 88, 89, 90, 91, 92, 93)
FA_WGMMA_RS_DEFINE(192, 12, 96, 97, 98, 99, 100, 101)
FA_WGMMA_RS_DEFINE(208, 13, 104, 105, 106, 107, 108, 109)
FA_WGMMA_RS_DEFINE(224, 14, 112, 113, 114, 115, 116, 117)
FA_WGMMA_RS_DEFINE(240, 15, 120, 121, 122, 123, 124, 125)
FA_WGMMA_RS_DEFINE(256, 16, 128, 129, 130, 131, 132, 133)
// clang-format on

#undef FA_WGMMA_SS_DEFINE
#undef FA_WGMMA_RS_DEFINE
#undef FA_WGMMA_SST_DEFINE
#undef FA_WGMMA_SST_ONE
#undef FA_WGMMA_SSB_DEFINE
#undef FA_WGMMA_SSB_ONE
#undef FA_WGMMA_SS_ONE
#undef FA_WGMMA_RS_ONE

}  // namespace fa::sm90
