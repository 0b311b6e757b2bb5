//! The local API's server: a Unix socket, root-only by default (mode
//! 0600), one request line per connection ([`Request`]), one line of JSON
//! in answer. Census requests (`states`, `timewait`, `sockets`) run a
//! fresh census first, so their answers are exact at that instant.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use handshake_common::flow::{Flow, OUTCOME_ESTABLISHED, OUTCOME_IN_PROGRESS, ROLE_SERVER};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    daemon::{
        SharedCensus,
        census::{Scope, census_round},
        http::Render,
        state::{State, attribution, lock},
        status::Status,
    },
    kernel::{clock, netns},
    model::{
        closes::{Close, ClosePhase, How, quantile},
        conntrack::{Origin, RowKey, conn_view, row_key},
        listeners::{Overflows, listener_view},
        states::{STUCK_RECORDS, STUCK_STATES, stuck_mask, time_wait_view},
        tls::TlsRecord,
        workload::Workload,
    },
    wire::{
        Attribution, CloseGroupView, ConnView, Endpoints, ListenerView, Request, Role, STATES,
        SocketView, Source, StatesView, TimeWaitView, TlsView, error_body, state_name,
    },
};

const MAX_REQUEST_BYTES: u64 = 1024;

/// At most this many sockets per namespace in a `sockets STATE` answer.
const MAX_LISTED: u32 = 65_536;

