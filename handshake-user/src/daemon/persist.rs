//! Restarts that lose nothing. The kernel's side outlives the daemon: the
//! maps of `abi::map::PERSISTENT` are pinned in bpffs, one directory per
//! instance (`/sys/fs/bpf/handshake/NAME`), and the next daemon of the
//! same instance reuses them, so the kernel's counters continue, handshakes
//! in flight complete, and socket ages known before stay known. The
//! daemon's own side — its totals, the socket-layer rows it holds, and how
//! far it has read each ring and log — is checkpointed to
//! `/run/handshake/NAME.checkpoint` after every sweep that changed it. A
//! new daemon takes the checkpoint up and reads the rings and logs again
//! from where it was taken, so what the old one read after its last
//! checkpoint is counted once, and what was written while none ran is read.
//!
//! One daemon per instance: the instance's directory is locked
//! (`flock`) while a daemon holds it. `--fresh` and `handshake reset` remove
//! an instance's state; `--ephemeral` keeps none.

use std::{
    io::Write as _,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{
    daemon::state::SelfStats,
    model::{
        closes::CloseTotals,
        conntrack::{Histogram, Phase, Totals},
        sockets::SavedSockets,
        tls::SavedTlsTotals,
    },
    wire::{Outcome, Role},
};

/// Where bpffs is mounted (and mounted by the daemon, if it is not).
pub const BPFFS: &str = "/sys/fs/bpf";
/// The instances' pin directories.
pub const PIN_ROOT: &str = "/sys/fs/bpf/handshake";
/// The instances' checkpoints: a tmpfs, gone at reboot with the pins.
pub const CHECKPOINT_ROOT: &str = "/run/handshake";
/// The instance a daemon is unless told otherwise.
pub const DEFAULT_INSTANCE: &str = "default";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The checkpoint's format; another is not taken up.
const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum PersistError {
    #[error(
        "instance {instance:?} is in use: another daemon holds {} (one daemon per \
         --instance; give this one another, or --ephemeral)",
        path.display()
    )]
    InUse { instance: String, path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{PRETEND}=bpffs: as on a host whose bpffs is read-only")]
    Pretend,
    #[error("bad instance name {0:?}: letters, digits, '-', '_' and '.' only, at most 64")]
    BadName(String),
    #[error("no such user {0:?}")]
    NoSuchUser(String),
}

const PRETEND: &str = crate::kernel::loader::PRETEND_MISSING;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PersistError {
    let path = path.to_owned();
    move |source| PersistError::Io { what, path, source }
}

/// One instance's state on this host, locked by this process.
#[derive(Debug)]
pub struct Persist {
    pub instance: String,
    /// The bpffs directory of its pinned maps.
    pub pins: PathBuf,
    pub checkpoint: PathBuf,
    /// Holds the `flock` on `pins` while the daemon runs.
    _lock: std::fs::File,
}

impl Persist {
    /// Opens (making it, and mounting bpffs, if need be) and locks
    /// `instance`'s state; with `fresh`, empties it first.
    pub fn open(instance: &str, fresh: bool) -> Result<Self, PersistError> {
        if !valid_name(instance) {
            return Err(PersistError::BadName(instance.to_owned()));
        }
        if crate::kernel::loader::pretends_missing("bpffs") {
            return Err(PersistError::Pretend);
        }
        ensure_bpffs()?;
        let pins = make_pin_dir(instance)?;
        let lock = std::fs::File::open(&pins).map_err(io("opening", &pins))?;
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(if error.kind() == std::io::ErrorKind::WouldBlock {
                PersistError::InUse {
                    instance: instance.to_owned(),
                    path: pins,
                }
            } else {
                io("locking", &pins)(error)
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(CHECKPOINT_ROOT)
            .map_err(io("making", Path::new(CHECKPOINT_ROOT)))?;
        let this = Self {
            instance: instance.to_owned(),
            checkpoint: Path::new(CHECKPOINT_ROOT).join(format!("{instance}.checkpoint")),
            pins,
            _lock: lock,
        };
        if fresh {
            let removed = this.clear()?;
            tracing::info!(
                instance,
                removed,
                "--fresh: the instance's pinned maps and checkpoint are removed"
            );
        }
        Ok(this)
    }

    /// Removes every pin and the checkpoint; the directory stays (locked).
    /// Returns how many files went.
    fn clear(&self) -> Result<usize, PersistError> {
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.pins).map_err(io("listing", &self.pins))?;
        for entry in entries {
            let path = entry.map_err(io("listing", &self.pins))?.path();
            std::fs::remove_file(&path).map_err(io("unpinning", &path))?;
            removed += 1;
        }
        match std::fs::remove_file(&self.checkpoint) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &self.checkpoint)(e)),
        }
        Ok(removed)
    }

    /// The checkpoint a daemon before this one left, if there is one this
    /// daemon can take up (one that cannot be read is said so, and left).
    pub fn load(&self) -> Option<Checkpoint> {
        let bytes = match std::fs::read(&self.checkpoint) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %self.checkpoint.display(), %error, "cannot read the checkpoint: counting from 0");
                return None;
            }
        };
        // The JSON, a newline, the rows.
        let (json, rows) = match bytes.iter().position(|b| *b == b'\n') {
            Some(at) => (&bytes[..at], &bytes[at + 1..]),
            None => (&bytes[..], &[][..]),
        };
        match serde_json::from_slice::<Checkpoint>(json) {
            Ok(checkpoint) if checkpoint.version == VERSION => Some(Checkpoint {
                rows: rows.to_vec(),
                ..checkpoint
            }),
            Ok(checkpoint) => {
                tracing::warn!(
                    path = %self.checkpoint.display(),
                    version = checkpoint.version,
                    "the checkpoint is another version's: counting from 0"
                );
                None
            }
            Err(error) => {
                tracing::warn!(path = %self.checkpoint.display(), %error, "the checkpoint does not parse: counting from 0");
                None
            }
        }
    }

    /// Writes `checkpoint` whole or not at all (a new file renamed over
    /// the old); returns its size.
    pub fn save(&self, checkpoint: &Checkpoint) -> std::io::Result<usize> {
        let mut bytes = serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&checkpoint.rows);
        let partial = self.checkpoint.with_extension("checkpoint.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        file.write_all(&bytes)?;
        drop(file);
        std::fs::rename(&partial, &self.checkpoint)?;
        Ok(bytes.len())
    }
}

