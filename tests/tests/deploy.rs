//! The Kubernetes manifests and the Containerfile: validated against the
//! Kubernetes API schemas (`kubernetes-validate`, from PyPI), and checked
//! against each other and against what was measured — the DaemonSet grants
//! exactly the systemd unit's capabilities and is not privileged, the
//! Service selects its pods and the ServiceMonitor the Service, every flag
//! it passes is one the daemon takes, and the image's base carries a glibc
//! the release binary can use.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use handshake_tests::handshake_bin;
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every document of every manifest, as JSON (PyYAML reads them).
fn manifests() -> Vec<Value> {
    let script = "import sys, json, yaml\n\
                  print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))";
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn the_manifests_pass_kubernetes_validate() {
    let files: Vec<PathBuf> = ["namespace.yaml", "daemonset.yaml", "service.yaml"]
        .iter()
        .map(|f| deploy(&format!("kubernetes/{f}")))
        .collect();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (PyPI)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate:\n{said}");
    assert_eq!(said.matches(" passed ").count(), files.len(), "{said}");
    eprintln!("{said}");
}

#[test]
fn the_manifests_agree_with_each_other_the_unit_and_the_cli() {
    let docs = manifests();
    let daemonset = kind(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true);
    assert!(labels_match(
        &daemonset["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(
        security["privileged"], false,
        "capabilities, not privileged: true"
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let granted: BTreeSet<String> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let unit = std::fs::read_to_string(deploy("systemd/handshake.service")).unwrap();
    let measured: BTreeSet<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("AmbientCapabilities="))
        .flat_map(str::split_whitespace)
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        granted, measured,
        "the DaemonSet grants the unit's capabilities"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
    }
    for field in ["requests", "limits"] {
        let r = &container["resources"][field];
        assert!(
            r["cpu"].is_string() && r["memory"].is_string(),
            "resources.{field}"
        );
    }
    let read_only: BTreeSet<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["readOnly"] == true)
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for path in ["/sys/kernel/btf", "/host/sys/fs/cgroup"] {
        assert!(
            read_only.contains(path),
            "{path} mounted read-only: {read_only:?}"
        );
    }

    // Every flag the DaemonSet passes is one the daemon takes.
    let help = Command::new(handshake_bin())
        .args(["daemon", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in container["args"].as_array().unwrap().iter().skip(1) {
        let flag = arg.as_str().unwrap().split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")),
            "`handshake daemon` has no {flag}"
        );
    }

    let service = kind(&docs, "Service");
    assert!(labels_match(
        &service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["targetPort"], container["ports"][0]["name"]);
    let monitor = kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], port["name"]);
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    // The job label is the Service's app name: `handshake`, as the rules expect.
    let job_label = monitor["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(service["metadata"]["labels"][job_label], "handshake");
    let namespace = kind(&docs, "Namespace")["metadata"]["name"].clone();
    for doc in [daemonset, service, monitor] {
        assert_eq!(doc["metadata"]["namespace"], namespace);
    }
}

#[test]
fn the_image_base_carries_a_glibc_the_binary_can_use() {
    let containerfile = std::fs::read_to_string(deploy("Containerfile")).unwrap();
    assert!(
        containerfile.contains("FROM gcr.io/distroless/cc-debian12"),
        "{containerfile}"
    );
    // Debian 12's glibc.
    const BASE_GLIBC: (u32, u32) = (2, 36);
    let symbols = Command::new("objdump")
        .arg("-T")
        .arg(handshake_bin())
        .output()
        .unwrap();
    assert!(symbols.status.success());
    let needed = String::from_utf8_lossy(&symbols.stdout)
        .split_whitespace()
        .filter_map(|w| w.trim_matches(['(', ')']).strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("a glibc symbol version");
    assert!(needed <= BASE_GLIBC, "the binary needs glibc {needed:?}");
    let unlinked: Vec<&str> = [
        "ENTRYPOINT [\"/usr/sbin/handshake\"]",
        "COPY handshake /usr/sbin/handshake",
    ]
    .into_iter()
    .filter(|l| !containerfile.contains(l))
    .collect();
    assert!(unlinked.is_empty(), "{unlinked:?}");
}
