//! The embedded S3-protocol store: a local directory served over HTTP with
//! static SigV4 credentials, through `s3s` (protocol, signature checks) and
//! `s3s-fs` (one sub-directory of the root per bucket, objects as files).
//!
//! Reads are served by [`Backend`]: `s3s-fs` for everything, except that an
//! object's bytes are read in 4 MiB pieces straight into the buffers that
//! are sent, at once when the page cache holds them ([`FileChunks`]),
//! rather than in `s3s-fs`'s 4 KiB reads (each a trip through tokio's
//! blocking pool; 150 MB/s on this hardware).
//!
//! It answers path-style requests (`http://addr/bucket/key`), which is what
//! [`super::ObjectStoreConfig::local`] produces. `cph up` and the tests run
//! it in-process with [`serve`]; `cph-agent object-store` runs it alone.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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

/// Bytes of an object read at once when it is served: the client's range
/// (`range_bytes`) by default. Against 1 MiB pieces, a GB served from the
/// page cache took 400-430 ms of the server's CPU instead of 450-480.
const READ_CHUNK: usize = 4 << 20;

/// `s3s-fs` with a faster object read, and ETags of objects put into the
/// directory by hand computed once ([`super::etag`]).
struct Backend {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
    /// Taken while an object's ETag is checked or computed.
    etags: Arc<super::etag::Locks>,
}

/// The S3 operations: those named pass through to `s3s-fs`, those of an
/// open multipart upload once [`Backend::upload_exists`] finds it;
/// `get_object` and `head_object` are [`Backend`]'s. (A macro around the
/// whole impl, since `async_trait` must see the methods it rewrites.)
macro_rules! s3_impl {
    (
        $($op:ident: $input:ident => $output:ident),* $(,)?;
        upload: $($up:ident: $up_input:ident => $up_output:ident),* $(,)?
    ) => {
        #[async_trait::async_trait]
        impl s3s::S3 for Backend {
            $(
                async fn $op(
                    &self,
                    req: s3s::S3Request<s3s::dto::$input>,
                ) -> s3s::S3Result<s3s::S3Response<s3s::dto::$output>> {
                    self.fs.$op(req).await
                }
            )*

            $(
                async fn $up(
                    &self,
                    req: s3s::S3Request<s3s::dto::$up_input>,
                ) -> s3s::S3Result<s3s::S3Response<s3s::dto::$up_output>> {
                    self.upload_exists(&req.input.upload_id)?;
                    self.fs.$up(req).await
                }
            )*

            async fn get_object(
                &self,
                req: s3s::S3Request<s3s::dto::GetObjectInput>,
            ) -> s3s::S3Result<s3s::S3Response<s3s::dto::GetObjectOutput>> {
                Backend::get_object(self, req).await
            }

            async fn head_object(
                &self,
                req: s3s::S3Request<s3s::dto::HeadObjectInput>,
            ) -> s3s::S3Result<s3s::S3Response<s3s::dto::HeadObjectOutput>> {
                Backend::head_object(self, req).await
            }
        }
    };
}

s3_impl!(
    create_bucket: CreateBucketInput => CreateBucketOutput,
    copy_object: CopyObjectInput => CopyObjectOutput,
    delete_bucket: DeleteBucketInput => DeleteBucketOutput,
    delete_object: DeleteObjectInput => DeleteObjectOutput,
    delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
    get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
    head_bucket: HeadBucketInput => HeadBucketOutput,
    list_buckets: ListBucketsInput => ListBucketsOutput,
    list_objects: ListObjectsInput => ListObjectsOutput,
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
    put_object: PutObjectInput => PutObjectOutput,
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput;
    upload:
    upload_part: UploadPartInput => UploadPartOutput,
    list_parts: ListPartsInput => ListPartsOutput,
    complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
);

