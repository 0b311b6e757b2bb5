//! Command-line flags exactly as the user typed them. Validation (does the
//! interface exist, is the address well-formed) happens in `config`.

use clap::{Args, Parser, Subcommand, ValueEnum};

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
}

#[derive(Debug, Args)]
pub struct DaemonFlags {
    /// Interface to observe (repeatable). Default: every interface that is up.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,

    /// Attach the packet hooks to interfaces inside this named network
    /// namespace (`ip netns` name, or a path such as /proc/PID/ns/net). The
    /// daemon and its tracepoints stay in the host namespace.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,

    /// Address the Prometheus endpoint (/metrics) listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9640")]
    pub metrics_addr: String,

    /// Hook for received packets.
    #[arg(long, value_enum, default_value_t = IngressHook::Xdp)]
    pub ingress_hook: IngressHook,

    /// XDP attach mode: `auto` lets the kernel pick native where the driver
    /// supports it and falls back to generic (skb) mode.
    #[arg(long, value_enum, default_value_t = XdpModeFlag::Auto)]
    pub xdp_mode: XdpModeFlag,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IngressHook {
    Xdp,
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeFlag {
    Auto,
    Native,
    Skb,
}
