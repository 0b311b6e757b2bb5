//! The socket census: one run of the `iter/tcp` program in a namespace
//! (or of sock_diag netlink where the program cannot be loaded), and the
//! decoding of what it wrote.
//!
//! A run: write the [`Config`], create an iterator file from the program's
//! link *inside* the namespace (the kernel binds the walk to the namespace
//! of the thread that creates the file), read it to the end, then drain the
//! TIME_WAIT maps the run filled. Runs are serialised by `&mut self`.

use std::{
    fs::File,
    io::{self, Read as _},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::{Pod, programs::ProgramError};
use handshake_common::abi::census::{
    Config, Header, Listener, NETNS_SLOTS, NetnsStats, RECORD_LISTENER, RECORD_SOCKET,
    RECORD_SUMMARY, SUMMARY_ROW_IPV4, SUMMARY_ROW_IPV6, Socket, Summary, TwKey,
};
use thiserror::Error;

use crate::kernel::{
    netns::{Netns, NetnsError},
    sockdiag,
};

#[derive(Debug, Error)]
pub enum CensusError {
    #[error("{call} failed")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} in network namespace {netns:?}")]
    PortRange {
        path: &'static str,
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("the census output is malformed: {0}")]
    Output(String),
    #[error("the eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("{name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the census was taken already")]
    Taken,
    #[error("namespace {netns:?}: reading its inode number")]
    Inode {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "--census-source iter: the iter/tcp program could not be loaded (see the warning above)"
    )]
    IterUnavailable,
    #[error("census map {name:?}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// One census of one namespace: what a run counted and listed.
#[derive(Clone, Debug)]
pub struct NetnsCensus {
    pub summary: Summary,
    /// Sockets in the states the request asked for.
    pub sockets: Vec<Socket>,
    /// TIME_WAIT sockets per remote endpoint (port 0: per remote address,
    /// for sockets whose local port is not ephemeral), most first.
    pub tw_remote: Vec<(TwKey, u64)>,
    /// TIME_WAIT sockets per local address, most first.
    pub tw_local: Vec<(TwKey, u64)>,
    /// The namespace's `ip_local_port_range`, inclusive.
    pub port_range: (u16, u16),
    /// Wall time of the run: iterator walk, read and map drain.
    pub duration: Duration,
    /// Every listener (at most [`MAX_LISTENERS`]).
    pub listeners: Vec<Listener>,
    /// The namespace's listen-queue counters (`/proc/net/netstat`), and
    /// whether it answers a SYN queue overflow with cookies.
    pub netstat: Netstat,
    pub syncookies: bool,
}

/// Listener records a run writes at most per namespace.
pub const MAX_LISTENERS: u32 = 4096;

/// A namespace's `TcpExt` counters about listen queues, as `nstat`
/// shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Netstat {
    /// A full accept queue refused a connection (SYN or final ACK).
    pub listen_overflows: u64,
    /// Every drop at a listener, overflows included.
    pub listen_drops: u64,
    /// A full SYN queue dropped a SYN (no cookies).
    pub req_q_full_drop: u64,
    /// A full SYN queue answered with a cookie.
    pub req_q_full_do_cookies: u64,
    pub syncookies_sent: u64,
    pub syncookies_recv: u64,
    pub syncookies_failed: u64,
}

impl Netstat {
    /// Parses `/proc/net/netstat`: pairs of lines, names then values.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some(("TcpExt", names)), Some(("TcpExt", values))) =
                (names.split_once(": "), values.split_once(": "))
            else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                let value = value.parse().unwrap_or(0);
                match name {
                    "ListenOverflows" => out.listen_overflows = value,
                    "ListenDrops" => out.listen_drops = value,
                    "TCPReqQFullDrop" => out.req_q_full_drop = value,
                    "TCPReqQFullDoCookies" => out.req_q_full_do_cookies = value,
                    "SyncookiesSent" => out.syncookies_sent = value,
                    "SyncookiesRecv" => out.syncookies_recv = value,
                    "SyncookiesFailed" => out.syncookies_failed = value,
                    _ => {}
                }
            }
        }
        out
    }
}

/// What a census reads of the namespace itself, inside it.
struct NamespaceFiles {
    port_range: (u16, u16),
    netstat: Netstat,
    syncookies: bool,
}

