//! Connection tickets for a phone (the API's `batch-connection`).
//!
//! Every phone holds a key of its own in [`KEY_PATH`], written by its
//! agent beneath the phone's root at each start: the HMAC-SHA256 of the
//! phone's id under the fleet's node token, which the control plane holds
//! too, in 64 hex digits. A connection request is answered with a session
//! id, a timestamp and a ticket: the HMAC-SHA256, under those 64 digits
//! (as text), of four lines: phone id, session id, timestamp and client
//! type. A streaming service in the phone checks a client's ticket with no
//! call out of the phone; each phone's key is its own, so a phone's key
//! opens no other phone.

use sha2::{Digest, Sha256};

/// Where a phone's key is, beneath its root (mode 0600, root's).
pub const KEY_PATH: &str = "data/misc/cph/connect_key";

/// HMAC-SHA256's key as one SHA-256 block: the key, hashed first when
/// longer than the block, padded with zeros (RFC 2104).
pub fn hmac_key_block(key: &[u8]) -> [u8; 64] {
    let mut k = [0u8; 64];
    if key.len() > k.len() {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    k
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let k = hmac_key_block(key);
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The key of phone `phone_id` under the fleet's node token.
pub fn phone_key(node_token: &str, phone_id: &str) -> String {
    let msg = format!("cph-connect-key\n{phone_id}");
    hex::encode(hmac_sha256(node_token.as_bytes(), msg.as_bytes()))
}

/// A ticket for one session of `client_type` with the phone whose key is
/// `phone_key`.
pub fn ticket(
    phone_key: &str,
    phone_id: &str,
    session_id: &str,
    timestamp: &str,
    client_type: &str,
) -> String {
    let msg = format!("{phone_id}\n{session_id}\n{timestamp}\n{client_type}");
    hex::encode(hmac_sha256(phone_key.as_bytes(), msg.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1 and 6 (a key longer than the block).
        let mac = hmac_sha256(&[0x0b; 20], b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn keys_are_per_phone_and_tickets_per_session() {
        let a = phone_key("token", "phone-a");
        assert_eq!(a.len(), 64);
        assert_ne!(a, phone_key("token", "phone-b"));
        assert_ne!(a, phone_key("other-token", "phone-a"));
        let t = ticket(&a, "phone-a", "s1", "1700000000", "ANDROID");
        assert_ne!(t, ticket(&a, "phone-a", "s2", "1700000000", "ANDROID"));
        assert_ne!(t, ticket(&a, "phone-a", "s1", "1700000001", "ANDROID"));
        assert_ne!(t, ticket(&a, "phone-a", "s1", "1700000000", "IOS"));
        // The message is the four lines, keyed with the key's text.
        let msg = "phone-a\ns1\n1700000000\nANDROID";
        assert_eq!(t, hex::encode(hmac_sha256(a.as_bytes(), msg.as_bytes())));
    }
}
