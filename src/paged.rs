//! The paged-KV forward: `flash_fwd_paged` over a block table ([`PagedKv`]).
//!
//! K and V live in a pool of pages `(num_pages, page_size, heads_k, head_dim)` (a [`Layout`] with
//! `batch = num_pages`, `seqlen = page_size`; any strides, last dim contiguous). Sequence `b`'s
//! key row `r` is slot `r % page_size` of page `block_table[b][r / page_size]`; it has
//! `seqlens_k[b]` keys. Queries and output are dense `(batch, seqlen_q, heads, head_dim)`. Any
//! page size from 1 up is accepted (vLLM uses 16, FlashInfer any, FlashAttention multiples of
//! 256 for its older kernels).
//!
//! The kernels are the sm80-family forward's, instantiated with a K/V tile copy that reads each
//! key row's page from the block table (`GmemToSmemTile::issue_paged` in
//! `csrc/sm80/fwd_mainloop.cuh`); every mask, score modifier, GQA ratio and the LSE output work
//! as in [`crate::flash_fwd`], with `seqlen_k = seqlens_k[b]` per sequence (so bottom-right causal
//! alignment puts the last query at the last cached key, as a decode step expects). On sm_90 the
//! request is routed to the sm80 family (visible in [`FwdInfo::routed_from`]).
//!
//! A decode step (one query per sequence, GQA, no ALiBi or sink logits) runs its query heads as
//! the rows of one query block per KV head (FlashAttention's `seqlenq_ngroups_swapped`), as
//! [`crate::flash_fwd`] does.
//!
//! Varlen queries (chunked prefill of sequences of different lengths): [`PagedKv::with_cu_seqlens_q`].
//! Split-KV ([`FwdOptions::num_splits`], the heuristic by default) works on dense queries here as
//! in [`crate::flash_fwd`].

use crate::cells::{Direction, HEAD_DIMS};
use crate::dispatch::DISPATCH_TABLE;
use crate::error::{Error, Result};
use crate::fwd::{
    Dims, FwdInfo, FwdTensors, Impl, Pointers, Ragged, check_device, check_fwd_addresses, check_fwd_buffers,
    check_shapes, choose_tile_in, fill_params, kernel_with_tile, plan_split, prepare_options, uses_ptx,
};
use crate::options::FwdOptions;
use crate::params::{FLAG_PAGED, FaParams};
use crate::runtime::{self, Geometry};
use crate::split::Split;
use crate::tensor::{AttnElement, Layout};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// A paged KV cache's block table and per-sequence key counts, checked on the host and uploaded
/// by the crate, so the kernels can trust them: no key row a sequence uses reaches outside the
/// page pool.
///
/// `block_table` is int32 `(batch, max_pages_per_seq)` row-major; the first
/// `ceil(seqlens_k[b] / page_size)` entries of row `b` must name pages in `0..num_pages`; the
/// entries after them are never read (any value, e.g. -1 padding, is accepted). Pages may be
/// shared between sequences (prefix caching).
#[derive(Debug)]
pub struct PagedKv {
    pub(crate) block_table: CudaSlice<i32>,
    pub(crate) seqlens_k: CudaSlice<i32>,
    batch: usize,
    max_pages_per_seq: usize,
    page_size: usize,
    num_pages: usize,
    max_seqlen_k: usize,
    /// Varlen queries ([`PagedKv::with_cu_seqlens_q`]): `cu_seqlens_q` on the device, its
    /// longest sequence and its total.
    pub(crate) cu_q: Option<(CudaSlice<i32>, usize, usize)>,
}

