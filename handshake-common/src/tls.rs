//! TLS handshakes. The kernel only recognises the start of a handshake
//! record from the first bytes of a TCP payload (`hello_kind`); the daemon
//! parses whole hellos (`ClientHello`, `ServerHello`) with the bounded,
//! allocation-free reader below.

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

/// TLS record content types.
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_HANDSHAKE: u8 = CONTENT_TYPE_HANDSHAKE;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// Extension types the fingerprints and views name.
pub mod ext {
    pub const SERVER_NAME: u16 = 0x0000;
    pub const SUPPORTED_GROUPS: u16 = 0x000a;
    pub const EC_POINT_FORMATS: u16 = 0x000b;
    pub const SIGNATURE_ALGORITHMS: u16 = 0x000d;
    pub const ALPN: u16 = 0x0010;
    pub const SUPPORTED_VERSIONS: u16 = 0x002b;
}

/// GREASE values (RFC 8701): 0x0a0a, 0x1a1a, ... 0xfafa.
pub const fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && (value >> 8) == (value & 0xff)
}

/// Why a hello could not be parsed. Every length field is checked against
/// what is there: a lie or a cut gives one of these, never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsError {
    /// The bytes end before a field that must be there.
    Truncated(&'static str),
    /// A length field says more than its enclosing field holds, or an odd
    /// length for a list of 16-bit values.
    BadLength(&'static str),
    /// Not a handshake message of the expected type.
    WrongType(u8),
}

impl TlsError {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated(_) => "truncated",
            Self::BadLength(_) => "bad_length",
            Self::WrongType(_) => "wrong_type",
        }
    }
}

/// A bounds-checked cursor over bytes.
#[derive(Clone, Copy, Debug)]
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    const fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        if self.bytes.len() < n {
            return Err(TlsError::Truncated(what));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TlsError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TlsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self, what: &'static str) -> Result<usize, TlsError> {
        let b = self.take(3, what)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vector(&mut self, len_bytes: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        let len = match len_bytes {
            1 => usize::from(self.u8(what)?),
            2 => usize::from(self.u16(what)?),
            _ => self.u24(what)?,
        };
        if self.bytes.len() < len {
            return Err(TlsError::BadLength(what));
        }
        self.take(len, what)
    }

    const fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The 16-bit values of a list (cipher suites, groups, versions...).
pub fn u16s(list: &[u8]) -> impl Iterator<Item = u16> + '_ {
    list.as_chunks::<2>()
        .0
        .iter()
        .map(|c| u16::from_be_bytes(*c))
}

/// Extensions in wire order: (type, data).
#[derive(Clone, Debug)]
pub struct Extensions<'a> {
    reader: Reader<'a>,
}

impl<'a> Iterator for Extensions<'a> {
    type Item = Result<(u16, &'a [u8]), TlsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.reader.is_empty() {
            return None;
        }
        let item = (|| {
            let kind = self.reader.u16("extension type")?;
            let data = self.reader.vector(2, "extension data")?;
            Ok((kind, data))
        })();
        if item.is_err() {
            self.reader = Reader::new(&[]);
        }
        Some(item)
    }
}

/// A parsed ClientHello, borrowing the handshake message it came from.
#[derive(Clone, Copy, Debug)]
pub struct ClientHello<'a> {
    pub legacy_version: u16,
    /// Cipher suites, raw (2 bytes each).
    pub cipher_suites: &'a [u8],
    pub compression_methods: &'a [u8],
    /// The extension block, raw; checked whole by [`ClientHello::parse`].
    pub extensions: &'a [u8],
}

impl<'a> ClientHello<'a> {
    /// Parses one handshake message (type, 24-bit length, body), as
    /// reassembled from one or more handshake records.
    pub fn parse(message: &'a [u8]) -> Result<Self, TlsError> {
        let mut r = Reader::new(message);
        let kind = r.u8("handshake type")?;
        if kind != HANDSHAKE_CLIENT_HELLO {
            return Err(TlsError::WrongType(kind));
        }
        let len = r.u24("handshake length")?;
        let mut body = Reader::new(r.take(len, "ClientHello body")?);
        let legacy_version = body.u16("legacy_version")?;
        body.take(32, "random")?;
        body.vector(1, "session id")?;
        let cipher_suites = body.vector(2, "cipher suites")?;
        if cipher_suites.len() % 2 != 0 {
            return Err(TlsError::BadLength("cipher suites"));
        }
        let compression_methods = body.vector(1, "compression methods")?;
        // Extensions are optional (SSL 3.0 era hellos end here).
        let extensions = if body.is_empty() {
            &[][..]
        } else {
            body.vector(2, "extensions")?
        };
        let hello = Self {
            legacy_version,
            cipher_suites,
            compression_methods,
            extensions,
        };
        for extension in hello.extensions() {
            extension?;
        }
        Ok(hello)
    }

