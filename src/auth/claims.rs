//! The signed envelope that carries verified claims into the upstream session.
//!
//! Every upstream session starts with the custom setting [`SETTING`] empty
//! (in its startup packet). Right after login, once the backend's process id
//! and start time are known, the proxy binds the envelope with `set_config`
//! as a bound parameter, so it never appears in query text that other
//! sessions can see in `pg_stat_activity`; `RESET`, `RESET ALL` and
//! `DISCARD ALL` return it to empty, which the `auth` functions refuse. Its
//! value is `KID.PAYLOAD.MAC`:
//!
//! - `KID`: the first 8 bytes of SHA-256 of the signing key, in hex;
//! - `PAYLOAD`: standard base64 of
//!   `{"v":2,"user":…,"pid":…,"started":…,"exp":…,"claims":{…}}`, where
//!   `user` is the upstream login role, `pid` and `started` name the one
//!   backend it is valid in (its process id, and its start in microseconds
//!   since 1970: a reused process id has another start), `exp` the end of
//!   validity, and `claims` null for roles served without a token;
//! - `MAC`: hex HMAC-SHA256 of `KID.PAYLOAD` under the signing key.
//!
//! The `auth` schema (see `auth_schema_v2.sql`) recomputes the MAC from key
//! pads that only its owner can read and compares the backend and the expiry,
//! so a client that `SET`s the value to anything else, or to an envelope of
//! another session, gets SQLSTATE 28000 instead of someone else's identity.
//!
//! An envelope lives at most [`LIFETIME`]; a session that outlives that (its
//! token lasts longer, or it has none) gets a fresh one from the relay at a
//! moment when the session is idle (see [`Identity::refresh_due`]).

use std::fmt;
use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value};

/// The custom setting that holds the envelope.
pub(crate) const SETTING: &str = "rlsgate.session";

/// The longest an envelope is valid, unless `[claims] envelope_lifetime`
/// says otherwise. Short enough that an envelope copied
/// out of a session (or out of a server log) is soon worthless even in the
/// backend it names; long enough that a transaction begun while it was
/// fresh rarely outlives it (the relay refreshes envelopes only between
/// transactions).
pub(crate) const LIFETIME: Duration = Duration::from_secs(3600);

/// The upstream backend an envelope is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub pid: i32,
    /// `pg_stat_activity.backend_start`, in microseconds since 1970, as
    /// `auth.session()` computes it.
    pub started: i64,
}

/// What a session's envelopes say: the verified claims (none for roles
/// served without a token) and until when the session may use them.
#[derive(Debug, Clone)]
pub struct Identity {
    pub upstream_user: String,
    pub claims: Option<Map<String, Value>>,
    /// Unix seconds: the token's expiry plus leeway, or [`NO_EXPIRY`] when
    /// the session does not end with a token.
    pub valid_until: u64,
    /// How long one envelope lives (`[claims] envelope_lifetime`).
    pub lifetime: Duration,
}

/// Validity of a session that does not end with a token: roles served
/// without one, and sessions allowed to outlive theirs (year 2106). Each of
/// their envelopes still expires after [`LIFETIME`].
pub(crate) const NO_EXPIRY: u64 = u32::MAX as u64;

impl Identity {
    /// When an envelope sealed at `now` for this identity expires.
    pub(crate) fn envelope_expiry(&self, now: u64) -> u64 {
        self.valid_until
            .min(now.saturating_add(self.lifetime.as_secs()))
    }

    /// Whether an envelope expiring at `exp` should be replaced at `now`:
    /// it ends before the session may, and half its lifetime is gone.
    pub(crate) fn refresh_due(&self, exp: u64, now: u64) -> bool {
        exp < self.valid_until && exp.saturating_sub(now) < self.lifetime.as_secs() / 2
    }
}

/// One session's envelope: sealed for its backend, replaced when due.
pub(crate) struct Envelope {
    key: SigningKey,
    identity: Identity,
    backend: Backend,
    /// When the envelope bound now expires.
    exp: u64,
}

impl Envelope {
    /// The envelope bound to `backend`, expiring at `exp`.
    pub(crate) fn new(key: SigningKey, identity: Identity, backend: Backend, exp: u64) -> Envelope {
        Envelope {
            key,
            identity,
            backend,
            exp,
        }
    }

    /// A fresh envelope when the one bound is due for replacement at `now`.
    pub(crate) fn renew(&mut self, now: u64) -> Option<String> {
        if !self.identity.refresh_due(self.exp, now) {
            return None;
        }
        self.exp = self.identity.envelope_expiry(now);
        Some(self.key.seal(&self.identity, self.backend, self.exp))
    }
}

/// Why a configured signing key cannot be used. The messages say how to
/// make a good one and never show the key.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("the signing key must be base64 (e.g. `openssl rand -base64 32`)")]
    NotBase64,
    #[error(
        "the signing key must be at least {min} bytes, this one has {len}; make one with `openssl rand -base64 32`",
        min = SigningKey::MIN_LEN
    )]
    TooShort { len: usize },
}

