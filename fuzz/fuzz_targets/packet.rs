//! Any bytes as an Ethernet frame: the one packet parser the kernel
//! programs run, then the TLS hello check on its payload. Errors are
//! fine; a panic, an out-of-bounds read, a hang, or a segment whose
//! offsets point outside the frame is a bug.
#![no_main]

use handshake_common::packet::{Packet as _, parse_tcp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(Some(segment)) = parse_tcp(frame) {
        assert!(segment.tcp_offset + 20 <= frame.len(), "{segment:?}");
        assert!(segment.tcp_offset < segment.payload_offset, "{segment:?}");
        assert!(
            segment.payload_offset + segment.payload_len <= frame.len(),
            "{segment:?} in {} bytes",
            frame.len()
        );
        let _ = segment.tls_hello(frame);
        let _ = (segment.is_syn(), segment.is_syn_ack());
    }
    let _ = frame.is_empty();
});