impl Backend {
    /// An upload id the store does not hold (completed, aborted, never
    /// made) is `NoSuchUpload`, as S3 answers (`s3s-fs` answers
    /// `AccessDenied`): a client whose completion's answer was lost tells
    /// by it that its retry came after the completion.
    fn upload_exists(&self, upload_id: &str) -> s3s::S3Result<()> {
        // `s3s-fs` keeps an upload's owner in `.upload-<id>.json` at the
        // root while it is open.
        let known = uuid_like(upload_id)
            && self
                .root
                .join(format!(".upload-{upload_id}.json"))
                .is_file();
        if known {
            Ok(())
        } else {
            Err(s3s::s3_error!(
                NoSuchUpload,
                "the upload does not exist: it was completed or aborted"
            ))
        }
    }

    /// Stores the ETag of `key` in `bucket` when `s3s-fs` has none.
    async fn e_tag(&self, bucket: &str, key: &str) -> s3s::S3Result<()> {
        let (root, locks) = (self.root.clone(), self.etags.clone());
        let (b, k) = (bucket.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || locks.ensure(&root, &b, &k))
            .await
            .map_err(|e| s3s::s3_error!(InternalError, "etag task: {e}"))?
            .map(|computed| {
                if computed {
                    tracing::debug!(%bucket, %key, "etag of an object put by hand stored");
                }
            })
            .map_err(|e| s3s::s3_error!(e, InternalError))
    }

    /// The ETag made sure of, then `s3s-fs` answers with `If-Match`
    /// checked.
    async fn head_object(
        &self,
        req: s3s::S3Request<s3s::dto::HeadObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::HeadObjectOutput>> {
        use s3s::S3;
        self.e_tag(&req.input.bucket, &req.input.key).await?;
        let if_match = req.input.if_match.clone();
        let resp = self.fs.head_object(req).await?;
        check_if_match(if_match.as_ref(), resp.output.e_tag.as_ref())?;
        Ok(resp)
    }

    /// As [`Backend::head_object`], `s3s-fs` answering (checks, headers,
    /// range, ETag); the body is then read again from the same file in
    /// large chunks.
    async fn get_object(
        &self,
        req: s3s::S3Request<s3s::dto::GetObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::GetObjectOutput>> {
        use s3s::S3;
        self.e_tag(&req.input.bucket, &req.input.key).await?;
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        let if_match = req.input.if_match.clone();
        let mut resp = self.fs.get_object(req).await?;
        check_if_match(if_match.as_ref(), resp.output.e_tag.as_ref())?;
        let len = resp.output.content_length.unwrap_or(0).max(0) as u64;
        // `bytes first-last/size` when a range was asked.
        let start = resp
            .output
            .content_range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes "))
            .and_then(|r| r.split('-').next())
            .and_then(|first| first.parse::<u64>().ok())
            .unwrap_or(0);
        let file = tokio::task::spawn_blocking(move || std::fs::File::open(path))
            .await
            .map_err(|e| s3s::s3_error!(InternalError, "open task: {e}"))?
            .map_err(|e| s3s::s3_error!(e, NoSuchKey))?;
        let body = FileChunks::new(file, start, len);
        resp.output.body = Some(s3s::dto::StreamingBlob::wrap(body));
        Ok(resp)
    }
}

/// An upload id as `s3s-fs` makes them (a UUID: hex digits and dashes), so
/// it names no other file.
fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// `If-Match` on a read, which `s3s-fs` does not check: the object's ETag
/// must be the one given (or the object merely exist, for `*`). A client
/// reading an object in ranges sends the ETag of its first answer, so a
/// replaced object fails the read rather than mixing two versions.
fn check_if_match(
    cond: Option<&s3s::dto::ETagCondition>,
    e_tag: Option<&s3s::dto::ETag>,
) -> s3s::S3Result<()> {
    use s3s::dto::ETagCondition;
    let ok = match cond {
        None | Some(ETagCondition::Any) => true,
        Some(ETagCondition::ETag(want)) => e_tag.is_some_and(|have| have.strong_cmp(want)),
    };
    if ok {
        Ok(())
    } else {
        Err(s3s::s3_error!(
            PreconditionFailed,
            "the object's ETag is no longer the one given in If-Match"
        ))
    }
}

/// `len` bytes of a file from `pos`, in [`READ_CHUNK`] pieces, each read
/// straight into the buffer that is sent (no second copy), one piece ahead
/// of the one being sent. A piece the page cache holds is read at once on
/// the server's thread (`preadv2` with `RWF_NOWAIT`, which never waits for
/// the disk); the rest of one it does not hold is read on the blocking
/// pool. Served from the cache, the trip through the blocking pool was a
/// sixth of the server's CPU per GB.
///
/// This is about as cheap as serving over TCP gets here: a bare sender
/// reading 4 MiB pieces and writing them to a loopback socket took
/// 0.36-0.41 CPU-s per cached GB (this server: 0.40-0.43), and one using
/// `sendfile` took more, 0.48-0.50, so hyper writing the body is no loss.
struct FileChunks {
    file: Arc<std::fs::File>,
    /// Where the piece after `next` starts, and the bytes left from there.
    pos: u64,
    left: u64,
    next: Option<Piece>,
}

/// The piece read ahead.
enum Piece {
    Read(std::io::Result<Bytes>),
    Reading(JoinHandle<std::io::Result<Bytes>>),
}

/// Reads into `buf`'s spare capacity at `pos` until it is full (true) or a
/// read without waiting would wait (false, with `nowait`). The end of the
/// file before that is an error: the object is shorter than its size.
fn read_into(
    file: &std::fs::File,
    buf: &mut Vec<u8>,
    pos: u64,
    nowait: bool,
) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    while buf.len() < buf.capacity() {
        let at = (pos + buf.len() as u64) as libc::off_t;
        let spare = buf.spare_capacity_mut();
        let n = if nowait {
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            // SAFETY: one iovec over the vector's spare capacity, which the
            // kernel only writes; the length is set to what it wrote below.
            unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) }
        } else {
            // SAFETY: as above, a plain positioned read.
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not cached, or a kernel, filesystem or emulator without
                // `preadv2` or `RWF_NOWAIT`.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS) if nowait => return Ok(false),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object file shorter than its listed size",
            ));
        }
        // SAFETY: the kernel wrote `n` bytes into the spare capacity.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(true)
}

