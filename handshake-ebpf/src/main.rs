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

mod census;
mod drops;
mod socket;
mod tls;

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_NO_COMMON_LRU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        TC_ACT_UNSPEC, xdp_action::XDP_PASS,
    },
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::{btf_tracepoint, classifier, map, xdp},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TcContext, XdpContext},
};
use handshake_common::{
    abi::{
        self, Direction, EVENTS_BYTES, EVENTS_WAKEUP_BYTES, FLOWS_ENTRIES, FlowStat,
        HALF_OPEN_ENTRIES, PACKET_COUNTS_LEN, PacketKind, ParseError, TRANSITIONS_LEN,
    },
    flow::{Flow, FlowKey, Step},
    packet::{Packet, TcpSegment, parse_tcp, tcp_flags},
    tls::HelloKind,
};

#[map]
static PACKET_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PACKET_COUNTS_LEN, 0);

#[map]
static PARSE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ParseError::COUNT, 0);

#[map]
static TRANSITIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRANSITIONS_LEN, 0);

/// LRU with per-CPU free lists (`BPF_F_NO_COMMON_LRU`): inserts and
/// evictions take no lock shared between CPUs, which matters under churn.
#[map]
static HALF_OPEN: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(HALF_OPEN_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(FLOWS_ENTRIES, BPF_F_NO_COMMON_LRU);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static FLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FlowStat::COUNT, 0);

/// One `Flow` of per-CPU scratch space: the 512-byte BPF stack has no room
/// for the copies `track` makes next to the parser's buffers.
#[map]
static SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn stat(which: FlowStat) {
    bump(&FLOW_STATS, which as u32);
}

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
    /// The linear part only: headers always sit there, the kernel needs
    /// no payload past a hello's first bytes, and `bpf_xdp_get_buff_len`
    /// would cost a helper call per packet.
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
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

impl tls::CopyBytes for Xdp<'_> {
    #[inline(always)]
    fn copy_to(&self, offset: u32, dst: *mut c_void, len: u32) -> bool {
        // SAFETY: the caller bounds `len` by the size of `dst`; the helper
        // checks the frame's bounds, frags included.
        unsafe { bpf_xdp_load_bytes(self.0.ctx, offset, dst, len) == 0 }
    }
}

impl tls::CopyBytes for Skb<'_> {
    #[inline(always)]
    fn copy_to(&self, offset: u32, dst: *mut c_void, len: u32) -> bool {
        // SAFETY: as above, for the whole skb.
        unsafe { bpf_skb_load_bytes(self.0.as_ptr().cast_const(), offset, dst, len) == 0 }
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

/// Reports a decided handshake. Wakeups are batched: userspace is woken
/// only once a quarter of the ring is waiting, and drains it on a short
/// timer otherwise (a wakeup per event costs ~1 µs on 6.18).
#[inline(always)]
fn report(flow: &Flow) {
    if EVENTS
        .output(flow, wakeup_flags(&EVENTS, EVENTS_WAKEUP_BYTES))
        .is_err()
    {
        stat(FlowStat::EventsDropped);
    }
}

/// The flags for a record written to `ring`: wake the daemon once
/// `threshold` bytes wait, else not (it drains every 50 ms anyway; a
/// wakeup per record costs ~1 µs on 6.18). Every ring buffer's writer uses
/// it.
#[inline(always)]
pub(crate) fn wakeup_flags(ring: &RingBuf, threshold: u64) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA.into()) >= threshold {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Advances the handshake `segment` belongs to, if any.
///
/// Not inlined: as a BPF subprogram it gets its own stack frame, after the
/// parser's has been released.
#[inline(never)]
fn track(segment: &TcpSegment, direction: Direction, ifindex: u32) {
    // Most packets belong to no handshake: they pay for the key and one
    // lookup, and nothing else (no clock read, no scratch space).
    let key = FlowKey::of(segment, ifindex);
    let half_open = HALF_OPEN.get_ptr_mut(&key);
    let is_syn = segment.is_syn();
    if half_open.is_none() && !is_syn && !Flow::may_decide_established(segment) {
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, ours until we return.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ptr) = half_open {
        // SAFETY: a valid map value; the other hook may touch it at the same
        // time, which at worst loses a retransmission count.
        let flow = unsafe { &mut *ptr };
        match flow.half_open_step(segment, direction, now) {
            Step::Keep => {}
            step => {
                // SAFETY: two distinct map values; a plain copy, no memmove.
                unsafe { core::ptr::copy_nonoverlapping(ptr.cast_const(), scratch, 1) };
                // Whoever deletes the entry (we, or userspace's sweep)
                // reports it, so nothing is reported twice.
                if HALF_OPEN.remove(&key).is_ok() {
                    stat(FlowStat::HalfOpenDeletes);
                    if step == Step::Decided {
                        report(scratch);
                    } else if FLOWS.insert(&key, scratch, 0).is_ok() {
                        stat(FlowStat::FlowsInserts);
                    } else {
                        stat(FlowStat::InsertFailures);
                    }
                }
            }
        }
        return;
    }
    if is_syn {
        *scratch = Flow::open(segment, direction, ifindex, now);
        if HALF_OPEN.insert(&key, scratch, 0).is_ok() {
            stat(FlowStat::HalfOpenInserts);
        } else {
            stat(FlowStat::InsertFailures);
        }
        return;
    }
    if let Some(ptr) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: as above.
        let flow = unsafe { &mut *ptr };
        if flow.established_step(segment, now) == Step::Decided {
            // SAFETY: as above.
            unsafe { core::ptr::copy_nonoverlapping(ptr.cast_const(), scratch, 1) };
            if FLOWS.remove(&key).is_ok() {
                stat(FlowStat::FlowsDeletes);
                report(scratch);
            }
        }
    }
}

