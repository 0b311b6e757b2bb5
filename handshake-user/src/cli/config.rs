//! The daemon's settings from its flags. Everything a user can get wrong
//! (a missing namespace or interface, a malformed address) is caught here,
//! before anything is loaded into the kernel.

use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{
    cli::DaemonFlags,
    daemon::{
        config::{DaemonConfig, StartInterfaces},
        interfaces::{HookPlan, glob, is_glob},
    },
    kernel::{loader::TableSizes, netns::Netns},
};

/// `10s`, `500ms`, `2m`, or plain seconds (`1.5`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number.trim().parse().ok()?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0 && seconds < 86_400.0)
        .then(|| Duration::from_secs_f64(seconds))
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
        let handshake_timeout = parse_duration(&flags.handshake_timeout).with_context(|| {
            format!(
                "--handshake-timeout {:?} is not a duration such as 10s or 500ms",
                flags.handshake_timeout
            )
        })?;
        let census_interval = parse_duration(&flags.census_interval).with_context(|| {
            format!(
                "--census-interval {:?} is not a duration such as 1s or 500ms",
                flags.census_interval
            )
        })?;
        if census_interval < Duration::from_millis(100) {
            bail!(
                "--census-interval {:?} is below 100ms",
                flags.census_interval
            );
        }
        let tables = table_sizes(&flags)?;
        if flags.conn_history == 0 {
            bail!("--conn-history must be at least 1");
        }
        let all = flags.netns.iter().any(|n| n == "all");
        if all && flags.netns.len() > 1 {
            bail!("--netns all already names every namespace; give it alone");
        }
        let namespaces = if all || flags.netns.is_empty() {
            vec![Netns::host()]
        } else {
            flags
                .netns
                .iter()
                .map(|name| Netns::open(name))
                .collect::<Result<_, _>>()?
        };
        let hooks = HookPlan {
            namespaces,
            all,
            patterns: flags.ifaces.clone(),
            ingress: flags.ingress_hook,
            xdp_mode: flags.xdp_mode,
        };
        let (interfaces, loopback_skipped) = interfaces(&hooks)?;
        Ok(Self {
            hooks,
            interfaces,
            loopback_skipped,
            metrics_addr,
            api_socket: flags.api_socket,
            cgroup_root: match flags.cgroup_root {
                Some(root) if !root.join("cgroup.procs").exists() => bail!(
                    "--cgroup-root {}: no cgroup v2 hierarchy there (no cgroup.procs)",
                    root.display()
                ),
                other => other,
            },
            api_group: flags.api_group.as_deref().map(group_id).transpose()?,
            handshake_timeout,
            tables,
            conn_history: flags.conn_history,
            half_open_top: flags.half_open_top,
            netns_top: flags.netns_top,
            listener_top: flags.listener_top,
            census_interval,
            census_source: flags.census_source,
            instance: (!flags.ephemeral).then(|| (flags.instance.clone(), flags.fresh)),
        })
    }
}

/// A group's id, by name or number.
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = std::ffi::CString::new(name)
        .with_context(|| format!("--api-group {name:?} is not a group name"))?;
    // SAFETY: a valid C string; the result is read before any other
    // call that could reuse its static storage.
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("--api-group {name:?}: no such group");
    }
    // SAFETY: non-null, as getgrnam returned it.
    Ok(unsafe { (*group).gr_gid })
}

/// The kernel tables' sizes, each within what the kernel and memory allow.
fn table_sizes(flags: &DaemonFlags) -> anyhow::Result<TableSizes> {
    for (flag, value) in [
        ("--half-open-entries", flags.half_open_entries),
        ("--flow-entries", flags.flow_entries),
        ("--socket-age-entries", flags.socket_age_entries),
    ] {
        if !(64..=1 << 24).contains(&value) {
            bail!("{flag} {value} is out of range (64 to 16777216)");
        }
    }
    Ok(TableSizes {
        half_open: flags.half_open_entries,
        flows: flags.flow_entries,
        sock_ages: flags.socket_age_entries,
    })
}

/// The interfaces to attach the packet hooks to at the start (by index
/// of the plan's namespace), and the loopback interfaces left out: those
/// the patterns match (a plain name must exist in one of the namespaces,
/// unless `--netns all`), or every one that is up except loopback. Every
/// handshake on loopback is between two local sockets, which the socket
/// layer times at both ends; hooks there would cost every local packet
/// twice (egress and ingress) and tell nothing more but TLS hellos
/// (docs/BENCHMARKS.md).
fn interfaces(plan: &HookPlan) -> anyhow::Result<(StartInterfaces, Vec<String>)> {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let mut found = vec![false; plan.patterns.len()];
    for (at, netns) in plan.namespaces.iter().enumerate() {
        for iface in netns.interfaces()? {
            for (hit, pattern) in found.iter_mut().zip(&plan.patterns) {
                *hit |= glob(pattern, &iface.name);
            }
            if !iface.up {
                continue;
            }
            if plan.wants(&iface) {
                chosen.push((at, iface.name));
            } else if iface.loopback && plan.patterns.is_empty() {
                skipped.push(iface.name);
            }
        }
    }
    if !plan.all
        && let Some((pattern, _)) = plan
            .patterns
            .iter()
            .zip(&found)
            .find(|(pattern, hit)| !is_glob(pattern) && !**hit)
    {
        let names: Vec<&str> = plan.namespaces.iter().map(Netns::name).collect();
        bail!(
            "interface {pattern:?} not found in network namespace {:?}",
            names.join(", ")
        );
    }
    Ok((chosen, skipped))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        for bad in ["", "0s", "-1s", "10h", "fast", "nan"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
