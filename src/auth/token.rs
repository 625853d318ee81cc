//! The secrets of IAM users: passwords, kept as salted PBKDF2-HMAC-SHA256
//! hashes, and the tokens `POST /v3/auth/tokens` issues, of which only the
//! SHA-256 is stored.

use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};

use super::signing::{constant_time_eq, hmac_sha256};

/// PBKDF2 iterations of a password hash.
pub const PBKDF2_ROUNDS: u32 = 100_000;

/// A stored password hash that is not of this module's form.
#[derive(Debug, thiserror::Error)]
#[error("password hash {0:?} is not of the form pbkdf2-sha256$rounds$salt$hash")]
pub struct BadHash(String);

/// Lower-case hex SHA-256 of a token (the stored form).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
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
    let key = cph_agent::connect::hmac_key_block(password);
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
pub fn verify_password(password: &str, stored: &str) -> Result<bool, BadHash> {
    let bad = || BadHash(stored.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_as_their_hash() {
        let h = hash_token("abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash_token("abd"), h);
    }

    #[test]
    fn passwords() {
        let h = hash_password("s3cret", b"0123456789abcdef");
        assert!(h.starts_with("pbkdf2-sha256$100000$30313233"), "{h}");
        assert!(verify_password("s3cret", &h).expect("verify"));
        assert!(!verify_password("s3cret!", &h).expect("verify"));
        assert_ne!(h, hash_password("s3cret", b"0123456789abcdeF"));
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
}
