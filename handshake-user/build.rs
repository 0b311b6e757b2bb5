//! Builds the kernel programs with the pinned nightly (aya-build) so the
//! daemon can embed the object. The nightly's name lives in the workspace
//! Cargo.toml, `[workspace.metadata.toolchains]`, and nowhere else.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("handshake-user has no parent directory")?;
    let manifest = workspace.join("Cargo.toml");
    println!("cargo::rerun-if-changed={}", manifest.display());
    let common = workspace.join("handshake-common");
    println!("cargo::rerun-if-changed={}", common.display());

    let text =
        fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let nightly = text
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "ebpf-nightly").then(|| value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("no ebpf-nightly in {}", manifest.display()))?;

    let ebpf = workspace.join("handshake-ebpf");
    let ebpf = ebpf.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [Package {
            name: "handshake-ebpf",
            root_dir: ebpf,
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
}
