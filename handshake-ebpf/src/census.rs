//! `iter/tcp`: the socket census. The kernel calls the program once per TCP
//! socket of the namespace the iterator was opened in — listeners, full
//! sockets, TIME_WAIT minisocks, request sockets — and once more with no
//! socket when the walk ends. Everything is aggregated here; only the
//! aggregates (and, when asked, one record per socket in a few states)
//! reach userspace, through the iterator's file.
//!
//! `struct sock_common` is read at offsets the daemon resolved from the
//! running kernel's BTF and passed in as read-only globals: the verifier
//! sees them as constants (the map is frozen) and checks each load against
//! the kernel's own type, so a wrong offset fails the load, never a read.

use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
    ptr::{self, NonNull},
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, seq_file},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_comm, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel,
            bpf_seq_write, bpf_skc_to_tcp_sock, bpf_skc_to_tcp_timewait_sock,
        },
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use handshake_common::abi::{
    AF_INET, AF_INET6, FlowStat, IPPROTO_TCP, SOCK_AGE_ENTRIES,
    census::{
        AGE_CLIENT, AGE_CLOSING, AGE_SERVER, AgeSlot, Config, Header, Listener, NETNS_SLOTS,
        NetnsStats, RECORD_LISTENER, RECORD_SOCKET, RECORD_SUMMARY, SUMMARY_ROW_IPV4,
        SUMMARY_ROW_IPV6, SockAge, Socket, Summary, TW_LOCAL_ENTRIES, TW_REMOTE_ENTRIES, TwKey,
        age_slot, netns_slot,
    },
    tcp_state,
};

#[map]
static CENSUS_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static CENSUS_ACC: Array<Summary> = Array::with_max_entries(1, 0);

#[map]
static TW_REMOTE: HashMap<TwKey, u64> = HashMap::with_max_entries(TW_REMOTE_ENTRIES, 0);

#[map]
static TW_LOCAL: HashMap<TwKey, u64> = HashMap::with_max_entries(TW_LOCAL_ENTRIES, 0);

// Field offsets, overridden at load time from the kernel's BTF
// (`abi::census::offsets`). `read_volatile` keeps LLVM from folding the
// placeholder values in.
#[unsafe(no_mangle)]
static OFF_SKC_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_DPORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_NUM: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static OFF_SKC_STATE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_V6_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_V6_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TW_SUBSTATE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_NET: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static OFF_NET_NS_INUM: u32 = 0;

#[unsafe(no_mangle)]
static OFF_SK_PROTOCOL: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_CGROUP: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_ACK_BACKLOG: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_MAX_ACK_BACKLOG: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_DROPS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_DROP_COUNTERS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NDC_DROPS0: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NDC_DROPS1: u32 = 0;
#[unsafe(no_mangle)]
static OFF_ICSK_SYN_QLEN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_REUSEPORT_CB: u32 = 0;
#[unsafe(no_mangle)]
static OFF_REUSEPORT_SYNQ_TS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_TS_RECENT_STAMP: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_KERNFS_ID: u32 = 0;

/// Per socket, by its address: when it entered its current state, and who
/// opened it; from its first noted state change to its CLOSE.
///
/// Two slots of an array per socket address (`abi::census::age_slot`),
/// written in place without a lock: a state change costs a cache line,
/// where a hash table's insert and removal per socket cost ~300 ns each
/// under connection churn here (bucket lock, free list, a cold bucket;
/// docs/BENCHMARKS.md), and socket-local storage before it an allocation
/// per socket. A socket whose two slots are held by others goes to
/// `SK_AGE`, a hash table a quarter the size; when that is full too, it
/// goes unnoted (`FlowStat::SockAgesFull`) and its age shows as unknown,
/// while the sockets already noted, the old ones a leak is made of, keep
/// theirs: a slot is freed only by its own socket's CLOSE. Sized at load
/// (`--socket-age-entries`, `abi::sock_age_tables`).
///
/// Writers order their stores so that a reader (the census) that sees a
/// slot's owner sees its age, and that sees a state sees its time: the age
/// before the owner, the time before the state (x86-64 keeps stores in
/// order). Two new sockets racing for one free slot may leave one of them
/// unnoted until its next state change.
#[map]
static SK_AGE_SLOTS: Array<AgeSlot> = Array::with_max_entries(SOCK_AGE_ENTRIES, 0);

