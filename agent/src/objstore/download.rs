//! Streaming download: a few ranged GETs in flight, handed in order to a
//! synchronous reader.
//!
//! A producer task keeps `parts_in_flight` part fetches running, awaits the
//! oldest, and sends its bytes through a channel of `queued_parts` slots;
//! [`ObjectReader`] takes them on a blocking thread (a tar extractor reads
//! while later parts download). Memory is bounded by the part size times
//! the parts in flight plus the queue plus the one being read.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use cph_runtime::archive;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::ObjectStore;
use super::error::map_sdk;
use super::{ObjectInfo, ObjectStoreError};

/// Byte counts of a download, for tests and reports.
#[derive(Debug, Default)]
pub struct DownloadStats {
    /// Bytes fetched but not yet read.
    buffered: AtomicU64,
    /// The most bytes ever buffered at once.
    peak: AtomicU64,
    /// Bytes handed to the reader.
    read: AtomicU64,
}

impl DownloadStats {
    fn add(&self, n: u64) {
        let now = self.buffered.fetch_add(n, Ordering::AcqRel) + n;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }

    fn sub(&self, n: u64) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
        self.read.fetch_add(n, Ordering::AcqRel);
    }

    /// The most bytes held in memory at once by this download.
    pub fn peak_buffered(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Acquire)
    }
}

/// A synchronous reader over an object being downloaded.
///
/// Its `read` blocks: use it on a blocking thread
/// (`tokio::task::spawn_blocking`) or a thread outside the runtime, never
/// inside an async task. Errors are `io::Error`s carrying an
/// [`ObjectStoreError`] ([`ObjectStoreError::from_io`]). Dropping it stops
/// the download.
pub struct ObjectReader {
    rx: mpsc::Receiver<Result<Vec<Bytes>, ObjectStoreError>>,
    current: Bytes,
    /// The rest of the current part's segments (as received, not copied
    /// into one buffer).
    rest: std::vec::IntoIter<Bytes>,
    bucket: String,
    info: ObjectInfo,
    stats: Arc<DownloadStats>,
    producer: JoinHandle<()>,
    done: bool,
}

impl ObjectReader {
    /// The object as the HEAD before the download saw it.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    pub fn stats(&self) -> Arc<DownloadStats> {
        self.stats.clone()
    }
}

