//! TLS origination (`upstreams.NAME.tls`): the app speaks plain HTTP to the sidecar and the
//! sidecar speaks HTTPS to the endpoints, so every policy applies to an HTTPS API too.
//!
//! rustls with the ring provider, TLS 1.2 and 1.3. Trust: only `ca_file` when set, else the
//! system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the OS bundle such as /etc/ssl/certs),
//! read at start: the container's own CA bundle is the one its operators keep current. The
//! verified name and SNI: `server_name`, else the upstream's name (endpoints are addresses, so
//! the name cannot come from them). ALPN offers exactly what the pool will speak: `http/1.1` on
//! the HTTP/1 client, `h2` on the HTTP/2 one, chosen per request as on the plain path. A failed
//! handshake is a failed connect (502 `connect-failed`, retried as one) whose body says why;
//! `timeouts.connect` bounds the TCP connect and the handshake together.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use outrigger_config as config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::error::BoxError;

/// Why an upstream's TLS settings cannot be used: the sidecar does not start with them.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {}: {source}", file.display())]
    Read {
        field: String,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{field}: {}: {reason}", file.display())]
    Invalid { field: String, file: PathBuf, reason: String },
    #[error("{field}: no trusted CA: the system has no root certificates{reason}; set ca_file")]
    NoRoots { field: String, reason: String },
    #[error("{field}: {reason}")]
    Refused { field: String, reason: String },
}

/// Loads every TLS upstream's files, so that a missing or broken one stops the start with
/// its field and file named, rather than failing each request later.
pub fn check(upstreams: &config::Upstreams) -> Result<(), TlsError> {
    for upstream in upstreams {
        if let Some(tls) = &upstream.tls {
            Loaded::load(upstream.name.as_str(), tls)?;
        }
    }
    Ok(())
}

/// One upstream's TLS settings, loaded; what its two pools' connectors are made from.
#[derive(Debug, Clone)]
pub(crate) struct Origination {
    /// `Err`: the settings stopped loading after `check` passed (a file changed in between):
    /// every connect then fails with this reason, as a connect failure.
    loaded: Result<Loaded, Arc<str>>,
}

#[derive(Debug, Clone)]
struct Loaded {
    /// Without ALPN: each connector sets its own.
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Origination {
    pub(crate) fn new(upstream: &str, tls: &config::Tls) -> Self {
        let loaded = Loaded::load(upstream, tls).map_err(|err| {
            tracing::error!(upstream, error = %err, "tls settings unusable: every connect fails");
            Arc::from(err.to_string())
        });
        Self { loaded }
    }

    /// The connector of one pool: `http2` offers `h2` in ALPN, otherwise `http/1.1`.
    pub(crate) fn connector(
        &self,
        mut http: HttpConnector,
        connect_timeout: Duration,
        http2: bool,
    ) -> TlsConnector {
        let inner = self.loaded.as_ref().map_err(Clone::clone).map(|loaded| {
            let mut config = ClientConfig::clone(&loaded.config);
            config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
            // HttpConnector refuses https URIs unless told a TLS layer sits on top of it
            http.enforce_http(false);
            let name = Arc::new(FixedServerNameResolver::new(loaded.server_name.clone()));
            HttpsConnector::new(http, config, true, name)
        });
        TlsConnector { inner, timeout: connect_timeout }
    }
}

impl Loaded {
    fn load(upstream: &str, tls: &config::Tls) -> Result<Self, TlsError> {
        let section = format!("upstreams.{upstream}.tls");
        let field = |name: &str| format!("{section}.{name}");
        let builder = verifying(&section, tls.ca_file.as_deref())?;
        let config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = certificates(&field("cert_file"), cert_file)?;
                let key = private_key(&field("key_file"), key_file)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::Refused {
                    field: field("key_file"),
                    reason: format!("cannot be used with cert_file: {e}"),
                })?
            }
            // validation pairs the two: neither is set
            _ => builder.with_no_client_auth(),
        };
        let name = tls.server_name.as_deref().unwrap_or(upstream);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| TlsError::Refused {
            field: field("server_name"),
            reason: format!("{name:?} cannot be a TLS server name: {e}"),
        })?;
        Ok(Self { config: Arc::new(config), server_name })
    }
}

/// A client configuration, without a client certificate, that verifies servers against
/// `ca_file` (else the system's roots); `section` names the settings in errors. For
/// Outrigger's own calls (the OTLP collector); rustls with ring, TLS 1.2 and 1.3.
pub(crate) fn client_config(
    section: &str,
    ca_file: Option<&Path>,
) -> Result<ClientConfig, TlsError> {
    Ok(verifying(section, ca_file)?.with_no_client_auth())
}

/// A client configuration that trusts no server: for a connector that only ever speaks plain
/// HTTP (hyper-rustls wants one all the same).
pub(crate) fn plain_only() -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// The configuration so far: ring, TLS 1.2 and 1.3, the trusted roots.
fn verifying(
    section: &str,
    ca_file: Option<&Path>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let roots = match ca_file {
        Some(file) => trusted_cas(&format!("{section}.ca_file"), file)?,
        None => system_roots(section)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused { field: section.to_owned(), reason: e.to_string() })?
        .with_root_certificates(roots))
}