#[map]
static SK_AGE: HashMap<u64, SockAge> = HashMap::with_max_entries(SOCK_AGE_ENTRIES / 4, 0);

/// `SK_AGE_SLOTS`'s size minus one (a power of two minus one), set at load.
#[unsafe(no_mangle)]
static AGE_SLOT_MASK: u32 = SOCK_AGE_ENTRIES - 1;

/// A word of per-CPU scratch, where a socket's address becomes a number.
#[map]
static ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Socket `sk`'s two slots: the one it holds, if any, and a free one.
/// `NonNull`, whose `None` is a plain zero: an `Option` of a raw pointer
/// leaves its payload undefined when `None`, and LLVM may spill that
/// undefined register across a helper call, which the verifier refuses
/// ("!read_ok").
#[inline(always)]
fn age_slots(sk: u64) -> (Option<NonNull<AgeSlot>>, Option<NonNull<AgeSlot>>) {
    // The verifier forbids arithmetic on a socket pointer beyond adding
    // to it; the address read back from a map is a plain number.
    let Some(word) = ADDRESS.get_ptr_mut(0) else {
        return (None, None);
    };
    // SAFETY: this CPU's value of the map; programs do not nest on a CPU.
    let number = unsafe {
        ptr::write_volatile(word, sk);
        ptr::read_volatile(word)
    };
    // SAFETY: a plain read of a global set at load.
    let mask = unsafe { ptr::read_volatile(&AGE_SLOT_MASK) };
    let first = age_slot(number, mask);
    let (mut own, mut free) = (None, None);
    for i in [first, first | 1] {
        let Some(slot) = SK_AGE_SLOTS.get_ptr_mut(i) else {
            continue;
        };
        // SAFETY: a valid map value; a racing writer leaves a whole word.
        let holder = unsafe { ptr::read_volatile(&raw const (*slot).sk) };
        if holder == sk {
            own = NonNull::new(slot);
        } else if holder == 0 && free.is_none() {
            free = NonNull::new(slot);
        }
    }
    (own, free)
}

/// The inode number of `sk`'s network namespace (`sk->skc_net.net->ns.inum`).
#[inline(always)]
pub(crate) fn netns_inum(sk: *const u8) -> u32 {
    // SAFETY: `sk` is the tracepoint's BTF-typed socket and `skc_net.net`
    // a pointer field of it; the verifier types the loaded pointer as a
    // `struct net` and checks the second load against it (a fault reads 0).
    unsafe {
        let net: *const u8 = field(sk, offset(&OFF_SKC_NET));
        field::<u32>(net, offset(&OFF_NET_NS_INUM))
    }
}

/// The cgroup v2 id of the iterator's full socket `sk` (a `struct
/// sock_common *`, which the verifier does not let a load reach past).
#[inline(always)]
fn full_socket_cgroup(sk: *const u8) -> u64 {
    // SAFETY: the helper checks that `sk` is a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) }.cast::<u8>();
    if tcp.is_null() { 0 } else { cgroup_id(tcp) }
}

/// The cgroup v2 id of full socket `sk` (a `struct sock *` or a type
/// that opens with one): `sk->sk_cgrp_data.cgroup->kn->id`, the cgroup
/// the socket was created in (a listener's child: the listener's). 0 when
/// the chain cannot be read.
#[inline(always)]
pub(crate) fn cgroup_id(sk: *const u8) -> u64 {
    // SAFETY: BTF-typed pointer loads at offsets resolved from BTF; the
    // verifier checks each against the kernel's types, and a fault (a
    // NULL cgroup) reads 0.
    unsafe {
        let cgroup: *const u8 = field(sk, offset(&OFF_SK_CGROUP));
        let kn: *const u8 = field(cgroup, offset(&OFF_CGROUP_KN));
        field::<u64>(kn, offset(&OFF_KERNFS_ID))
    }
}

