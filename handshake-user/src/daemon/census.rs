//! The census schedule: the namespaces it counts (every one of the host,
//! found anew each round), a round over those whose counts may have
//! changed (off the async threads), and the loop that runs one every
//! `--census-interval` within a CPU budget.
//!
//! A walk of `iter/tcp` sees one namespace but visits every bucket of the
//! established hash all namespaces share (~3 ms here even when empty), so
//! a namespace is counted afresh only when its sockets changed state since
//! its last census (the state tracepoint counts every namespace's changes
//! in `NETNS_STATS`), or when its last census found sockets that leave
//! without a state change (TIME_WAIT, request sockets); a quiet namespace
//! keeps its counts and costs nothing. A request from the CLI counts every
//! namespace afresh.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use handshake_common::abi::{census::NetnsStats, tcp_state};

use crate::{
    daemon::state::{State, lock},
    kernel::{
        census::{Census, CensusError, Method, NetnsCensus},
        clock,
        loader::chain,
        maps::Counters,
        netns::{self, Found, Netns, NetnsError},
    },
    model::{
        FastSet,
        states::{STUCK_RECORDS, stuck_mask},
    },
    wire::state_name,
};

/// A counted namespace: its name, inode number, and census with its
/// TIME_WAIT entries so far.
#[derive(Debug)]
pub struct Counted {
    pub name: String,
    pub inode: u64,
    pub result: Result<(NetnsCensus, u64), CensusError>,
}

/// What one round of the census did: the namespaces it counted afresh,
/// every namespace it knows now (inode, name), and each namespace's state
/// changes so far (by inode; 0 holds those past the kernel map's size).
#[derive(Debug, Default)]
pub struct CensusRound {
    pub counted: Vec<Counted>,
    pub present: Vec<(u64, String)>,
    pub stats: Vec<(u32, NetnsStats)>,
    /// How long finding the namespaces took.
    pub discovery: Duration,
}

/// Which namespaces a round counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Those whose counts may have changed since their last census (the
    /// schedule's rounds).
    Changed,
    /// Every one (a request from the CLI, which must be exact now).
    All,
}

/// A namespace the census knows.
#[derive(Debug)]
struct Watched {
    netns: Netns,
    /// Its state changes at its last census (`None`: never counted).
    changes_at_census: Option<u64>,
    /// Its last census found sockets that leave without a state change:
    /// TIME_WAIT minisocks expire, request sockets time out.
    volatile: bool,
}

/// The census and the namespaces it counts: every network namespace of
/// the host, found anew each round (`netns::discover`), plus one given by
/// path with `--netns`. `&mut` serialises runs (they share the program's
/// maps).
#[derive(Debug)]
pub struct CensusRunner {
    census: Census,
    host_inode: u64,
    /// By inode.
    watched: BTreeMap<u64, Watched>,
    /// `--netns` when it is a path (not found by discovery if nothing
    /// else holds it): always watched.
    pinned: Option<(u64, Netns)>,
    /// The kernel's count under inode 0 at the last round: namespaces past
    /// the map's size.
    overflow_changes: u64,
}

impl CensusRunner {
    /// How the census counts: `iter/tcp`, or sock_diag netlink.
    pub const fn method(&self) -> Method {
        self.census.method()
    }

    pub fn new(census: Census, netns: &Netns) -> Result<Self, CensusError> {
        let inode_error = |netns: &Netns| {
            let name = netns.name().to_owned();
            move |source| CensusError::Inode {
                netns: name,
                source,
            }
        };
        let host = Netns::host();
        let host_inode = host.inode().map_err(inode_error(&host))?;
        let pinned = match netns.name() {
            "host" => None,
            _ => {
                let inode = netns.inode().map_err(inode_error(netns))?;
                (inode != host_inode)
                    .then(|| netns.try_clone().map(|clone| (inode, clone)))
                    .transpose()
                    .map_err(inode_error(netns))?
            }
        };
        Ok(Self {
            census,
            host_inode,
            watched: BTreeMap::new(),
            pinned,
            overflow_changes: 0,
        })
    }