fn read(field: &str, file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read {
        field: field.to_owned(),
        file: file.to_owned(),
        source,
    })
}

fn invalid(field: &str, file: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid { field: field.to_owned(), file: file.to_owned(), reason: reason.into() }
}

/// Every certificate of a PEM file; at least one.
fn certificates(field: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, file, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            field,
            file,
            "holds no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn trusted_cas(field: &str, file: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (n, cert) in certificates(field, file)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            invalid(field, file, format!("certificate {} cannot be trusted: {e}", n + 1))
        })?;
    }
    Ok(roots)
}

fn private_key(field: &str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(field, file)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let reason = format!(
            "holds no usable private key (expected PEM PKCS#8, PKCS#1 or SEC1, such as -----BEGIN PRIVATE KEY-----): {e}"
        );
        invalid(field, file, reason)
    })
}

fn system_roots(field: &str) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, errors = found.errors.len(), "system root certificates");
    if roots.is_empty() {
        let reason: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        let reason =
            if reason.is_empty() { String::new() } else { format!(" ({})", reason.join("; ")) };
        return Err(TlsError::NoRoots { field: field.to_owned(), reason });
    }
    Ok(roots)
}

/// Dials an endpoint and runs the TLS handshake, both within `timeouts.connect`; a failure is
/// the connector's error, which hyper's client reports as a connect error.
#[derive(Debug, Clone)]
pub(crate) struct TlsConnector {
    inner: Result<HttpsConnector<HttpConnector>, Arc<str>>,
    timeout: Duration,
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.inner {
            Ok(https) => https.poll_ready(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let connecting = match &mut self.inner {
            Ok(https) => https.call(uri),
            Err(reason) => {
                let reason = reason.to_string();
                return Box::pin(async move { Err(reason.into()) });
            }
        };
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(format!("no TLS connection within {timeout:?}").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in a directory of its own, removed when the returned guard drops.
    fn file(name: &str, text: &str) -> (PathBuf, Removed) {
        let dir = std::env::temp_dir().join(format!("outrigger-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        (path, Removed(dir))
    }

    struct Removed(PathBuf);

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load(tls: config::Tls) -> String {
        Loaded::load("payments", &tls).unwrap_err().to_string()
    }

    #[test]
    fn a_missing_file_is_named_with_its_field() {
        let missing = PathBuf::from("/nonexistent/outrigger/ca.pem");
        let err = load(config::Tls { ca_file: Some(missing), ..Default::default() });
        assert!(
            err.starts_with(
                "upstreams.payments.tls.ca_file: cannot read /nonexistent/outrigger/ca.pem: "
            ),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let (path, _dir) = file("empty-ca.pem", "not a certificate\n");
        let err = load(config::Tls { ca_file: Some(path.clone()), ..Default::default() });
        assert_eq!(
            err,
            format!(
                "upstreams.payments.tls.ca_file: {}: holds no certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            )
        );
    }

    #[test]
    fn a_certificate_that_is_not_der_inside_its_pem_is_refused() {
        let pem = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let (path, _dir) = file("bad-ca.pem", pem);
        let err = load(config::Tls { ca_file: Some(path), ..Default::default() });
        assert!(err.contains("certificate 1 cannot be trusted"), "{err}");
    }

    #[test]
    fn a_key_file_without_a_key_is_refused_after_the_certificate_is_read() {
        let pem = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let (cert, _cert_dir) = file("client.pem", pem);
        let (key, _key_dir) = file("client.key", pem);
        // system roots: the trust side must load for the key to be reached
        let err = load(config::Tls {
            cert_file: Some(cert),
            key_file: Some(key.clone()),
            ..Default::default()
        });
        if err.contains("no trusted CA") {
            return; // a machine without system roots stops earlier; covered by the next test
        }
        assert!(
            err.starts_with(&format!(
                "upstreams.payments.tls.key_file: {}: holds no usable private key",
                key.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn without_roots_the_error_says_to_set_ca_file() {
        let err = TlsError::NoRoots { field: "upstreams.p.tls".into(), reason: String::new() };
        assert_eq!(
            err.to_string(),
            "upstreams.p.tls: no trusted CA: the system has no root certificates; set ca_file"
        );
    }

    #[tokio::test]
    async fn settings_that_stopped_loading_fail_every_connect_with_their_reason() {
        let missing = PathBuf::from("/nonexistent/outrigger/ca.pem");
        let tls = config::Tls { ca_file: Some(missing), ..Default::default() };
        let origination = Origination::new("payments", &tls);
        let mut connector =
            origination.connector(HttpConnector::new(), Duration::from_secs(1), false);
        let err = tower::Service::call(&mut connector, Uri::from_static("https://127.0.0.1:9/"))
            .await
            .expect_err("no connection without settings");
        assert!(err.to_string().contains("tls.ca_file: cannot read"), "{err}");
    }
}
