//! The package `cargo xtask dist` builds (`$HANDSHAKE_DEB`), as an
//! operator meets it: installed with `dpkg -i`, its unit verified and
//! scored by systemd, the installed daemon run as `nobody` with exactly
//! the capabilities the unit grants, and `dpkg --purge` leaving nothing.
//! And the API socket opened to a group, as `--api-group` promises.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use handshake_tests::{
    Daemon, NetnsPair, echo_clients, echo_server, handshake_bin, require_root, serial, sh, skip,
    tcx_programs,
};

const UNIT: &str = "handshake.service";

/// Purges the package when the test ends, passed or failed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "handshake"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "handshake"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

/// The unit as installed (/usr/lib, or /lib without the merged /usr).
fn installed_unit() -> PathBuf {
    ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(|d| Path::new(d).join(UNIT))
        .find(|p| p.exists())
        .expect("the package installs handshake.service")
}

/// The capabilities a unit setting names, as setpriv spells them.
fn unit_capabilities(unit: &str, key: &str) -> BTreeSet<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(str::split_whitespace)
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// `setpriv` running `program` as nobody:nogroup with no other group and
/// exactly `caps` (inheritable, ambient and bounding), as systemd's
/// `AmbientCapabilities=` and `CapabilityBoundingSet=` give them.
fn as_nobody(program: &Path, caps: &BTreeSet<String>, groups: Option<&str>) -> Command {
    let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let list = format!("-all,{}", list.join(","));
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(groups) => cmd.arg(format!("--groups={groups}")),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg(format!("--bounding-set={list}"))
        .arg("--no-new-privs")
        .arg("--")
        .arg(program);
    cmd
}

