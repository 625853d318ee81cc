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
    #[error("object store: {0}")]
    ObjectStore(String),
}

pub use cph_agent::tls::TlsFiles;

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
    /// A certificate (PEM) trusted for agents served over TLS, beside the
    /// system's roots.
    pub agent_ca: Option<PathBuf>,
    /// The object store custom images are written to (the agents' own),
    /// so deleting an image deletes its object.
    pub object_store: Option<cph_agent::objstore::ObjectStoreConfig>,
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
            agent_ca: None,
            object_store: None,
        }
    }
}

/// The node token of a data dir, created on first use.
/// The `[object_store]` section of a TOML file (the agents' format).
pub fn object_store_config(
    path: &std::path::Path,
) -> Result<cph_agent::objstore::ObjectStoreConfig, ServeError> {
    #[derive(serde::Deserialize)]
    struct File {
        object_store: cph_agent::objstore::ObjectStoreConfig,
    }
    let err = |e: String| ServeError::ObjectStore(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: File = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    Ok(file.object_store)
}

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
    let objects = cfg
        .object_store
        .as_ref()
        .map(cph_agent::objstore::ObjectStore::new)
        .transpose()
        .map_err(|e| ServeError::ObjectStore(e.to_string()))?;
    let loop_catalog = Arc::new(catalog.clone());
    let state = Arc::new(AppState {
        store: store.clone(),
        catalog,
        dispatcher: dispatcher.clone(),
        node_token: token.clone(),
        heartbeat_secs: cfg.heartbeat_secs,
        objects,
    });
    let agent_ca = cfg
        .agent_ca
        .as_deref()
        .map(cph_agent::tls::trusted)
        .transpose()
        .map_err(|e| ServeError::Tls(format!("agents' {e}")))?;
    let lcfg = LoopConfig {
        node_token: token,
        heartbeat_secs: cfg.heartbeat_secs,
        silent_after: cfg.silent_after,
        agent_ca,
    };
    let tls = cfg
        .tls
        .as_ref()
        .map(cph_agent::tls::acceptor)
        .transpose()
        .map_err(ServeError::Tls)?;
    let worker = tokio::spawn(dispatch::run(store, loop_catalog, dispatcher, lcfg));
    if let Ok(addr) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, data_dir = %cfg.data_dir.display(), "control plane listening");
    }
    let r = match tls {
        Some(acceptor) => {
            let listener =
                cph_agent::tls::TlsListener::new(listener, acceptor).map_err(ServeError::Http)?;
            axum::serve(listener, router(state))
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
