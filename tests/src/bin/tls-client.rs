//! `tls-client ADDR SNI [ALPN...]`: one TLS handshake with rustls (ring
//! provider), then close_notify. Accepts any certificate: it exists to put
//! a rustls ClientHello on the wire for the TLS tests, not to trust anyone.

use std::{io::Write as _, net::TcpStream, sync::Arc};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, Error, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, sni, alpn @ ..] = args.as_slice() else {
        eprintln!("usage: tls-client ADDR SNI [ALPN...]");
        std::process::exit(2);
    };
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let name = ServerName::try_from(sni.clone()).expect("a DNS name for SNI");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
    let mut sock = TcpStream::connect(addr).unwrap_or_else(|e| {
        eprintln!("tls-client: connect {addr}: {e}");
        std::process::exit(1)
    });
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            eprintln!("tls-client: handshake with {addr}: {e}");
            std::process::exit(1);
        }
    }
    println!("{:?}", conn.protocol_version());
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    let _ = sock.flush();
}
