//! `cargo xtask`: set-up, build, run, test and bench for handshake.
//!
//! xtask is built by whatever stable toolchain the machine has (1.85 or
//! newer) and uses only `std`, because its first job is to install the
//! pinned toolchains everything else is built with.

mod bench;
mod dist;
mod fuzz;
mod setup;

use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

const USAGE: &str = "\
usage: cargo xtask <command>

  setup            install what the project needs (toolchains, rust-src,
                   bpf-linker, Debian packages); quick when all is there
  build            setup, then a release build of the handshake binary
  run [-- ARGS]    setup, build, then run `handshake ARGS` (default: `daemon`)
  dist             setup, build, then the Debian package and a tarball in
                   target/dist/: the binary, systemd unit, man pages,
                   completions, default configuration and licences
  test [-- ARGS]   setup, rustfmt and clippy checks, then every test: unit,
                   BPF_PROG_TEST_RUN and network-namespace tests (ARGS go
                   to `cargo test`); every test binary runs even after a
                   failure, and tests that could not run here are listed
                   and counted as skipped, not passed
  fuzz [-- TARGET... [--seconds N]]
                   setup, then each fuzz target (packet, client_hello)
                   for N seconds (default 300); the suite runs each for
                   30 s (HANDSHAKE_FUZZ_SECONDS)
  bench [-- WHICH] setup, build, then the benchmarks (docs/BENCHMARKS.md);
                   WHICH is `xdp`, `fingerprint`, `churn`, `census`,
                   `tls`, `forecast` or `all` (default)
";

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    let command = args.next().and_then(|c| c.into_string().ok());
    let rest: Vec<OsString> = args.skip_while(|a| a == "--").collect();
    let result = match command.as_deref() {
        Some("setup") => setup::Project::locate().and_then(|p| p.setup(setup::Needs::Test)),
        Some("build") => setup::Project::locate().and_then(|p| build(&p)),
        Some("run") => setup::Project::locate().and_then(|p| run(&p, &rest)),
        Some("dist") => setup::Project::locate().and_then(|p| {
            p.setup(setup::Needs::Dist)?;
            dist::dist(&p).map(|_| ())
        }),
        Some("test") => setup::Project::locate().and_then(|p| test(&p, &rest)),
        Some("fuzz") => setup::Project::locate().and_then(|p| {
            p.setup(setup::Needs::Fuzz)?;
            fuzz::command(&p, &rest)
        }),
        Some("bench") => setup::Project::locate().and_then(|p| bench::run(&p, &rest)),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, String>;

/// Runs a command to completion; a non-zero exit is an error naming it.
pub fn status(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn build(project: &setup::Project) -> Result {
    project.setup(setup::Needs::Run)?;
    release(project)
}

/// The release build of the handshake binary (the eBPF object embedded).
pub fn release(project: &setup::Project) -> Result {
    status(project.cargo().args([
        "build",
        "--release",
        "--package",
        "handshake-user",
        "--bin",
        "handshake",
    ]))
}

fn run(project: &setup::Project, args: &[OsString]) -> Result {
    build(project)?;
    let binary = project.target_dir().join("release/handshake");
    let args: Vec<OsString> = if args.is_empty() {
        vec!["daemon".into()]
    } else {
        args.to_vec()
    };
    let code = Command::new(&binary)
        .args(&args)
        .status()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    if code.success() {
        Ok(())
    } else {
        // The daemon already said why; don't repeat it.
        std::process::exit(code.code().unwrap_or(1));
    }
}

fn test(project: &setup::Project, args: &[OsString]) -> Result {
    project.setup(setup::Needs::Test)?;
    status(project.cargo().args(["fmt", "--all", "--check"]))
        .map_err(|e| format!("{e}: run `cargo fmt --all`"))?;
    status(
        project
            .cargo()
            .args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]),
    )?;
    status(
        project
            .cargo()
            .args(["build", "--package", "handshake-user", "--bin", "handshake"]),
    )?;
    let binary = project.target_dir().join("debug/handshake");
    // The package tests install what `dist` builds.
    let package = dist::dist(project)?;
    // Tests that cannot run here (a kernel feature missing) append a line
    // to this file (`handshake_tests::skip`): libtest would count them as
    // passed.
    let skip_log = project.target_dir().join("test-skips.log");
    match std::fs::remove_file(&skip_log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", skip_log.display())),
    }
    let mut cargo = project.cargo();
    cargo.arg("test");
    if !args.iter().any(|a| a == "--no-fail-fast") {
        // Every test binary runs, so one failure hides no other.
        cargo.arg("--no-fail-fast");
    }
    cargo
        .args(args)
        .env("HANDSHAKE_BIN", binary)
        .env("HANDSHAKE_DEB", package)
        .env("HANDSHAKE_SKIP_LOG", &skip_log)
        .stdout(Stdio::piped());
    let shown = format!("{cargo:?}");
    let mut child = cargo
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    // Pass libtest's output through and add up its result lines, so the run
    // ends on one total.
    let mut totals = [0u64; 3];
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.map_err(|e| format!("reading test output: {e}"))?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for (total, word) in totals.iter_mut().zip(["passed", "failed", "ignored"]) {
                *total += count_before(result, word);
            }
        }
    }
    let code = child
        .wait()
        .map_err(|e| format!("waiting for {shown}: {e}"))?;
    // Each fuzz target runs for a bounded time and counts as one test.
    let seconds = match env::var("HANDSHAKE_FUZZ_SECONDS") {
        Ok(s) => s
            .parse()
            .map_err(|_| format!("HANDSHAKE_FUZZ_SECONDS={s:?} is not a number"))?,
        Err(_) => fuzz::SUITE_SECONDS,
    };
    let mut fuzz_failures = Vec::new();
    for target in fuzz::TARGETS {
        match fuzz::run(project, target, seconds) {
            Ok(()) => totals[0] += 1,
            Err(e) => {
                eprintln!("xtask: {e}");
                totals[1] += 1;
                fuzz_failures.push(target);
            }
        }
    }
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let skipped = skips.lines().count() as u64;
    for line in skips.lines() {
        println!("SKIPPED {line}");
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals[0].saturating_sub(skipped),
        totals[1],
        totals[2] + skipped
    );
    if !code.success() {
        return Err(format!("{shown} failed ({code})"));
    }
    if !fuzz_failures.is_empty() {
        return Err(format!(
            "fuzz targets {fuzz_failures:?} found failing inputs"
        ));
    }
    Ok(())
}

/// In "ok. 14 passed; 0 failed; ...", the number before `word`.
fn count_before(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            let mut words = part.split_whitespace().rev();
            (words.next()? == word).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}
