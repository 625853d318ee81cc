//! The embedded S3-protocol store: a local directory served over HTTP with
//! static SigV4 credentials, through `s3s` (protocol, signature checks) and
//! `s3s-fs` (one sub-directory of the root per bucket, objects as files).
//!
//! It answers path-style requests (`http://addr/bucket/key`), which is what
//! [`super::ObjectStoreConfig::local`] produces. `cph up` and the tests run
//! it in-process with [`serve`]; `cph-agent object-store` runs it alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::ObjectStoreConfig;

/// How long shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("object store root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object store root {path} cannot be served: {detail}")]
    Backend { path: PathBuf, detail: String },
    #[error("object store listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("object store credentials: {0}")]
    Credentials(&'static str),
    #[error("invalid bucket name {0}")]
    Bucket(String),
    #[error("object store server task failed: {0}")]
    Task(String),
}

/// A running embedded store. Dropping it stops the server abruptly; call
/// [`EmbeddedStore::shutdown`] to let requests in progress end.
pub struct EmbeddedStore {
    addr: SocketAddr,
    root: PathBuf,
    ak: String,
    sk: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Serves `root` (created if missing) on `listener` with the static
/// credentials `ak`/`sk`. Returns once the server is accepting.
pub async fn serve(
    root: PathBuf,
    listener: TcpListener,
    ak: String,
    sk: String,
) -> Result<EmbeddedStore, ServerError> {
    if ak.is_empty() || sk.is_empty() {
        return Err(ServerError::Credentials("ak and sk must both be set"));
    }
    std::fs::create_dir_all(&root).map_err(|source| ServerError::Root {
        path: root.clone(),
        source,
    })?;
    let fs = s3s_fs::FileSystem::new(&root).map_err(|e| ServerError::Backend {
        path: root.clone(),
        detail: format!("{e:?}"),
    })?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ak.clone(), sk.clone()));
    let service = builder.build();
    let addr = listener.local_addr().map_err(ServerError::Listener)?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let http = hyper::server::conn::http1::Builder::new();
        let graceful = GracefulShutdown::new();
        loop {
            let socket = tokio::select! {
                r = listener.accept() => match r {
                    Ok((socket, _)) => socket,
                    Err(e) => {
                        tracing::warn!(error = %e, "object store accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => break,
            };
            let _ = socket.set_nodelay(true);
            let conn = http.serve_connection(TokioIo::new(socket), service.clone());
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "object store connection");
                }
            });
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("object store shutdown: requests still running after the grace period");
        }
    });
    tracing::info!(%addr, root = %root.display(), "embedded object store serving");
    Ok(EmbeddedStore {
        addr,
        root,
        ak,
        sk,
        stop: Some(stop),
        task: Some(task),
    })
}

impl EmbeddedStore {
    /// Binds `listen` and serves `root` there.
    pub async fn start(
        root: PathBuf,
        listen: SocketAddr,
        ak: String,
        sk: String,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(ServerError::Listener)?;
        serve(root, listener, ak, sk).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, the endpoint clients use.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A client configuration for this store (path style, its credentials).
    pub fn client_config(&self) -> ObjectStoreConfig {
        ObjectStoreConfig::local(self.endpoint(), self.ak.clone(), self.sk.clone())
    }

    /// Creates a bucket directly in the root (no request), as `cph up` does
    /// for the buckets it needs.
    pub fn ensure_bucket(&self, bucket: &str) -> Result<(), ServerError> {
        if !super::url::valid_bucket(bucket) {
            return Err(ServerError::Bucket(bucket.to_string()));
        }
        let path = self.root.join(bucket);
        std::fs::create_dir_all(&path).map_err(|source| ServerError::Root { path, source })
    }

    /// Stops accepting, lets requests in progress end (up to
    /// [`SHUTDOWN_GRACE`]) and returns.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| ServerError::Task(e.to_string())),
            None => Ok(()),
        }
    }

    /// Runs until the server task ends (it only ends by shutdown).
    pub async fn wait(mut self) -> Result<(), ServerError> {
        match self.task.take() {
            Some(task) => task.await.map_err(|e| ServerError::Task(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves `root` on `listen` until SIGINT or SIGTERM, creating `buckets`
/// first: the `cph-agent object-store` command.
pub async fn run_until_signal(
    root: PathBuf,
    listen: SocketAddr,
    ak: String,
    sk: String,
    buckets: &[String],
) -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Listener)?;
    let store = EmbeddedStore::start(root, listen, ak, sk).await?;
    for bucket in buckets {
        store.ensure_bucket(bucket)?;
    }
    println!(
        "object store serving {} at {}",
        store.root().display(),
        store.endpoint()
    );
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("object store stopping");
    store.shutdown().await
}
