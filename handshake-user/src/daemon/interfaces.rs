//! Interfaces as they come and go: the packet hooks follow each hooked
//! namespace's interfaces. A thread per namespace listens to its rtnetlink
//! link group (`RTMGRP_LINK`); any change wakes the reconciler, which
//! attaches the hooks to interfaces that are up and match `--iface` (glob
//! patterns; by default every interface but loopback) and forgets the
//! hooks of interfaces that are gone. With `--netns all`, namespaces are
//! followed as they come and go too. A slow poll backs the wakeups up.

use std::{
    collections::BTreeMap,
    io::Read as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    daemon::state::{State, lock},
    kernel::{
        loader::{IngressHook, Observer, XdpMode, chain},
        netns::{self, Interface, Netns},
    },
    model::FastMap,
};

/// How often every followed namespace is reconciled without a wakeup (a
/// missed netlink message, a namespace found by discovery).
const POLL: Duration = Duration::from_secs(5);

/// How often `--netns all` looks for namespaces that came or went: an
/// interface in a new namespace is attached within about this long (one
/// `readlink` per process each time).
const DISCOVER: Duration = Duration::from_millis(500);

/// Where the packet hooks go: interfaces matching `patterns` (empty: every
/// interface that is up except loopback) in `namespaces`, or in every
/// namespace of the host (`all`).
#[derive(Debug)]
pub struct HookPlan {
    pub namespaces: Vec<Netns>,
    pub all: bool,
    pub patterns: Vec<String>,
    pub ingress: IngressHook,
    pub xdp_mode: XdpMode,
}

/// Whether `name` matches the shell glob `pattern` (`*`, `?`, `[...]`).
pub fn glob(pattern: &str, name: &str) -> bool {
    fn matches(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|skip| matches(&p[1..], &n[skip..])),
            Some('?') => !n.is_empty() && matches(&p[1..], &n[1..]),
            Some('[') => {
                let Some(end) = p.iter().skip(1).position(|c| *c == ']').map(|e| e + 1) else {
                    return n.first() == Some(&'[') && matches(&p[1..], &n[1..]);
                };
                let Some(c) = n.first() else { return false };
                let set = &p[1..end];
                let (negate, set) = match set.first() {
                    Some('!' | '^') => (true, &set[1..]),
                    _ => (false, set),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= (set[i]..=set[i + 2]).contains(c);
                        i += 3;
                    } else {
                        hit |= set[i] == *c;
                        i += 1;
                    }
                }
                hit != negate && matches(&p[end + 1..], &n[1..])
            }
            Some(literal) => n.first() == Some(literal) && matches(&p[1..], &n[1..]),
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    matches(&p, &n)
}

/// Whether `pattern` has glob characters (else it names one interface).
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

impl HookPlan {
    /// Whether the hooks belong on `iface` (which is up).
    pub fn wants(&self, iface: &Interface) -> bool {
        if self.patterns.is_empty() {
            !iface.loopback
        } else {
            self.patterns.iter().any(|p| glob(p, &iface.name))
        }
    }
}

