//! Recognising the start of a TLS handshake record from the first bytes of
//! a TCP payload. The kernel only needs this much; full ClientHello parsing
//! belongs to userspace.

/// Bytes of payload needed to tell a hello: the 5-byte record header and
/// the handshake type.
pub const HELLO_PREFIX_LEN: usize = 6;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloKind {
    Client,
    Server,
}

/// A TLS handshake record (type 22, version 0x03xx, non-zero length) that
/// opens with a ClientHello (1) or ServerHello (2).
pub const fn hello_kind(prefix: &[u8; HELLO_PREFIX_LEN]) -> Option<HelloKind> {
    if prefix[0] != CONTENT_TYPE_HANDSHAKE || prefix[1] != 0x03 {
        return None;
    }
    if prefix[3] == 0 && prefix[4] == 0 {
        return None;
    }
    match prefix[5] {
        HANDSHAKE_CLIENT_HELLO => Some(HelloKind::Client),
        HANDSHAKE_SERVER_HELLO => Some(HelloKind::Server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_hellos_only() {
        assert_eq!(hello_kind(&[22, 3, 1, 0, 200, 1]), Some(HelloKind::Client));
        assert_eq!(hello_kind(&[22, 3, 3, 0, 90, 2]), Some(HelloKind::Server));
        // Finished, application data, SSLv2, empty record, HTTP.
        assert_eq!(hello_kind(&[22, 3, 3, 0, 40, 20]), None);
        assert_eq!(hello_kind(&[23, 3, 3, 0, 40, 1]), None);
        assert_eq!(hello_kind(&[22, 2, 0, 0, 40, 1]), None);
        assert_eq!(hello_kind(&[22, 3, 1, 0, 0, 1]), None);
        assert_eq!(hello_kind(b"GET / "), None);
    }
}
