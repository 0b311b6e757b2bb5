//! TLS handshakes from the kernel's hello records: reassembling each hello
//! from its chunks, parsing it, fingerprinting ClientHellos, and timing the
//! phases of each connection. Pure: the daemon feeds it records and a
//! clock, the API and metrics read it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, OnceLock},
};

use crate::{
    model::{
        conntrack::Histogram,
        fingerprint::{Fingerprints, version_name},
    },
    wire::{Family, Role, TlsView},
};
use handshake_common::{
    abi::{
        Direction,
        tls_capture::{
            KIND_CLIENT_FINISHED, KIND_CLIENT_HELLO, KIND_SERVER_HELLO, MAX_HELLO, TlsChunk, TlsKey,
        },
    },
    tls::{ClientHello, ServerHello, TlsError, handshake_bytes, is_grease},
};

/// A hello whose bytes stop arriving is dropped after this long.
const ASSEMBLY_TIMEOUT_NS: u64 = 2_000_000_000;
/// A connection waits this long for its ServerHello and the client's next
/// record before it is filed as it is.
const CONN_TIMEOUT_NS: u64 = 10_000_000_000;
/// Hellos being reassembled at once, at most.
const MAX_ASSEMBLIES: usize = 4096;

/// ALPN values that get their own label; others count as `other`.
const KNOWN_ALPN: [&str; 5] = ["h2", "http/1.1", "h3", "http/1.0", "acme-tls/1"];

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum TlsPhase {
    ClientHelloToServerHello,
    ServerHelloToClientFinished,
}

impl TlsPhase {
    pub const ALL: [Self; 2] = [
        Self::ClientHelloToServerHello,
        Self::ServerHelloToClientFinished,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::ClientHelloToServerHello => "client_hello_to_server_hello",
            Self::ServerHelloToClientFinished => "server_hello_to_client_finished",
        }
    }
}

/// What the metrics count.
#[derive(Clone, Debug, Default)]
pub struct TlsTotals {
    pub durations: BTreeMap<(Role, TlsPhase), Histogram>,
    /// Per (role, negotiated version): handshakes whose ServerHello was
    /// seen.
    pub handshakes: BTreeMap<(Role, &'static str), u64>,
    /// Per (highest offered version, first ALPN label).
    pub client_hellos: BTreeMap<(&'static str, &'static str), u64>,
    /// Hellos that could not be parsed, by reason; and those whose bytes
    /// stopped arriving.
    pub parse_errors: BTreeMap<&'static str, u64>,
}

/// [`TlsTotals`] as a checkpoint keeps them: maps as pairs, names as
/// strings (`daemon::persist`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedTlsTotals {
    durations: Vec<((Role, TlsPhase), Histogram)>,
    handshakes: Vec<((Role, String), u64)>,
    client_hellos: Vec<((String, String), u64)>,
    parse_errors: Vec<(String, u64)>,
}

impl TlsTotals {
    pub fn save(&self) -> SavedTlsTotals {
        SavedTlsTotals {
            durations: self
                .durations
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            handshakes: self
                .handshakes
                .iter()
                .map(|((role, version), n)| ((*role, (*version).to_owned()), *n))
                .collect(),
            client_hellos: self
                .client_hellos
                .iter()
                .map(|((offered, alpn), n)| (((*offered).to_owned(), (*alpn).to_owned()), *n))
                .collect(),
            parse_errors: self
                .parse_errors
                .iter()
                .map(|(reason, n)| ((*reason).to_owned(), *n))
                .collect(),
        }
    }

    /// The totals of [`Self::save`]. Their names are label values from
    /// small fixed sets (versions, ALPN labels, parse failures); each is
    /// made `'static` once, at start.
    pub fn restore(saved: SavedTlsTotals) -> Self {
        let mut names: HashMap<String, &'static str> = HashMap::new();
        let mut name = |s: String| -> &'static str {
            names
                .entry(s)
                .or_insert_with_key(|s| Box::leak(s.clone().into_boxed_str()))
        };
        Self {
            durations: saved.durations.into_iter().collect(),
            handshakes: saved
                .handshakes
                .into_iter()
                .map(|((role, version), n)| ((role, name(version)), n))
                .collect(),
            client_hellos: saved
                .client_hellos
                .into_iter()
                .map(|((offered, alpn), n)| ((name(offered), name(alpn)), n))
                .collect(),
            parse_errors: saved
                .parse_errors
                .into_iter()
                .map(|(reason, n)| (name(reason), n))
                .collect(),
        }
    }
}

