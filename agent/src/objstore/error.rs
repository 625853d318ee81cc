//! The object store's errors, and their mapping from SDK failures.

use std::error::Error as StdError;
use std::io;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// What can go wrong talking to the store. The agent maps
/// [`ObjectStoreError::NotFound`] to CPS.0104 and
/// [`ObjectStoreError::TooLarge`] to the reference's size errors.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("object obs://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    #[error("bucket {bucket} does not exist")]
    NoSuchBucket { bucket: String },
    #[error("object obs://{bucket}/{key} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        limit: u64,
    },
    #[error("object store at {endpoint} is unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("object store refused access to obs://{bucket}/{key}: {detail}")]
    AccessDenied {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("invalid object url {url}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("invalid object store configuration: {0}")]
    Config(String),
    #[error("{op} obs://{bucket}/{key} failed: {detail}")]
    Request {
        op: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("object obs://{bucket}/{key} changed during the transfer: {detail}")]
    Inconsistent {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("upload of obs://{bucket}/{key} exceeds {limit} bytes ({parts} parts)")]
    UploadTooLarge {
        bucket: String,
        key: String,
        limit: u64,
        parts: usize,
    },
    #[error("object store transfer needs a tokio runtime")]
    NoRuntime,
    #[error("object store transfer of obs://{bucket}/{key} stopped: {detail}")]
    Aborted {
        bucket: String,
        key: String,
        detail: String,
    },
}

impl ObjectStoreError {
    /// The store error inside an `io::Error` returned by [`super::ObjectReader`]
    /// or [`super::ObjectWriter`] (and so inside a tar extraction's read error).
    pub fn from_io(err: &io::Error) -> Option<&ObjectStoreError> {
        err.get_ref()?.downcast_ref::<ObjectStoreError>()
    }

    /// Moves the error into an `io::Error` that [`ObjectStoreError::from_io`]
    /// recovers.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            ObjectStoreError::NotFound { .. } | ObjectStoreError::NoSuchBucket { .. } => {
                io::ErrorKind::NotFound
            }
            ObjectStoreError::AccessDenied { .. } => io::ErrorKind::PermissionDenied,
            ObjectStoreError::Unreachable { .. } => io::ErrorKind::ConnectionRefused,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// True when retrying later can help (store down or a passing failure).
    pub fn is_transient(&self) -> bool {
        matches!(self, ObjectStoreError::Unreachable { .. })
    }
}

/// The context of a failed request, to name it in the error.
pub(crate) struct Ctx<'a> {
    pub op: &'static str,
    pub endpoint: &'a str,
    pub bucket: &'a str,
    pub key: &'a str,
}

/// Maps an SDK failure to a typed error by kind of failure, S3 error code and
/// HTTP status (HEAD answers carry no code, only a status).
pub(crate) fn map_sdk<E>(err: SdkError<E, HttpResponse>, ctx: &Ctx<'_>) -> ObjectStoreError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let (bucket, key) = (ctx.bucket.to_string(), ctx.key.to_string());
    match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            return ObjectStoreError::Unreachable {
                endpoint: ctx.endpoint.to_string(),
                detail: chain(&err),
            };
        }
        SdkError::ResponseError(_) => {
            return ObjectStoreError::Request {
                op: ctx.op,
                bucket,
                key,
                detail: chain(&err),
            };
        }
        _ => {}
    }
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().unwrap_or_default().to_string();
    let detail = match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.clone(),
        _ => format!("http status {}", status.unwrap_or(0)),
    };
    match (code.as_str(), status) {
        ("NoSuchBucket", _) => ObjectStoreError::NoSuchBucket { bucket },
        ("PreconditionFailed", _) | (_, Some(412)) => ObjectStoreError::Inconsistent {
            bucket,
            key,
            detail: format!("it was replaced while being read ({detail})"),
        },
        ("NoSuchKey" | "NotFound", _) | (_, Some(404)) => {
            ObjectStoreError::NotFound { bucket, key }
        }
        (
            "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AllAccessDisabled",
            _,
        )
        | (_, Some(401 | 403)) => ObjectStoreError::AccessDenied {
            bucket,
            key,
            detail,
        },
        (_, Some(s)) if s >= 500 => ObjectStoreError::Unreachable {
            endpoint: ctx.endpoint.to_string(),
            detail: format!("{} answered {detail}", ctx.op),
        },
        _ => ObjectStoreError::Request {
            op: ctx.op,
            bucket,
            key,
            detail,
        },
    }
}

/// An error and its sources on one line.
pub(crate) fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
