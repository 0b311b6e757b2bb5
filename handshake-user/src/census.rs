//! The socket census: field offsets from the kernel's BTF, one run of the
//! `iter/tcp` program in a namespace, and the decoding of what it wrote.
//!
//! A run: write the [`Config`], create an iterator file from the program's
//! link *inside* the namespace (the kernel binds the walk to the namespace
//! of the thread that creates the file), read it to the end, then drain the
//! TIME_WAIT maps the run filled. Runs are serialised by `&mut self`.

use std::{
    fs::File,
    io::{self, Read as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, PerCpuHashMap};
use btf_rs::{Btf, Type};
use handshake_common::abi::{
    AF_INET,
    census::{
        Config, FAMILY_V4, FAMILY_V6, Header, RECORD_SOCKET, RECORD_SUMMARY, Socket, Summary,
        TwKey, offsets,
    },
    tcp_state,
};
use thiserror::Error;

use crate::netns::{Netns, NetnsError};

/// The eleven TCP states `ss` reports, in the kernel's order.
pub const STATES: [u32; 11] = [
    tcp_state::ESTABLISHED,
    tcp_state::SYN_SENT,
    tcp_state::SYN_RECV,
    tcp_state::FIN_WAIT1,
    tcp_state::FIN_WAIT2,
    tcp_state::TIME_WAIT,
    tcp_state::CLOSE,
    tcp_state::CLOSE_WAIT,
    tcp_state::LAST_ACK,
    tcp_state::LISTEN,
    tcp_state::CLOSING,
];

/// Where the running kernel describes its types.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum CensusError {
    #[error("reading the kernel's BTF at {path}: {reason}")]
    Btf { path: String, reason: String },
    #[error("the kernel's BTF has no field {field} in struct {strukt} of {size} bytes")]
    Field {
        strukt: &'static str,
        field: &'static str,
        size: usize,
    },
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
    #[error("census map {name:?}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// `struct sock_common` and `inet_timewait_sock` field offsets, as the
/// program's globals want them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub values: [(&'static str, u32); 12],
}

impl Offsets {
    /// Resolves every field from the kernel's BTF at `path`, checking each
    /// field's size against what the program reads.
    pub fn resolve(path: &str) -> Result<Self, CensusError> {
        let btf = Btf::from_file(path).map_err(|e| CensusError::Btf {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        })?;
        let sc = "sock_common";
        let field = |strukt, field, size, global| -> Result<(&'static str, u32), CensusError> {
            offset_of(&btf, strukt, field, size)
                .map(|off| (global, off))
                .ok_or(CensusError::Field {
                    strukt,
                    field,
                    size,
                })
        };
        Ok(Self {
            values: [
                field(sc, "skc_daddr", 4, offsets::SKC_DADDR)?,
                field(sc, "skc_rcv_saddr", 4, offsets::SKC_RCV_SADDR)?,
                field(sc, "skc_dport", 2, offsets::SKC_DPORT)?,
                field(sc, "skc_num", 2, offsets::SKC_NUM)?,
                field(sc, "skc_family", 2, offsets::SKC_FAMILY)?,
                field(sc, "skc_state", 1, offsets::SKC_STATE)?,
                field(sc, "skc_v6_daddr", 16, offsets::SKC_V6_DADDR)?,
                field(sc, "skc_v6_rcv_saddr", 16, offsets::SKC_V6_RCV_SADDR)?,
                field("inet_timewait_sock", "tw_substate", 1, offsets::TW_SUBSTATE)?,
                field(sc, "skc_net", 8, offsets::SKC_NET)?,
                field("sock", "sk_protocol", 2, offsets::SK_PROTOCOL)?,
                (
                    offsets::NET_NS_INUM,
                    field("net", "ns", size_of_struct(&btf, "ns_common")?, "")?.1
                        + field("ns_common", "inum", 4, "")?.1,
                ),
            ],
        })
    }
}

/// Size of struct `name`.
fn size_of_struct(btf: &Btf, name: &'static str) -> Result<usize, CensusError> {
    btf.resolve_types_by_name(name)
        .ok()
        .and_then(|types| {
            types.into_iter().find_map(|t| match t {
                Type::Struct(s) => Some(s.size()),
                _ => None,
            })
        })
        .ok_or(CensusError::Field {
            strukt: name,
            field: "(itself)",
            size: 0,
        })
}

