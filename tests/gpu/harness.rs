//! A minimal libtest-compatible runner for GPU tests that decides at run time whether a test can
//! run. libtest's `#[ignore]` is static; these tests must run automatically where a device is
//! present and be reported as **ignored** (never passed) where none is. Output and exit code follow
//! libtest (`test NAME ... ok|FAILED|ignored`, the `test result:` line, exit 101 on failure), and
//! the usual arguments work: name filters, `--exact`, `--list`, `--skip`; `--ignored` and
//! `--include-ignored` are accepted (GPU tests are not statically ignored).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// One test: a name and a function that returns an error message on failure (or panics).
/// A test body: returns an error message on failure (or panics).
type Body<C> = Box<dyn Fn(&C) -> Result<(), String> + Send + Sync>;

pub struct Test<C> {
    pub name: String,
    pub run: Body<C>,
}

impl<C> Test<C> {
    pub fn new(name: impl Into<String>, run: impl Fn(&C) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Test {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

struct Args {
    threads: usize,
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
}

fn parse_args() -> Args {
    let threads = std::env::var("RUST_TEST_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    let mut a = Args {
        threads,
        filters: Vec::new(),
        skips: Vec::new(),
        exact: false,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--exact" => a.exact = true,
            "--list" => a.list = true,
            "--skip" => a.skips.extend(it.next()),
            "--test-threads" => a.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--format" | "--color" | "-Z" => {
                it.next();
            }
            s if s.starts_with("--") || s == "-q" => {}
            s => a.filters.push(s.to_string()),
        }
    }
    a
}

/// Runs `tests` with the context `ctx` made by `setup`, or reports them all as ignored with the
/// reason `setup` gives when it cannot make one (no driver, no device).
pub fn run<C: Sync>(tests: Vec<Test<C>>, setup: impl FnOnce() -> Result<C, String>) -> ! {
    let args = parse_args();
    let total = tests.len();
    let selected: Vec<Test<C>> = tests
        .into_iter()
        .filter(|t| {
            let hit = |f: &String| {
                if args.exact {
                    &t.name == f
                } else {
                    t.name.contains(f.as_str())
                }
            };
            (args.filters.is_empty() || args.filters.iter().any(hit))
                && !args.skips.iter().any(|s| t.name.contains(s.as_str()))
        })
        .collect();
    if args.list {
        for t in &selected {
            println!("{}: test", t.name);
        }
        std::process::exit(0);
    }
    let filtered = total - selected.len();
    let start = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let ctx = setup();
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let mut failures = Vec::new();
    match &ctx {
        Err(reason) => {
            for t in &selected {
                println!("test {} ... ignored, {reason}", t.name);
                ignored += 1;
            }
        }
        Ok(c) => {
            // Tests share the device and its stream; their host-side references run in parallel.
            let next = AtomicUsize::new(0);
            let results = Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for _ in 0..args.threads.max(1) {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(t) = selected.get(i) else { break };
                            let t0 = Instant::now();
                            let r = catch_unwind(AssertUnwindSafe(|| (t.run)(c)));
                            let secs = t0.elapsed().as_secs_f64();
                            let outcome = match r {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(msg)) => Err(msg),
                                Err(p) => Err(format!(
                                    "panicked: {}",
                                    p.downcast_ref::<String>()
                                        .cloned()
                                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                        .unwrap_or_else(|| "panic".into())
                                )),
                            };
                            let verdict = if outcome.is_ok() { "ok" } else { "FAILED" };
                            println!("test {} ... {verdict} ({secs:.2}s)", t.name);
                            results.lock().unwrap().push((t.name.clone(), outcome));
                        }
                    });
                }
            });
            for (name, outcome) in results.into_inner().unwrap() {
                match outcome {
                    Ok(()) => passed += 1,
                    Err(msg) => {
                        failed += 1;
                        failures.push((name, msg));
                    }
                }
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for (name, msg) in &failures {
            println!("---- {name} ----\n{msg}\n");
        }
        println!("failures:");
        for (name, _) in &failures {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; {filtered} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    std::process::exit(if failed == 0 { 0 } else { 101 });
}
