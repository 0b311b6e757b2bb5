//! The command line: flags exactly as the user typed them, their
//! validation into the daemon's settings (`config`: does the interface
//! exist, is the address well-formed), and the client of the daemon's API
//! (`client`).

pub mod client;
pub mod config;
pub mod watch;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::{
    daemon::config::CensusSource,
    kernel::loader::{IngressHook, XdpMode},
    wire::{DEFAULT_SOCKET, DEFAULT_TOP, Outcome, Role},
};

#[derive(Debug, Parser)]
#[command(
    name = "handshake",
    version,
    about = "Watches TCP and TLS handshakes from inside the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs, attach them and serve Prometheus metrics
    /// until SIGINT or SIGTERM.
    Daemon(DaemonFlags),
    /// List recent and in-progress TCP handshakes with their phase timings.
    Conns(ConnsFlags),
    /// Count every TCP socket by state, in each namespace the daemon
    /// watches (a fresh census).
    States(StatesFlags),
    /// Recent TLS ClientHellos: SNI, ALPN, JA4, JA3, negotiated version and
    /// cipher, phase timings; or, with --top, the most frequent (SNI, JA4).
    Tls(TlsFlags),
    /// TIME_WAIT per namespace: count, entry rate, top remote endpoints and
    /// the ephemeral-port exhaustion forecast per destination.
    Timewait(TimewaitFlags),
    /// Listeners and workloads (unit, container, pod) ranked by how their
    /// recent connections closed: CLOSE_WAIT p50/p99 (the application's
    /// reaction to the peer's FIN), RST share, count.
    Closes(ClosesFlags),
    /// Every listener of every namespace: accept and SYN queues, their
    /// limit, drops and drop rate, and whether it sends SYN cookies (a
    /// fresh census).
    Listeners(ListenersFlags),
    /// The daemon about itself: version, uptime, user and capabilities,
    /// each probe and where it is attached, the census, the tables' fill
    /// and what was lost.
    Status(StatusFlags),
    /// A full-screen view refreshed each second: handshakes per second by
    /// outcome, phase latencies, the slowest and failing connections,
    /// listen queues, TIME_WAIT, TLS versions. `q` quits.
    Watch(WatchFlags),
    /// Remove what an instance of the daemon keeps across restarts: its
    /// maps pinned in /sys/fs/bpf/handshake/INSTANCE (counters, handshakes
    /// in flight, socket ages) and its checkpoint in /run/handshake. Refused
    /// while a daemon of the instance runs; the next start counts from 0.
    Reset {
        /// The daemon's --instance.
        #[arg(long, value_name = "NAME", default_value = crate::daemon::persist::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Make an instance's state directory for a daemon that runs as
    /// another user: mounts bpffs if need be, makes
    /// /sys/fs/bpf/handshake/INSTANCE and hands it, and what is pinned in
    /// it, to OWNER. Run as root before the daemon (handshake.service's
    /// ExecStartPre).
    #[command(hide = true)]
    Prepare {
        #[arg(long, value_name = "NAME", default_value = crate::daemon::persist::DEFAULT_INSTANCE)]
        instance: String,
        /// The user (name or uid) the daemon runs as.
        #[arg(long, value_name = "USER")]
        owner: String,
    },
    /// Print the completion script for a shell (bash, zsh, fish, elvish,
    /// powershell), e.g. `handshake completions bash > /etc/bash_completion.d/handshake`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (handshake.8, and handshake-COMMAND.8 for each
    /// command) into a directory; used to build the package.
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusFlags {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct WatchFlags {
    /// Seconds between refreshes.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub interval: String,

    /// Print one frame of the view as JSON (what the screen would show)
    /// and exit, instead of the full-screen view.
    #[arg(long)]
    pub json: bool,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct ClosesFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Rows listed: the slowest CLOSE_WAIT first, then the most reset.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TOP)]
    pub top: usize,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListenersFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Only listeners on this port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    #[command(flatten)]
    pub who: WhoFlags,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

/// Whose sockets to show: each flag narrows the rows to those it names.
#[derive(Debug, Default, Args)]
pub struct WhoFlags {
    /// Only this network namespace: `host`, an `ip netns` name, `ns:<inode>`
    /// or the inode number.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,

    /// Only sockets of this container (its id, or a prefix of it).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,

    /// Only sockets of this Kubernetes pod (its UID).
    #[arg(long, value_name = "UID")]
    pub pod: Option<String>,

    /// Only sockets of this systemd unit (`nginx.service`).
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
}

#[derive(Debug, Args)]
pub struct TlsFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub who: WhoFlags,

    /// Only ClientHellos with this SNI.
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,

    /// Only ClientHellos with this JA4 fingerprint.
    #[arg(long, value_name = "FINGERPRINT")]
    pub ja4: Option<String>,

    /// Instead, the N most frequent (SNI, JA4) pairs with their counts.
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatesFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub who: WhoFlags,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct TimewaitFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub who: WhoFlags,

    /// Remote endpoints and destinations listed per namespace.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TOP)]
    pub top: usize,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConnsFlags {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub who: WhoFlags,

    /// Only connections with this local or remote port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Only connections where this host had this role.
    #[arg(long, value_enum)]
    pub role: Option<Role>,

    /// List live sockets in this TCP state instead (close_wait, fin_wait2,
    /// syn_sent, established, ...), in every watched namespace, oldest
    /// first, with how long they have been in it and, for connections this
    /// host opened, the process that opened them.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,

    /// Only handshakes with this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<Outcome>,

    /// Only connections whose socket has closed (with the close columns).
    #[arg(long)]
    pub closed: bool,

    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct DaemonFlags {
    /// Interfaces to attach the packet hooks to (repeatable): a name or a
    /// glob pattern such as `veth*`. Interfaces that appear later are
    /// attached as they come up, those removed are forgotten. Default: every
    /// interface that is up except loopback, whose handshakes the socket
    /// layer times at both ends.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,

    /// Attach the packet hooks to interfaces inside this network namespace
    /// instead of the host's (repeatable: an `ip netns` name, or a path such
    /// as /proc/PID/ns/net), or `all`: every namespace of the host, as they
    /// come and go. The daemon and its tracepoints stay in the host
    /// namespace; the socket layer and the census see every namespace
    /// whatever this says.
    #[arg(long, value_name = "NAME")]
    pub netns: Vec<String>,

    /// Address the Prometheus endpoint (/metrics) listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9640")]
    pub metrics_addr: String,

    /// The local API socket `handshake conns` talks to (mode 0600: the
    /// daemon's user and root only, unless --api-group).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,

    /// Open the API socket to this group as well (mode 0660): its members
    /// may run `handshake conns` and the other commands without root. The
    /// daemon must be a member (`SupplementaryGroups=` in the unit).
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,

    /// Where the host's cgroup v2 hierarchy is mounted, to name the
    /// container, pod and unit of each socket. Default: the first cgroup2
    /// mount in /proc/self/mountinfo. In a container, mount the host's
    /// /sys/fs/cgroup elsewhere (read-only) and name it here.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,

    /// A handshake with no SYN-ACK, or no completing ACK, this long after
    /// its first SYN counts as timed out (e.g. `10s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub handshake_timeout: String,

    /// Entries of the kernel table of handshakes in progress (LRU: a SYN
    /// flood evicts its own entries, not completed handshakes).
    #[arg(long, value_name = "N", default_value_t = handshake_common::abi::HALF_OPEN_ENTRIES)]
    pub half_open_entries: u32,

    /// Entries of the kernel table of completed handshakes awaiting data.
    #[arg(long, value_name = "N", default_value_t = handshake_common::abi::FLOWS_ENTRIES)]
    pub flow_entries: u32,

    /// Sockets whose state-entry time and opener the kernel keeps (for
    /// `conns --state` and `handshake_tcp_state_oldest_seconds`), of every
    /// namespace, listeners excepted: slots of an
    /// array (rounded down to a power of two), two per socket address, and
    /// an overflow table a quarter that size; sockets beyond them have no
    /// age (`handshake_socket_ages_untracked_total`).
    #[arg(long, value_name = "N", default_value_t = handshake_common::abi::SOCK_AGE_ENTRIES)]
    pub socket_age_entries: u32,

    /// Decided handshakes kept for `handshake conns`.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub conn_history: usize,

    /// Network namespaces with their own `netns` label in the metrics: the
    /// N with the most sockets; the rest sum into `netns="other"`. The CLI
    /// and JSON list every namespace.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub netns_top: usize,

    /// Listeners with their own series in the listen-queue metrics: the N
    /// with the longest queues, then the most drops.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub listener_top: usize,

    /// Which daemon this is, for what it keeps across restarts: its kernel
    /// maps stay pinned in /sys/fs/bpf/handshake/NAME (bpffs, mounted if
    /// need be) and its own totals in /run/handshake/NAME.checkpoint, so a
    /// daemon started again — after SIGTERM, SIGKILL or an upgrade —
    /// continues every counter, completes handshakes in flight and knows
    /// socket ages. One daemon per instance.
    #[arg(long, value_name = "NAME", default_value = crate::daemon::persist::DEFAULT_INSTANCE)]
    pub instance: String,

    /// Keep nothing across restarts: no pinned maps, no checkpoint.
    #[arg(long, conflicts_with_all = ["fresh", "instance"])]
    pub ephemeral: bool,

    /// Remove the instance's kept state first, and count from 0 (as
    /// `handshake reset` does).
    #[arg(long)]
    pub fresh: bool,

    /// Listening ports exported by `handshake_tcp_half_open` (most half-open first).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub half_open_top: usize,

    /// How often the socket census (iter/tcp) looks at every network
    /// namespace of the host and counts afresh those whose sockets changed
    /// state since their last census; `handshake states`, `timewait` and
    /// `conns --state` count every namespace afresh on demand.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub census_interval: String,

    /// How the census counts: `auto` is the iter/tcp program, or sock_diag
    /// netlink (what `ss` uses) where the program cannot be loaded.
    #[arg(long, value_enum, default_value_t = CensusSource::Auto)]
    pub census_source: CensusSource,

    /// Hook for received packets. `tc` (TCX, or a clsact filter) runs on
    /// the socket buffer the kernel already built; XDP in its generic mode
    /// (what `--xdp-mode auto` picks) must first copy every cloned buffer,
    /// and TCP sends cloned buffers, so `tc` costs less (docs/BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = IngressHook::Tc)]
    pub ingress_hook: IngressHook,

    /// XDP attach mode. `auto` is generic (skb) mode: the program passes
    /// every packet, so native mode gains an observer nothing, costs more on
    /// veth, and makes some NIC drivers reset on attach. `native` on request.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
}

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "handshake",
        &mut std::io::stdout(),
    );
}

/// Writes `handshake.8` and a `handshake-COMMAND.8` for every command
/// into `dir`.
pub fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = Cli::command().version(env!("CARGO_PKG_VERSION"));
    let mut pages = vec![("handshake".to_owned(), command.clone())];
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("handshake-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.8"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .manual("System Administration")
            .source(format!("handshake {}", env!("CARGO_PKG_VERSION")))
            .render(&mut out)
            .with_context(|| format!("rendering {name}.8"))?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
