//! Field offsets from the running kernel's BTF, as the daemon resolves
//! them for its programs, against bpftool's reading of the same BTF.

use std::collections::HashMap;

use btf_rs::Btf;
use handshake_common::abi::census::offsets;
use handshake_tests::{sh, skip};
use handshake_user::kernel::btf::{KERNEL_BTF, Offsets, offset_of};

/// A member: name, type id, bit offset.
type Member = (String, u32, u32);

/// A struct or union: its name and members.
type Composite = (String, Vec<Member>);

/// Struct and union members as `bpftool btf dump format raw` lists them,
/// per type id.
struct RawBtf {
    types: HashMap<u32, Composite>,
}

impl RawBtf {
    fn dump() -> Self {
        let text = sh(
            "bpftool",
            &["btf", "dump", "file", KERNEL_BTF, "format", "raw"],
        );
        let mut types = HashMap::new();
        let mut current: Option<(u32, Composite)> = None;
        for line in text.lines() {
            if let Some(member) = line.strip_prefix('\t') {
                if let (Some((_, (_, members))), Some(parsed)) = (&mut current, member_of(member)) {
                    members.push(parsed);
                }
                continue;
            }
            if let Some((id, composite)) = current.take() {
                types.insert(id, composite);
            }
            let mut words = line.split_whitespace();
            let (Some(id), Some(kind), Some(name)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if kind == "STRUCT" || kind == "UNION" {
                let id = id.trim_matches(['[', ']']).parse().expect("type id");
                current = Some((id, (name.trim_matches('\'').to_owned(), Vec::new())));
            }
        }
        if let Some((id, composite)) = current {
            types.insert(id, composite);
        }
        Self { types }
    }

    /// Byte offset of `field` in struct `strukt`, looking through
    /// anonymous members.
    fn offset(&self, strukt: &str, field: &str) -> u32 {
        let id = self
            .types
            .iter()
            .filter(|(_, (name, _))| name == strukt)
            .map(|(id, _)| *id)
            .min()
            .unwrap_or_else(|| panic!("bpftool lists no struct {strukt}"));
        self.find(id, field)
            .unwrap_or_else(|| panic!("bpftool lists no {strukt}.{field}"))
            / 8
    }

    fn find(&self, id: u32, field: &str) -> Option<u32> {
        let (_, members) = self.types.get(&id)?;
        members.iter().find_map(|(name, ty, bits)| {
            if name == field {
                Some(*bits)
            } else if name == "(anon)" {
                self.find(*ty, field).map(|inner| bits + inner)
            } else {
                None
            }
        })
    }
}

/// `'skc_state' type_id=21 bits_offset=144` → ("skc_state", 21, 144).
fn member_of(line: &str) -> Option<Member> {
    let mut words = line.split_whitespace();
    let name = words.next()?.trim_matches('\'').to_owned();
    let ty = words.next()?.strip_prefix("type_id=")?.parse().ok()?;
    let bits = words.next()?.strip_prefix("bits_offset=")?.parse().ok()?;
    Some((name, ty, bits))
}

#[test]
fn offsets_equal_what_bpftool_reads_from_the_same_btf() {
    let Ok(resolved) = Offsets::resolve(KERNEL_BTF) else {
        return skip(&format!("no readable kernel BTF at {KERNEL_BTF}"));
    };
    let raw = RawBtf::dump();
    let sc = "sock_common";
    let expected = [
        (offsets::SKC_DADDR, raw.offset(sc, "skc_daddr")),
        (offsets::SKC_RCV_SADDR, raw.offset(sc, "skc_rcv_saddr")),
        (offsets::SKC_DPORT, raw.offset(sc, "skc_dport")),
        (offsets::SKC_NUM, raw.offset(sc, "skc_num")),
        (offsets::SKC_FAMILY, raw.offset(sc, "skc_family")),
        (offsets::SKC_STATE, raw.offset(sc, "skc_state")),
        (offsets::SKC_V6_DADDR, raw.offset(sc, "skc_v6_daddr")),
        (
            offsets::SKC_V6_RCV_SADDR,
            raw.offset(sc, "skc_v6_rcv_saddr"),
        ),
        (
            offsets::TW_SUBSTATE,
            raw.offset("inet_timewait_sock", "tw_substate"),
        ),
        (offsets::SKC_NET, raw.offset(sc, "skc_net")),
        (offsets::SK_PROTOCOL, raw.offset("sock", "sk_protocol")),
        (offsets::SK_ERR, raw.offset("sock", "sk_err")),
        (offsets::INET_SPORT, raw.offset("inet_sock", "inet_sport")),
        (offsets::TCP_SRTT_US, raw.offset("tcp_sock", "srtt_us")),
        (
            offsets::TCP_TOTAL_RETRANS,
            raw.offset("tcp_sock", "total_retrans"),
        ),
        (
            offsets::TCP_DATA_SEGS_IN,
            raw.offset("tcp_sock", "data_segs_in"),
        ),
        (
            offsets::TCP_DATA_SEGS_OUT,
            raw.offset("tcp_sock", "data_segs_out"),
        ),
        (
            offsets::TCP_RETRANS_STAMP,
            raw.offset("tcp_sock", "retrans_stamp"),
        ),
        (
            offsets::NET_NS_INUM,
            raw.offset("net", "ns") + raw.offset("ns_common", "inum"),
        ),
        (
            offsets::SK_CGROUP,
            raw.offset("sock", "sk_cgrp_data") + raw.offset("sock_cgroup_data", "cgroup"),
        ),
        (offsets::CGROUP_KN, raw.offset("cgroup", "kn")),
        (offsets::KERNFS_ID, raw.offset("kernfs_node", "id")),
        (offsets::SK_SOCKET, raw.offset("sock", "sk_socket")),
        (
            offsets::SK_ACK_BACKLOG,
            raw.offset("sock", "sk_ack_backlog"),
        ),
        (
            offsets::SK_MAX_ACK_BACKLOG,
            raw.offset("sock", "sk_max_ack_backlog"),
        ),
        (offsets::SK_DROPS, raw.offset("sock", "sk_drops")),
        (
            offsets::SK_DROP_COUNTERS,
            raw.offset("sock", "sk_drop_counters"),
        ),
        (
            offsets::NDC_DROPS0,
            raw.offset("numa_drop_counters", "drops0"),
        ),
        (
            offsets::NDC_DROPS1,
            raw.offset("numa_drop_counters", "drops1"),
        ),
        (
            offsets::ICSK_SYN_QLEN,
            raw.offset("inet_connection_sock", "icsk_accept_queue")
                + raw.offset("request_sock_queue", "qlen"),
        ),
        (
            offsets::SK_REUSEPORT_CB,
            raw.offset("sock", "sk_reuseport_cb"),
        ),
        (
            offsets::REUSEPORT_SYNQ_TS,
            raw.offset("sock_reuseport", "synq_overflow_ts"),
        ),
        (
            offsets::TCP_TS_RECENT_STAMP,
            raw.offset("tcp_sock", "rx_opt")
                + raw.offset("tcp_options_received", "ts_recent_stamp"),
        ),
        (offsets::SKB_HEAD, raw.offset("sk_buff", "head")),
        (
            offsets::SKB_NETWORK_HEADER,
            raw.offset("sk_buff", "network_header"),
        ),
        (
            offsets::SKB_TRANSPORT_HEADER,
            raw.offset("sk_buff", "transport_header"),
        ),
        (offsets::SKB_PROTOCOL, raw.offset("sk_buff", "protocol")),
        (offsets::SKB_DEV, raw.offset("sk_buff", "dev")),
        (offsets::NETDEV_ND_NET, raw.offset("net_device", "nd_net")),
    ];
    assert_eq!(resolved.values.len(), expected.len());
    for (global, offset) in expected {
        let ours = resolved
            .values
            .iter()
            .find(|(name, _)| *name == global)
            .unwrap_or_else(|| panic!("{global} not resolved"))
            .1;
        assert_eq!(ours, offset, "{global}: ours against bpftool's");
    }
}

#[test]
fn a_wrong_size_is_refused() {
    let Ok(btf) = Btf::from_file(KERNEL_BTF) else {
        return skip(&format!("no readable kernel BTF at {KERNEL_BTF}"));
    };
    assert!(offset_of(&btf, "sock_common", "skc_state", 1).is_some());
    assert!(offset_of(&btf, "sock_common", "skc_state", 4).is_none());
    assert!(offset_of(&btf, "sock_common", "no_such_field", 1).is_none());
}