    pub fn ciphers(&self) -> impl Iterator<Item = u16> + 'a {
        u16s(self.cipher_suites)
    }

    pub fn extensions(&self) -> Extensions<'a> {
        Extensions {
            reader: Reader::new(self.extensions),
        }
    }

    /// The data of the first extension of type `kind`.
    pub fn extension(&self, kind: u16) -> Option<&'a [u8]> {
        self.extensions()
            .filter_map(Result::ok)
            .find(|(k, _)| *k == kind)
            .map(|(_, data)| data)
    }

    /// The host name of the server_name extension.
    pub fn sni(&self) -> Option<&'a [u8]> {
        let mut r = Reader::new(self.extension(ext::SERVER_NAME)?);
        let mut list = Reader::new(r.vector(2, "server name list").ok()?);
        while !list.is_empty() {
            let kind = list.u8("name type").ok()?;
            let name = list.vector(2, "host name").ok()?;
            if kind == 0 {
                return Some(name);
            }
        }
        None
    }

    /// ALPN protocol names in wire order.
    pub fn alpn(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let list = self
            .extension(ext::ALPN)
            .and_then(|data| Reader::new(data).vector(2, "ALPN list").ok())
            .unwrap_or(&[]);
        let mut r = Reader::new(list);
        core::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            r.vector(1, "ALPN name").ok()
        })
    }

    /// A list extension of 16-bit values (`len_bytes`-byte length prefix).
    fn list16(&self, kind: u16, len_bytes: usize) -> impl Iterator<Item = u16> + 'a {
        let list = self
            .extension(kind)
            .and_then(|data| Reader::new(data).vector(len_bytes, "list").ok())
            .unwrap_or(&[]);
        u16s(list)
    }

    pub fn supported_versions(&self) -> impl Iterator<Item = u16> + 'a {
        self.list16(ext::SUPPORTED_VERSIONS, 1)
    }

    pub fn signature_algorithms(&self) -> impl Iterator<Item = u16> + 'a {
        self.list16(ext::SIGNATURE_ALGORITHMS, 2)
    }

    pub fn supported_groups(&self) -> impl Iterator<Item = u16> + 'a {
        self.list16(ext::SUPPORTED_GROUPS, 2)
    }

    pub fn ec_point_formats(&self) -> impl Iterator<Item = u8> + 'a {
        self.extension(ext::EC_POINT_FORMATS)
            .and_then(|data| Reader::new(data).vector(1, "point formats").ok())
            .unwrap_or(&[])
            .iter()
            .copied()
    }
}

/// What a ServerHello settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHello {
    pub legacy_version: u16,
    pub cipher_suite: u16,
    /// From supported_versions (TLS 1.3), if present.
    pub selected_version: Option<u16>,
}

impl ServerHello {
    /// The negotiated version: supported_versions if present, else the
    /// legacy field.
    pub fn version(&self) -> u16 {
        self.selected_version.unwrap_or(self.legacy_version)
    }

    pub fn parse(message: &[u8]) -> Result<Self, TlsError> {
        let mut r = Reader::new(message);
        let kind = r.u8("handshake type")?;
        if kind != HANDSHAKE_SERVER_HELLO {
            return Err(TlsError::WrongType(kind));
        }
        let len = r.u24("handshake length")?;
        let mut body = Reader::new(r.take(len, "ServerHello body")?);
        let legacy_version = body.u16("legacy_version")?;
        body.take(32, "random")?;
        body.vector(1, "session id")?;
        let cipher_suite = body.u16("cipher suite")?;
        body.u8("compression method")?;
        let mut selected_version = None;
        if !body.is_empty() {
            let mut exts = Extensions {
                reader: Reader::new(body.vector(2, "extensions")?),
            };
            for extension in &mut exts {
                let (kind, data) = extension?;
                if kind == ext::SUPPORTED_VERSIONS && data.len() == 2 {
                    selected_version = Some(u16::from_be_bytes([data[0], data[1]]));
                }
            }
        }
        Ok(Self {
            legacy_version,
            cipher_suite,
            selected_version,
        })
    }
}

/// Handshake bytes of a stream of TLS records: the payloads of the leading
/// handshake records, concatenated, up to `out`'s size. Returns the bytes
/// written and whether a whole first handshake message is among them.
pub fn handshake_bytes(records: &[u8], out: &mut [u8]) -> (usize, bool) {
    let mut r = Reader::new(records);
    let mut written = 0;
    while let (Ok(kind), Ok(_version)) = (r.u8("type"), r.u16("version")) {
        if kind != CONTENT_TYPE_HANDSHAKE {
            break;
        }
        let Ok(len) = r.u16("length") else { break };
        let available = r.bytes.len().min(usize::from(len));
        let Ok(payload) = r.take(available, "payload") else {
            break;
        };
        let n = payload.len().min(out.len() - written);
        out[written..written + n].copy_from_slice(&payload[..n]);
        written += n;
        if available < usize::from(len) || written == out.len() {
            break;
        }
    }
    let complete = written >= 4 && {
        let len = usize::from(out[1]) << 16 | usize::from(out[2]) << 8 | usize::from(out[3]);
        written >= 4 + len
    };
    (written, complete)
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
