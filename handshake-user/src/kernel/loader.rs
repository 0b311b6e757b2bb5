//! Loading the kernel programs and attaching them: the only module that
//! names programs and hooks. Attach failures are recorded per probe (they
//! become `handshake_probe_attached` 0), logged, and never hidden.

use std::{
    ffi::CString,
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, Iter, ProgramError, SchedClassifier, TcAttach, TcAttachType, Xdp,
        tc::{self, NlOptions, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
};
use handshake_common::abi::{map, program, socket};

use crate::kernel::{
    EBPF_OBJECT,
    btf::{BtfError, KERNEL_BTF, Offsets},
    census::{Census, CensusError, Method},
    error::LoadError,
    events::CpuLog,
    maps::{Counters, FlowTables, TlsMaps},
    netns::{Netns, NetnsError},
};

/// The hook that sees received packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IngressHook {
    Xdp,
    Tc,
}

/// How an XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Generic (skb) mode: see [`Observer::attach_interfaces`].
    Auto,
    Native,
    Skb,
}

/// Entries of the kernel's tables whose size the daemon chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    pub half_open: u32,
    pub flows: u32,
    pub sock_ages: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        Self {
            half_open: handshake_common::abi::HALF_OPEN_ENTRIES,
            flows: handshake_common::abi::FLOWS_ENTRIES,
            sock_ages: handshake_common::abi::SOCK_AGE_ENTRIES,
        }
    }
}

/// The link pinned at `path`, if its program has instructions tagged
/// `tag` (the program this daemon loaded, as it loaded it).
fn same_program_link(path: &std::path::Path, tag: u64) -> Option<aya::programs::links::PinnedLink> {
    use aya::programs::links::{FdLink, PinnedLink};
    if !path.exists() {
        return None;
    }
    let program_id = FdLink::from(PinnedLink::from_pin(path).ok()?)
        .info()
        .ok()?
        .program_id();
    let old_tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == program_id)?
        .tag();
    (old_tag == tag).then(|| PinnedLink::from_pin(path).ok())?
}

/// The programs of packet hooks whose links can be pinned: TCX and XDP.
trait HookProgram {
    /// The program's own kind of link.
    type Link: TryFrom<aya::programs::links::FdLink>;

    /// The tag of the program's instructions as loaded.
    fn tag(&self) -> Result<u64, ProgramError>;

    /// Swaps this program into `link` (`bpf_link_update`), which stays
    /// where it is attached and pinned.
    fn swap_into(&mut self, link: Self::Link) -> Result<(), ProgramError>;
}

/// aya gives both kinds the same methods, but no trait for them.
macro_rules! hook_program {
    ($program:ty, $link:ty) => {
        impl HookProgram for $program {
            type Link = $link;

            fn tag(&self) -> Result<u64, ProgramError> {
                Ok(self.info()?.tag())
            }

            fn swap_into(&mut self, link: Self::Link) -> Result<(), ProgramError> {
                let id = self.attach_to_link(link)?;
                // The same link, pinned where it was: nothing to hold here.
                drop(self.take_link(id)?);
                Ok(())
            }
        }
    };
}

hook_program!(SchedClassifier, tc::SchedClassifierLink);
hook_program!(Xdp, aya::programs::xdp::XdpLink);

/// Takes over the packet-hook link a daemon before pinned at `pin`, if
/// there is one: kept as it is when it runs `prog` as this daemon loaded
/// it (`maps_kept`, the same tag), else `prog` swapped into it in place.
/// `how` is the attach mode (`tcx`, `xdp-skb`, ...). `None` when there is
/// none, or when it cannot be taken over (the link is defunct: its
/// interface went); then it is detached, and the caller attaches afresh.
fn take_over_link<P: HookProgram>(
    prog: &mut P,
    pin: &std::path::Path,
    maps_kept: bool,
    how: &str,
) -> Option<(String, HookLink)> {
    use aya::programs::links::{FdLink, PinnedLink};
    if !pin.exists() {
        return None;
    }
    if maps_kept
        && let Ok(tag) = prog.tag()
        && let Some(kept) = same_program_link(pin, tag)
    {
        return Some((
            format!("{how}, pinned, kept from the daemon before"),
            HookLink::Pinned(kept),
        ));
    }
    let swapped = PinnedLink::from_pin(pin)
        .ok()
        .and_then(|old| P::Link::try_from(FdLink::from(old)).ok())
        .and_then(|old| prog.swap_into(old).ok())
        .and_then(|()| PinnedLink::from_pin(pin).ok());
    match swapped {
        Some(pinned) => Some((
            format!("{how}, pinned, its program replaced in place"),
            HookLink::Pinned(pinned),
        )),
        None => {
            release_old_link(pin);
            None
        }
    }
}

