//! Fuzzing the parsers every packet and every TLS hello goes through —
//! the packet parser the kernel programs run, and the TLS hello parser —
//! with cargo-fuzz (libFuzzer) on the pinned nightly. Each target starts
//! from the seeds kept in `fuzz/corpus/TARGET/` and grows a working
//! corpus under `target/fuzz-corpus/`; an input that crashes or hangs is
//! kept under `target/fuzz-artifacts/TARGET/` and fails the run.

use std::{ffi::OsString, fs};

use crate::{Result, setup::Project, status, workspace_root};

/// The targets in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 2] = ["packet", "client_hello"];

/// Seconds each target runs in `cargo xtask test`, unless
/// `HANDSHAKE_FUZZ_SECONDS` says otherwise.
pub const SUITE_SECONDS: u64 = 30;

/// `cargo xtask fuzz [TARGET...] [--seconds N]` (default: both, 300 s each).
pub fn command(project: &Project, args: &[OsString]) -> Result {
    let mut seconds = 300;
    let mut targets = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        if arg == "--seconds" {
            seconds = args
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or("--seconds needs a number")?;
        } else if TARGETS.contains(&arg.as_str()) {
            targets.push(arg);
        } else {
            return Err(format!(
                "unknown fuzz target {arg:?} (targets: {TARGETS:?})"
            ));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    for target in &targets {
        run(project, target, seconds)?;
    }
    Ok(())
}

/// Runs one target for `seconds`; a finding is an error naming its file.
pub fn run(project: &Project, target: &str, seconds: u64) -> Result {
    let dirs = project.target_dir();
    let work = dirs.join("fuzz-corpus").join(target);
    let artifacts = dirs.join("fuzz-artifacts").join(target);
    for dir in [&work, &artifacts] {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let seeds = workspace_root().join("fuzz/corpus").join(target);
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    status(
        project
            .cargo_fuzz()
            .args(["run", target, "--target-dir"])
            .arg(dirs.join("fuzz"))
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1"),
    )
    .map_err(|e| {
        format!(
            "fuzz target {target} found an input that fails ({e}); it is in {}",
            artifacts.display()
        )
    })
}
