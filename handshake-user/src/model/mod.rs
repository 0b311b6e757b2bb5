//! What the daemon works out from what the kernel reported: handshakes and
//! their phases (`conntrack`, with the socket layer's in `sockets`), TLS hellos and fingerprints (`tls`,
//! `fingerprint`), socket states, TIME_WAIT and its forecast (`states`), whose a socket is (`workload`).
//! Pure: no I/O, no aya; the daemon feeds it records and a clock, and it
//! builds the API's views (`wire`).

pub mod closes;
pub mod conntrack;
pub mod fingerprint;
pub mod listeners;
pub mod sockets;
pub mod states;
pub mod tls;
pub mod workload;

/// The hash map of the per-handshake paths (a record, a sweep): foldhash,
/// seeded per process, where std's SipHash took ~12 % of the daemon's CPU
/// under loopback churn, hashing 40-byte connection keys several times a
/// record. The quality variant: keys carry addresses and ports a remote
/// peer chooses.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

/// The set of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

/// Bytes of one row as a checkpoint keeps it ([`put_row`]).
pub const SAVED_ROW_BYTES: usize = size_of::<handshake_common::flow::Flow>() + 28;

/// Appends a row to a checkpoint's binary part (`daemon::persist`): the
/// flow's 80 bytes as they lie (its fields are all integers, with no
/// padding), then netns (u32), cgroup, socket and when it comes due (u64),
/// little-endian. A memory copy: a checkpoint of 10,000 held rows had cost
/// the daemon more than the rows themselves as JSON.
pub fn put_row(
    out: &mut Vec<u8>,
    flow: &handshake_common::flow::Flow,
    origin: conntrack::Origin,
    sk: u64,
    due_ns: u64,
) {
    use handshake_common::flow::Flow;
    // SAFETY: `Flow` is repr(C), all integers, with no padding (80 bytes,
    // asserted in handshake-common): every byte is initialized.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(flow).cast::<u8>(), size_of::<Flow>())
    };
    out.extend_from_slice(bytes);
    out.extend_from_slice(&origin.netns.to_le_bytes());
    out.extend_from_slice(&origin.cgroup.to_le_bytes());
    out.extend_from_slice(&sk.to_le_bytes());
    out.extend_from_slice(&due_ns.to_le_bytes());
}

/// The rows of [`put_row`] in `bytes`: flow, whose, socket, when due;
/// `None` if `bytes` is not a whole number of rows.
pub fn get_rows(
    bytes: &[u8],
) -> Option<impl Iterator<Item = (handshake_common::flow::Flow, conntrack::Origin, u64, u64)> + '_>
{
    use handshake_common::flow::Flow;
    if !bytes.len().is_multiple_of(SAVED_ROW_BYTES) {
        return None;
    }
    Some(bytes.as_chunks::<SAVED_ROW_BYTES>().0.iter().map(|row| {
        let (flow, rest) = row.split_at(size_of::<Flow>());
        // SAFETY: 80 bytes for a `Flow`, whose fields are all integers:
        // any bit pattern is a valid one.
        let flow = unsafe { std::ptr::read_unaligned(flow.as_ptr().cast::<Flow>()) };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut netns = [0u8; 4];
        netns.copy_from_slice(&rest[..4]);
        let origin = conntrack::Origin {
            netns: u32::from_le_bytes(netns),
            cgroup: u64_at(4),
        };
        (flow, origin, u64_at(12), u64_at(20))
    }))
}
