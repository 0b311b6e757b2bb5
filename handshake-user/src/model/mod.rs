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
