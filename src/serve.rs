//! `cph serve`: opens the data dir's store, loads the catalog, starts the
//! dispatch loop and serves the API, over TLS when given a certificate,
//! until `shutdown` resolves.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{router, AppState};
use crate::catalog::{Catalog, CatalogError, TEST_IMAGE_ID};
use crate::dispatch::{self, Dispatcher, LoopConfig};
use crate::store::{Store, StoreError};

/// Serving failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error("node token file {path}: {source}")]
    NodeToken {
        path: String,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Http(std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// The certificate chain and private key (PEM files) the API is served with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Shared secret of agents; `None` reads (or creates) `data_dir/node-token`.
    pub node_token: Option<String>,
    pub heartbeat_secs: u64,
    /// Missed heartbeats before an agent counts as silent.
    pub silent_after: u64,
    /// Id and URL (`file://` or `obs://`) of the test phone image.
    pub test_image_id: String,
    pub test_image_url: String,
    /// Serve HTTPS with these; plain HTTP when `None`.
    pub tls: Option<TlsFiles>,
}

impl ServeConfig {
    /// Defaults for a data dir.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            node_token: None,
            heartbeat_secs: 10,
            silent_after: 3,
            test_image_id: TEST_IMAGE_ID.to_string(),
            test_image_url: "file:///var/lib/cph/images/cph-test-image.tar.gz".to_string(),
            tls: None,
        }
    }
}

/// The node token of a data dir, created on first use.
pub fn node_token(cfg: &ServeConfig) -> Result<String, ServeError> {
    if let Some(t) = &cfg.node_token {
        return Ok(t.clone());
    }
    let path = cfg.data_dir.join("node-token");
    let err = |source| ServeError::NodeToken {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&cfg.data_dir).map_err(err)?;
            let t = format!("{}{}", crate::store::new_id(), crate::store::new_id());
            std::fs::write(&path, &t).map_err(err)?;
            Ok(t)
        }
        Err(e) => Err(err(e)),
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve<F>(
    cfg: ServeConfig,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let store = Arc::new(Store::open_dir(&cfg.data_dir)?);
    let mut catalog = Catalog::defaults(&cfg.test_image_id, &cfg.test_image_url);
    catalog.extend_from_dir(&cfg.data_dir)?;
    let token = node_token(&cfg)?;
    let dispatcher = Dispatcher::new();
    let state = Arc::new(AppState {
        store: store.clone(),
        catalog,
        dispatcher: dispatcher.clone(),
        node_token: token.clone(),
        heartbeat_secs: cfg.heartbeat_secs,
    });
    let lcfg = LoopConfig {
        node_token: token,
        heartbeat_secs: cfg.heartbeat_secs,
        silent_after: cfg.silent_after,
    };
    let tls = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let worker = tokio::spawn(dispatch::run(store, dispatcher, lcfg));
    if let Ok(addr) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, data_dir = %cfg.data_dir.display(), "control plane listening");
    }
    let r = match tls {
        Some(acceptor) => {
            axum::serve(TlsListener::new(listener, acceptor)?, router(state))
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
    .map_err(ServeError::Http);
    worker.abort();
    r
}

/// A TLS acceptor for the PEM certificate chain and key of `files`.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
        ServeError::Tls(format!("{what} {}: {e}", path.display()))
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
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections of a TCP listener after their TLS handshake. Handshakes run
/// on tasks of their own, so a slow client never holds up the others; a
/// failed one is logged and dropped.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> Result<Self, ServeError> {
        let local = listener.local_addr().map_err(ServeError::Http)?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: back off, go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

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

/// Creates a project with one AK/SK credential: `(project_id, ak, sk)`.
pub fn bootstrap_project(
    store: &Store,
    name: &str,
) -> Result<(String, String, String), StoreError> {
    let p = match store.project(name)? {
        Some(p) => p,
        None => store.create_project(name)?,
    };
    let (ak, sk) = store.create_credential(&p.project_id)?;
    Ok((p.project_id, ak, sk))
}
