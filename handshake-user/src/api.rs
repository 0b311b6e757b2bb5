//! The local API the CLI talks to: a Unix socket, root-only by default
//! (mode 0600), one request line per connection, a JSON answer. Requests:
//! `conns` (recent and in-progress handshakes). The wire types live here so
//! the daemon and the CLI agree on them.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use handshake_common::flow::{FAMILY_IPV4, Flow, SIDE_CLIENT, SIDE_SERVER};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    clock,
    conntrack::{Phase, Role, outcome_name, phases},
    daemon::{self, CensusRunner, State},
    states::{SocketView, StatesView, TimeWaitView, state_by_name, state_name},
    tlsconn::{TlsRecord, TlsView},
};

pub const DEFAULT_SOCKET: &str = "/run/handshake/handshake.sock";

const MAX_REQUEST_BYTES: u64 = 1024;

/// At most this many sockets per namespace in a `sockets STATE` answer.
const MAX_LISTED: u32 = 65_536;

/// One connection as `handshake conns --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    pub family: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    pub role: String,
    /// `established`, `refused`, `reset`, `timeout` or `in_progress`.
    pub outcome: String,
    /// Client: SYN out → SYN-ACK in, µs.
    pub connect_us: Option<f64>,
    /// Server: SYN in → SYN-ACK out, µs.
    pub syn_to_synack_us: Option<f64>,
    /// Server: SYN-ACK out → ACK in, µs.
    pub synack_to_ack_us: Option<f64>,
    pub syn_retransmits: u16,
    pub synack_retransmits: u16,
    /// Who sent the RST of a refused or reset handshake.
    pub rst_from: Option<String>,
    pub ifindex: u32,
    /// Seconds since the first SYN.
    pub age_s: f64,
    /// From the connection's ClientHello, when it carried TLS.
    pub sni: Option<String>,
    pub ja4: Option<String>,
    /// Negotiated, from the ServerHello.
    pub tls_version: Option<String>,
}

fn addr(family: u8, bytes: &[u8; 16]) -> String {
    if family == FAMILY_IPV4 {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
    } else {
        Ipv6Addr::from(*bytes).to_string()
    }
}

impl ConnView {
    /// Its client's and server's endpoints, whichever side this host was.
    fn endpoints(&self) -> Endpoints {
        let local = (self.local_addr.clone(), self.local_port);
        let remote = (self.remote_addr.clone(), self.remote_port);
        let (client, server) = if self.role == "client" {
            (local, remote)
        } else {
            (remote, local)
        };
        (client.0, client.1, server.0, server.1)
    }

    pub fn of(flow: &Flow, now: u64) -> Self {
        let role = Role::of(flow);
        let (local, remote) = if role == Some(Role::Client) {
            (
                (&flow.client_addr, flow.client_port),
                (&flow.server_addr, flow.server_port),
            )
        } else {
            (
                (&flow.server_addr, flow.server_port),
                (&flow.client_addr, flow.client_port),
            )
        };
        let phases = phases(flow);
        let us = |phase| {
            phases
                .iter()
                .find(|(p, _)| *p == phase)
                .map(|(_, nanos)| *nanos as f64 / 1e3)
        };
        Self {
            family: if flow.family == FAMILY_IPV4 {
                "ipv4"
            } else {
                "ipv6"
            }
            .to_owned(),
            local_addr: addr(flow.family, local.0),
            local_port: local.1,
            remote_addr: addr(flow.family, remote.0),
            remote_port: remote.1,
            role: role.map_or("unknown", Role::name).to_owned(),
            outcome: outcome_name(flow).to_owned(),
            connect_us: us(Phase::Connect),
            syn_to_synack_us: us(Phase::SynToSynAck),
            synack_to_ack_us: us(Phase::SynAckToAck),
            syn_retransmits: flow.syn_count.saturating_sub(1),
            synack_retransmits: flow.synack_count.saturating_sub(1),
            rst_from: match flow.rst_from {
                SIDE_CLIENT => Some("client".to_owned()),
                SIDE_SERVER => Some("server".to_owned()),
                _ => None,
            },
            ifindex: flow.ifindex,
            age_s: now.saturating_sub(flow.ts_syn) as f64 / 1e9,
            sni: None,
            ja4: None,
            tls_version: None,
        }
    }
}

