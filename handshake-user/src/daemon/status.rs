//! `handshake status`: the daemon about itself — version, uptime, the
//! user and capabilities it runs with, each probe and where it is
//! attached, the census, the tables' fill and what was lost — and the
//! process figures `/metrics` shows too (`process_*`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    daemon::{
        config::DaemonConfig,
        state::{State, lock},
    },
    kernel::{
        loader::{Attachments, TableSizes, lock_attachments},
        maps::Table,
    },
    wire::{ProbeView, StatusView, TableView},
};

/// Builds the answer to `status`.
pub type Status = Arc<dyn Fn() -> StatusView + Send + Sync>;

/// The daemon's own CPU time and memory, from `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub start_unix_s: f64,
    pub open_fds: u64,
    /// Kernel memory of the BPF maps the daemon holds (their `memlock` in
    /// `/proc/self/fdinfo`, as bpftool shows it).
    pub map_memory_bytes: u64,
}

impl ProcessStats {
    /// Reads them now; a figure `/proc` does not give is 0.
    pub fn read(started_unix_s: f64) -> Self {
        // SAFETY: sysconf has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which may hold spaces: state is
        // field 3, utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let cpu_ticks = ticks(11) + ticks(12);
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let rss_pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let (mut open_fds, mut map_memory_bytes) = (0, 0);
        for entry in std::fs::read_dir("/proc/self/fdinfo")
            .into_iter()
            .flatten()
            .flatten()
        {
            open_fds += 1;
            let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if info.contains("map_type:") {
                map_memory_bytes += info
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Self {
            cpu_s: cpu_ticks as f64 / tick.max(1) as f64,
            rss_bytes: rss_pages * page.max(0) as u64,
            start_unix_s: started_unix_s,
            open_fds,
            map_memory_bytes,
        }
    }
}

/// The capabilities by bit number, as `capabilities(7)` names them.
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The names of the capabilities in a `CapEff:` mask; every one when the
/// mask holds them all (root), as `all`.
pub fn capability_names(mask: u64) -> Vec<String> {
    let known = (1u64 << CAPABILITIES.len()) - 1;
    if mask & known == known {
        return vec!["all".to_owned()];
    }
    (0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            CAPABILITIES
                .get(bit)
                .map_or_else(|| format!("cap_{bit}"), |name| (*name).to_owned())
        })
        .collect()
}

/// This process's effective capabilities, from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .unwrap_or(0)
}

pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The tables' capacities and, for the flow tables, their entries at the
/// last sweep.
pub fn tables(sizes: TableSizes, entries: [u64; 2]) -> Vec<TableView> {
    let mut views: Vec<TableView> = Table::ALL
        .iter()
        .map(|t| TableView {
            map: t.name().to_owned(),
            capacity: match t {
                Table::HalfOpen => sizes.half_open,
                Table::Flows => sizes.flows,
            },
            entries: Some(entries[*t as usize]),
        })
        .collect();
    views.push(TableView {
        map: "socket_ages".to_owned(),
        capacity: sizes.sock_ages,
        entries: None,
    });
    views
}

/// The `status` answer, built from the configuration and what the loops
/// share.
pub fn status(
    config: &DaemonConfig,
    state: Arc<Mutex<State>>,
    attachments: Attachments,
    started_unix_s: f64,
) -> Status {
    let started = Instant::now();
    let sizes = config.tables;
    let census_interval_s = config.census_interval.as_secs_f64();
    let metrics_addr = config.metrics_addr.to_string();
    let api_socket = config.api_socket.display().to_string();
    Arc::new(move || {
        let probes: Vec<ProbeView> = lock_attachments(&attachments)
            .iter()
            .map(|a| ProbeView {
                probe: a.probe.to_owned(),
                interface: a.interface.clone(),
                netns: a.netns.clone(),
                attached: a.attached,
                detail: a.detail.clone(),
            })
            .collect();
        let census_source = probes
            .iter()
            .find(|p| p.attached && matches!(p.detail.as_str(), "iter/tcp" | "netlink"))
            .map_or_else(|| "none".to_owned(), |p| p.detail.clone());
        let process = ProcessStats::read(started_unix_s);
        let state = lock(&state);
        let flow = state.flow_stats;
        let own = state.self_stats;
        let lost = BTreeMap::from([
            ("ringbuf_dropped".to_owned(), flow.events_dropped),
            (
                "socket_events_dropped".to_owned(),
                flow.sock_events_dropped + own.sock_records_lost,
            ),
            ("tls_ringbuf_dropped".to_owned(), flow.tls_events_dropped),
            ("map_evictions".to_owned(), flow.evictions.iter().sum()),
            ("map_insert_failures".to_owned(), flow.insert_failures),
            ("socket_ages_untracked".to_owned(), flow.sock_ages_full),
            ("map_read_errors".to_owned(), own.map_read_errors),
            ("census_errors".to_owned(), own.census_errors),
            ("checkpoint_errors".to_owned(), own.checkpoint_errors),
            (
                "events_malformed".to_owned(),
                own.events_malformed + own.tls_events_malformed,
            ),
        ]);
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_unix_s,
            uptime_s: started.elapsed().as_secs_f64(),
            // SAFETY: getuid has no preconditions and cannot fail.
            uid: unsafe { libc::getuid() },
            capabilities: capability_names(effective_capabilities()),
            probes,
            census_source,
            census_interval_s,
            census_interval_actual_s: own.census_interval_s,
            namespaces: state.census.len(),
            tables: tables(sizes, state.table_entries),
            lost,
            rss_bytes: process.rss_bytes,
            map_memory_bytes: process.map_memory_bytes,
            cpu_s: process.cpu_s,
            metrics_addr: metrics_addr.clone(),
            api_socket: api_socket.clone(),
            instance: state.kept.instance.clone(),
            kept: state.kept.detail.clone(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_by_name() {
        assert_eq!(capability_names(0), Vec::<String>::new());
        assert_eq!(
            capability_names((1 << 39) | (1 << 38) | (1 << 12)),
            ["CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"]
        );
        assert_eq!(capability_names(0x1ff_ffff_ffff), ["all"]);
    }

    #[test]
    fn own_process_figures() {
        let stats = ProcessStats::read(1.0);
        assert!(stats.rss_bytes > 1 << 20, "{stats:?}");
        assert!(stats.open_fds >= 3, "{stats:?}");
    }
}
