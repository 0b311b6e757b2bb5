//! `skb:kfree_skb`: handshake packets the kernel dropped, and why. The
//! kernel passes every freed-as-dropped packet with its reason (`enum
//! skb_drop_reason`) and the socket that received it, if any. SYNs,
//! SYN-ACKs, and pure ACKs a listener received (a handshake's final ACK)
//! are counted per namespace, server port, packet and reason; anything
//! else returns after a few loads. Headers are read with
//! `bpf_probe_read_kernel` from the packet's head at the offsets the
//! stack recorded (the linear part: a dropped handshake packet is small).

use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
};

use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::map, maps::PerCpuHashMap};
use handshake_common::{
    abi::{
        FlowStat, IPPROTO_TCP,
        drops::{DROP_ENTRIES, DropKey, PACKET_ACK, PACKET_SYN, PACKET_SYN_ACK},
        tcp_state,
    },
    packet::{
        ETH_P_IP, ETH_P_IPV6,
        tcp_flags::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN},
    },
};

use crate::census::{OFF_NET_NS_INUM, OFF_SKC_STATE, field, netns_inum, offset};

#[map]
static HANDSHAKE_DROPS: PerCpuHashMap<DropKey, u64> =
    PerCpuHashMap::with_max_entries(DROP_ENTRIES, 0);

// `struct sk_buff` and `struct net_device` offsets, set at load from BTF.
#[unsafe(no_mangle)]
static OFF_SKB_HEAD: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_NETWORK_HEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_TRANSPORT_HEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_PROTOCOL: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_DEV: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NETDEV_ND_NET: u32 = 0;

/// Reasons that free whole queues, not packets on their way (a closed
/// socket's unread data: `queue_purge`, `socket_close`): skipped before
/// any read, as this kernel numbers them (set at load from BTF; no reason
/// is `u32::MAX`). Loopback churn frees one such packet a connection.
#[unsafe(no_mangle)]
static SKIP_REASON_QUEUE_PURGE: u32 = u32::MAX;
#[unsafe(no_mangle)]
static SKIP_REASON_SOCKET_CLOSE: u32 = u32::MAX;

/// `skb->transport_header` when unset.
const UNSET: u16 = 0xffff;

/// Copies `N` bytes of kernel memory at `address`, `None` on a fault (a
/// packet shorter than `N` from there may still copy: what lies past it
/// in the buffer is not read as headers).
#[inline(always)]
fn read<const N: usize>(address: u64) -> Option<[u8; N]> {
    // Not zeroed first: a zeroed array on the stack compiles to a
    // byte-at-a-time memset, ~300 ns for these 128 bytes; the helper
    // writes every byte (zeros on a fault).
    let mut out = MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helper checks the source and writes all N bytes.
    let rc = unsafe {
        bpf_probe_read_kernel(
            out.as_mut_ptr().cast::<c_void>(),
            N as u32,
            address as *const c_void,
        )
    };
    // SAFETY: written in full by the helper, on success and on failure.
    (rc == 0).then(|| unsafe { out.assume_init() })
}

