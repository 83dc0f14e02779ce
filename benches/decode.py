"""PyTorch SDPA backends (FlashAttention-2, cuDNN) on the decode cases of `attention --decode`:
one query per sequence, 32 query / 8 KV heads (enable_gqa), d 128, bf16, no mask; median of
CUDA-event-timed calls after warm-up. Prints ms and K/V GB/s per backend ("n/a" where the backend
refuses the call)."""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = [(1, 8192), (1, 32768), (1, 131072), (4, 32768), (8, 8192), (16, 8192), (16, 32768)]
ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def time_ms(fn):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(ITERS):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


print(f"{'batch':>5} {'L':>6} {'fa2 ms':>10} {'cudnn ms':>10} {'fa2 GB/s':>9} {'cudnn GB/s':>10}")
for b, l in CASES:
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, 8, l, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, 8, l, 128, device="cuda", dtype=torch.bfloat16)
    kv_bytes = 2 * b * l * 8 * 128 * 2
    res = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                res.append(time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
        except Exception:  # the backend refuses this call
            res.append(float("nan"))
    f = lambda ms: f"{ms:10.4f}" if ms == ms else f"{'n/a':>10}"
    g = lambda ms: f"{kv_bytes / ms / 1e6:9.0f}" if ms == ms else f"{'n/a':>9}"
    print(f"{b:>5} {l:>6} {f(res[0])} {f(res[1])} {g(res[0])} {g(res[1]):>10}", flush=True)
    del q, k, v