/// Whether `sk` (the tracepoint's `struct sock *`) is a TCP socket of
/// either family.
#[inline(always)]
pub fn is_tcp(sk: *const u8) -> bool {
    // SAFETY: `sk` is the tracepoint's BTF-typed socket; the offsets are its
    // fields' (resolved from BTF, checked by the verifier).
    let (protocol, family) = unsafe {
        (
            field::<u16>(sk, offset(&OFF_SK_PROTOCOL)),
            field::<u16>(sk, offset(&OFF_SKC_FAMILY)),
        )
    };
    protocol == IPPROTO_TCP && (family == AF_INET || family == AF_INET6)
}

/// A TCP socket changed state: note when, and on connect() who.
#[inline(always)]
pub fn state_change(sk: *const u8, old: u32, new: u32, inum: u32) {
    let key = sk as u64;
    let time_wait =
        new == tcp_state::CLOSE && (old == tcp_state::FIN_WAIT2 || old == tcp_state::CLOSING);
    netns_change(inum, new, time_wait);
    if new == tcp_state::CLOSE {
        // The socket is done: its age freed, and for an established
        // connection its close written with what the age noted of it.
        let age = take_age(key);
        if old != tcp_state::SYN_SENT && old != tcp_state::SYN_RECV && old != tcp_state::LISTEN {
            crate::socket::closed(sk, inum, old, age);
        }
        return;
    }
    // Listeners are not noted: the census reads no age for them (they are
    // not stuck), and each would hold a slot for as long as it listens.
    // Nor is a full socket's SYN_RECV, which lasts from the final ACK to
    // the next line of the kernel (the census reads no age for SYN_RECV
    // either: those are request sockets); it is noted at ESTABLISHED.
    if new == tcp_state::LISTEN || new == tcp_state::SYN_RECV {
        return;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (own, free) = age_slots(key);
    // A socket's first noted change: from CLOSE (socket(), then connect())
    // or from SYN_RECV (a listener's child, established). It writes a
    // fresh age: what its slot held belonged to an earlier socket at that
    // address. Later changes update the age in place; one that finds none
    // (the socket predates the daemon, or found the tables full) writes a
    // fresh one, opener unknown.
    let first = old == tcp_state::CLOSE || old == tcp_state::SYN_RECV;
    if !first {
        if let Some(slot) = own {
            let slot = slot.as_ptr();
            // SAFETY: a valid map value; this socket's changes are
            // serialised by its lock. The time before the state.
            unsafe {
                ptr::write_volatile(&raw mut (*slot).age.since_ns, now);
                ptr::write_volatile(&raw mut (*slot).age.state, new as u16);
                close_step(&raw mut (*slot).age, new, now);
            }
            return;
        }
        if let Some(age) = SK_AGE.get_ptr_mut(&key) {
            // SAFETY: as above, in the overflow table.
            unsafe {
                (*age).since_ns = now;
                (*age).state = new as u16;
                close_step(age, new, now);
            }
            return;
        }
    }
    let role = if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        AGE_CLIENT
    } else if old == tcp_state::SYN_RECV {
        AGE_SERVER
    } else {
        0
    };
    if let Some(slot) = own.or(free) {
        let slot = slot.as_ptr();
        // SAFETY: a valid map value; the age before the owner.
        unsafe {
            write_fresh(&raw mut (*slot).age, now, new, role);
            close_step(&raw mut (*slot).age, new, now);
            ptr::write_volatile(&raw mut (*slot).sk, key);
        }
        return;
    }
    let mut age = MaybeUninit::<SockAge>::uninit();
    // SAFETY: every field is written (the insert copies it).
    unsafe {
        write_fresh(age.as_mut_ptr(), now, new, role);
        close_step(age.as_mut_ptr(), new, now);
    }
    // SAFETY: all fields were written above.
    let age = unsafe { age.assume_init_ref() };
    if SK_AGE.insert(&key, age, 0).is_err() {
        crate::stat(FlowStat::SockAgesFull);
    }
}

