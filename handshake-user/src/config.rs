//! Validated daemon settings, built from the raw flags in `cli`. Everything
//! a user can get wrong (a missing namespace or interface, a malformed
//! address) is caught here, before anything is loaded into the kernel.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};

use crate::{
    cli::{DaemonFlags, IngressHook, XdpModeFlag},
    netns::Netns,
};

#[derive(Debug)]
pub struct DaemonConfig {
    pub netns: Netns,
    /// Interfaces to attach the packet hooks to, all present in `netns`.
    pub interfaces: Vec<String>,
    pub metrics_addr: SocketAddr,
    pub ingress_hook: IngressHook,
    pub xdp_mode: XdpModeFlag,
}

impl TryFrom<DaemonFlags> for DaemonConfig {
    type Error = anyhow::Error;

    fn try_from(flags: DaemonFlags) -> anyhow::Result<Self> {
        let metrics_addr = flags.metrics_addr.parse().with_context(|| {
            format!(
                "--metrics-addr {:?} is not an address such as 127.0.0.1:9640",
                flags.metrics_addr
            )
        })?;
        let netns = match &flags.netns {
            Some(name) => Netns::open(name)?,
            None => Netns::host(),
        };
        let interfaces = if flags.ifaces.is_empty() {
            let up = netns.interfaces_up()?;
            if up.is_empty() {
                bail!("no interface is up in network namespace {:?}", netns.name());
            }
            up
        } else {
            for name in &flags.ifaces {
                if netns.if_index(name)?.is_none() {
                    bail!(
                        "interface {name:?} not found in network namespace {:?}",
                        netns.name()
                    );
                }
            }
            let mut names = flags.ifaces.clone();
            names.sort();
            names.dedup();
            names
        };
        Ok(Self {
            netns,
            interfaces,
            metrics_addr,
            ingress_hook: flags.ingress_hook,
            xdp_mode: flags.xdp_mode,
        })
    }
}
