//! Handshakes from the socket layer, for every TCP socket of every network
//! namespace: the state tracepoint sees each socket's handshake end, and
//! this module writes one record then (`abi::socket`). No packet is read:
//! a connection costs a few state changes, not a few packets per hook.
//!
//! What each end tells (6.18 sources):
//! - a client goes CLOSE → SYN_SENT inside connect(), just before its SYN
//!   leaves, and SYN_SENT → ESTABLISHED once the SYN-ACK is processed; its
//!   first RTT sample (`srtt_us`, taken from the SYN's transmit stamp) is
//!   then SYN out → SYN-ACK in. SYN_SENT → CLOSE carries `sk_err`:
//!   ECONNREFUSED for a refusal, else the connect was given up.
//! - a server's child socket appears at the final ACK (LISTEN → SYN_RECV,
//!   then SYN_RECV → ESTABLISHED); its first RTT sample comes from the
//!   request's SYN-ACK stamp, so it is SYN-ACK out → ACK in, unless the
//!   SYN-ACK was retransmitted (Karn's rule: no sample, `srtt_us` 0).
//! - `total_retrans` counts the SYNs or SYN-ACKs retransmitted.
//!
//! Fields past `struct sock` are read through `bpf_skc_to_tcp_sock`, so
//! the verifier checks them against `struct tcp_sock`.

use core::{
    ptr,
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::generated::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skc_to_tcp_sock},
    macros::map,
    maps::{Array, LruHashMap},
};
use handshake_common::{
    abi::{
        AF_INET, FlowStat,
        census::SockAge,
        census::{SUMMARY_ROW_IPV4, SUMMARY_ROW_IPV6},
        socket::{
            CLOSE_ORPHAN, HEAD_STRIDE, KIND_CLOSED, KIND_ESTABLISHED, KIND_FAILED, KIND_RESET,
            LOG_CPUS, LOG_SLOTS, SYN_SENT_ENTRIES, SockHandshake,
        },
        tcp_state,
    },
    flow::{ROLE_CLIENT, ROLE_SERVER},
};

use crate::census::{endpoints, field, offset};

/// Per CPU, a ring of `LOG_SLOTS` records (`abi::socket`).
#[map]
static SOCK_LOG: Array<SockHandshake> =
    Array::with_max_entries(LOG_CPUS * LOG_SLOTS, BPF_F_MMAPABLE);

/// Per CPU, at `cpu * HEAD_STRIDE`, the records it has written.
#[map]
static SOCK_LOG_HEADS: Array<u64> = Array::with_max_entries(LOG_CPUS * HEAD_STRIDE, BPF_F_MMAPABLE);

/// When the first SYN of each client socket whose SYN was retransmitted
/// left, until its handshake ends. Most handshakes never enter it: their
/// connect time is their first RTT sample.
#[map]
static SYN_SENT_AT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(SYN_SENT_ENTRIES, 0);

// Field offsets, overridden at load time from the kernel's BTF
// (`abi::census::offsets`).
#[unsafe(no_mangle)]
static OFF_SK_ERR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INET_SPORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_SRTT_US: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_TOTAL_RETRANS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_DATA_SEGS_IN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_DATA_SEGS_OUT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_RETRANS_STAMP: u32 = 0;
/// `struct sock`: `sk_socket`, NULL once the application closed it (an
/// orphan).
#[unsafe(no_mangle)]
static OFF_SK_SOCKET: u32 = 0;

/// A TCP socket of any namespace changed state: start a client's clock,
/// or report a handshake that ended.
#[inline(always)]
pub fn state_change(sk: *const u8, old: u32, new: u32, inum: u32) {
    use tcp_state::{CLOSE, ESTABLISHED, SYN_RECV, SYN_SENT};
    match (old, new) {
        (SYN_SENT, ESTABLISHED) => report(sk, inum, ROLE_CLIENT, KIND_ESTABLISHED, Close::NONE),
        (SYN_SENT, CLOSE) => report(sk, inum, ROLE_CLIENT, KIND_FAILED, Close::NONE),
        (SYN_RECV, ESTABLISHED) => report(sk, inum, ROLE_SERVER, KIND_ESTABLISHED, Close::NONE),
        (ESTABLISHED, CLOSE) => report(sk, inum, 0, KIND_RESET, Close::NONE),
        _ => {}
    }
}

/// When the client socket `sk`'s first SYN left, noted because its SYN was
/// retransmitted; forgotten. Asked only when `total_retrans` says so: a
/// lookup that finds nothing still costs ~230 ns a connection here (the
/// table's bucket is cold).
#[inline(always)]
fn started(sk: *const u8) -> u64 {
    let key = sk as u64;
    // SAFETY: a valid map value, copied out at once.
    let Some(start) = SYN_SENT_AT.get_ptr(&key).map(|at| unsafe { *at }) else {
        return 0;
    };
    let _ = SYN_SENT_AT.remove(&key);
    start
}