impl PagedKv {
    /// Validates and uploads a block table and the key count of each sequence
    /// (`seqlens_k.len()` is the batch).
    pub fn new(
        stream: &Arc<CudaStream>,
        block_table: &[i32],
        max_pages_per_seq: usize,
        page_size: usize,
        num_pages: usize,
        seqlens_k: &[i32],
    ) -> Result<Self> {
        runtime::ensure_driver()?;
        let batch = seqlens_k.len();
        let bad = |msg: String| Err(Error::InvalidBlockTable(msg));
        if batch == 0 {
            return bad("seqlens_k is empty: the batch needs at least one sequence".into());
        }
        if page_size == 0 || num_pages == 0 || max_pages_per_seq == 0 {
            return bad(format!(
                "page_size ({page_size}), num_pages ({num_pages}) and max_pages_per_seq ({max_pages_per_seq}) must \
                 be >= 1"
            ));
        }
        if block_table.len() != batch * max_pages_per_seq {
            return bad(format!(
                "block_table has {} entries, expected batch {batch} x max_pages_per_seq {max_pages_per_seq}",
                block_table.len()
            ));
        }
        let capacity = max_pages_per_seq
            .checked_mul(page_size)
            .filter(|&c| c <= i32::MAX as usize);
        let Some(capacity) = capacity else {
            return Err(Error::TooLarge {
                what: "max_pages_per_seq * page_size",
                value: max_pages_per_seq.saturating_mul(page_size),
                limit: i32::MAX as usize,
            });
        };
        if num_pages > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "num_pages",
                value: num_pages,
                limit: i32::MAX as usize,
            });
        }
        let mut max_seqlen_k = 0;
        for (b, &len) in seqlens_k.iter().enumerate() {
            if len < 0 || len as usize > capacity {
                return bad(format!(
                    "seqlens_k[{b}] = {len} is outside 0..={capacity} (max_pages_per_seq x page_size)"
                ));
            }
            let used_pages = (len as usize).div_ceil(page_size);
            let row = &block_table[b * max_pages_per_seq..b * max_pages_per_seq + used_pages];
            if let Some((i, &page)) = row.iter().enumerate().find(|&(_, &p)| p < 0 || p as usize >= num_pages) {
                return bad(format!(
                    "block_table[{b}][{i}] = {page} is outside 0..{num_pages} (sequence {b} uses {used_pages} pages)"
                ));
            }
            max_seqlen_k = max_seqlen_k.max(len as usize);
        }
        let up = |v: &[i32], what: &'static str| stream.clone_htod(v).map_err(Error::driver(what));
        Ok(PagedKv {
            block_table: up(block_table, "uploading the block table")?,
            seqlens_k: up(seqlens_k, "uploading seqlens_k")?,
            batch,
            max_pages_per_seq,
            page_size,
            num_pages,
            max_seqlen_k,
            cu_q: None,
        })
    }

    /// Varlen queries over this cache: sequence `b`'s queries are rows `cu_seqlens_q[b] ..
    /// cu_seqlens_q[b + 1]` of packed `q` / `out` tensors ([`Layout::varlen`]`(total_q, heads,
    /// head_dim)`), and its LSE is `(heads, total_q)`, as in [`crate::flash_fwd_varlen`]
    /// (chunked prefill of several sequences of different lengths against their caches, vLLM
    /// style). `cu_seqlens_q` is int32, `batch + 1` entries, starting at 0, non-decreasing;
    /// checked here (typed [`Error::InvalidSeqlens`]) and uploaded.
    pub fn with_cu_seqlens_q(mut self, stream: &Arc<CudaStream>, cu_seqlens_q: &[i32]) -> Result<Self> {
        let max_q = crate::varlen::check_cu("cu_seqlens_q", cu_seqlens_q)?;
        if cu_seqlens_q.len() != self.batch + 1 {
            return Err(Error::InvalidSeqlens(format!(
                "cu_seqlens_q has {} entries for a batch of {} sequences (expected batch + 1)",
                cu_seqlens_q.len(),
                self.batch
            )));
        }
        let total = cu_seqlens_q[self.batch] as usize;
        let dev = stream
            .clone_htod(cu_seqlens_q)
            .map_err(Error::driver("uploading cu_seqlens_q"))?;
        self.cu_q = Some((dev, max_q, total));
        Ok(self)
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Slots per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool the table indexes.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Entries per block-table row.
    pub fn max_pages_per_seq(&self) -> usize {
        self.max_pages_per_seq
    }

    /// The longest sequence's key count.
    pub fn max_seqlen_k(&self) -> usize {
        self.max_seqlen_k
    }
}

