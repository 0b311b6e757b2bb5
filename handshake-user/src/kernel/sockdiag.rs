//! The census through sock_diag netlink (`netlink-packet-sock-diag`), for
//! kernels where the `iter/tcp` program cannot be loaded: the same
//! [`NetnsCensus`](super::census::NetnsCensus), counted in userspace from a dump of every TCP socket of
//! the calling thread's namespace — what `ss` does. Slower, and the daemon's
//! memory grows with the dump while it runs; ages are unknown.

use std::{collections::HashMap, net::IpAddr};

use handshake_common::abi::{
    AF_INET, AF_INET6,
    census::{
        Header, Listener, RECORD_LISTENER, RECORD_SOCKET, RECORD_SUMMARY, SUMMARY_ROW_IPV4,
        SUMMARY_ROW_IPV6, Socket, Summary, TW_LOCAL_ENTRIES, TW_REMOTE_ENTRIES, TwKey,
    },
    tcp_state,
};

use crate::kernel::census::MAX_LISTENERS;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::IPPROTO_TCP,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, Timer},
};
use netlink_sys::{Socket as NetlinkSocket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// What one dump gathered, before it becomes a snapshot.
#[derive(Debug)]
pub struct Dump {
    pub summary: Summary,
    pub sockets: Vec<Socket>,
    /// Listeners with their accept queues (the header's queues); the SYN
    /// queue and drops are not read here (0).
    pub listeners: Vec<Listener>,
    pub tw_remote: HashMap<TwKey, u64>,
    pub tw_local: HashMap<TwKey, u64>,
}

fn bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// Dumps every TCP socket of the calling thread's namespace and counts them
/// as the `iter/tcp` program does.
pub fn dump(socket_states: u32, max_sockets: u32, ephemeral: (u16, u16)) -> std::io::Result<Dump> {
    let mut dump = Dump {
        summary: Summary {
            header: Header {
                kind: RECORD_SUMMARY,
                len: size_of::<Summary>() as u32,
            },
            ..Summary::default()
        },
        sockets: Vec::new(),
        listeners: Vec::new(),
        tw_remote: HashMap::new(),
        tw_local: HashMap::new(),
    };
    for family in [AF_INET, AF_INET6] {
        each_socket(family, |header| {
            count(&mut dump, header, socket_states, max_sockets, ephemeral);
        })?;
    }
    Ok(dump)
}

fn count(
    dump: &mut Dump,
    header: &InetResponseHeader,
    socket_states: u32,
    max_sockets: u32,
    ephemeral: (u16, u16),
) {
    let summary = &mut dump.summary;
    summary.seen += 1;
    let (fam, family) = match u16::from(header.family) {
        AF_INET => (SUMMARY_ROW_IPV4, AF_INET),
        AF_INET6 => (SUMMARY_ROW_IPV6, AF_INET6),
        _ => {
            summary.read_errors += 1;
            return;
        }
    };
    // sock_diag already reports request sockets as SYN_RECV and TIME_WAIT
    // minisocks by their substate; the TIME_WAIT timer tells minisocks.
    let state = u32::from(header.state) & 0xf;
    summary.sockets[fam][state as usize] += 1;
    let id = &header.socket_id;
    let (local, remote) = (bytes(id.source_address), bytes(id.destination_address));
    let minisock = matches!(header.timer, Some(Timer::TimeWait));
    if state == tcp_state::LISTEN && dump.listeners.len() < MAX_LISTENERS as usize {
        dump.listeners.push(Listener {
            header: Header {
                kind: RECORD_LISTENER,
                len: size_of::<Listener>() as u32,
            },
            family,
            local_port: id.source_port,
            local_addr: local,
            accept_queue: header.recv_queue,
            accept_queue_max: header.send_queue,
            ..Listener::default()
        });
    }
    if minisock && state == tcp_state::FIN_WAIT2 {
        summary.tw_fin_wait2[fam] += 1;
    }
    if state == tcp_state::TIME_WAIT {
        let client = (ephemeral.0..=ephemeral.1).contains(&id.source_port);
        let remote_key = TwKey {
            family,
            port: if client { id.destination_port } else { 0 },
            addr: remote,
        };
        let local_key = TwKey {
            family,
            port: 0,
            addr: local,
        };
        for (map, key, cap, overflow) in [
            (
                &mut dump.tw_remote,
                remote_key,
                TW_REMOTE_ENTRIES,
                &mut summary.tw_remote_overflow,
            ),
            (
                &mut dump.tw_local,
                local_key,
                TW_LOCAL_ENTRIES,
                &mut summary.tw_local_overflow,
            ),
        ] {
            if let Some(count) = map.get_mut(&key) {
                *count += 1;
            } else if map.len() < cap as usize {
                map.insert(key, 1);
            } else {
                *overflow += 1;
            }
        }
    }
    if !minisock && socket_states & (1 << state) != 0 {
        if summary.sockets_written >= u64::from(max_sockets) {
            summary.sockets_dropped += 1;
            return;
        }
        summary.sockets_written += 1;
        dump.sockets.push(Socket {
            header: Header {
                kind: RECORD_SOCKET,
                len: size_of::<Socket>() as u32,
            },
            family,
            state: state as u16,
            local_port: id.source_port,
            remote_port: id.destination_port,
            local_addr: local,
            remote_addr: remote,
            since_ns: 0,
            pid: 0,
            _pad: 0,
            comm: [0; 16],
            // Not read from the dump here: the netlink fallback does
            // without attribution.
            cgroup: 0,
        });
    }
}

/// Calls `f` with every TCP socket of `family` in the calling thread's
/// namespace.
fn each_socket(family: u16, mut f: impl FnMut(&InetResponseHeader)) -> std::io::Result<()> {
    let mut socket = NetlinkSocket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: family as u8,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut received = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..size])
                .map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
            })?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    f(&response.header);
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return Err(std::io::Error::other(format!("sock_diag: {error:?}")));
                }
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
