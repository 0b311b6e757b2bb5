//! TLS client fingerprints from a parsed ClientHello, as their
//! specifications define them: JA4 and JA4_r (FoxIO, BSD-3-Clause spec) and
//! JA3 (Salesforce).

use handshake_common::tls::{ClientHello, ext, is_grease};
use md5::{Digest as _, Md5};
use sha2::Sha256;

/// All fingerprints of one ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprints {
    pub ja4: String,
    pub ja4_r: String,
    pub ja3: String,
    pub ja3_hash: String,
}

impl Fingerprints {
    pub fn of(hello: &ClientHello<'_>) -> Self {
        let ja3 = ja3(hello);
        let mut ja3_hash = String::with_capacity(32);
        push_hex_bytes(&mut ja3_hash, &Md5::digest(ja3.as_bytes()));
        let (ja4, ja4_r) = ja4(hello);
        Self {
            ja4,
            ja4_r,
            ja3,
            ja3_hash,
        }
    }
}

// The daemon fingerprints every ClientHello it sees, so the strings are
// built by hand, digit by digit into one buffer each, rather than through
// `format!` and a `String` per value (that was most of the daemon's CPU per
// TLS handshake: `cargo xtask bench -- fingerprint`).

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex16(out: &mut String, value: u16) {
    for shift in [12, 8, 4, 0] {
        out.push(char::from(HEX[usize::from((value >> shift) & 0xf)]));
    }
}

fn push_hex_bytes(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

fn push_decimal(out: &mut String, value: u16) {
    let mut digits = [0u8; 5];
    let (mut rest, mut start) = (value, digits.len());
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for d in &digits[start..] {
        out.push(char::from(*d));
    }
}

/// Two decimal digits of `count`, capped at 99, as JA4 writes counts.
fn push_count(out: &mut String, count: usize) {
    let count = count.min(99) as u8;
    out.push(char::from(b'0' + count / 10));
    out.push(char::from(b'0' + count % 10));
}

/// `values` written as `sep`-joined 4-digit hex (JA4) or decimal (JA3).
fn push_joined(
    out: &mut String,
    values: impl IntoIterator<Item = u16>,
    sep: char,
    write: fn(&mut String, u16),
) {
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(sep);
        }
        write(out, v);
    }
}

/// The TLS version as JA4 writes it.
fn ja4_version(version: u16) -> &'static str {
    match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0002 => "s2",
        0xfeff => "d1",
        0xfefd => "d2",
        0xfefc => "d3",
        _ => "00",
    }
}

/// First and last characters of the first ALPN value; `00` without ALPN.
/// A non-ASCII byte becomes `9`, as the JA4 reference implementation does
/// and as the published fingerprints of its test captures show (a later
/// revision of the written specification uses hex digits instead).
fn push_ja4_alpn(out: &mut String, first: Option<&[u8]>) {
    let Some(alpn) = first.filter(|a| !a.is_empty()) else {
        out.push_str("00");
        return;
    };
    let char_of = |b: u8| if b.is_ascii() { char::from(b) } else { '9' };
    out.push(char_of(alpn[0]));
    out.push(char_of(alpn[alpn.len() - 1]));
}

/// First 12 hex digits of SHA-256, or twelve zeros for an empty input.
fn push_hash12(out: &mut String, text: &str) {
    if text.is_empty() {
        out.push_str("000000000000");
    } else {
        push_hex_bytes(out, &Sha256::digest(text.as_bytes())[..6]);
    }
}

