#!/usr/bin/env python3
"""Times PyTorch SDPA's flash (FlashAttention-2) and cuDNN backends on the same grid as
`cargo bench --bench attention` and prints them side by side with our numbers.

Usage (on the GPU machine, in the same session as the Rust benchmark):
    python3 benches/compare.py --ours ours.json [--quick] [--json combined.json]
    python3 benches/compare.py --bwd --ours ours_bwd.json [...]   # backward

Same-process mode (the fairest comparison): with --lib, our kernels run through the C ABI of
examples/pyffi.rs on the same tensors as PyTorch, and each cell times ours, FA2 and cuDNN in
--rounds alternating rounds (the order rotates each round), reporting each one's median over
the rounds. Each timing starts with --warmup-ms of back-to-back calls, so that every backend is
timed in the power state its own kernels settle in, not the one its predecessor left; the
alternation spreads slower drift (temperature) over all of them alike. Ours is checked
against cuDNN's output on each cell first (max |diff| reported; a mismatch stops the run).
    cargo build --release --example pyffi
    python3 benches/compare.py --lib target/release/examples/libpyffi.so [--bwd] [--layout bhsd]
--lib-b other/libpyffi.so times a second build of ours alongside (ours_b, and b/a per cell):
an A/B of two versions under the same conditions; --seqlens 512,1024 restricts the grid.
--layout bshd (default): tensors are (b, s, h, d) contiguous, FlashAttention's layout, and
SDPA gets the (b, h, s, d) view; bhsd: (b, h, s, d) contiguous, SDPA's own.

--bwd times the backward: one forward with autograd, then
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) per call, counted as 2.5x the
forward's FLOPs (as `attention --bwd` counts ours).

Same timing method as the Rust side: CUDA events around each call, warm-up, median of --iters.
Same FLOP count: 4*b*h*sq*sk*d, halved for causal. Also measures the device's bf16 matmul rate
(8192^3 torch.matmul) so every figure can be read as a fraction of what the chip does.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, iters, warmup_ms=0):
    for _ in range(3):
        fn()
    # Run back to back for warmup_ms first, so that the clocks and power state are this
    # function's own, not those left by whatever ran before it.
    if warmup_ms > 0:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        while (time.perf_counter() - t0) * 1e3 < warmup_ms:
            fn()
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
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


def fmt_tflops(x):
    return f"{x:7.1f}" if x else "      -"


def fmt_ratio(x, y):
    return f"{x / y:.2f}" if x and y else "-"


def print_summary(rows, paper):
    """Geometric means of ours over FA2 and cuDNN (and over the FlashAttention-3 paper grid)."""
    paired = [(x["ours"], x["flash"], x["cudnn"]) for x in rows if x["ours"] and x["flash"] and x["cudnn"]]
    if not paired:
        return
    gm = statistics.geometric_mean
    print(f"geomean ours/FA2 = {gm([o / f for o, f, _ in paired]):.3f}, "
          f"ours/cuDNN = {gm([o / c for o, _, c in paired]):.3f}, "
          f"min ours/FA2 = {min(o / f for o, f, _ in paired):.3f} over {len(paired)} cells")
    grid = [(x["ours"], x["cudnn"]) for x in rows
            if paper and x["ours"] and x["cudnn"] and x["hdim"] in (64, 128, 256) and x["heads"] == x["heads_k"]]
    if grid:
        print(f"paper grid (d 64/128/256, MHA): ours/cuDNN = {gm([o / c for o, c in grid]):.3f} over {len(grid)} cells")


def matmul_tflops(iters):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters)
    return 2 * 8192**3 / ms / 1e9


def configs(quick, head_dims, gqa=True):
    seqlens = [2048, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    out = []
    for d in head_dims:
        for causal in (False, True):
            for s in seqlens:
                out.append((d, causal, s, 2048 // d, 2048 // d))
    for causal in (False, True) if gqa else ():
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
    ap.add_argument("--lib", help="libpyffi.so (examples/pyffi.rs): time ours in this process")
    ap.add_argument("--rounds", type=int, default=3, help="--lib: alternating rounds per cell")
    ap.add_argument("--layout", choices=["bshd", "bhsd"], default="bshd", help="--lib: tensor layout")
    ap.add_argument("--family", choices=["auto", "sm80"], default="auto", help="--lib: our family (forward and backward)")
    ap.add_argument("--no-gqa", action="store_true", help="leave out the GQA 32/8 rows at head dim 128")
    ap.add_argument("--variant", type=int, default=None, help="--lib: force our tile variant i (index into the cell's kernels)")
    ap.add_argument("--deterministic", action="store_true", help="--lib --bwd: our deterministic mode")
    ap.add_argument("--lib-b", help="--lib: a second build of libpyffi.so, timed alongside (A/B of our own versions)")
    ap.add_argument("--seqlens", help="--lib: comma-separated sequence lengths instead of the grid's")
    ap.add_argument("--warmup-ms", type=float, default=100.0,
                    help="--lib: back-to-back calls before each timing (each backend in its own power state)")
    a = ap.parse_args()
    if a.lib:
        return run_lib(a)
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
    for d, causal, s, h, hk in configs(a.quick, [int(x) for x in a.head_dims.split(",")], not a.no_gqa):
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
        f, r = fmt_tflops, fmt_ratio
        print(f"{d:>4} {str(causal):>6} {s:>6} {h:>3}/{hk:<2} {f(row['ours'])} {f(row['flash'])} {f(row['cudnn'])} "
              f"{r(row['ours'], row['flash']):>8} {r(row['ours'], row['cudnn']):>10}", flush=True)
        del q, k, v
    print_summary(rows, paper=False)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": dev, "matmul_tflops": mm, "direction": "bwd" if a.bwd else "fwd", "rows": rows}, fh,
                      indent=1)


class Ours:
    """examples/pyffi.rs through ctypes."""

    def __init__(self, path):
        import ctypes

        self.ct = ctypes
        self.lib = ctypes.CDLL(path)
        u, i = ctypes.c_uint64, ctypes.c_int32
        self.lib.fa_ffi_fwd.argtypes = [u] * 5 + [i] * 9
        self.lib.fa_ffi_bwd.argtypes = [u] * 9 + [i] * 10
        self.lib.fa_ffi_error.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self.lib.fa_ffi_error.restype = ctypes.c_size_t

    def check(self, rc):
        if rc != 0:
            buf = self.ct.create_string_buffer(4096)
            self.lib.fa_ffi_error(buf, 4096)
            raise RuntimeError("flashattn-aot: " + buf.value.decode())

    def fwd(self, q, k, v, out, lse, shape, causal, family):
        self.check(self.lib.fa_ffi_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                       lse.data_ptr() if lse is not None else 0, *shape, int(causal), family))

    def bwd(self, q, k, v, out, dout, lse, dq, dk, dv, shape, causal, deterministic, family):
        self.check(self.lib.fa_ffi_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                       lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), *shape,
                                       int(causal), int(deterministic), family))


def run_lib(a):
    ours = Ours(a.lib)
    ours_b = Ours(a.lib_b) if a.lib_b else None
    libs = {"ours": ours, "ours_b": ours_b} if ours_b else {"ours": ours}
    dev = torch.cuda.get_device_name()
    mm = matmul_tflops(a.iters)
    family = (1 if a.family == "sm80" else 0) + (256 * (a.variant + 1) if a.variant is not None else 0)
    print(f"device: {dev}; same process, {a.rounds} alternating rounds per cell ({a.warmup_ms:.0f} ms warm-up each), "
          f"layout {a.layout}, family "
          f"{a.family}{', deterministic' if a.deterministic else ''}; bf16 matmul 8192^3: {mm:.0f} TFLOP/s; "
          f"{'backward' if a.bwd else 'forward'}")
    hdr = (f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'h/hk':>6} {'ours':>7} {'FA2':>7} {'cuDNN':>7} "
           f"{'ours/FA2':>8} {'ours/cuDNN':>10} {'maxdiff':>8}" + (f" {'ours_b':>7} {'b/a':>5}" if ours_b else ""))
    print(hdr)
    rows = []
    cells = configs(a.quick, [int(x) for x in a.head_dims.split(",")], not a.no_gqa)
    if a.seqlens:
        keep = {int(x) for x in a.seqlens.split(",")}
        cells = [c for c in cells if c[2] in keep]
    for d, causal, s, h, hk in cells:
        b = 16384 // s
        layout = 0 if a.layout == "bshd" else 1

        def make(heads):
            if layout == 0:  # (b, s, h, d) memory, SDPA's (b, h, s, d) view
                t = torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16)
                return t, t.transpose(1, 2)
            t = torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16)
            return t, t

        (q, qv), (k, kv), (v, vv) = make(h), make(hk), make(hk)
        out, outv = make(h)
        out.fill_(float("nan"))
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        shape = (b, s, s, h, hk, d, layout)
        flops = 4 * b * h * s * s * d / (2 if causal else 1) * (2.5 if a.bwd else 1)
        row = {"hdim": d, "causal": causal, "seqlen": s, "batch": b, "heads": h, "heads_k": hk, "layout": a.layout}
        # Correctness first: each build of ours against cuDNN's forward on the same inputs (the
        # first build last, so that out and lse are its own for the backward).
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qv, kv, vv, is_causal=causal, enable_gqa=hk != h)
        for name, lib in reversed(libs.items()):
            out.fill_(float("nan"))
            lib.fwd(q, k, v, out, lse, shape, causal, family)
            diff = (outv.float() - ref.float()).abs().max().item()
            if not diff < 0.1:
                raise SystemExit(f"{name} differs from cuDNN by {diff} on d {d} causal {causal} s {s}")
        row["maxdiff"] = diff
        fns = {}
        if a.bwd:
            dout, doutv = make(h)
            dq, _ = make(h)
            dk, _ = make(hk)
            dv, _ = make(hk)
            for name, lib in libs.items():
                fns[name] = lambda lib=lib: lib.bwd(q, k, v, out, dout, lse, dq, dk, dv, shape, causal, a.deterministic,
                                                           family)
            for name, backend in BACKENDS.items():
                qg, kg, vg = (x.detach().requires_grad_() for x in (qv, kv, vv))
                try:
                    with sdpa_kernel(backend):
                        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, enable_gqa=hk != h)
                    fns[name] = (lambda o=o, qg=qg, kg=kg, vg=vg:
                                 torch.autograd.grad(o, (qg, kg, vg), doutv, retain_graph=True))
                except RuntimeError as e:
                    row[name + "_error"] = str(e).splitlines()[0][:120]
        else:
            for name, lib in libs.items():
                fns[name] = lambda lib=lib: lib.fwd(q, k, v, out, None, shape, causal, family)
            for name in BACKENDS:
                fns[name] = lambda: F.scaled_dot_product_attention(qv, kv, vv, is_causal=causal, enable_gqa=hk != h)
        times = {n: [] for n in fns}
        names = list(fns)
        for r in range(a.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                try:
                    # The backend choice is entered once per timing, not per call (its host
                    # cost would count in every timed call).
                    with contextlib.ExitStack() as ctx:
                        if n in BACKENDS:
                            ctx.enter_context(sdpa_kernel(BACKENDS[n]))
                        times[n].append(time_ms(fns[n], a.iters, a.warmup_ms))
                except RuntimeError as e:  # backend refuses the shape
                    row[n + "_error"] = str(e).splitlines()[0][:120]
        for n in ("ours", "ours_b", "flash", "cudnn"):
            row[n] = flops / statistics.median(times[n]) / 1e9 if times.get(n) else None
        rows.append(row)
        f, rt = fmt_tflops, fmt_ratio
        b_col = f" {f(row['ours_b'])} {rt(row['ours_b'], row['ours']):>5}" if ours_b else ""
        print(f"{d:>4} {str(causal):>6} {s:>6} {h:>3}/{hk:<2} {f(row['ours'])} {f(row['flash'])} {f(row['cudnn'])} "
              f"{rt(row['ours'], row['flash']):>8} {rt(row['ours'], row['cudnn']):>10} {diff:8.1e}{b_col}", flush=True)
        del q, k, v, out, lse, fns
    print_summary(rows, paper=True)
    pairs_b = [x["ours_b"] / x["ours"] for x in rows if x.get("ours_b") and x["ours"]]
    if pairs_b:
        print(f"geomean ours_b/ours = {statistics.geometric_mean(pairs_b):.3f} over {len(pairs_b)} cells "
              f"(min {min(pairs_b):.3f}, max {max(pairs_b):.3f})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": dev, "matmul_tflops": mm, "direction": "bwd" if a.bwd else "fwd", "mode": "lib",
                       "rounds": a.rounds, "layout": a.layout, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