/// A segment of `sk` was retransmitted: if it is a client's SYN (the
/// socket is in SYN_SENT), note when the first SYN left. `tcp_connect`
/// stamps `retrans_stamp` with it, in ms of the TCP clock (the clock
/// `bpf_ktime_get_ns` reads; 6.18, without the µs timestamp option).
#[inline(always)]
pub fn retransmit(sk: *const u8) {
    // SAFETY: `sk` is the tracepoint's BTF-typed socket.
    let state = unsafe { field::<u8>(sk, offset(&crate::census::OFF_SKC_STATE)) };
    if u32::from(state) != tcp_state::SYN_SENT {
        return;
    }
    // SAFETY: the helper checks that `sk` is a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) }.cast::<u8>();
    if tcp.is_null() {
        return;
    }
    // SAFETY: a field of `struct tcp_sock` at its BTF offset.
    let first_ms = unsafe { field::<u32>(tcp, offset(&OFF_TCP_RETRANS_STAMP)) };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let since_ms = ((now / 1_000_000) as u32).wrapping_sub(first_ms);
    let start = now.saturating_sub(u64::from(since_ms) * 1_000_000);
    // Only the first retransmission notes it.
    let _ = SYN_SENT_AT.insert(&(sk as u64), &start, u64::from(BPF_NOEXIST));
}

/// What a close record carries beyond a handshake record's fields.
#[derive(Clone, Copy)]
struct Close {
    born_ns: u64,
    fin_out_ns: u64,
    fin_in_ns: u64,
    old_state: u8,
    flags: u8,
}

impl Close {
    const NONE: Self = Self {
        born_ns: 0,
        fin_out_ns: 0,
        fin_in_ns: 0,
        old_state: 0,
        flags: 0,
    };
}

/// The socket left the connection's socket by going to CLOSE (from
/// `old`): its close, as its age noted it (none: the socket predates the
/// daemon, or found the tables full).
#[inline(always)]
pub fn closed(sk: *const u8, netns: u32, old: u32, age: Option<SockAge>) {
    // SAFETY: the tracepoint's BTF-typed socket; a pointer field.
    let orphan = unsafe { field::<*const u8>(sk, offset(&OFF_SK_SOCKET)) }.is_null();
    let close = match age {
        Some(age) => Close {
            born_ns: age.born_ns,
            fin_out_ns: age.fin_out_ns,
            fin_in_ns: age.fin_in_ns,
            old_state: old as u8,
            flags: (age.flags as u8) | if orphan { CLOSE_ORPHAN } else { 0 },
        },
        None => Close {
            old_state: old as u8,
            flags: if orphan { CLOSE_ORPHAN } else { 0 },
            ..Close::NONE
        },
    };
    report(sk, netns, 0, KIND_CLOSED, close);
}

#[inline(always)]
fn report(sk: *const u8, netns: u32, role: u8, kind: u8, close: Close) {
    // SAFETY: the helper checks that `sk` is a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) }.cast::<u8>();
    if tcp.is_null() {
        return;
    }
    // SAFETY: `tcp` is a BTF-typed `struct tcp_sock *` and the offsets are
    // its fields' (resolved from BTF: `inet_sock` opens a `tcp_sock`).
    let (srtt_us, total_retrans, segs_in, segs_out, sport) = unsafe {
        (
            field::<u32>(tcp, offset(&OFF_TCP_SRTT_US)),
            field::<u32>(tcp, offset(&OFF_TCP_TOTAL_RETRANS)),
            field::<u32>(tcp, offset(&OFF_TCP_DATA_SEGS_IN)),
            field::<u32>(tcp, offset(&OFF_TCP_DATA_SEGS_OUT)),
            field::<u16>(tcp, offset(&OFF_INET_SPORT)),
        )
    };
    // A reset is one only before any data: an abort later is a close.
    if kind == KIND_RESET && (segs_in != 0 || segs_out != 0) {
        return;
    }
    let start_ns = if kind == KIND_CLOSED {
        close.born_ns
    } else if role == ROLE_CLIENT && total_retrans != 0 {
        started(sk)
    } else {
        0
    };
    // SAFETY: `sk` is the tracepoint's BTF-typed socket.
    let (family, sk_err) = unsafe {
        (
            field::<u16>(sk, offset(&crate::census::OFF_SKC_FAMILY)),
            field::<i32>(sk, offset(&OFF_SK_ERR)),
        )
    };
    let row = if family == AF_INET {
        SUMMARY_ROW_IPV4
    } else {
        SUMMARY_ROW_IPV6
    };
    let (local_addr, remote_addr, _, remote_port) = endpoints(sk, row);
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(head) = SOCK_LOG_HEADS.get_ptr_mut(cpu * HEAD_STRIDE) else {
        crate::stat(FlowStat::SockEventsDropped);
        return;
    };
    // SAFETY: this CPU's count; programs do not nest on a CPU.
    let written = unsafe { ptr::read_volatile(head) };
    let Some(slot) = SOCK_LOG.get_ptr_mut(cpu * LOG_SLOTS + (written as u32 & (LOG_SLOTS - 1)))
    else {
        crate::stat(FlowStat::SockEventsDropped);
        return;
    };
    // SAFETY: a helper without preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value, this CPU's next slot.
    unsafe {
        slot.write(SockHandshake {
            ts_ns,
            start_ns,
            sk: sk as u64,
            local_addr,
            remote_addr,
            netns,
            srtt_us,
            total_retrans,
            sk_err: sk_err as u32,
            local_port: u16::from_be(sport),
            remote_port,
            family,
            role,
            kind,
            old_state: close.old_state,
            close_flags: close.flags,
            _pad: 0,
            _pad2: 0,
            cgroup: crate::census::cgroup_id(tcp),
            fin_out_ns: close.fin_out_ns,
            fin_in_ns: close.fin_in_ns,
        })
    };
    // The record before its count: a reader that sees the count sees the
    // record (x86-64 keeps stores in order; the fence keeps LLVM from
    // moving them).
    compiler_fence(Ordering::Release);
    // SAFETY: as above.
    unsafe { ptr::write_volatile(head, written + 1) };
}
