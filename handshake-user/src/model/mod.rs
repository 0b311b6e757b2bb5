//! What the daemon works out from what the kernel reported: handshakes and
//! their phases (`conntrack`, with the socket layer's in `sockets`), TLS hellos and fingerprints (`tls`,
//! `fingerprint`), socket states, TIME_WAIT and its forecast (`states`).
//! Pure: no I/O, no aya; the daemon feeds it records and a clock, and it
//! builds the API's views (`wire`).

pub mod conntrack;
pub mod fingerprint;
pub mod sockets;
pub mod states;
pub mod tls;