/// `ip_local_port_range`, `/proc/net/netstat` and `tcp_syncookies` of the
/// calling thread's namespace.
fn namespace_files(netns: &Netns) -> Result<NamespaceFiles, CensusError> {
    let port_range = port_range().map_err(|source| CensusError::PortRange {
        path: PORT_RANGE,
        netns: netns.name().to_owned(),
        source,
    })?;
    // The calling thread's namespace: /proc/net is the process's.
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")
        .map(|text| Netstat::parse(&text))
        .unwrap_or_default();
    let syncookies = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")
        .is_ok_and(|text| text.trim() != "0");
    Ok(NamespaceFiles {
        port_range,
        netstat,
        syncookies,
    })
}

impl NetnsCensus {
    /// Sockets in `state` (kernel number), both families, as `ss` counts
    /// them.
    pub fn count(&self, state: u32) -> u64 {
        self.summary.sockets[SUMMARY_ROW_IPV4][state as usize]
            + self.summary.sockets[SUMMARY_ROW_IPV6][state as usize]
    }

    pub fn count_family(&self, family: usize, state: u32) -> u64 {
        self.summary.sockets[family][state as usize]
    }
}

/// How the census counts: the `iter/tcp` program, or sock_diag netlink
/// where the program cannot be loaded (or on request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Iter,
    Netlink,
}

impl Method {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Iter => "iter/tcp",
            Self::Netlink => "sock_diag",
        }
    }
}

/// The census maps, and the loaded program's link when it could be loaded.
pub struct Census {
    /// `None`: sock_diag netlink instead.
    link: Option<OwnedFd>,
    config: Array<MapData, Config>,
    tw_remote: HashMap<MapData, TwKey, u64>,
    tw_local: HashMap<MapData, TwKey, u64>,
    netns_stats: PerCpuArray<MapData, NetnsStats>,
}

impl std::fmt::Debug for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Census")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

