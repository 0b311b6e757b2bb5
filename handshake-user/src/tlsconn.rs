//! TLS handshakes from the kernel's hello records: reassembling each hello
//! from its chunks, parsing it, fingerprinting ClientHellos, and timing the
//! phases of each connection. Pure: the daemon feeds it records and a
//! clock, the API and metrics read it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use handshake_common::{
    abi::{
        Direction,
        tls_capture::{
            KIND_CLIENT_FINISHED, KIND_CLIENT_HELLO, KIND_SERVER_HELLO, MAX_HELLO, TlsChunk, TlsKey,
        },
    },
    tls::{ClientHello, ServerHello, TlsError, handshake_bytes, is_grease},
};
use serde::{Deserialize, Serialize};

use crate::{
    conntrack::{Histogram, Role},
    fingerprint::{Fingerprints, version_name},
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// One TLS connection as the hooks saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TlsView {
    pub family: String,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    /// This host's side: `client` when it sent the ClientHello.
    pub role: String,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    pub ja4: String,
    pub ja4_r: String,
    pub ja3: String,
    pub ja3_hash: String,
    /// The highest version the client offered.
    pub offered_version: String,
    /// Negotiated, once the ServerHello was seen.
    pub version: Option<String>,
    /// Negotiated cipher suite, `0x1301` style.
    pub cipher: Option<String>,
    pub client_hello_to_server_hello_us: Option<f64>,
    pub server_hello_to_client_finished_us: Option<f64>,
    /// From the connection's first SYN to the client's first record after
    /// the ServerHello, when the TCP handshake was seen too.
    pub total_from_syn_us: Option<f64>,
    /// Kernel clock of the ClientHello, to join with the TCP handshake.
    #[serde(skip)]
    pub ts_client_hello: u64,
    #[serde(skip)]
    pub ts_client_finished: Option<u64>,
    #[serde(skip)]
    pub ifindex: u32,
    pub age_s: f64,
}

#[derive(Clone, Debug)]
struct Conn {
    view: TlsView,
    role: Role,
    ts_server_hello: Option<u64>,
    /// Sequence number of the ClientHello's first byte.
    hello_seq: u32,
    /// The hook that saw it.
    direction: u32,
}

/// A second ClientHello this close behind the first in the byte stream
/// belongs to the same connection (after a HelloRetryRequest); one at the
/// same place or elsewhere means the four-tuple was reused (or replayed).
const SAME_STREAM_BYTES: u32 = 1 << 16;

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

fn addr(family: u8, bytes: &[u8; 16]) -> String {
    if family == 4 {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
    } else {
        std::net::Ipv6Addr::from(*bytes).to_string()
    }
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
    recent: VecDeque<TlsView>,
    capacity: usize,
    pub totals: TlsTotals,
}