/// Binds the API socket before anything touches the kernel: a live daemon
/// on the same path is an error, a stale socket file is replaced.
pub fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for --api-socket", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another daemon answers on --api-socket {}; stop it or pick another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on --api-socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Removes the socket file when the daemon stops.
#[derive(Debug)]
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Answers API requests until the future is dropped.
pub async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    census: Option<Arc<Mutex<CensusRunner>>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = Arc::clone(&state);
                let census = census.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &state, census.as_ref()).await {
                        tracing::debug!(%error, "API request failed");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    stream: UnixStream,
    state: &Mutex<State>,
    census: Option<&Arc<Mutex<CensusRunner>>>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; bound what a client may send.
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let mut words = line.split_whitespace();
    let request = words.next().unwrap_or("");
    let body = match request {
        "conns" => {
            let views = conns(state);
            serde_json::to_string(&views).map_err(io::Error::other)?
        }
        "tls" => {
            let views = tls(state);
            serde_json::to_string(&views).map_err(io::Error::other)?
        }
        "states" | "timewait" | "sockets" => match census {
            None => error_body(
                "the socket census is not available (see the daemon's log and handshake_probe_attached{probe=\"iter_tcp_census\"})",
            ),
            Some(census) => census_answer(request, words.next(), census, state).await?,
        },
        other => error_body(&format!("unknown request {other:?}")),
    };
    write.write_all(body.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// `states`, `timewait [TOP]` and `sockets STATE`, each from a fresh
/// census, so that the answer is exact now.
async fn census_answer(
    request: &str,
    argument: Option<&str>,
    census: &Arc<Mutex<CensusRunner>>,
    state: &Mutex<State>,
) -> io::Result<String> {
    let listed = argument.and_then(state_by_name);
    let round = match (request, listed) {
        ("sockets", None) => return Ok(error_body("sockets needs a TCP state, e.g. close_wait")),
        ("sockets", Some(listed)) => daemon::census_round(census, 1 << listed, MAX_LISTED).await,
        _ => daemon::census_round(census, daemon::stuck_mask(), daemon::STUCK_RECORDS).await,
    };
    let source = census
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .source()
        .name();
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.apply_census(round);
    let json = match (request, listed) {
        ("sockets", Some(listed)) => {
            let mut views: Vec<SocketView> = state
                .census
                .iter()
                .flat_map(|v| v.oldest(listed, usize::MAX))
                .collect();
            SocketView::sort(&mut views);
            serde_json::to_string(&views)
        }
        ("states", _) => {
            let views: Vec<StatesView> = state
                .census
                .iter()
                .map(|v| StatesView {
                    netns: v.name.clone(),
                    states: v.states(),
                    transitions_per_second: state.transitions_per_second.clone(),
                    census_source: source.to_owned(),
                    census_seconds: v.snapshot.duration.as_secs_f64(),
                    oldest: daemon::STUCK_STATES
                        .iter()
                        .map(|s| (state_name(*s).to_owned(), v.oldest(*s, 5)))
                        .collect(),
                })
                .collect();
            serde_json::to_string(&views)
        }
        _ => {
            let top = argument.and_then(|n| n.parse().ok()).unwrap_or(10);
            let views: Vec<TimeWaitView> = state
                .census
                .iter()
                .map(|v| TimeWaitView::of(v, top))
                .collect();
            serde_json::to_string(&views)
        }
    };
    json.map_err(io::Error::other)
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// (client address, client port, server address, server port).
type Endpoints = (String, u16, String, u16);

/// The TLS connections' views, built (hellos parsed, fingerprints taken)
/// from the records taken under the lock, after it is released: the ring
/// buffers are not kept waiting while a long history is formatted.
fn tls_views(records: &[TlsRecord], now: u64) -> Vec<TlsView> {
    records.iter().map(|r| r.view(now)).collect()
}

fn endpoints(view: &TlsView) -> Endpoints {
    (
        view.client_addr.clone(),
        view.client_port,
        view.server_addr.clone(),
        view.server_port,
    )
}

/// Recent TLS handshakes, oldest first, with the total from the TCP
/// handshake's first SYN where the hooks saw that too.
pub fn tls(state: &Mutex<State>) -> Vec<TlsView> {
    let now = clock::monotonic_ns();
    let (records, syns) = {
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        let syns: std::collections::HashMap<Endpoints, u64> = state
            .conntrack
            .recent()
            .chain(state.live.iter())
            .map(|f| (ConnView::of(f, now).endpoints(), f.ts_syn))
            .collect();
        (state.tls.records(), syns)
    };
    let mut views = tls_views(&records, now);
    for v in &mut views {
        if let (Some(syn), Some(done)) = (syns.get(&endpoints(v)), v.ts_client_finished)
            && done > *syn
        {
            v.total_from_syn_us = Some((done - syn) as f64 / 1e3);
        }
    }
    views
}

/// Recent decided handshakes and those still in progress, oldest first,
/// with what their TLS ClientHello and ServerHello said.
pub fn conns(state: &Mutex<State>) -> Vec<ConnView> {
    let now = clock::monotonic_ns();
    let (mut views, records) = {
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut flows: Vec<&Flow> = state.conntrack.recent().chain(state.live.iter()).collect();
        flows.sort_by_key(|f| f.ts_syn);
        let views: Vec<ConnView> = flows.iter().map(|f| ConnView::of(f, now)).collect();
        (views, state.tls.records())
    };
    let tls: std::collections::HashMap<Endpoints, TlsView> = tls_views(&records, now)
        .into_iter()
        .map(|v| (endpoints(&v), v))
        .collect();
    for view in &mut views {
        if let Some(t) = tls.get(&view.endpoints()) {
            view.sni = t.sni.clone();
            view.ja4 = Some(t.ja4.clone());
            view.tls_version = t.version.clone();
        }
    }
    views
}
