//! Any bytes as TLS records: the record layer, then the ClientHello and
//! ServerHello parsers and every accessor. Errors are fine; a panic, an
//! out-of-bounds read or a hang is a bug.
#![no_main]

use handshake_common::tls::{ClientHello, ServerHello, handshake_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut message = [0u8; 4096];
    let (len, _complete) = handshake_bytes(data, &mut message);
    for bytes in [&message[..len], data] {
        if let Ok(hello) = ClientHello::parse(bytes) {
            let _ = hello.ciphers().count();
            let _ = hello.extensions().count();
            let _ = hello.sni();
            let _ = hello.alpn().count();
            let _ = hello.supported_versions().count();
            let _ = hello.signature_algorithms().count();
            let _ = hello.supported_groups().count();
            let _ = hello.ec_point_formats().count();
        }
        let _ = ServerHello::parse(bytes).map(|h| h.version());
    }
});