/// Byte offset of `field` in struct `strukt`, looking through anonymous
/// structs and unions, if its type is `size` bytes.
fn offset_of(btf: &Btf, strukt: &str, field: &str, size: usize) -> Option<u32> {
    let ty = btf
        .resolve_types_by_name(strukt)
        .ok()?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))?;
    let Type::Struct(s) = ty else { return None };
    find_member(btf, &s, field, size, 0)
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    field: &str,
    size: usize,
    base_bits: u32,
) -> Option<u32> {
    for member in &s.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        let bits = base_bits + member.bit_offset();
        let ty = btf.resolve_chained_type(member).ok()?;
        if name == field {
            return (member.bitfield_size().unwrap_or(0) == 0
                && bits.is_multiple_of(8)
                && type_size(btf, ty) == Some(size))
            .then_some(bits / 8);
        }
        if let (true, Type::Struct(inner) | Type::Union(inner)) = (name.is_empty(), ty)
            && let Some(off) = find_member(btf, &inner, field, size, bits)
        {
            return Some(off);
        }
    }
    None
}

/// Size of a type, following typedefs and qualifiers.
fn type_size(btf: &Btf, mut ty: Type) -> Option<usize> {
    for _ in 0..16 {
        ty = match ty {
            Type::Int(i) => return Some(i.size()),
            Type::Struct(s) | Type::Union(s) => return Some(s.size()),
            Type::Enum(e) => return Some(e.size()),
            Type::Array(a) => {
                let elem = btf.resolve_chained_type(&a).ok()?;
                return Some(a.len() * type_size(btf, elem)?);
            }
            Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) => {
                btf.resolve_chained_type(ty.as_btf_type()?).ok()?
            }
            _ => return None,
        };
    }
    None
}

/// One run's result, for one namespace.
#[derive(Clone, Debug)]
pub struct Snapshot {
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
}

impl Snapshot {
    /// Sockets in `state` (kernel number), both families, as `ss` counts
    /// them.
    pub fn count(&self, state: u32) -> u64 {
        self.summary.sockets[FAMILY_V4][state as usize]
            + self.summary.sockets[FAMILY_V6][state as usize]
    }

    pub fn count_family(&self, family: usize, state: u32) -> u64 {
        self.summary.sockets[family][state as usize]
    }
}

/// How the census counts: the `iter/tcp` program, or sock_diag netlink
/// where the program cannot be loaded (or on request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Iter,
    Netlink,
}

