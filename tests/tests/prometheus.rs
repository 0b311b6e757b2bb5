//! The shipped Prometheus rules and Grafana dashboard against a real
//! Prometheus server (Debian's package) scraping a real daemon under real
//! traffic: TCP handshakes that succeed and that are refused, TLS through
//! the packet hooks. Every rule must load and evaluate without error,
//! every dashboard query must evaluate; how many return data is printed.
//! `promtool` checks the rules, runs their unit tests and lints the
//! daemon's exposition.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use handshake_tests::{
    NetnsPair, TlsServer, echo_clients, echo_server, free_port, http_get, require_root, serial,
    tempdir,
};
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// `promtool ARGS`; panics with what it said when it fails.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    {
        use std::io::Write as _;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_cover_every_alert() {
    let rules = deploy("prometheus/rules.yml");
    let said = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(said.contains("SUCCESS"), "{said}");
    let tests = deploy("prometheus/rules_test.yml");
    let said = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(said.contains("SUCCESS"), "{said}");

    // Every alert has a case where it fires and one where it does not.
    let text = std::fs::read_to_string(&rules).unwrap();
    let alerts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 9, "{alerts:?}");
    let cases = std::fs::read_to_string(&tests).unwrap();
    for alert in &alerts {
        let mut fires = false;
        let mut quiet = false;
        for case in cases.split("- eval_time:").skip(1) {
            if !case.contains(&format!("alertname: {alert}\n")) {
                continue;
            }
            let after = case.split("exp_alerts:").nth(1).unwrap_or("");
            if after.trim_start().starts_with("[]") {
                quiet = true;
            } else if after.contains("exp_labels:") {
                fires = true;
            }
        }
        assert!(
            fires && quiet,
            "{alert}: firing case {fires}, quiet case {quiet}"
        );
    }
    // Each alert says what to do.
    assert_eq!(text.matches("runbook: >-").count(), alerts.len());
}

