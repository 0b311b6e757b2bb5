//! Everything that talks to the kernel: loading and attaching the programs
//! (`loader`), their maps (`maps`, `events`), the socket census (`census`,
//! or `sockdiag` netlink), field offsets from BTF (`btf`), network
//! namespaces (`netns`) and the clock the programs stamp with (`clock`).
//! The only code that names aya, netlink or setns; it hands plain values
//! up and knows nothing of the daemon, its model or the API.

pub mod btf;
pub mod census;
pub mod cgroup;
pub mod clock;
pub mod error;
pub mod events;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod sockdiag;

/// The compiled kernel programs, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/handshake"));
