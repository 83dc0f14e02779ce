#!/usr/bin/env python3
"""Times PyTorch SDPA's flash (FlashAttention-2) and cuDNN backends on the same grid as
`cargo bench --bench attention` and prints them side by side with our numbers.

Usage (on the GPU machine, in the same session as the Rust benchmark):
    python3 benches/compare.py --ours ours.json [--quick] [--json combined.json]
    python3 benches/compare.py --bwd --ours ours_bwd.json [...]   # backward

--bwd times the backward: one forward with autograd, then
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) per call, counted as 2.5x the
forward's FLOPs (as `attention --bwd` counts ours).

Same timing method as the Rust side: CUDA events around each call, warm-up, median of --iters.
Same FLOP count: 4*b*h*sq*sk*d, halved for causal. Also measures the device's bf16 matmul rate
(8192^3 torch.matmul) so every figure can be read as a fraction of what the chip does.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def matmul_tflops(iters):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters)
    return 2 * 8192**3 / ms / 1e9


def configs(quick, head_dims):
    seqlens = [2048, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    out = []
    for d in head_dims:
        for causal in (False, True):
            for s in seqlens:
                out.append((d, causal, s, 2048 // d, 2048 // d))
    for causal in (False, True):
        for s in seqlens:
            out.append((128, causal, s, 32, 8))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="JSON written by `cargo bench --bench attention -- --json`")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--head-dims", default="64,128,256,80,96")
    ap.add_argument("--json", help="write the combined table here")
    ap.add_argument("--bwd", action="store_true", help="time the backward (2.5x forward FLOPs)")
    a = ap.parse_args()
    metric = "bwd_tflops" if a.bwd else "fwd_tflops"

    ours = {}
    device_ours = None
    if a.ours:
        with open(a.ours) as f:
            js = json.load(f)
        device_ours = js.get("device")
        for r in js["rows"]:
            ours[(r["hdim"], r["causal"], r["seqlen"], r["heads"], r["heads_k"])] = r

    dev = torch.cuda.get_device_name()
    mm = matmul_tflops(a.iters)
    print(f"device: {dev} (ours measured on: {device_ours}); bf16 matmul 8192^3: {mm:.0f} TFLOP/s; "
          f"{'backward' if a.bwd else 'forward'}")
    rows = []
    hdr = f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'h/hk':>6} {'ours':>7} {'FA2':>7} {'cuDNN':>7} {'ours/FA2':>8} {'ours/cuDNN':>10}"
    print(hdr)
    for d, causal, s, h, hk in configs(a.quick, [int(x) for x in a.head_dims.split(",")]):
        b = 16384 // s
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=a.bwd)
        k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=a.bwd)
        v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=a.bwd)
        flops = 4 * b * h * s * s * d / (2 if causal else 1) * (2.5 if a.bwd else 1)
        row = {"hdim": d, "causal": causal, "seqlen": s, "batch": b, "heads": h, "heads_k": hk}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hk != h)
                    if a.bwd:
                        out = fwd()
                        dout = torch.randn_like(out)
                        fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                    else:
                        fn = fwd
                    ms = time_ms(fn, a.iters)
                    if a.bwd:
                        del out, dout
                row[name] = flops / ms / 1e9
            except RuntimeError as e:  # backend refuses the shape
                row[name] = None
                row[name + "_error"] = str(e).splitlines()[0][:120]
        o = ours.get((d, causal, s, h, hk))
        row["ours"] = o.get(metric) if o else None
        rows.append(row)

        def f(x):
            return f"{x:7.1f}" if x else "      -"

        def r(x, y):
            return f"{x / y:.2f}" if x and y else "-"

        print(f"{d:>4} {str(causal):>6} {s:>6} {h:>3}/{hk:<2} {f(row['ours'])} {f(row['flash'])} {f(row['cudnn'])} "
              f"{r(row['ours'], row['flash']):>8} {r(row['ours'], row['cudnn']):>10}", flush=True)
        del q, k, v
    paired = [(x["ours"], x["flash"], x["cudnn"]) for x in rows if x["ours"] and x["flash"] and x["cudnn"]]
    if paired:
        gm = lambda xs: statistics.geometric_mean(xs)
        print(f"geomean ours/FA2 = {gm([o / f for o, f, _ in paired]):.3f}, "
              f"ours/cuDNN = {gm([o / c for o, _, c in paired]):.3f}, "
              f"min ours/FA2 = {min(o / f for o, f, _ in paired):.3f} over {len(paired)} cells")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": dev, "matmul_tflops": mm, "direction": "bwd" if a.bwd else "fwd", "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
