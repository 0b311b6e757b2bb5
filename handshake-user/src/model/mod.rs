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

/// A flow's 80 bytes in hex, for a checkpoint (`daemon::persist`): its
/// fields are all integers, with no padding.
pub fn flow_to_hex(flow: &handshake_common::flow::Flow) -> String {
    use handshake_common::flow::Flow;
    // SAFETY: `Flow` is repr(C), all integers, with no padding (80 bytes,
    // asserted in handshake-common): every byte is initialized.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(flow).cast::<u8>(), size_of::<Flow>())
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The flow of [`flow_to_hex`]; `None` if `hex` is not one.
pub fn flow_from_hex(hex: &str) -> Option<handshake_common::flow::Flow> {
    use handshake_common::flow::Flow;
    let hex = hex.as_bytes();
    if hex.len() != 2 * size_of::<Flow>() {
        return None;
    }
    let mut bytes = [0u8; size_of::<Flow>()];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_chunks::<2>().0) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    // SAFETY: 80 bytes for a `Flow`, whose fields are all integers: any
    // bit pattern is a valid one.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Flow>()) })
}