/// Notes a step of the close in `age`: this socket's FIN (FIN_WAIT1, or
/// LAST_ACK after CLOSE_WAIT), the peer's (CLOSE_WAIT, or CLOSING: both
/// at once).
///
/// # Safety
/// `age` must be valid for writes.
#[inline(always)]
unsafe fn close_step(age: *mut SockAge, new: u32, now: u64) {
    // SAFETY: the caller's.
    unsafe {
        match new {
            tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => {
                ptr::write_volatile(&raw mut (*age).fin_out_ns, now);
            }
            tcp_state::CLOSE_WAIT => ptr::write_volatile(&raw mut (*age).fin_in_ns, now),
            tcp_state::CLOSING => {
                ptr::write_volatile(&raw mut (*age).fin_in_ns, now);
                (*age).flags |= AGE_CLOSING;
            }
            _ => {}
        }
    }
}

/// Writes a fresh age at `age`: `state` entered at `now`, its role
/// (`AGE_CLIENT` on connect(), `AGE_SERVER` for a listener's child, 0
/// unknown), and on connect() the calling process as the opener. Field by field, and
/// `comm` by the helper or as two words: a `[0; 16]` compiles to a call to
/// a byte-at-a-time `memset` subprogram.
///
/// # Safety
/// `age` must be valid for writes.
#[inline(always)]
unsafe fn write_fresh(age: *mut SockAge, now: u64, state: u32, role: u16) {
    // SAFETY: the caller's.
    unsafe {
        ptr::write_volatile(&raw mut (*age).since_ns, now);
        ptr::write_volatile(&raw mut (*age).state, state as u16);
        ptr::write_volatile(&raw mut (*age).flags, role);
        // Born when connect() began or the handshake completed; unknown
        // (0) for a socket first seen later.
        ptr::write_volatile(&raw mut (*age).born_ns, if role == 0 { 0 } else { now });
        ptr::write_volatile(&raw mut (*age).fin_out_ns, 0);
        ptr::write_volatile(&raw mut (*age).fin_in_ns, 0);
        let comm = (&raw mut (*age).comm).cast::<c_void>();
        if role == AGE_CLIENT {
            // connect(): the process is the current task. The helper fills
            // all 16 bytes, with zeros past the name or on failure.
            (*age).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            bpf_get_current_comm(comm, 16);
        } else {
            (*age).pid = 0;
            let words = comm.cast::<u64>();
            ptr::write_volatile(words, 0);
            ptr::write_volatile(words.add(1), 0);
        }
    }
}

/// Socket `key` closed: what its age noted, copied out as its slot is
/// freed or its overflow entry removed (looked up first: a removal takes
/// the bucket's lock even when there is nothing to remove). One lookup of
/// the slots serves both.
#[inline(always)]
fn take_age(key: u64) -> Option<SockAge> {
    if let (Some(slot), _) = age_slots(key) {
        let slot = slot.as_ptr();
        // SAFETY: a valid map value this socket holds: the age copied out,
        // then the slot freed.
        return unsafe {
            let age = (*slot).age;
            ptr::write_volatile(&raw mut (*slot).sk, 0);
            Some(age)
        };
    }
    // SAFETY: a valid map value, copied out at once.
    let age = SK_AGE.get_ptr(&key).map(|age| unsafe { *age })?;
    let _ = SK_AGE.remove(&key);
    Some(age)
}

/// Per namespace: state changes by the state entered, and entries into
/// TIME_WAIT (`abi::census::NetnsStats`), in two candidate slots of a
/// per-CPU array (`abi::census::netns_slot`), the last slot for the rest.
/// Per CPU, so plain adds are safe.
#[map]
static NETNS_STATS: PerCpuArray<NetnsStats> = PerCpuArray::with_max_entries(NETNS_SLOTS + 1, 0);