/// A Prometheus server scraping `target` every second with the shipped
/// rules; stopped on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = tempdir().join(format!("prometheus-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: handshake\n    static_configs:\n      - targets: ['{target}']\n",
                deploy("prometheus/rules.yml").display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's prometheus package)");
        let server = Self { child, addr, dir };
        server.wait("the target to be up", |p| {
            p.api("/api/v1/query", &[("query", "up{job=\"handshake\"} == 1")])["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        });
        server
    }

    /// GET `path` with `params` (URL-encoded by curl); the JSON answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut curl = Command::new("curl");
        curl.args(["-sG", "--max-time", "10"]);
        for (k, v) in params {
            curl.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = curl
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn wait(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "waited 60 s for {what}; Prometheus said:\n{}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Evaluates `query` now: whether it evaluated, and how many series
    /// it returned.
    fn query(&self, query: &str) -> Result<usize, String> {
        let answer = self.api("/api/v1/query", &[("query", query)]);
        if answer["status"] != "success" {
            return Err(format!("{query}: {answer}"));
        }
        Ok(match &answer["data"]["result"] {
            Value::Array(series) => series.len(),
            _ => 1,
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A dashboard query as Grafana would send it with every variable at
/// "All" and a 1-minute rate interval.
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$netns", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}

#[test]
fn a_real_prometheus_evaluates_every_rule_and_dashboard_query() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&[]);

    // The daemon's exposition passes promtool's lint.
    let exposition = http_get(&daemon.metrics_addr, "/metrics").expect("scrape");
    let lint = promtool(&["check", "metrics"], Some(&exposition));
    assert!(lint.trim().is_empty(), "promtool check metrics:\n{lint}");

    let prometheus = Prometheus::start(&daemon.metrics_addr);

    // Traffic while Prometheus scrapes: TCP that succeeds and that is
    // refused, and TLS through the hooks.
    const TLS_PORT: u16 = 4443;
    let tls = TlsServer::start(&pair.server, TLS_PORT, &["-www", "-alpn", "h2,http/1.1"]);
    let server: SocketAddr = format!("{}:8080", NetnsPair::SERVER_V4).parse().unwrap();
    for round in 0..6 {
        let serving = echo_server(&pair.server, server, 20);
        echo_clients(&pair.client, server, 20);
        serving.join().unwrap();
        let refused = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.client,
                "curl",
                "-s",
                "--max-time",
                "2",
            ])
            .arg(format!("http://{}:9/", NetnsPair::SERVER_V4))
            .status()
            .unwrap();
        assert!(!refused.success());
        // TLS 1.3 and 1.2 in turn; s_server -www answers HTTP/1.0 only,
        // whatever ALPN said.
        let version: &[&str] = if round % 2 == 0 {
            &["--tlsv1.3"]
        } else {
            &["--tlsv1.2", "--tls-max", "1.2"]
        };
        let fetched = Command::new("ip")
            .args(["netns", "exec", &pair.client, "curl", "-sk", "--http1.1"])
            .args(version)
            .args(["--max-time", "5", "--resolve"])
            .arg(format!("p.tls.test:{TLS_PORT}:{}", NetnsPair::SERVER_V4))
            .arg(format!("https://p.tls.test:{TLS_PORT}/"))
            .output()
            .unwrap();
        assert!(fetched.status.success(), "curl over TLS: {fetched:?}");
        std::thread::sleep(Duration::from_millis(700));
    }
    // Rates over two scrapes at least, and a rule evaluation after them.
    std::thread::sleep(Duration::from_secs(4));
    drop(tls);
    prometheus.wait("TLS handshakes in Prometheus", |p| {
        p.query("handshake:tls_handshakes:rate5m > 0")
            .is_ok_and(|n| n > 0)
    });

    // Every rule loaded and evaluated without error.
    let groups = prometheus.api("/api/v1/rules", &[]);
    let rules: Vec<&Value> = groups["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let shipped = std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap();
    let expected = shipped.matches("- record: ").count() + shipped.matches("- alert: ").count();
    assert_eq!(rules.len(), expected, "every rule loaded");
    let mut rules_with_data = 0;
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
        let query = rule["query"].as_str().unwrap();
        match prometheus.query(query) {
            Ok(n) if n > 0 => rules_with_data += 1,
            Ok(_) => eprintln!("no data (yet) for {}", rule["name"]),
            Err(error) => panic!("rule {} does not evaluate: {error}", rule["name"]),
        }
    }

    // Every dashboard query evaluates; the variables find values.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/handshake.json")).unwrap())
            .expect("the dashboard is JSON");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"instance") && variables.contains(&"netns"),
        "{variables:?}"
    );
    for (label, metric) in [
        ("instance", "handshake_build_info"),
        ("netns", "handshake_tcp_sockets"),
    ] {
        let values = prometheus.api(
            &format!("/api/v1/label/{label}/values"),
            &[("match[]", metric)],
        );
        assert!(
            values["data"].as_array().is_some_and(|v| !v.is_empty()),
            "variable {label} finds no values: {values}"
        );
    }
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        panels.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
    }
    for panel in &panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                target["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_owned(),
            ));
        }
    }
    let titles = panels
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    for needed in [
        "latency",
        "Listen queues",
        "TIME_WAIT",
        "TLS handshakes",
        "ALPN",
        "Resident memory",
    ] {
        assert!(titles.contains(needed), "no panel on {needed}: {titles}");
    }
    let mut queries_with_data = 0;
    for (title, expr) in &queries {
        match prometheus.query(&as_grafana_sends_it(expr)) {
            Ok(n) if n > 0 => queries_with_data += 1,
            Ok(_) => eprintln!("no data for panel {title:?}: {expr}"),
            Err(error) => panic!("panel {title:?} does not evaluate: {error}"),
        }
    }
    eprintln!(
        "rules: {} of {} return data; dashboard: {} of {} queries return data",
        rules_with_data,
        rules.len(),
        queries_with_data,
        queries.len()
    );
    // What this traffic must show: handshakes, failures, TLS, the daemon.
    for query in [
        "handshake:tcp_handshakes:rate5m{outcome=\"refused\"} > 0",
        "handshake:tcp_handshake_failures:ratio_rate5m > 0",
        "handshake:tcp_handshake_duration_seconds:p99_rate5m > 0",
        "handshake:tls_handshake_duration_seconds:p50_rate5m > 0",
        "handshake_tcp_sockets > 0",
        "process_resident_memory_bytes > 0",
    ] {
        assert!(prometheus.query(query).unwrap() > 0, "no data for {query}");
    }
    drop(daemon);
}
