//! The ClientHello parser and fingerprints against the published values of
//! the JA4 reference captures (`tests/data/ja4/`, from the team's shared test data): every stream's
//! JA4, JA4_r and SNI, from the parser and through the daemon's TLS
//! tracker. No privileges: the frames are read from the files.

use handshake_common::{
    abi::{
        Direction,
        tls_capture::{CHUNK, KIND_CLIENT_HELLO, MAX_HELLO, TlsChunk, TlsKey},
    },
    tls::ClientHello,
};
use handshake_tests::capture_file::{first_handshake_messages, read_frames, reference_captures};
use handshake_user::model::{fingerprint::Fingerprints, tls::TlsTracker};

#[test]
fn every_reference_stream_has_its_published_ja4_and_sni() {
    let mut checked = 0;
    for (path, expected) in reference_captures() {
        let messages = first_handshake_messages(&read_frames(&path));
        for stream in expected.as_array().unwrap() {
            let Some(ja4) = stream["JA4.1"].as_str() else {
                continue;
            };
            let key = (
                stream["src"].as_str().unwrap().to_owned(),
                stream["srcport"].as_str().unwrap().parse::<u16>().unwrap(),
                stream["dst"].as_str().unwrap().to_owned(),
                stream["dstport"].as_str().unwrap().parse::<u16>().unwrap(),
            );
            let message = messages
                .get(&key)
                .unwrap_or_else(|| panic!("{}: no ClientHello for {key:?}", path.display()));
            let hello = ClientHello::parse(message)
                .unwrap_or_else(|e| panic!("{}: {key:?}: {e:?}", path.display()));
            let fp = Fingerprints::of(&hello);
            assert_eq!(fp.ja4, ja4, "{}: {key:?}", path.display());
            assert_eq!(
                fp.ja4_r,
                stream["JA4_r.1"].as_str().unwrap(),
                "{}: {key:?}",
                path.display()
            );
            let sni = hello.sni().map(|s| String::from_utf8_lossy(s).into_owned());
            assert_eq!(
                sni.as_deref(),
                stream["domain"].as_str(),
                "{}: {key:?}",
                path.display()
            );
            checked += 1;
        }
    }
    eprintln!("{checked} ClientHellos match their published JA4, JA4_r and SNI");
    assert!(checked >= 4, "only {checked} streams checked");
}

/// Every prefix of every reference ClientHello, and each with thousands of
/// pseudo-random byte changes (lying lengths among them), parses to a
/// result or an error: never a panic, never a read out of bounds.
#[test]
fn cut_and_corrupted_hellos_are_errors_not_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut parsed, mut refused, mut cut_short) = (0u32, 0u32, 0u32);
    for (path, _) in reference_captures() {
        for message in first_handshake_messages(&read_frames(&path)).into_values() {
            // Every proper prefix lacks bytes its lengths promise.
            for cut in 0..message.len() {
                let result = ClientHello::parse(&message[..cut]);
                assert!(
                    result.is_err(),
                    "{}: a ClientHello cut to {cut} of {} bytes parsed",
                    path.display(),
                    message.len()
                );
                cut_short += 1;
            }
            for _ in 0..1000 {
                let mut bytes = message.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
                match ClientHello::parse(&bytes) {
                    Ok(hello) => {
                        let _ = Fingerprints::of(&hello);
                        let _ = (hello.sni(), hello.alpn().count());
                        parsed += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
        }
    }
    eprintln!(
        "{cut_short} prefixes refused; of the corruptions {parsed} parsed, {refused} refused"
    );
    assert!(cut_short > 0, "no reference ClientHello found");
    // A corrupted byte in a length field is refused, elsewhere it may
    // well parse: both must happen among thousands.
    assert!(
        refused > 0 && parsed > 0,
        "{parsed} parsed, {refused} refused"
    );
}

/// The daemon's TLS tracker, fed each reference ClientHello the way the
/// kernel hands it over (the record's bytes whole, or in pieces in order
/// and in reverse), shows the SNI and fingerprints the parser gives, and
/// the same again when asked a second time (from what it kept).
#[test]
fn the_tracker_shows_each_reference_hello_as_the_parser_reads_it() {
    let mut checked = 0;
    for (path, _) in reference_captures() {
        for (stream, message) in first_handshake_messages(&read_frames(&path)) {
            let Ok(hello) = ClientHello::parse(&message) else {
                continue;
            };
            if message.first() != Some(&1) || message.len() + 5 > MAX_HELLO as usize {
                continue;
            }
            let expected = Fingerprints::of(&hello);
            let sni = hello.sni().map(|s| String::from_utf8_lossy(s).into_owned());
            let mut record = vec![22, 3, 1];
            record.extend((message.len() as u16).to_be_bytes());
            record.extend(&message);
            // Whole, as most hellos come; and cut as a small MSS would cut
            // it, in order and in reverse.
            for (size, reversed) in [(CHUNK, false), (100, false), (100, true)] {
                let mut tracker = TlsTracker::new(16);
                let mut chunks: Vec<(usize, &[u8])> =
                    (0..).step_by(size).zip(record.chunks(size)).collect();
                if reversed {
                    chunks.reverse();
                }
                for (offset, bytes) in chunks {
                    tracker.record(&chunk(offset, bytes, record.len()));
                }
                let records = tracker.records();
                assert_eq!(records.len(), 1, "{}: {stream:?}", path.display());
                for _asked in 0..2 {
                    let view = records[0].view(0);
                    let what = format!(
                        "{}: {stream:?}, chunks of {size}, reversed {reversed}",
                        path.display()
                    );
                    assert_eq!(view.ja4, expected.ja4, "{what}");
                    assert_eq!(view.ja4_r, expected.ja4_r, "{what}");
                    assert_eq!(view.ja3, expected.ja3, "{what}");
                    assert_eq!(view.ja3_hash, expected.ja3_hash, "{what}");
                    assert_eq!(view.sni, sni, "{what}");
                }
                assert!(tracker.totals.parse_errors.is_empty());
            }
            checked += 1;
        }
    }
    eprintln!("{checked} reference ClientHellos through the tracker");
    assert!(checked >= 4, "only {checked} hellos checked");
}

/// One ring-buffer record of a ClientHello, as the packet hooks write it.
fn chunk(offset: usize, bytes: &[u8], target: usize) -> TlsChunk {
    let mut data = [0; CHUNK];
    data[..bytes.len()].copy_from_slice(bytes);
    TlsChunk {
        ts_ns: 1_000 + offset as u64,
        key: TlsKey {
            src_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ifindex: 1,
            src_port: 40_000,
            dst_port: 443,
            family: 4,
            _pad: 0,
            _pad2: 0,
        },
        kind: KIND_CLIENT_HELLO,
        record_type: 0,
        len: bytes.len() as u16,
        offset: offset as u32,
        target: target as u32,
        hello_seq: 7,
        direction: Direction::Ingress as u32,
        data,
    }
}