/// Counts one frame and follows its handshake; whatever happens, the
/// caller passes the frame on.
#[inline(always)]
fn observe<P: Packet + tls::CopyBytes>(packet: &P, direction: Direction, ifindex: u32) {
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
    let hello = segment.tls_hello(packet);
    match hello {
        Some(HelloKind::Client) => count(PacketKind::ClientHello),
        Some(HelloKind::Server) => count(PacketKind::ServerHello),
        None => {}
    }
    if segment.payload_len > 0 {
        tls::on_payload(packet, &segment, hello, direction, ifindex);
    }
    track(&segment, direction, ifindex);
}

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context is the __sk_buff the kernel passed us.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex }
}

#[xdp(frags)]
pub fn xdp_handshake(ctx: XdpContext) -> u32 {
    observe(&Xdp(&ctx), Direction::Ingress, ctx.ingress_ifindex() as u32);
    XDP_PASS
}

/// The tc hooks' verdict: no opinion. Under TCX it is TCX_NEXT, so the
/// programs attached after ours (another observer, a CNI's) still run,
/// and the packet passes at the end of the chain; a clsact filter moves on
/// to the next filter. `TC_ACT_OK` would end a TCX chain at us: a second
/// daemon on the same interface saw no packet (seen on 6.18).
const TC_VERDICT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn tc_in_handshake(ctx: TcContext) -> i32 {
    observe(&Skb(&ctx), Direction::Ingress, skb_ifindex(&ctx));
    TC_VERDICT
}

#[classifier]
pub fn tc_eg_handshake(ctx: TcContext) -> i32 {
    observe(&Skb(&ctx), Direction::Egress, skb_ifindex(&ctx));
    TC_VERDICT
}

/// `sock:inet_sock_set_state`, as a BTF tracepoint: the kernel passes the
/// socket itself (no record to fill, cheaper than the classic tracepoint).
/// Per TCP state change: one count per (old, new) state, the end of a
/// handshake (`socket`), the socket's age in its new state, and entries
/// into TIME_WAIT per namespace (`census`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tp_sock_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let (old, new) = (old as u32, new as u32);
    if !census::is_tcp(sk) {
        return 0;
    }
    if let Some(index) = abi::transition_index(old, new) {
        bump(&TRANSITIONS, index);
    }
    // Read once: the handshake record and the socket's age both need it.
    let inum = census::netns_inum(sk);
    socket::state_change(sk, old, new, inum);
    census::state_change(sk, old, new, inum);
    0
}

/// `tcp:tcp_retransmit_synack`: the kernel's own count of SYN-ACK
/// retransmissions, a cross-check for the duplicates the hooks see. A BTF
/// tracepoint, attached by name: a classic tracepoint needs tracefs, which
/// a freshly booted machine here does not mount (seen on 6.18).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tp_synack_rtx(_ctx: BtfTracePointContext) -> i32 {
    stat(FlowStat::SynAckRetransmits);
    0
}

/// `tcp:tcp_retransmit_skb`: a client whose SYN is retransmitted gets its
/// first SYN's time noted (`socket`), so its connect time can be told
/// from the first SYN, not the last.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tp_syn_rtx(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    socket::retransmit(sk);
    0
}

/// `skb:kfree_skb`, as a BTF tracepoint: a dropped packet, the kernel's
/// reason, and the socket that received it (`drops`).
#[btf_tracepoint(function = "kfree_skb")]
pub fn tp_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    let rx_sk: *const u8 = ctx.arg(3);
    drops::dropped(skb, reason, rx_sk);
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

/// Benchmark floor only, never attached by the daemon: a tc program that
/// returns at once, attached by `cargo xtask bench -- churn` where the
/// daemon's hooks would go, to tell what any packet hook costs from what
/// ours do.
#[classifier]
pub fn tc_pass_base(_ctx: TcContext) -> i32 {
    TC_VERDICT
}
