//! TLS hello capture in the packet hooks. A payload that opens with a
//! ClientHello or ServerHello record has its first bytes (up to
//! `MAX_HELLO`, the hello and a little more) copied to the `TLS_EVENTS`
//! ring buffer; when the hello is longer than the segment, the rest is
//! taken from the following segments of that direction (`TLS_PENDING`).
//! After a ServerHello, the client's first record that is not
//! ChangeCipherSpec is marked with its time.
//!
//! Other payloads pay for the hello check of their first bytes and one
//! array read (`TLS_ACTIVE`); the pending table is looked up only while it
//! may hold entries.

use core::{ffi::c_void, ptr::write_volatile};

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use handshake_common::{
    abi::{
        Direction, FlowStat,
        tls_capture::{
            CHUNK, CHUNKS_PER_SEGMENT, EVENTS_BYTES, EVENTS_WAKEUP_BYTES, KIND_CLIENT_FINISHED,
            KIND_CLIENT_HELLO, KIND_SERVER_HELLO, MAX_HELLO, PENDING_ENTRIES, TlsChunk, TlsKey,
            TlsPending,
        },
    },
    packet::{Packet, TcpSegment},
    tls::{CONTENT_CHANGE_CIPHER_SPEC, HelloKind},
};

use crate::stat;

#[map]
static TLS_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static TLS_PENDING: LruHashMap<TlsKey, TlsPending> =
    LruHashMap::with_max_entries(PENDING_ENTRIES, 0);

#[map]
static TLS_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Keys and table values under construction: in a per-CPU map rather than
/// on the stack, which the parser's frame already fills most of (BPF
/// allows 512 bytes for a whole call chain).
#[repr(C)]
struct Scratch {
    key: TlsKey,
    reversed: TlsKey,
    pending: TlsPending,
}

#[map]
static TLS_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Copies payload bytes into memory the verifier knows the size of.
pub trait CopyBytes {
    /// `len` bytes at frame offset `offset` to `dst`; false on failure.
    fn copy_to(&self, offset: u32, dst: *mut c_void, len: u32) -> bool;
}

#[inline(always)]
fn active() -> bool {
    TLS_ACTIVE.get(0).is_some_and(|flag| *flag != 0)
}

#[inline(always)]
fn set_active() {
    if let Some(flag) = TLS_ACTIVE.get_ptr_mut(0) {
        // SAFETY: the array's one value; a plain store.
        unsafe { *flag = 1 };
    }
}

#[inline(always)]
fn pend(key: &TlsKey, pending: &TlsPending) {
    if TLS_PENDING.insert(key, pending, 0).is_ok() {
        set_active();
    } else {
        stat(FlowStat::TlsPendingFailures);
    }
}

/// The segment's sequence number.
#[inline(always)]
fn seq_of<P: Packet>(packet: &P, seg: &TcpSegment) -> Option<u32> {
    packet.load::<4>(seg.tcp_offset + 4).map(u32::from_be_bytes)
}

/// A segment with payload: start, continue or close a capture.
#[inline(never)]
pub fn on_payload<P: Packet + CopyBytes>(
    packet: &P,
    seg: &TcpSegment,
    hello: Option<HelloKind>,
    direction: Direction,
    ifindex: u32,
) {
    if hello.is_none() && !active() {
        return;
    }
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, ours until we return.
    let scratch = unsafe { &mut *scratch };
    scratch.key = TlsKey::of(seg, ifindex);
    if let Some(kind) = hello {
        start_hello(packet, seg, kind, direction, scratch);
        return;
    }
    let key = &scratch.key;
    let Some(pending) = TLS_PENDING.get_ptr(key) else {
        return;
    };
    // SAFETY: a valid map value, copied out at once.
    let pending = unsafe { *pending };
    if pending.kind == KIND_CLIENT_FINISHED {
        client_finished(packet, seg, key, direction);
        return;
    }
    let Some(seq) = seq_of(packet, seg) else {
        return;
    };
    let offset = seq.wrapping_sub(pending.start_seq);
    let target = pending.end_seq.wrapping_sub(pending.start_seq);
    if offset >= target {
        // A retransmission of bytes before the hello, or past what we want.
        return;
    }
    let len = (seg.payload_len as u32).min(target - offset);
    let at = Hello {
        key,
        kind: pending.kind,
        target,
        seq: pending.start_seq,
        direction,
    };
    emit(packet, seg, &at, offset, len);
    if offset + len >= target {
        let _ = TLS_PENDING.remove(key);
    }
}

#[inline(always)]
fn start_hello<P: Packet + CopyBytes>(
    packet: &P,
    seg: &TcpSegment,
    hello: HelloKind,
    direction: Direction,
    scratch: &mut Scratch,
) {
    // Record header (5) and handshake header (4).
    let Some(head) = packet.load::<9>(seg.payload_offset) else {
        return;
    };
    let Some(seq) = seq_of(packet, seg) else {
        return;
    };
    let record_len = u32::from(u16::from_be_bytes([head[3], head[4]]));
    let message_len = u32::from(head[6]) << 16 | u32::from(head[7]) << 8 | u32::from(head[8]);
    // The message and its record headers, if split over a few records.
    let target = (5 + record_len).max(9 + message_len + 15).min(MAX_HELLO);
    let kind = match hello {
        HelloKind::Client => KIND_CLIENT_HELLO,
        HelloKind::Server => KIND_SERVER_HELLO,
    };
    let len = (seg.payload_len as u32).min(target);
    let at = Hello {
        key: &scratch.key,
        kind,
        target,
        seq,
        direction,
    };
    emit(packet, seg, &at, 0, len);
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let pending = &mut scratch.pending;
    pending.ts_ns = now;
    pending.kind = kind;
    if len < target {
        pending.start_seq = seq;
        pending.end_seq = seq.wrapping_add(target);
        pend(&scratch.key, &scratch.pending);
    }
    if kind == KIND_SERVER_HELLO {
        // Wait for the client's next record.
        scratch.reversed = scratch.key.reversed();
        let pending = &mut scratch.pending;
        pending.kind = KIND_CLIENT_FINISHED;
        pending.start_seq = 0;
        pending.end_seq = 0;
        pend(&scratch.reversed, &scratch.pending);
    }
}

