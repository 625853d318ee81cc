//! Streaming upload: a synchronous writer feeding a multipart upload.
//!
//! [`ObjectWriter`] fills one part at a time (of the size
//! [`super::TransferConfig::part_size`] gives its number); each full part
//! goes through a channel of `queued_parts` slots to an uploader task that
//! keeps up to `parts_in_flight` UploadPart requests running. The
//! multipart upload is created with the first full part, so an object
//! smaller than one part is a single PUT. Finishing completes the upload;
//! dropping the writer unfinished (or any failure) aborts it, so no partial
//! object appears.
//!
//! A multipart upload holds its parts in the store until it is completed or
//! aborted. One whose abort cannot be sent (the store out of reach) or
//! whose process is killed would hold them for good: with
//! [`ObjectWriter::note_upload_in`] the upload's id is kept in a file while
//! it is open, for [`ObjectStore::abort_noted`] to end it later.

use std::io;
use std::path::{Path, PathBuf};

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::client::ObjectStore;
use super::config::complete_timeout;
use super::error::map_sdk;
use super::{ObjectStoreError, MAX_PARTS};

/// What an upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    pub bytes: u64,
    /// Parts of the multipart upload; 0 for a single PUT.
    pub parts: usize,
}

enum Msg {
    Part(Bytes),
    Finish,
}

/// A synchronous writer that uploads `bucket/key` while it is written.
///
/// `write` blocks when the upload falls behind: use it on a blocking thread
/// (`tokio::task::spawn_blocking`), never inside an async task. Call
/// [`ObjectWriter::finish`] to complete the object; a writer dropped
/// unfinished aborts the upload.
pub struct ObjectWriter {
    store: ObjectStore,
    handle: Handle,
    bucket: String,
    key: String,
    /// Parts sent to the uploader.
    parts: usize,
    buf: Vec<u8>,
    total: u64,
    tx: Option<mpsc::Sender<Msg>>,
    task: Option<JoinHandle<Result<usize, ObjectStoreError>>>,
    /// Where the open multipart upload is noted.
    note: Option<PathBuf>,
}

/// A multipart upload left open, as noted in a file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OpenUpload {
    bucket: String,
    key: String,
    upload_id: String,
}

impl ObjectStore {
    /// A writer for `bucket/key`. Must be called within a tokio runtime (its
    /// uploads run there), then used from a blocking thread.
    pub fn writer(&self, bucket: &str, key: &str) -> Result<ObjectWriter, ObjectStoreError> {
        let handle = Handle::try_current().map_err(|_| ObjectStoreError::NoRuntime)?;
        Ok(ObjectWriter {
            store: self.clone(),
            handle,
            bucket: bucket.to_string(),
            key: key.to_string(),
            parts: 0,
            buf: Vec::new(),
            total: 0,
            tx: None,
            task: None,
            note: None,
        })
    }

