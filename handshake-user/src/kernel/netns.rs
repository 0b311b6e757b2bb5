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

    /// A namespace found by [`discover`], opened by its path under its
    /// name.
    pub fn open_found(found: &Found) -> Result<Self, NetnsError> {
        let path = found.path.to_string_lossy();
        Ok(Self {
            name: found.name.clone(),
            ..Self::open(&path)?
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same namespace under another name.
    pub fn renamed(self, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..self
        }
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
        let mut list = self.interfaces()?;
        list.retain(|i| i.up);
        Ok(list)
    }

    /// Every interface of this namespace, up or not, sorted by name.
    pub fn interfaces(&self) -> Result<Vec<Interface>, NetnsError> {
        self.run(interfaces_here)?
            .map_err(|source| NetnsError::ListInterfaces {
                name: self.name.clone(),
                source,
            })
    }

    /// A netlink socket in this namespace that hears of its interfaces'
    /// changes (`RTMGRP_LINK`); reads time out after `timeout`.
    pub fn link_changes(&self, timeout: std::time::Duration) -> Result<File, NetnsError> {
        self.run(|| link_socket(timeout))?
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
    pub up: bool,
    pub index: u32,
}

/// `RTMGRP_LINK`: interfaces added, removed, changed.
const RTMGRP_LINK: u32 = 1;

/// A `NETLINK_ROUTE` socket of the calling thread's namespace, bound to
/// the link group.
fn link_socket(timeout: std::time::Duration) -> io::Result<File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl with the family and groups set.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_LINK;
    // SAFETY: a valid address of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: a valid timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn interfaces_here() -> io::Result<Vec<Interface>> {
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
        if is_link {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(entry.ifa_name) };
            // SAFETY: as above.
            let index = unsafe { libc::if_nametoindex(entry.ifa_name) };
            names.push(Interface {
                name: name.to_string_lossy().into_owned(),
                loopback: entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
                up: entry.ifa_flags & libc::IFF_UP as u32 != 0,
                index,
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

/// A network namespace found on the host: its inode number, its name
/// (`host`, the `ip netns` name, or `ns:<inode>`), and a path that opens
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub inode: u64,
    pub name: String,
    pub path: PathBuf,
}

/// `NSFS_MAGIC`: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Every network namespace of the host, found by itself, host first:
/// - the daemon's own (`host`);
/// - those bound to a file: under `/run/netns` (named, as `ip netns` lists
///   them) and anywhere else `/proc/self/mountinfo` shows an `nsfs` mount
///   of a network namespace (Docker's, for example);
/// - those only processes hold, through `/proc/PID/ns/net` (one readlink
///   per process, no open).
///
/// Deduplicated by inode; a name wins over a path.
pub fn discover() -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    let mut add = |inode: u64, name: Option<String>, path: PathBuf| {
        if let Some(known) = found.iter_mut().find(|f| f.inode == inode) {
            if let Some(name) = name
                && known.name.starts_with("ns:")
            {
                known.name = name;
                known.path = path;
            }
            return;
        }
        let name = name.unwrap_or_else(|| format!("ns:{inode}"));
        found.push(Found { inode, name, path });
    };
    if let Some(inode) = link_inode(Path::new("/proc/self/ns/net")) {
        add(
            inode,
            Some("host".to_owned()),
            PathBuf::from("/proc/self/ns/net"),
        );
    }
    if let Ok(entries) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(inode) = nsfs_inode(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                add(inode, Some(name), path);
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for (inode, mount_point) in nsfs_mounts(&mounts) {
            let name = (mount_point.parent() == Some(Path::new(NAMED_NETNS_DIR)))
                .then(|| mount_point.file_name())
                .flatten()
                .map(|n| n.to_string_lossy().into_owned());
            add(inode, name, mount_point);
        }
    }
    for pid in processes() {
        let path = pid.join("ns/net");
        if let Some(inode) = link_inode(&path) {
            add(inode, None, path);
        }
    }
    found
}

/// Per network namespace inode, the cgroup v2 paths of the processes in
/// it (from `/proc/PID/cgroup`), each once: whose a namespace is.
pub fn holders() -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut out: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for pid in processes() {
        let Some(inode) = link_inode(&pid.join("ns/net")) else {
            continue;
        };
        let Ok(cgroups) = std::fs::read_to_string(pid.join("cgroup")) else {
            continue;
        };
        if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
            let paths = out.entry(inode).or_default();
            if !paths.iter().any(|p| p == path) {
                paths.push(path.to_owned());
            }
        }
    }
    out
}

/// `/proc/PID` of every process now.
fn processes() -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .map(|entry| entry.path())
}

/// The inode in a namespace link's target, `net:[4026531840]`.
fn link_inode(path: &Path) -> Option<u64> {
    let target = std::fs::read_link(path).ok()?;
    parse_net_inode(target.to_str()?)
}

fn parse_net_inode(text: &str) -> Option<u64> {
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The namespace inode of a file that is a bound network namespace (an
/// `nsfs` file), `None` for anything else (a stale file left behind).
fn nsfs_inode(path: &Path) -> Option<u64> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    let file = File::open(path).ok()?;
    // SAFETY: statfs fills the zeroed struct for a valid fd.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 || fs.f_type != NSFS_MAGIC {
        return None;
    }
    file.metadata().ok().map(|m| m.ino())
}

/// `(inode, mount point)` of each network namespace bound to a file, from
/// the text of a `mountinfo`: lines whose filesystem is `nsfs` and whose
/// root is `net:[inode]`.
fn nsfs_mounts(mountinfo: &str) -> Vec<(u64, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "nsfs" {
                return None;
            }
            let mut fields = mount.split_whitespace();
            let root = fields.nth(3)?;
            let point = fields.next()?;
            let inode = parse_net_inode(root)?;
            Some((inode, PathBuf::from(unescape_mount(point))))
        })
        .collect()
}

/// A mount point as `mountinfo` escapes it (`\040` for a space).
fn unescape_mount(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = text.get(i + 1..i + 4)
            && let Ok(byte) = u8::from_str_radix(octal, 8)
        {
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsfs_mounts_of_network_namespaces_are_found() {
        let mountinfo = "\
36 25 0:4 net:[4026532281] /run/netns/blue rw shared:5 - nsfs nsfs rw
37 25 0:4 net:[4026532400] /run/docker/netns/a\\040b rw - nsfs nsfs rw
38 25 0:4 mnt:[4026532500] /run/x rw - nsfs nsfs rw
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw";
        assert_eq!(
            nsfs_mounts(mountinfo),
            vec![
                (4_026_532_281, PathBuf::from("/run/netns/blue")),
                (4_026_532_400, PathBuf::from("/run/docker/netns/a b")),
            ]
        );
        assert_eq!(parse_net_inode("net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(parse_net_inode("mnt:[4026531840]"), None);
    }

    #[test]
    fn the_host_namespace_is_found_first() {
        let found = discover();
        assert_eq!(found[0].name, "host");
    }
}