/// Writes the checkpoints of one daemon, skipping one equal to the last
/// written (a quiet host writes none).
#[derive(Debug)]
pub struct Checkpointer {
    persist: Persist,
    last: Checkpoint,
    /// When the last was taken (monotonic ns).
    taken_ns: u64,
}

/// How often a checkpoint is taken, at least, while anything changes.
/// What is read after it is read again after a restart; what the sweep
/// takes out of the kernel's tables is not, and is checkpointed at once.
pub const CHECKPOINT_EVERY_NS: u64 = 1_000_000_000;

impl Checkpointer {
    pub fn new(persist: Persist) -> Self {
        Self {
            persist,
            last: Checkpoint::default(),
            taken_ns: 0,
        }
    }

    /// Whether a checkpoint is due at `now_ns`.
    pub fn due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.taken_ns) >= CHECKPOINT_EVERY_NS
    }

    /// Writes `checkpoint` unless nothing changed; its size if written.
    pub fn write(&mut self, checkpoint: Checkpoint, now_ns: u64) -> std::io::Result<Option<usize>> {
        self.taken_ns = now_ns;
        if checkpoint == self.last {
            return Ok(None);
        }
        let size = self.persist.save(&checkpoint)?;
        self.last = checkpoint;
        Ok(Some(size))
    }
}

/// What the daemon keeps across restarts, as `handshake status` says it.
#[derive(Clone, Debug, Default)]
pub struct Kept {
    /// The instance, when its state is kept.
    pub instance: Option<String>,
    /// Where, and what was taken up at the start; or why nothing is kept.
    pub detail: String,
}

/// `handshake reset`: removes `instance`'s pinned maps, its directory and
/// its checkpoint; refuses while a daemon holds it. Returns how many
/// files went.
pub fn reset(instance: &str) -> Result<usize, PersistError> {
    if !valid_name(instance) {
        return Err(PersistError::BadName(instance.to_owned()));
    }
    let pins = Path::new(PIN_ROOT).join(instance);
    let checkpoint = Path::new(CHECKPOINT_ROOT).join(format!("{instance}.checkpoint"));
    if !pins.exists() {
        return match std::fs::remove_file(&checkpoint) {
            Ok(()) => Ok(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io("removing", &checkpoint)(e)),
        };
    }
    let persist = Persist::open(instance, false)?;
    let removed = persist.clear()?;
    std::fs::remove_dir(&persist.pins).map_err(io("removing", &persist.pins))?;
    // The root goes with its last instance (another may be made meanwhile).
    let _ = std::fs::remove_dir(PIN_ROOT);
    Ok(removed)
}

/// `handshake prepare`: makes `instance`'s pin directory (and bpffs, and
/// the checkpoint directory) for a daemon that runs as `owner`, and hands
/// it and its pins to that user: a systemd `DynamicUser` may get another
/// uid at each start.
pub fn prepare(instance: &str, owner: &str) -> Result<(), PersistError> {
    if !valid_name(instance) {
        return Err(PersistError::BadName(instance.to_owned()));
    }
    let (uid, gid) = user_ids(owner).ok_or_else(|| PersistError::NoSuchUser(owner.to_owned()))?;
    ensure_bpffs()?;
    // bpffs is mounted 0700: another user cannot even reach a directory of
    // its own inside. Search (not listing) for all; what is pinned keeps
    // its own mode (0600, its creator's).
    for dir in [BPFFS, PIN_ROOT] {
        std::fs::create_dir_all(dir).map_err(io("making", Path::new(dir)))?;
        let mode = std::fs::metadata(dir)
            .map_err(io("looking at", Path::new(dir)))?
            .permissions()
            .mode();
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(io("letting its user through", Path::new(dir)))?;
        }
    }
    let pins = make_pin_dir(instance)?;
    let mut paths = vec![pins.clone()];
    for entry in std::fs::read_dir(&pins).map_err(io("listing", &pins))? {
        paths.push(entry.map_err(io("listing", &pins))?.path());
    }
    // The checkpoint is written anew and renamed into place: the user
    // needs the directory (the unit's RuntimeDirectory is its already).
    std::fs::create_dir_all(CHECKPOINT_ROOT).map_err(io("making", Path::new(CHECKPOINT_ROOT)))?;
    paths.push(PathBuf::from(CHECKPOINT_ROOT));
    let checkpoint = Path::new(CHECKPOINT_ROOT).join(format!("{instance}.checkpoint"));
    if checkpoint.exists() {
        paths.push(checkpoint);
    }
    for path in paths {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io("handing over", &path))?;
    }
    Ok(())
}