/// The key shared by the proxy and the database.
#[derive(Clone)]
pub struct SigningKey {
    id: String,
    key: hmac::Key,
    bytes: Vec<u8>,
}

impl SigningKey {
    pub(crate) const MIN_LEN: usize = 32;

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SigningKeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(SigningKeyError::TooShort { len: bytes.len() });
        }
        Ok(SigningKey {
            id: key_id(&bytes),
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            bytes,
        })
    }

    pub fn from_base64(text: &str) -> Result<Self, SigningKeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| SigningKeyError::NotBase64)?;
        Self::from_bytes(bytes)
    }

    /// A short public fingerprint naming the key in the database's key table.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The setting value binding `identity` to `backend` until `exp` (unix
    /// seconds). Sessions of roles served without a token get null claims,
    /// sealed too: then an empty value can only mean that it was cleared, and
    /// `auth.session()` refuses it.
    pub fn seal(&self, identity: &Identity, backend: Backend, exp: u64) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            v: u8,
            user: &'a str,
            pid: i32,
            started: i64,
            exp: u64,
            claims: Option<&'a Map<String, Value>>,
        }
        let envelope = Envelope {
            v: 2,
            user: &identity.upstream_user,
            pid: backend.pid,
            started: backend.started,
            exp,
            claims: identity.claims.as_ref(),
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
    type Error = SigningKeyError;
    fn try_from(text: String) -> Result<Self, SigningKeyError> {
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
pub(crate) fn key_id(key: &[u8]) -> String {
    hex::encode(&digest::digest(&digest::SHA256, key).as_ref()[..8])
}

/// HMAC-SHA256 block size: keys are padded (or first hashed) to this length.
const BLOCK_LEN: usize = 64;

/// The 64-byte HMAC pads for a signing key, and its key id (see the contract).
pub(crate) struct KeyPads {
    pub(crate) key_id: String,
    pub(crate) inner: [u8; 64],
    pub(crate) outer: [u8; 64],
}

impl fmt::Debug for KeyPads {
    // The pads are key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPads({})", self.key_id)
    }
}

/// RFC 2104: `HMAC(K, m) = H(outer || H(inner || m))`.
pub(crate) fn key_pads(key: &[u8]) -> KeyPads {
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
        let identity = Identity {
            upstream_user: "authenticated".into(),
            claims: Some(claims),
            valid_until: NO_EXPIRY,
            lifetime: LIFETIME,
        };
        let backend = Backend {
            pid: 4242,
            started: 1_764_585_600_123_456,
        };
        let sealed = key.seal(&identity, backend, 1_900_000_000);
        let parts: Vec<&str> = sealed.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], key.id());
        let envelope: Value = serde_json::from_slice(&STANDARD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            envelope,
            serde_json::json!({
                "v": 2,
                "user": "authenticated",
                "pid": 4242,
                "started": 1_764_585_600_123_456i64,
                "exp": 1_900_000_000u64,
                "claims": {"sub": "alice"}
            })
        );
        let expected = hmac::sign(&key.key, format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert_eq!(parts[2], hex::encode(expected.as_ref()));
    }

    #[test]
    fn envelopes_live_at_most_an_hour_and_are_refreshed_in_their_second_half() {
        let now = 1_800_000_000;
        let lasting = Identity {
            upstream_user: "anonymous".into(),
            claims: None,
            valid_until: NO_EXPIRY,
            lifetime: LIFETIME,
        };
        let exp = lasting.envelope_expiry(now);
        assert_eq!(exp, now + 3600);
        assert!(!lasting.refresh_due(exp, now + 1799));
        assert!(lasting.refresh_due(exp, now + 1801));
        assert!(lasting.refresh_due(exp, now + 4000), "an expired one too");

        let token = Identity {
            valid_until: now + 600,
            ..lasting
        };
        let exp = token.envelope_expiry(now);
        assert_eq!(exp, now + 600, "never beyond the token's own expiry");
        assert!(
            !token.refresh_due(exp, now + 590),
            "the session ends with it"
        );
    }

    #[test]
    fn short_and_garbled_keys_are_refused_with_how_to_make_one() {
        let short = SigningKey::from_base64("c2hvcnQ=").unwrap_err();
        assert!(
            matches!(short, SigningKeyError::TooShort { len: 5 }),
            "{short:?}"
        );
        assert_eq!(
            short.to_string(),
            "the signing key must be at least 32 bytes, this one has 5; make one with \
             `openssl rand -base64 32`"
        );
        let garbled = SigningKey::from_base64("not base64!").unwrap_err();
        assert!(matches!(garbled, SigningKeyError::NotBase64), "{garbled:?}");
        assert_eq!(
            garbled.to_string(),
            "the signing key must be base64 (e.g. `openssl rand -base64 32`)"
        );
    }
}