/// One TLS connection as the tracker keeps it: the ClientHello's bytes
/// and the times, nothing formatted. Strings and fingerprints are built
/// the first time someone asks ([`TlsRecord::view`]), outside the daemon's
/// lock: built for every handshake they had been a third of the daemon's
/// CPU under load, for views few handshakes ever get.
#[derive(Clone, Debug)]
pub struct TlsRecord {
    /// The client → server direction.
    key: TlsKey,
    role: Role,
    /// The ClientHello, shared by the copies the API takes.
    hello: Arc<KeptHello>,
    offered: &'static str,
    version: Option<&'static str>,
    cipher: Option<u16>,
    ts_client_hello: u64,
    ts_server_hello: Option<u64>,
    ts_client_finished: Option<u64>,
}

impl TlsRecord {
    /// The connection as the API shows it, `now_ns` giving its age.
    pub fn view(&self, now_ns: u64) -> TlsView {
        let key = &self.key;
        let family = Family::from_ip_version(key.family);
        let micros = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(from), Some(to)) => Some(to.saturating_sub(from) as f64 / 1e3),
            _ => None,
        };
        let mut view = TlsView {
            family: family.name().to_owned(),
            client_addr: family.address(&key.src_addr),
            client_port: key.src_port,
            server_addr: family.address(&key.dst_addr),
            server_port: key.dst_port,
            role: self.role.name().to_owned(),
            sni: None,
            alpn: Vec::new(),
            ja4: String::new(),
            ja4_r: String::new(),
            ja3: String::new(),
            ja3_hash: String::new(),
            offered_version: self.offered.to_owned(),
            version: self.version.map(str::to_owned),
            cipher: self.cipher.map(|c| format!("0x{c:04x}")),
            client_hello_to_server_hello_us: micros(
                Some(self.ts_client_hello),
                self.ts_server_hello,
            ),
            server_hello_to_client_finished_us: micros(
                self.ts_server_hello,
                self.ts_client_finished,
            ),
            total_from_syn_us: None,
            ts_client_hello: self.ts_client_hello,
            ts_client_finished: self.ts_client_finished,
            ifindex: key.ifindex,
            age_s: now_ns.saturating_sub(self.ts_client_hello) as f64 / 1e9,
            attribution: Default::default(),
        };
        if let Some(said) = self.hello.said() {
            view.sni.clone_from(&said.sni);
            view.alpn.clone_from(&said.alpn);
            view.ja4.clone_from(&said.fingerprints.ja4);
            view.ja4_r.clone_from(&said.fingerprints.ja4_r);
            view.ja3.clone_from(&said.fingerprints.ja3);
            view.ja3_hash.clone_from(&said.fingerprints.ja3_hash);
        }
        view
    }
}

/// A ClientHello's message (handshake header included; it parsed), and
/// what the views show of it, worked out the first time one is asked for
/// and kept: a CLI polling `handshake conns` pays for each hello once.
#[derive(Debug)]
struct KeptHello {
    message: Box<[u8]>,
    said: OnceLock<Option<Said>>,
}

/// What a ClientHello says, as the views show it.
#[derive(Debug)]
struct Said {
    sni: Option<String>,
    alpn: Vec<String>,
    fingerprints: Fingerprints,
}

impl KeptHello {
    fn said(&self) -> Option<&Said> {
        self.said
            .get_or_init(|| {
                // It parsed when it was recorded; the same bytes parse again.
                let hello = ClientHello::parse(&self.message).ok()?;
                Some(Said {
                    sni: hello.sni().map(|s| String::from_utf8_lossy(s).into_owned()),
                    alpn: hello
                        .alpn()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                    fingerprints: Fingerprints::of(&hello),
                })
            })
            .as_ref()
    }
}

#[derive(Clone, Debug)]
struct Conn {
    record: TlsRecord,
    /// Sequence number of the ClientHello's first byte.
    hello_seq: u32,
    /// The hook that saw it.
    direction: u32,
}

/// A second ClientHello this close behind the first in the byte stream
/// belongs to the same connection (after a HelloRetryRequest); one at the
/// same place or elsewhere means the four-tuple was reused (or replayed).
const SAME_STREAM_BYTES: u32 = 1 << 16;

/// A hello whose bytes came in more than one record.
#[derive(Debug)]
struct Assembly {
    started_ns: u64,
    target: usize,
    /// Chunks by offset.
    chunks: BTreeMap<u32, Vec<u8>>,
    /// When the hello's first bytes crossed the hook.
    ts_first: u64,
    direction: u32,
}