/// A dropped packet: counted when it is a handshake packet.
#[inline(always)]
pub fn dropped(skb: *const u8, reason: u32, rx_sk: *const u8) {
    // SAFETY: plain reads of globals set at load.
    let skipped = unsafe {
        [
            core::ptr::read_volatile(&SKIP_REASON_QUEUE_PURGE),
            core::ptr::read_volatile(&SKIP_REASON_SOCKET_CLOSE),
        ]
    };
    if skipped.contains(&reason) {
        return;
    }
    // SAFETY: `skb` is the tracepoint's BTF-typed `struct sk_buff *`; the
    // offsets are its fields' (resolved from BTF, checked by the verifier).
    let (protocol, nh, th) = unsafe {
        (
            u16::from_be(field::<u16>(skb, offset(&OFF_SKB_PROTOCOL))),
            field::<u16>(skb, offset(&OFF_SKB_NETWORK_HEADER)),
            field::<u16>(skb, offset(&OFF_SKB_TRANSPORT_HEADER)),
        )
    };
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return;
    }
    // The head: a `char *` field, which the verifier loads as a plain
    // number (no BTF type to check), so it may be added to.
    // SAFETY: a field of `struct sk_buff` at its BTF offset.
    let head: u64 = unsafe { field(skb, offset(&OFF_SKB_HEAD)) };
    // One copy of the IP header and the TCP header's first 14 bytes: a
    // helper call costs more than the bytes.
    let Some(headers) = read::<HEADERS>(head + u64::from(nh)) else {
        crate::stat(FlowStat::DropParseFailures);
        return;
    };
    let Some(at) = tcp_offset(&headers, protocol, nh, th) else {
        return;
    };
    let (sport, dport, flags) = (
        u16::from_be_bytes([headers[at & MASK], headers[(at + 1) & MASK]]),
        u16::from_be_bytes([headers[(at + 2) & MASK], headers[(at + 3) & MASK]]),
        headers[(at + 13) & MASK],
    );
    let (packet, port) = if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
        (PACKET_SYN, dport)
    } else if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN | TCP_ACK {
        (PACKET_SYN_ACK, sport)
    } else if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_ACK
        && !rx_sk.is_null()
        // SAFETY: `rx_sk` is the tracepoint's BTF-typed socket.
        && u32::from(unsafe { field::<u8>(rx_sk, offset(&OFF_SKC_STATE)) }) == tcp_state::LISTEN
    {
        (PACKET_ACK, dport)
    } else {
        return;
    };
    let key = DropKey {
        netns: netns_of(skb, rx_sk),
        reason,
        port,
        packet,
        _pad: 0,
    };
    if let Some(count) = HANDSHAKE_DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value; programs do not nest on a CPU.
        unsafe { *count += 1 };
    } else if HANDSHAKE_DROPS.insert(&key, &1, 0).is_err() {
        crate::stat(FlowStat::HandshakeDropsFull);
    }
}

/// Bytes copied from the network header: an IPv4 header with options
/// (60) and the TCP header's first 14, rounded to a power of two so an
/// index can be masked into bounds.
const HEADERS: usize = 128;
const MASK: usize = HEADERS - 1;

/// Where the TCP header starts in `headers` (copied from the network
/// header), when the packet is TCP and its first 14 bytes were copied.
#[inline(always)]
fn tcp_offset(headers: &[u8; HEADERS], protocol: u16, nh: u16, th: u16) -> Option<usize> {
    let header_len = if protocol == ETH_P_IP {
        if headers[0] >> 4 != 4 || u16::from(headers[9]) != IPPROTO_TCP {
            return None;
        }
        usize::from(headers[0] & 0x0f) * 4
    } else {
        // No extension headers: a handshake packet carries none here.
        if headers[0] >> 4 != 6 || u16::from(headers[6]) != IPPROTO_TCP {
            return None;
        }
        40
    };
    // The stack sets the transport header once it has parsed the IP
    // header; a packet dropped before (netfilter's PREROUTING) has none.
    let at = if th == UNSET || th <= nh {
        header_len
    } else {
        usize::from(th - nh)
    };
    (at + 14 <= HEADERS).then_some(at)
}

/// The namespace of the device that received the packet, else of the
/// receiving socket; 0 when neither tells.
#[inline(always)]
fn netns_of(skb: *const u8, rx_sk: *const u8) -> u32 {
    // SAFETY: BTF-typed loads (`sk_buff.dev`, `net_device.nd_net.net`,
    // `net.ns.inum`); a NULL pointer's field reads 0.
    let inum = unsafe {
        let dev: *const u8 = field(skb, offset(&OFF_SKB_DEV));
        let net: *const u8 = field(dev, offset(&OFF_NETDEV_ND_NET));
        field::<u32>(net, offset(&OFF_NET_NS_INUM))
    };
    if inum == 0 && !rx_sk.is_null() {
        netns_inum(rx_sk)
    } else {
        inum
    }
}

const _: () = assert!(size_of::<DropKey>() == 12);
