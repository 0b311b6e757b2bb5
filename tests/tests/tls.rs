//! TLS handshakes through the kernel programs: the JA4 reference captures
//! replayed into a veth with tcpreplay, so the hooks see the real frames;
//! the daemon's `handshake tls` must give every stream's published JA4,
//! JA4_r and SNI.

use std::{collections::HashMap, process::Command, time::Duration};

use handshake_tests::{
    NetnsPair, TlsServer,
    capture_file::{read_frames, reference_captures, write_ethernet_pcap},
    median_p99, require_root, serial,
};

#[test]
fn replayed_reference_captures_give_their_published_ja4_and_sni() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    // Through XDP ingress; the real-clients test below uses the default, tc.
    let daemon = pair.server_daemon(&["--ingress-hook", "xdp"]);
    let dir = handshake_tests::tempdir().join("replay");
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for (path, json) in reference_captures() {
        let frames = read_frames(&path);
        let replay = dir.join(format!(
            "{}.pcap",
            path.file_name().unwrap().to_string_lossy()
        ));
        write_ethernet_pcap(&replay, &frames);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.client,
                "tcpreplay",
                "-q",
                "--pps",
                "2000",
                "-i",
            ])
            .arg(&pair.client_if)
            .arg(&replay)
            .output()
            .expect("run tcpreplay (Debian package tcpreplay)");
        assert!(
            out.status.success(),
            "tcpreplay {}: {}",
            replay.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // The daemon drains its ring buffers every 50 ms.
        std::thread::sleep(Duration::from_millis(300));
        let seen = daemon.cli_json("tls", &[]);
        let seen = seen.as_array().unwrap();
        for stream in json.as_array().unwrap() {
            if !stream["JA4.1"].is_string() {
                continue;
            }
            let (src, dst) = (
                stream["src"].as_str().unwrap(),
                stream["dst"].as_str().unwrap(),
            );
            let sport: u16 = stream["srcport"].as_str().unwrap().parse().unwrap();
            let dport: u16 = stream["dstport"].as_str().unwrap().parse().unwrap();
            // Two captures hold the same four-tuple: the newest is this one's.
            let view = seen
                .iter()
                .rev()
                .find(|v| {
                    v["client_addr"] == src
                        && v["client_port"] == sport
                        && v["server_addr"] == dst
                        && v["server_port"] == dport
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{}: no ClientHello {src}:{sport} -> {dst}:{dport} among {} seen",
                        path.display(),
                        seen.len()
                    )
                });
            assert_eq!(view["ja4"], stream["JA4.1"], "{}: {view}", path.display());
            assert_eq!(
                view["ja4_r"],
                stream["JA4_r.1"],
                "{}: {view}",
                path.display()
            );
            assert_eq!(view["sni"], stream["domain"], "{}: {view}", path.display());
            checked += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{checked} replayed ClientHellos match their published JA4, JA4_r and SNI");
    let published: usize = reference_captures()
        .iter()
        .map(|(_, json)| {
            let streams = json.as_array().expect("a list of streams");
            streams.iter().filter(|s| s["JA4.1"].is_string()).count()
        })
        .sum();
    assert_eq!(
        checked, published,
        "ClientHellos checked, of those published"
    );
    let metrics = daemon.scrape();
    assert_eq!(
        metrics.get(
            "handshake_tls_ringbuf_dropped_total",
            &[("what", "records")]
        ),
        0.0
    );
}

/// All values of `key` anywhere under `v`, in document order (arrays from
/// `--no-duplicate-keys` flattened).
fn find_all<'a>(v: &'a serde_json::Value, key: &str, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    match child {
                        serde_json::Value::Array(items) => out.extend(items.iter()),
                        other => out.push(other),
                    }
                } else {
                    find_all(child, key, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| find_all(i, key, out)),
        _ => {}
    }
}

