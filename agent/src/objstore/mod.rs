//! Object storage: the S3-protocol client jobs use to read pushed tars and
//! APKs and to write exports, and an embedded S3-protocol server for single
//! machines and tests.
//!
//! Objects are named as the CPH API names them, `obs://bucket/path`. The
//! client speaks S3 through `aws-sdk-s3` to Huawei OBS (virtual-hosted
//! addressing) or to a local store (path style), checks an object's size
//! with a HEAD before any download, and streams in both directions with
//! bounded memory: a download is a few ranged GETs in flight (each with
//! `If-Match` on the HEAD's ETag) handed in order to a synchronous
//! [`std::io::Read`], an upload is a multipart upload fed by
//! a synchronous [`std::io::Write`]. The embedded store ([`server`]) serves a
//! directory (one sub-directory per bucket) with static SigV4 credentials.

mod client;
mod config;
mod download;
mod error;
mod etag;
pub mod server;
mod upload;
mod url;

pub use client::{ObjectInfo, ObjectStore};
pub use config::{ObjectStoreConfig, TransferConfig};
pub use download::{DownloadStats, ObjectReader};
pub use error::ObjectStoreError;
pub use server::{serve, EmbeddedStore, ServerError};
pub use upload::{ObjectWriter, UploadError, UploadReport};
pub use url::ObjectUrl;

/// The largest file a push job downloads (the reference: 6 GB, read as GiB).
pub const PUSH_MAX_BYTES: u64 = 6 << 30;

/// The largest APK an install job downloads (the reference: 2 GB, read as GiB).
pub const APK_MAX_BYTES: u64 = 2 << 30;

/// S3's smallest multipart part (all parts but the last).
pub const MIN_PART_BYTES: usize = 5 << 20;

/// S3's largest number of parts in one multipart upload.
pub const MAX_PARTS: usize = 10_000;
