//! `obs://bucket/path` object URLs, as the CPH API passes them.

use std::fmt;

use super::ObjectStoreError;

/// A bucket and key parsed from `obs://bucket/key` (`s3://` is accepted too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub bucket: String,
    pub key: String,
}

impl ObjectUrl {
    /// Parses `obs://bucket/key`. The bucket follows S3 naming (3-63 of
    /// lower-case letters, digits, `.` and `-`); the key must be non-empty
    /// unless `allow_prefix` (a trailing-`/` folder such as
    /// `obs://bucket/my_apps/`, or the whole bucket).
    pub fn parse(url: &str) -> Result<Self, ObjectStoreError> {
        Self::parse_inner(url, false)
    }

    /// Like [`ObjectUrl::parse`] but an empty key (the whole bucket) is allowed.
    pub fn parse_prefix(url: &str) -> Result<Self, ObjectStoreError> {
        Self::parse_inner(url, true)
    }

    fn parse_inner(url: &str, allow_prefix: bool) -> Result<Self, ObjectStoreError> {
        let bad = |reason: &'static str| ObjectStoreError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("obs://")
            .or_else(|| url.strip_prefix("s3://"))
            .ok_or_else(|| bad("expected obs://bucket/path"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket(bucket) {
            return Err(bad(
                "bucket names have 3-63 lower-case letters, digits, '.' or '-'",
            ));
        }
        if key.is_empty() && !allow_prefix {
            return Err(bad("the object path is empty"));
        }
        if key.len() > 1024 {
            return Err(bad("the object path is longer than 1024 bytes"));
        }
        if key.chars().any(|c| c.is_control()) {
            return Err(bad("the object path has a control character"));
        }
        Ok(ObjectUrl {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "obs://{}/{}", self.bucket, self.key)
    }
}

/// S3 bucket naming rules (the subset OBS enforces too).
pub(crate) fn valid_bucket(name: &str) -> bool {
    let len_ok = (3..=63).contains(&name.len());
    let chars_ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ends_ok = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    len_ok && chars_ok && ends_ok && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_examples() {
        let u = ObjectUrl::parse("obs://push-bucket/my_apps/test.tar").unwrap();
        assert_eq!(u.bucket, "push-bucket");
        assert_eq!(u.key, "my_apps/test.tar");
        assert_eq!(u.to_string(), "obs://push-bucket/my_apps/test.tar");
        let p = ObjectUrl::parse_prefix("obs://push-bucket/my_apps/").unwrap();
        assert_eq!(p.key, "my_apps/");
        assert_eq!(
            ObjectUrl::parse_prefix("obs://push-bucket").unwrap().key,
            ""
        );
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "http://b/k",
            "obs://",
            "obs:///k",
            "obs://Upper/k",
            "obs://ab/k",
            "obs://-bucket/k",
            "obs://bucket",
            "obs://bucket/",
            "obs://bucket/a\nb",
        ] {
            assert!(ObjectUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
