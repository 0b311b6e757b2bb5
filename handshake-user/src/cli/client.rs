//! The CLI side of the local API: `handshake conns`, `states`, `tls` and
//! `timewait`. Asks the daemon over its Unix socket ([`Request`]) and
//! prints a table, or JSON with `--json`. Knows the daemon only through
//! `wire`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    cli::{
        ClosesFlags, ConnsFlags, ListenersFlags, StatesFlags, StatusFlags, TimewaitFlags, TlsFlags,
        WhoFlags,
    },
    wire::{
        Attribution, CloseGroupView, ConnView, ListenerView, Request, STATES, SocketView,
        StatesView, StatusView, TimeWaitView, TlsView, error_of, state_by_name, state_name,
    },
};

impl WhoFlags {
    /// Whether a namespace, named `name` with inode `inode`, is the one
    /// `--netns` asks for (any, without it).
    fn netns_matches(&self, name: Option<&str>, inode: Option<u64>) -> bool {
        self.netns.as_deref().is_none_or(|wanted| {
            name == Some(wanted)
                || inode.is_some_and(|i| wanted == i.to_string() || wanted == format!("ns:{i}"))
        })
    }

    /// Whether a workload is the one `--container`, `--pod` and `--unit`
    /// ask for (any, without them). A container matches by a prefix of its
    /// id, as `docker ps` shortens them.
    fn workload_matches(&self, who: &Attribution) -> bool {
        let container = self.container.as_deref().is_none_or(|wanted| {
            !wanted.is_empty()
                && who
                    .container_id
                    .as_deref()
                    .is_some_and(|id| id.starts_with(wanted))
        });
        let pod = self
            .pod
            .as_deref()
            .is_none_or(|wanted| who.pod_uid.as_deref() == Some(wanted));
        let unit = self
            .unit
            .as_deref()
            .is_none_or(|wanted| who.unit.as_deref() == Some(wanted));
        container && pod && unit
    }

    fn asks_workload(&self) -> bool {
        self.container.is_some() || self.pod.is_some() || self.unit.is_some()
    }

    /// Whether a socket or connection is among those asked for.
    fn matches(&self, who: &Attribution) -> bool {
        self.netns_matches(who.netns.as_deref(), who.netns_inode) && self.workload_matches(who)
    }

    /// Whether a namespace is among those asked for: by name, and holding
    /// a workload asked for (`workloads`: its processes').
    fn namespace_matches(&self, name: &str, inode: u64, workloads: &[Attribution]) -> bool {
        self.netns_matches(Some(name), Some(inode))
            && (!self.asks_workload() || workloads.iter().any(|w| self.workload_matches(w)))
    }
}

/// A column of a workload: the container (short id), the pod, the unit,
/// or the cgroup, whichever says most.
fn workload_column(who: &Attribution) -> String {
    if let Some(id) = &who.container_id {
        return format!("container:{}", &id[..id.len().min(12)]);
    }
    if let Some(pod) = &who.pod_uid {
        return format!("pod:{pod}");
    }
    who.unit
        .clone()
        .or_else(|| who.cgroup.clone())
        .unwrap_or_else(|| "-".to_owned())
}

/// Sends one request and returns the daemon's answer.
pub fn request(socket: &Path, request: Request) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(socket).map_err(|error| match error.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "not allowed to talk to the daemon on {} ({error}): it answers root, its own user \
             and the members of its --api-group",
            socket.display()
        ),
        _ => anyhow::anyhow!(
            "no daemon answers on {} ({error}); start one with `handshake daemon`",
            socket.display()
        ),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the daemon's answer on {}", socket.display()))?;
    if let Some(error) = error_of(&answer) {
        bail!("the daemon refused {:?}: {error}", request.to_string());
    }
    Ok(answer)
}

/// Sends `request` and decodes the daemon's JSON answer.
pub fn fetch<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request_line: Request,
) -> anyhow::Result<T> {
    let answer = request(socket, request_line)?;
    serde_json::from_str(&answer).context("decoding the daemon's answer")
}