#[test]
fn the_package_installs_runs_as_nobody_with_the_units_capabilities_and_purges() {
    require_root();
    let _serial = serial();
    let deb = std::env::var_os("HANDSHAKE_DEB")
        .map(PathBuf::from)
        .expect("HANDSHAKE_DEB names the package: run the tests with `cargo xtask test`");
    assert!(
        deb.exists(),
        "{} missing: `cargo xtask dist` builds it",
        deb.display()
    );
    if package_installed() {
        skip("a handshake package is installed on this machine; the test would replace it");
        return;
    }
    let fields = sh(
        "dpkg-deb",
        &["-f", deb.to_str().unwrap(), "Package", "Version", "Depends"],
    );
    assert!(fields.contains("Package: handshake"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );

    let _installed = Installed;
    sh("dpkg", &["-i", deb.to_str().unwrap()]);
    for file in [
        "/usr/sbin/handshake",
        "/etc/default/handshake",
        "/usr/share/bash-completion/completions/handshake",
        "/usr/share/zsh/vendor-completions/_handshake",
        "/usr/share/fish/vendor_completions.d/handshake.fish",
        "/usr/share/doc/handshake/copyright",
        "/usr/share/doc/handshake/LICENSE-MIT",
        "/usr/share/doc/handshake/LICENSE-APACHE",
    ] {
        assert!(Path::new(file).exists(), "the package installs {file}");
    }
    let conffiles = sh("dpkg-query", &["-W", "-f=${Conffiles}", "handshake"]);
    assert!(conffiles.contains("/etc/default/handshake"), "{conffiles}");
    let man = sh("man", &["-w", "8", "handshake"]);
    assert!(man.contains("/usr/share/man/man8/handshake.8"), "{man}");
    let daemon_page = sh("man", &["-P", "cat", "8", "handshake-daemon"]);
    assert!(
        daemon_page.contains("--api-group"),
        "man 8 handshake-daemon:\n{daemon_page}"
    );
    let completion = sh(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/handshake && complete -p handshake",
        ],
    );
    assert!(completion.contains("handshake"), "{completion}");

    let unit_path = installed_unit();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    let security = sh(
        "systemd-analyze",
        &[
            "security",
            "--offline=true",
            "--no-pager",
            unit_path.to_str().unwrap(),
        ],
    );
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("handshake.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    eprintln!("systemd-analyze security: exposure {exposure} for {UNIT}");
    assert!(
        exposure <= 3.0,
        "the unit's exposure is {exposure}:\n{security}"
    );

    let unit = std::fs::read_to_string(&unit_path).expect("read the unit");
    let caps = unit_capabilities(&unit, "AmbientCapabilities");
    assert_eq!(caps, unit_capabilities(&unit, "CapabilityBoundingSet"));
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("DynamicUser=yes"));

    // The installed daemon, as nobody with those capabilities only, hooks
    // an interface inside a namespace (setns) and counts handshakes there.
    let pair = NetnsPair::new();
    let daemon = Daemon::start_command(
        as_nobody(Path::new("/usr/sbin/handshake"), &caps, None),
        &["--netns", &pair.server, "--iface", &pair.server_if],
    );
    let server: SocketAddr = format!("{}:8443", NetnsPair::SERVER_V4).parse().unwrap();
    let serving = echo_server(&pair.server, server, 20);
    echo_clients(&pair.client, server, 20);
    serving.join().expect("echo server");
    std::thread::sleep(std::time::Duration::from_millis(1500));

    let status = daemon.cli_json("status", &[]);
    assert_eq!(status["uid"], 65534, "{status:#}");
    let granted: BTreeSet<String> = status["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| {
            c.as_str()
                .unwrap()
                .trim_start_matches("CAP_")
                .to_lowercase()
        })
        .collect();
    assert_eq!(
        granted, caps,
        "the daemon runs with exactly the unit's capabilities"
    );
    let probes = status["probes"].as_array().expect("probes");
    let failed: Vec<_> = probes.iter().filter(|p| p["attached"] != true).collect();
    assert!(
        failed.is_empty(),
        "probes that did not attach as nobody: {failed:#?}"
    );
    for probe in [
        "tp_sock_state",
        "tp_kfree_skb",
        "iter_tcp_census",
        "tc_in_handshake",
    ] {
        assert!(
            probes.iter().any(|p| p["probe"] == probe),
            "{probe} missing from status: {status:#}"
        );
    }
    let metrics = daemon.scrape();
    let served = metrics.get(
        "handshake_tcp_handshakes_total",
        &[("role", "server"), ("outcome", "established")],
    );
    assert!(served >= 20.0, "20 handshakes served, {served} counted");
    assert!(
        metrics.packets("ingress", "syn") >= 20,
        "the hooks saw the SYNs"
    );
    let states = daemon.cli_json("states", &[]);
    let names: Vec<&str> = states
        .as_array()
        .expect("states")
        .iter()
        .filter_map(|s| s["netns"].as_str())
        .collect();
    assert!(
        names.contains(&pair.server.as_str()) && names.contains(&pair.client.as_str()),
        "the census enters every namespace as nobody: {names:?}"
    );
    let socket = std::fs::metadata(&daemon.api_socket).expect("API socket");
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);
    assert_eq!(socket.uid(), 65534);
    assert!(
        daemon.log().lines().all(|l| !l.contains("ERROR")),
        "{}",
        daemon.log()
    );
    assert!(daemon.stop(libc::SIGTERM).success());
    assert!(
        tcx_programs(&pair.server, &pair.server_if).is_empty(),
        "a stop detaches"
    );

    // What outlives a restart, as the unit keeps it: root prepares the
    // instance for the unprivileged user (ExecStartPre=+), which then
    // pins its maps there; killed and started again, as another process
    // of the same user, its counters go on.
    let instance = format!("hs-test-pkg-{}", std::process::id());
    let prepare = |owner: &str| {
        sh(
            "/usr/sbin/handshake",
            &["prepare", "--instance", &instance, "--owner", owner],
        )
    };
    prepare("nobody");
    let kept_args = [
        "--netns",
        &pair.server,
        "--iface",
        &pair.server_if,
        "--instance",
        &instance,
    ];
    let first = Daemon::start_command(
        as_nobody(Path::new("/usr/sbin/handshake"), &caps, None),
        &kept_args,
    );
    let status = first.cli_json("status", &[]);
    assert_eq!(status["instance"], instance.as_str(), "{status:#}");
    let serving = echo_server(&pair.server, server, 20);
    echo_clients(&pair.client, server, 20);
    serving.join().expect("echo server");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let served_before = first.scrape().established("server");
    assert!(served_before >= 20.0, "{served_before}");
    first.stop(libc::SIGKILL);
    prepare("nobody");
    let second = Daemon::start_command(
        as_nobody(Path::new("/usr/sbin/handshake"), &caps, None),
        &kept_args,
    );
    let serving = echo_server(&pair.server, server, 20);
    echo_clients(&pair.client, server, 20);
    serving.join().expect("echo server");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let served_after = second.scrape().established("server");
    assert!(
        served_after >= served_before + 20.0,
        "counted {served_before} before the SIGKILL and {served_after} after 20 more: {}",
        second.log()
    );
    let status = second.cli_json("status", &[]);
    assert!(
        status["kept"].as_str().unwrap().contains("taken up"),
        "{status:#}"
    );
    second.stop(libc::SIGKILL);
    let pins = Path::new("/sys/fs/bpf/handshake").join(&instance);
    assert!(
        pins.join("link_tp_sock_state").exists(),
        "links stay pinned after SIGKILL"
    );

    sh("dpkg", &["--purge", "handshake"]);
    assert!(!pins.exists(), "a purge removes what is pinned");
    assert!(!package_installed());
    for gone in [
        "/usr/sbin/handshake",
        "/etc/default/handshake",
        unit_path.to_str().unwrap(),
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
}

