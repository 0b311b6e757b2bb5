//! The kernel programs. Thin glue only: each entry point reads its context
//! through `handshake-common` and bumps per-CPU counters. Every packet hook
//! returns a pass verdict on every path; every failure is counted.
//!
//! Packet bytes are read directly where they lie in the linear part of the
//! packet, and with `bpf_xdp_load_bytes` / `bpf_skb_load_bytes` otherwise:
//! the helpers also see multi-buffer XDP frames and non-linear skbs (egress
//! payloads often live in page frags).
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{classifier, map, tracepoint, xdp},
    maps::PerCpuArray,
    programs::{TcContext, TracePointContext, XdpContext},
};
use handshake_common::{
    abi::{
        self, AF_INET, AF_INET6, Direction, IPPROTO_TCP, PACKET_COUNTS_LEN, PacketKind, ParseError,
        TRANSITIONS_LEN, inet_sock_set_state as tp,
    },
    packet::{Packet, parse_tcp, tcp_flags},
    tls::HelloKind,
};

#[map]
static PACKET_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PACKET_COUNTS_LEN, 0);

#[map]
static PARSE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ParseError::COUNT, 0);

#[map]
static TRANSITIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRANSITIONS_LEN, 0);

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing
        // else on this CPU runs this program concurrently.
        unsafe { *slot += 1 };
    }
}

/// Largest offset read with direct packet access (a mask: 2^n - 1).
const DIRECT_MAX_OFFSET: usize = 0x1ff;

/// `N` bytes at `offset` when they lie in the linear part of the packet.
///
/// Headers almost always do, and a direct read costs a compare where the
/// load helpers cost a call: on 6.18 the XDP program's own cost for a bare
/// ACK fell from ~76 to ~18 ns (`cargo xtask bench`). The mask bounds the
/// variable offset for the verifier; no header we walk lies past it. `None`
/// sends the caller to the helper, which also reaches multi-buffer frags and
/// non-linear skb data.
#[inline(always)]
fn load_direct<const N: usize>(data: usize, data_end: usize, offset: usize) -> Option<[u8; N]> {
    if offset > DIRECT_MAX_OFFSET {
        return None;
    }
    let start = data + (offset & DIRECT_MAX_OFFSET);
    if start + N > data_end {
        return None;
    }
    // SAFETY: [start, start + N) was just checked to lie inside the packet's
    // linear data; read_unaligned has no alignment requirement.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

struct Xdp<'a>(&'a XdpContext);

impl Packet for Xdp<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        // SAFETY: the helper only reads the frame descriptor we were given.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as usize }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if let Some(bytes) = load_direct(self.0.data(), self.0.data_end(), offset) {
            return Some(bytes);
        }
        let mut buf = MaybeUninit::<[u8; N]>::uninit();
        // SAFETY: the helper writes exactly N bytes into `buf` or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                buf.as_mut_ptr().cast::<c_void>(),
                N as u32,
            )
        };
        // SAFETY: a zero return means all N bytes were written.
        (ret == 0).then(|| unsafe { buf.assume_init() })
    }
}

struct Skb<'a>(&'a TcContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        load_direct(self.0.data(), self.0.data_end(), offset)
            .or_else(|| self.0.load::<[u8; N]>(offset).ok())
    }
}

/// Counts one frame; whatever happens, the caller passes it on.
#[inline(always)]
fn count_frame<P: Packet>(packet: &P, direction: Direction) {
    let segment = match parse_tcp(packet) {
        Ok(Some(segment)) => segment,
        Ok(None) => return,
        Err(error) => {
            bump(&PARSE_ERRORS, error as u32);
            return;
        }
    };
    let count = |kind| bump(&PACKET_COUNTS, abi::packet_count_index(direction, kind));
    if segment.is_syn() {
        count(PacketKind::Syn);
    } else if segment.is_syn_ack() {
        count(PacketKind::SynAck);
    }
    if segment.has(tcp_flags::FIN) {
        count(PacketKind::Fin);
    }
    if segment.has(tcp_flags::RST) {
        count(PacketKind::Rst);
    }
    match segment.tls_hello(packet) {
        Some(HelloKind::Client) => count(PacketKind::ClientHello),
        Some(HelloKind::Server) => count(PacketKind::ServerHello),
        None => {}
    }
}

#[xdp(frags)]
pub fn xdp_handshake(ctx: XdpContext) -> u32 {
    count_frame(&Xdp(&ctx), Direction::Ingress);
    XDP_PASS
}

#[classifier]
pub fn tc_in_handshake(ctx: TcContext) -> i32 {
    count_frame(&Skb(&ctx), Direction::Ingress);
    TC_ACT_OK
}

#[classifier]
pub fn tc_eg_handshake(ctx: TcContext) -> i32 {
    count_frame(&Skb(&ctx), Direction::Egress);
    TC_ACT_OK
}

/// `sock:inet_sock_set_state`: one count per (old, new) state of a TCP
/// socket, both families.
#[tracepoint]
pub fn tp_sock_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets and sizes come from the tracepoint's format file,
    // a stable ABI; `read_at` reads them with bpf_probe_read.
    let fields = unsafe {
        (
            ctx.read_at::<u16>(tp::PROTOCOL),
            ctx.read_at::<u16>(tp::FAMILY),
            ctx.read_at::<i32>(tp::OLDSTATE),
            ctx.read_at::<i32>(tp::NEWSTATE),
        )
    };
    let (Ok(protocol), Ok(family), Ok(old), Ok(new)) = fields else {
        return 0;
    };
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return 0;
    }
    if let Some(index) = abi::transition_index(old as u32, new as u32) {
        bump(&TRANSITIONS, index);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// Benchmark baseline only, never attached: the cheapest possible XDP
/// program, built by the same toolchain into the same object, so that
/// `cargo xtask bench` can report our ingress cost as a ratio to it.
#[xdp]
pub fn xdp_pass_base(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