/// Pins a packet hook's new `link` at `pin`, so that it outlives the
/// process. `None` when it cannot be: the link went with the failed pin
/// (or could not be pinned at all, an XDP netlink attachment), and the
/// caller attaches again, unpinned.
fn pin_hook(
    link: Result<aya::programs::links::FdLink, aya::programs::links::LinkError>,
    pin: &std::path::Path,
    how: &str,
) -> Option<(String, HookLink)> {
    let pinned = link
        .map_err(|e| e.to_string())
        .and_then(|link| link.pin(pin).map_err(|e| e.to_string()));
    match pinned {
        Ok(pinned) => Some((format!("{how}, pinned"), HookLink::Pinned(pinned))),
        Err(error) => {
            tracing::warn!(link = %pin.display(), %error, "cannot pin the link: it goes with the process");
            None
        }
    }
}

/// Detaches the link pinned at `path`, if there is one.
fn release_old_link(path: &std::path::Path) {
    if !path.exists() {
        return;
    }
    match aya::programs::links::PinnedLink::from_pin(path).map(|l| l.unpin()) {
        Ok(Ok(link)) => drop(link),
        Ok(Err(error)) => tracing::warn!(link = %path.display(), %error, "unpinning an old link"),
        Err(error) => {
            tracing::warn!(link = %path.display(), error = %chain(&error), "opening an old link");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Loads the object; a pinned map whose layout is not the object's (aya
/// checks type, sizes, entries and flags) is unpinned and made anew, once
/// per map, with a warning: its old contents do not fit this daemon.
/// Returns how many it replaced.
fn load_replacing_stale_pins(
    loader: &mut EbpfLoader<'_>,
    pins: &[(&str, std::path::PathBuf)],
) -> Result<(Ebpf, usize), LoadError> {
    let mut replaced = Vec::new();
    loop {
        match loader.load(EBPF_OBJECT) {
            Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            })) if !replaced.contains(&name) => {
                let Some((_, path)) = pins.iter().find(|(n, _)| **n == name) else {
                    return Err(LoadError::Object(aya::EbpfError::MapError(
                        aya::maps::MapError::IncompatiblePinnedMap {
                            name,
                            property,
                            expected,
                            actual,
                        },
                    )));
                };
                tracing::warn!(
                    map = %name,
                    pin = %path.display(),
                    %property,
                    kept = actual,
                    wanted = expected,
                    "a pinned map's layout is not this daemon's: replacing it (what it held is lost)"
                );
                std::fs::remove_file(path).map_err(|source| LoadError::Unpin {
                    path: path.clone(),
                    source,
                })?;
                replaced.push(name);
            }
            result => {
                return result
                    .map(|ebpf| (ebpf, replaced.len()))
                    .map_err(LoadError::Object);
            }
        }
    }
}

/// The BTF tracepoint each tracepoint program attaches to: attached by
/// name, they need no tracefs.
const fn traced_event(program: &str) -> Option<&'static str> {
    match program.as_bytes() {
        b"tp_sock_state" => Some("inet_sock_set_state"),
        b"tp_synack_rtx" => Some("tcp_retransmit_synack"),
        b"tp_syn_rtx" => Some("tcp_retransmit_skb"),
        b"tp_kfree_skb" => Some("kfree_skb"),
        _ => None,
    }
}

/// One hook we tried to attach, and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Program name, e.g. `xdp_handshake`.
    pub probe: &'static str,
    /// Interface, for packet hooks.
    pub interface: Option<String>,
    /// The namespace of the interface, for packet hooks.
    pub netns: Option<String>,
    /// How it is attached (`xdp-native`, `tcx`, ...), or why it is not.
    pub detail: String,
    pub attached: bool,
}

/// Every hook tried and how it went, shared with the metrics: packet
/// hooks come and go with their interfaces.
pub type Attachments = Arc<Mutex<Vec<Attachment>>>;

/// A packet hook's link, to detach it when its interface goes.
#[derive(Debug)]
enum HookLink {
    Tc(&'static str, SchedClassifierLinkId),
    Xdp(XdpLinkId),
    /// A TCX or XDP link pinned with the instance's maps: it outlives a
    /// SIGKILL.
    Pinned(aya::programs::links::PinnedLink),
}

/// A packet hook attached to one interface of one namespace.
#[derive(Debug)]
struct Hook {
    netns: String,
    iface: String,
    ifindex: u32,
    link: HookLink,
}

/// The loaded kernel programs and where they are attached.
#[derive(Debug)]
pub struct Observer {
    ebpf: Ebpf,
    attachments: Attachments,
    hooks: Vec<Hook>,
    census: Option<Result<Census, CensusError>>,
    /// CPUs the socket layer's log was sized for (the possible CPUs).
    log_cpus: u32,
    /// This kernel's drop reasons by number, from its BTF.
    drop_reasons: std::collections::BTreeMap<u32, String>,
    /// Where the tracepoints' links are pinned, so that they outlive the
    /// process ([`Self::attach_tracepoints`]); `None`: they go with it.
    link_pins: Option<std::path::PathBuf>,
    /// The tracepoint links pinned there, to unpin on a final stop.
    pinned_links: Vec<aya::programs::links::PinnedLink>,
    /// Every pinned map was there before and kept: a program a daemon
    /// before attached writes into this daemon's maps.
    maps_kept: bool,
    /// The packet-hook link pins this daemon attached or took over.
    claimed_pins: Vec<std::path::PathBuf>,
}

impl Observer {
    /// Loads every program into the kernel with the default table sizes;
    /// attaches nothing.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_with(TableSizes::default(), None, None)
    }