/// A socket of namespace `inum` entered state `new`; `time_wait`: that
/// put it in TIME_WAIT (FIN_WAIT2 or CLOSING → CLOSE: a minisock takes
/// over).
#[inline(always)]
fn netns_change(inum: u32, new: u32, time_wait: bool) {
    let first = netns_slot(inum);
    for slot in [first, first | 1, NETNS_SLOTS] {
        let Some(stats) = NETNS_STATS.get_ptr_mut(slot) else {
            continue;
        };
        // SAFETY: this CPU's value of the map; programs do not nest on a
        // CPU.
        unsafe {
            let owner = (*stats).inum;
            if owner == 0 && slot != NETNS_SLOTS {
                (*stats).inum = inum;
            } else if owner != inum && slot != NETNS_SLOTS {
                continue;
            }
            (*stats).entered[(new & 0xf) as usize] += 1;
            if time_wait {
                (*stats).time_wait_entries += 1;
            }
        }
        return;
    }
}

#[inline(always)]
pub(crate) fn offset(global: &u32) -> usize {
    // SAFETY: a plain read of a global.
    unsafe { ptr::read_volatile(global) as usize }
}

/// `struct bpf_iter_meta`
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__tcp`
#[repr(C)]
pub struct IterTcp {
    meta: *const IterMeta,
    sk_common: *const u8,
    uid: u32,
}

/// Reads a `T` at `off` bytes into a kernel object the verifier knows the
/// type of. An aligned read (kernel fields are naturally aligned): one
/// load, where an unaligned read is a load per byte, and the only way a
/// pointer field reads as a pointer the verifier can follow.
///
/// # Safety
/// `base` must be a BTF-typed pointer from the kernel and `off` a constant
/// offset of a field of type `T` in it.
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(base: *const u8, off: usize) -> T {
    unsafe { ptr::read(base.add(off).cast::<T>()) }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn iter_tcp_census(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    let Some(acc) = CENSUS_ACC.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `meta` is never NULL for an iterator program.
    let (seq, seq_num) = unsafe { ((*meta).seq, (*meta).seq_num) };
    // The first call of a run: whatever an earlier run left is stale. The
    // kernel numbers the closing call (no socket) one below the calls
    // before it, so in a namespace with no socket at all the only call
    // comes numbered u64::MAX, not 0 (an empty namespace showed the counts
    // of the one counted before it).
    if seq_num == 0 || (sk.is_null() && seq_num == u64::MAX) {
        clear(acc);
    }
    if sk.is_null() {
        // The walk is over: hand the aggregates over.
        // SAFETY: `acc` points to the map's one value; a helper without
        // preconditions.
        unsafe {
            (*acc).jiffies = bpf_jiffies64();
            (*acc).header = Header {
                kind: RECORD_SUMMARY,
                len: size_of::<Summary>() as u32,
            };
            bpf_seq_write(seq, acc.cast::<c_void>(), size_of::<Summary>() as u32);
        }
        return 0;
    }
    let Some(config) = CENSUS_CONFIG.get(0) else {
        return 0;
    };
    // When a socket's record does not fit the output buffer, the kernel
    // shows that socket again at the next read(2), with the same sequence
    // number: count it once, write its record again.
    // SAFETY: `acc` points to the map's one value.
    if seq_num < unsafe { (*acc).seen } {
        emit_if_asked(sk, seq, acc, config);
        return 0;
    }
    count(sk, seq, acc, config);
    0
}

#[inline(always)]
fn emit_if_asked(sk: *const u8, seq: *mut seq_file, acc: *mut Summary, config: &Config) {
    // SAFETY: as in `count`.
    let (family, state) = unsafe {
        (
            field::<u16>(sk, offset(&OFF_SKC_FAMILY)),
            field::<u8>(sk, offset(&OFF_SKC_STATE)) as u32,
        )
    };
    if (family == AF_INET || family == AF_INET6) && state == tcp_state::LISTEN {
        // SAFETY: as in `count`.
        return listener(sk, seq, unsafe { &mut *acc }, config, family);
    }
    if (family == AF_INET || family == AF_INET6)
        && config.socket_states & (1 << (state & 0x1f)) != 0
    {
        let age = age_of(sk, state);
        // SAFETY: as in `count`.
        emit(sk, seq, unsafe { &mut *acc }, config, family, state, age);
    }
}

#[inline(always)]
fn clear(acc: *mut Summary) {
    let words = acc.cast::<u64>();
    let mut i = 0;
    while i < size_of::<Summary>() / 8 {
        // SAFETY: within the map value; volatile so that LLVM does not turn
        // the loop into a memset call.
        unsafe { ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
}

#[inline(always)]
fn count(sk: *const u8, seq: *mut seq_file, acc: *mut Summary, config: &Config) {
    // SAFETY: `sk` is the iterator's non-NULL `struct sock_common *`; the
    // offsets are its fields' (see the module comment).
    let (family, state) = unsafe {
        (
            field::<u16>(sk, offset(&OFF_SKC_FAMILY)),
            field::<u8>(sk, offset(&OFF_SKC_STATE)) as u32,
        )
    };
    // SAFETY: `acc` points to the map's one value; indexes are bounded.
    let acc = unsafe { &mut *acc };
    acc.seen += 1;
    let fam = match family {
        AF_INET => SUMMARY_ROW_IPV4,
        AF_INET6 => SUMMARY_ROW_IPV6,
        _ => {
            acc.read_errors += 1;
            return;
        }
    };
    let state = match state {
        // A request socket is what `ss` lists as SYN-RECV.
        tcp_state::NEW_SYN_RECV => tcp_state::SYN_RECV,
        tcp_state::TIME_WAIT => return time_wait(sk, fam, acc, config),
        s => s,
    };
    acc.sockets[fam][(state & 0xf) as usize] += 1;
    if state == tcp_state::LISTEN {
        return listener(sk, seq, acc, config, family);
    }
    let age = age_of(sk, state);
    if let Some(age) = age {
        let oldest = &mut acc.oldest_since_ns[(state & 0xf) as usize];
        if *oldest == 0 || age.since_ns < *oldest {
            *oldest = age.since_ns;
        }
    }
    if config.socket_states & (1 << (state & 0x1f)) != 0 {
        emit(sk, seq, acc, config, family, state, age);
    }
}

/// What the state tracepoint noted of a full socket, if it saw it enter
/// the state it is in now.
#[inline(always)]
fn age_of(sk: *const u8, state: u32) -> Option<SockAge> {
    if state == tcp_state::SYN_RECV || state == tcp_state::LISTEN {
        // Request sockets are not noted; listeners are not stuck.
        return None;
    }
    // A full socket's address is its `sock_common`'s. The state must match:
    // an age left by a socket that went away unseen at the same address
    // is no one's.
    let key = sk as u64;
    let age = match age_slots(key) {
        // SAFETY: a valid map value, copied out at once (owner read first,
        // in `age_slots`).
        (Some(slot), _) => unsafe { (*slot.as_ptr()).age },
        // SAFETY: as above, in the overflow table.
        (None, _) => unsafe { *SK_AGE.get_ptr(&key)? },
    };
    (u32::from(age.state) == state).then_some(age)
}

#[inline(always)]
fn time_wait(sk: *const u8, fam: usize, acc: &mut Summary, config: &Config) {
    // SAFETY: the helper checks the socket really is a TIME_WAIT minisock.
    let tw = unsafe { bpf_skc_to_tcp_timewait_sock(sk as *mut c_void) };
    if tw.is_null() {
        acc.read_errors += 1;
        return;
    }
    // SAFETY: `tw` is a `struct tcp_timewait_sock *` whose first member is
    // the `inet_timewait_sock` the offset belongs to.
    let substate = unsafe { field::<u8>(tw.cast::<u8>(), offset(&OFF_TW_SUBSTATE)) } as u32;
    if substate == tcp_state::FIN_WAIT2 {
        acc.sockets[fam][tcp_state::FIN_WAIT2 as usize] += 1;
        acc.tw_fin_wait2[fam] += 1;
        return;
    }
    acc.sockets[fam][tcp_state::TIME_WAIT as usize] += 1;
    let (local, remote, local_port, remote_port) = endpoints(sk, fam);
    let client = local_port >= config.ephemeral_low && local_port <= config.ephemeral_high;
    let family = if fam == SUMMARY_ROW_IPV4 {
        AF_INET
    } else {
        AF_INET6
    };
    let remote_key = TwKey {
        family,
        port: if client { remote_port } else { 0 },
        addr: remote,
    };
    if !bump(&TW_REMOTE, &remote_key) {
        acc.tw_remote_overflow += 1;
    }
    let local_key = TwKey {
        family,
        port: 0,
        addr: local,
    };
    if !bump(&TW_LOCAL, &local_key) {
        acc.tw_local_overflow += 1;
    }
}

/// Adds one to `key`'s count; false when the map is full.
#[inline(always)]
fn bump(map: &HashMap<TwKey, u64>, key: &TwKey) -> bool {
    if let Some(count) = map.get_ptr_mut(key) {
        // SAFETY: a value of the map; one census runs at a time.
        unsafe { *count += 1 };
        return true;
    }
    map.insert(key, &1, u64::from(BPF_NOEXIST)).is_ok()
}

/// (local address, remote address, local port, remote port), host order
/// for the ports; IPv4 addresses in the first four bytes.
#[inline(always)]
pub(crate) fn endpoints(sk: *const u8, fam: usize) -> ([u8; 16], [u8; 16], u16, u16) {
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    // SAFETY: offsets of `struct sock_common` fields of these types.
    unsafe {
        if fam == SUMMARY_ROW_IPV4 {
            local[..4].copy_from_slice(&field::<[u8; 4]>(sk, offset(&OFF_SKC_RCV_SADDR)));
            remote[..4].copy_from_slice(&field::<[u8; 4]>(sk, offset(&OFF_SKC_DADDR)));
        } else {
            local = field::<[u8; 16]>(sk, offset(&OFF_SKC_V6_RCV_SADDR));
            remote = field::<[u8; 16]>(sk, offset(&OFF_SKC_V6_DADDR));
        }
        (
            local,
            remote,
            field::<u16>(sk, offset(&OFF_SKC_NUM)),
            u16::from_be(field::<u16>(sk, offset(&OFF_SKC_DPORT))),
        )
    }
}

/// A socket's drop count as the kernel reads it (`sk_drops_read`): its
/// per-NUMA counters when it has them (6.18; offset 0 where the kernel
/// has no such field), else `sk_drops`. Read with the helper: the
/// counters' fields may not exist in this kernel's BTF.
#[inline(always)]
fn drop_count(tcp: *const u8) -> u32 {
    let counters_at = offset(&OFF_SK_DROP_COUNTERS);
    if counters_at != 0 {
        let mut counters: u64 = 0;
        // SAFETY: the helper checks the source; 8 bytes into a u64.
        let rc = unsafe {
            bpf_probe_read_kernel(
                (&raw mut counters).cast::<c_void>(),
                8,
                tcp.wrapping_add(counters_at).cast::<c_void>(),
            )
        };
        if rc == 0 && counters != 0 {
            let mut drops = [0u32; 2];
            for (i, at) in [offset(&OFF_NDC_DROPS0), offset(&OFF_NDC_DROPS1)]
                .into_iter()
                .enumerate()
            {
                // SAFETY: as above, 4 bytes into a u32.
                unsafe {
                    bpf_probe_read_kernel(
                        (&raw mut drops[i]).cast::<c_void>(),
                        4,
                        (counters + at as u64) as *const c_void,
                    )
                };
            }
            return drops[0].wrapping_add(drops[1]);
        }
    }
    // SAFETY: a field of `struct sock` at its BTF offset.
    unsafe { field::<u32>(tcp, offset(&OFF_SK_DROPS)) }
}

/// A listener: its queues, drops and last SYN queue overflow, as a
/// [`Listener`] record (at most `max_listeners` a run).
#[inline(always)]
fn listener(sk: *const u8, seq: *mut seq_file, acc: &mut Summary, config: &Config, family: u16) {
    if acc.listeners_written >= u64::from(config.max_listeners) {
        acc.listeners_dropped += 1;
        return;
    }
    // SAFETY: the helper checks that `sk` is a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) }.cast::<u8>();
    if tcp.is_null() {
        acc.read_errors += 1;
        return;
    }
    let fam = if family == AF_INET {
        SUMMARY_ROW_IPV4
    } else {
        SUMMARY_ROW_IPV6
    };
    let (local, _, local_port, _) = endpoints(sk, fam);
    // SAFETY: BTF-typed loads at offsets resolved from BTF: fields of
    // `struct tcp_sock` and the structs it opens with, and of the
    // structs its pointers lead to (a NULL pointer's field reads 0).
    let record = unsafe {
        let drops = drop_count(tcp);
        // The kernel stamps the reuseport group when there is one, else
        // the listener (`tcp_synq_overflow`).
        // Both read, then one chosen: a load whose base and offset LLVM
        // picks on a NULL test fails the verifier, which does not carry
        // a BTF pointer's NULL test from one branch to the next (a NULL
        // group's field reads 0).
        let reuse: *const u8 = field(tcp, offset(&OFF_SK_REUSEPORT_CB));
        let group_stamp = field::<u32>(reuse, offset(&OFF_REUSEPORT_SYNQ_TS));
        let own_stamp = field::<u32>(tcp, offset(&OFF_TCP_TS_RECENT_STAMP));
        let overflow_stamp = if reuse.is_null() {
            own_stamp
        } else {
            group_stamp
        };
        Listener {
            header: Header {
                kind: RECORD_LISTENER,
                len: size_of::<Listener>() as u32,
            },
            family,
            local_port,
            _pad: 0,
            local_addr: local,
            accept_queue: field(tcp, offset(&OFF_SK_ACK_BACKLOG)),
            accept_queue_max: field(tcp, offset(&OFF_SK_MAX_ACK_BACKLOG)),
            syn_queue: field(tcp, offset(&OFF_ICSK_SYN_QLEN)),
            drops,
            overflow_stamp,
            _pad2: 0,
            cgroup: cgroup_id(tcp),
        }
    };
    // SAFETY: `seq` is the iterator's seq_file; the record is on the stack.
    let written = unsafe {
        bpf_seq_write(
            seq,
            ptr::from_ref(&record).cast::<c_void>(),
            size_of::<Listener>() as u32,
        )
    };
    // One that does not fit is shown again at the next read(2).
    if written == 0 {
        acc.listeners_written += 1;
    }
}

#[inline(always)]
fn emit(
    sk: *const u8,
    seq: *mut seq_file,
    acc: &mut Summary,
    config: &Config,
    family: u16,
    state: u32,
    age: Option<SockAge>,
) {
    if acc.sockets_written >= u64::from(config.max_sockets) {
        acc.sockets_dropped += 1;
        return;
    }
    let fam = if family == AF_INET {
        SUMMARY_ROW_IPV4
    } else {
        SUMMARY_ROW_IPV6
    };
    let (local, remote, local_port, remote_port) = endpoints(sk, fam);
    let record = Socket {
        header: Header {
            kind: RECORD_SOCKET,
            len: size_of::<Socket>() as u32,
        },
        family,
        state: state as u16,
        local_port,
        remote_port,
        local_addr: local,
        remote_addr: remote,
        since_ns: age.map_or(0, |a| a.since_ns),
        pid: age.map_or(0, |a| a.pid),
        _pad: 0,
        comm: age.map_or([0; 16], |a| a.comm),
        cgroup: full_socket_cgroup(sk),
    };
    // SAFETY: `seq` is the iterator's seq_file; the record is on the stack.
    let written = unsafe {
        bpf_seq_write(
            seq,
            ptr::from_ref(&record).cast::<c_void>(),
            size_of::<Socket>() as u32,
        )
    };
    // A record that does not fit is not lost: the kernel shows this socket
    // again at the next read(2) (see `iter_tcp_census`).
    if written == 0 {
        acc.sockets_written += 1;
    }
}
