//! Compiles the whitelisted kernel cells with nvcc and embeds them.
//!
//! Steps, each a helper in `build/`:
//! 1. read the knobs (`build/knobs.rs`): archs, head dims, dtypes, directions, families, jobs,
//!    cache directory; every env var read is declared with `rerun-if-env-changed`;
//! 2. enumerate the cells from the one whitelist shared with the library (`src/cells.rs`) and keep
//!    those the knobs allow;
//! 3. find nvcc (`build/nvcc.rs`) and compile each cell's generated translation unit into a fatbin
//!    (and a compute_80 PTX image with the `ptx-jit` feature), in parallel, through a content-hash
//!    cache that survives `cargo clean` (`build/cache.rs`);
//! 4. write `kernels.rs` (aligned embedded images and a `phf::Map` from cell key to image) and
//!    `manifest.tsv` into `OUT_DIR` (`build/codegen.rs`).
//!
//! `DOCS_RS` short-circuits to an empty table. A failing nvcc stops the build with the full command
//! line, stdout and stderr.

#[path = "src/cells.rs"]
#[allow(dead_code)]
mod cells;

#[path = "build/cache.rs"]
mod cache;
#[path = "build/codegen.rs"]
mod codegen;
#[path = "build/knobs.rs"]
mod knobs;
#[path = "build/nvcc.rs"]
mod nvcc;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let csrc = manifest_dir.join("csrc");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=src/cells.rs");
    println!("cargo:rerun-if-changed=csrc");

    // The params layout probe: csrc/common/params.h compiled by the host C compiler, so the Rust
    // mirror (src/params.rs) is checked against what a C compiler makes of the header (nvcc's
    // device layout equals its host compiler's for this plain struct).
    cc::Build::new()
        .file(csrc.join("common/params_layout.c"))
        .include(&csrc)
        .compile("fa_params_layout");

    let knobs = knobs::Knobs::from_env();
    if knobs.docs_rs {
        codegen::write(&out_dir, &[], &knobs);
        return;
    }

    let cells: Vec<cells::Cell> = cells::whitelist().into_iter().filter(|c| knobs.allows(c)).collect();
    let nvcc = nvcc::Nvcc::find(&knobs).unwrap_or_else(|msg| panic!("{msg}"));
    let jobs = nvcc::plan_jobs(&cells, &knobs, &csrc, &out_dir, &nvcc);
    let built = nvcc::run_jobs(jobs, &knobs, &nvcc);
    codegen::write(&out_dir, &built, &knobs);
}