    /// Ends a multipart upload noted at `note` by a writer that could not
    /// (see [`ObjectWriter::note_upload_in`]): aborted, or found already
    /// gone; the note is then removed. False when there was no note.
    pub async fn abort_noted(&self, note: &Path) -> Result<bool, ObjectStoreError> {
        let text = match std::fs::read(note) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.note_error(note, &e.to_string())),
        };
        // A note cut short by a crash names no upload that can be ended.
        if let Ok(open) = serde_json::from_slice::<OpenUpload>(&text) {
            self.abort_upload(&open.bucket, &open.key, &open.upload_id)
                .await?;
        }
        std::fs::remove_file(note).map_err(|e| self.note_error(note, &e.to_string()))?;
        Ok(true)
    }

    /// Aborts a multipart upload; one the store no longer holds (completed
    /// or aborted already) is done with as well.
    async fn abort_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), ObjectStoreError> {
        let sent = self
            .inner
            .client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        match sent.map_err(|e| map_sdk(e, &self.ctx("abort multipart upload", bucket, key))) {
            Ok(_) | Err(ObjectStoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn note_error(&self, note: &Path, detail: &str) -> ObjectStoreError {
        ObjectStoreError::Aborted {
            bucket: String::new(),
            key: note.display().to_string(),
            detail: format!("upload note: {detail}"),
        }
    }

    /// Runs `produce` on a blocking thread with a writer to `bucket/key`
    /// (e.g. a tar export) and completes the upload when it returns `Ok`.
    pub async fn upload_with<F>(
        &self,
        bucket: &str,
        key: &str,
        produce: F,
    ) -> Result<UploadReport, UploadError>
    where
        F: FnOnce(&mut ObjectWriter) -> io::Result<()> + Send + 'static,
    {
        let mut writer = self.writer(bucket, key)?;
        let (b, k) = (bucket.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || {
            produce(&mut writer).map_err(UploadError::Produce)?;
            writer.finish().map_err(UploadError::Store)
        })
        .await
        .map_err(|e| {
            UploadError::Store(ObjectStoreError::Aborted {
                bucket: b,
                key: k,
                detail: format!("writer thread: {e}"),
            })
        })?
    }
}

/// Why [`ObjectStore::upload_with`] failed: the producer or the store.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("producing the upload: {0}")]
    Produce(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
}

impl ObjectWriter {
    /// Keeps the id of the multipart upload in the file `note` while it is
    /// open (removed once it is completed or aborted): an upload whose
    /// abort failed, or whose process was killed, can then be ended with
    /// [`ObjectStore::abort_noted`].
    pub fn note_upload_in(&mut self, note: PathBuf) {
        self.note = Some(note);
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.total
    }

    /// Sends the last part and completes the upload (or PUTs a small object
    /// whole). Blocks: call it where `write` is called.
    pub fn finish(mut self) -> Result<UploadReport, ObjectStoreError> {
        let bytes = self.total;
        if self.tx.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            let (store, bucket, key) = (self.store.clone(), self.bucket.clone(), self.key.clone());
            self.handle
                .block_on(async move { store.put_bytes(&bucket, &key, data).await })?;
            return Ok(UploadReport { bytes, parts: 0 });
        }
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        if let Some(tx) = self.tx.take() {
            if tx.blocking_send(Msg::Finish).is_err() {
                return Err(self.task_error());
            }
        }
        let parts = self.join()?;
        Ok(UploadReport { bytes, parts })
    }

    fn send_part(&mut self) -> Result<(), ObjectStoreError> {
        let data = Bytes::from(std::mem::take(&mut self.buf));
        if self.tx.is_none() {
            let (tx, rx) = mpsc::channel(self.store.inner.transfer.queued_parts.max(1));
            let (store, bucket, key) = (self.store.clone(), self.bucket.clone(), self.key.clone());
            let note = self.note.clone();
            self.task = Some(self.handle.spawn(upload(store, bucket, key, note, rx)));
            self.tx = Some(tx);
        }
        let sent = match &self.tx {
            Some(tx) => tx.blocking_send(Msg::Part(data)).is_ok(),
            None => false,
        };
        if !sent {
            self.tx = None;
            return Err(self.task_error());
        }
        self.parts += 1;
        Ok(())
    }

    /// The size of the part being written.
    fn part_bytes(&self) -> usize {
        self.store.inner.transfer.part_size(self.parts + 1)
    }

    /// The result of the uploader task, waited for.
    fn join(&mut self) -> Result<usize, ObjectStoreError> {
        let Some(task) = self.task.take() else {
            return Err(self.aborted("the uploader is gone"));
        };
        match self.handle.block_on(task) {
            Ok(r) => r,
            Err(e) => Err(self.aborted(&format!("uploader task: {e}"))),
        }
    }

    fn task_error(&mut self) -> ObjectStoreError {
        match self.join() {
            Err(e) => e,
            Ok(_) => self.aborted("the uploader stopped early"),
        }
    }

    fn aborted(&self, detail: &str) -> ObjectStoreError {
        ObjectStoreError::Aborted {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            detail: detail.to_string(),
        }
    }
}

impl io::Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let part_bytes = self.part_bytes();
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(part_bytes);
        }
        let n = data.len().min(part_bytes - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        if self.buf.len() == part_bytes {
            self.send_part().map_err(ObjectStoreError::into_io)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // An unfinished writer closes the channel without `Finish`: the
        // uploader aborts the multipart upload on its own.
        self.tx.take();
    }
}