/// `bpf(2)` with a zeroed attribute union of which `words` are set.
fn bpf(cmd: u32, words: &[u32]) -> io::Result<OwnedFd> {
    let mut attr = [0u32; 32];
    attr[..words.len()].copy_from_slice(words);
    // SAFETY: `attr` is a valid, zero-padded `union bpf_attr` of the size
    // given; the kernel returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just handed us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_LINK_CREATE: u32 = 28;
const BPF_ITER_CREATE: u32 = 33;
const BPF_TRACE_ITER: u32 = 28;

/// Upper bound on one run's output: the summary plus the socket and
/// listener records the config allows.
fn max_output(config: &Config) -> usize {
    size_of::<Summary>()
        + config.max_sockets as usize * size_of::<Socket>()
        + config.max_listeners as usize * size_of::<Listener>()
}

impl Census {
    /// Keeps the maps; counts with sock_diag until [`Self::link`].
    pub fn new(
        config: Array<MapData, Config>,
        tw_remote: HashMap<MapData, TwKey, u64>,
        tw_local: HashMap<MapData, TwKey, u64>,
        netns_stats: PerCpuArray<MapData, NetnsStats>,
    ) -> Self {
        Self {
            link: None,
            config,
            tw_remote,
            tw_local,
            netns_stats,
        }
    }

    /// Links the loaded `iter/tcp` program (`prog`): the census uses it
    /// from now on.
    pub fn link(&mut self, prog: BorrowedFd<'_>) -> Result<(), CensusError> {
        // link_create: prog_fd, target_fd, attach_type, flags.
        let link = bpf(
            BPF_LINK_CREATE,
            &[prog.as_raw_fd() as u32, 0, BPF_TRACE_ITER, 0],
        )
        .map_err(|source| CensusError::Syscall {
            call: "bpf_link_create (iter/tcp)",
            source,
        })?;
        self.link = Some(link);
        Ok(())
    }

    /// Counts with sock_diag netlink from now on.
    pub fn use_netlink(&mut self) {
        self.link = None;
    }

    pub const fn method(&self) -> Method {
        if self.link.is_some() {
            Method::Iter
        } else {
            Method::Netlink
        }
    }

    /// Per namespace inode (0: namespaces that found both their slots
    /// taken), its sockets' state changes since the programs were loaded,
    /// all CPUs' copies added up. One lookup a slot: ~0.3 ms a round.
    pub fn netns_stats(&self) -> Result<Vec<(u32, NetnsStats)>, CensusError> {
        let mut sums: Vec<(u32, NetnsStats)> = Vec::new();
        for slot in 0..=NETNS_SLOTS {
            let per_cpu = self
                .netns_stats
                .get(&slot, 0)
                .map_err(|source| CensusError::Map {
                    name: "NETNS_STATS",
                    source,
                })?;
            for cpu in per_cpu.iter() {
                let inum = if slot == NETNS_SLOTS { 0 } else { cpu.inum };
                if inum == 0 && slot != NETNS_SLOTS {
                    continue;
                }
                let at = match sums.iter().position(|(i, _)| *i == inum) {
                    Some(at) => at,
                    None => {
                        sums.push((inum, NetnsStats::default()));
                        sums.len() - 1
                    }
                };
                let sum = &mut sums[at].1;
                for (total, n) in sum.entered.iter_mut().zip(cpu.entered) {
                    *total += n;
                }
                sum.time_wait_entries += cpu.time_wait_entries;
            }
        }
        Ok(sums)
    }

    /// Frees the slots of a namespace that is gone, making room for
    /// others. (A CPU counting another namespace in the same slot between
    /// the read and the write loses that count.)
    pub fn forget_netns(&mut self, inode: u64) {
        let Ok(inum) = u32::try_from(inode) else {
            return;
        };
        for slot in 0..NETNS_SLOTS {
            let Ok(per_cpu) = self.netns_stats.get(&slot, 0) else {
                continue;
            };
            if !per_cpu.iter().any(|cpu| cpu.inum == inum) {
                continue;
            }
            let freed: Vec<NetnsStats> = per_cpu
                .iter()
                .map(|cpu| {
                    if cpu.inum == inum {
                        NetnsStats::default()
                    } else {
                        *cpu
                    }
                })
                .collect();
            if let Ok(values) = PerCpuValues::try_from(freed) {
                let _ = self.netns_stats.set(slot, values, 0);
            }
        }
    }

    /// Counts every TCP socket of `netns`; lists the full sockets in the
    /// states of `socket_states` (bit `1 << state`), at most `max_sockets`.
    pub fn run(
        &mut self,
        netns: &Netns,
        socket_states: u32,
        max_sockets: u32,
    ) -> Result<NetnsCensus, CensusError> {
        let started = Instant::now();
        let Some(link) = self.link.as_ref().map(AsFd::as_fd) else {
            return netlink_run(netns, socket_states, max_sockets, started);
        };
        let (files, iter) = netns.run(|| {
            let files = namespace_files(netns)?;
            let iter = bpf(BPF_ITER_CREATE, &[link.as_raw_fd() as u32, 0]).map_err(|source| {
                CensusError::Syscall {
                    call: "bpf_iter_create (iter/tcp)",
                    source,
                }
            })?;
            Ok::<_, CensusError>((files, iter))
        })??;
        let port_range = files.port_range;
        let config = Config {
            socket_states,
            max_sockets,
            ephemeral_low: port_range.0,
            ephemeral_high: port_range.1,
            max_listeners: MAX_LISTENERS,
        };
        self.config
            .set(0, &config, 0)
            .map_err(|source| CensusError::Map {
                name: "CENSUS_CONFIG",
                source,
            })?;
        // The walk happens as the file is read.
        let mut output = Vec::with_capacity(max_output(&config).min(1 << 20));
        File::from(iter)
            .read_to_end(&mut output)
            .map_err(|source| CensusError::Syscall {
                call: "read (iter/tcp)",
                source,
            })?;
        let Decoded {
            summary,
            sockets,
            listeners,
        } = decode(&output)?;
        let tw_remote = drain(&mut self.tw_remote, "TW_REMOTE")?;
        let tw_local = drain(&mut self.tw_local, "TW_LOCAL")?;
        Ok(NetnsCensus {
            summary,
            sockets,
            tw_remote,
            tw_local,
            port_range,
            duration: started.elapsed(),
            listeners,
            netstat: files.netstat,
            syncookies: files.syncookies,
        })
    }
}

/// The census through sock_diag, inside `netns`.
fn netlink_run(
    netns: &Netns,
    socket_states: u32,
    max_sockets: u32,
    started: Instant,
) -> Result<NetnsCensus, CensusError> {
    let (files, dump) = netns.run(|| {
        let files = namespace_files(netns)?;
        let dump =
            sockdiag::dump(socket_states, max_sockets, files.port_range).map_err(|source| {
                CensusError::Syscall {
                    call: "sock_diag dump",
                    source,
                }
            })?;
        Ok::<_, CensusError>((files, dump))
    })??;
    let sorted = |map: std::collections::HashMap<TwKey, u64>| {
        let mut entries: Vec<(TwKey, u64)> = map.into_iter().collect();
        sort_entries(&mut entries);
        entries
    };
    Ok(NetnsCensus {
        summary: dump.summary,
        sockets: dump.sockets,
        tw_remote: sorted(dump.tw_remote),
        tw_local: sorted(dump.tw_local),
        port_range: files.port_range,
        duration: started.elapsed(),
        listeners: dump.listeners,
        netstat: files.netstat,
        syncookies: files.syncookies,
    })
}

/// Most first, then by address.
fn sort_entries(entries: &mut [(TwKey, u64)]) {
    entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.addr.cmp(&b.0.addr)));
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `ip_local_port_range` of the calling thread's namespace.
fn port_range() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string(Path::new(PORT_RANGE))?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected contents {text:?}"),
        )),
    }
}

