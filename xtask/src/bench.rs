//! Benchmarks; see docs/BENCHMARKS.md for the method and figures.

use std::ffi::OsString;

use crate::{Result, setup::Project, status};

pub fn run(project: &Project, args: &[OsString]) -> Result {
    project.setup(crate::setup::Needs::Bench)?;
    status(project.cargo().args([
        "build",
        "--release",
        "--package",
        "handshake-user",
        "--bin",
        "handshake",
    ]))?;
    status(
        project
            .cargo()
            .args(["run", "--release", "--package", "handshake-tests"])
            .args(["--bin", "handshake-bench", "--"])
            .args(args)
            .env(
                "HANDSHAKE_BIN",
                project.target_dir().join("release/handshake"),
            ),
    )
}
