//! The signed envelope that carries verified claims into the upstream session.
//!
//! The proxy sets one custom setting, [`SETTING`], in the upstream startup
//! packet, so it never appears in query text that other sessions can see in
//! `pg_stat_activity`, and `RESET ALL`/`DISCARD ALL` restore it rather than
//! clear it. Its value is `KID.PAYLOAD.MAC`:
//!
//! - `KID`: the first 8 bytes of SHA-256 of the signing key, in hex;
//! - `PAYLOAD`: standard base64 of `{"v":1,"user":…,"exp":…,"claims":{…}}`,
//!   where `user` is the upstream login role, `exp` the end of validity, and
//!   `claims` null for roles served without a token;
//! - `MAC`: hex HMAC-SHA256 of `KID.PAYLOAD` under the signing key.
//!
//! The `auth` schema (see `auth_schema.sql`) recomputes the MAC from key pads
//! that only its owner can read, so a client that `SET`s the value to anything
//! else gets SQLSTATE 28000 instead of someone else's identity.

use std::fmt;

use aws_lc_rs::{digest, hmac};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value};

/// The custom setting that holds the envelope.
pub const SETTING: &str = "rlsgate.session";

/// The key shared by the proxy and the database.
#[derive(Clone)]
pub struct SigningKey {
    id: String,
    key: hmac::Key,
    bytes: Vec<u8>,
}

impl SigningKey {
    pub const MIN_LEN: usize = 32;

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < Self::MIN_LEN {
            return Err(format!(
                "the signing key must be at least {} bytes, this one has {}; make one with `openssl rand -base64 32`",
                Self::MIN_LEN,
                bytes.len()
            ));
        }
        Ok(SigningKey {
            id: key_id(&bytes),
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            bytes,
        })
    }

    pub fn from_base64(text: &str) -> Result<Self, String> {
        let bytes = STANDARD.decode(text.trim()).map_err(|_| {
            "the signing key must be base64 (e.g. `openssl rand -base64 32`)".to_owned()
        })?;
        Self::from_bytes(bytes)
    }

    /// A short public fingerprint naming the key in the database's key table.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The setting value binding `claims` to a session of `upstream_user`
    /// until `valid_until` (unix seconds). Sessions of roles served without a
    /// token get `None`, sealed too: then an empty value can only mean that
    /// someone cleared it, and `auth.session()` refuses it.
    pub fn seal(
        &self,
        upstream_user: &str,
        valid_until: u64,
        claims: Option<&Map<String, Value>>,
    ) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            v: u8,
            user: &'a str,
            exp: u64,
            claims: Option<&'a Map<String, Value>>,
        }
        let envelope = Envelope {
            v: 1,
            user: upstream_user,
            exp: valid_until,
            claims,
        };
        let json = serde_json::to_vec(&envelope).expect("claims serialize");
        let mut sealed = format!("{}.{}", self.id, STANDARD.encode(json));
        let mac = hmac::sign(&self.key, sealed.as_bytes());
        sealed.push('.');
        sealed.push_str(&hex::encode(mac.as_ref()));
        sealed
    }
}

impl TryFrom<String> for SigningKey {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::from_base64(&text)
    }
}

impl<'de> serde::Deserialize<'de> for SigningKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::try_from(text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

/// The key id: first 8 bytes of SHA-256 of the key, in lowercase hex.
pub fn key_id(key: &[u8]) -> String {
    hex::encode(&digest::digest(&digest::SHA256, key).as_ref()[..8])
}

/// HMAC-SHA256 block size: keys are padded (or first hashed) to this length.
const BLOCK_LEN: usize = 64;

/// The 64-byte HMAC pads for a signing key, and its key id (see the contract).
pub struct KeyPads {
    pub key_id: String,
    pub inner: [u8; 64],
    pub outer: [u8; 64],
}

impl fmt::Debug for KeyPads {
    // The pads are key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPads({})", self.key_id)
    }
}

/// RFC 2104: `HMAC(K, m) = H(outer || H(inner || m))`.
pub fn key_pads(key: &[u8]) -> KeyPads {
    let mut block = [0u8; BLOCK_LEN];
    if key.len() > BLOCK_LEN {
        let hashed = digest::digest(&digest::SHA256, key);
        block[..hashed.as_ref().len()].copy_from_slice(hashed.as_ref());
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    KeyPads {
        key_id: key_id(key),
        inner: block.map(|b| b ^ 0x36),
        outer: block.map(|b| b ^ 0x5c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_has_the_documented_shape() {
        let key = SigningKey::from_bytes(vec![7; 32]).unwrap();
        let mut claims = Map::new();
        claims.insert("sub".into(), "alice".into());
        let sealed = key.seal("authenticated", 1_900_000_000, Some(&claims));
        let parts: Vec<&str> = sealed.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], key.id());
        let envelope: Value = serde_json::from_slice(&STANDARD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            envelope,
            serde_json::json!({"v":1,"user":"authenticated","exp":1_900_000_000u64,"claims":{"sub":"alice"}})
        );
        let expected = hmac::sign(&key.key, format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert_eq!(parts[2], hex::encode(expected.as_ref()));
    }

    #[test]
    fn short_keys_are_refused() {
        let err = SigningKey::from_base64("c2hvcnQ=").unwrap_err();
        assert!(err.contains("at least 32 bytes"), "{err}");
    }
}