/// Attention forward over a paged KV cache: dense queries `t.q` `(batch, seqlen_q, heads,
/// head_dim)`, K and V pools `t.k` / `t.v` `(num_pages, page_size, heads_k, head_dim)` addressed
/// through `paged` (see the module docs). Writes `t.out` (like `q`) and `t.lse` (`(batch, heads,
/// seqlen_q)`) when given. Everything is checked first; on error nothing is launched.
///
/// `opts.kernel_override.variant` indexes [`crate::CellImage::paged_kernels`].
pub fn flash_fwd_paged<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    paged: &PagedKv,
    opts: &FwdOptions<'_>,
) -> Result<FwdInfo> {
    runtime::ensure_driver()?;
    // A decode step's GQA heads as query rows (see `swap_decode_groups`); dense queries only.
    let (t, opts) = match paged.cu_q {
        None => crate::fwd::swap_decode_groups(t, opts),
        Some(_) => (t, *opts),
    };
    let opts = &opts;
    let FwdTensors { q, k, v, out, lse } = t;
    let d = q.layout.head_dim;
    // The pool: (num_pages, page_size, heads_k, d), v like k.
    for (name, l) in [("k", &k.layout), ("v", &v.layout)] {
        if (l.batch, l.seqlen) != (paged.num_pages, paged.page_size) {
            return Err(Error::ShapeMismatch(format!(
                "paged {name} is ({}, {}, {}, {}) but the block table has {} pages of {} slots",
                l.batch, l.seqlen, l.heads, l.head_dim, paged.num_pages, paged.page_size
            )));
        }
    }
    let capacity = paged.max_pages_per_seq * paged.page_size;
    // Dense queries: one batch entry per sequence; varlen: (1, total_q) packed rows.
    let q_batch = match paged.cu_q {
        None => paged.batch,
        Some((_, _, total)) => {
            if q.layout.seqlen != total {
                return Err(Error::ShapeMismatch(format!(
                    "varlen q has {} rows but cu_seqlens_q says {total}",
                    q.layout.seqlen
                )));
            }
            1
        }
    };
    if q.layout.batch != q_batch {
        return Err(Error::ShapeMismatch(format!(
            "batch of q ({}) should be {q_batch} ({})",
            q.layout.batch,
            if paged.cu_q.is_some() {
                "varlen tensors are Layout::varlen(total_q, heads, head_dim)"
            } else {
                "the block table's batch"
            }
        )));
    }
    // Every other rule of the dense forward, on the sequences as the kernel sees them: `batch`
    // sequences of up to max_pages_per_seq * page_size keys.
    let logical = |l: &Layout| Layout::contiguous(q_batch, capacity, l.heads, l.head_dim);
    let mut dims: Dims = check_shapes(
        &q.layout,
        &logical(&k.layout),
        &logical(&v.layout),
        &out.layout,
        None,
        Impl::Flash,
    )?;
    dims.seqlen_k = paged.max_seqlen_k;
    if let Some((_, max_q, total)) = paged.cu_q {
        dims.batch = paged.batch;
        dims.seqlen_q = max_q;
        dims.total_q = total;
    }
    debug_assert!(HEAD_DIMS.contains(&(d as u32)));
    let prep = prepare_options(opts, &dims, None, stream)?;

    let lse_len = dims.heads * dims.total_q;
    check_fwd_buffers(stream, &q, &k, &v, &out, lse.as_deref(), lse_len)?;
    check_device("block table", paged.block_table.stream(), stream)?;

    // Kernel: the key says `paged`, which only the sm80 family serves (routing is visible).
    let info = runtime::device_info(stream)?;
    let mut key = prep.dispatch_key(info.arch, T::DTYPE, &dims, false);
    key.paged = true;
    key.validate_paged()?;
    let ov = opts.kernel_override;
    let kref = match ov.family {
        Some(family) => DISPATCH_TABLE.lookup_family(&key, Direction::Fwd, family)?,
        None => DISPATCH_TABLE.lookup(&key)?,
    };
    let smem_limit = ov
        .smem_limit
        .map_or(info.max_smem_optin, |l| l.min(info.max_smem_optin));
    // Short query blocks (decode steps) prefer the cell's short-query tile where it has one.
    let short = crate::cells::sm80_fwd_short_q_variant(d as u32, dims.seqlen_q);
    let kernels = kref.image.paged_kernels;
    let preferred = ov
        .variant
        .is_none()
        .then_some(short)
        .flatten()
        .and_then(|i| kernel_with_tile(kernels, crate::cells::sm80_fwd_paged_tiles(d as u32).get(i), smem_limit));
    let entry = match preferred {
        Some(e) => e,
        None => choose_tile_in(kernels, kref.key(), "paged ", smem_limit, ov.variant)?,
    };
    let n_splits = plan_split(&kref, entry, opts, &info, &dims, paged.cu_q.is_some())?;
    let jit_ptx = uses_ptx(&kref, ov.force_ptx)?;
    let geom = Geometry {
        grid: (
            dims.seqlen_q.div_ceil(entry.tile.block_m as usize) as u32,
            dims.heads as u32,
            u32::try_from(dims.batch * n_splits).unwrap_or(u32::MAX),
        ),
        block: entry.tile.threads(),
        smem_bytes: entry.smem_bytes,
    };
    let function = runtime::function(stream, kref.index, jit_ptx, entry.symbol, entry.smem_bytes)?;

    // Device pointers, held with their guards until the launch is enqueued.
    let ptrs = Pointers::take(stream, &q, &k, &v, None, &prep);
    let (table_ptr, _g_table) = paged.block_table.device_ptr(stream);
    let (seqlens_ptr, _g_seqlens) = paged.seqlens_k.device_ptr(stream);
    let out_len = out.data.len();
    let (o_ptr, _g_o) = out.data.device_ptr_mut(stream);
    let (lse_ptr, _g_lse) = match lse {
        Some(l) => {
            let (p, g) = l.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    check_fwd_addresses::<T>(
        [
            (ptrs.q, &q.layout, q.data.len()),
            (ptrs.k, &k.layout, k.data.len()),
            (ptrs.v, &v.layout, v.data.len()),
        ],
        (o_ptr, &out.layout, out_len),
        (lse_ptr, lse_len),
        std::mem::size_of::<T>(),
        true,
    )?;
    // The split workspace (after every check of the caller's buffers).
    let split = Split::for_call::<T>(stream, &info, n_splits, &dims)?;

    let mut params = fill_params(
        &ptrs,
        &prep,
        &dims,
        if paged.cu_q.is_some() {
            Ragged::Queries
        } else {
            Ragged::None
        },
        [&q.layout, &k.layout, &v.layout, &out.layout],
    );
    // Pool strides: batch stride = page stride, row stride = slot stride (fill_params copied
    // them from the pool layouts); sizes: seqlen_k is the capacity, seqused_k the real counts.
    params.o = o_ptr as *mut c_void;
    params.lse = lse_ptr as *mut f32;
    params.block_table = table_ptr as *const i32;
    params.block_table_batch_stride = paged.max_pages_per_seq as i32;
    params.page_size = paged.page_size as i32;
    params.seqused_k = seqlens_ptr as *const i32;
    params.seqlen_k = capacity as i32;
    params.flags |= FLAG_PAGED;
    let _g_cu_q = paged.cu_q.as_ref().map(|(cu, _, _)| {
        // Varlen queries (`Ragged::Queries` above): sequence b's rows from cu_seqlens_q.
        let (ptr, g) = cu.device_ptr(stream);
        params.cu_seqlens_q = ptr as *const i32;
        g
    });
    if let Some(sp) = &split {
        sp.fill_params(&mut params, stream);
    }
    let mut args = [&mut params as *mut FaParams as *mut c_void];
    // SAFETY: sm80 paged forward kernels take exactly one `FaParams` by value; q, out and lse were
    // checked against their layouts, every key row a sequence uses lies in a page of the checked
    // pool (PagedKv::new), and every guard lives until this returns.
    unsafe { runtime::launch(function, geom, stream, &mut args)? };
    if let Some(sp) = &split {
        sp.combine(stream, &dims, o_ptr, &out.layout, lse_ptr, ptrs.sinks)?;
    }
    Ok(FwdInfo {
        cell: kref.key(),
        symbol: entry.symbol,
        routed_from: kref.routed_from,
        jit_ptx,
        num_splits: n_splits,
    })
}