    /// Loads the programs with `tables`' sizes: both ingress programs, or
    /// only the one `ingress` names (the verifier's work on the other would
    /// cost ~0.3 s of the start, and leave an unattached program behind
    /// in `bpftool prog`).
    ///
    /// With `pins`, a bpffs directory, the maps of [`map::PERSISTENT`] are
    /// pinned there, or reused from there when a daemon before pinned them
    /// with the same layout; a pin whose layout differs (another version,
    /// other table sizes) is replaced, and said so.
    pub fn load_with(
        tables: TableSizes,
        ingress: Option<IngressHook>,
        pins: Option<&std::path::Path>,
    ) -> Result<Self, LoadError> {
        if pretends_missing("btf") || !std::path::Path::new(KERNEL_BTF).exists() {
            return Err(LoadError::NoBtf(KERNEL_BTF));
        }
        // The state tracepoint and the census read kernel structs at offsets
        // only the running kernel's BTF knows.
        let offsets = Offsets::resolve(KERNEL_BTF).map_err(LoadError::Btf)?;
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            LoadError::Btf(BtfError::Read {
                path: KERNEL_BTF.to_owned(),
                reason: e.to_string(),
            })
        })?;
        let (age_slots, age_overflow) = handshake_common::abi::sock_age_tables(tables.sock_ages);
        let age_slot_mask = age_slots - 1;
        let log_cpus = aya::util::nr_cpus()
            .map_err(|(path, error)| LoadError::Cpus {
                path,
                reason: error.to_string(),
            })?
            .get();
        let mut loader = EbpfLoader::new();
        loader.override_global("AGE_SLOT_MASK", &age_slot_mask, true);
        loader
            .map_max_entries(map::HALF_OPEN, tables.half_open)
            .map_max_entries(map::FLOWS, tables.flows)
            .map_max_entries(map::SK_AGE_SLOTS, age_slots)
            .map_max_entries(map::SK_AGE, age_overflow)
            .map_max_entries(map::SOCK_LOG, log_cpus * socket::LOG_SLOTS)
            .map_max_entries(map::SOCK_LOG_HEADS, log_cpus * socket::HEAD_STRIDE);
        for (name, value) in &offsets.values {
            loader.override_global(name, value, true);
        }
        // Drop reasons the kfree_skb program skips at once, by this
        // kernel's numbers.
        // Read once: also the names the metrics give the reasons.
        let drop_reasons = crate::kernel::btf::drop_reasons(KERNEL_BTF);
        let skipped: Vec<(&str, u32)> = [
            ("SKIP_REASON_QUEUE_PURGE", "queue_purge"),
            ("SKIP_REASON_SOCKET_CLOSE", "socket_close"),
        ]
        .into_iter()
        .map(|(global, name)| {
            let number = drop_reasons
                .iter()
                .find(|(_, n)| n.as_str() == name)
                .map_or(u32::MAX, |(number, _)| *number);
            (global, number)
        })
        .collect();
        for (global, number) in &skipped {
            loader.override_global(global, number, true);
        }
        let pin_paths: Vec<(&str, std::path::PathBuf)> = pins
            .map(|dir| {
                map::PERSISTENT
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            })
            .unwrap_or_default();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let pinned_before = pin_paths.iter().all(|(_, path)| path.exists());
        let (mut ebpf, replaced) = load_replacing_stale_pins(&mut loader, &pin_paths)?;
        let maps_kept = !pin_paths.is_empty() && pinned_before && replaced == 0;
        let skip = match ingress {
            Some(IngressHook::Xdp) => Some(program::TC_INGRESS),
            Some(IngressHook::Tc) => Some(program::XDP_INGRESS),
            None => None,
        };
        for name in program::HOOKS {
            if Some(name) == skip {
                continue;
            }
            let prog = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?;
            let loaded = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::BtfTracePoint(p) => match traced_event(name) {
                    Some(event) => p.load(event, &btf),
                    None => Err(ProgramError::UnexpectedProgramType),
                },
                _ => Err(ProgramError::UnexpectedProgramType),
            };
            loaded.map_err(|source| LoadError::Program { name, source })?;
        }
        let census = load_census(&mut ebpf, &btf);
        Ok(Self {
            ebpf,
            attachments: Attachments::default(),
            hooks: Vec::new(),
            census: Some(census),
            log_cpus,
            drop_reasons,
            link_pins: pins.map(std::path::Path::to_path_buf),
            pinned_links: Vec::new(),
            maps_kept,
            claimed_pins: Vec::new(),
        })
    }

    /// The socket census, or why it could not be loaded (the daemon goes
    /// on without it and says so). Once only.
    pub fn take_census(&mut self) -> Result<Census, CensusError> {
        self.census.take().unwrap_or(Err(CensusError::Taken))
    }

    /// The raw object, for tests that drive programs with BPF_PROG_TEST_RUN.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Takes the counter maps out of the object, for the metrics collector.
    pub fn take_counters(&mut self) -> Result<Counters, LoadError> {
        Counters::take_from(&mut self.ebpf, std::mem::take(&mut self.drop_reasons))
    }

    /// Takes the flow tables out of the object, for the sweep.
    pub fn take_flow_tables(&mut self) -> Result<FlowTables, LoadError> {
        FlowTables::take_from(&mut self.ebpf)
    }

    /// Takes the TLS hello ring buffer and the capture's pending table;
    /// the ring's reader first moved back to `rewind` if it can be
    /// ([`crate::kernel::events::rewind_ring`]).
    pub fn take_tls(
        &mut self,
        rewind: Option<u64>,
    ) -> Result<(RingBuf<MapData>, TlsMaps), LoadError> {
        let events = self.take_ring(map::TLS_EVENTS, rewind)?;
        Ok((events, TlsMaps::take_from(&mut self.ebpf)?))
    }

    /// Takes the ring buffer of handshakes the packet hooks decided.
    /// Its reader first moved back to `rewind` if it can be.
    pub fn take_events(&mut self, rewind: Option<u64>) -> Result<RingBuf<MapData>, LoadError> {
        self.take_ring(map::EVENTS, rewind)
    }

    /// Takes the socket layer's per-CPU log of decided handshakes, mapped.
    pub fn take_sock_log(&mut self) -> Result<CpuLog, LoadError> {
        let mut array = |name: &'static str| match self.ebpf.take_map(name) {
            Some(aya::maps::Map::Array(data)) => Ok(data),
            Some(_) => Err(LoadError::NotAnArray(name)),
            None => Err(LoadError::MissingMap(name)),
        };
        let (records, heads) = (array(map::SOCK_LOG)?, array(map::SOCK_LOG_HEADS)?);
        CpuLog::new(records, heads, self.log_cpus).map_err(|source| LoadError::Mmap {
            name: map::SOCK_LOG,
            source,
        })
    }

    fn take_ring(
        &mut self,
        name: &'static str,
        rewind: Option<u64>,
    ) -> Result<RingBuf<MapData>, LoadError> {
        let events = self
            .ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap(name))?;
        if let (Some(to), aya::maps::Map::RingBuf(data)) = (rewind, &events) {
            let rewound = crate::kernel::events::rewind_ring(
                data.fd().as_fd(),
                to,
                u64::from(handshake_common::abi::EVENTS_BYTES),
            )
            .map_err(|source| LoadError::Mmap { name, source })?;
            if !rewound {
                tracing::warn!(
                    ring = name,
                    "records read after the last checkpoint are gone from the ring: not read again"
                );
            }
        }
        RingBuf::try_from(events).map_err(|source| LoadError::Map { name, source })
    }

    /// Every hook tried so far and how it went.
    pub fn attachments(&self) -> Vec<Attachment> {
        lock_attachments(&self.attachments).clone()
    }

    /// The same, shared: it follows the interfaces as they come and go.
    pub fn attachments_handle(&self) -> Attachments {
        Arc::clone(&self.attachments)
    }

    /// The interfaces of namespace `netns` (by name) that carry packet
    /// hooks: name and index.
    pub fn hooked(&self, netns: &str) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .hooks
            .iter()
            .filter(|h| h.netns == netns)
            .map(|h| (h.iface.clone(), h.ifindex))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Packet-hook links held now (two per interface: ingress, egress).
    pub fn hook_links(&self) -> usize {
        self.hooks.len()
    }

    /// The host-wide BTF tracepoints: `inet_sock_set_state`,
    /// `tcp_retransmit_synack` and `tcp_retransmit_skb`.
    ///
    /// With pins (a kept instance), each link is pinned beside the maps:
    /// after a SIGKILL the programs stay attached and go on writing into
    /// the pinned maps, so the next daemon misses nothing the socket layer
    /// saw meanwhile. That daemon detaches each old link just before it
    /// attaches its own: never both at once (a state change would be
    /// logged twice), and the window between is the two syscalls. A final
    /// stop ([`Self::detach`]) unpins them.
    pub fn attach_tracepoints(&mut self) {
        for name in [
            program::TP_SOCK_SET_STATE,
            program::TP_RETRANSMIT_SYNACK,
            program::TP_RETRANSMIT_SYN,
        ] {
            let result = if pretends_missing("tp_btf") {
                Err(ProgramError::IOError(std::io::Error::other(format!(
                    "{PRETEND_MISSING}=tp_btf: as on a kernel without BTF tracepoints (before 5.5)"
                ))))
            } else {
                self.attach_kept(name)
            };
            self.record_tracepoint(name, result);
        }
        let result = self.attach_drops();
        self.record_tracepoint(program::TP_KFREE_SKB, result);
    }

    /// Records how tracepoint `name` was attached; if it was not, a link a
    /// daemon before left for it goes (it would report into maps no one
    /// reads the way it wrote them).
    fn record_tracepoint(&mut self, name: &'static str, result: Result<&str, ProgramError>) {
        if result.is_err() {
            self.release_old_link(name);
        }
        self.record(name, None, result.map(|how| how.to_owned()));
    }

    /// Where tracepoint program `name`'s link is pinned, if links are.
    fn link_pin(&self, name: &str) -> Option<std::path::PathBuf> {
        self.link_pins
            .as_ref()
            .map(|dir| dir.join(format!("link_{name}")))
    }

    /// Detaches the packet-hook links a daemon before pinned that this one
    /// has not taken over: interfaces it does not hook (gone, or no longer
    /// named). Called once the hooks of the start are attached.
    pub fn release_unclaimed_links(&mut self) {
        let Some(dir) = &self.link_pins else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let is_hook = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link_tcx_") || n.starts_with("link_xdp_"));
            if is_hook && !self.claimed_pins.contains(&path) {
                tracing::info!(link = %path.display(), "a packet hook the daemon before left, not wanted now: detached");
                release_old_link(&path);
            }
        }
    }

    /// Detaches the link a daemon before pinned for program `name`, if any.
    fn release_old_link(&self, name: &str) {
        if let Some(path) = self.link_pin(name) {
            release_old_link(&path);
        }
    }

    /// Attaches tracepoint program `name` (loaded), replacing and pinning
    /// its link when links are kept. How it is attached.
    ///
    /// The link a daemon before left is kept, not replaced, when its
    /// program is this one's (the same instructions: the same tag) and
    /// writes into this daemon's maps: no window at all.
    fn attach_kept(&mut self, name: &'static str) -> Result<&'static str, ProgramError> {
        let pin = self.link_pin(name);
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(ProgramError::UnexpectedProgramType)?
            .try_into()?;
        if let Some(path) = &pin {
            if self.maps_kept
                && let Some(kept) = same_program_link(path, prog.info()?.tag())
            {
                self.pinned_links.push(kept);
                return Ok("tp_btf, pinned, kept from the daemon before");
            }
            release_old_link(path);
        }
        let id = prog.attach()?;
        let Some(pin) = pin else {
            return Ok("tp_btf");
        };
        let link: aya::programs::links::FdLink = prog.take_link(id)?.into();
        match link.pin(&pin) {
            Ok(pinned) => {
                self.pinned_links.push(pinned);
                Ok("tp_btf, pinned")
            }
            Err(error) => {
                // The link went with the failed pin: attach it plainly.
                tracing::warn!(link = %pin.display(), %error, "cannot pin the link: it goes with the process");
                prog.attach()?;
                Ok("tp_btf")
            }
        }
    }

    /// Loads and attaches `skb:kfree_skb`: apart from the other
    /// tracepoints, since a kernel whose tracepoint lacks the drop reason
    /// or the receiving socket refuses the program; the daemon goes on
    /// without drop reasons and says so (`handshake_probe_attached`).
    fn attach_drops(&mut self) -> Result<&'static str, ProgramError> {
        for facility in ["kfree_skb", "tp_btf"] {
            if pretends_missing(facility) {
                return Err(ProgramError::IOError(std::io::Error::other(format!(
                    "{PRETEND_MISSING}={facility}"
                ))));
            }
        }
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            ProgramError::IOError(std::io::Error::other(format!("kernel BTF: {e}")))
        })?;
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(program::TP_KFREE_SKB)
            .ok_or(ProgramError::UnexpectedProgramType)?
            .try_into()?;
        prog.load("kfree_skb", &btf)?;
        self.attach_kept(program::TP_KFREE_SKB)
    }

    /// Ingress and egress hooks on each interface of `netns`.
    pub fn attach_interfaces(
        &mut self,
        netns: &Netns,
        interfaces: &[String],
        ingress: IngressHook,
        xdp_mode: XdpMode,
    ) -> Result<(), LoadError> {
        let netns_inode = netns.inode().unwrap_or(0);
        let results = netns.run(|| {
            let mut results = Vec::new();
            for iface in interfaces {
                let ifindex = c_name(iface)
                    .ok()
                    // SAFETY: a valid NUL-terminated name.
                    .map_or(0, |c| unsafe { libc::if_nametoindex(c.as_ptr()) });
                let pin = |hook: &str| {
                    self.link_pins
                        .as_ref()
                        .filter(|_| ifindex != 0 && netns_inode != 0)
                        .map(|dir| dir.join(format!("link_{hook}_{netns_inode}_{ifindex}")))
                };
                let xdp_hook = match xdp_mode {
                    XdpMode::Native => "xdp_native",
                    XdpMode::Auto | XdpMode::Skb => "xdp_skb",
                };
                let in_hook = match ingress {
                    IngressHook::Xdp => xdp_hook,
                    IngressHook::Tc => "tcx_ingress",
                };
                // An ingress hook of another kind a daemon before left here
                // (the flags changed) goes first: with both, every received
                // packet would count twice.
                for other in ["tcx_ingress", "xdp_skb", "xdp_native"] {
                    if other != in_hook
                        && let Some(path) = pin(other)
                    {
                        release_old_link(&path);
                    }
                }
                let (in_pin, out_pin) = (pin(in_hook), pin("tcx_egress"));
                let ingress_result = match ingress {
                    IngressHook::Xdp => (
                        program::XDP_INGRESS,
                        self.attach_xdp(iface, xdp_mode, in_pin),
                    ),
                    IngressHook::Tc => (
                        program::TC_INGRESS,
                        self.attach_tc(program::TC_INGRESS, iface, TcAttachType::Ingress, in_pin),
                    ),
                };
                results.push((iface.clone(), ifindex, ingress_result));
                let egress =
                    self.attach_tc(program::TC_EGRESS, iface, TcAttachType::Egress, out_pin);
                results.push((iface.clone(), ifindex, (program::TC_EGRESS, egress)));
            }
            results
        })?;
        for (iface, ifindex, (probe, result)) in results {
            let result = result.map(|(detail, link)| {
                self.hooks.push(Hook {
                    netns: netns.name().to_owned(),
                    iface: iface.clone(),
                    ifindex,
                    link,
                });
                detail
            });
            self.record_in(probe, Some(iface), Some(netns.name().to_owned()), result);
        }
        Ok(())
    }

    /// Detaches the packet hooks of interface `iface` of `netns` (gone, or
    /// no longer wanted) and forgets its attachments: its
    /// `handshake_probe_attached` series go with it.
    pub fn detach_interface(&mut self, netns: &Netns, iface: &str) -> Result<(), NetnsError> {
        let name = netns.name();
        let (gone, kept): (Vec<Hook>, Vec<Hook>) = std::mem::take(&mut self.hooks)
            .into_iter()
            .partition(|h| h.netns == name && h.iface == iface);
        self.hooks = kept;
        netns.run(|| {
            for hook in gone {
                // A link of an interface that is gone is defunct already:
                // detaching it only releases it.
                let detached = match hook.link {
                    HookLink::Tc(program, link) => self
                        .ebpf
                        .program_mut(program)
                        .ok_or(ProgramError::UnexpectedProgramType)
                        .and_then(<&mut SchedClassifier>::try_from)
                        .and_then(|p| p.detach(link)),
                    HookLink::Xdp(link) => self
                        .ebpf
                        .program_mut(program::XDP_INGRESS)
                        .ok_or(ProgramError::UnexpectedProgramType)
                        .and_then(<&mut Xdp>::try_from)
                        .and_then(|p| p.detach(link)),
                    HookLink::Pinned(link) => link.unpin().map(drop).map_err(ProgramError::IOError),
                };
                if let Err(error) = detached {
                    tracing::debug!(iface, error = %chain(&error), "detach");
                }
            }
        })?;
        lock_attachments(&self.attachments).retain(|a| {
            !(a.netns.as_deref() == Some(name) && a.interface.as_deref() == Some(iface))
        });
        tracing::info!(netns = name, iface, "detached from the interface");
        Ok(())
    }

    /// XDP in `mode`. With `pin` (a kept instance), the link is pinned
    /// there and taken over by the next daemon as a TCX link is
    /// ([`Self::attach_tc`]); an XDP netlink attachment (kernels before
    /// 5.9) cannot be pinned and goes with the process.
    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpMode,
        pin: Option<std::path::PathBuf>,
    ) -> Result<(String, HookLink), ProgramError> {
        let maps_kept = self.maps_kept;
        self.claimed_pins.extend(pin.clone());
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(program::XDP_INGRESS)
            .ok_or(ProgramError::UnexpectedProgramType)?
            .try_into()?;
        let iface_c = c_name(iface)?;
        let iface_index = iface_c.as_c_str();
        let (how, flags) = match mode {
            XdpMode::Native => ("xdp-native", aya::programs::XdpMode::Driver),
            // An observer passes every packet, so each still becomes an skb
            // and native mode saves nothing; it costs more on some drivers
            // (veth on 6.18: +461 ns per packet against +103 generic, and
            // 0.67 against 0.87 of the no-observer churn, `cargo xtask
            // bench`) and makes others (virtio-net, mlx5) reset their rings.
            XdpMode::Auto | XdpMode::Skb => ("xdp-skb", aya::programs::XdpMode::Skb),
        };
        if let Some(taken) = pin
            .as_deref()
            .and_then(|pin| take_over_link(prog, pin, maps_kept, how))
        {
            return Ok(taken);
        }
        let link = prog.attach(iface_index, flags)?;
        let Some(pin) = pin else {
            return Ok((how.to_owned(), HookLink::Xdp(link)));
        };
        if let Some(pinned) = pin_hook(prog.take_link(link)?.try_into(), &pin, how) {
            return Ok(pinned);
        }
        let link = prog.attach(iface_index, flags)?;
        Ok((how.to_owned(), HookLink::Xdp(link)))
    }

    /// TCX where the kernel has it (6.6+), else a clsact netlink filter.
    ///
    /// With `pin` (a kept instance), a TCX link is pinned there, so that it
    /// outlives a SIGKILL; the next daemon keeps it when its program is this
    /// one's and the maps are the same, and otherwise swaps its own program
    /// into it (`bpf_link_update`): either way the interface is never
    /// without a hook, nor with two.
    fn attach_tc(
        &mut self,
        name: &'static str,
        iface: &str,
        attach_type: TcAttachType,
        pin: Option<std::path::PathBuf>,
    ) -> Result<(String, HookLink), ProgramError> {
        let maps_kept = self.maps_kept;
        self.claimed_pins.extend(pin.clone());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(ProgramError::UnexpectedProgramType)?
            .try_into()?;
        let iface_c = c_name(iface)?;
        let iface_index = iface_c.as_c_str();
        let tcx = || TcAttach::Tcx {
            attach_type,
            order: Default::default(),
        };
        let tcx_missing = pretends_missing("tcx");
        if !tcx_missing
            && let Some(taken) = pin
                .as_deref()
                .and_then(|pin| take_over_link(prog, pin, maps_kept, "tcx"))
        {
            return Ok(taken);
        }
        let tried = if tcx_missing {
            Err(ProgramError::IOError(std::io::Error::other(format!(
                "{PRETEND_MISSING}=tcx: as on a kernel before 6.6"
            ))))
        } else {
            prog.attach(iface_index, tcx())
        };
        match tried {
            Ok(link) => {
                let Some(pin) = pin else {
                    return Ok(("tcx".to_owned(), HookLink::Tc(name, link)));
                };
                if let Some(pinned) = pin_hook(prog.take_link(link)?.try_into(), &pin, "tcx") {
                    return Ok(pinned);
                }
                let link = prog.attach(iface_index, tcx())?;
                Ok(("tcx".to_owned(), HookLink::Tc(name, link)))
            }
            Err(tcx_error) => {
                tracing::info!(
                    iface,
                    error = %chain(&tcx_error),
                    "TCX unavailable; attaching a clsact filter"
                );
                // An existing clsact qdisc is fine; any other failure shows
                // up in the attach below.
                let _ = tc::qdisc_add_clsact(iface_index);
                // A filter is not the process's: one a killed daemon of this
                // instance left runs on, into the pinned maps this daemon
                // reads, and with this one's every packet would count twice.
                if pin.is_some() {
                    match tc::qdisc_detach_program(iface_index, attach_type.into(), name) {
                        Ok(()) => tracing::info!(
                            iface,
                            program = name,
                            "a clsact filter the daemon before left: detached"
                        ),
                        Err(tc::TcError::IoError(e))
                            if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => {
                            tracing::warn!(iface, error = %chain(&error), "looking for an old clsact filter")
                        }
                    }
                }
                prog.attach(
                    iface_index,
                    TcAttach::Netlink {
                        parent: attach_type.into(),
                        options: NlOptions::default(),
                    },
                )
                .map(|link| ("tc-clsact".to_owned(), HookLink::Tc(name, link)))
            }
        }
    }

    /// Records how the census counts, as a probe of its own: the
    /// `iter/tcp` program, or (`sock_diag_census`) netlink instead.
    pub fn record_census(&mut self, result: Result<Method, &CensusError>) {
        let iter = program::ITER_TCP_CENSUS;
        let attachments = match result {
            Ok(Method::Iter) => vec![(iter, "iter/tcp".to_owned(), true)],
            Ok(Method::Netlink) => {
                tracing::warn!("counting sockets through sock_diag netlink, not iter/tcp");
                vec![
                    (iter, "sock_diag netlink instead".to_owned(), false),
                    ("sock_diag_census", "netlink".to_owned(), true),
                ]
            }
            Err(error) => {
                let detail = chain(error);
                tracing::warn!(probe = iter, error = %detail, "socket census unavailable");
                vec![(iter, detail, false)]
            }
        };
        let mut list = lock_attachments(&self.attachments);
        for (probe, detail, attached) in attachments {
            list.push(Attachment {
                probe,
                interface: None,
                netns: None,
                detail,
                attached,
            });
        }
    }

    fn record(
        &mut self,
        probe: &'static str,
        interface: Option<String>,
        result: Result<String, ProgramError>,
    ) {
        self.record_in(probe, interface, None, result);
    }

    /// Records how attaching `probe` went, in place of an earlier try of
    /// the same probe at the same place.
    fn record_in(
        &mut self,
        probe: &'static str,
        interface: Option<String>,
        netns: Option<String>,
        result: Result<String, ProgramError>,
    ) {
        let (detail, attached) = match result {
            Ok(detail) => {
                tracing::info!(probe, interface = interface.as_deref(), netns = netns.as_deref(), how = %detail, "attached");
                (detail, true)
            }
            Err(error) => {
                let detail = chain(&error);
                tracing::warn!(probe, interface = interface.as_deref(), netns = netns.as_deref(), error = %detail, "attach failed");
                (detail, false)
            }
        };
        let attachment = Attachment {
            probe,
            interface,
            netns,
            detail,
            attached,
        };
        let mut list = lock_attachments(&self.attachments);
        list.retain(|a| {
            (a.probe, &a.interface, &a.netns)
                != (attachment.probe, &attachment.interface, &attachment.netns)
        });
        list.push(attachment);
    }

    /// Detaches everything. Netlink filters must be removed from inside the
    /// namespace they were attached in: each namespace's hooks are detached
    /// there, then the object is dropped in `netns`.
    pub fn detach(mut self, netns: &Netns, others: &[Netns]) -> Result<(), NetnsError> {
        // A final stop: the pinned links go too (unpinned, then closed).
        let (pinned_hooks, hooks): (Vec<Hook>, Vec<Hook>) = std::mem::take(&mut self.hooks)
            .into_iter()
            .partition(|h| matches!(h.link, HookLink::Pinned(_)));
        self.hooks = hooks;
        let pinned_hooks = pinned_hooks.into_iter().filter_map(|h| match h.link {
            HookLink::Pinned(link) => Some(link),
            _ => None,
        });
        for pinned in std::mem::take(&mut self.pinned_links)
            .into_iter()
            .chain(pinned_hooks)
        {
            match pinned.unpin() {
                Ok(link) => drop(link),
                Err(error) => tracing::warn!(%error, "unpinning a link"),
            }
        }
        for other in others {
            for (iface, _) in self.hooked(other.name()) {
                self.detach_interface(other, &iface)?;
            }
        }
        let Self { ebpf, .. } = self;
        netns.run(move || drop(ebpf))
    }
}