/// The client's first payload after the ServerHello: past a leading
/// ChangeCipherSpec record, the type of the next record is marked.
#[inline(always)]
fn client_finished<P: Packet + CopyBytes>(
    packet: &P,
    seg: &TcpSegment,
    key: &TlsKey,
    direction: Direction,
) {
    let Some(head) = packet.load::<5>(seg.payload_offset) else {
        return;
    };
    let mut record_type = head[0];
    if record_type == CONTENT_CHANGE_CIPHER_SPEC {
        let next = 5 + usize::from(u16::from_be_bytes([head[3], head[4]]));
        if next >= seg.payload_len {
            // Only the ChangeCipherSpec so far; the next segment decides.
            return;
        }
        // Two bytes, not one: a 1-byte bounds check with a variable offset
        // is one the verifier cannot use (DESIGN.md).
        let Some(after) = packet.load::<2>(seg.payload_offset + (next & 0xfff)) else {
            return;
        };
        record_type = after[0];
    }
    if let Some(mut entry) = TLS_EVENTS.reserve::<TlsChunk>(0) {
        let chunk = entry.as_mut_ptr();
        // SAFETY: a reserved record of the ring buffer, ours until submitted;
        // fields written one by one, `data` left unwritten (len 0).
        unsafe {
            (*chunk).ts_ns = bpf_ktime_get_ns();
            copy_key(key, chunk);
            (*chunk).kind = KIND_CLIENT_FINISHED;
            (*chunk).record_type = record_type;
            // Volatile: four zero stores in a row would be merged into a
            // call to a byte-at-a-time `memset` subprogram.
            write_volatile(&raw mut (*chunk).len, 0);
            write_volatile(&raw mut (*chunk).offset, 0);
            write_volatile(&raw mut (*chunk).target, 0);
            write_volatile(&raw mut (*chunk).hello_seq, 0);
            (*chunk).direction = direction as u32;
        }
        entry.submit(wakeup());
    } else {
        stat(FlowStat::TlsEventsDropped);
    }
    let _ = TLS_PENDING.remove(key);
}

/// A key into a record. A plain assignment through the record's pointer
/// compiles to a call to a byte-at-a-time `memmove` subprogram; the
/// records never overlap the key, and the non-overlapping copy is inlined
/// as word loads and stores.
///
/// # Safety
/// `chunk` must point to a reserved ring-buffer record.
#[inline(always)]
unsafe fn copy_key(key: &TlsKey, chunk: *mut TlsChunk) {
    // SAFETY: the key and the record are distinct, valid objects.
    unsafe { core::ptr::copy_nonoverlapping(key, &raw mut (*chunk).key, 1) };
}

#[inline(always)]
fn wakeup() -> u64 {
    crate::wakeup_flags(&TLS_EVENTS, EVENTS_WAKEUP_BYTES)
}

/// The hello a segment's bytes belong to.
struct Hello<'a> {
    key: &'a TlsKey,
    kind: u8,
    /// Bytes captured of it in all.
    target: u32,
    /// Sequence number of its first byte.
    seq: u32,
    direction: Direction,
}

/// Copies `len` payload bytes, which lie at `offset` in the hello, in
/// records of at most `CHUNK` bytes.
#[inline(always)]
fn emit<P: Packet + CopyBytes>(
    packet: &P,
    seg: &TcpSegment,
    hello: &Hello<'_>,
    offset: u32,
    len: u32,
) {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut done: u32 = 0;
    for _ in 0..CHUNKS_PER_SEGMENT {
        if done >= len {
            break;
        }
        let mut n = len - done;
        if n > CHUNK as u32 {
            n = CHUNK as u32;
        }
        // n is in 1..=CHUNK; written so that the verifier sees both bounds
        // (CHUNK is a power of two).
        let n = ((n - 1) & (CHUNK as u32 - 1)) + 1;
        let Some(mut entry) = TLS_EVENTS.reserve::<TlsChunk>(0) else {
            stat(FlowStat::TlsEventsDropped);
            return;
        };
        let chunk = entry.as_mut_ptr();
        // SAFETY: as in `client_finished`; the copy writes at most CHUNK
        // bytes into `data`, which holds CHUNK.
        let copied = unsafe {
            (*chunk).ts_ns = now;
            copy_key(hello.key, chunk);
            (*chunk).kind = hello.kind;
            (*chunk).record_type = 0;
            (*chunk).len = n as u16;
            (*chunk).offset = offset + done;
            (*chunk).target = hello.target;
            (*chunk).hello_seq = hello.seq;
            (*chunk).direction = hello.direction as u32;
            let at = (seg.payload_offset as u32).wrapping_add(done);
            packet.copy_to(at, (*chunk).data.as_mut_ptr().cast(), n)
        };
        if copied {
            entry.submit(wakeup());
        } else {
            entry.discard(0);
            return;
        }
        done += n;
    }
}
