//! Network namespaces: opening one by name and running a closure inside it.
//!
//! Only a thread can change namespace without moving the whole daemon, and
//! the daemon must stay in the host namespace: `ip netns exec` remounts
//! /sys, which hides tracefs and breaks tracepoint attach (seen on 6.18).
//! So work that must happen inside (resolving interface names, netlink
//! attach and detach) runs on a short-lived thread that calls setns(2).

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where `ip netns add NAME` leaves a handle on the namespace.
const NAMED_NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace {name:?} not found ({path} does not exist)")]
    NotFound { name: String, path: PathBuf },
    #[error("opening network namespace {name:?} at {path}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {name:?}")]
    Enter {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("listing interfaces in network namespace {name:?}")]
    ListInterfaces {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The network namespace packet hooks are attached in.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// `None` for the daemon's own (host) namespace.
    handle: Option<File>,
}

impl Netns {
    /// The namespace the daemon runs in.
    pub fn host() -> Self {
        Self {
            name: "host".to_owned(),
            handle: None,
        }
    }

    /// A namespace by `ip netns` name, or by path (e.g. `/proc/PID/ns/net`).
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        let path = if name.contains('/') {
            PathBuf::from(name)
        } else {
            Path::new(NAMED_NETNS_DIR).join(name)
        };
        let handle = File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                NetnsError::NotFound {
                    name: name.to_owned(),
                    path: path.clone(),
                }
            } else {
                NetnsError::Open {
                    name: name.to_owned(),
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Ok(Self {
            name: name.to_owned(),
            handle: Some(handle),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread inside this namespace (or on the calling thread
    /// for the host namespace) and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let Some(handle) = &self.handle else {
            return Ok(f());
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns only changes this (scoped, short-lived)
                    // thread's namespace; the fd is valid for the call.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(NetnsError::Enter {
                            name: self.name.clone(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The namespace's inode number, as the kernel's `ns.inum` has it.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        match &self.handle {
            Some(file) => file.metadata().map(|m| m.ino()),
            None => std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()),
        }
    }

    /// A second handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            handle: self.handle.as_ref().map(File::try_clone).transpose()?,
        })
    }

    /// The interfaces that are up in this namespace, sorted by name.
    pub fn interfaces_up(&self) -> Result<Vec<Interface>, NetnsError> {
        self.run(interfaces_up_here)?
            .map_err(|source| NetnsError::ListInterfaces {
                name: self.name.clone(),
                source,
            })
    }

    /// The index of interface `name` in this namespace, if it exists.
    pub fn if_index(&self, name: &str) -> Result<Option<u32>, NetnsError> {
        let Ok(c_name) = std::ffi::CString::new(name) else {
            return Ok(None);
        };
        self.run(|| {
            // SAFETY: c_name is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            (index != 0).then_some(index)
        })
    }
}

/// An interface of a namespace, as `getifaddrs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub loopback: bool,
}

fn interfaces_up_here() -> io::Result<Vec<Interface>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        let is_link = !entry.ifa_addr.is_null()
            // SAFETY: ifa_addr is non-null and points to a sockaddr.
            && i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_PACKET;
        if is_link && entry.ifa_flags & libc::IFF_UP as u32 != 0 {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(entry.ifa_name) };
            names.push(Interface {
                name: name.to_string_lossy().into_owned(),
                loopback: entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
            });
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    names.sort();
    names.dedup();
    Ok(names)
}