#[test]
fn the_api_socket_opens_to_a_group_and_only_to_it() {
    require_root();
    let _serial = serial();
    let caps: BTreeSet<String> = ["bpf", "perfmon", "net_admin"].map(String::from).into();
    // nogroup is the daemon's own group here: a group it is a member of.
    let daemon = Daemon::start_command(
        as_nobody(&handshake_bin(), &caps, None),
        &["--api-group", "nogroup"],
    );
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let socket = std::fs::metadata(&daemon.api_socket).expect("API socket");
    assert_eq!(socket.permissions().mode() & 0o777, 0o660);
    let nogroup = sh("getent", &["group", "nogroup"]);
    let gid: u32 = nogroup.split(':').nth(2).unwrap().trim().parse().unwrap();
    assert_eq!(socket.gid(), gid);

    // Another user: a member of the group is answered, a stranger is not.
    let ask = |groups: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=daemon",
                "--regid=daemon",
                &format!("--groups={groups}"),
            ])
            .arg("--")
            .arg(handshake_bin())
            .args(["status", "--json", "--api-socket"])
            .arg(&daemon.api_socket)
            .output()
            .expect("setpriv")
    };
    let member = ask(&gid.to_string());
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    let stranger = ask("daemon");
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success() && said.contains("not allowed") && said.contains("--api-group"),
        "{said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    drop(daemon);

    // A group the daemon is not in, and one that does not exist: one line each.
    for (group, expect) in [
        ("adm", "must be a member"),
        ("no-such-group-17", "no such group"),
    ] {
        let out = as_nobody(&handshake_bin(), &caps, None)
            .args([
                "daemon",
                "--metrics-addr",
                "127.0.0.1:0",
                "--api-group",
                group,
            ])
            .arg("--api-socket")
            .arg(std::env::temp_dir().join(format!("handshake-group-{group}.sock")))
            .output()
            .expect("run the daemon");
        let said = String::from_utf8_lossy(&out.stderr);
        let last = said.trim().lines().last().unwrap_or("");
        assert!(
            !out.status.success() && last.contains(expect),
            "--api-group {group}: {said}"
        );
    }
}
