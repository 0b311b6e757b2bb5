//! The userspace side of handshake: loading and attaching the kernel
//! programs, reading their maps, and serving what they counted. The
//! `handshake` binary (`main.rs`) is a thin shell over this library; the
//! privileged integration tests drive the same modules.

pub mod api;
pub mod census;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod events;
pub mod fingerprint;
pub mod http;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod sockdiag;
pub mod states;
pub mod tlsconn;

/// The compiled kernel programs, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/handshake"));