impl Assembly {
    /// The bytes from offset 0 on, as far as they are contiguous.
    fn prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.target);
        for (offset, bytes) in &self.chunks {
            let offset = *offset as usize;
            if offset > out.len() {
                break;
            }
            let skip = out.len() - offset;
            if skip < bytes.len() {
                out.extend_from_slice(&bytes[skip..]);
            }
        }
        out
    }
}

/// Where a complete hello came from.
struct Seen {
    /// When its first bytes crossed the hook.
    ts_first: u64,
    direction: u32,
    hello_seq: u32,
}

fn alpn_label(first: Option<&[u8]>) -> &'static str {
    match first {
        None => "none",
        Some(alpn) => KNOWN_ALPN
            .iter()
            .find(|k| k.as_bytes() == alpn)
            .copied()
            .unwrap_or("other"),
    }
}

/// Reassembles, parses and files TLS hellos.
#[derive(Debug)]
pub struct TlsTracker {
    assemblies: HashMap<(TlsKey, u32, u8), Assembly>,
    /// By the client → server direction.
    open: HashMap<TlsKey, Conn>,
    recent: VecDeque<TlsRecord>,
    capacity: usize,
    /// Where hello messages are taken out of their records: one buffer,
    /// reused.
    message: Vec<u8>,
    pub totals: TlsTotals,
}

impl TlsTracker {
    pub fn new(capacity: usize) -> Self {
        Self {
            assemblies: HashMap::new(),
            open: HashMap::new(),
            recent: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            message: vec![0; MAX_HELLO as usize],
            totals: TlsTotals::default(),
        }
    }

    fn error(&mut self, reason: &'static str) {
        *self.totals.parse_errors.entry(reason).or_default() += 1;
    }

    pub fn record(&mut self, chunk: &TlsChunk) {
        match chunk.kind {
            KIND_CLIENT_FINISHED => self.client_finished(chunk),
            KIND_CLIENT_HELLO | KIND_SERVER_HELLO => self.hello_bytes(chunk),
            _ => self.error("unknown_record"),
        }
    }

    fn hello_bytes(&mut self, chunk: &TlsChunk) {
        let data = &chunk.data[..usize::from(chunk.len).min(chunk.data.len())];
        let id = (chunk.key, chunk.hello_seq, chunk.kind);
        let seen = Seen {
            ts_first: chunk.ts_ns,
            direction: chunk.direction,
            hello_seq: chunk.hello_seq,
        };
        // Most hellos fit in one segment and one record: taken straight
        // from it, with nothing to reassemble.
        if chunk.offset == 0 && (self.assemblies.is_empty() || !self.assemblies.contains_key(&id)) {
            let (n, complete) = handshake_bytes(data, &mut self.message);
            if complete {
                return self.complete(chunk.kind, &chunk.key, &seen, n);
            }
            if data.len() >= chunk.target as usize {
                return self.error("incomplete");
            }
        }
        if !self.assemblies.contains_key(&id) && self.assemblies.len() >= MAX_ASSEMBLIES {
            self.error("too_many_in_flight");
            return;
        }
        let assembly = self.assemblies.entry(id).or_insert_with(|| Assembly {
            started_ns: chunk.ts_ns,
            target: (chunk.target as usize).min(MAX_HELLO as usize),
            chunks: BTreeMap::new(),
            ts_first: 0,
            direction: chunk.direction,
        });
        assembly
            .chunks
            .entry(chunk.offset)
            .or_insert_with(|| data.to_vec());
        if chunk.offset == 0 {
            assembly.ts_first = chunk.ts_ns;
        }
        let prefix = assembly.prefix();
        let (n, complete) = handshake_bytes(&prefix, &mut self.message);
        if !complete && prefix.len() < assembly.target {
            return;
        }
        let assembly = self.assemblies.remove(&id).expect("present");
        if !complete {
            self.error("incomplete");
            return;
        }
        let seen = Seen {
            ts_first: assembly.ts_first,
            direction: assembly.direction,
            ..seen
        };
        self.complete(chunk.kind, &chunk.key, &seen, n);
    }

    /// A whole hello, its first `len` bytes in `self.message`.
    fn complete(&mut self, kind: u8, key: &TlsKey, seen: &Seen, len: usize) {
        if kind == KIND_CLIENT_HELLO {
            self.client_hello(key, seen, len);
        } else {
            self.server_hello(key, seen, len);
        }
    }

