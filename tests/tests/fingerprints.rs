//! The ClientHello parser and fingerprints against the published values of
//! the JA4 reference captures (`tests/data/ja4/`, from the team's shared test data): every stream's
//! JA4, JA4_r and SNI. No privileges: the frames are read from the files.

use handshake_common::tls::ClientHello;
use handshake_tests::capture_file::{first_handshake_messages, read_frames, reference_captures};
use handshake_user::fingerprint::Fingerprints;

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
    let (mut parsed, mut refused) = (0u32, 0u32);
    for (path, _) in reference_captures() {
        for message in first_handshake_messages(&read_frames(&path)).into_values() {
            for cut in 0..message.len() {
                match ClientHello::parse(&message[..cut]) {
                    Ok(hello) => {
                        let _ = Fingerprints::of(&hello);
                        parsed += 1;
                    }
                    Err(_) => refused += 1,
                }
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
    eprintln!("{parsed} parsed, {refused} refused");
    assert!(refused > 0 && parsed > 0);
}
