//! IAM-compatible tokens (`X-Auth-Token`) and user passwords.
//!
//! `POST /v3/auth/tokens` with the password method returns an opaque random token in the
//! `X-Subject-Token` header, valid 24 hours and bound to one user and project. Only the
//! token's SHA-256 is stored; passwords are kept as salted PBKDF2-HMAC-SHA256 hashes.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};

use super::error::AuthError;
use super::signing::{constant_time_eq, format_sdk_date, hmac_sha256};

/// How long an issued token is valid.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// PBKDF2 iterations of a password hash.
pub const PBKDF2_ROUNDS: u32 = 100_000;
const TOKEN_BYTES: usize = 32;

/// Failures of token and password primitives.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading random bytes from /dev/urandom failed: {0}")]
    Random(#[from] std::io::Error),
    #[error("password hash {0:?} is not of the form pbkdf2-sha256$rounds$salt$hash")]
    BadHash(String),
}

/// A token as the store keeps it: only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Lower-case hex SHA-256 of the token.
    pub token_hash: String,
    pub user: String,
    pub project_id: String,
    /// Seconds since the epoch.
    pub issued_at: i64,
    /// Seconds since the epoch.
    pub expires_at: i64,
}

/// A freshly issued token: the secret for the client and the record to store.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub record: TokenRecord,
}

fn random_bytes(n: usize) -> Result<Vec<u8>, TokenError> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

fn epoch_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Lower-case hex SHA-256 of a token (the stored form).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Issues a random 32-byte token (64 hex characters) for a user and project.
pub fn issue(user: &str, project_id: &str, now: SystemTime) -> Result<IssuedToken, TokenError> {
    let token = hex::encode(random_bytes(TOKEN_BYTES)?);
    let issued_at = epoch_secs(now);
    Ok(IssuedToken {
        record: TokenRecord {
            token_hash: hash_token(&token),
            user: user.to_string(),
            project_id: project_id.to_string(),
            issued_at,
            expires_at: issued_at + TOKEN_VALIDITY.as_secs() as i64,
        },
        token,
    })
}

/// Checks a presented token against the stored record (hash in constant time, expiry).
pub fn check(token: &str, record: &TokenRecord, now: SystemTime) -> Result<(), AuthError> {
    if !constant_time_eq(hash_token(token).as_bytes(), record.token_hash.as_bytes()) {
        return Err(AuthError::UnknownToken);
    }
    if epoch_secs(now) >= record.expires_at {
        return Err(AuthError::TokenExpired);
    }
    Ok(())
}

