//! Why loading the kernel programs or opening their maps failed.

use aya::programs::ProgramError;
use thiserror::Error;

use crate::kernel::{btf::BtfError, netns::NetnsError};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this kernel has no BTF ({0} is missing): handshake needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (5.8 or newer; most distributions' kernels since 2021)"
    )]
    NoBtf(&'static str),
    #[error("parsing the embedded eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("loading program {name:?} into the kernel")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("removing the stale pinned map {path}")]
    Unpin {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("opening map {name:?}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0:?} of the eBPF object is not an array")]
    NotAnArray(&'static str),
    #[error("mapping map {name:?} into memory")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the possible CPUs from {path}: {reason}")]
    Cpus { path: &'static str, reason: String },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(
        "this kernel's BTF is needed (the state tracepoint and the census read kernel structs)"
    )]
    Btf(#[source] BtfError),
}
