//! `cargo xtask dist`: a release build, then the man pages and shell
//! completions the binary generates from its own CLI definition, then the
//! Debian package (cargo-deb, from `[package.metadata.deb]` in
//! handshake-user/Cargo.toml) and a tarball of the same files, both in
//! `target/dist/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Result, release, setup::Project, status, workspace_root};

/// Builds both; returns the package's path.
pub fn dist(project: &Project) -> Result<PathBuf> {
    release(project)?;
    let target = project.target_dir();
    let binary = target.join("release/handshake");
    let assets = target.join("release/dist");
    let _ = fs::remove_dir_all(&assets);
    let man = assets.join("man");
    status(Command::new(&binary).arg("manpages").arg(&man))?;
    let completions = assets.join("completions");
    mkdir(&completions)?;
    for (shell, file) in [
        ("bash", "handshake.bash"),
        ("zsh", "_handshake"),
        ("fish", "handshake.fish"),
    ] {
        let out = Command::new(&binary)
            .args(["completions", shell])
            .output()
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            return Err(format!("`handshake completions {shell}` failed"));
        }
        write(&completions.join(file), &out.stdout)?;
    }

    let version = env!("CARGO_PKG_VERSION");
    let out_dir = target.join("dist");
    mkdir(&out_dir)?;
    let deb = out_dir.join(format!("handshake_{version}_amd64.deb"));
    status(
        project
            .cargo()
            .args([
                "deb",
                "--package",
                "handshake-user",
                "--no-build",
                "--output",
            ])
            .arg(&deb),
    )?;

    let tarball = out_dir.join(format!("handshake-{version}-x86_64-linux.tar.gz"));
    let name = format!("handshake-{version}");
    let stage = out_dir.join(&name);
    let _ = fs::remove_dir_all(&stage);
    let root = workspace_root();
    for (from, to) in [
        (binary.clone(), "handshake"),
        (
            root.join("deploy/systemd/handshake.service"),
            "handshake.service",
        ),
        (
            root.join("deploy/systemd/handshake.default"),
            "handshake.default",
        ),
        (root.join("LICENSE-MIT"), "LICENSE-MIT"),
        (root.join("LICENSE-APACHE"), "LICENSE-APACHE"),
        (root.join("README.md"), "README.md"),
    ] {
        copy(&from, &stage.join(to))?;
    }
    for dir in [&man, &completions] {
        for entry in fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            let sub = dir.file_name().expect("a named directory");
            copy(&entry.path(), &stage.join(sub).join(entry.file_name()))?;
        }
    }
    status(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&out_dir)
            .arg(&name),
    )?;
    fs::remove_dir_all(&stage).map_err(|e| format!("removing {}: {e}", stage.display()))?;
    eprintln!("xtask: built {} and {}", deb.display(), tarball.display());
    Ok(deb)
}

fn mkdir(dir: &Path) -> Result {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result {
    fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result {
    if let Some(dir) = to.parent() {
        mkdir(dir)?;
    }
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}
