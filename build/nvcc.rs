//! Finding nvcc, turning cells into nvcc jobs, and running them in parallel.

use crate::cache;
use crate::cells::{Cell, Target, Tile};
use crate::knobs::Knobs;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub struct Nvcc {
    pub path: PathBuf,
    /// `nvcc --version` output: part of every cache key.
    pub version: String,
    /// Host compiler handed to `-ccbin`, if one was chosen.
    pub ccbin: Option<PathBuf>,
}

const INSTALL_HELP: &str = "flashattn-aot needs nvcc (CUDA 12.x or 13.x) to compile its kernels at build time.\n\
Install one of:\n\
  * the CUDA toolkit (https://developer.nvidia.com/cuda-downloads), then set CUDA_HOME or put nvcc on PATH;\n\
  * the pip wheels (no root needed):\n\
      pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85\n\
    (found automatically through `python3`; or set NVCC=<site-packages>/nvidia/cu13/bin/nvcc).\n\
Set DOCS_RS=1 to build without kernels (documentation only).";

impl Nvcc {
    pub fn find(_knobs: &Knobs) -> Result<Nvcc, String> {
        let mut tried = Vec::new();
        for candidate in candidates() {
            tried.push(candidate.display().to_string());
            if !candidate.is_file() {
                continue;
            }
            match Command::new(&candidate).arg("--version").output() {
                Ok(out) if out.status.success() => {
                    let version = String::from_utf8_lossy(&out.stdout).into_owned();
                    println!("cargo:rerun-if-changed={}", candidate.display());
                    return Ok(Nvcc {
                        path: candidate,
                        version,
                        ccbin: host_compiler(),
                    });
                }
                _ => continue,
            }
        }
        Err(format!("{INSTALL_HELP}\nLooked for nvcc at: {}", tried.join(", ")))
    }