/// The uploader task: returns the number of parts of the completed upload.
async fn upload(
    store: ObjectStore,
    bucket: String,
    key: String,
    note: Option<PathBuf>,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<usize, ObjectStoreError> {
    let client = &store.inner.client;
    let created = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .map_err(|e| map_sdk(e, &store.ctx("create multipart upload", &bucket, &key)))?;
    let Some(upload_id) = created.upload_id else {
        return Err(ObjectStoreError::Request {
            op: "create multipart upload",
            bucket,
            key,
            detail: "the answer has no upload id".into(),
        });
    };
    if let Some(note) = &note {
        let open = OpenUpload {
            bucket: bucket.clone(),
            key: key.clone(),
            upload_id: upload_id.clone(),
        };
        let written = serde_json::to_vec(&open)
            .map_err(io::Error::other)
            .and_then(|text| std::fs::write(note, text));
        if let Err(e) = written {
            tracing::warn!(note = %note.display(), error = %e, "multipart upload not noted");
        }
    }
    let result = upload_parts(&store, &bucket, &key, &upload_id, &mut rx).await;
    let result = match result {
        Ok((parts, bytes)) => complete(&store, &bucket, &key, &upload_id, parts, bytes).await,
        Err(e) => Err(e),
    };
    let mut ended = result.is_ok();
    if result.is_err() {
        match store.abort_upload(&bucket, &key, &upload_id).await {
            Ok(()) => ended = true,
            Err(e) => {
                tracing::warn!(bucket = %bucket, key = %key, error = %e, note = ?note, "multipart upload not aborted");
            }
        }
    }
    if let (true, Some(note)) = (ended, &note) {
        let _ = std::fs::remove_file(note);
    }
    result
}

async fn upload_parts(
    store: &ObjectStore,
    bucket: &str,
    key: &str,
    upload_id: &str,
    rx: &mut mpsc::Receiver<Msg>,
) -> Result<(Vec<CompletedPart>, u64), ObjectStoreError> {
    let in_flight = store.inner.transfer.parts_in_flight.max(1);
    let mut running: JoinSet<Result<CompletedPart, ObjectStoreError>> = JoinSet::new();
    let mut done = Vec::new();
    let mut number = 0i32;
    let mut bytes = 0u64;
    let finished = loop {
        let Some(msg) = rx.recv().await else {
            break false;
        };
        let data = match msg {
            Msg::Part(data) => data,
            Msg::Finish => break true,
        };
        number += 1;
        bytes += data.len() as u64;
        if number as usize > MAX_PARTS {
            return Err(ObjectStoreError::UploadTooLarge {
                bucket: bucket.to_string(),
                key: key.to_string(),
                limit: store.inner.transfer.max_upload_bytes(),
                parts: MAX_PARTS,
            });
        }
        while running.len() >= in_flight {
            done.push(joined(running.join_next().await, bucket, key)?);
        }
        let (s, b, k, id) = (
            store.clone(),
            bucket.to_string(),
            key.to_string(),
            upload_id.to_string(),
        );
        running.spawn(async move {
            let out = s
                .inner
                .client
                .upload_part()
                .bucket(&b)
                .key(&k)
                .upload_id(&id)
                .part_number(number)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| map_sdk(e, &s.ctx("upload part", &b, &k)))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .build())
        });
    };
    while !running.is_empty() {
        done.push(joined(running.join_next().await, bucket, key)?);
    }
    if !finished {
        return Err(ObjectStoreError::Aborted {
            bucket: bucket.to_string(),
            key: key.to_string(),
            detail: "the writer was dropped before finishing".into(),
        });
    }
    done.sort_by_key(|p| p.part_number);
    Ok((done, bytes))
}

fn joined(
    r: Option<Result<Result<CompletedPart, ObjectStoreError>, tokio::task::JoinError>>,
    bucket: &str,
    key: &str,
) -> Result<CompletedPart, ObjectStoreError> {
    match r {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(ObjectStoreError::Aborted {
            bucket: bucket.to_string(),
            key: key.to_string(),
            detail: format!("part upload task: {e}"),
        }),
        None => Err(ObjectStoreError::Aborted {
            bucket: bucket.to_string(),
            key: key.to_string(),
            detail: "no part upload to wait for".into(),
        }),
    }
}

async fn complete(
    store: &ObjectStore,
    bucket: &str,
    key: &str,
    upload_id: &str,
    parts: Vec<CompletedPart>,
    bytes: u64,
) -> Result<usize, ObjectStoreError> {
    let n = parts.len();
    let timeout = complete_timeout(store.inner.attempt_timeout, bytes);
    let done = store
        .inner
        .client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .customize()
        .config_override(
            aws_sdk_s3::config::Builder::default().timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(timeout)
                    .build(),
            ),
        )
        .send()
        .await
        .map_err(|e| map_sdk(e, &store.ctx("complete multipart upload", bucket, key)));
    match done {
        Ok(_) => Ok(n),
        // A retry after an answer that was lost finds the upload gone:
        // completed, when the object is there with every byte.
        Err(ObjectStoreError::NotFound { .. })
            if store.head(bucket, key).await.is_ok_and(|o| o.size == bytes) =>
        {
            Ok(n)
        }
        Err(e) => Err(e),
    }
}