fn strings(v: &serde_json::Value, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    find_all(v, key, &mut out);
    out.iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// The object of the extension of type `kind` under a handshake.
fn extension(hello: &serde_json::Value, kind: u16) -> Option<&serde_json::Value> {
    hello.as_object()?.iter().find_map(|(k, v)| {
        (k.starts_with("Extension: ")
            && v["tls.handshake.extension.type"].as_str() == Some(&kind.to_string()))
        .then_some(v)
    })
}

fn hex16(s: &str) -> u16 {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

const fn grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && (v >> 8) == (v & 0xff)
}

/// JA4 computed from tshark's dissection of a ClientHello (its own parser,
/// not ours): the check is independent of the daemon's.
fn ja4_from_tshark(hello: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let ciphers: Vec<u16> = strings(hello, "tls.handshake.ciphersuite")
        .iter()
        .map(|c| hex16(c))
        .filter(|c| !grease(*c))
        .collect();
    let exts: Vec<u16> = hello
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("Extension: "))
        .filter_map(|(_, v)| v["tls.handshake.extension.type"].as_str()?.parse().ok())
        .filter(|t| !grease(*t))
        .collect();
    let versions: Vec<u16> = extension(hello, 43)
        .map(|e| strings(e, "tls.handshake.extensions.supported_version"))
        .unwrap_or_default()
        .iter()
        .map(|v| hex16(v))
        .filter(|v| !grease(*v))
        .collect();
    let legacy = hex16(hello["tls.handshake.version"].as_str().unwrap());
    let version = match versions.iter().copied().max().unwrap_or(legacy) {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        _ => "00",
    };
    let sni = if extension(hello, 0).is_some() {
        'd'
    } else {
        'i'
    };
    let alpn = extension(hello, 16)
        .map(|e| strings(e, "tls.handshake.extensions_alpn_str"))
        .and_then(|a| a.first().cloned())
        .map_or_else(
            || "00".to_owned(),
            |a| {
                let b = a.as_bytes();
                format!("{}{}", b[0] as char, b[b.len() - 1] as char)
            },
        );
    let sigs: Vec<u16> = extension(hello, 13)
        .map(|e| strings(e, "tls.handshake.sig_hash_alg"))
        .unwrap_or_default()
        .iter()
        .map(|s| hex16(s))
        .collect();
    let join = |v: &[u16]| {
        v.iter().fold(String::new(), |mut s, x| {
            if !s.is_empty() {
                s.push(',');
            }
            let _ = write!(s, "{x:04x}");
            s
        })
    };
    let mut sorted_ciphers = ciphers.clone();
    sorted_ciphers.sort_unstable();
    let mut sorted_exts: Vec<u16> = exts
        .iter()
        .copied()
        .filter(|e| *e != 0 && *e != 16)
        .collect();
    sorted_exts.sort_unstable();
    let mut c = join(&sorted_exts);
    if !sigs.is_empty() {
        c.push('_');
        c.push_str(&join(&sigs));
    }
    let sha12 = |text: &str| {
        let out = sh_stdin("sha256sum", text);
        out[..12].to_owned()
    };
    format!(
        "t{version}{sni}{:02}{:02}{alpn}_{}_{}",
        ciphers.len().min(99),
        exts.len().min(99),
        sha12(&join(&sorted_ciphers)),
        sha12(&c)
    )
}