    /// The flags every kernel is compiled with (part of the cache key).
    pub fn common_flags(&self, csrc: &Path, knobs: &Knobs) -> Vec<String> {
        let mut flags: Vec<String> = [
            "-std=c++17",
            "-O3",
            "-Xptxas=--warn-on-spills",
            "-Xfatbin=-compress-all",
            "--threads=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.push(format!("-I{}", csrc.display()));
        if let Some(ccbin) = &self.ccbin {
            flags.push(format!("-ccbin={}", ccbin.display()));
        }
        flags.extend(knobs.extra_nvcc_flags.iter().cloned());
        flags
    }
}

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let env = |name: &str| {
        println!("cargo:rerun-if-env-changed={name}");
        std::env::var_os(name).filter(|v| !v.is_empty())
    };
    if let Some(p) = env("NVCC") {
        out.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env(var) {
            out.push(PathBuf::from(p).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env("PATH") {
        for dir in std::env::split_paths(&path) {
            out.push(dir.join("nvcc"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    // Python's nvidia-cuda-nvcc wheel: site-packages/nvidia/cu13/bin (CUDA 13) or
    // site-packages/nvidia/cuda_nvcc/bin (CUDA 12).
    if let Some(venv) = env("VIRTUAL_ENV") {
        out.push(PathBuf::from(venv).join("bin").join("nvcc"));
    }
    for python in ["python3", "python"] {
        let probe = Command::new(python)
            .args([
                "-c",
                "import nvidia, sys; sys.stdout.write('\\n'.join(nvidia.__path__))",
            ])
            .output();
        if let Ok(o) = probe {
            if o.status.success() {
                for dir in String::from_utf8_lossy(&o.stdout).lines() {
                    let dir = PathBuf::from(dir);
                    out.push(dir.join("cu13").join("bin").join("nvcc"));
                    out.push(dir.join("cuda_nvcc").join("bin").join("nvcc"));
                }
                break;
            }
        }
    }
    out
}

/// nvcc needs a host C++ compiler. `NVCC_CCBIN` wins; otherwise the `cc` crate's choice for this
/// target (honouring `CXX`), so nvcc uses the same compiler as the rest of the build.
fn host_compiler() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");
    if let Some(p) = std::env::var_os("NVCC_CCBIN") {
        return Some(PathBuf::from(p));
    }
    let tool = cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .try_get_compiler()
        .ok()?;
    Some(tool.path().to_path_buf())
}

/// One nvcc invocation: one cell's translation unit to a fatbin (plus, optionally, a PTX image).
pub struct Job {
    pub cell: Cell,
    pub tu_path: PathBuf,
    pub args: Vec<String>,
    pub fatbin: PathBuf,
    /// compute_80 PTX wrapped in a compressed fatbin, when the `ptx-jit` feature asks for it.
    pub ptx_fatbin: Option<PathBuf>,
    pub targets: Vec<Target>,
    pub cache_key: String,
    keep_dir: PathBuf,
    /// The cell's deterministic-mode translation unit and its fatbin (`Cell::det_instantiate_macro`).
    pub det: Option<(PathBuf, PathBuf)>,
}

/// What a job produced.
pub struct Built {
    pub cell: Cell,
    pub fatbin: PathBuf,
    pub ptx_fatbin: Option<PathBuf>,
    pub det_fatbin: Option<PathBuf>,
    pub targets: Vec<Target>,
}

/// The flag that adds compute_80 PTX to a unit's nvcc pass (ptx-jit); the deterministic unit's
/// pass leaves it out.
const PTX_GENCODE: &str = "-gencode=arch=compute_80,code=compute_80";

/// The first lines of every translation unit of `cell`: the params block and the family's header.
fn tu_header(cell: &Cell) -> String {
    format!(
        "// Generated by build.rs from src/cells.rs. Do not edit.\n#include \"common/params.h\"\n#include \"{}\"\n",
        cell.source()
    )
}

/// One per-head-dim kernel line: `MACRO(symbol, T, D, BM, BN, W, S, SMEM)`.
fn tile_line(mac: &str, symbol: &str, cell: &Cell, tile: &Tile) -> String {
    format!(
        "{}({}, {}, {}, {}, {}, {}, {}, {})\n",
        mac,
        symbol,
        cell.dtype.cuda_type(),
        cell.head_dim,
        tile.block_m,
        tile.block_n,
        tile.warps,
        tile.stages,
        cell.smem_bytes(tile)
    )
}

/// The translation unit of one cell: the family's header and one macro line per tile variant.
fn translation_unit(cell: &Cell) -> String {
    let mut tu = tu_header(cell);
    for tile in cell.tiles() {
        let symbol = cell.symbol(&tile);
        if !cell.family.per_head_dim() {
            tu.push_str(&format!(
                "{}({}, {})\n",
                cell.instantiate_macro(),
                symbol,
                cell.dtype.cuda_type()
            ));
        } else {
            tu.push_str(&tile_line(cell.instantiate_macro_for(&tile), &symbol, cell, &tile));
        }
    }
    for tile in cell.split_tiles() {
        tu.push_str(&tile_line(
            cell.split_instantiate_macro(),
            &cell.split_symbol(&tile),
            cell,
            &tile,
        ));
    }
    for tile in cell.paged_tiles() {
        tu.push_str(&tile_line(
            cell.paged_instantiate_macro(),
            &cell.paged_symbol(&tile),
            cell,
            &tile,
        ));
    }
    tu
}

/// The deterministic-mode translation unit of a cell that has one: the same header, one line of
/// `Cell::det_instantiate_macro` per tile. A unit of its own, so that its kernels cannot change
/// how ptxas compiles the default ones (perf log run 14, call 6).
fn det_translation_unit(cell: &Cell) -> Option<String> {
    let mac = cell.det_instantiate_macro()?;
    let mut tu = tu_header(cell);
    for tile in cell.tiles() {
        tu.push_str(&tile_line(mac, &cell.symbol(&tile), cell, &tile));
    }
    Some(tu)
}

pub fn plan_jobs(cells: &[Cell], knobs: &Knobs, csrc: &Path, out_dir: &Path, nvcc: &Nvcc) -> Vec<Job> {
    let tu_dir = out_dir.join("tu");
    let img_dir = out_dir.join("images");
    std::fs::create_dir_all(&tu_dir).expect("create OUT_DIR/tu");
    std::fs::create_dir_all(&img_dir).expect("create OUT_DIR/images");
    let csrc_digest = cache::tree_digest(csrc);
    let common = nvcc.common_flags(csrc, knobs);
    cells
        .iter()
        .map(|cell| {
            let key = cell.key();
            let tu = translation_unit(cell);
            let tu_path = tu_dir.join(format!("{key}.cu"));
            // Rewrite only on change so nvcc's inputs keep their timestamps.
            if std::fs::read_to_string(&tu_path).ok().as_deref() != Some(tu.as_str()) {
                std::fs::write(&tu_path, &tu).expect("write translation unit");
            }
            let det_tu = det_translation_unit(cell);
            let det = det_tu.as_ref().map(|text| {
                let path = tu_dir.join(format!("{key}.det.cu"));
                if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    std::fs::write(&path, text).expect("write translation unit");
                }
                (path, img_dir.join(format!("{key}.det.fatbin")))
            });
            let targets = knobs.targets_of(cell);
            let want_ptx = knobs.ptx && cell.has_ptx();
            let mut args = common.clone();
            args.push("-fatbin".into());
            for t in &targets {
                args.push(format!("-gencode={}", t.gencode()));
            }
            if want_ptx && !targets.contains(&Target::Sm80) {
                // The compute_80 PTX comes from the sm_80 pass's intermediate (--keep); make sure
                // there is one even when sm_80 SASS is not wanted.
                args.push(PTX_GENCODE.into());
            }
            let cache_key = cache::key(&[
                tu.as_bytes(),
                det_tu.as_deref().unwrap_or("").as_bytes(),
                csrc_digest.as_bytes(),
                args.join(" ").as_bytes(),
                nvcc.version.as_bytes(),
                if want_ptx { b"ptx" } else { b"noptx" },
            ]);
            Job {
                cell: *cell,
                tu_path,
                args,
                fatbin: img_dir.join(format!("{key}.fatbin")),
                ptx_fatbin: want_ptx.then(|| img_dir.join(format!("{key}.ptx.fatbin"))),
                targets,
                cache_key,
                keep_dir: out_dir.join("keep").join(&key),
                det,
            }
        })
        .collect()
}

fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let line = render(cmd);
    let out = cmd.output().map_err(|e| format!("could not start `{line}`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "nvcc failed ({})\ncommand: {line}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        ));
    }
    Ok(format!("{stdout}{stderr}"))
}

fn compile(job: &Job, nvcc: &Nvcc) -> Result<String, String> {
    let tmp = job.fatbin.with_extension("fatbin.tmp");
    let mut cmd = Command::new(&nvcc.path);
    cmd.args(&job.args).arg("-o").arg(&tmp).arg(&job.tu_path);
    if job.ptx_fatbin.is_some() {
        std::fs::create_dir_all(&job.keep_dir).map_err(|e| e.to_string())?;
        cmd.arg("--keep").arg(format!("--keep-dir={}", job.keep_dir.display()));
    }
    let mut log = run(&mut cmd)?;
    std::fs::rename(&tmp, &job.fatbin).map_err(|e| e.to_string())?;
    if let Some((det_tu, det_fatbin)) = &job.det {
        // The same flags (the PTX of the default kernels comes from the main unit only).
        let det_tmp = det_fatbin.with_extension("fatbin.tmp");
        let mut cmd = Command::new(&nvcc.path);
        cmd.args(job.args.iter().filter(|a| *a != PTX_GENCODE))
            .arg("-o")
            .arg(&det_tmp)
            .arg(det_tu);
        log.push_str(&run(&mut cmd)?);
        std::fs::rename(&det_tmp, det_fatbin).map_err(|e| e.to_string())?;
    }
    if let Some(ptx_fatbin) = &job.ptx_fatbin {
        let stem = job
            .tu_path
            .file_stem()
            .expect("tu has a name")
            .to_string_lossy()
            .into_owned();
        let ptx = job.keep_dir.join(format!("{stem}.compute_80.ptx"));
        let fatbinary = nvcc.path.with_file_name("fatbinary");
        let mut cmd = Command::new(&fatbinary);
        cmd.arg(format!("--create={}", ptx_fatbin.display()))
            .arg("-64")
            .arg("--compress-all")
            .arg(format!("--image3=kind=ptx,sm=80,file={}", ptx.display()));
        log.push_str(&run(&mut cmd)?);
        let _ = std::fs::remove_dir_all(&job.keep_dir);
    }
    Ok(log)
}

/// Runs the jobs on `knobs.jobs` threads, through the cache. Panics with every failure's full
/// command line and output if any job fails.
pub fn run_jobs(jobs: Vec<Job>, knobs: &Knobs, nvcc: &Nvcc) -> Vec<Built> {
    let total = jobs.len();
    let queue = Mutex::new(jobs.into_iter().collect::<VecDeque<_>>());
    let done = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let workers = knobs.jobs.min(total.max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let Some(job) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    let cached = knobs.cache_dir.as_deref().is_some_and(|dir| cache::fetch(dir, &job));
                    if !cached {
                        match compile(&job, nvcc) {
                            Ok(log) => {
                                for line in log.lines().filter(|l| l.contains("warning") || l.contains("spill")) {
                                    println!("cargo:warning={}: {line}", job.cell.key());
                                }
                                if let Some(dir) = knobs.cache_dir.as_deref() {
                                    cache::store(dir, &job);
                                }
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                continue;
                            }
                        }
                    }
                    done.lock().unwrap().push(Built {
                        cell: job.cell,
                        fatbin: job.fatbin,
                        ptx_fatbin: job.ptx_fatbin,
                        det_fatbin: job.det.map(|(_, fatbin)| fatbin),
                        targets: job.targets,
                    });
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!(
            "{} of {total} kernel cells failed to compile:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    let mut built = done.into_inner().unwrap();
    built.sort_by_key(|b| b.cell);
    built
}