impl Source {
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
    tw_entries: PerCpuHashMap<MapData, u32, u64>,
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

/// Upper bound on one run's output: the summary plus the socket records
/// the config allows.
fn max_output(config: &Config) -> usize {
    size_of::<Summary>() + config.max_sockets as usize * size_of::<Socket>()
}

impl Census {
    /// Keeps the maps; counts with sock_diag until [`Self::link`].
    pub fn new(
        config: Array<MapData, Config>,
        tw_remote: HashMap<MapData, TwKey, u64>,
        tw_local: HashMap<MapData, TwKey, u64>,
        tw_entries: PerCpuHashMap<MapData, u32, u64>,
    ) -> Self {
        Self {
            link: None,
            config,
            tw_remote,
            tw_local,
            tw_entries,
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

    pub const fn source(&self) -> Source {
        if self.link.is_some() {
            Source::Iter
        } else {
            Source::Netlink
        }
    }

    /// Sockets that entered TIME_WAIT (went FIN_WAIT2 or CLOSING → CLOSE)
    /// in the namespace with inode `inode` since the programs were loaded.
    pub fn time_wait_entries(&self, inode: u64) -> u64 {
        self.tw_entries
            .get(&(inode as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Counts every TCP socket of `netns`; lists the full sockets in the
    /// states of `socket_states` (bit `1 << state`), at most `max_sockets`.
    pub fn run(
        &mut self,
        netns: &Netns,
        socket_states: u32,
        max_sockets: u32,
    ) -> Result<Snapshot, CensusError> {
        let started = Instant::now();
        let Some(link) = self.link.as_ref().map(AsFd::as_fd) else {
            return netlink_run(netns, socket_states, max_sockets, started);
        };
        let (port_range, iter) = netns.run(|| {
            let range = port_range().map_err(|source| CensusError::PortRange {
                path: PORT_RANGE,
                netns: netns.name().to_owned(),
                source,
            })?;
            let iter = bpf(BPF_ITER_CREATE, &[link.as_raw_fd() as u32, 0]).map_err(|source| {
                CensusError::Syscall {
                    call: "bpf_iter_create (iter/tcp)",
                    source,
                }
            })?;
            Ok::<_, CensusError>((range, iter))
        })??;
        let config = Config {
            socket_states,
            max_sockets,
            ephemeral_low: port_range.0,
            ephemeral_high: port_range.1,
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
        let (summary, sockets) = decode(&output)?;
        let tw_remote = drain(&mut self.tw_remote, "TW_REMOTE")?;
        let tw_local = drain(&mut self.tw_local, "TW_LOCAL")?;
        Ok(Snapshot {
            summary,
            sockets,
            tw_remote,
            tw_local,
            port_range,
            duration: started.elapsed(),
        })
    }
}

/// The census through sock_diag, inside `netns`.
fn netlink_run(
    netns: &Netns,
    socket_states: u32,
    max_sockets: u32,
    started: Instant,
) -> Result<Snapshot, CensusError> {
    let (port_range, dump) = netns.run(|| {
        let range = port_range().map_err(|source| CensusError::PortRange {
            path: PORT_RANGE,
            netns: netns.name().to_owned(),
            source,
        })?;
        let dump = crate::sockdiag::dump(socket_states, max_sockets, range).map_err(|source| {
            CensusError::Syscall {
                call: "sock_diag dump",
                source,
            }
        })?;
        Ok::<_, CensusError>((range, dump))
    })??;
    let sorted = |map: std::collections::HashMap<TwKey, u64>| {
        let mut entries: Vec<(TwKey, u64)> = map.into_iter().collect();
        sort_entries(&mut entries);
        entries
    };
    Ok(Snapshot {
        summary: dump.summary,
        sockets: dump.sockets,
        tw_remote: sorted(dump.tw_remote),
        tw_local: sorted(dump.tw_local),
        port_range,
        duration: started.elapsed(),
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

/// Splits the iterator's output into its summary and socket records.
/// Socket records shown twice (the kernel repeats a socket whose record did
/// not fit a read) are kept once.
pub fn decode(output: &[u8]) -> Result<(Summary, Vec<Socket>), CensusError> {
    let mut sockets: Vec<Socket> = Vec::new();
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
    Ok((summary, sockets))
}

/// Copies a `T` out of `bytes` at `at`, checking the bounds.
fn read_record<T: Copy>(bytes: &[u8], at: usize) -> Result<T, CensusError> {
    let size = size_of::<T>();
    let slice = bytes.get(at..at + size).ok_or_else(|| {
        CensusError::Output(format!(
            "{} bytes left at byte {at}, {size} needed",
            bytes.len() - at
        ))
    })?;
    // SAFETY: `T` is one of the ABI's `repr(C)` records of plain integers,
    // valid for any bit pattern; the slice holds `size` bytes.
    Ok(unsafe { std::ptr::read_unaligned(slice.as_ptr().cast::<T>()) })
}

/// An address from a census record or key.
pub fn addr(family: u16, bytes: &[u8; 16]) -> String {
    if family == AF_INET {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
    } else {
        Ipv6Addr::from(*bytes).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_come_from_the_running_kernel() {
        let Ok(offsets) = Offsets::resolve(KERNEL_BTF) else {
            eprintln!("SKIPPED: no readable kernel BTF at {KERNEL_BTF}");
            return;
        };
        let get = |name| offsets.values.iter().find(|(n, _)| *n == name).unwrap().1;
        // Facts of every kernel since 4.x: the address pair opens the
        // struct, family precedes state, TIME_WAIT fields follow it.
        assert_eq!(get(offsets::SKC_DADDR), 0);
        assert_eq!(get(offsets::SKC_RCV_SADDR), 4);
        assert_eq!(get(offsets::SKC_STATE), get(offsets::SKC_FAMILY) + 2);
        assert!(get(offsets::TW_SUBSTATE) >= 136);
    }

    #[test]
    fn a_wrong_size_is_refused() {
        let Ok(btf) = Btf::from_file(KERNEL_BTF) else {
            eprintln!("SKIPPED: no readable kernel BTF at {KERNEL_BTF}");
            return;
        };
        assert!(offset_of(&btf, "sock_common", "skc_state", 1).is_some());
        assert!(offset_of(&btf, "sock_common", "skc_state", 4).is_none());
        assert!(offset_of(&btf, "sock_common", "no_such_field", 1).is_none());
    }

    #[test]
    fn output_without_summary_or_with_garbage_is_an_error() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0, 0, 0, 8, 0, 0, 0]).is_err());
        assert!(decode(&[2, 0, 0, 0]).is_err());
    }
}