/// Keystone's time format: `2026-01-02T03:04:05.000000Z`.
pub fn iso8601(epoch: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(epoch.max(0) as u64);
    let s = format_sdk_date(t);
    format!(
        "{}-{}-{}T{}:{}:{}.000000Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

/// SHA-256's initial state.
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// SHA-256's state after `state` compressed `block`.
fn sha256_compress(mut state: [u32; 8], block: &[u8; 64]) -> [u32; 8] {
    sha2::compress256(&mut state, &[*GenericArray::from_slice(block)]);
    state
}

/// The last block of a hash over one 64-byte block and then `digest`.
fn digest_block(digest: &[u8; 32]) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(digest);
    block[32] = 0x80;
    // The message's length in bits: 64 + 32 bytes.
    block[56..].copy_from_slice(&(96u64 * 8).to_be_bytes());
    block
}

fn state_bytes(state: [u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// PBKDF2-HMAC-SHA256, one block (32 bytes). After the first, every round
/// is an HMAC of a 32-byte digest: the key's inner and outer states are
/// computed once and each round costs two compressions (the textbook form
/// takes four), done by the `sha2` crate's compression function directly.
fn pbkdf2_sha256(password: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut key = [0u8; 64];
    if password.len() > key.len() {
        key[..32].copy_from_slice(&Sha256::digest(password));
    } else {
        key[..password.len()].copy_from_slice(password);
    }
    let inner = sha256_compress(SHA256_IV, &key.map(|b| b ^ 0x36));
    let outer = sha256_compress(SHA256_IV, &key.map(|b| b ^ 0x5c));
    let mut msg = salt.to_vec();
    msg.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac_sha256(password, &msg);
    let mut out = u;
    for _ in 1..rounds {
        let inner_digest = state_bytes(sha256_compress(inner, &digest_block(&u)));
        u = state_bytes(sha256_compress(outer, &digest_block(&inner_digest)));
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

/// Hashes a password with a random `salt` (16 bytes or more):
/// `pbkdf2-sha256$<rounds>$<salt hex>$<hash hex>`.
pub fn hash_password(password: &str, salt: &[u8]) -> String {
    let hash = pbkdf2_sha256(password.as_bytes(), salt, PBKDF2_ROUNDS);
    format!(
        "pbkdf2-sha256${PBKDF2_ROUNDS}${}${}",
        hex::encode(salt),
        hex::encode(hash)
    )
}

/// Verifies a password against a stored hash, comparing in constant time.
pub fn verify_password(password: &str, stored: &str) -> Result<bool, TokenError> {
    let bad = || TokenError::BadHash(stored.to_string());
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, rounds, salt, hash] = parts[..] else {
        return Err(bad());
    };
    let rounds: u32 = rounds.parse().map_err(|_| bad())?;
    let salt = hex::decode(salt).map_err(|_| bad())?;
    let hash = hex::decode(hash).map_err(|_| bad())?;
    if scheme != "pbkdf2-sha256" || rounds == 0 {
        return Err(bad());
    }
    let got = pbkdf2_sha256(password.as_bytes(), &salt, rounds);
    Ok(constant_time_eq(&got, &hash))
}

// ---- wire types of POST /v3/auth/tokens and GET /v3/projects ----

/// Body of `POST /v3/auth/tokens`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TokenRequest {
    pub auth: AuthBody,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AuthBody {
    pub identity: Identity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Identity {
    /// Must contain `"password"`.
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordIdentity>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PasswordIdentity {
    pub user: PasswordUser,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PasswordUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<NameOrId>,
}

/// `{"id": ...}` or `{"name": ...}` (both optional on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct NameOrId {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<NameOrId>,
}

impl TokenRequest {
    /// The user name, password, domain name and project (id or name) of a password request.
    pub fn password_parts(&self) -> Option<(&PasswordUser, Option<&NameOrId>)> {
        if !self.auth.identity.methods.iter().any(|m| m == "password") {
            return None;
        }
        let user = &self.auth.identity.password.as_ref()?.user;
        Some((
            user,
            self.auth.scope.as_ref().and_then(|s| s.project.as_ref()),
        ))
    }
}

/// Body of the `POST /v3/auth/tokens` answer (201, token in `X-Subject-Token`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: TokenBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenBody {
    pub methods: Vec<String>,
    pub expires_at: String,
    pub issued_at: String,
    pub user: TokenUser,
    pub project: TokenProject,
    pub roles: Vec<NameOrId>,
    pub catalog: Vec<CatalogEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenUser {
    pub id: String,
    pub name: String,
    pub domain: NameOrId,
    pub password_expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenProject {
    pub id: String,
    pub name: String,
    pub domain: NameOrId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub endpoints: Vec<CatalogEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogEndpoint {
    pub id: String,
    pub interface: String,
    pub region: String,
    pub region_id: String,
    pub url: String,
}

impl TokenBody {
    /// The answer for an issued token; `endpoint` is this control plane's URL.
    pub fn new(
        record: &TokenRecord,
        user_id: &str,
        domain: &str,
        project_name: &str,
        endpoint: &str,
    ) -> Self {
        let domain = NameOrId {
            id: Some(domain.to_string()),
            name: Some(domain.to_string()),
        };
        TokenBody {
            methods: vec!["password".to_string()],
            expires_at: iso8601(record.expires_at),
            issued_at: iso8601(record.issued_at),
            user: TokenUser {
                id: user_id.to_string(),
                name: record.user.clone(),
                domain: domain.clone(),
                password_expires_at: String::new(),
            },
            project: TokenProject {
                id: record.project_id.clone(),
                name: project_name.to_string(),
                domain,
            },
            roles: vec![NameOrId {
                id: Some("cph_adm".to_string()),
                name: Some("cph_adm".to_string()),
            }],
            catalog: vec![CatalogEntry {
                id: "cph".to_string(),
                kind: "cph".to_string(),
                name: "cph".to_string(),
                endpoints: vec![CatalogEndpoint {
                    id: "cph-local".to_string(),
                    interface: "public".to_string(),
                    region: "local".to_string(),
                    region_id: "local".to_string(),
                    url: endpoint.to_string(),
                }],
            }],
        }
    }
}

/// Body of `GET /v3/projects` (the SDK reads `projects[0].id`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectsResponse {
    pub projects: Vec<ProjectEntry>,
    pub links: ProjectLinks,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectEntry {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub enabled: bool,
    pub is_domain: bool,
    pub parent_id: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectLinks {
    #[serde(rename = "self")]
    pub self_link: String,
    pub next: Option<String>,
    pub previous: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_check() {
        let now = SystemTime::now();
        let t = issue("alice", "p1", now).expect("issue");
        assert_eq!(t.token.len(), 64);
        assert_ne!(t.record.token_hash, t.token);
        assert!(check(&t.token, &t.record, now).is_ok());
        assert_eq!(check("nope", &t.record, now), Err(AuthError::UnknownToken));
        let later = now + TOKEN_VALIDITY + Duration::from_secs(1);
        assert_eq!(
            check(&t.token, &t.record, later),
            Err(AuthError::TokenExpired)
        );
        let other = issue("alice", "p1", now).expect("issue");
        assert_ne!(other.token, t.token);
    }

    #[test]
    fn passwords() {
        let salt = random_bytes(16).expect("salt");
        let h = hash_password("s3cret", &salt);
        assert!(verify_password("s3cret", &h).expect("verify"));
        assert!(!verify_password("s3cret!", &h).expect("verify"));
        assert_ne!(h, hash_password("s3cret", &random_bytes(16).expect("salt")));
        assert!(verify_password("x", "plain").is_err());
    }

    #[test]
    fn pbkdf2_rfc7914_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", 1), first 32 bytes.
        assert_eq!(
            hex::encode(pbkdf2_sha256(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
        // Many rounds, and a password longer than the HMAC's block (hashed
        // first); values from Python's hashlib.pbkdf2_hmac.
        assert_eq!(
            hex::encode(pbkdf2_sha256(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
        assert_eq!(
            hex::encode(pbkdf2_sha256(&[b'x'; 100], b"salt", 2)),
            "d43a18cd77bafc1a4b0c6025dbbf29c7e6d67acce6ad02a736d4a3003b6a3c26"
        );
    }

    #[test]
    fn token_request_parses_and_response_shape() {
        let body = r#"{"auth":{"identity":{"methods":["password"],"password":{"user":
            {"name":"alice","password":"pw","domain":{"name":"dom"}}}},
            "scope":{"project":{"name":"cn-north-4"}}}}"#;
        let req: TokenRequest = serde_json::from_str(body).expect("parses");
        let (user, project) = req.password_parts().expect("password method");
        assert_eq!(user.name.as_deref(), Some("alice"));
        assert_eq!(project.and_then(|p| p.name.as_deref()), Some("cn-north-4"));
        let rec = TokenRecord {
            token_hash: String::new(),
            user: "alice".into(),
            project_id: "p1".into(),
            issued_at: 1_700_000_000,
            expires_at: 1_700_086_400,
        };
        let v = serde_json::to_value(TokenResponse {
            token: TokenBody::new(&rec, "u1", "dom", "cn-north-4", "http://127.0.0.1:8443"),
        })
        .expect("json");
        assert_eq!(v["token"]["expires_at"], "2023-11-15T22:13:20.000000Z");
        assert_eq!(v["token"]["project"]["id"], "p1");
        assert_eq!(v["token"]["catalog"][0]["type"], "cph");
    }
}
