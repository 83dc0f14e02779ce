//! The main example: `flash_fwd` on a realistic shape (bf16, batch 4, seqlen 4096, 16 heads,
//! head dim 128, causal), checked against the GPU reference and timed with CUDA events.
//!
//! ```text
//! cargo run --release --example fwd [-- --seqlen 8192 --head-dim 64 --no-causal]
//! ```

use cudarc::driver::sys::CUevent_flags;
use flashattn_aot::reference::reference_fwd;
use flashattn_aot::{
    CausalAlign, FwdOptions, FwdTensors, Layout, Tensor, TensorMut, device_info, flash_fwd, open_device,
};
use half::bf16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut seqlen = 4096usize;
    let mut d = 128usize;
    let mut causal = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seqlen" => seqlen = it.next().ok_or("--seqlen needs a value")?.parse()?,
            "--head-dim" => d = it.next().ok_or("--head-dim needs a value")?.parse()?,
            "--no-causal" => causal = false,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let (b, h) = (4usize, 2048 / d);
    let ctx = open_device(0)?;
    let stream = ctx.default_stream();
    let dev = device_info(&stream)?;
    println!(
        "device: {} (compute capability {:?}, {} SMs)",
        ctx.name()?,
        dev.compute_capability,
        dev.sm_count
    );

    let n = b * seqlen * h * d;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bf16::from_f32((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
    };
    let host: Vec<bf16> = (0..3 * n).map(|_| rnd()).collect();
    let q = stream.clone_htod(&host[..n])?;
    let k = stream.clone_htod(&host[n..2 * n])?;
    let v = stream.clone_htod(&host[2 * n..])?;
    let mut out = stream.alloc_zeros::<bf16>(n)?;
    let mut out_ref = stream.alloc_zeros::<bf16>(n)?;
    let layout = Layout::contiguous(b, seqlen, h, d);
    let opts = if causal {
        FwdOptions::new().causal(CausalAlign::BottomRight)
    } else {
        FwdOptions::new()
    };

    let run = |out: &mut cudarc::driver::CudaSlice<bf16>| {
        let t = FwdTensors {
            q: Tensor::new(&q, layout),
            k: Tensor::new(&k, layout),
            v: Tensor::new(&v, layout),
            out: TensorMut::new(out, layout),
            lse: None,
        };
        flash_fwd(&stream, t, &opts)
    };
    let info = run(&mut out)?;
    println!(
        "kernel: {} (cell {}{})",
        info.symbol,
        info.cell,
        if info.routed_from.is_some() {
            ", routed to the sm80 family"
        } else {
            ""
        }
    );

    // Check against the GPU reference (fp32 accumulation, one row per block).
    let t = FwdTensors {
        q: Tensor::new(&q, layout),
        k: Tensor::new(&k, layout),
        v: Tensor::new(&v, layout),
        out: TensorMut::new(&mut out_ref, layout),
        lse: None,
    };
    reference_fwd(&stream, t, &opts)?;
    let got: Vec<bf16> = stream.clone_dtoh(&out)?;
    let want: Vec<bf16> = stream.clone_dtoh(&out_ref)?;
    let max_err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
        .fold(0f32, f32::max);
    let max_ref = want.iter().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
    println!("max |flash - reference| = {max_err:.2e} (max |reference| = {max_ref:.3})");
    if max_err.is_nan() || max_err > 3.0 * max_ref.max(1.0) / 256.0 {
        return Err(format!("flash_fwd disagrees with the reference: {max_err}").into());
    }

    // Time: warm-up, then the median of 20 CUDA-event-timed calls.
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..3 {
        run(&mut out)?;
    }
    let mut ms = Vec::new();
    for _ in 0..20 {
        start.record(&stream)?;
        run(&mut out)?;
        stop.record(&stream)?;
        stop.synchronize()?;
        ms.push(start.elapsed_ms(&stop)? as f64);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = ms[ms.len() / 2];
    let flops = 4.0 * (b * h * seqlen * seqlen * d) as f64 / if causal { 2.0 } else { 1.0 };
    println!(
        "bf16 b={b} s={seqlen} h={h} d={d} causal={causal}: {med:.3} ms, {:.1} TFLOP/s",
        flops / med / 1e9
    );
    Ok(())
}
