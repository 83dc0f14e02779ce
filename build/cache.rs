//! Content-addressed cache of compiled images, outside `target/` so it survives `cargo clean`.
//!
//! Key = hash of (generated translation unit, every byte under `csrc/`, nvcc flags, nvcc version,
//! PTX on/off). Entries are written to a temporary name and renamed, so concurrent builds never
//! read a half-written image.

use crate::nvcc::Job;
use std::path::Path;

/// FNV-1a 64 over `parts` with two different offset bases, printed as 32 hex digits. Collisions
/// are not a security concern here: a stale hit needs two different inputs with equal 128-bit
/// hashes.
pub fn key(parts: &[&[u8]]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for part in parts {
        for &byte in part.iter().chain((part.len() as u64).to_le_bytes().iter()) {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{a:016x}{b:016x}")
}

/// Hash of every file under `dir` (paths and contents, in sorted order).
pub fn tree_digest(dir: &Path) -> String {
    let mut files = Vec::new();
    collect(dir, dir, &mut files);
    files.sort();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for rel in &files {
        parts.push(rel.as_bytes().to_vec());
        parts.push(std::fs::read(dir.join(rel)).unwrap_or_default());
    }
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    key(&refs)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// Copies a cached image into place. Returns false on a miss (or any I/O trouble).
pub fn fetch(dir: &Path, job: &Job) -> bool {
    let fat = dir.join(format!("{}.fatbin", job.cache_key));
    let ptx = dir.join(format!("{}.ptx.fatbin", job.cache_key));
    let det = dir.join(format!("{}.det.fatbin", job.cache_key));
    if !fat.is_file() || (job.ptx_fatbin.is_some() && !ptx.is_file()) || (job.det.is_some() && !det.is_file()) {
        return false;
    }
    if std::fs::copy(&fat, &job.fatbin).is_err() {
        return false;
    }
    if let Some((_, dst)) = &job.det {
        if std::fs::copy(&det, dst).is_err() {
            return false;
        }
    }
    match &job.ptx_fatbin {
        Some(dst) => std::fs::copy(&ptx, dst).is_ok(),
        None => true,
    }
}

/// Stores a freshly built image. Failures only cost a future rebuild, so they are ignored.
pub fn store(dir: &Path, job: &Job) {
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let put = |src: &Path, name: String| {
        let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
        if std::fs::copy(src, &tmp).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(name));
        }
    };
    if let Some(ptx) = &job.ptx_fatbin {
        put(ptx, format!("{}.ptx.fatbin", job.cache_key));
    }
    if let Some((_, det)) = &job.det {
        put(det, format!("{}.det.fatbin", job.cache_key));
    }
    put(&job.fatbin, format!("{}.fatbin", job.cache_key));
}