impl TlsTracker {
    pub fn new(capacity: usize) -> Self {
        Self {
            assemblies: HashMap::new(),
            open: HashMap::new(),
            recent: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
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
        let id = (chunk.key, chunk.hello_seq, chunk.kind);
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
        let len = usize::from(chunk.len).min(chunk.data.len());
        assembly
            .chunks
            .entry(chunk.offset)
            .or_insert_with(|| chunk.data[..len].to_vec());
        if chunk.offset == 0 {
            assembly.ts_first = chunk.ts_ns;
        }
        let prefix = assembly.prefix();
        let mut message = vec![0u8; MAX_HELLO as usize];
        let (n, complete) = handshake_bytes(&prefix, &mut message);
        if !complete && prefix.len() < assembly.target {
            return;
        }
        let assembly = self.assemblies.remove(&id).expect("present");
        if !complete {
            self.error("incomplete");
            return;
        }
        message.truncate(n);
        if chunk.kind == KIND_CLIENT_HELLO {
            self.client_hello(&chunk.key, chunk.hello_seq, &assembly, &message);
        } else {
            self.server_hello(&chunk.key, &assembly, &message);
        }
    }

    fn client_hello(&mut self, key: &TlsKey, hello_seq: u32, assembly: &Assembly, message: &[u8]) {
        if let Some(old) = self.open.get(key) {
            let behind = hello_seq.wrapping_sub(old.hello_seq);
            if behind == 0 && old.direction != assembly.direction {
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
            self.file(old.view);
        }
        let hello = match ClientHello::parse(message) {
            Ok(hello) => hello,
            Err(error) => return self.error(parse_error(error)),
        };
        let fp = Fingerprints::of(&hello);
        let offered = hello
            .supported_versions()
            .filter(|v| !is_grease(*v))
            .max()
            .unwrap_or(hello.legacy_version);
        let first_alpn = hello.alpn().next();
        *self
            .totals
            .client_hellos
            .entry((version_name(offered), alpn_label(first_alpn)))
            .or_default() += 1;
        let role = if assembly.direction == Direction::Egress as u32 {
            Role::Client
        } else {
            Role::Server
        };
        let view = TlsView {
            family: if key.family == 4 { "ipv4" } else { "ipv6" }.to_owned(),
            client_addr: addr(key.family, &key.src_addr),
            client_port: key.src_port,
            server_addr: addr(key.family, &key.dst_addr),
            server_port: key.dst_port,
            role: role.name().to_owned(),
            sni: hello.sni().map(|s| String::from_utf8_lossy(s).into_owned()),
            alpn: hello
                .alpn()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            ja4: fp.ja4,
            ja4_r: fp.ja4_r,
            ja3: fp.ja3,
            ja3_hash: fp.ja3_hash,
            offered_version: version_name(offered).to_owned(),
            version: None,
            cipher: None,
            client_hello_to_server_hello_us: None,
            server_hello_to_client_finished_us: None,
            total_from_syn_us: None,
            ts_client_hello: assembly.ts_first,
            ts_client_finished: None,
            ifindex: key.ifindex,
            age_s: 0.0,
        };
        self.open.insert(
            *key,
            Conn {
                view,
                role,
                ts_server_hello: None,
                hello_seq,
                direction: assembly.direction,
            },
        );
    }

    fn server_hello(&mut self, key: &TlsKey, assembly: &Assembly, message: &[u8]) {
        let hello = match ServerHello::parse(message) {
            Ok(hello) => hello,
            Err(error) => return self.error(parse_error(error)),
        };
        let Some(conn) = self.open.get_mut(&key.reversed()) else {
            // Its ClientHello was not seen (the daemon started later).
            return self.error("server_hello_without_client_hello");
        };
        if conn.ts_server_hello.is_some() {
            return;
        }
        let version = version_name(hello.version());
        conn.view.version = Some(version.to_owned());
        conn.view.cipher = Some(format!("0x{:04x}", hello.cipher_suite));
        conn.ts_server_hello = Some(assembly.ts_first);
        let nanos = assembly.ts_first.saturating_sub(conn.view.ts_client_hello);
        conn.view.client_hello_to_server_hello_us = Some(nanos as f64 / 1e3);
        let role = conn.role;
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
        let Some(server_hello) = conn.ts_server_hello else {
            self.open.insert(chunk.key, conn);
            return;
        };
        let nanos = chunk.ts_ns.saturating_sub(server_hello);
        conn.view.server_hello_to_client_finished_us = Some(nanos as f64 / 1e3);
        conn.view.ts_client_finished = Some(chunk.ts_ns);
        self.totals
            .durations
            .entry((conn.role, TlsPhase::ServerHelloToClientFinished))
            .or_default()
            .observe(nanos as f64 / 1e9);
        self.file(conn.view);
    }

    fn file(&mut self, view: TlsView) {
        if self.recent.len() >= self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(view);
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
            .filter(|(_, c)| now_ns.saturating_sub(c.view.ts_client_hello) >= CONN_TIMEOUT_NS)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(conn) = self.open.remove(&key) {
                self.file(conn.view);
            }
        }
    }

    /// Filed and in-progress connections, oldest first, with their age.
    pub fn views(&self, now_ns: u64) -> Vec<TlsView> {
        let mut views: Vec<TlsView> = self
            .recent
            .iter()
            .cloned()
            .chain(self.open.values().map(|c| c.view.clone()))
            .collect();
        views.sort_by_key(|v| v.ts_client_hello);
        for v in &mut views {
            v.age_s = now_ns.saturating_sub(v.ts_client_hello) as f64 / 1e9;
        }
        views
    }
}

fn parse_error(error: TlsError) -> &'static str {
    error.name()
}
