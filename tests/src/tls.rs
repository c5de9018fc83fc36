//! TLS for the e2e tests: a throwaway PKI made by the test with rcgen (a CA, a server
//! certificate for `api.test`, a client certificate for mutual TLS, and an unrelated CA),
//! written as PEM files to a scratch directory, and a scripted upstream that speaks HTTPS.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::sidecar::Scratch;
use crate::{Reply, Upstream};

/// The name the test server's certificate is issued for.
pub const SERVER_NAME: &str = "api.test";

/// A test CA and what it signed, as PEM files (paths for the sidecar's YAML) and as DER (for
/// the test's own TLS server).
#[derive(Debug)]
pub struct Pki {
    /// The CA that issued the server and client certificates.
    pub ca_file: PathBuf,
    /// A CA that issued nothing here: trusting only it must fail.
    pub other_ca_file: PathBuf,
    /// A client certificate for mutual TLS, and its key.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// A private key that belongs to no certificate here.
    pub stray_key_file: PathBuf,
    /// The server certificate (for `SERVER_NAME` and `localhost`) and its key, as PEM files,
    /// for servers the tests start from Debian packages.
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    ca: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    _dir: Scratch,
}

impl Pki {
    pub fn new() -> Self {
        let dir = Scratch::new();
        let (ca_cert, issuer) = new_ca("outrigger test CA");
        let (other_ca, other_issuer) = new_ca("an unrelated CA");

        let server_key = KeyPair::generate().expect("a key");
        let names = vec![SERVER_NAME.to_owned(), "localhost".to_owned()];
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = params.signed_by(&server_key, &issuer).expect("the server certificate");

        let client_key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(vec!["checkout.test".to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, "checkout");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = params.signed_by(&client_key, &issuer).expect("the client certificate");

        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        Self {
            ca_file: write("ca.pem", ca_cert.pem()),
            other_ca_file: write("other-ca.pem", other_ca.pem()),
            client_cert_file: write("client.pem", client.pem()),
            client_key_file: write("client.key", client_key.serialize_pem()),
            stray_key_file: write("stray.key", other_issuer.key().serialize_pem()),
            server_cert_file: write("server.pem", server.pem()),
            server_key_file: write("server.key", server_key.serialize_pem()),
            ca: ca_cert.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            _dir: dir,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A self-signed CA certificate and the issuer that signs with its key.
fn new_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("a CA certificate");
    (cert, Issuer::new(params, key))
}

/// How the test's TLS server behaves.
#[derive(Debug, Clone)]
pub struct TlsServer {
    alpn: Vec<Vec<u8>>,
    client_cert_required: bool,
}

impl TlsServer {
    /// Offers h2 and http/1.1 in ALPN and asks for no client certificate.
    pub fn new() -> Self {
        Self { alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()], client_cert_required: false }
    }

    /// Only http/1.1 in ALPN: a client that offers only h2 fails the handshake.
    pub fn http1_only(mut self) -> Self {
        self.alpn = vec![b"http/1.1".to_vec()];
        self
    }

    /// Refuses a client without a certificate from the test CA (mutual TLS).
    pub fn requiring_client_cert(mut self) -> Self {
        self.client_cert_required = true;
        self
    }

    pub(crate) fn acceptor(&self, pki: &Pki) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3");
        let builder = if self.client_cert_required {
            let mut roots = RootCertStore::empty();
            roots.add(pki.ca.clone()).expect("the test CA");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone()));
        let mut config =
            builder.with_single_cert(pki.server_chain.clone(), key).expect("the server's key");
        config.alpn_protocols = self.alpn.clone();
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Default for TlsServer {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    /// A scripted upstream that speaks HTTPS with `pki`'s server certificate.
    pub async fn scripted_tls(
        replies: impl IntoIterator<Item = Reply>,
        pki: &Pki,
        server: TlsServer,
    ) -> Self {
        let script: Vec<Reply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        Self::serve(([127, 0, 0, 1], 0).into(), script, Some(server.acceptor(pki))).await
    }
}
