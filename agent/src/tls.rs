//! HTTP over TLS. Serving: a rustls acceptor (ring) for PEM files, and a
//! listener that hands axum connections whose handshake is done, used by
//! the CPH API (`cph serve --tls-cert`) and the agent protocol (`tls_cert`
//! in the agent's configuration). Calling: the HTTP client of one side for
//! the other, trusting a certificate of the platform's own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS acceptor (TLS 1.2 and 1.3, HTTP/1.1) for `files`; the error names
/// the file at fault.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
        format!("{what} {}: {e}", path.display())
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read("certificate", &files.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read("certificate", &files.cert, &e))?;
    if certs.is_empty() {
        return Err(read(
            "certificate",
            &files.cert,
            &"no certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| read("private key", &files.key, &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A certificate (PEM file) to trust; the error names the file.
pub fn trusted(path: &Path) -> Result<reqwest::Certificate, String> {
    let bad = |e: &dyn std::fmt::Display| format!("certificate {}: {e}", path.display());
    let pem = std::fs::read(path).map_err(|e| bad(&e))?;
    reqwest::Certificate::from_pem(&pem).map_err(|e| bad(&e))
}

/// An HTTP client of `url` trusting `ca` beside the system's roots, which
/// are read only for an `https` URL (reading them takes a while on slow
/// root filesystems).
pub fn http_client(
    url: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .tls_built_in_root_certs(url.starts_with("https://"));
    if let Some(path) = ca {
        builder = builder.add_root_certificate(trusted(path)?);
    }
    builder
        .build()
        .map_err(|e| format!("http client of {url}: {e}"))
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Connections of a TCP listener after their TLS handshake. Handshakes run
/// on tasks of their own, so a slow client never holds up the others; a
/// failed one is logged and dropped.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: back off, go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task only ends with the listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