pub fn conns(flags: &ConnsFlags) -> anyhow::Result<()> {
    if let Some(state) = &flags.state {
        return sockets(flags, state);
    }
    let mut views: Vec<ConnView> = fetch(&flags.api_socket, Request::Conns { newest: None })?;
    views.retain(|v| {
        flags
            .port
            .is_none_or(|p| v.local_port == p || v.remote_port == p)
            && flags.role.is_none_or(|r| v.role == r.name())
            && flags.outcome.is_none_or(|o| v.outcome == o.name())
            && flags.who.matches(&v.attribution)
            && (!flags.closed || v.closed_by.is_some())
    });
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<6} {:<11} {:<6} {:<41} {:<41} {:>10} {:>10} {:>10} {:>5} {:>8}  {:<4} {:<28} SNI / JA4",
        "NETNS",
        "WORKLOAD",
        "ROLE",
        "OUTCOME",
        "SOURCE",
        "LOCAL",
        "REMOTE",
        "CONNECT",
        "SYN>SYNACK",
        "SYNACK>ACK",
        "RETX",
        "AGE",
        "TLS",
        "CLOSE"
    );
    for v in &views {
        let endpoint = |addr: &str, port: u16| endpoint(&v.family, addr, port);
        let us = |d: Option<f64>| d.map_or_else(|| "-".to_owned(), |d| format!("{d:.0}us"));
        let tls = match (&v.ja4, &v.sni) {
            (Some(ja4), sni) => format!("{} {ja4}", sni.as_deref().unwrap_or("-")),
            (None, _) => String::new(),
        };
        println!(
            "{:<16} {:<24} {:<6} {:<11} {:<6} {:<41} {:<41} {:>10} {:>10} {:>10} {:>5} {:>7.1}s  {:<4} {:<28} {tls}",
            v.attribution.netns.as_deref().unwrap_or("-"),
            workload_column(&v.attribution),
            v.role,
            v.outcome,
            v.source,
            endpoint(&v.local_addr, v.local_port),
            endpoint(&v.remote_addr, v.remote_port),
            us(v.connect_us),
            us(v.syn_to_synack_us),
            us(v.synack_to_ack_us),
            format!(
                "{}{}",
                v.syn_retransmits + v.synack_retransmits,
                if v.listener_overflowing { "*" } else { "" }
            ),
            v.age_s,
            v.tls_version.as_deref().unwrap_or("-"),
            close_column(v),
        );
    }
    if views.iter().any(|v| v.listener_overflowing) {
        println!(
            "* the SYN was retransmitted while its listener was overflowing (handshake listeners)"
        );
    }
    Ok(())
}

/// How a connection closed, in a few characters: `remote/fin cw=300ms`.
fn close_column(v: &ConnView) -> String {
    let (Some(by), Some(how)) = (&v.closed_by, &v.close) else {
        return "-".to_owned();
    };
    let ms = |us: f64| {
        if us >= 1e6 {
            format!("{:.1}s", us / 1e6)
        } else {
            format!("{:.1}ms", us / 1e3)
        }
    };
    let mut out = format!("{by}/{how}");
    for (name, value) in [
        ("cw", v.close_wait_us),
        ("fw", v.fin_wait_us),
        ("la", v.last_ack_us),
        ("cl", v.closing_us),
    ] {
        if let Some(us) = value {
            out.push_str(&format!(" {name}={}", ms(us)));
        }
    }
    out
}

pub fn closes(flags: &ClosesFlags) -> anyhow::Result<()> {
    let views: Vec<CloseGroupView> = fetch(&flags.api_socket, Request::Closes { top: flags.top })?;
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<66} {:<16} {:>8} {:>6} {:>12} {:>12}",
        "KIND", "NAME", "NETNS", "CLOSES", "RST%", "CW p50", "CW p99"
    );
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |us| format!("{:.1}ms", us / 1e3));
    for v in &views {
        println!(
            "{:<10} {:<66} {:<16} {:>8} {:>5.1}% {:>12} {:>12}",
            v.kind,
            v.name,
            v.netns.as_deref().unwrap_or("-"),
            v.closes,
            v.rst_share * 100.0,
            us(v.close_wait_p50_us),
            us(v.close_wait_p99_us)
        );
    }
    Ok(())
}

