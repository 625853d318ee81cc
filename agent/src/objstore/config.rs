//! Object-store client configuration, as it appears in the agent's TOML.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ObjectStoreError, MAX_PARTS, MIN_PART_BYTES};

/// The smallest ranged GET a download makes.
pub const MIN_RANGE_BYTES: usize = 64 << 10;

/// Where the store is and how to talk to it.
///
/// ```toml
/// [object_store]
/// endpoint = "https://obs.cn-north-4.myhuaweicloud.com"
/// region = "cn-north-4"
/// ak = "..."
/// sk = "..."
/// path_style = false
/// ```
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreConfig {
    /// Base URL, `http://` or `https://`, without bucket.
    pub endpoint: String,
    /// Signing region (OBS: the region id, e.g. `cn-north-4`).
    pub region: String,
    /// Access key id (`access_key` is accepted too).
    #[serde(alias = "access_key")]
    pub ak: String,
    /// Secret access key (`secret_key` is accepted too).
    #[serde(alias = "secret_key")]
    pub sk: String,
    /// `true`: `endpoint/bucket/key` (local stores); `false`:
    /// `bucket.endpoint/key` (public OBS endpoints refuse path style).
    pub path_style: bool,
    /// Attempts per request, the first included (exponential backoff between).
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubling, with jitter).
    pub initial_backoff_ms: u64,
    /// TCP connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout of one attempt of a request in milliseconds (a part, not the
    /// whole object). Completing a multipart upload may take longer, by the
    /// time the store needs to assemble it (see `complete_timeout`).
    pub attempt_timeout_ms: u64,
    /// Streaming sizes.
    pub transfer: TransferConfig,
}

/// Part sizes and parallelism of streamed transfers. A download holds at
/// most about `range_bytes * (parts_in_flight + queued_parts + 1)` (16 MiB
/// by default), an upload `part_bytes * (parts_in_flight + queued_parts +
/// 2)` (40 MiB; more past 7.8 GiB, see [`TransferConfig::part_size`]). The
/// tar bench measures a streamed push's peak resident memory. A store far
/// away may want more parts in flight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    /// Bytes per ranged GET of a download (at least 64 KiB).
    pub range_bytes: usize,
    /// Bytes of each of an upload's first 1,000 parts (at least 5 MiB,
    /// S3's smallest); later parts are larger ([`TransferConfig::part_size`]).
    pub part_bytes: usize,
    /// Ranged GETs or part uploads running at once.
    pub parts_in_flight: usize,
    /// Finished parts waiting for the reader (download) or parts written
    /// but not yet being uploaded (upload).
    pub queued_parts: usize,
}

/// Parts of an upload at each part size (see [`TransferConfig::part_size`]).
pub const PARTS_PER_SIZE: usize = 1_000;
/// Times an upload's part size doubles at most.
pub const PART_DOUBLINGS: usize = 3;

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            range_bytes: 4 << 20,
            part_bytes: 8 << 20,
            parts_in_flight: 2,
            queued_parts: 1,
        }
    }
}

impl TransferConfig {
    /// Upper bound of the object bytes one download buffers.
    pub fn download_memory_bound(&self) -> u64 {
        (self.range_bytes as u64) * self.buffers()
    }

    /// Upper bound of the object bytes one upload buffers while its parts
    /// are `part_bytes` (its first 7.8 GiB by default): the parts in
    /// flight, those queued, the one the uploader holds until a request is
    /// free and the one being written.
    pub fn upload_memory_bound(&self) -> u64 {
        (self.part_bytes as u64) * (self.buffers() + 1)
    }

    /// Parts held at once: in flight, queued and the one being read or
    /// written.
    fn buffers(&self) -> u64 {
        (self.parts_in_flight + self.queued_parts + 1) as u64
    }

    /// Bytes of the `n`-th part (from 1) of an upload: `part_bytes` for the
    /// first [`PARTS_PER_SIZE`], twice that for the next as many, and so
    /// on, doubling [`PART_DOUBLINGS`] times at most. What an export writes is not
    /// known before it is written, and S3 takes 10,000 parts at most:
    /// constant 8 MiB parts would stop an export at 78 GiB; growing, they
    /// take 492 GiB, while an export under 7.8 GiB (nearly all) keeps 8 MiB
    /// parts and their memory.
    pub fn part_size(&self, n: usize) -> usize {
        let doublings = (n.saturating_sub(1) / PARTS_PER_SIZE).min(PART_DOUBLINGS);
        self.part_bytes << doublings
    }

    /// Largest object an upload with these parts can produce.
    pub fn max_upload_bytes(&self) -> u64 {
        (1..=MAX_PARTS).map(|n| self.part_size(n) as u64).sum()
    }
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        ObjectStoreConfig {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "local".into(),
            ak: String::new(),
            sk: String::new(),
            path_style: true,
            max_attempts: 4,
            initial_backoff_ms: 200,
            connect_timeout_ms: 5_000,
            attempt_timeout_ms: 120_000,
            transfer: TransferConfig::default(),
        }
    }
}

// The secret key never reaches logs.
impl std::fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("ak", &self.ak)
            .field("sk", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("max_attempts", &self.max_attempts)
            .field("transfer", &self.transfer)
            .finish()
    }
}