/// A user's uid and primary gid, by name or number.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(user).ok()?;
    // SAFETY: a valid C string; the result is read before any other call
    // that could reuse its static storage.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if !entry.is_null() {
        // SAFETY: non-null, as getpwnam returned it.
        return Some(unsafe { ((*entry).pw_uid, (*entry).pw_gid) });
    }
    let uid: u32 = user.parse().ok()?;
    Some((uid, uid))
}

/// Makes `instance`'s pin directory (0700) if it is not there.
fn make_pin_dir(instance: &str) -> Result<PathBuf, PersistError> {
    let pins = Path::new(PIN_ROOT).join(instance);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&pins)
        .map_err(io("making the pin directory", &pins))?;
    Ok(pins)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Mounts bpffs at [`BPFFS`] unless it is there: a freshly booted host
/// may not have it.
fn ensure_bpffs() -> Result<(), PersistError> {
    let path = std::ffi::CString::new(BPFFS).expect("no NUL");
    // SAFETY: statfs writes into the zeroed struct it is given.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and struct.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io("looking at", Path::new(BPFFS))(
            std::io::Error::last_os_error(),
        ));
    }
    if stat.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let (source, fstype, options) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: valid C strings; mount does not keep them.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(io("mounting bpffs at", Path::new(BPFFS))(
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(path = BPFFS, "bpffs was not mounted: mounted it");
    Ok(())
}

/// What the daemon knows that the kernel does not: its totals, the rows it
/// holds, and how far it has read the kernel's rings and logs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    pub pid: u32,
    pub handshakes: Vec<((Role, Outcome), u64)>,
    pub durations: Vec<((Role, Phase), Histogram)>,
    pub syn_retransmits: Vec<(Role, u64)>,
    pub synack_retransmits: Vec<(Role, u64)>,
    pub conntrack_malformed: u64,
    pub sockets: SavedSockets,
    pub closes: CloseTotals,
    pub tls: SavedTlsTotals,
    pub self_stats: SelfStats,
    pub positions: Positions,
    /// How many of the hooks' rows the held socket rows may still join
    /// follow the held rows in `rows` (newest first).
    pub unpaired_wire: usize,
    /// The held socket rows, then the hooks' unpaired rows, in binary
    /// (`model::put_row`): after the JSON in the file, not in it.
    #[serde(skip)]
    pub rows: Vec<u8>,
}

/// How far the daemon has read: the two ring buffers (bytes) and the
/// socket layer's log (records, per CPU).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Positions {
    pub events: u64,
    pub tls: u64,
    pub sock_log: Vec<u64>,
}

impl Checkpoint {
    pub fn totals(&self) -> Totals {
        Totals {
            handshakes: self.handshakes.iter().copied().collect(),
            durations: self.durations.iter().cloned().collect(),
            syn_retransmits: self.syn_retransmits.iter().copied().collect(),
            synack_retransmits: self.synack_retransmits.iter().copied().collect(),
        }
    }

    pub fn of_totals(totals: &Totals) -> Self {
        Self {
            version: VERSION,
            pid: std::process::id(),
            handshakes: totals.handshakes.iter().map(|(k, v)| (*k, *v)).collect(),
            durations: totals
                .durations
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            syn_retransmits: totals
                .syn_retransmits
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            synack_retransmits: totals
                .synack_retransmits
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_stay_in_their_directory() {
        for good in ["default", "edge-1", "a.b_c"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_checkpoint_round_trips_through_json() {
        let mut totals = Totals::default();
        totals
            .handshakes
            .insert((Role::Server, Outcome::Established), 7);
        let mut h = Histogram::default();
        h.observe(0.001);
        totals.durations.insert((Role::Client, Phase::Connect), h);
        let mut checkpoint = Checkpoint::of_totals(&totals);
        checkpoint.positions.sock_log = vec![3, 4];
        let json = serde_json::to_vec(&checkpoint).unwrap();
        let back: Checkpoint = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, checkpoint);
        assert_eq!(back.totals().handshakes, totals.handshakes);
        assert_eq!(back.totals().durations, totals.durations);
    }
}
