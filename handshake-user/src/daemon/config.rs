//! The daemon's settings, validated: `cli::config` builds them from the
//! flags, `daemon::run` takes them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    daemon::interfaces::HookPlan,
    kernel::{census::Method, loader::TableSizes},
};

/// Interfaces by name, each with the index of its namespace in
/// [`HookPlan::namespaces`].
pub type StartInterfaces = Vec<(usize, String)>;

#[derive(Debug)]
pub struct DaemonConfig {
    /// Where the packet hooks go: namespaces and interface patterns.
    pub hooks: HookPlan,
    /// The interfaces the hooks go on at the start, per namespace of
    /// `hooks` (more come as they appear); none is fine: the socket layer
    /// needs no interface.
    pub interfaces: StartInterfaces,
    /// Loopback interfaces that were up but left out, no interface having
    /// been named (said in the start-up log).
    pub loopback_skipped: Vec<String>,
    pub metrics_addr: SocketAddr,
    pub api_socket: PathBuf,
    /// The cgroup v2 hierarchy, when not the first in mountinfo.
    pub cgroup_root: Option<PathBuf>,
    /// The group the API socket is opened to (`--api-group`), by gid.
    pub api_group: Option<u32>,
    pub handshake_timeout: Duration,
    pub tables: TableSizes,
    pub conn_history: usize,
    pub half_open_top: usize,
    /// Namespaces with their own `netns` label value in the metrics.
    pub netns_top: usize,
    /// Listeners with their own series in the metrics.
    pub listener_top: usize,
    /// How often the socket census runs in each watched namespace.
    pub census_interval: Duration,
    pub census_source: CensusSource,
    /// The instance whose state is kept across restarts, and whether to
    /// start afresh; `None`: `--ephemeral`.
    pub instance: Option<(String, bool)>,
}

/// How the census counts: as it can (`Auto`), or only one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CensusSource {
    /// The `iter/tcp` program, or sock_diag netlink where it cannot be
    /// loaded.
    Auto,
    /// The `iter/tcp` program or nothing: the daemon refuses to start
    /// without it.
    Iter,
    /// sock_diag netlink, as `ss` counts.
    Netlink,
}

impl CensusSource {
    /// The one source this choice insists on, if any.
    pub const fn required(self) -> Option<Method> {
        match self {
            Self::Auto => None,
            Self::Iter => Some(Method::Iter),
            Self::Netlink => Some(Method::Netlink),
        }
    }
}