    /// Finds the host's namespaces now: new ones are watched, those gone
    /// forgotten (their handle closed, their kernel counts removed).
    fn discover(&mut self) {
        let mut found = netns::discover();
        if let Some((inode, netns)) = &self.pinned
            && !found.iter().any(|f| f.inode == *inode)
        {
            found.push(Found {
                inode: *inode,
                name: format!("ns:{inode}"),
                path: PathBuf::from(netns.name()),
            });
        }
        let present: FastSet<u64> = found.iter().map(|f| f.inode).collect();
        let gone: Vec<u64> = self
            .watched
            .keys()
            .filter(|inode| !present.contains(inode))
            .copied()
            .collect();
        for inode in gone {
            self.watched.remove(&inode);
            self.census.forget_netns(inode);
        }
        for f in found {
            let renamed = self
                .watched
                .get(&f.inode)
                .is_some_and(|w| w.netns.name() != f.name);
            if self.watched.contains_key(&f.inode) && !renamed {
                continue;
            }
            let netns = if f.inode == self.host_inode {
                Ok(Netns::host())
            } else {
                match &self.pinned {
                    Some((inode, pinned)) if *inode == f.inode => pinned
                        .try_clone()
                        .map(|n| n.renamed(&f.name))
                        .map_err(|source| NetnsError::Open {
                            name: f.name.clone(),
                            path: f.path.clone(),
                            source,
                        }),
                    _ => Netns::open_found(&f),
                }
            };
            match netns {
                Ok(netns) => {
                    let changes_at_census = self
                        .watched
                        .remove(&f.inode)
                        .and_then(|w| w.changes_at_census);
                    self.watched.insert(
                        f.inode,
                        Watched {
                            netns,
                            changes_at_census,
                            volatile: true,
                        },
                    );
                }
                // Gone between finding and opening: the next round knows.
                Err(error) => {
                    tracing::debug!(netns = %f.name, error = %chain(&error), "not opened")
                }
            }
        }
    }

    /// One round: finds the namespaces, then counts those `scope` asks
    /// for, listing the full sockets in the states of `socket_states`
    /// (bit `1 << state`), at most `max_sockets` per namespace.
    pub fn run(&mut self, scope: Scope, socket_states: u32, max_sockets: u32) -> CensusRound {
        let started = Instant::now();
        self.discover();
        let discovery = started.elapsed();
        let stats = self.census.netns_stats().unwrap_or_else(|error| {
            tracing::warn!(error = %chain(&error), "reading the namespaces' state changes");
            Vec::new()
        });
        let changes_of = |inode: u64| {
            stats
                .iter()
                .find(|(i, _)| u64::from(*i) == inode)
                .map(|(_, s)| s.changes())
        };
        let overflow = changes_of(0).unwrap_or(0);
        let overflowed = overflow != self.overflow_changes;
        self.overflow_changes = overflow;
        let Self {
            census, watched, ..
        } = self;
        let mut counted = Vec::new();
        for (inode, w) in watched.iter_mut() {
            let changes = changes_of(*inode);
            let due = match scope {
                Scope::All => true,
                Scope::Changed => {
                    w.volatile
                        || w.changes_at_census != Some(changes.unwrap_or(0))
                        || (changes.is_none() && overflowed)
                }
            };
            if !due {
                continue;
            }
            tracing::trace!(
                netns = w.netns.name(),
                volatile = w.volatile,
                last = ?w.changes_at_census,
                now = ?changes,
                overflowed,
                "counting afresh"
            );
            let result = census
                .run(&w.netns, socket_states, max_sockets)
                .map(|snapshot| {
                    let entries = stats
                        .iter()
                        .find(|(i, _)| u64::from(*i) == *inode)
                        .map_or(0, |(_, s)| s.time_wait_entries);
                    (snapshot, entries)
                });
            if let Ok((snapshot, _)) = &result {
                w.changes_at_census = Some(changes.unwrap_or(0));
                w.volatile = snapshot.count(tcp_state::TIME_WAIT) != 0
                    || snapshot.count(tcp_state::SYN_RECV) != 0
                    || snapshot.summary.tw_fin_wait2.iter().any(|n| *n != 0)
                    // Queues fill and drain without a state change of
                    // the listener (request sockets, a full accept queue
                    // dropping SYNs).
                    || snapshot
                        .listeners
                        .iter()
                        .any(|l| l.accept_queue > 0 || l.syn_queue > 0);
            }
            counted.push(Counted {
                name: w.netns.name().to_owned(),
                inode: *inode,
                result,
            });
        }
        CensusRound {
            counted,
            present: watched
                .iter()
                .map(|(inode, w)| (*inode, w.netns.name().to_owned()))
                .collect(),
            stats,
            discovery,
        }
    }
}

/// Runs a census round off the async threads; lists sockets in
/// `socket_states` (bit `1 << state`).
pub async fn census_round(
    runner: &Arc<Mutex<CensusRunner>>,
    scope: Scope,
    socket_states: u32,
    max_sockets: u32,
) -> CensusRound {
    let runner = Arc::clone(runner);
    tokio::task::spawn_blocking(move || {
        runner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .run(scope, socket_states, max_sockets)
    })
    .await
    .unwrap_or_default()
}

/// The share of one CPU the scheduled censuses may take. A census walks
/// the whole established hash table (262,144 buckets on a 24 GiB machine,
/// ~1 ms even when empty) and every socket in it; with hundreds of thousands
/// of sockets one census takes tens of milliseconds, and a census a second
/// would take a few percent of a CPU from the very traffic it counts.
const CENSUS_CPU_BUDGET: f64 = 0.01;

