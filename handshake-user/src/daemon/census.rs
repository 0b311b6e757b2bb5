//! The census schedule: the namespaces it counts, a round over all of
//! them (off the async threads), and the loop that runs one every
//! `--census-interval` within a CPU budget.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    daemon::state::{State, lock},
    kernel::{
        census::{Census, CensusError, Method, NetnsCensus},
        clock,
        maps::Counters,
        netns::Netns,
    },
    model::states::{STUCK_RECORDS, stuck_mask},
    wire::state_name,
};

/// One census of every watched namespace: per namespace, its census and
/// TIME_WAIT entries so far.
pub type CensusRound = Vec<(String, Result<(NetnsCensus, u64), CensusError>)>;

/// The census and the namespaces it watches: the host's, and the one of
/// `--netns`. `&mut` serialises runs (they share the program's maps).
#[derive(Debug)]
pub struct CensusRunner {
    census: Census,
    watched: Vec<(Netns, u64)>,
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
        let mut watched = vec![(host, host_inode)];
        if netns.name() != "host" {
            let clone = netns.try_clone().map_err(inode_error(netns))?;
            watched.push((clone, netns.inode().map_err(inode_error(netns))?));
        }
        Ok(Self { census, watched })
    }

    /// The inode numbers of the watched namespaces.
    pub fn inodes(&self) -> Vec<u64> {
        self.watched.iter().map(|(_, inode)| *inode).collect()
    }

    /// Counts every watched namespace, listing the full sockets in the
    /// states of `socket_states` (bit `1 << state`), at most `max_sockets`
    /// per namespace.
    pub fn run(&mut self, socket_states: u32, max_sockets: u32) -> CensusRound {
        let Self { census, watched } = self;
        watched
            .iter()
            .map(|(netns, inode)| {
                let result = census
                    .run(netns, socket_states, max_sockets)
                    .map(|snapshot| (snapshot, census.time_wait_entries(*inode)));
                (netns.name().to_owned(), result)
            })
            .collect()
    }
}

/// Runs a census round off the async threads; lists sockets in
/// `socket_states` (bit `1 << state`).
pub async fn census_round(
    runner: &Arc<Mutex<CensusRunner>>,
    socket_states: u32,
    max_sockets: u32,
) -> CensusRound {
    let runner = Arc::clone(runner);
    tokio::task::spawn_blocking(move || {
        runner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .run(socket_states, max_sockets)
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

/// When the next scheduled census starts, after one that started at
/// `started` and took `took`: `every` later, or later still if the census
/// took more than [`CENSUS_CPU_BUDGET`] of that.
fn next_census(started: Instant, took: Duration, every: Duration) -> Instant {
    started + every.max(took.div_f64(CENSUS_CPU_BUDGET))
}

/// Runs the census of every watched namespace every `every` (stretched
/// while censuses are slow: [`next_census`]), and derives the host-wide
/// transition rates from the counters meanwhile.
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
    loop {
        tokio::time::sleep_until(next.into()).await;
        let started = Instant::now();
        let round = match &runner {
            Some(runner) => census_round(runner, stuck_mask(), STUCK_RECORDS).await,
            None => Vec::new(),
        };
        next = next_census(started, started.elapsed(), every);
        let now = clock::monotonic_ns();
        let transitions = counters.read().map(|s| s.transitions).ok();
        let mut state = lock(state);
        state.self_stats.census_interval_s = (next - started).as_secs_f64();
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
    fn a_slow_census_stretches_the_schedule_to_its_budget() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        // An idle host: 2 ms a census, well inside 1 % of a second.
        assert_eq!(
            next_census(start, Duration::from_millis(2), second),
            start + second
        );
        // 300,000 sockets: 50 ms a census, then the next one 5 s later.
        assert_eq!(
            next_census(start, Duration::from_millis(50), second),
            start + Duration::from_secs(5)
        );
    }
}
