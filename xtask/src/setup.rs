//! Installing what the project needs, idempotently: the pinned stable and
//! nightly toolchains (with rust-src), bpf-linker built against the
//! nightly's own LLVM, and the Debian packages the tests drive. Each step
//! first checks whether its work is already done, so a second run costs
//! well under a second.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{Result, status, workspace_root};

/// The bpf-linker release built for the pinned nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-deb release `cargo xtask dist` packages with.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The cargo-fuzz release `cargo xtask fuzz` (and the suite) runs.
const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// Debian packages the tests and benchmarks use (command → package).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("openssl", "openssl"),
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("tcpreplay", "tcpreplay"),
    ("tshark", "tshark"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("nstat", "iproute2"),
    ("hping3", "hping3"),
    ("python3", "python3"),
    ("tmux", "tmux"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
    ("setpriv", "util-linux"),
    ("man", "man-db"),
    ("dpkg-shlibdeps", "dpkg-dev"),
];

/// PyPI packages the tests use (module → package), installed with pip.
const TEST_PYTHON: &[(&str, &str)] = &[("kubernetes_validate", "kubernetes-validate")];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Building and running the daemon.
    Run,
    /// Also cargo-deb, to build the package.
    Dist,
    /// Also cargo-fuzz.
    Fuzz,
    /// Also the tools the tests drive (the package among them).
    Test,
    /// Also the peers the benchmarks compare against.
    Bench,
}

/// Debian packages only the benchmarks use (command → package).
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("tcpstates", "libbpf-tools"),
    ("prometheus-node-exporter", "prometheus-node-exporter"),
];

pub struct Project {
    root: PathBuf,
    stable: String,
    nightly: String,
}

impl Project {
    pub fn locate() -> Result<Self> {
        let root = workspace_root();
        let manifest = root.join("Cargo.toml");
        let text = fs::read_to_string(&manifest)
            .map_err(|e| format!("reading {}: {e}", manifest.display()))?;
        let key = |name: &str| {
            text.lines()
                .find_map(|line| {
                    let (k, v) = line.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
                })
                .ok_or_else(|| format!("{} has no `{name}` toolchain", manifest.display()))
        };
        Ok(Self {
            stable: key("stable")?,
            nightly: key("ebpf-nightly")?,
            root,
        })
    }

