//! Every asymmetric algorithm the proxy accepts works end to end, and a
//! token whose header `alg` does not fit the key it names is refused
//! (SQLSTATE 28000).
//!
//! A second `[[provider]]` is backed by a `DevIssuer` holding one RSA key
//! (published without `alg`, so it signs under all six RSA algorithms), one
//! P-256, one P-384 and one Ed25519 key.

use crate::support::{Harness, user_id_of};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use rlsgate::dev::issuer::{DevIssuer, KeyKind, SigningKeyPair};
use serde_json::{Value, json};

/// The provider's keys, one of each kind, and the issuer serving them.
struct Keys {
    rsa: SigningKeyPair,
    p256: SigningKeyPair,
    p384: SigningKeyPair,
    ed25519: SigningKeyPair,
    issuer: DevIssuer,
}

impl Keys {
    async fn start() -> Keys {
        let [rsa, p256, p384, ed25519] = tokio::task::spawn_blocking(|| {
            [
                KeyKind::Rs256,
                KeyKind::Es256,
                KeyKind::Es384,
                KeyKind::EdDsa,
            ]
            .map(|kind| SigningKeyPair::generate(kind).unwrap())
        })
        .await
        .unwrap();
        let rsa = rsa.without_jwk_alg();
        let issuer = DevIssuer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            None,
            vec![rsa.clone(), p256.clone(), p384.clone(), ed25519.clone()],
        )
        .await
        .expect("start a key server");
        Keys {
            rsa,
            p256,
            p384,
            ed25519,
            issuer,
        }
    }

    /// The key that signs as `alg`.
    fn for_alg(&self, alg: Algorithm) -> &SigningKeyPair {
        [&self.rsa, &self.p256, &self.p384, &self.ed25519]
            .into_iter()
            .find(|key| key.kind().signs_as(alg))
            .unwrap_or_else(|| panic!("no key signs as {alg:?}"))
    }

    /// Claims from this issuer for `sub`, valid for an hour.
    fn claims(&self, sub: &str) -> Value {
        json!({ "iss": self.issuer.issuer(), "sub": sub, "exp": crate::support::unix_now() + 3600 })
    }
}

/// The harness, with a second provider whose keys are `keys`.
async fn harness(keys: &Keys) -> Harness {
    Harness::start_with(&format!(
        "[[provider]]\nissuer = \"{}\"\njwks_url = \"{}\"\nleeway = \"2s\"\n",
        keys.issuer.issuer(),
        keys.issuer.jwks_url()
    ))
    .await
}

/// A token whose header says `header_alg` and names `key`'s kid, signed by
/// `key` under `signed_as` (which may differ from the header).
fn forged(key: &SigningKeyPair, header_alg: &str, signed_as: Algorithm, claims: &Value) -> String {
    let header = json!({ "alg": header_alg, "typ": "JWT", "kid": key.kid() });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pem = key.to_pem();
    let encoding = match key.kind() {
        KeyKind::Rs256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        KeyKind::Es256 | KeyKind::Es384 => EncodingKey::from_ec_pem(pem.as_bytes()),
        KeyKind::EdDsa => EncodingKey::from_ed_pem(pem.as_bytes()),
    }
    .unwrap();
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &encoding, signed_as).unwrap();
    format!("{input}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_with_each_accepted_algorithm_connects_as_its_subject() {
    use Algorithm::*;
    let keys = Keys::start().await;
    let h = harness(&keys).await;
    for alg in [
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ] {
        let sub = format!("user-{alg:?}");
        let token = keys.for_alg(alg).sign_as(alg, &keys.claims(&sub));
        assert_eq!(
            crate::support::jwt_header(&token)["alg"],
            format!("{alg:?}")
        );
        let client = h
            .connect("authenticated", &token)
            .await
            .unwrap_or_else(|e| panic!("{alg:?} must be accepted: {e}"));
        assert_eq!(user_id_of(&client).await.as_deref(), Some(sub.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_alg_that_does_not_fit_its_key_is_refused() {
    use Algorithm::*;
    let keys = Keys::start().await;
    let h = harness(&keys).await;
    let claims = keys.claims("mallory");
    // (key named by kid, header alg, how it is really signed, refusal says)
    let mismatch = "does not match key";
    let bad_signature = "signature does not verify";
    let cases = [
        (&keys.p256, "ES384", ES256, mismatch),
        (&keys.p384, "ES256", ES384, mismatch),
        (&keys.rsa, "ES256", RS256, mismatch),
        (&keys.rsa, "EdDSA", RS256, mismatch),
        (&keys.ed25519, "RS256", EdDSA, mismatch),
        (&keys.p256, "PS256", ES256, mismatch),
        // Both RSA algorithms fit an RSA key: the signature decides.
        (&keys.rsa, "PS256", RS256, bad_signature),
        (&keys.rsa, "RS256", PS256, bad_signature),
        (&keys.rsa, "RS512", RS256, bad_signature),
        (&keys.rsa, "PS384", PS512, bad_signature),
    ];
    for (key, header_alg, signed_as, expected) in cases {
        let token = forged(key, header_alg, signed_as, &claims);
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains(expected),
            "{header_alg} header on a {:?} key signed as {signed_as:?}: {message}",
            key.kind()
        );
    }
    // The forging itself is sound: a header that matches is accepted.
    let honest = forged(&keys.p384, "ES384", ES384, &claims);
    let client = h.connect("authenticated", &honest).await.unwrap();
    assert_eq!(user_id_of(&client).await.as_deref(), Some("mallory"));
}