/// `conns --state S`: live sockets in one state, from a fresh census.
fn sockets(flags: &ConnsFlags, state: &str) -> anyhow::Result<()> {
    let Some(state) = state_by_name(state) else {
        bail!(
            "--state {state:?} is not a TCP state (one of {})",
            STATES.map(state_name).join(", ")
        );
    };
    let mut views: Vec<SocketView> = fetch(&flags.api_socket, Request::Sockets { state })?;
    views.retain(|v| {
        flags
            .port
            .is_none_or(|p| v.local_port == p || v.remote_port == p)
            && flags.who.matches(&v.attribution)
    });
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<11} {:<41} {:<41} {:>9} {:>8} COMM",
        "NETNS", "WORKLOAD", "STATE", "LOCAL", "REMOTE", "AGE", "PID"
    );
    for v in &views {
        let endpoint = |addr: &str, port: u16| endpoint(&v.family, addr, port);
        println!(
            "{:<16} {:<24} {:<11} {:<41} {:<41} {:>9} {:>8} {}",
            v.attribution.netns.as_deref().unwrap_or("-"),
            workload_column(&v.attribution),
            v.state,
            endpoint(&v.local_addr, v.local_port),
            endpoint(&v.remote_addr, v.remote_port),
            v.state_age_s
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.1}s")),
            v.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            v.comm.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// One (SNI, JA4) pair and how often it was seen.
#[derive(Debug, serde::Serialize)]
struct TopPair {
    sni: Option<String>,
    ja4: String,
    count: usize,
}

pub fn tls(flags: &TlsFlags) -> anyhow::Result<()> {
    let mut views: Vec<TlsView> = fetch(&flags.api_socket, Request::Tls)?;
    views.retain(|v| {
        flags.sni.as_ref().is_none_or(|s| v.sni.as_ref() == Some(s))
            && flags.ja4.as_ref().is_none_or(|j| &v.ja4 == j)
            && flags.who.matches(&v.attribution)
    });
    if let Some(top) = flags.top {
        let mut counts: std::collections::HashMap<(Option<String>, String), usize> =
            std::collections::HashMap::new();
        for v in &views {
            *counts.entry((v.sni.clone(), v.ja4.clone())).or_default() += 1;
        }
        let mut pairs: Vec<TopPair> = counts
            .into_iter()
            .map(|((sni, ja4), count)| TopPair { sni, ja4, count })
            .collect();
        pairs.sort_by(|a, b| (b.count, &a.ja4, &a.sni).cmp(&(a.count, &b.ja4, &b.sni)));
        pairs.truncate(top);
        if flags.json {
            println!("{}", serde_json::to_string_pretty(&pairs)?);
        } else {
            println!("{:>7}  {:<36} SNI", "COUNT", "JA4");
            for p in &pairs {
                println!(
                    "{:>7}  {:<36} {}",
                    p.count,
                    p.ja4,
                    p.sni.as_deref().unwrap_or("-")
                );
            }
        }
        return Ok(());
    }
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<41} {:<41} {:<30} {:<9} {:<36} {:>7} {:>10} {:>10}",
        "ROLE", "CLIENT", "SERVER", "SNI", "ALPN", "JA4", "VERSION", "CH>SH", "SH>FIN"
    );
    let us = |d: Option<f64>| d.map_or_else(|| "-".to_owned(), |d| format!("{d:.0}us"));
    for v in &views {
        println!(
            "{:<6} {:<41} {:<41} {:<30} {:<9} {:<36} {:>7} {:>10} {:>10}",
            v.role,
            endpoint(&v.family, &v.client_addr, v.client_port),
            endpoint(&v.family, &v.server_addr, v.server_port),
            v.sni.as_deref().unwrap_or("-"),
            v.alpn.first().map_or("-", String::as_str),
            v.ja4,
            v.version.as_deref().unwrap_or("-"),
            us(v.client_hello_to_server_hello_us),
            us(v.server_hello_to_client_finished_us)
        );
    }
    Ok(())
}

pub fn states(flags: &StatesFlags) -> anyhow::Result<()> {
    let mut views: Vec<StatesView> = fetch(&flags.api_socket, Request::States)?;
    views.retain(|v| {
        flags
            .who
            .namespace_matches(&v.netns, v.netns_inode, &v.workloads)
    });
    for view in &mut views {
        for sockets in view.oldest.values_mut() {
            sockets.retain(|s| flags.who.workload_matches(&s.attribution));
        }
    }
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    print!("{:<16}", "NETNS");
    for state in STATES {
        print!(" {:>11}", state_name(state));
    }
    println!();
    for view in &views {
        print!("{:<16}", view.netns);
        for state in STATES {
            print!(
                " {:>11}",
                view.states.get(&*state_name(state)).copied().unwrap_or(0)
            );
        }
        println!();
    }
    Ok(())
}

