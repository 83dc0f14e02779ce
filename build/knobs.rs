//! Build knobs: environment variables and Cargo features that restrict what is compiled.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `FLASHATTN_AOT_ARCHS` | SASS targets: `sm80` (sm80 family for sm_80/86/87/89), `sm90` (sm80 family for H100/H200), `sm90a` (sm90 family) | all |
//! | `FLASHATTN_AOT_HEAD_DIMS` | head dims of the fast kernels, e.g. `64,128` | 64,80,96,128,192,256 |
//! | `FLASHATTN_AOT_DTYPES` | `f16`, `bf16`, `e4m3`, `e5m2` | all |
//! | `FLASHATTN_AOT_DIRECTIONS` | `fwd`, `bwd` | both |
//! | `FLASHATTN_AOT_FAMILIES` | `ref`, `sm80`, `sm90` | all |
//! | `FLASHATTN_AOT_JOBS` | parallel nvcc processes | min(cores, available RAM / 2 GiB) |
//! | `FLASHATTN_AOT_CACHE_DIR` | compiled-image cache; `off` disables it | `$XDG_CACHE_HOME/flashattn-aot` or `~/.cache/flashattn-aot` |
//! | `FLASHATTN_AOT_NVCC_FLAGS` | extra nvcc flags (space separated), part of the cache key | none |
//! | `NVCC`, `CUDA_HOME`, `CUDA_PATH`, `NVCC_CCBIN` | where nvcc (and its host compiler) are | see build/nvcc.rs |
//!
//! Cargo feature `ptx-jit` (default) also embeds compute_80 PTX for the sm80-family and
//! reference cells.

use crate::cells::{Cell, DType, Direction, Family, Target};
use std::path::PathBuf;

pub struct Knobs {
    pub docs_rs: bool,
    pub targets: Vec<Target>,
    pub head_dims: Vec<u32>,
    pub dtypes: Vec<DType>,
    pub directions: Vec<Direction>,
    pub families: Vec<Family>,
    pub jobs: usize,
    pub cache_dir: Option<PathBuf>,
    pub extra_nvcc_flags: Vec<String>,
    pub ptx: bool,
    /// The env var and value that would enable a cell that the knobs exclude, for error messages.
    pub summary: String,
}

fn env(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn list<T>(name: &str, all: &[T], parse: impl Fn(&str) -> Option<T>) -> Vec<T>
where
    T: Copy,
{
    match env(name) {
        None => all.to_vec(),
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| parse(s).unwrap_or_else(|| panic!("{name}: unknown value `{s}`")))
            .collect(),
    }
}

impl Knobs {
    pub fn from_env() -> Knobs {
        let docs_rs = env("DOCS_RS").is_some();
        let targets = list("FLASHATTN_AOT_ARCHS", &Target::ALL, |s| {
            Target::ALL.into_iter().find(|t| t.tag() == s)
        });
        let head_dims = list("FLASHATTN_AOT_HEAD_DIMS", &crate::cells::HEAD_DIMS, |s| {
            s.parse().ok().filter(|d| crate::cells::HEAD_DIMS.contains(d))
        });
        let dtypes = list("FLASHATTN_AOT_DTYPES", &DType::ALL, DType::from_tag);
        let directions = list("FLASHATTN_AOT_DIRECTIONS", &[Direction::Fwd, Direction::Bwd], |s| {
            [Direction::Fwd, Direction::Bwd].into_iter().find(|d| d.tag() == s)
        });
        let all_families = [Family::Reference, Family::Sm80, Family::Sm90, Family::Merge];
        let families = list("FLASHATTN_AOT_FAMILIES", &all_families, |s| {
            all_families.into_iter().find(|f| f.tag() == s)
        });
        let jobs = env("FLASHATTN_AOT_JOBS")
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("FLASHATTN_AOT_JOBS: not a number: `{v}`"))
            })
            .unwrap_or_else(default_jobs)
            .max(1);
        let cache_dir = match env("FLASHATTN_AOT_CACHE_DIR") {
            Some(v) if v == "off" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => default_cache_dir(),
        };
        let extra_nvcc_flags = env("FLASHATTN_AOT_NVCC_FLAGS")
            .map(|v| v.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let ptx = std::env::var("CARGO_FEATURE_PTX_JIT").is_ok();
        let summary = format!(
            "FLASHATTN_AOT_ARCHS={} FLASHATTN_AOT_HEAD_DIMS={} FLASHATTN_AOT_DTYPES={} FLASHATTN_AOT_DIRECTIONS={} FLASHATTN_AOT_FAMILIES={}",
            targets.iter().map(|t| t.tag()).collect::<Vec<_>>().join(","),
            head_dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
            dtypes.iter().map(|d| d.tag()).collect::<Vec<_>>().join(","),
            directions.iter().map(|d| d.tag()).collect::<Vec<_>>().join(","),
            families.iter().map(|f| f.tag()).collect::<Vec<_>>().join(","),
        );
        Knobs {
            docs_rs,
            targets,
            head_dims,
            dtypes,
            directions,
            families,
            jobs,
            cache_dir,
            extra_nvcc_flags,
            ptx,
            summary,
        }
    }

    /// The SASS targets this cell is built for under these knobs.
    pub fn targets_of(&self, cell: &Cell) -> Vec<Target> {
        cell.targets()
            .iter()
            .copied()
            .filter(|t| self.targets.contains(t))
            .collect()
    }

    pub fn allows(&self, cell: &Cell) -> bool {
        self.families.contains(&cell.family)
            && self.dtypes.contains(&cell.dtype)
            && self.directions.contains(&cell.direction)
            && (!cell.family.per_head_dim() || self.head_dims.contains(&cell.head_dim))
            && !self.targets_of(cell).is_empty()
    }
}

/// One nvcc process of these kernels peaks well under 2 GiB; keep the sum under what is free.
fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let free_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| (kb / (1024 * 1024)) as usize);
    match free_gib {
        Some(gib) => cores.min((gib / 2).max(1)),
        None => cores,
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("flashattn-aot"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".cache").join("flashattn-aot"))
}