impl ObjectReader {
    /// Makes `current` hold the next bytes, waiting for the next part when
    /// needed; false at the end of the object.
    fn fill(&mut self) -> io::Result<bool> {
        while !self.current.has_remaining() {
            if let Some(next) = self.rest.next() {
                self.current = next;
                continue;
            }
            if self.done {
                return Ok(false);
            }
            match self.rx.blocking_recv() {
                Some(Ok(part)) => self.rest = part.into_iter(),
                Some(Err(e)) => {
                    self.done = true;
                    return Err(e.into_io());
                }
                None => {
                    self.done = true;
                    if self.stats.bytes_read() != self.info.size {
                        return Err(ObjectStoreError::Aborted {
                            bucket: self.bucket.clone(),
                            key: self.info.key.clone(),
                            detail: "the download task ended early".into(),
                        }
                        .into_io());
                    }
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

impl io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || !self.fill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.current.remaining());
        self.current.copy_to_slice(&mut buf[..n]);
        self.stats.sub(n as u64);
        Ok(n)
    }
}

/// The received buffers themselves, for an extraction that writes from
/// them ([`archive::extract_lent`]).
impl archive::Lend for ObjectReader {
    fn lend(&mut self, max: usize) -> io::Result<Bytes> {
        if max == 0 || !self.fill()? {
            return Ok(Bytes::new());
        }
        let lent = self.current.split_to(max.min(self.current.len()));
        self.stats.sub(lent.len() as u64);
        Ok(lent)
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        self.producer.abort();
    }
}

impl ObjectStore {
    /// Starts a streaming download of `bucket/key`: HEAD first, refusing an
    /// object over `limit` bytes before anything is fetched, then ranged GETs
    /// of `transfer.range_bytes` with `transfer.parts_in_flight` at once.
    pub async fn download_to_reader(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
    ) -> Result<ObjectReader, ObjectStoreError> {
        let info = self.check_size(bucket, key, limit).await?;
        let t = &self.inner.transfer;
        let (tx, rx) = mpsc::channel(t.queued_parts.max(1));
        let stats = Arc::new(DownloadStats::default());
        let producer = tokio::spawn(produce(
            self.clone(),
            bucket.to_string(),
            info.clone(),
            tx,
            stats.clone(),
        ));
        Ok(ObjectReader {
            rx,
            current: Bytes::new(),
            rest: Vec::new().into_iter(),
            bucket: bucket.to_string(),
            info,
            stats,
            producer,
            done: false,
        })
    }

    /// Downloads `bucket/key` and hands the reader to `consume` on a blocking
    /// thread (e.g. `|r| archive::extract(r, target, &opts)`).
    pub async fn download_with<T, F>(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
        consume: F,
    ) -> Result<T, ObjectStoreError>
    where
        F: FnOnce(&mut ObjectReader) -> T + Send + 'static,
        T: Send + 'static,
    {
        let mut reader = self.download_to_reader(bucket, key, limit).await?;
        tokio::task::spawn_blocking(move || consume(&mut reader))
            .await
            .map_err(|e| ObjectStoreError::Aborted {
                bucket: bucket.to_string(),
                key: key.to_string(),
                detail: format!("reader thread: {e}"),
            })
    }

    /// One ranged GET, its whole body in memory: the chunks it arrived in
    /// where they are large, small ones copied together.
    ///
    /// hyper reads each chunk into a buffer of up to about 400 KiB, and a
    /// chunk keeps its whole buffer alive: a part kept as the chunks of a
    /// slow connection (a few KiB per read) would pin many times its size.
    /// A chunk of at least [`KEEP_CHUNK`] pins at most about 1.6 times its
    /// size and is kept as it is (on loopback nearly all are); the others
    /// are copied into buffers of [`KEEP_CHUNK`], so a part never holds more
    /// than about 1.6 times its size whatever the network.
    ///
    /// With `etag` (the HEAD's), the store answers only while the object
    /// still has it: a replaced object fails the download as
    /// [`ObjectStoreError::Inconsistent`] instead of mixing two versions.
    ///
    /// A body that breaks off (a connection reset, a timeout mid-transfer)
    /// is fetched again, up to the configured attempts with the backoff
    /// doubling: the SDK's own retries end once a response's head arrived,
    /// and one dropped connection would otherwise fail a whole push.
    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        start: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, ObjectStoreError> {
        let mut wait = self.inner.initial_backoff;
        let mut attempt = 1;
        loop {
            match self.get_range_once(bucket, key, etag, start, len).await {
                Err(Range::BrokeOff(e)) if attempt < self.inner.max_attempts => {
                    tracing::debug!(%bucket, %key, start, attempt, error = %e, "range broke off, fetched again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(Range::BrokeOff(e) | Range::Failed(e)) => return Err(e),
                Ok(part) => return Ok(part),
            }
        }
    }

    /// One attempt of [`ObjectStore::get_range`].
    async fn get_range_once(
        &self,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        start: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, Range> {
        let mut out = self
            .inner
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .set_if_match(etag.map(str::to_string))
            .range(format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
            .map_err(|e| Range::Failed(map_sdk(e, &self.ctx("get", bucket, key))))?;
        let mut part = Part::default();
        let mut got = 0u64;
        while let Some(chunk) = out.body.try_next().await.map_err(|e| {
            Range::BrokeOff(self.body_failed(bucket, key, &format!(" at {}", start + got), &e))
        })? {
            got += chunk.len() as u64;
            if got > len {
                break;
            }
            part.push(chunk);
        }
        if got != len {
            let got = if got > len {
                format!("more than {len}")
            } else {
                got.to_string()
            };
            return Err(Range::Failed(ObjectStoreError::Inconsistent {
                bucket: bucket.to_string(),
                key: key.to_string(),
                detail: format!("bytes {start}.. gave {got} bytes, expected {len}"),
            }));
        }
        Ok(part.finish())
    }
}

/// How one attempt at a range failed.
enum Range {
    /// The body broke off after the response began: worth another attempt.
    BrokeOff(ObjectStoreError),
    /// The request was refused or the bytes are not the object's.
    Failed(ObjectStoreError),
}

/// A part's fetch, stopped when dropped: a download given up (its reader
/// dropped after an error, or a bad archive) leaves no GET running.
struct Fetch(JoinHandle<Result<Vec<Bytes>, ObjectStoreError>>);

impl Drop for Fetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Received chunks at least this large are kept as they are; smaller ones
/// are copied together into buffers of this size.
const KEEP_CHUNK: usize = 256 << 10;

/// A part's bytes as they arrive: large chunks kept, small ones copied
/// together (see [`ObjectStore::get_range`]).
#[derive(Default)]
struct Part {
    done: Vec<Bytes>,
    small: BytesMut,
}

impl Part {
    fn push(&mut self, chunk: Bytes) {
        self.flush_full();
        if self.small.is_empty() && chunk.len() >= KEEP_CHUNK {
            self.done.push(chunk);
            return;
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            self.flush_full();
            if self.small.len() == self.small.capacity() {
                self.small.reserve(KEEP_CHUNK);
            }
            let n = rest.len().min(self.small.capacity() - self.small.len());
            self.small.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    /// Moves a full packing buffer to the part's bytes.
    fn flush_full(&mut self) {
        if !self.small.is_empty() && self.small.len() == self.small.capacity() {
            self.done.push(self.small.split().freeze());
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.small.is_empty() {
            self.done.push(self.small.freeze());
        }
        self.done
    }
}

async fn produce(
    store: ObjectStore,
    bucket: String,
    info: ObjectInfo,
    tx: mpsc::Sender<Result<Vec<Bytes>, ObjectStoreError>>,
    stats: Arc<DownloadStats>,
) {
    let part = store.inner.transfer.range_bytes as u64;
    let in_flight = store.inner.transfer.parts_in_flight.max(1);
    let mut next = 0u64;
    let mut running: VecDeque<Fetch> = VecDeque::new();
    loop {
        while running.len() < in_flight && next < info.size {
            let len = part.min(info.size - next);
            let (s, b, k, e, st) = (
                store.clone(),
                bucket.clone(),
                info.key.clone(),
                info.etag.clone(),
                stats.clone(),
            );
            running.push_back(Fetch(tokio::spawn(async move {
                let data = s.get_range(&b, &k, e.as_deref(), next, len).await?;
                st.add(len);
                Ok(data)
            })));
            next += len;
        }
        let Some(mut oldest) = running.pop_front() else {
            break;
        };
        let result = match (&mut oldest.0).await {
            Ok(r) => r,
            Err(e) => Err(ObjectStoreError::Aborted {
                bucket: bucket.clone(),
                key: info.key.clone(),
                detail: format!("part task: {e}"),
            }),
        };
        let failed = result.is_err();
        if tx.send(result).await.is_err() || failed {
            break;
        }
    }
    // The fetches still running stop as `running` drops (also when this
    // task is aborted with its reader).
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_keeps_large_chunks_and_packs_small_ones_in_order() {
        let big = Bytes::from(vec![7u8; KEEP_CHUNK + 10]);
        let big_at = big.as_ptr();
        let mut part = Part::default();
        let mut want = Vec::new();
        part.push(big.clone());
        want.extend_from_slice(&big);
        // A slow connection's reads: many small chunks.
        for i in 0..300u32 {
            let c = Bytes::from(vec![(i % 251) as u8; 1000 + i as usize]);
            want.extend_from_slice(&c);
            part.push(c);
        }
        // A large chunk behind small ones is copied too, to keep order.
        part.push(big.clone());
        want.extend_from_slice(&big);
        let segs = part.finish();
        assert_eq!(
            segs[0].as_ptr(),
            big_at,
            "the first large chunk is not copied"
        );
        assert!(segs[1..].iter().all(|s| s.len() <= KEEP_CHUNK));
        // 300 small reads of about 1 KiB each pinned 300 buffers; packed,
        // they take a few.
        let packed: usize = segs[1..].iter().map(|s| s.len()).sum();
        assert!(segs.len() - 1 <= packed.div_ceil(KEEP_CHUNK));
        let got: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
        assert!(got == want, "bytes out of order");
    }
}