    pub fn target_dir(&self) -> PathBuf {
        env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.root.join("target"))
    }

    /// Where bpf-linker for the pinned nightly lives, outside any checkout
    /// so that fresh clones share it.
    fn linker_root(&self) -> PathBuf {
        tools_root().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{}", self.nightly))
    }

    /// `cargo` of the pinned stable, in the workspace, with bpf-linker on
    /// PATH for the eBPF build.
    pub fn cargo(&self) -> Command {
        let mut cmd = toolchain_cargo(&self.stable);
        cmd.current_dir(&self.root);
        with_path(
            &mut cmd,
            vec![
                self.linker_root().join("bin"),
                tool_root("cargo-deb", CARGO_DEB_VERSION).join("bin"),
            ],
        );
        cmd
    }

    pub fn setup(&self, needs: Needs) -> Result {
        self.toolchain(&self.stable, &["rustfmt", "clippy"])?;
        self.toolchain(&self.nightly, &["rust-src"])?;
        self.bpf_linker()?;
        match needs {
            Needs::Run => {}
            Needs::Dist => {
                self.cargo_tool("cargo-deb", CARGO_DEB_VERSION)?;
                // cargo-deb computes the package's dependencies with it.
                debian_packages(&[("dpkg-shlibdeps", "dpkg-dev")])?;
            }
            Needs::Fuzz => self.cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION)?,
            Needs::Test => {
                self.cargo_tool("cargo-deb", CARGO_DEB_VERSION)?;
                self.cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION)?;
                debian_packages(TEST_PACKAGES)?;
                python_packages(TEST_PYTHON)?;
            }
            Needs::Bench => {
                debian_packages(&[TEST_PACKAGES, BENCH_PACKAGES].concat())?;
            }
        }
        Ok(())
    }

    /// `cargo` of the pinned nightly with cargo-fuzz on PATH, in the
    /// fuzz crate (outside the workspace).
    pub fn cargo_fuzz(&self) -> Command {
        let mut cmd = toolchain_cargo(&self.nightly);
        cmd.arg("fuzz").current_dir(self.root.join("fuzz"));
        with_path(
            &mut cmd,
            vec![tool_root("cargo-fuzz", CARGO_FUZZ_VERSION).join("bin")],
        );
        cmd
    }

    /// A cargo subcommand (cargo-deb, cargo-fuzz), pinned, beside
    /// bpf-linker.
    fn cargo_tool(&self, name: &str, version: &str) -> Result {
        let root = tool_root(name, version);
        if answers_version(&root.join("bin").join(name)) {
            return Ok(());
        }
        eprintln!("xtask: building {name} {version} (a few minutes)");
        status(
            Command::new("rustup")
                .args(["run", &self.stable, "cargo", "install", name])
                .args(["--version", version, "--locked", "--force"])
                .arg("--root")
                .arg(&root)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("RUSTC"),
        )
    }

    fn toolchain(&self, name: &str, components: &[&str]) -> Result {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain", name])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if let Some(list) = installed {
            if components.iter().all(|c| {
                list.lines()
                    .any(|l| l.starts_with(&format!("{c}-")) || l == *c)
            }) {
                return Ok(());
            }
        }
        eprintln!("xtask: installing toolchain {name} with {components:?}");
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", name, "--profile", "minimal"]);
        for c in components {
            cmd.args(["--component", c]);
        }
        status(&mut cmd)
    }

    /// bpf-linker must link against the very libLLVM of the nightly that
    /// compiles the eBPF crate (another LLVM fails with "Invalid record").
    fn bpf_linker(&self) -> Result {
        let root = self.linker_root();
        if answers_version(&root.join("bin/bpf-linker")) {
            return Ok(());
        }

        let sysroot = capture(Command::new("rustup").args([
            "run",
            &self.nightly,
            "rustc",
            "--print",
            "sysroot",
        ]))?;
        let version = capture(Command::new("rustup").args(["run", &self.nightly, "rustc", "-vV"]))?;
        let major = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .ok_or_else(|| format!("{} prints no LLVM version", self.nightly))?
            .to_owned();
        let nightly_lib = Path::new(sysroot.trim()).join("lib");
        let libllvm = fs::read_dir(&nightly_lib)
            .map_err(|e| format!("reading {}: {e}", nightly_lib.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so."))
            .ok_or_else(|| format!("no libLLVM.so.* in {}", nightly_lib.display()))?;

        // A prefix whose lib/ offers the nightly's libLLVM under the names
        // llvm-sys looks for; bpf-linker keeps it as its rpath.
        let prefix = root.join("llvm");
        let prefix_lib = prefix.join("lib");
        fs::create_dir_all(&prefix_lib)
            .map_err(|e| format!("creating {}: {e}", prefix_lib.display()))?;
        for name in ["libLLVM.so", libllvm.as_str()] {
            let link = prefix_lib.join(name);
            let _ = fs::remove_file(&link);
            symlink(nightly_lib.join(&libllvm), &link)
                .map_err(|e| format!("linking {}: {e}", link.display()))?;
        }

        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} of {} (about a minute)",
            self.nightly
        );
        status(
            Command::new("rustup")
                .args(["run", &self.stable, "cargo", "install", "bpf-linker"])
                .args(["--version", BPF_LINKER_VERSION, "--locked", "--force"])
                .args([
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{major}"),
                ])
                .arg("--root")
                .arg(&root)
                .env("LLVM_PREFIX", &prefix)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("RUSTC"),
        )
    }
}

/// Where the project's own tools are installed, outside any checkout so
/// that fresh clones share them.
fn tools_root() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("handshake")
}

/// `cargo` of `toolchain`, through rustup.
fn toolchain_cargo(toolchain: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo"])
        // Set by the outer cargo/rustup for the machine's default
        // toolchain; the pinned one must win.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO");
    cmd
}

/// Whether the tool at `path` runs and answers `--version`.
fn answers_version(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cmd` with `dirs` ahead of the inherited PATH.
fn with_path(cmd: &mut Command, dirs: Vec<PathBuf>) {
    let mut path = dirs;
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    cmd.env(
        "PATH",
        env::join_paths(path).expect("PATH entries without ':'"),
    );
}

fn tool_root(name: &str, version: &str) -> PathBuf {
    tools_root().join(format!("{name}-{version}"))
}

/// PyPI packages, by the module each provides.
fn python_packages(packages: &[(&str, &str)]) -> Result {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing PyPI packages {missing:?}");
    status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing)
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .stdin(Stdio::null()),
    )
}

fn capture(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(command: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(command).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(command).is_file())
}

fn debian_packages(packages: &[(&str, &str)]) -> Result {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = capture(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0");
    if !is_root {
        return Err(format!(
            "missing Debian packages {missing:?}; run `sudo apt-get install -y {}` or run xtask as root",
            missing.join(" ")
        ));
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    };
    status(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    status(&mut install)
}
