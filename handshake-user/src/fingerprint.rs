//! TLS client fingerprints from a parsed ClientHello, as their
//! specifications define them: JA4 and JA4_r (FoxIO, BSD-3-Clause spec) and
//! JA3 (Salesforce).

use std::fmt::Write as _;

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
        let ja3_hash = hex(&Md5::digest(ja3.as_bytes()));
        let (ja4, ja4_r) = ja4(hello);
        Self {
            ja4,
            ja4_r,
            ja3,
            ja3_hash,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
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
fn ja4_alpn(first: Option<&[u8]>) -> String {
    let Some(alpn) = first.filter(|a| !a.is_empty()) else {
        return "00".to_owned();
    };
    let char_of = |b: u8| if b.is_ascii() { b as char } else { '9' };
    format!("{}{}", char_of(alpn[0]), char_of(alpn[alpn.len() - 1]))
}

fn list(values: &[u16]) -> String {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v:04x}");
    }
    out
}

/// First 12 hex digits of SHA-256, or twelve zeros for an empty input.
fn hash12(text: &str) -> String {
    if text.is_empty() {
        return "000000000000".to_owned();
    }
    hex(&Sha256::digest(text.as_bytes()))[..12].to_owned()
}

/// (JA4, JA4_r) for TCP.
fn ja4(hello: &ClientHello<'_>) -> (String, String) {
    let version = hello
        .supported_versions()
        .filter(|v| !is_grease(*v))
        .max()
        .unwrap_or(hello.legacy_version);
    let sni = if hello.sni().is_some() { 'd' } else { 'i' };
    let mut ciphers: Vec<u16> = hello.ciphers().filter(|c| !is_grease(*c)).collect();
    let extensions: Vec<u16> = hello
        .extensions()
        .filter_map(Result::ok)
        .map(|(kind, _)| kind)
        .filter(|k| !is_grease(*k))
        .collect();
    let a = format!(
        "t{}{sni}{:02}{:02}{}",
        ja4_version(version),
        ciphers.len().min(99),
        extensions.len().min(99),
        ja4_alpn(hello.alpn().next())
    );
    ciphers.sort_unstable();
    let mut sorted: Vec<u16> = extensions
        .into_iter()
        .filter(|k| *k != ext::SERVER_NAME && *k != ext::ALPN)
        .collect();
    sorted.sort_unstable();
    let signatures: Vec<u16> = hello
        .signature_algorithms()
        .filter(|s| !is_grease(*s))
        .collect();
    let b_raw = list(&ciphers);
    let mut c_raw = list(&sorted);
    if !signatures.is_empty() {
        c_raw.push('_');
        c_raw.push_str(&list(&signatures));
    }
    let ja4 = format!("{a}_{}_{}", hash12(&b_raw), hash12(&c_raw));
    let ja4_r = format!("{a}_{b_raw}_{c_raw}");
    (ja4, ja4_r)
}

/// `SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats`,
/// decimal, `-`-joined, GREASE left out.
fn ja3(hello: &ClientHello<'_>) -> String {
    let join = |values: &mut dyn Iterator<Item = u16>| {
        values
            .filter(|v| !is_grease(*v))
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("-")
    };
    format!(
        "{},{},{},{},{}",
        hello.legacy_version,
        join(&mut hello.ciphers()),
        join(&mut hello.extensions().filter_map(Result::ok).map(|(k, _)| k)),
        join(&mut hello.supported_groups()),
        hello
            .ec_point_formats()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("-")
    )
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
        assert_eq!(ja4_alpn(None), "00");
        assert_eq!(ja4_alpn(Some(b"h2")), "h2");
        assert_eq!(ja4_alpn(Some(b"http/1.1")), "h1");
        assert_eq!(ja4_alpn(Some(&[0xba, 0xad])), "99");
        assert_eq!(ja4_alpn(Some(&[0xab, b'x'])), "9x");
    }

    #[test]
    fn the_specification_vector() {
        // README of the test data: ciphers sorted, extensions sorted
        // without SNI and ALPN, signature algorithms in wire order.
        let b = "002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9";
        let c = "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601";
        assert_eq!(hash12(b), "8daaf6152771");
        assert_eq!(hash12(c), "e5627efa2ab1");
    }
}
