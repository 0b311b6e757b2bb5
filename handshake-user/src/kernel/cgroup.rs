//! Cgroup v2 ids to paths. The kernel names a socket's cgroup by its id,
//! which on 64-bit kernels is the inode number of the cgroup's directory
//! in the v2 hierarchy; the paths are found by walking that hierarchy,
//! wherever it is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
//! next to v1 controllers), and walked again when an unknown id turns up.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Walks at most this often: a socket of a cgroup gone before its path was
/// known would otherwise cost a walk per lookup.
const REWALK_AFTER: Duration = Duration::from_millis(250);

/// Directories walked at most (a host with more cgroups gets the first
/// ones' names).
const MAX_CGROUPS: usize = 1 << 16;

#[derive(Debug)]
pub struct Cgroups {
    /// The v2 hierarchy's mount point, if mounted.
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl Default for Cgroups {
    fn default() -> Self {
        Self::new()
    }
}

impl Cgroups {
    pub fn new() -> Self {
        let root = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|text| v2_mount(&text))
            .filter(|_| !crate::kernel::loader::pretends_missing("cgroup2"));
        Self {
            root,
            paths: HashMap::new(),
            walked: None,
        }
    }

    /// The v2 hierarchy mounted at `root` (`--cgroup-root`: in a container,
    /// where the host's is mounted).
    pub fn at(root: PathBuf) -> Self {
        Self {
            root: Some(root),
            ..Self::new()
        }
    }

    /// Where the v2 hierarchy is mounted.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The path of cgroup `id` from the v2 root (`/system.slice/x.service`),
    /// `None` if unknown (0, gone, or no v2 hierarchy).
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if id == 0 {
            return None;
        }
        if !self.paths.contains_key(&id) && self.walked.is_none_or(|t| t.elapsed() >= REWALK_AFTER)
        {
            self.walk();
        }
        self.paths.get(&id).map(String::as_str)
    }

    /// Walks the hierarchy, adding what is new. Paths of cgroups removed
    /// since are kept (a connection in the history may name one) until
    /// the map is full, when it starts afresh.
    fn walk(&mut self) {
        self.walked = Some(Instant::now());
        let Some(root) = &self.root else { return };
        if self.paths.len() >= MAX_CGROUPS {
            self.paths.clear();
        }
        let paths = &mut self.paths;
        let mut stack = vec![(root.clone(), String::from("/"))];
        while let Some((dir, path)) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            paths.insert(meta.ino(), path.clone());
            if paths.len() >= MAX_CGROUPS {
                return;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    stack.push((entry.path(), child));
                }
            }
        }
    }
}

/// The first `cgroup2` mount point in a `mountinfo` text.
fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_mount_is_found_among_v1_controllers() {
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd";
        assert_eq!(
            v2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(v2_mount("22 1 8:1 / / rw - ext4 /dev/sda1 rw"), None);
    }
}