impl FileChunks {
    fn new(file: std::fs::File, pos: u64, left: u64) -> Self {
        let mut chunks = FileChunks {
            file: Arc::new(file),
            pos,
            left,
            next: None,
        };
        chunks.read_ahead();
        chunks
    }

    /// Reads the next piece, or starts reading it on the blocking pool
    /// where the page cache does not hold it all (keeping what was read).
    fn read_ahead(&mut self) {
        if self.left == 0 {
            return;
        }
        let n = self.left.min(READ_CHUNK as u64) as usize;
        let pos = self.pos;
        self.pos += n as u64;
        self.left -= n as u64;
        let mut buf = Vec::with_capacity(n);
        self.next = Some(match read_into(&self.file, &mut buf, pos, true) {
            Ok(true) => Piece::Read(Ok(Bytes::from(buf))),
            Err(e) => Piece::Read(Err(e)),
            Ok(false) => {
                let file = self.file.clone();
                Piece::Reading(tokio::task::spawn_blocking(move || {
                    read_into(&file, &mut buf, pos, false).map(|_| Bytes::from(buf))
                }))
            }
        });
    }
}

impl futures_core::Stream for FileChunks {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let piece = match self.next.take() {
            None => return Poll::Ready(None),
            Some(Piece::Read(r)) => r,
            Some(Piece::Reading(mut reading)) => match std::pin::Pin::new(&mut reading).poll(cx) {
                Poll::Pending => {
                    self.next = Some(Piece::Reading(reading));
                    return Poll::Pending;
                }
                Poll::Ready(Ok(r)) => r,
                Poll::Ready(Err(e)) => Err(std::io::Error::other(e)),
            },
        };
        // After an error nothing is read ahead, so the stream ends.
        if piece.is_ok() {
            self.read_ahead();
        }
        Poll::Ready(Some(piece))
    }
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
    let mut builder = S3ServiceBuilder::new(Backend {
        fs,
        root: root.clone(),
        etags: Arc::default(),
    });
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