/// The attachments, even if a thread panicked while holding them.
pub fn lock_attachments(list: &Attachments) -> std::sync::MutexGuard<'_, Vec<Attachment>> {
    list.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Names kernel facilities (comma-separated) the daemon must act as if the
/// kernel lacked, so that tests reach the fallbacks on a kernel that has
/// them all: `btf` (no kernel BTF at all: the daemon refuses to start),
/// `tp_btf` (no BTF tracepoints), `kfree_skb` (no drop-reason
/// tracepoint), `tcx` (clsact filters instead), `iter_tcp` (sock_diag
/// netlink instead), `cgroup2` (no cgroup v2 hierarchy: no attribution).
pub const PRETEND_MISSING: &str = "HANDSHAKE_PRETEND_MISSING";

pub fn pretends_missing(facility: &str) -> bool {
    std::env::var(PRETEND_MISSING).is_ok_and(|v| v.split(',').any(|f| f.trim() == facility))
}

/// Loads the `iter/tcp` program against the kernel's BTF, links it and
/// takes its maps. A program that cannot be loaded or linked leaves the
/// census counting through sock_diag; missing maps leave no census.
fn load_census(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<Census, CensusError> {
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or(CensusError::MissingMap(name))
    };
    let map_error = |name| move |source| CensusError::Map { name, source };
    let config =
        Array::try_from(take(ebpf, map::CENSUS_CONFIG)?).map_err(map_error(map::CENSUS_CONFIG))?;
    let tw_remote =
        HashMap::try_from(take(ebpf, map::TW_REMOTE)?).map_err(map_error(map::TW_REMOTE))?;
    let tw_local =
        HashMap::try_from(take(ebpf, map::TW_LOCAL)?).map_err(map_error(map::TW_LOCAL))?;
    let netns_stats = PerCpuArray::try_from(take(ebpf, map::NETNS_STATS)?)
        .map_err(map_error(map::NETNS_STATS))?;
    let mut census = Census::new(config, tw_remote, tw_local, netns_stats);
    if pretends_missing("iter_tcp") {
        tracing::warn!(
            "{PRETEND_MISSING}=iter_tcp: counting sockets through sock_diag netlink, as on a kernel without iter/tcp"
        );
        return Ok(census);
    }
    let name = program::ITER_TCP_CENSUS;
    let program_error = |source| CensusError::Program { name, source };
    let linked = ebpf
        .program_mut(name)
        .ok_or(CensusError::MissingProgram(name))
        .and_then(|prog| <&mut Iter>::try_from(prog).map_err(program_error))
        .and_then(|prog| {
            prog.load("tcp", btf).map_err(program_error)?;
            census.link(prog.fd().map_err(program_error)?.as_fd())
        });
    if let Err(error) = linked {
        // Counted through sock_diag instead; the daemon says so.
        tracing::warn!(error = %chain(&error), "iter/tcp census unavailable: counting sockets through sock_diag netlink");
    }
    Ok(census)
}

/// An interface name for aya, which resolves it in the calling thread's
/// namespace.
fn c_name(iface: &str) -> Result<CString, ProgramError> {
    CString::new(iface).map_err(|_| {
        ProgramError::IOError(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name {iface:?} contains a NUL byte"),
        ))
    })
}

/// The error and its sources on one line (aya's own Display stops at the
/// outermost error, e.g. "`bpf_link_create` failed").
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
