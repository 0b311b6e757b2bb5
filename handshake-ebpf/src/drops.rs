//! `skb:kfree_skb`: handshake packets the kernel dropped, and why. The
//! kernel passes every freed-as-dropped packet with its reason (`enum
//! skb_drop_reason`) and the socket that received it, if any. SYNs,
//! SYN-ACKs, and pure ACKs a listener received (a handshake's final ACK)
//! are counted per namespace, server port, packet and reason; anything
//! else returns after a few loads. Headers are read with
//! `bpf_probe_read_kernel` from the packet's head at the offsets the
//! stack recorded (the linear part: a dropped handshake packet is small).

use core::{ffi::c_void, mem::size_of};

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

/// `skb->transport_header` when unset.
const UNSET: u16 = 0xffff;

/// Copies `N` bytes of kernel memory at `address`, `None` on a fault.
#[inline(always)]
fn read<const N: usize>(address: u64) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: the helper checks the source and writes at most N bytes.
    let rc = unsafe {
        bpf_probe_read_kernel(
            out.as_mut_ptr().cast::<c_void>(),
            N as u32,
            address as *const c_void,
        )
    };
    (rc == 0).then_some(out)
}

/// A dropped packet: counted when it is a handshake packet.
#[inline(always)]
pub fn dropped(skb: *const u8, reason: u32, rx_sk: *const u8) {
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
    // The head as a number: the verifier allows no arithmetic on it.
    let Some(head) = read::<8>(skb as u64 + offset(&OFF_SKB_HEAD) as u64) else {
        crate::stat(FlowStat::DropParseFailures);
        return;
    };
    let network = u64::from_ne_bytes(head) + u64::from(nh);
    let Some(tcp) = tcp_at(network, protocol, th, u64::from_ne_bytes(head)) else {
        return;
    };
    let Some(header) = read::<14>(tcp) else {
        crate::stat(FlowStat::DropParseFailures);
        return;
    };
    let (sport, dport, flags) = (
        u16::from_be_bytes([header[0], header[1]]),
        u16::from_be_bytes([header[2], header[3]]),
        header[13],
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

/// The TCP header's address, when the packet at `network` is TCP.
#[inline(always)]
fn tcp_at(network: u64, protocol: u16, th: u16, head: u64) -> Option<u64> {
    let ip = read::<10>(network)?;
    let header_len = if protocol == ETH_P_IP {
        if ip[0] >> 4 != 4 || u16::from(ip[9]) != IPPROTO_TCP {
            return None;
        }
        u64::from(ip[0] & 0x0f) * 4
    } else {
        // No extension headers: a handshake packet carries none here.
        if ip[0] >> 4 != 6 || u16::from(ip[6]) != IPPROTO_TCP {
            return None;
        }
        40
    };
    // The stack sets the transport header once it has parsed the IP
    // header; a packet dropped before (netfilter's PREROUTING) has none.
    Some(if th == UNSET || th == 0 {
        network + header_len
    } else {
        head + u64::from(th)
    })
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