    fn client_hello(&mut self, key: &TlsKey, seen: &Seen, len: usize) {
        if let Some(old) = self.open.get(key) {
            let behind = seen.hello_seq.wrapping_sub(old.hello_seq);
            if behind == 0 && old.direction != seen.direction {
                // The same ClientHello seen by the other hook of the same
                // interface (loopback: egress, then ingress).
                return;
            }
            if behind != 0 && behind < SAME_STREAM_BYTES {
                // A second ClientHello on the same connection
                // (HelloRetryRequest): the first one's record stays.
                return;
            }
            let old = self.open.remove(key).expect("present");
            self.file(old.record);
        }
        let message: Box<[u8]> = Box::from(&self.message[..len]);
        let (offered, alpn) = match ClientHello::parse(&message) {
            Ok(hello) => {
                let offered = hello
                    .supported_versions()
                    .filter(|v| !is_grease(*v))
                    .max()
                    .unwrap_or(hello.legacy_version);
                (version_name(offered), alpn_label(hello.alpn().next()))
            }
            Err(error) => return self.error(parse_error(error)),
        };
        *self
            .totals
            .client_hellos
            .entry((offered, alpn))
            .or_default() += 1;
        let role = if seen.direction == Direction::Egress as u32 {
            Role::Client
        } else {
            Role::Server
        };
        let record = TlsRecord {
            key: *key,
            role,
            hello: Arc::new(KeptHello {
                message,
                said: OnceLock::new(),
            }),
            offered,
            version: None,
            cipher: None,
            ts_client_hello: seen.ts_first,
            ts_server_hello: None,
            ts_client_finished: None,
        };
        self.open.insert(
            *key,
            Conn {
                record,
                hello_seq: seen.hello_seq,
                direction: seen.direction,
            },
        );
    }

    fn server_hello(&mut self, key: &TlsKey, seen: &Seen, len: usize) {
        let hello = match ServerHello::parse(&self.message[..len]) {
            Ok(hello) => hello,
            Err(error) => return self.error(parse_error(error)),
        };
        let Some(conn) = self.open.get_mut(&key.reversed()) else {
            // Its ClientHello was not seen (the daemon started later).
            return self.error("server_hello_without_client_hello");
        };
        let record = &mut conn.record;
        if record.ts_server_hello.is_some() {
            return;
        }
        let version = version_name(hello.version());
        record.version = Some(version);
        record.cipher = Some(hello.cipher_suite);
        record.ts_server_hello = Some(seen.ts_first);
        let nanos = seen.ts_first.saturating_sub(record.ts_client_hello);
        let role = record.role;
        *self.totals.handshakes.entry((role, version)).or_default() += 1;
        self.totals
            .durations
            .entry((role, TlsPhase::ClientHelloToServerHello))
            .or_default()
            .observe(nanos as f64 / 1e9);
    }

    fn client_finished(&mut self, chunk: &TlsChunk) {
        let Some(mut conn) = self.open.remove(&chunk.key) else {
            return;
        };
        let Some(server_hello) = conn.record.ts_server_hello else {
            self.open.insert(chunk.key, conn);
            return;
        };
        let nanos = chunk.ts_ns.saturating_sub(server_hello);
        conn.record.ts_client_finished = Some(chunk.ts_ns);
        self.totals
            .durations
            .entry((conn.record.role, TlsPhase::ServerHelloToClientFinished))
            .or_default()
            .observe(nanos as f64 / 1e9);
        self.file(conn.record);
    }

    fn file(&mut self, record: TlsRecord) {
        if self.recent.len() >= self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }

    /// Drops hellos whose bytes stopped coming and files connections that
    /// waited too long.
    pub fn sweep(&mut self, now_ns: u64) {
        let before = self.assemblies.len();
        self.assemblies
            .retain(|_, a| now_ns.saturating_sub(a.started_ns) < ASSEMBLY_TIMEOUT_NS);
        for _ in 0..before - self.assemblies.len() {
            self.error("incomplete");
        }
        let stale: Vec<TlsKey> = self
            .open
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.record.ts_client_hello) >= CONN_TIMEOUT_NS)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(conn) = self.open.remove(&key) {
                self.file(conn.record);
            }
        }
    }

    /// Filed and in-progress connections, oldest first: cheap copies (the
    /// hello bytes are shared), to be turned into views
    /// ([`TlsRecord::view`]) once the daemon's lock is released.
    pub fn records(&self) -> Vec<TlsRecord> {
        let mut records: Vec<TlsRecord> = self
            .recent
            .iter()
            .cloned()
            .chain(self.open.values().map(|c| c.record.clone()))
            .collect();
        records.sort_by_key(|r| r.ts_client_hello);
        records
    }
}

fn parse_error(error: TlsError) -> &'static str {
    error.name()
}
