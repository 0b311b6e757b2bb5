//! Benchmarks; see docs/BENCHMARKS.md for the method and figures.

use crate::{Result, setup::Project, status};

pub fn run(project: &Project) -> Result {
    project.setup(crate::setup::Needs::Test)?;
    status(project.cargo().args([
        "run",
        "--release",
        "--package",
        "handshake-tests",
        "--bin",
        "handshake-bench",
    ]))
}
