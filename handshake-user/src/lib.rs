//! The userspace side of handshake, in layers whose imports point one way:
//!
//! - `cli`: flags, their validation, and the client that asks the daemon;
//! - `daemon`: wiring, the shared state, the API and metrics servers;
//! - `model`: what is worked out from the kernel's reports (pure);
//! - `kernel`: loading, attaching, maps, the census, namespaces;
//! - `wire`: the API's requests, JSON views and names, shared by the
//!   daemon and the client.
//!
//! `cli` → `daemon` → `model` → {`kernel`, `wire`}; the client uses `wire`
//! only. The `handshake` binary (`main.rs`) is a thin shell over this
//! library; the privileged integration tests drive the same modules.

pub mod cli;
pub mod daemon;
pub mod kernel;
pub mod model;
pub mod wire;