/// (JA4, JA4_r) for TCP.
fn ja4(hello: &ClientHello<'_>) -> (String, String) {
    let version = hello
        .supported_versions()
        .filter(|v| !is_grease(*v))
        .max()
        .unwrap_or(hello.legacy_version);
    let mut ciphers: Vec<u16> = hello.ciphers().filter(|c| !is_grease(*c)).collect();
    let mut extensions: Vec<u16> = hello
        .extensions()
        .filter_map(Result::ok)
        .map(|(kind, _)| kind)
        .filter(|k| !is_grease(*k))
        .collect();
    let mut a = String::with_capacity(10);
    a.push('t');
    a.push_str(ja4_version(version));
    a.push(if hello.sni().is_some() { 'd' } else { 'i' });
    push_count(&mut a, ciphers.len());
    push_count(&mut a, extensions.len());
    push_ja4_alpn(&mut a, hello.alpn().next());

    ciphers.sort_unstable();
    extensions.retain(|k| *k != ext::SERVER_NAME && *k != ext::ALPN);
    extensions.sort_unstable();
    let mut b_raw = String::with_capacity(ciphers.len() * 5);
    push_joined(&mut b_raw, ciphers, ',', push_hex16);
    let mut c_raw = String::with_capacity((extensions.len() + 16) * 5);
    push_joined(&mut c_raw, extensions, ',', push_hex16);
    let mut signatures = hello
        .signature_algorithms()
        .filter(|s| !is_grease(*s))
        .peekable();
    if signatures.peek().is_some() {
        c_raw.push('_');
        push_joined(&mut c_raw, signatures, ',', push_hex16);
    }

    let mut ja4 = String::with_capacity(a.len() + 26);
    ja4.push_str(&a);
    ja4.push('_');
    push_hash12(&mut ja4, &b_raw);
    ja4.push('_');
    push_hash12(&mut ja4, &c_raw);
    let mut ja4_r = a;
    ja4_r.reserve(b_raw.len() + c_raw.len() + 2);
    ja4_r.push('_');
    ja4_r.push_str(&b_raw);
    ja4_r.push('_');
    ja4_r.push_str(&c_raw);
    (ja4, ja4_r)
}

/// `SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats`,
/// decimal, `-`-joined, GREASE left out (point formats are bytes, never
/// GREASE).
fn ja3(hello: &ClientHello<'_>) -> String {
    let mut out = String::with_capacity(256);
    push_decimal(&mut out, hello.legacy_version);
    let fields: [&mut dyn Iterator<Item = u16>; 3] = [
        &mut hello.ciphers(),
        &mut hello.extensions().filter_map(Result::ok).map(|(k, _)| k),
        &mut hello.supported_groups(),
    ];
    for values in fields {
        out.push(',');
        push_joined(
            &mut out,
            values.filter(|v| !is_grease(*v)),
            '-',
            push_decimal,
        );
    }
    out.push(',');
    push_joined(
        &mut out,
        hello.ec_point_formats().map(u16::from),
        '-',
        push_decimal,
    );
    out
}

/// The TLS version as the metrics label it.
pub fn version_name(version: u16) -> &'static str {
    match version {
        0x0304 => "1.3",
        0x0303 => "1.2",
        0x0302 => "1.1",
        0x0301 => "1.0",
        0x0300 => "ssl3",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_characters_follow_the_spec() {
        let alpn = |first: Option<&[u8]>| {
            let mut out = String::new();
            push_ja4_alpn(&mut out, first);
            out
        };
        assert_eq!(alpn(None), "00");
        assert_eq!(alpn(Some(b"h2")), "h2");
        assert_eq!(alpn(Some(b"http/1.1")), "h1");
        assert_eq!(alpn(Some(&[0xba, 0xad])), "99");
        assert_eq!(alpn(Some(&[0xab, b'x'])), "9x");
    }

    #[test]
    fn the_specification_vector() {
        // README of the test data: ciphers sorted, extensions sorted
        // without SNI and ALPN, signature algorithms in wire order.
        let b = "002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9";
        let c = "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601";
        let hash12 = |text: &str| {
            let mut out = String::new();
            push_hash12(&mut out, text);
            out
        };
        assert_eq!(hash12(b), "8daaf6152771");
        assert_eq!(hash12(c), "e5627efa2ab1");
        assert_eq!(hash12(""), "000000000000");
    }

    #[test]
    fn numbers_are_written_as_format_would() {
        for v in [0u16, 7, 10, 99, 100, 771, 4865, 65535, 0x0a0a, 0xff01] {
            let (mut hex, mut dec) = (String::new(), String::new());
            push_hex16(&mut hex, v);
            push_decimal(&mut dec, v);
            assert_eq!(hex, format!("{v:04x}"));
            assert_eq!(dec, v.to_string());
        }
        for n in [0usize, 5, 17, 99, 100, 250] {
            let mut out = String::new();
            push_count(&mut out, n);
            assert_eq!(out, format!("{:02}", n.min(99)));
        }
    }
}
