//! TLS handshakes through the kernel programs: the JA4 reference captures
//! replayed into a veth with tcpreplay, so the hooks see the real frames;
//! the daemon's `handshake tls` must give every stream's published JA4,
//! JA4_r and SNI.

use std::{path::Path, process::Command, time::Duration};

use handshake_tests::{
    NetnsPair,
    capture_file::{read_frames, write_ethernet_pcap},
    require_root, serial,
};

/// Every reference capture with its JSON.
fn captures() -> Vec<(std::path::PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/ja4");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".pcap") || name.ends_with(".pcapng") {
            let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
            out.push((path, serde_json::from_str(&json).unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn replayed_reference_captures_give_their_published_ja4_and_sni() {
    require_root();
    let _serial = serial();
    let pair = NetnsPair::new();
    let daemon = pair.server_daemon(&[]);
    let dir = std::env::temp_dir().join(format!("handshake-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for (path, json) in captures() {
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
    assert!(checked >= 60, "only {checked} checked");
    let metrics = daemon.scrape();
    assert_eq!(
        metrics.get(
            "handshake_tls_ringbuf_dropped_total",
            &[("what", "records")]
        ),
        0.0
    );
}
