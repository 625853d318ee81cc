//! `SDK-HMAC-SHA256`: how the official Huawei Cloud SDKs sign AK/SK requests,
//! and its verification.
//!
//! The client hashes a canonical form of the request (method, path with each
//! segment re-encoded and a trailing `/`, sorted re-encoded query, the signed
//! headers, the body's SHA-256), signs `SDK-HMAC-SHA256\n<X-Sdk-Date>\n<hash>`
//! with HMAC-SHA256 keyed by the secret key itself, and sends
//! `Authorization: SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<h;..>, Signature=<hex>`.
//! The server rebuilds the same string from the raw request it received.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The algorithm token of the `Authorization` header.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// Largest difference between `X-Sdk-Date` and the server clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a signed request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("the authorization header is missing")]
    MissingAuthorization,
    #[error("unsupported signing algorithm {0}")]
    Algorithm(String),
    #[error("the authorization header lacks {0}")]
    MissingField(&'static str),
    #[error("signed header {0} is not in the request")]
    MissingSignedHeader(String),
    #[error("header {0} must be signed")]
    UnsignedHeader(&'static str),
    #[error("x-sdk-date {0:?} is not of the form YYYYMMDDTHHMMSSZ")]
    BadDate(String),
    #[error("x-sdk-date {0} is more than 15 minutes from the server clock")]
    Skew(String),
    #[error("the access key is unknown")]
    UnknownKey,
    #[error("the signature does not match")]
    Mismatch,
    #[error("x-project-id {header} does not match the project {path} of the path")]
    ProjectMismatch { header: String, path: String },
}

/// A request as received, before routing: raw path and query, headers, body.
#[derive(Debug, Clone)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The raw request-target path, still percent-encoded.
    pub path: &'a str,
    /// The raw query string without `?` (empty when none).
    pub query: &'a str,
    /// Header names (any case) and values as received.
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The parts of an `Authorization: SDK-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Parses the `Authorization` header value.
pub fn parse_authorization(value: &str) -> Result<Authorization, SigningError> {
    let value = value.trim();
    let (algo, rest) = value.split_once(' ').unwrap_or((value, ""));
    if algo != ALGORITHM {
        return Err(SigningError::Algorithm(algo.to_string()));
    }
    let (mut access, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Access=") {
            access = Some(v.to_string());
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v.split(';').map(str::to_string).collect::<Vec<_>>());
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v.to_string());
        }
    }
    Ok(Authorization {
        access: access
            .filter(|a| !a.is_empty())
            .ok_or(SigningError::MissingField("Access"))?,
        signed_headers: signed
            .filter(|s| !s.is_empty())
            .ok_or(SigningError::MissingField("SignedHeaders"))?,
        signature: signature.ok_or(SigningError::MissingField("Signature"))?,
    })
}

/// Percent-encodes all but the RFC 3986 unreserved characters (upper-case hex).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes (`+` stays a plus); invalid escapes are kept as written.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The canonical URI: decoded, each segment re-encoded, ending in `/`.
pub fn canonical_uri(raw_path: &str) -> String {
    let decoded = decode(raw_path);
    let mut p = decoded.split('/').map(encode).collect::<Vec<_>>().join("/");
    if !p.ends_with('/') {
        p.push('/');
    }
    p
}

/// The canonical query: pairs decoded, sorted by (name, value), re-encoded.
pub fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub use cph_agent::connect::hmac_sha256;

/// The canonical request for the given signed headers (lower-case names).
pub fn canonical_request(
    req: &SignedRequest<'_>,
    signed: &[String],
) -> Result<String, SigningError> {
    let mut headers = String::new();
    for name in signed {
        let value = req
            .header(name)
            .ok_or_else(|| SigningError::MissingSignedHeader(name.clone()))?;
        headers.push_str(name);
        headers.push(':');
        headers.push_str(value.trim());
        headers.push('\n');
    }
    let payload = if req.body.is_empty() {
        EMPTY_SHA256.to_string()
    } else {
        sha256_hex(req.body)
    };
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        canonical_uri(req.path),
        canonical_query(req.query),
        headers,
        signed.join(";"),
        payload
    ))
}

/// The hex signature of a canonical request.
pub fn signature(canonical: &str, sdk_date: &str, secret: &str) -> String {
    let sts = format!(
        "{ALGORITHM}\n{sdk_date}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    hex::encode(hmac_sha256(secret.as_bytes(), sts.as_bytes()))
}

/// Seconds since the epoch of a `YYYYMMDDTHHMMSSZ` date.
pub fn parse_sdk_date(s: &str) -> Result<i64, SigningError> {
    let bad = || SigningError::BadDate(s.to_string());
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, SigningError> {
        s.get(r)
            .filter(|d| d.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    Ok(crate::store::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// `X-Sdk-Date` of a time (what a client signs with).
pub fn format_sdk_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Compares two strings in time independent of where they differ (the
/// agent's, which checks the node token the same way).
pub use cph_agent::daemon::http::constant_time_eq;

/// The project id segment of a `/v1/{project_id}/...` path.
pub fn path_project(path: &str) -> Option<&str> {
    let mut it = path.trim_start_matches('/').split('/');
    it.next()?;
    it.next().filter(|p| !p.is_empty())
}

/// Verifies a signed request; `secret_for` looks up the secret of an access key.
/// Returns the access key on success.
pub fn verify(
    req: &SignedRequest<'_>,
    secret_for: impl FnOnce(&str) -> Option<String>,
    now: SystemTime,
) -> Result<String, SigningError> {
    let auth = parse_authorization(
        req.header("authorization")
            .ok_or(SigningError::MissingAuthorization)?,
    )?;
    for required in ["host", "x-sdk-date"] {
        if !auth.signed_headers.iter().any(|h| h == required) {
            return Err(SigningError::UnsignedHeader(if required == "host" {
                "host"
            } else {
                "x-sdk-date"
            }));
        }
    }
    if req.header("x-project-id").is_some()
        && !auth.signed_headers.iter().any(|h| h == "x-project-id")
    {
        return Err(SigningError::UnsignedHeader("x-project-id"));
    }
    let date = req
        .header("x-sdk-date")
        .ok_or_else(|| SigningError::MissingSignedHeader("x-sdk-date".into()))?
        .trim()
        .to_string();
    let at = parse_sdk_date(&date)?;
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if (now_s - at).unsigned_abs() > MAX_CLOCK_SKEW.as_secs() {
        return Err(SigningError::Skew(date));
    }
    if let (Some(header), Some(path)) = (req.header("x-project-id"), path_project(req.path)) {
        if header.trim() != decode(path) {
            return Err(SigningError::ProjectMismatch {
                header: header.trim().to_string(),
                path: path.to_string(),
            });
        }
    }
    let canonical = canonical_request(req, &auth.signed_headers)?;
    let secret = secret_for(&auth.access).ok_or(SigningError::UnknownKey)?;
    let expected = signature(&canonical, &date, &secret);
    if constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        Ok(auth.access)
    } else {
        Err(SigningError::Mismatch)
    }
}

/// Signs a request as the SDK does (for the `cph` client and tests): adds
/// `X-Sdk-Date` and `Authorization` to `headers`, which must hold `host`.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    path: &str,
    query: &str,
    headers: &mut Vec<(String, String)>,
    body: &[u8],
    ak: &str,
    sk: &str,
    now: SystemTime,
) {
    let date = format_sdk_date(now);
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case("x-sdk-date"));
    headers.push(("X-Sdk-Date".to_string(), date.clone()));
    let mut signed: Vec<String> = headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| !n.contains('_') && n != "authorization")
        .collect();
    signed.sort();
    signed.dedup();
    let req = SignedRequest {
        method,
        path,
        query,
        headers: headers.clone(),
        body,
    };
    // Every signed header is present by construction.
    let canonical = canonical_request(&req, &signed).unwrap_or_default();
    let sig = signature(&canonical, &date, sk);
    headers.push((
        "Authorization".to_string(),
        format!(
            "{ALGORITHM} Access={ak}, SignedHeaders={}, Signature={sig}",
            signed.join(";")
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";
    const SK_A: &str = "SKEXAMPLEsecretKEY/0123456789abcdefghij";

    fn vector_a<'a>(
        method: &'a str,
        path: &'a str,
        query: &'a str,
        body: &'a [u8],
    ) -> SignedRequest<'a> {
        SignedRequest {
            method,
            path,
            query,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("User-Agent".into(), "probe/1.0".into()),
                ("X-Project-Id".into(), PROJECT.into()),
                ("X-Sdk-Date".into(), "20240101T000000Z".into()),
                ("Host".into(), "127.0.0.1:8443".into()),
            ],
            body,
        }
    }

    fn signed_a() -> Vec<String> {
        "content-type;host;user-agent;x-project-id;x-sdk-date"
            .split(';')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn vector_a1_get() {
        let path = format!("/v1/{PROJECT}/cloud-phone/phones");
        let req = vector_a("GET", &path, "limit=10&offset=0", b"");
        let c = canonical_request(&req, &signed_a()).expect("canonical");
        assert_eq!(
            sha256_hex(c.as_bytes()),
            "ca7a0a84e0ea0c36a2802e61b48ad243a3100ce15d33e774cda12f84793b0d97"
        );
        assert_eq!(
            signature(&c, "20240101T000000Z", SK_A),
            "91d2bb499a8c4b4bd52dc12c660b11925e8385a1249fb435d96e47846867e9bc"
        );
    }

    #[test]
    fn vector_a2_post_with_body() {
        let path = format!("/v1/{PROJECT}/cloud-phone/phones/batch-restart");
        let body = br#"{"phones": [{"phone_id": "1234567b8bab40ffb711234cb80d0234", "property": "{\"com.cph.mainkeys\":1}"}]}"#;
        assert_eq!(body.len(), 102);
        assert_eq!(
            sha256_hex(body),
            "1417d5a99c515d991987f1502aabaf123ae082faf1b87890392eb8c97bfe9f73"
        );
        let req = vector_a("POST", &path, "", body);
        let c = canonical_request(&req, &signed_a()).expect("canonical");
        assert_eq!(
            sha256_hex(c.as_bytes()),
            "014cbbe83b7a50a354dd1f16ec040e82f7c90414bb7b29b54915441d595b303a"
        );
        assert_eq!(
            signature(&c, "20240101T000000Z", SK_A),
            "481381c119ec02ec0692638a616f00de4674899795a78d18ac3303e092f7fe53"
        );
    }

    #[test]
    fn vector_b_unsorted_query() {
        let req = SignedRequest {
            method: "GET",
            path: "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            query: "marker=13551d6b-755d-4757-b956-536f674975c0&limit=2",
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Host".into(), "service.region.example.com".into()),
                ("X-Sdk-Date".into(), "20191115T033655Z".into()),
                (
                    "Authorization".into(),
                    "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe".into(),
                ),
            ],
            body: b"",
        };
        let signed: Vec<String> = ["content-type", "host", "x-sdk-date"]
            .map(String::from)
            .to_vec();
        let c = canonical_request(&req, &signed).expect("canonical");
        assert_eq!(
            sha256_hex(c.as_bytes()),
            "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"
        );
        let at = UNIX_EPOCH
            + Duration::from_secs(parse_sdk_date("20191115T033655Z").expect("date") as u64);
        let ak = verify(
            &req,
            |_| Some("MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc".into()),
            at,
        )
        .expect("verifies");
        assert_eq!(ak, "QTWAOYTTINDUT2QVKYUC");
        assert_eq!(
            verify(&req, |_| Some("wrong".into()), at),
            Err(SigningError::Mismatch)
        );
        let late = at + Duration::from_secs(16 * 60);
        assert!(matches!(
            verify(&req, |_| Some("x".into()), late),
            Err(SigningError::Skew(_))
        ));
    }

    #[test]
    fn canonical_corner_cases() {
        assert_eq!(
            canonical_uri("/phones/a%20b%2Fc~d%25e"),
            "/phones/a%20b/c~d%25e/"
        );
        assert_eq!(canonical_uri("/a//b"), "/a//b/");
        assert_eq!(canonical_uri("/x/"), "/x/");
        assert_eq!(
            canonical_query("phone_name=%E6%89%8B%E6%9C%BA%20a%2Bb~c%2A&limit=1"),
            "limit=1&phone_name=%E6%89%8B%E6%9C%BA%20a%2Bb~c%2A"
        );
        assert_eq!(canonical_query("a&b=&&c=1"), "a=&b=&c=1");
    }

    #[test]
    fn dates_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = format_sdk_date(t);
        assert_eq!(s, "20231114T221320Z");
        assert_eq!(parse_sdk_date(&s).expect("parses"), 1_700_000_000);
        assert!(parse_sdk_date("2023-11-14T22:13:20Z").is_err());
        assert!(parse_sdk_date("20231314T221320Z").is_err());
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let now = SystemTime::now();
        let path = format!("/v1/{PROJECT}/cloud-phone/phones");
        let mut headers = vec![
            ("Host".to_string(), "127.0.0.1:1".to_string()),
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Project-Id".to_string(), PROJECT.to_string()),
        ];
        sign(
            "POST",
            &path,
            "limit=1",
            &mut headers,
            b"{}",
            "AK1",
            "SK1",
            now,
        );
        let req = SignedRequest {
            method: "POST",
            path: &path,
            query: "limit=1",
            headers: headers.clone(),
            body: b"{}",
        };
        assert_eq!(
            verify(&req, |_| Some("SK1".into()), now).as_deref(),
            Ok("AK1")
        );
        let body = SignedRequest {
            body: b"{ }",
            ..req.clone()
        };
        assert_eq!(
            verify(&body, |_| Some("SK1".into()), now),
            Err(SigningError::Mismatch)
        );
        let query = SignedRequest {
            query: "limit=2",
            ..req.clone()
        };
        assert_eq!(
            verify(&query, |_| Some("SK1".into()), now),
            Err(SigningError::Mismatch)
        );
        assert_eq!(verify(&req, |_| None, now), Err(SigningError::UnknownKey));
        let other = format!("/v1/{}/cloud-phone/phones", "f".repeat(32));
        let moved = SignedRequest {
            path: &other,
            ..req.clone()
        };
        assert!(matches!(
            verify(&moved, |_| Some("SK1".into()), now),
            Err(SigningError::ProjectMismatch { .. })
        ));
        let early = now - Duration::from_secs(20 * 60);
        assert!(matches!(
            verify(&req, |_| Some("SK1".into()), early),
            Err(SigningError::Skew(_))
        ));
        let mut no_auth = req.clone();
        no_auth.headers.retain(|(n, _)| n != "Authorization");
        assert_eq!(
            verify(&no_auth, |_| Some("SK1".into()), now),
            Err(SigningError::MissingAuthorization)
        );
    }

    #[test]
    fn other_algorithms_refused() {
        assert_eq!(
            parse_authorization("SDK-HMAC-SM3 Access=a, SignedHeaders=host, Signature=x"),
            Err(SigningError::Algorithm("SDK-HMAC-SM3".into()))
        );
        assert_eq!(
            parse_authorization("SDK-HMAC-SHA256 SignedHeaders=host, Signature=x"),
            Err(SigningError::MissingField("Access"))
        );
    }
}