impl ObjectStoreConfig {
    /// A path-style configuration for a local store at `endpoint`.
    pub fn local(
        endpoint: impl Into<String>,
        ak: impl Into<String>,
        sk: impl Into<String>,
    ) -> Self {
        ObjectStoreConfig {
            endpoint: endpoint.into(),
            ak: ak.into(),
            sk: sk.into(),
            ..ObjectStoreConfig::default()
        }
    }

    /// Checks the values a client cannot work with.
    pub fn validate(&self) -> Result<(), ObjectStoreError> {
        let bad = |what: String| Err(ObjectStoreError::Config(what));
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return bad(format!(
                "endpoint {:?} is not an http or https url",
                self.endpoint
            ));
        }
        if self.region.is_empty() {
            return bad("region is empty".into());
        }
        if self.ak.is_empty() || self.sk.is_empty() {
            return bad("ak and sk must both be set".into());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".into());
        }
        let t = &self.transfer;
        if t.part_bytes < MIN_PART_BYTES {
            return bad(format!(
                "transfer.part_bytes {} is below the S3 minimum of {MIN_PART_BYTES}",
                t.part_bytes
            ));
        }
        if t.range_bytes < MIN_RANGE_BYTES {
            return bad(format!(
                "transfer.range_bytes {} is below {MIN_RANGE_BYTES}",
                t.range_bytes
            ));
        }
        if t.parts_in_flight == 0 || t.queued_parts == 0 {
            return bad(
                "transfer.parts_in_flight and transfer.queued_parts must be at least 1".into(),
            );
        }
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    pub(crate) fn initial_backoff(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }
}

/// The slowest rate a store is expected to assemble a multipart upload at
/// once it is completed. The store answers only when the object is whole:
/// the embedded store copies the parts together at about 340 MB/s on a
/// 2-core VM, S3 and OBS take minutes for the largest uploads.
const COMPLETE_RATE: u64 = 32 << 20;

/// How long completing a multipart upload of `bytes` may take: one
/// request attempt plus the assembly at [`COMPLETE_RATE`]. With a plain
/// attempt timeout a large export (492 GiB at most) would time out while
/// the store is still assembling it, and the retry would find the upload
/// gone.
pub(crate) fn complete_timeout(attempt: Duration, bytes: u64) -> Duration {
    attempt + Duration::from_secs(bytes / COMPLETE_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_defaults() {
        let cfg: ObjectStoreConfig = toml::from_str(
            "endpoint = \"https://obs.cn-north-4.myhuaweicloud.com\"\nregion = \"cn-north-4\"\nak = \"a\"\nsk = \"s\"\npath_style = false\n",
        )
        .unwrap();
        assert!(!cfg.path_style);
        assert_eq!(cfg.transfer, TransferConfig::default());
        cfg.validate().unwrap();
        let back: ObjectStoreConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert!(back == cfg);
        assert!(!format!("{cfg:?}").contains("\"s\""));
        let aliased: ObjectStoreConfig = toml::from_str(
            "endpoint = \"http://127.0.0.1:9000\"\naccess_key = \"a\"\nsecret_key = \"s\"\n",
        )
        .unwrap();
        assert_eq!((aliased.ak.as_str(), aliased.sk.as_str()), ("a", "s"));
        assert!(aliased.path_style);
    }

    #[test]
    fn validation_names_the_field() {
        let mut cfg = ObjectStoreConfig::local("http://127.0.0.1:1", "a", "s");
        cfg.transfer.part_bytes = 1 << 20;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("part_bytes"), "{e}");
        let mut cfg = ObjectStoreConfig::local("http://127.0.0.1:1", "a", "s");
        cfg.transfer.range_bytes = 4096;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("range_bytes"), "{e}");
        let cfg = ObjectStoreConfig::local("127.0.0.1:1", "a", "s");
        assert!(cfg.validate().unwrap_err().to_string().contains("endpoint"));
    }

    #[test]
    fn default_buffers_leave_room_under_64_mib() {
        let t = TransferConfig::default();
        // The extractor and the client's own memory come on top.
        assert!(t.download_memory_bound() <= 16 << 20);
        assert!(t.upload_memory_bound() <= 40 << 20);
    }

    #[test]
    fn upload_parts_grow_so_large_exports_fit_in_s3_s_10000() {
        let t = TransferConfig::default();
        let mib = 1 << 20;
        assert_eq!(t.part_size(1), 8 * mib);
        assert_eq!(t.part_size(1_000), 8 * mib);
        assert_eq!(t.part_size(1_001), 16 * mib);
        assert_eq!(t.part_size(2_001), 32 * mib);
        assert_eq!(t.part_size(3_001), 64 * mib);
        assert_eq!(t.part_size(MAX_PARTS), 64 * mib);
        // 1,000 parts each of 8, 16 and 32 MiB, then 7,000 of 64 MiB.
        assert_eq!(t.max_upload_bytes(), 504_000 << 20);
        // Where constant parts stopped.
        assert!(t.max_upload_bytes() > (t.part_bytes * MAX_PARTS) as u64 * 6);
    }

    #[test]
    fn completing_a_large_upload_may_take_as_long_as_assembling_it() {
        let attempt = Duration::from_secs(120);
        assert_eq!(complete_timeout(attempt, 8 << 20), attempt);
        // The largest export (492 GiB), assembled at 340 MB/s (the
        // embedded store here) in about 27 minutes, well inside.
        let largest = TransferConfig::default().max_upload_bytes();
        let timeout = complete_timeout(attempt, largest);
        assert!(
            timeout > Duration::from_secs(largest / 340_000_000) * 2,
            "{timeout:?}"
        );
    }
}
