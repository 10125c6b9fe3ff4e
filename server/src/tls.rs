//! TLS for both ports (rustls with the `ring` provider): loading the PEM files named by `--tls-cert`, `--tls-key`
//! and `--tls-client-ca` into a [`rustls::ServerConfig`], a [`TlsListener`] that axum serves like a TCP listener,
//! and a client-side [`tls_channel`] (tonic over tokio-rustls) for `r1-serve ask` and the tests.
//!
//! The gRPC port is served by axum (tonic `Routes` turned into an axum router, see [`crate::server`]), so TLS is
//! terminated here, in front of both routers, rather than by tonic's own transport server. Handshakes run in their
//! own tasks with a timeout, so a client that connects and sends nothing cannot hold up other connections.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of the server's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (`--tls-cert`), leaf first.
    pub cert: PathBuf,
    /// Private key (`--tls-key`): PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (`--tls-client-ca`); set means client certificates are
    /// required on both ports.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS settings could not be loaded. Each message names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{flag} {path}: cannot read the file: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file holds no usable PEM item of the expected kind.
    #[error("{flag} {path}: {message}")]
    Pem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination (key does not match the certificate, unusable CA, ...).
    #[error("TLS settings refused ({what}): {message}")]
    Rejected {
        /// Which part (`--tls-cert/--tls-key`, `--tls-client-ca`).
        what: &'static str,
        /// rustls' message.
        message: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.into(), source })
}

/// Every certificate in a PEM file; an error naming flag and path when there is none or one is malformed.
pub fn load_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(flag, path)?;
    let pem_err = |message: String| TlsError::Pem { flag, path: path.into(), message };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("holds no PEM `CERTIFICATE` block".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        flag,
        path: path.into(),
        message: format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

fn root_store(flag: &'static str, path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in load_certs(flag, path)?.into_iter().enumerate() {
        roots.add(c).map_err(|e| TlsError::Pem {
            flag,
            path: path.into(),
            message: format!("certificate #{i} is not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The server-side rustls configuration (ALPN `h2` and `http/1.1`, so gRPC and HTTP/1.1 clients both work).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs("--tls-cert", &files.cert)?;
    let key = load_key("--tls-key", &files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected { what: "protocol versions", message: e.to_string() })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = root_store("--tls-client-ca", ca)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Rejected { what: "--tls-client-ca", message: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rejected { what: "--tls-cert/--tls-key", message: e.to_string() })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A listener whose connections are TLS streams: one task accepts TCP connections and hands each to its own
/// handshake task; finished handshakes come out of [`axum::serve::Listener::accept`]. Failed handshakes (plain-text
/// clients, unknown client certificates, timeouts) are logged at debug level and dropped.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` with `config`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // TCP_NODELAY: without it Nagle + delayed ACKs hold streamed tokens back for ~40 ms.
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, rx, task })
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("local", &self.local).finish_non_exhaustive()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when the listener is dropped; never resolve after that.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Client-side TLS settings: trust `ca` (PEM), and present `identity` (certificate chain PEM, key PEM) if given.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store("--tls-ca", ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected { what: "protocol versions", message: e.to_string() })?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("--tls-client-cert", cert)?, load_key("--tls-client-key", key)?)
            .map_err(|e| TlsError::Rejected { what: "client certificate/key", message: e.to_string() })?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A tonic channel to `url` (`https://host:port`) over TLS with `config`; the server name checked against the
/// certificate is `url`'s host. TLS is done by this connector, so the endpoint is given to tonic as `http://`
/// (tonic would otherwise insist on its own TLS layer whenever one of its `tls-*` features is enabled).
pub async fn tls_channel(
    url: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let plain = match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(plain)?;
    let connector = TlsConnector::from(config);
    endpoint
        .connect_with_connector(tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let connector = connector.clone();
            async move {
                let host = uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_string();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}
