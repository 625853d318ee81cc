//! The S3 client: configuration of `aws-sdk-s3` for OBS and local stores,
//! and the small whole-object operations.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

use super::error::{chain, map_sdk, Ctx};
use super::{ObjectStoreConfig, ObjectStoreError, TransferConfig};

/// A connection to one S3-protocol store. Cheap to clone.
#[derive(Clone)]
pub struct ObjectStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub client: aws_sdk_s3::Client,
    pub endpoint: String,
    pub transfer: TransferConfig,
    /// Timeout of one attempt of a request (see
    /// [`super::config::complete_timeout`] for the exception).
    pub attempt_timeout: std::time::Duration,
    /// Attempts of a ranged GET whose body broke off (the SDK's retries
    /// end with the response's head), and the first wait between them.
    pub max_attempts: u32,
    pub initial_backoff: std::time::Duration,
}

/// What a HEAD or a listing says of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

impl ObjectStore {
    /// Builds the client (no request is sent). One TLS stack: rustls with
    /// ring; plain `http://` endpoints need none.
    pub fn new(cfg: &ObjectStoreConfig) -> Result<Self, ObjectStoreError> {
        cfg.validate()?;
        Ok(ObjectStore {
            inner: Arc::new(Inner {
                client: aws_sdk_s3::Client::from_conf(sdk_config(cfg)),
                endpoint: cfg.endpoint.clone(),
                transfer: cfg.transfer.clone(),
                attempt_timeout: cfg.attempt_timeout(),
                max_attempts: cfg.max_attempts,
                initial_backoff: cfg.initial_backoff(),
            }),
        })
    }

    /// The underlying SDK client, for operations this type does not wrap.
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.inner.client
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    pub(crate) fn ctx<'a>(&'a self, op: &'static str, bucket: &'a str, key: &'a str) -> Ctx<'a> {
        Ctx {
            op,
            endpoint: &self.inner.endpoint,
            bucket,
            key,
        }
    }

    /// The error of an object's body that broke off while it was read;
    /// `at` names where (empty, or e.g. " at 4194304").
    pub(crate) fn body_failed(
        &self,
        bucket: &str,
        key: &str,
        at: &str,
        err: &dyn std::error::Error,
    ) -> ObjectStoreError {
        ObjectStoreError::Unreachable {
            endpoint: self.inner.endpoint.clone(),
            detail: format!("reading obs://{bucket}/{key}{at}: {}", chain(err)),
        }
    }

    /// Size and ETag of an object.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<ObjectInfo, ObjectStoreError> {
        let out = self
            .inner
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk(e, &self.ctx("head", bucket, key)))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length.unwrap_or(0).max(0) as u64,
            etag: out.e_tag,
        })
    }

    /// HEAD, then refuse an object over `limit` bytes before any download.
    pub async fn check_size(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
    ) -> Result<ObjectInfo, ObjectStoreError> {
        let info = self.head(bucket, key).await?;
        if info.size > limit {
            return Err(ObjectStoreError::TooLarge {
                bucket: bucket.to_string(),
                key: key.to_string(),
                size: info.size,
                limit,
            });
        }
        Ok(info)
    }

    /// Stores a small object with one PUT.
    pub async fn put_bytes(
        &self,
        bucket: &str,
        key: &str,
        data: impl Into<bytes::Bytes>,
    ) -> Result<(), ObjectStoreError> {
        self.inner
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(data.into()))
            .send()
            .await
            .map_err(|e| map_sdk(e, &self.ctx("put", bucket, key)))?;
        Ok(())
    }

    /// Reads a whole object into memory, refusing one over `limit` bytes
    /// (checked by HEAD first).
    pub async fn get_bytes(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
    ) -> Result<bytes::Bytes, ObjectStoreError> {
        self.check_size(bucket, key, limit).await?;
        let out = self
            .inner
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk(e, &self.ctx("get", bucket, key)))?;
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| self.body_failed(bucket, key, "", &e))?
            .into_bytes();
        if data.len() as u64 > limit {
            return Err(ObjectStoreError::TooLarge {
                bucket: bucket.to_string(),
                key: key.to_string(),
                size: data.len() as u64,
                limit,
            });
        }
        Ok(data)
    }

    /// Deletes an object (S3: deleting a missing object succeeds).
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), ObjectStoreError> {
        self.inner
            .client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk(e, &self.ctx("delete", bucket, key)))?;
        Ok(())
    }

    /// Every object whose key starts with `prefix`, in key order (all pages).
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<ObjectInfo>, ObjectStoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .inner
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map_sdk(e, &self.ctx("list", bucket, prefix)))?;
            for o in page.contents.unwrap_or_default() {
                if let Some(key) = o.key {
                    out.push(ObjectInfo {
                        key,
                        size: o.size.unwrap_or(0).max(0) as u64,
                        etag: o.e_tag,
                    });
                }
            }
            match (page.is_truncated, page.next_continuation_token) {
                (Some(true), Some(next)) => token = Some(next),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Creates a bucket; one that already exists and is ours is fine.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), ObjectStoreError> {
        if !super::url::valid_bucket(bucket) {
            return Err(ObjectStoreError::InvalidUrl {
                url: format!("obs://{bucket}"),
                reason: "bucket names have 3-63 lower-case letters, digits, '.' or '-'",
            });
        }
        match self
            .inner
            .client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                use aws_sdk_s3::error::ProvideErrorMetadata;
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) {
                    return Ok(());
                }
                Err(map_sdk(e, &self.ctx("create bucket", bucket, "")))
            }
        }
    }

    /// A presigned GET URL (also shows which addressing the client uses).
    pub async fn presigned_get(
        &self,
        bucket: &str,
        key: &str,
        expires: Duration,
    ) -> Result<String, ObjectStoreError> {
        let cfg = PresigningConfig::expires_in(expires)
            .map_err(|e| ObjectStoreError::Config(format!("presign expiry: {e}")))?;
        let req = self
            .inner
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| map_sdk(e, &self.ctx("presign", bucket, key)))?;
        Ok(req.uri().to_string())
    }
}

/// The SDK configuration: static credentials, custom endpoint, addressing,
/// checksums only when an operation requires them (OBS rejects the SDK's
/// default CRC trailers), standard retries with exponential backoff.
fn sdk_config(cfg: &ObjectStoreConfig) -> aws_sdk_s3::Config {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let creds = Credentials::new(cfg.ak.clone(), cfg.sk.clone(), None, None, "cph-static");
    aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .credentials_provider(creds)
        .region(Region::new(cfg.region.clone()))
        .endpoint_url(cfg.endpoint.trim_end_matches('/'))
        .force_path_style(cfg.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(cfg.max_attempts)
                .with_initial_backoff(cfg.initial_backoff()),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(cfg.connect_timeout())
                .operation_attempt_timeout(cfg.attempt_timeout())
                .build(),
        )
        .build()
}