/// Runs `program` with `input` on stdin; its stdout.
fn sh_stdin(program: &str, input: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Real clients (openssl s_client with TLS 1.2 and 1.3, with and without
/// SNI and ALPN, over IPv4 and IPv6; curl; a rustls client) against openssl s_server across
/// namespaces; then the same with a 256-byte MTU on the client's side, so
/// that each ClientHello spans several segments. For every connection the
/// daemon's SNI, ALPN, JA3 (string and hash) and negotiated version equal
/// tshark's dissection of a capture of the same traffic, and its JA4 the
/// one computed from that dissection.
#[test]
fn real_clients_agree_with_tshark() {
    use handshake_tests::{PcapFile, sh, tempdir};
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&[]);
    let dir = tempdir().join("tls-real");
    std::fs::create_dir_all(&dir).unwrap();
    const PORT: u16 = 4443;
    let clients: Vec<Vec<String>> = {
        let s = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let v4 = format!("{}:{PORT}", NetnsPair::SERVER_V4);
        let v6 = format!("[{}]:{PORT}", NetnsPair::SERVER_V6);
        vec![
            s(&[
                "openssl",
                "s_client",
                "-connect",
                &v4,
                "-tls1_3",
                "-servername",
                "a.tls.test",
                "-alpn",
                "h2",
            ]),
            s(&[
                "openssl",
                "s_client",
                "-connect",
                &v4,
                "-tls1_2",
                "-servername",
                "b.tls.test",
                "-alpn",
                "http/1.1",
            ]),
            s(&[
                "openssl",
                "s_client",
                "-connect",
                &v4,
                "-tls1_3",
                "-noservername",
            ]),
            s(&[
                "openssl",
                "s_client",
                "-connect",
                &v6,
                "-tls1_2",
                "-servername",
                "c.tls.test",
                "-alpn",
                "h2,http/1.1",
            ]),
            s(&[
                "openssl",
                "s_client",
                "-connect",
                &v6,
                "-tls1_3",
                "-servername",
                "d.tls.test",
            ]),
            s(&[
                "curl",
                "-sk",
                "--http1.1",
                "--resolve",
                &format!("e.tls.test:{PORT}:{}", NetnsPair::SERVER_V4),
                &format!("https://e.tls.test:{PORT}/"),
            ]),
            s(&[
                env!("CARGO_BIN_EXE_tls-client"),
                &v4,
                "r.tls.test",
                "h2",
                "http/1.1",
            ]),
        ]
    };
    let runs = 2 * clients.len();
    let runs = runs.to_string();
    let server = TlsServer::start(
        &pair.server,
        PORT,
        &["-www", "-naccept", &runs, "-alpn", "h2,http/1.1"],
    );
    let capture = PcapFile::start(
        &pair.server,
        &pair.server_if,
        &dir.join("real.pcap"),
        &format!("tcp port {PORT}"),
    );
    for small_mtu in [false, true] {
        if small_mtu {
            // One MSS per packet: without gso_max_segs 1 the stack hands
            // veth one GSO packet that is never cut into segments.
            sh(
                "ip",
                &[
                    "-n",
                    &pair.client,
                    "link",
                    "set",
                    &pair.client_if,
                    "mtu",
                    "256",
                    "gso_max_segs",
                    "1",
                ],
            );
        }
        for client in clients
            .iter()
            .filter(|c| !small_mtu || !c.iter().any(|a| a.contains('[')))
        {
            let out = Command::new("ip")
                .args(["netns", "exec", &pair.client])
                .args(client)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run the TLS client");
            assert!(
                out.status.success() || client[0] == "openssl",
                "{client:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let pcap = capture.finish();
    drop(server);

    let json = Command::new("tshark")
        .args(["-r"])
        .arg(&pcap)
        .args([
            "-Y",
            "tls.handshake.type == 1",
            "-T",
            "json",
            "--no-duplicate-keys",
        ])
        .output()
        .expect("run tshark (Debian package tshark)");
    let packets: serde_json::Value = serde_json::from_slice(&json.stdout).expect("tshark JSON");
    let seen = daemon.cli_json("tls", &[]);
    let seen = seen.as_array().unwrap();
    let wire = wire_handshakes(&pcap, PORT);
    let mut differences = Vec::new();
    let mut checked = 0;
    let mut spanning = 0;
    for packet in packets.as_array().unwrap() {
        let layers = &packet["_source"]["layers"];
        // tshark reassembled this hello from several TCP segments.
        if layers["tcp.segments"].is_object() {
            spanning += 1;
        }
        let (src, dst) = if layers["ip"].is_object() {
            (&layers["ip"]["ip.src"], &layers["ip"]["ip.dst"])
        } else {
            (&layers["ipv6"]["ipv6.src"], &layers["ipv6"]["ipv6.dst"])
        };
        let sport: u16 = layers["tcp"]["tcp.srcport"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let dport: u16 = layers["tcp"]["tcp.dstport"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut hellos = Vec::new();
        find_all(&layers["tls"], "tls.handshake", &mut hellos);
        let hello = hellos
            .into_iter()
            .find(|h| h["tls.handshake.type"] == "1")
            .expect("a ClientHello in the packet");
        let view = seen
            .iter()
            .find(|v| {
                v["client_addr"] == *src
                    && v["client_port"] == sport
                    && v["server_addr"] == *dst
                    && v["server_port"] == dport
            })
            .unwrap_or_else(|| {
                panic!(
                    "no ClientHello {src}:{sport} in {}",
                    serde_json::Value::Array(seen.clone())
                )
            });
        let sni = extension(hello, 0)
            .map(|e| strings(e, "tls.handshake.extensions_server_name")[0].clone());
        assert_eq!(view["sni"].as_str().map(str::to_owned), sni, "{view}");
        let alpn = extension(hello, 16)
            .map(|e| strings(e, "tls.handshake.extensions_alpn_str"))
            .unwrap_or_default();
        assert_eq!(view["alpn"], serde_json::json!(alpn), "{view}");
        assert_eq!(
            view["ja3"].as_str(),
            hello["tls.handshake.ja3_full"].as_str(),
            "{view}"
        );
        assert_eq!(
            view["ja3_hash"].as_str(),
            hello["tls.handshake.ja3"].as_str(),
            "{view}"
        );
        assert_eq!(
            view["ja4"].as_str().unwrap(),
            ja4_from_tshark(hello),
            "{view}"
        );
        let wire = &wire[&(src.as_str().unwrap().to_owned(), sport)];
        assert_eq!(view["offered_version"], wire.offered, "{view}");
        assert_eq!(view["version"], wire.version, "{view}");
        assert_eq!(view["cipher"], wire.cipher, "{view}");
        // Phases: ClientHello -> ServerHello -> the client's next record,
        // and the whole from the TCP handshake's first SYN, against the
        // capture on the same interface.
        for (name, truth) in [
            (
                "client_hello_to_server_hello_us",
                wire.server_hello - wire.client_hello,
            ),
            (
                "server_hello_to_client_finished_us",
                wire.client_finished - wire.server_hello,
            ),
            ("total_from_syn_us", wire.client_finished - wire.syn),
        ] {
            let ours = view[name]
                .as_f64()
                .unwrap_or_else(|| panic!("no {name}: {view}"));
            if (ours - truth).abs() > PHASE_TOLERANCE_US {
                eprintln!("{name}: {ours:.0} us, the capture {truth:.0} us: {view}");
            }
            differences.push((ours - truth).abs());
        }
        checked += 1;
    }
    let late = differences
        .iter()
        .filter(|d| **d > PHASE_TOLERANCE_US)
        .count();
    assert!(
        late * 10 <= differences.len(),
        "{late} of {} TLS phases differ from the capture by more than {PHASE_TOLERANCE_US} us",
        differences.len()
    );
    let (median, p99) = median_p99(&mut differences);
    assert!(
        median <= PHASE_MEDIAN_US,
        "TLS phases differ from the capture by {median:.0} us in the median"
    );
    let multi = seen
        .iter()
        .filter(|v| v["client_hello_to_server_hello_us"].is_number())
        .count();
    eprintln!(
        "{checked} ClientHellos agree with tshark ({multi} with a ServerHello, {spanning} spanning several segments); phases differ from the capture by {median:.0} us (median), {p99:.0} us (p99)"
    );
    // At an MTU of 256 every ClientHello spans several segments.
    let small_mtu_runs = clients
        .iter()
        .filter(|c| !c.iter().any(|a| a.contains('[')))
        .count();
    assert_eq!(
        spanning, small_mtu_runs,
        "ClientHellos that spanned several segments"
    );
    assert_eq!(
        checked,
        clients.len() + clients.len() - 2,
        "every client connected twice (IPv6 once)"
    );
    tls_filters_select_what_they_name(&daemon, seen);
    tls_metrics_count_what_was_listed(&daemon, seen);
    let _ = std::fs::remove_dir_all(&dir);
}

/// How far a TLS phase may differ from the capture on the same interface:
/// the hooks stamp a packet when they run, tcpdump a received one when it
/// was queued to the veth, and the receive backlog runs in between: the
/// hooks stamp received packets 10-45 us after tcpdump on an idle 2-vCPU
/// VM (a ClientHello -> ServerHello 10-45 us shorter, ServerHello ->
/// Finished 10-55 us longer), and when the host defers the backlog to a
/// busy ksoftirqd, a millisecond or more (1.2 ms seen in CI). So nine
/// phases in ten within a millisecond, each one past it printed, and the
/// median within what stamping the wrong packet of a handshake (100 us or
/// more apart over veth) would exceed.
const PHASE_TOLERANCE_US: f64 = 1000.0;
const PHASE_MEDIAN_US: f64 = 50.0;

/// One TLS handshake as the capture shows it: times in µs, versions as
/// the daemon names them, the cipher as `0x1302`.
#[derive(Debug)]
struct WireHandshake {
    syn: f64,
    /// The client's first payload packet (a ClientHello's first segment).
    client_hello: f64,
    /// The server's first payload packet.
    server_hello: f64,
    /// The client's first payload packet after that with a record that is
    /// not ChangeCipherSpec.
    client_finished: f64,
    offered: &'static str,
    version: &'static str,
    cipher: String,
}

/// One TCP packet of the capture, as tshark decodes it.
struct WirePacket {
    at_us: f64,
    /// The client's (address, port).
    client: (String, u16),
    from_client: bool,
    syn_only: bool,
    payload: bool,
    content_types: Vec<String>,
    handshake_types: Vec<String>,
    cipher: String,
    supported_versions: String,
    legacy_version: String,
}

/// The packets to and from `port` in the capture at `pcap`.
fn wire_packets(pcap: &std::path::Path, port: u16) -> Vec<WirePacket> {
    const FIELDS: [&str; 16] = [
        "frame.time_epoch",
        "ip.src",
        "ipv6.src",
        "ip.dst",
        "ipv6.dst",
        "tcp.srcport",
        "tcp.dstport",
        "tcp.len",
        "tcp.flags.syn",
        "tcp.flags.ack",
        "tls.record.content_type",
        "tls.record.opaque_type",
        "tls.handshake.type",
        "tls.handshake.ciphersuite",
        "tls.handshake.extensions.supported_version",
        "tls.handshake.version",
    ];
    let mut command = Command::new("tshark");
    command
        .arg("-r")
        .arg(pcap)
        .args(["-T", "fields", "-E", "occurrence=a"]);
    for field in FIELDS {
        command.args(["-e", field]);
    }
    let out = command.output().expect("run tshark");
    let list = |text: &str| {
        text.split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let either = |a: &str, b: &str| if a.is_empty() { b } else { a }.to_owned();
            let (src, dst) = (either(f[1], f[2]), either(f[3], f[4]));
            let (sport, dport): (u16, u16) = (f[5].parse().unwrap(), f[6].parse().unwrap());
            let from_client = dport == port;
            WirePacket {
                at_us: f[0].parse::<f64>().expect("frame time") * 1e6,
                client: if from_client {
                    (src, sport)
                } else {
                    (dst, dport)
                },
                from_client,
                syn_only: f[8] == "1" && f[9] == "0",
                payload: f[7] != "0",
                // TLS 1.3 encrypted records: tshark names their type
                // `opaque_type`.
                content_types: [list(f[10]), list(f[11])].concat(),
                handshake_types: list(f[12]),
                cipher: f[13].split(',').next().unwrap_or_default().to_owned(),
                supported_versions: f[14].to_owned(),
                legacy_version: f[15].split(',').next().unwrap_or_default().to_owned(),
            }
        })
        .collect()
}

/// The TLS handshakes to `port` in the capture at `pcap`, by client
/// (address, port).
fn wire_handshakes(pcap: &std::path::Path, port: u16) -> HashMap<(String, u16), WireHandshake> {
    let mut by_client: HashMap<(String, u16), Vec<WirePacket>> = HashMap::new();
    for packet in wire_packets(pcap, port) {
        by_client
            .entry(packet.client.clone())
            .or_default()
            .push(packet);
    }
    by_client
        .into_iter()
        .map(|(client, packets)| {
            let at = |p: Option<&WirePacket>, what: &str| {
                p.unwrap_or_else(|| {
                    let seen: Vec<_> = packets
                        .iter()
                        .map(|p| {
                            (
                                p.from_client,
                                p.payload,
                                &p.content_types,
                                &p.handshake_types,
                            )
                        })
                        .collect();
                    panic!("{client:?}: no {what} in the capture: {seen:?}")
                })
                .at_us
            };
            let syn = at(packets.iter().find(|p| p.from_client && p.syn_only), "SYN");
            let hello = packets
                .iter()
                .find(|p| p.from_client && p.handshake_types.iter().any(|t| t == "1"));
            let server = packets
                .iter()
                .find(|p| !p.from_client && p.handshake_types.iter().any(|t| t == "2"))
                .unwrap_or_else(|| panic!("{client:?}: no ServerHello in the capture"));
            let client_hello = at(
                packets.iter().find(|p| p.from_client && p.payload),
                "ClientHello",
            );
            let server_hello = at(
                packets.iter().find(|p| !p.from_client && p.payload),
                "ServerHello",
            );
            let client_finished = at(
                packets.iter().find(|p| {
                    p.from_client
                        && p.at_us > server_hello
                        && p.content_types.iter().any(|t| t != "20")
                }),
                "client record after the ServerHello",
            );
            let hello =
                hello.unwrap_or_else(|| panic!("{client:?}: no ClientHello in the capture"));
            let negotiated = server
                .supported_versions
                .split(',')
                .find(|v| !v.is_empty())
                .unwrap_or(&server.legacy_version);
            let wire = WireHandshake {
                syn,
                client_hello,
                server_hello,
                client_finished,
                offered: offered_version(&hello.supported_versions, &hello.legacy_version),
                version: version_name(negotiated),
                cipher: server.cipher.clone(),
            };
            (client, wire)
        })
        .collect()
}

/// The highest version a ClientHello offers, GREASE aside: from
/// supported_versions when it has one, else its legacy version.
fn offered_version(supported: &str, legacy: &str) -> &'static str {
    let highest = supported
        .split(',')
        .filter(|v| !v.is_empty() && !is_grease_text(v))
        .filter_map(|v| u16::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .max();
    match highest {
        Some(v) => version_name(&format!("0x{v:04x}")),
        None => version_name(legacy.split(',').next().unwrap_or(legacy)),
    }
}

fn is_grease_text(version: &str) -> bool {
    u16::from_str_radix(version.trim_start_matches("0x"), 16).is_ok_and(grease)
}

fn version_name(hex: &str) -> &'static str {
    match hex {
        "0x0304" => "1.3",
        "0x0303" => "1.2",
        "0x0302" => "1.1",
        "0x0301" => "1.0",
        other => panic!("unexpected TLS version {other}"),
    }
}

/// `tls --sni`, `--ja4` and `--top` against the whole list (ages aside:
/// they grow between calls).
fn tls_filters_select_what_they_name(daemon: &handshake_tests::Daemon, all: &[serde_json::Value]) {
    let without_age = |rows: &[serde_json::Value]| -> Vec<serde_json::Value> {
        rows.iter()
            .cloned()
            .map(|mut row| {
                row.as_object_mut().expect("a JSON object").remove("age_s");
                row
            })
            .collect()
    };
    let listed = |args: &[&str]| {
        let answer = daemon.cli_json("tls", args);
        without_age(answer.as_array().expect("a JSON array"))
    };
    let sni = all[0]["sni"].as_str().expect("an SNI");
    let ja4 = all[0]["ja4"].as_str().expect("a JA4");
    for (flag, value, field) in [("--sni", sni, "sni"), ("--ja4", ja4, "ja4")] {
        let expected: Vec<_> = all.iter().filter(|v| v[field] == value).cloned().collect();
        assert!(!expected.is_empty());
        assert_eq!(
            listed(&[flag, value]),
            without_age(&expected),
            "tls {flag} {value}"
        );
    }
    // The most frequent (SNI, JA4) pairs: count down, then JA4, then SNI.
    let mut counts: HashMap<(String, Option<String>), u64> = HashMap::new();
    for v in all {
        let key = (
            v["ja4"].as_str().unwrap().to_owned(),
            v["sni"].as_str().map(str::to_owned),
        );
        *counts.entry(key).or_default() += 1;
    }
    let mut expected: Vec<_> = counts.into_iter().collect();
    expected.sort_by(|a, b| (b.1, &a.0).cmp(&(a.1, &b.0)));
    expected.truncate(3);
    let top = daemon.cli_json("tls", &["--top", "3"]);
    let top: Vec<_> = top
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|p| {
            let key = (
                p["ja4"].as_str().unwrap().to_owned(),
                p["sni"].as_str().map(str::to_owned),
            );
            (key, p["count"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(top, expected, "tls --top 3");
}

/// The TLS metrics count the handshakes `tls` lists (all on the server
/// side here).
fn tls_metrics_count_what_was_listed(daemon: &handshake_tests::Daemon, all: &[serde_json::Value]) {
    let metrics = daemon.scrape();
    let count = |field: &str, value: &str| all.iter().filter(|v| v[field] == value).count() as f64;
    for version in ["1.2", "1.3"] {
        assert_eq!(
            metrics.get(
                "handshake_tls_handshakes_total",
                &[("role", "server"), ("version", version)]
            ),
            count("version", version),
            "TLS {version} handshakes"
        );
    }
    assert_eq!(
        metrics.get("handshake_tls_client_hellos_total", &[]),
        all.len() as f64
    );
    for (phase, field) in [
        (
            "client_hello_to_server_hello",
            "client_hello_to_server_hello_us",
        ),
        (
            "server_hello_to_client_finished",
            "server_hello_to_client_finished_us",
        ),
    ] {
        let timed = all.iter().filter(|v| v[field].is_number()).count() as f64;
        assert_eq!(
            metrics.get(
                "handshake_tls_handshake_duration_seconds_count",
                &[("role", "server"), ("phase", phase)]
            ),
            timed,
            "{phase}"
        );
    }
}
