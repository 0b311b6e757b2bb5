//! Everything the kernel programs and the daemon must agree on: the names
//! and layouts of maps and programs (`abi`), and the byte parsers that run
//! in the kernel and are unit-tested in userspace (`packet`, `tls`).
//!
//! `no_std`, no allocation, no panics: every function here must also be
//! accepted by the BPF verifier.
#![no_std]

pub mod abi;
pub mod flow;
pub mod packet;
pub mod tls;

#[cfg(any(test, feature = "user"))]
extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(any(test, feature = "user"))]
pub mod testframes;
