//! Field offsets from the running kernel's BTF. aya-ebpf has no CO-RE, so
//! the programs that read kernel structs (the census reads `sock_common`,
//! the state tracepoint also `sock`, `inet_sock` and `tcp_sock`) get their
//! offsets as read-only globals,
//! resolved here at load time and checked against the sizes they read.

use btf_rs::{Btf, Type};
use handshake_common::abi::census::offsets;
use thiserror::Error;

/// Where the running kernel describes its types.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading the kernel's BTF at {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the kernel's BTF has no field {field} in struct {strukt} of {size} bytes")]
    Field {
        strukt: &'static str,
        field: &'static str,
        size: usize,
    },
}

/// `struct sock_common` and `inet_timewait_sock` field offsets, as the
/// program's globals want them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub values: [(&'static str, u32); 39],
}

impl Offsets {
    /// Resolves every field from the kernel's BTF at `path`, checking each
    /// field's size against what the program reads.
    pub fn resolve(path: &str) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|e| BtfError::Read {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        })?;
        let sc = "sock_common";
        let field = |strukt, field, size, global| -> Result<(&'static str, u32), BtfError> {
            offset_of(&btf, strukt, field, size)
                .map(|off| (global, off))
                .ok_or(BtfError::Field {
                    strukt,
                    field,
                    size,
                })
        };
        // A field some kernels lack: offset 0, which the program reads as
        // "absent".
        let optional = |strukt, field, size, global| {
            (global, offset_of(&btf, strukt, field, size).unwrap_or(0))
        };
        // A field of a struct embedded in another: `outer.member.inner`.
        let nested = |outer: &'static str,
                      member: &'static str,
                      embedded: &'static str,
                      inner: &'static str,
                      size: usize,
                      global: &'static str|
         -> Result<(&'static str, u32), BtfError> {
            let whole = size_of_struct(&btf, embedded)?;
            Ok((
                global,
                field(outer, member, whole, "")?.1 + field(embedded, inner, size, "")?.1,
            ))
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
                field("sock", "sk_err", 4, offsets::SK_ERR)?,
                field("inet_sock", "inet_sport", 2, offsets::INET_SPORT)?,
                field("tcp_sock", "srtt_us", 4, offsets::TCP_SRTT_US)?,
                field("tcp_sock", "total_retrans", 4, offsets::TCP_TOTAL_RETRANS)?,
                field("tcp_sock", "data_segs_in", 4, offsets::TCP_DATA_SEGS_IN)?,
                field("tcp_sock", "data_segs_out", 4, offsets::TCP_DATA_SEGS_OUT)?,
                field("tcp_sock", "retrans_stamp", 4, offsets::TCP_RETRANS_STAMP)?,
                nested("net", "ns", "ns_common", "inum", 4, offsets::NET_NS_INUM)?,
                nested(
                    "sock",
                    "sk_cgrp_data",
                    "sock_cgroup_data",
                    "cgroup",
                    8,
                    offsets::SK_CGROUP,
                )?,
                field("cgroup", "kn", 8, offsets::CGROUP_KN)?,
                field("kernfs_node", "id", 8, offsets::KERNFS_ID)?,
                field("sock", "sk_socket", 8, offsets::SK_SOCKET)?,
                field("sock", "sk_ack_backlog", 4, offsets::SK_ACK_BACKLOG)?,
                field("sock", "sk_max_ack_backlog", 4, offsets::SK_MAX_ACK_BACKLOG)?,
                field("sock", "sk_drops", 4, offsets::SK_DROPS)?,
                optional("sock", "sk_drop_counters", 8, offsets::SK_DROP_COUNTERS),
                optional("numa_drop_counters", "drops0", 4, offsets::NDC_DROPS0),
                optional("numa_drop_counters", "drops1", 4, offsets::NDC_DROPS1),
                nested(
                    "inet_connection_sock",
                    "icsk_accept_queue",
                    "request_sock_queue",
                    "qlen",
                    4,
                    offsets::ICSK_SYN_QLEN,
                )?,
                field("sock", "sk_reuseport_cb", 8, offsets::SK_REUSEPORT_CB)?,
                field(
                    "sock_reuseport",
                    "synq_overflow_ts",
                    4,
                    offsets::REUSEPORT_SYNQ_TS,
                )?,
                nested(
                    "tcp_sock",
                    "rx_opt",
                    "tcp_options_received",
                    "ts_recent_stamp",
                    4,
                    offsets::TCP_TS_RECENT_STAMP,
                )?,
                field("sk_buff", "head", 8, offsets::SKB_HEAD)?,
                field("sk_buff", "network_header", 2, offsets::SKB_NETWORK_HEADER)?,
                field(
                    "sk_buff",
                    "transport_header",
                    2,
                    offsets::SKB_TRANSPORT_HEADER,
                )?,
                field("sk_buff", "protocol", 2, offsets::SKB_PROTOCOL)?,
                field("sk_buff", "dev", 8, offsets::SKB_DEV)?,
                field("net_device", "nd_net", 8, offsets::NETDEV_ND_NET)?,
            ],
        })
    }
}

/// Size of struct `name`.
fn size_of_struct(btf: &Btf, name: &'static str) -> Result<usize, BtfError> {
    btf.resolve_types_by_name(name)
        .ok()
        .and_then(|types| {
            types.into_iter().find_map(|t| match t {
                Type::Struct(s) => Some(s.size()),
                _ => None,
            })
        })
        .ok_or(BtfError::Field {
            strukt: name,
            field: "(itself)",
            size: 0,
        })
}

/// Byte offset of `field` in struct `strukt`, looking through anonymous
/// structs and unions, if its type is `size` bytes.
pub fn offset_of(btf: &Btf, strukt: &str, field: &str, size: usize) -> Option<u32> {
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
            Type::Ptr(_) => return Some(8),
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

/// The kernel's drop reasons by number (`enum skb_drop_reason`), named in
/// lower case without the `SKB_DROP_REASON_` prefix, as the kernel spells
/// them (`no_socket`, `tcp_listen_overflow`...). Their numbers move
/// between kernels; empty when this kernel's BTF has no such enum.
pub fn drop_reasons(path: &str) -> std::collections::BTreeMap<u32, String> {
    let Ok(btf) = Btf::from_file(path) else {
        return Default::default();
    };
    let Ok(types) = btf.resolve_types_by_name("skb_drop_reason") else {
        return Default::default();
    };
    let Some(Type::Enum(reasons)) = types.into_iter().find(|t| matches!(t, Type::Enum(_))) else {
        return Default::default();
    };
    reasons
        .members
        .iter()
        .filter_map(|member| {
            let name = btf.resolve_name(member).ok()?;
            let name = name.strip_prefix("SKB_DROP_REASON_").unwrap_or(&name);
            Some((member.val(), name.to_ascii_lowercase()))
        })
        .collect()
}