/// CPU time the scheduled censuses may spend at once beyond their share:
/// a burst of new namespaces (a node starting 50 pods: ~3 ms each) is
/// counted at once, and the schedule then waits until the share is paid
/// back.
const CENSUS_CPU_BURST: f64 = 1.0;

/// The census's CPU account: a bucket that fills at
/// [`CENSUS_CPU_BUDGET`] of wall time up to [`CENSUS_CPU_BURST`] and
/// drains by each scheduled round's time.
#[derive(Debug)]
struct Budget {
    /// Seconds of CPU the censuses may still spend (negative: owed).
    balance: f64,
    last: Option<Instant>,
}

impl Budget {
    const fn new() -> Self {
        Self {
            balance: CENSUS_CPU_BURST,
            last: None,
        }
    }

    /// When the next scheduled census starts, after one that started at
    /// `started` and took `took`: `every` later, or, while the rounds owe
    /// CPU time, when the share has paid it back.
    fn next(&mut self, started: Instant, took: Duration, every: Duration) -> Instant {
        if let Some(last) = self.last {
            let earned = started.saturating_duration_since(last).as_secs_f64() * CENSUS_CPU_BUDGET;
            self.balance = (self.balance + earned).min(CENSUS_CPU_BURST);
        }
        self.last = Some(started);
        self.balance -= took.as_secs_f64();
        let owed = Duration::from_secs_f64((-self.balance).max(0.0) / CENSUS_CPU_BUDGET);
        started + every.max(owed)
    }
}

/// Runs a census round every `every` (stretched while censuses are slow:
/// [`Budget`]), and derives the host-wide transition rates from the
/// counters meanwhile.
pub async fn census_loop(
    runner: Option<Arc<Mutex<CensusRunner>>>,
    counters: &Counters,
    every: Duration,
    state: &Mutex<State>,
) {
    // (when, transition counts `(from, to, count)`) at the last round.
    type Counts = Vec<(u32, u32, u64)>;
    let mut last: Option<(u64, Counts)> = None;
    let mut next = Instant::now();
    let mut budget = Budget::new();
    loop {
        tokio::time::sleep_until(next.into()).await;
        let started = Instant::now();
        let round = match &runner {
            Some(runner) => census_round(runner, Scope::Changed, stuck_mask(), STUCK_RECORDS).await,
            None => CensusRound::default(),
        };
        next = budget.next(started, started.elapsed(), every);
        let now = clock::monotonic_ns();
        let transitions = counters.read().map(|s| s.transitions).ok();
        let mut state = lock(state);
        state.self_stats.census_interval_s = (next - started).as_secs_f64();
        state.self_stats.netns_counted += round.counted.len() as u64;
        state.self_stats.netns_skipped +=
            round.present.len().saturating_sub(round.counted.len()) as u64;
        state.apply_census(round);
        if let (Some((then, before)), Some(after)) = (&last, &transitions) {
            let seconds = (now - then) as f64 / 1e9;
            state.transitions_per_second = after
                .iter()
                .map(|&(from, to, count)| {
                    let prior = before
                        .iter()
                        .find(|&&(f, t, _)| f == from && t == to)
                        .map_or(0, |&(_, _, c)| c);
                    (
                        format!("{}->{}", state_name(from), state_name(to)),
                        count.saturating_sub(prior) as f64 / seconds,
                    )
                })
                .collect();
        }
        if let Some(after) = transitions {
            last = Some((now, after));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_censuses_stretch_the_schedule_to_their_budget_after_a_burst() {
        let second = Duration::from_secs(1);
        let mut budget = Budget::new();
        let mut at = Instant::now();
        // An idle host: 2 ms a census, well inside 1 % of a second.
        for _ in 0..10 {
            let next = budget.next(at, Duration::from_millis(2), second);
            assert_eq!(next, at + second);
            at = next;
        }
        // 50 new namespaces: one round of 250 ms fits the burst.
        let next = budget.next(at, Duration::from_millis(250), second);
        assert_eq!(next, at + second);
        at = next;
        // 300,000 sockets: 50 ms a census. The rest of the burst goes,
        // then one round every 5 s: 1 % of a CPU.
        let mut gaps = Vec::new();
        for _ in 0..40 {
            let next = budget.next(at, Duration::from_millis(50), second);
            gaps.push((next - at).as_secs_f64());
            at = next;
        }
        let last = gaps[gaps.len() - 1];
        assert!((last - 5.0).abs() < 0.01, "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= 5.0 + 1e-9), "{gaps:?}");
        assert_eq!(gaps[0], 1.0, "the burst is not spent yet: {gaps:?}");
    }
}