/// Empties a TIME_WAIT map, returning its entries, most first.
fn drain(
    map: &mut HashMap<MapData, TwKey, u64>,
    name: &'static str,
) -> Result<Vec<(TwKey, u64)>, CensusError> {
    let entries: Vec<(TwKey, u64)> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|source| CensusError::Map { name, source })?;
    for (key, _) in &entries {
        // An entry gone already is what we want.
        let _ = map.remove(key);
    }
    let mut entries = entries;
    sort_entries(&mut entries);
    Ok(entries)
}

/// What one run's output holds.
#[derive(Debug)]
pub struct Decoded {
    pub summary: Summary,
    pub sockets: Vec<Socket>,
    pub listeners: Vec<Listener>,
}

/// Splits the iterator's output into its summary, socket and listener
/// records. Records shown twice (the kernel repeats a socket whose record
/// did not fit a read) are kept once.
pub fn decode(output: &[u8]) -> Result<Decoded, CensusError> {
    let mut sockets: Vec<Socket> = Vec::new();
    let mut listeners: Vec<Listener> = Vec::new();
    let mut summary = None;
    let mut at = 0;
    while at < output.len() {
        let header: Header = read_record(output, at)?;
        let len = header.len as usize;
        match header.kind {
            RECORD_SOCKET if len == size_of::<Socket>() => {
                let socket: Socket = read_record(output, at)?;
                if sockets.last() != Some(&socket) {
                    sockets.push(socket);
                }
            }
            RECORD_LISTENER if len == size_of::<Listener>() => {
                let listener: Listener = read_record(output, at)?;
                if listeners.last() != Some(&listener) {
                    listeners.push(listener);
                }
            }
            RECORD_SUMMARY if len == size_of::<Summary>() => {
                summary = Some(read_record::<Summary>(output, at)?);
            }
            kind => {
                return Err(CensusError::Output(format!(
                    "record of kind {kind} and {len} bytes at byte {at}"
                )));
            }
        }
        at += len;
    }
    let summary = summary.ok_or_else(|| CensusError::Output("no summary record".to_owned()))?;
    Ok(Decoded {
        summary,
        sockets,
        listeners,
    })
}

/// Copies a `T` out of `bytes` at `at`, checking the bounds.
fn read_record<T: Pod>(bytes: &[u8], at: usize) -> Result<T, CensusError> {
    let size = size_of::<T>();
    let slice = bytes.get(at..at + size).ok_or_else(|| {
        CensusError::Output(format!(
            "{} bytes left at byte {at}, {size} needed",
            bytes.len() - at
        ))
    })?;
    // SAFETY: `T: Pod` is valid for any bit pattern; the slice holds `size`
    // bytes.
    Ok(unsafe { std::ptr::read_unaligned(slice.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_summary_or_with_garbage_is_an_error() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0, 0, 0, 8, 0, 0, 0]).is_err());
        assert!(decode(&[2, 0, 0, 0]).is_err());
    }
}