/// A thread that hears one namespace's link changes.
struct Watcher {
    netns: Netns,
    stop: Arc<AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts listening to `netns`'s link changes: each wakes `wake` with the
/// namespace's name.
fn watch(netns: Netns, wake: &mpsc::UnboundedSender<String>) -> Option<Watcher> {
    let mut socket = match netns.link_changes(Duration::from_secs(1)) {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(netns = netns.name(), error = %chain(&error), "cannot follow its interfaces");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (name, wake, stopped) = (netns.name().to_owned(), wake.clone(), Arc::clone(&stop));
    let spawned = std::thread::Builder::new()
        .name("handshake-links".to_owned())
        .spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            while !stopped.load(Ordering::Relaxed) {
                match socket.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(_) => {
                        if wake.send(name.clone()).is_err() {
                            return;
                        }
                    }
                    // A timeout (to look at the stop flag), or ENOBUFS
                    // after a burst: reconcile anyway.
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        if wake.send(name.clone()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    match spawned {
        Ok(_) => Some(Watcher { netns, stop }),
        Err(error) => {
            tracing::warn!(%error, "cannot start a thread to follow interfaces");
            None
        }
    }
}

/// Follows the interfaces (and with `all`, the namespaces) of `plan` until
/// the future is dropped.
pub async fn follow(observer: Arc<Mutex<Observer>>, plan: HookPlan, state: Arc<Mutex<State>>) {
    let (wake, mut woken) = mpsc::unbounded_channel::<String>();
    let mut watchers: BTreeMap<String, Watcher> = BTreeMap::new();
    let followed = |watchers: &mut BTreeMap<String, Watcher>| {
        let namespaces: Vec<Netns> = if plan.all {
            netns::discover()
                .iter()
                .filter_map(|f| match f.name.as_str() {
                    "host" => Some(Netns::host()),
                    _ => Netns::open_found(f).ok(),
                })
                .collect()
        } else {
            plan.namespaces
                .iter()
                .filter_map(|n| n.try_clone().ok())
                .collect()
        };
        let names: Vec<String> = namespaces.iter().map(|n| n.name().to_owned()).collect();
        let gone: Vec<String> = watchers
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        let mut changed: Vec<String> = Vec::new();
        for name in gone {
            if let Some(watcher) = watchers.remove(&name) {
                forget_namespace(&observer, &watcher.netns);
            }
        }
        for ns in namespaces {
            if !watchers.contains_key(ns.name()) {
                changed.push(ns.name().to_owned());
                if let Some(watcher) = watch(ns, &wake) {
                    watchers.insert(watcher.netns.name().to_owned(), watcher);
                }
            }
        }
        changed
    };
    for name in followed(&mut watchers) {
        tracing::debug!(netns = name, "following its interfaces");
    }
    let mut poll = tokio::time::interval(POLL);
    let mut discover = tokio::time::interval(DISCOVER);
    loop {
        let mut due: Vec<String> = tokio::select! {
            Some(name) = woken.recv() => vec![name],
            _ = poll.tick() => watchers.keys().cloned().collect(),
            _ = discover.tick(), if plan.all => followed(&mut watchers),
        };
        // Bursts (a thousand veth pairs) come as one reconcile.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(name) = woken.try_recv() {
            due.push(name);
        }
        due.sort();
        due.dedup();
        for name in due {
            if let Some(watcher) = watchers.get(&name) {
                let netns = match watcher.netns.try_clone() {
                    Ok(netns) => netns,
                    Err(_) => continue,
                };
                let observer = Arc::clone(&observer);
                let list = match netns.interfaces() {
                    Ok(list) => list,
                    Err(error) => {
                        tracing::debug!(netns = netns.name(), error = %chain(&error), "listing interfaces");
                        continue;
                    }
                };
                let attach: Vec<String> = list
                    .iter()
                    .filter(|i| i.up && plan.wants(i))
                    .map(|i| i.name.clone())
                    .collect();
                let (ingress, xdp_mode) = (plan.ingress, plan.xdp_mode);
                let _ = tokio::task::spawn_blocking(move || {
                    reconcile(&observer, &netns, &list, &attach, ingress, xdp_mode);
                })
                .await;
            }
        }
        index_interfaces(&observer, &watchers, &state);
    }
}

/// Brings the hooks of `netns` in line with its interfaces now: hooks of
/// interfaces gone (or replaced under the same name) are detached, those
/// in `attach` without hooks get them.
fn reconcile(
    observer: &Mutex<Observer>,
    netns: &Netns,
    now: &[Interface],
    attach: &[String],
    ingress: IngressHook,
    xdp_mode: XdpMode,
) {
    let mut observer = observer.lock().unwrap_or_else(|p| p.into_inner());
    let hooked = observer.hooked(netns.name());
    for (iface, index) in &hooked {
        let still = now.iter().any(|i| &i.name == iface && i.index == *index);
        if !still && let Err(error) = observer.detach_interface(netns, iface) {
            tracing::warn!(netns = netns.name(), iface, error = %chain(&error), "detaching");
        }
    }
    let hooked = observer.hooked(netns.name());
    let new: Vec<String> = attach
        .iter()
        .filter(|name| !hooked.iter().any(|(h, _)| h == *name))
        .cloned()
        .collect();
    if !new.is_empty()
        && let Err(error) = observer.attach_interfaces(netns, &new, ingress, xdp_mode)
    {
        tracing::warn!(netns = netns.name(), error = %chain(&error), "attaching");
    }
}

/// A followed namespace is gone: its hooks' links are released.
fn forget_namespace(observer: &Mutex<Observer>, netns: &Netns) {
    let mut observer = observer.lock().unwrap_or_else(|p| p.into_inner());
    for (iface, _) in observer.hooked(netns.name()) {
        let _ = observer.detach_interface(netns, &iface);
    }
}

/// Tells the state which namespace each hooked interface index belongs
/// to, for the hooks' rows: an index hooked in two namespaces names
/// neither (0).
fn index_interfaces(
    observer: &Mutex<Observer>,
    watchers: &BTreeMap<String, Watcher>,
    state: &Mutex<State>,
) {
    let observer = observer.lock().unwrap_or_else(|p| p.into_inner());
    let mut by_index: FastMap<u32, u32> = FastMap::default();
    for watcher in watchers.values() {
        let inode = watcher
            .netns
            .inode()
            .ok()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0);
        for (_, index) in observer.hooked(watcher.netns.name()) {
            by_index
                .entry(index)
                .and_modify(|known| {
                    if *known != inode {
                        *known = 0;
                    }
                })
                .or_insert(inode);
        }
    }
    drop(observer);
    lock(state).hook_netns_by_index = by_index;
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_as_the_shell_does() {
        assert!(glob("veth*", "veth0"));
        assert!(glob("veth*", "veth"));
        assert!(!glob("veth*", "eth0"));
        assert!(glob("eth?", "eth1"));
        assert!(!glob("eth?", "eth10"));
        assert!(glob("eth[0-2]", "eth2"));
        assert!(!glob("eth[!0-2]", "eth2"));
        assert!(glob("eth0", "eth0"));
        assert!(!glob("eth0", "eth01"));
        assert!(glob("*", "anything"));
    }
}