pub fn timewait(flags: &TimewaitFlags) -> anyhow::Result<()> {
    let mut views: Vec<TimeWaitView> =
        fetch(&flags.api_socket, Request::TimeWait { top: flags.top })?;
    views.retain(|v| {
        flags
            .who
            .namespace_matches(&v.netns, v.netns_inode, &v.workloads)
    });
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    for view in &views {
        let rate = view
            .entries_per_second
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}/s"));
        println!(
            "{}: {} in TIME_WAIT, entering at {rate}, local ports {}-{}",
            view.netns, view.count, view.port_range[0], view.port_range[1]
        );
        for endpoint in &view.top {
            let port = if endpoint.remote_port == 0 {
                "*".to_owned()
            } else {
                endpoint.remote_port.to_string()
            };
            println!(
                "  {:>8}  to {} port {port}",
                endpoint.count, endpoint.remote_addr
            );
        }
        for f in view
            .forecast
            .iter()
            .filter(|f| f.seconds_to_exhaustion.is_some())
        {
            println!(
                "  ports towards {} port {} run out in {:.0}s ({} held, +{:.1}/s)",
                f.remote_addr,
                f.remote_port,
                f.seconds_to_exhaustion.unwrap_or(f64::INFINITY),
                f.time_wait,
                f.growth_per_second
            );
        }
    }
    Ok(())
}

pub fn listeners(flags: &ListenersFlags) -> anyhow::Result<()> {
    let mut views: Vec<ListenerView> = fetch(&flags.api_socket, Request::Listeners)?;
    views.retain(|v| {
        flags.port.is_none_or(|p| v.local_port == p) && flags.who.matches(&v.attribution)
    });
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<41} {:>7} {:>7} {:>7} {:>9} {:>9}  COOKIES",
        "NETNS", "WORKLOAD", "LOCAL", "ACCEPT", "MAX", "SYN", "DROPS", "DROPS/S"
    );
    for v in &views {
        println!(
            "{:<16} {:<24} {:<41} {:>7} {:>7} {:>7} {:>9} {:>9}  {}",
            v.attribution.netns.as_deref().unwrap_or("-"),
            workload_column(&v.attribution),
            endpoint(&v.family, &v.local_addr, v.local_port),
            v.accept_queue,
            v.accept_queue_max,
            v.syn_queue,
            v.drops,
            v.drops_per_second
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
            if v.syn_cookies { "yes" } else { "no" },
        );
    }
    Ok(())
}

pub fn status(flags: &StatusFlags) -> anyhow::Result<()> {
    let s: StatusView = fetch(&flags.api_socket, Request::Status)?;
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("handshake {} (pid {}, uid {})", s.version, s.pid, s.uid);
    println!("uptime        {:.0} s", s.uptime_s);
    println!("capabilities  {}", s.capabilities.join(" "));
    println!("metrics       http://{}/metrics", s.metrics_addr);
    println!("api           {}", s.api_socket);
    match &s.instance {
        Some(instance) => println!("kept          instance {instance}: {}", s.kept),
        None => println!("kept          {}", s.kept),
    }
    println!(
        "census        {} every {:.1} s (now {:.1} s), {} namespaces",
        s.census_source, s.census_interval_s, s.census_interval_actual_s, s.namespaces
    );
    println!(
        "process       {:.1} MiB resident, {:.2} s CPU; BPF maps {:.1} MiB of kernel memory",
        s.rss_bytes as f64 / (1 << 20) as f64,
        s.cpu_s,
        s.map_memory_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "\n{:<22} {:<16} {:<16} {:<9} DETAIL",
        "PROBE", "INTERFACE", "NETNS", "ATTACHED"
    );
    for p in &s.probes {
        println!(
            "{:<22} {:<16} {:<16} {:<9} {}",
            p.probe,
            p.interface.as_deref().unwrap_or("-"),
            p.netns.as_deref().unwrap_or("-"),
            if p.attached { "yes" } else { "NO" },
            p.detail
        );
    }
    println!("\n{:<14} {:>10} {:>10}", "TABLE", "ENTRIES", "CAPACITY");
    for t in &s.tables {
        let entries = t.entries.map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!("{:<14} {:>10} {:>10}", t.map, entries, t.capacity);
    }
    println!("\n{:<24} {:>10}", "LOST", "COUNT");
    for (what, n) in &s.lost {
        println!("{what:<24} {n:>10}");
    }
    Ok(())
}

/// `addr:port`, or `[addr]:port` for IPv6.
fn endpoint(family: &str, addr: &str, port: u16) -> String {
    if family == "ipv6" {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_daemon_is_one_clear_line() {
        let error = super::request(
            std::path::Path::new("/nonexistent/handshake.sock"),
            super::Request::Conns { newest: None },
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("no daemon answers on /nonexistent/handshake.sock"));
        assert!(!error.contains('\n'));
    }
}