/// Binds the API socket before anything touches the kernel: a live daemon
/// on the same path is an error, a stale socket file is replaced. Mode
/// 0600 (the daemon's user, and root), or 0660 with `group`.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<std::os::unix::net::UnixListener> {
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
    let restrict = || {
        let mode = match group {
            None => 0o600,
            Some(gid) => {
                std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
                    format!(
                        "giving {} to group {gid} (--api-group): the daemon must be a member of it",
                        path.display()
                    )
                })?;
                0o660
            }
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {} to mode {mode:o}", path.display()))
    };
    if let Err(error) = restrict() {
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
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
    census: Option<SharedCensus>,
    render: Render,
    status: Status,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = Arc::clone(&state);
                let census = census.clone();
                let render = Arc::clone(&render);
                let status = Arc::clone(&status);
                tokio::spawn(async move {
                    let served = answer(stream, &state, census.as_ref(), &render, &status).await;
                    if let Err(error) = served {
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
    census: Option<&SharedCensus>,
    render: &Render,
    status: &Status,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut bytes = Vec::new();
    // A request is one short line; bound what a client may send. Bytes
    // that are not UTF-8 make an unknown request, answered as such.
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let line = String::from_utf8_lossy(&bytes);
    let body = match Request::parse(&line) {
        Err(error) => error_body(&error.to_string()),
        Ok(Request::Conns { newest }) => {
            serde_json::to_string(&conns(state, newest)).map_err(io::Error::other)?
        }
        Ok(Request::Tls) => serde_json::to_string(&tls(state)).map_err(io::Error::other)?,
        Ok(Request::Metrics) => render().unwrap_or_else(|error| error_body(&error)),
        Ok(Request::Status) => serde_json::to_string(&status()).map_err(io::Error::other)?,
        Ok(Request::Closes { top }) => {
            serde_json::to_string(&closes(state, top)).map_err(io::Error::other)?
        }
        Ok(request) => match census {
            None => error_body(
                "the socket census is not available (see the daemon's log and handshake_probe_attached{probe=\"iter_tcp_census\"})",
            ),
            Some(census) => census_answer(request, census, state).await?,
        },
    };
    write.write_all(body.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// `states`, `timewait` and `sockets`, each from a fresh census, so that
/// the answer is exact now.
async fn census_answer(
    request: Request,
    census: &SharedCensus,
    state: &Mutex<State>,
) -> io::Result<String> {
    let round = match request {
        Request::Sockets { state } => {
            census_round(census, Scope::All, 1 << state, MAX_LISTED).await
        }
        _ => census_round(census, Scope::All, stuck_mask(), STUCK_RECORDS).await,
    };
    let source = census
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .method()
        .name();
    let holders = tokio::task::spawn_blocking(namespace_workloads)
        .await
        .unwrap_or_default();
    let mut state = lock(state);
    state.apply_census(round);
    let now = clock::monotonic_ns();
    let workloads_of = |inode: u64| holders.get(&inode).cloned().unwrap_or_default();
    let State {
        census: views,
        cgroups,
        transitions_per_second,
        jiffies,
        ..
    } = &mut *state;
    let mut attribute = |inode, cgroup| attribution(views, cgroups, inode, cgroup);
    let json = match request {
        Request::Sockets { state: listed } => {
            let mut views: Vec<SocketView> = views
                .iter()
                .flat_map(|v| v.oldest(listed, usize::MAX, &mut attribute))
                .collect();
            SocketView::sort(&mut views);
            serde_json::to_string(&views)
        }
        Request::Listeners => {
            let mut listed: Vec<ListenerView> = Vec::new();
            for view in views.iter() {
                for listener in &view.snapshot.listeners {
                    let stamp_s_ago = jiffies
                        .seconds_between(listener.overflow_stamp, view.snapshot.summary.jiffies);
                    listed.push(listener_view(
                        attribute(view.inode, listener.cgroup),
                        listener,
                        view.before(listener),
                        stamp_s_ago,
                    ));
                }
            }
            serde_json::to_string(&listed)
        }
        Request::TimeWait { top } => {
            let views: Vec<TimeWaitView> = views
                .iter()
                .map(|v| TimeWaitView {
                    workloads: workloads_of(v.inode),
                    ..time_wait_view(v, top)
                })
                .collect();
            serde_json::to_string(&views)
        }
        _ => {
            let views: Vec<StatesView> = views
                .iter()
                .map(|v| StatesView {
                    netns: v.name.clone(),
                    netns_inode: v.inode,
                    entered_per_second: STATES
                        .iter()
                        .map(|s| {
                            (
                                state_name(*s).into_owned(),
                                v.entered_per_second[*s as usize],
                            )
                        })
                        .collect(),
                    counted_s_ago: now.saturating_sub(v.taken_ns) as f64 / 1e9,
                    workloads: workloads_of(v.inode),
                    states: v.states(),
                    transitions_per_second: transitions_per_second.clone(),
                    census_source: source.to_owned(),
                    census_seconds: v.snapshot.duration.as_secs_f64(),
                    oldest: STUCK_STATES
                        .iter()
                        .map(|s| (state_name(*s).into_owned(), v.oldest(*s, 5, &mut attribute)))
                        .collect(),
                })
                .collect();
            serde_json::to_string(&views)
        }
    };
    json.map_err(io::Error::other)
}

/// Workloads listed per namespace, at most.
const MAX_WORKLOADS: usize = 64;

/// Per namespace inode, the workloads of the processes in it: distinct
/// (container, pod, unit), at most [`MAX_WORKLOADS`].
fn namespace_workloads() -> HashMap<u64, Vec<Attribution>> {
    netns::holders()
        .into_iter()
        .map(|(inode, paths)| {
            let mut workloads: Vec<Attribution> = Vec::new();
            for path in paths {
                let w = Workload::of(&path);
                let who = Attribution {
                    netns: None,
                    netns_inode: None,
                    cgroup: None,
                    container_id: w.container_id,
                    pod_uid: w.pod_uid,
                    unit: w.unit,
                };
                if !workloads.contains(&who) && workloads.len() < MAX_WORKLOADS {
                    workloads.push(who);
                }
            }
            (inode, workloads)
        })
        .collect()
}

/// The TLS connections' views, built (hellos parsed, fingerprints taken)
/// from the records taken under the lock, after it is released: the ring
/// buffers are not kept waiting while a long history is formatted.
fn tls_views(records: &[TlsRecord], now: u64) -> Vec<TlsView> {
    records.iter().map(|r| r.view(now)).collect()
}

/// Recent TLS handshakes, oldest first, with the total from the TCP
/// handshake's first SYN where the hooks saw that too, and whose
/// connection each is (from its TCP handshake's row; else the hooks'
/// namespace).
pub fn tls(state: &Mutex<State>) -> Vec<TlsView> {
    let now = clock::monotonic_ns();
    let (records, rows, hooks) = {
        let mut state = lock(state);
        let rows: Vec<(Flow, Origin)> = state
            .conntrack
            .recent()
            .map(|r| (r.flow, r.origin))
            .chain(state.live.iter().map(|f| {
                let origin = Origin {
                    netns: state.hooks_netns(f.ifindex),
                    cgroup: 0,
                };
                (*f, origin)
            }))
            .collect();
        let mut known: HashMap<Origin, Attribution> = HashMap::new();
        let hook_netns = state.hook_netns;
        let hooks = state.attribute(u64::from(hook_netns), 0);
        let rows: HashMap<Endpoints, (u64, Attribution)> = rows
            .into_iter()
            .map(|(f, origin)| {
                let who = match origin {
                    Origin { netns: 0, .. } => hooks.clone(),
                    _ => known
                        .entry(origin)
                        .or_insert_with(|| state.attribute(u64::from(origin.netns), origin.cgroup))
                        .clone(),
                };
                (
                    conn_view(&f, Source::Wire, now).endpoints(),
                    (f.ts_syn, who),
                )
            })
            .collect();
        (state.tls.records(), rows, hooks)
    };
    let mut views = tls_views(&records, now);
    for v in &mut views {
        match rows.get(&v.endpoints()) {
            Some((syn, who)) => {
                if let Some(done) = v.ts_client_finished
                    && done > *syn
                {
                    v.total_from_syn_us = Some((done - syn) as f64 / 1e3);
                }
                v.attribution = who.clone();
            }
            None => v.attribution = hooks.clone(),
        }
    }
    views
}

/// A connection end's close, in its row.
fn with_close(view: &mut ConnView, close: &Close) {
    let us = |phase| close.phase(phase).map(|ns| ns as f64 / 1e3);
    view.closed_by = Some(close.closer.name().to_owned());
    view.close = Some(close.how.name().to_owned());
    view.close_rst_by = close.rst_by.map(|by| by.name().to_owned());
    view.close_wait_us = us(ClosePhase::CloseWait);
    view.fin_wait_us = us(ClosePhase::FinWait);
    view.last_ack_us = us(ClosePhase::LastAck);
    view.closing_us = us(ClosePhase::Closing);
    view.lifetime_us = close.lifetime_ns.map(|ns| ns as f64 / 1e3);
}

/// Listeners (ports this host served, per namespace) and workloads
/// (unit, container, pod) by how their recent connections closed: the
/// `top` with the slowest CLOSE_WAIT (p99), then the largest RST share.
pub fn closes(state: &Mutex<State>, top: usize) -> Vec<CloseGroupView> {
    #[derive(Default)]
    struct Group {
        netns: Option<String>,
        closes: u64,
        rst: u64,
        close_wait: Vec<u64>,
        fin_wait: Vec<u64>,
    }
    let mut groups: BTreeMap<(&'static str, String, Option<u32>), Group> = BTreeMap::new();
    {
        let mut state = lock(state);
        let recent: Vec<Close> = state.closes.recent().copied().collect();
        let mut known: HashMap<Origin, Attribution> = HashMap::new();
        for close in &recent {
            let who = known
                .entry(close.origin)
                .or_insert_with(|| {
                    state.attribute(u64::from(close.origin.netns), close.origin.cgroup)
                })
                .clone();
            let mut keys: Vec<(&'static str, String, Option<u32>)> = Vec::new();
            if close.role == Some(Role::Server) {
                keys.push((
                    "listener",
                    close.key.5.to_string(),
                    Some(close.origin.netns),
                ));
            }
            for (kind, name) in [
                ("unit", &who.unit),
                ("container", &who.container_id),
                ("pod", &who.pod_uid),
            ] {
                if let Some(name) = name {
                    keys.push((kind, name.clone(), None));
                }
            }
            for key in keys {
                let listener = key.0 == "listener";
                let group = groups.entry(key).or_default();
                if listener {
                    group.netns.clone_from(&who.netns);
                }
                group.closes += 1;
                group.rst += u64::from(close.how == How::Rst);
                group.close_wait.extend(close.phase(ClosePhase::CloseWait));
                group.fin_wait.extend(close.phase(ClosePhase::FinWait));
            }
        }
    }
    let us = |v: Option<u64>| v.map(|ns| ns as f64 / 1e3);
    let mut views: Vec<CloseGroupView> = groups
        .into_iter()
        .map(|((kind, name, _), mut g)| CloseGroupView {
            kind: kind.to_owned(),
            name,
            netns: g.netns,
            closes: g.closes,
            rst: g.rst,
            rst_share: g.rst as f64 / g.closes.max(1) as f64,
            close_wait_p50_us: us(quantile(&mut g.close_wait, 0.5)),
            close_wait_p99_us: us(quantile(&mut g.close_wait, 0.99)),
            fin_wait_p50_us: us(quantile(&mut g.fin_wait, 0.5)),
            fin_wait_p99_us: us(quantile(&mut g.fin_wait, 0.99)),
        })
        .collect();
    views.sort_by(|a, b| {
        let slow = |v: &CloseGroupView| v.close_wait_p99_us.unwrap_or(0.0);
        slow(b)
            .total_cmp(&slow(a))
            .then(b.rst_share.total_cmp(&a.rst_share))
            .then(b.closes.cmp(&a.closes))
    });
    views.truncate(top);
    views
}

/// Whether handshake `flow`'s SYN was retransmitted while its listener
/// overflowed: a listener of this host, on the server's port (in the
/// row's namespace when this host was the server, in any when it was the
/// client), between the first SYN and the end.
fn waited_on_listener(overflows: &Overflows, flow: &Flow, origin: Origin, now: u64) -> bool {
    if flow.syn_count < 2 {
        return false;
    }
    let (netns, port) = if flow.role == ROLE_SERVER {
        (Some(u64::from(origin.netns)), flow.server_port)
    } else {
        (None, flow.server_port)
    };
    let end = if flow.ts_end == 0 { now } else { flow.ts_end };
    overflows.during(netns, port, flow.ts_syn, end)
}

/// Recent decided handshakes and those still in progress, oldest first,
/// with what their TLS ClientHello and ServerHello said and whose they
/// are; the `newest` only, when given.
pub fn conns(state: &Mutex<State>, newest: Option<usize>) -> Vec<ConnView> {
    let now = clock::monotonic_ns();
    let (mut views, records) = {
        let mut state = lock(state);
        let hooks = |f: &Flow| Origin {
            netns: state.hooks_netns(f.ifindex),
            cgroup: 0,
        };
        let mut rows: Vec<(Flow, Source, Origin)> = state
            .conntrack
            .recent()
            .map(|r| (r.flow, r.source, r.origin))
            .collect();
        // Ends not counted yet, each listed once: the packet hooks' in
        // their tables, else the socket layer's held ones.
        let kept = state.conntrack.keys();
        let decided = |flow: &Flow| kept.contains(&row_key(flow));
        let live: Vec<&Flow> = state.live.iter().filter(|f| !decided(f)).collect();
        let live_keys: std::collections::HashSet<_> = live.iter().map(|f| row_key(f)).collect();
        rows.extend(live.iter().map(|f| (**f, Source::Wire, hooks(f))));
        rows.extend(
            state
                .sockets
                .held()
                .filter(|(f, _)| !decided(f) && !live_keys.contains(&row_key(f)))
                .map(|(f, origin)| {
                    // An established one may still turn out reset.
                    let as_it_stands = if f.outcome == OUTCOME_ESTABLISHED {
                        OUTCOME_IN_PROGRESS
                    } else {
                        f.outcome
                    };
                    let row = Flow {
                        outcome: as_it_stands,
                        ..*f
                    };
                    (row, Source::Socket, origin)
                }),
        );
        rows.sort_by_key(|(f, _, _)| f.ts_syn);
        if let Some(n) = newest {
            rows.drain(..rows.len().saturating_sub(n));
        }
        // Each connection end's latest close.
        let mut closed: HashMap<RowKey, Close> = HashMap::new();
        for close in state.closes.recent() {
            closed.insert(close.key, *close);
        }
        let mut known: HashMap<Origin, Attribution> = HashMap::new();
        let views: Vec<ConnView> = rows
            .iter()
            .map(|(f, source, origin)| {
                let mut view = conn_view(f, *source, now);
                view.listener_overflowing = waited_on_listener(&state.overflows, f, *origin, now);
                if let Some(close) = closed.get(&row_key(f)).filter(|c| c.end_ns >= f.ts_syn) {
                    with_close(&mut view, close);
                }
                view.attribution = known
                    .entry(*origin)
                    .or_insert_with(|| state.attribute(u64::from(origin.netns), origin.cgroup))
                    .clone();
                view
            })
            .collect();
        (views, state.tls.records())
    };
    let tls: HashMap<Endpoints, TlsView> = tls_views(&records, now)
        .into_iter()
        .map(|v| (v.endpoints(), v))
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
