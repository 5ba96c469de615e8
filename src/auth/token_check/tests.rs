//! The token check's rules, one at a time, on tokens signed with real
//! keys and verified through [`TokenChecker::check`] against a JWKS held
//! in memory, as a provider would publish it.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::EncodingKey;
use serde_json::json;

use super::*;
use crate::dev::keys::{self, KeyKind, SigningKeyPair};

const ISSUER: &str = "https://id.example";
/// A second provider that verifies only with a shared secret.
const HS_ISSUER: &str = "https://hs.example";
const SECRET: &str = "a-shared-secret-of-more-than-32-bytes";
/// The first provider's lines in the default configuration.
const PROVIDER: &str = "audience = [\"todo-app\"]\nleeway = \"2s\"\n";
/// The longest piece of attacker text a refusal may repeat.
const ECHO_LIMIT: usize = 100;

/// One published key of every kind, generated once: RSA takes a moment.
fn pairs() -> &'static [SigningKeyPair] {
    static PAIRS: OnceLock<Vec<SigningKeyPair>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        KeyKind::EVERY
            .into_iter()
            .map(|kind| SigningKeyPair::generate(kind).expect("key generation"))
            .collect()
    })
}

fn pair(kind: KeyKind) -> &'static SigningKeyPair {
    pairs().iter().find(|p| p.kind() == kind).unwrap()
}

/// The published Ed25519 key, which signs the tokens whose header or
/// claims text a test writes itself.
fn ed() -> &'static SigningKeyPair {
    pair(KeyKind::EdDsa)
}

fn config(provider_lines: &str) -> Config {
    let text = format!(
        r#"
[listen]
address = "127.0.0.1:6432"
[upstream]
host = "127.0.0.1"
[[role]]
name = "authenticated"
token = "required"
[claims]
signing_key = "cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM="
[[provider]]
issuer = "{ISSUER}"
{provider_lines}
[[provider]]
issuer = "{HS_ISSUER}"
hs256_secret = "{SECRET}"
"#
    );
    Config::parse_with_env(&text, |_| None).expect("a valid configuration")
}

/// A checker whose first provider has `lines` and publishes `jwks`,
/// held as if just fetched.
fn checker_publishing(lines: &str, jwks: &Value) -> TokenChecker {
    let config = config(lines);
    let mut checker = TokenChecker::new(&config, reqwest::Client::new());
    let provider = &config.providers[0];
    checker.providers.get_mut(ISSUER).unwrap().keys =
        Some(Arc::new(JwksCache::holding(provider, jwks)));
    checker
}

/// A checker whose first provider has `lines` and publishes every key.
fn checker_with(lines: &str) -> TokenChecker {
    checker_publishing(lines, &keys::jwks(pairs()))
}

fn checker() -> TokenChecker {
    checker_with(PROVIDER)
}

/// The first provider's key cache.
fn key_cache(checker: &TokenChecker) -> &JwksCache {
    checker.providers[ISSUER].keys.as_deref().unwrap()
}

fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER,
        "sub": sub,
        "aud": "todo-app",
        "iat": unix_now(),
        "exp": unix_now() + 3600,
    })
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn parts(token: &str) -> [&str; 3] {
    let parts: Vec<&str> = token.split('.').collect();
    parts.try_into().expect("a JWT has three parts")
}

fn ed_key(pair: &SigningKeyPair) -> EncodingKey {
    EncodingKey::from_ed_pem(pair.to_pem().as_bytes()).unwrap()
}

/// `header.payload` exactly as given, signed by `key` as `alg`.
fn sign_raw(key: &EncodingKey, alg: Algorithm, header: &str, payload: &str) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

/// `header` and `claims` signed by the published Ed25519 key.
fn ed_sign(header: &Value, claims: &Value) -> String {
    ed_raw(&header.to_string(), &claims.to_string())
}

fn ed_raw(header: &str, payload: &str) -> String {
    sign_raw(&ed_key(ed()), Algorithm::EdDSA, header, payload)
}

fn ed_header() -> Value {
    json!({"alg": "EdDSA", "typ": "JWT", "kid": ed().kid()})
}

/// `header` with the members of `extra` added or replaced.
fn with(header: &Value, extra: Value) -> Value {
    let mut header = header.clone();
    for (name, value) in extra.as_object().unwrap() {
        header[name] = value.clone();
    }
    header
}

/// A valid token's claims and signature under `header` (JSON text): for
/// rules that refuse before the signature is checked.
fn with_header(valid: &str, header: &str) -> String {
    let [_, payload, signature] = parts(valid);
    format!("{}.{payload}.{signature}", b64(header))
}

async fn accepted(checker: &TokenChecker, token: &str) -> VerifiedToken {
    checker
        .check(token, "authenticated")
        .await
        .unwrap_or_else(|r| panic!("the token is accepted, not refused: {r}"))
}

/// The refusal of `token`, which must never repeat the token or any of
/// its parts, to the client or to the log.
async fn refused(checker: &TokenChecker, token: &str) -> Refusal {
    let refusal = checker
        .check(token, "authenticated")
        .await
        .expect_err("the token is refused");
    let told = format!(
        "{} {}",
        refusal.message,
        refusal.detail.as_deref().unwrap_or("")
    );
    for part in token.split('.').filter(|p| p.len() >= 16) {
        assert!(
            !told.contains(part),
            "a part of the token is repeated: {told}"
        );
    }
    assert!(
        refusal.message.len() <= 300,
        "the message is {} bytes: {}",
        refusal.message.len(),
        refusal.message
    );
    refusal
}

/// Asserts that the client is told `text` with SQLSTATE 28000, and that
/// the refusal counts as `reason`.
#[track_caller]
fn assert_says(refusal: &Refusal, reason: Reason, text: &str) {
    assert_eq!(
        refusal.sqlstate,
        sqlstate::INVALID_AUTHORIZATION,
        "{refusal}"
    );
    assert!(
        refusal.message.contains(text),
        "expected {text:?}: {refusal}"
    );
    assert_eq!(refusal.reason, reason, "{refusal}");
}

/// Asserts that a message does not repeat a long run of `attacker` text.
#[track_caller]
fn assert_short_echo(message: &str, attacker: &str) {
    let chars: Vec<char> = attacker.chars().collect();
    for window in chars.windows(ECHO_LIMIT + 1) {
        let run: String = window.iter().collect();
        assert!(
            !message.contains(&run),
            "the message repeats more than {ECHO_LIMIT} characters of attacker text: {message}"
        );
    }
}

// The accepted path.

#[tokio::test]
async fn a_token_signed_with_a_published_key_of_any_kind_is_accepted_with_its_claims() {
    let checker = checker();
    for pair in pairs() {
        let claims = claims("alice");
        let verified = accepted(&checker, &pair.sign(&claims)).await;
        assert_eq!(verified.subject(), Some("alice"), "{:?}", pair.kind());
        assert_eq!(verified.claims, *claims.as_object().unwrap());
        assert_eq!(Some(verified.expires_at), claims["exp"].as_u64());
        assert_eq!(checker.leeway(&verified), Duration::from_secs(2));
    }
}

#[tokio::test]
async fn a_token_from_a_provider_with_a_shared_secret_verifies_only_with_that_secret() {
    let checker = checker();
    let mut claims = claims("alice");
    claims["iss"] = json!(HS_ISSUER);
    let header = jsonwebtoken::Header::new(Algorithm::HS256);
    let sign = |secret: &[u8]| {
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    };
    let verified = accepted(&checker, &sign(SECRET.as_bytes())).await;
    assert_eq!(verified.subject(), Some("alice"));

    let other = sign(b"another-secret-of-more-than-32-bytes!");
    let refusal = refused(&checker, &other).await;
    assert_says(
        &refusal,
        Reason::BadSignature,
        "token signature does not verify with the key of https://hs.example",
    );
}

#[tokio::test]
async fn a_provider_with_only_a_shared_secret_refuses_asymmetric_tokens() {
    let checker = checker();
    let mut claims = claims("alice");
    claims["iss"] = json!(HS_ISSUER);
    let refusal = refused(&checker, &pair(KeyKind::Rs256).sign(&claims)).await;
    assert_says(
        &refusal,
        Reason::BadSignature,
        "https://hs.example accepts only HS256 tokens signed with its hs256_secret, not RS256",
    );
}

// The compact serialization: three parts of canonical base64url JSON objects.

#[tokio::test]
async fn an_empty_password_is_refused_as_no_token() {
    let refusal = refused(&checker(), "").await;
    assert_says(&refusal, Reason::Malformed, "a token is required");
}

#[tokio::test]
async fn a_password_of_other_than_three_base64url_json_parts_is_not_a_jwt() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    let [header, payload, signature] = parts(&valid);
    let not_jwts = [
        "hunter2".to_owned(),
        "a.b.c".to_owned(),
        "..".to_owned(),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.{signature}.{signature}"),
        format!("{header}.{payload}.{signature}.{signature}.{signature}.{signature}"),
        // Base64url, but not JSON.
        format!("{}.{payload}.{signature}", b64("{\"alg\":")),
        format!("{header}.{}.{signature}", b64([0xff, 0xfe, 0x00])),
    ];
    for token in not_jwts {
        let refusal = refused(&checker, &token).await;
        assert_says(&refusal, Reason::Malformed, "the password is not a JWT");
    }
}

#[tokio::test]
async fn five_parts_are_refused_as_an_encrypted_token() {
    let checker = checker();
    let random = |n: usize| b64((0..n).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    let header = b64(json!({"alg": "RSA-OAEP-256", "enc": "A256GCM"}).to_string());
    let jwe = format!(
        "{header}.{}.{}.{}.{}",
        random(256),
        random(12),
        random(200),
        random(16)
    );
    // Direct encryption has an empty key part: still five parts.
    let dir = b64(json!({"alg": "dir", "enc": "A128GCM"}).to_string());
    let direct = format!("{dir}..{}.{}.{}", random(12), random(40), random(16));
    for token in [jwe, direct] {
        let refusal = refused(&checker, &token).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            "encrypted tokens (JWE) are not accepted",
        );
    }
}

/// A token of the published Ed25519 key none of whose parts has a length
/// that is a multiple of four, so that each has a padded spelling.
fn token_with_paddable_parts() -> String {
    (0..3)
        .flat_map(|a| (0..3).map(move |b| (a, b)))
        .map(|(a, b)| {
            let header = with(&ed_header(), json!({"x": "h".repeat(a)}));
            let mut claims = claims("alice");
            claims["x"] = json!("c".repeat(b));
            ed_sign(&header, &claims)
        })
        .find(|token| parts(token).iter().all(|p| p.len() % 4 != 0))
        .unwrap()
}

/// Other spellings of `part`: padded, with a character from outside the
/// base64url alphabet, or with non-zero trailing bits.
fn misspellings(part: &str) -> Vec<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut variants = vec![
        format!("{part}{}", "=".repeat(4 - part.len() % 4)),
        format!("{part}="),
    ];
    for foreign in ['+', '/', '!', ' ', 'é'] {
        let mut chars: Vec<char> = part.chars().collect();
        chars[1] = foreign;
        variants.push(chars.into_iter().collect());
    }
    let mut bytes = part.as_bytes().to_vec();
    let last = bytes.last_mut().unwrap();
    let index = ALPHABET.iter().position(|c| c == last).unwrap();
    *last = ALPHABET[index | 1];
    variants.push(String::from_utf8(bytes).unwrap());
    variants
}

#[tokio::test]
async fn padding_or_foreign_characters_in_any_part_are_not_a_jwt() {
    let checker = checker();
    let token = token_with_paddable_parts();
    accepted(&checker, &token).await;
    for i in 0..3 {
        for variant in misspellings(parts(&token)[i]) {
            let mut all = parts(&token).map(str::to_owned);
            all[i] = variant;
            let refusal = refused(&checker, &all.join(".")).await;
            assert_says(&refusal, Reason::Malformed, "not a JWT");
            assert!(
                refusal.message.contains("without padding"),
                "part {i}: {refusal}"
            );
        }
    }
}

#[tokio::test]
async fn a_header_or_claims_set_that_is_not_a_json_object_is_refused_as_such() {
    let checker = checker();
    let header = ed_header().to_string();
    for claims in ["[\"alice\"]", "\"alice\"", "null", "42"] {
        let refusal = refused(&checker, &ed_raw(&header, claims)).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            "the token's claims set is not a JSON object",
        );
    }
    let claims = claims("alice").to_string();
    for header in ["[\"EdDSA\"]", "\"EdDSA\"", "null", "true"] {
        let refusal = refused(&checker, &ed_raw(header, &claims)).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            "the token header is not a JSON object",
        );
    }
    // Nesting deeper than the JSON parser follows, in either part.
    let deep = format!("{{\"deep\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    for token in [ed_raw(&header, &deep), ed_raw(&deep, &claims)] {
        let refusal = refused(&checker, &token).await;
        assert_says(&refusal, Reason::Malformed, "not a JWT");
    }
}

#[tokio::test]
async fn a_member_named_twice_is_refused_in_the_claims_set_and_in_the_header() {
    let checker = checker();
    let header = ed_header().to_string();
    let exp = unix_now() + 3600;
    let twice = [
        (
            format!(
                r#"{{"iss":"{ISSUER}","sub":"alice","aud":"todo-app","exp":{},"exp":{exp}}}"#,
                unix_now() - 3600
            ),
            "\"exp\" appears twice in the token's claims set",
        ),
        (
            format!(
                r#"{{"iss":"{ISSUER}","sub":"alice","sub":"bob","aud":"todo-app","exp":{exp}}}"#
            ),
            "\"sub\" appears twice in the token's claims set",
        ),
    ];
    for (claims, expected) in twice {
        let refusal = refused(&checker, &ed_raw(&header, &claims)).await;
        assert_says(&refusal, Reason::Malformed, expected);
    }
    let header = format!(r#"{{"alg":"none","alg":"EdDSA","kid":"{}"}}"#, ed().kid());
    let refusal = refused(&checker, &ed_raw(&header, &claims("alice").to_string())).await;
    assert_says(
        &refusal,
        Reason::Malformed,
        "\"alg\" appears twice in the token header",
    );
}

#[test]
fn only_a_name_repeated_at_the_top_level_counts_as_repeated() {
    let long = "n".repeat(3000);
    assert_eq!(
        repeated_name(br#"{"a":1,"b":2,"a":3}"#).as_deref(),
        Some("a")
    );
    assert_eq!(
        repeated_name(br#"{"a":1,"b":1,"b":2,"a":3}"#).as_deref(),
        Some("b")
    );
    assert_eq!(repeated_name(br#"{"sub":"alice","app":{"sub":"x"}}"#), None);
    assert_eq!(repeated_name(br#"{}"#), None);
    let json = format!(r#"{{"{long}":1,"{long}":2}}"#);
    let refusal = decode_object(&b64(&json), "the token header").unwrap_err();
    assert!(refusal.message.contains("appears twice"), "{refusal}");
    assert_short_echo(&refusal.message, &long);
}

// The header's `alg`.

#[tokio::test]
async fn alg_none_in_any_case_is_refused_as_unsigned_whatever_the_signature() {
    let checker = checker();
    let valid = pair(KeyKind::Rs256).sign(&claims("alice"));
    let [_, payload, signature] = parts(&valid);
    for none in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": none, "typ": "JWT", "kid": pair(KeyKind::Rs256).kid()});
        for signature in ["", signature] {
            let token = format!("{}.{payload}.{signature}", b64(header.to_string()));
            let refusal = refused(&checker, &token).await;
            assert_says(
                &refusal,
                Reason::BadSignature,
                &format!("unsigned tokens (alg \"{none}\") are not accepted"),
            );
        }
    }
}

#[tokio::test]
async fn a_missing_empty_or_non_string_alg_names_no_algorithm() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    let kid = ed().kid();
    let cases = [
        (
            json!({"typ": "JWT", "kid": kid}),
            "the token header has no \"alg\"",
        ),
        (
            json!({"alg": "", "kid": kid}),
            "\"alg\" is empty, so it names no signature algorithm",
        ),
        (json!({"alg": null, "kid": kid}), "\"alg\" is not a string"),
        (json!({"alg": 256, "kid": kid}), "\"alg\" is not a string"),
        (
            json!({"alg": ["EdDSA"], "kid": kid}),
            "\"alg\" is not a string",
        ),
    ];
    for (header, expected) in cases {
        let refusal = refused(&checker, &with_header(&valid, &header.to_string())).await;
        assert_says(&refusal, Reason::Malformed, expected);
    }
}

#[tokio::test]
async fn unknown_and_symmetric_algorithms_are_named_but_only_their_beginning() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    let long = "X".repeat(5000);
    let long_hs = format!("HS{long}");
    let cases = [
        (long.as_str(), Reason::Malformed, "is not supported"),
        (
            "ES512",
            Reason::Malformed,
            "token algorithm \"ES512\" is not supported",
        ),
        (
            "RSA-OAEP",
            Reason::Malformed,
            "\"RSA-OAEP\" is not supported",
        ),
        (
            "HS384",
            Reason::BadSignature,
            "symmetric algorithm \"HS384\" is not accepted",
        ),
        (
            "HS512",
            Reason::BadSignature,
            "symmetric algorithm \"HS512\" is not accepted",
        ),
        (
            long_hs.as_str(),
            Reason::BadSignature,
            "symmetric algorithm",
        ),
    ];
    for (alg, reason, expected) in cases {
        let header = json!({"alg": alg, "kid": ed().kid()}).to_string();
        let refusal = refused(&checker, &with_header(&valid, &header)).await;
        assert_says(&refusal, reason, expected);
        assert_short_echo(&refusal.message, alg);
    }
}

#[tokio::test]
async fn hs256_keyed_with_the_providers_public_key_is_refused_without_a_shared_secret() {
    let checker = checker();
    let jwk = pair(KeyKind::Rs256).public_jwk();
    let n = jwk["n"].as_str().unwrap();
    // The classic key-confusion secrets: the JWK as published, its
    // modulus as text, and the modulus bytes.
    let secrets = [
        serde_json::to_vec(&jwk).unwrap(),
        n.as_bytes().to_vec(),
        URL_SAFE_NO_PAD.decode(n).unwrap(),
    ];
    for secret in secrets {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(pair(KeyKind::Rs256).kid());
        let key = EncodingKey::from_secret(&secret);
        let token = jsonwebtoken::encode(&header, &claims("alice"), &key).unwrap();
        let refusal = refused(&checker, &token).await;
        assert_says(
            &refusal,
            Reason::BadSignature,
            "symmetric algorithm \"HS256\" is not accepted from https://id.example",
        );
    }
}

#[tokio::test]
async fn an_algorithm_the_provider_does_not_list_is_refused() {
    let checker = checker_with(&format!("{PROVIDER}algorithms = [\"ES256\"]\n"));
    accepted(&checker, &pair(KeyKind::Es256).sign(&claims("alice"))).await;
    for kind in [KeyKind::Rs256, KeyKind::Es384, KeyKind::EdDsa] {
        let refusal = refused(&checker, &pair(kind).sign(&claims("alice"))).await;
        let alg = kind.alg_name();
        assert_says(
            &refusal,
            Reason::BadSignature,
            &format!("token algorithm {alg} is not accepted by https://id.example"),
        );
    }
}

#[tokio::test]
async fn an_algorithm_that_does_not_fit_the_named_key_is_refused() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    let mismatches = [
        ("ES256", KeyKind::Rs256),
        ("RS256", KeyKind::EdDsa),
        ("ES384", KeyKind::Es256),
        ("ES256", KeyKind::Es384),
        ("EdDSA", KeyKind::Es256),
        ("PS256", KeyKind::Es256),
    ];
    for (alg, kind) in mismatches {
        let kid = pair(kind).kid();
        let header = json!({"alg": alg, "kid": kid}).to_string();
        let refusal = refused(&checker, &with_header(&valid, &header)).await;
        assert_says(
            &refusal,
            Reason::BadSignature,
            &format!("token algorithm {alg} does not match key \"{kid}\" of https://id.example"),
        );
    }
}

#[tokio::test]
async fn a_key_that_names_its_alg_accepts_no_other_algorithm_of_its_kind() {
    let rsa = pair(KeyKind::Rs256);
    let pinned = checker();
    let refusal = refused(&pinned, &rsa.sign_as(Algorithm::PS256, &claims("alice"))).await;
    assert_says(
        &refusal,
        Reason::BadSignature,
        "token algorithm PS256 does not match key",
    );

    // Published without `alg`, the same key verifies every RSA algorithm.
    let unpinned = rsa.clone().without_jwk_alg();
    let checker = checker_publishing(PROVIDER, &keys::jwks([&unpinned]));
    for alg in [
        Algorithm::RS256,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
    ] {
        accepted(&checker, &rsa.sign_as(alg, &claims("alice"))).await;
    }
}

// The header's `kid`, and the key it chooses.

#[tokio::test]
async fn a_kid_longer_than_256_bytes_is_refused_before_any_lookup() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    for kid in ["A".repeat(10 * 1024), "k".repeat(257)] {
        let header = json!({"alg": "EdDSA", "kid": kid}).to_string();
        let refusal = refused(&checker, &with_header(&valid, &header)).await;
        let expected = format!("the token's kid is too long: {} bytes", kid.len());
        assert_says(&refusal, Reason::Malformed, &expected);
        assert_short_echo(&refusal.message, &kid);
    }
    // The longest kid is looked up, and named only in part.
    let kid = "k".repeat(256);
    let header = json!({"alg": "EdDSA", "kid": kid}).to_string();
    let refusal = refused(&checker, &with_header(&valid, &header)).await;
    assert_says(&refusal, Reason::UnknownKey, "no key \"kkk");
    assert_short_echo(&refusal.message, &kid);
    let stats = key_cache(&checker).stats();
    assert_eq!((stats.succeeded, stats.failed), (0, 0), "no fetch");
}

#[tokio::test]
async fn a_kid_that_is_not_a_string_is_refused() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    for kid in [
        json!(42),
        json!(null),
        json!({"path": "../../etc/passwd"}),
        json!(["kid"]),
    ] {
        let header = json!({"alg": "EdDSA", "kid": kid}).to_string();
        let refusal = refused(&checker, &with_header(&valid, &header)).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            "the token's kid is not a string",
        );
    }
}

#[tokio::test]
async fn hostile_kids_are_only_compared_with_the_published_ones() {
    let checker = checker();
    let valid = ed().sign(&claims("alice"));
    for kid in [
        "../../etc/passwd",
        "' or 1=1--",
        "x\"; drop table todos; --",
        "",
    ] {
        let header = json!({"alg": "EdDSA", "kid": kid}).to_string();
        let refusal = refused(&checker, &with_header(&valid, &header)).await;
        assert_says(
            &refusal,
            Reason::UnknownKey,
            &format!("no key {kid:?} in the JWKS of https://id.example"),
        );
    }
    let stats = key_cache(&checker).stats();
    assert_eq!((stats.succeeded, stats.failed), (0, 0), "no fetch");
}

#[tokio::test]
async fn a_token_signed_with_an_unpublished_key_is_refused_naming_its_kid() {
    let unpublished = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
    let refusal = refused(&checker(), &unpublished.sign(&claims("alice"))).await;
    assert_says(
        &refusal,
        Reason::UnknownKey,
        &format!(
            "no key {:?} in the JWKS of https://id.example",
            unpublished.kid()
        ),
    );
}

#[tokio::test]
async fn without_a_kid_only_the_single_key_of_a_jwks_is_chosen() {
    let header = json!({"alg": "EdDSA", "typ": "JWT"});
    let token = ed_sign(&header, &claims("alice"));
    let refusal = refused(&checker(), &token).await;
    assert_says(
        &refusal,
        Reason::UnknownKey,
        "the token has no kid and the JWKS of https://id.example does not hold exactly one key",
    );
    let single = checker_publishing(PROVIDER, &keys::jwks([ed()]));
    accepted(&single, &token).await;
    // The one key chosen does not verify someone else's signature.
    let attacker = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
    let forged = sign_raw(
        &ed_key(&attacker),
        Algorithm::EdDSA,
        &header.to_string(),
        &claims("alice").to_string(),
    );
    let refusal = refused(&single, &forged).await;
    assert_says(&refusal, Reason::BadSignature, "signature does not verify");
}

// Keys offered by the token itself.

/// Header members that offer the attacker's own key, or where to get it.
fn key_offers(attacker: &SigningKeyPair, lure: &str) -> Vec<Value> {
    let certified = rcgen::generate_simple_self_signed(vec!["attacker.example".into()]).unwrap();
    vec![
        json!({"jku": format!("{lure}/jwks.json")}),
        json!({"x5u": format!("{lure}/cert.pem")}),
        json!({"jwk": attacker.public_jwk()}),
        json!({"x5c": [STANDARD.encode(certified.cert.der())]}),
    ]
}

#[tokio::test]
async fn keys_and_key_urls_in_the_header_are_never_fetched_nor_trusted() {
    let checker = checker();
    // Where `jku` and `x5u` point: it must never be connected to.
    let lure = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    lure.set_nonblocking(true).unwrap();
    let lure_url = format!("http://{}", lure.local_addr().unwrap());
    let attacker = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
    let attacker_key = ed_key(&attacker);
    for offer in key_offers(&attacker, &lure_url) {
        let sign = |header: Value| {
            let header = with(&header, offer.clone()).to_string();
            sign_raw(
                &attacker_key,
                Algorithm::EdDSA,
                &header,
                &claims("alice").to_string(),
            )
        };
        let token = sign(json!({"alg": "EdDSA", "kid": attacker.kid()}));
        let refusal = refused(&checker, &token).await;
        assert_says(
            &refusal,
            Reason::UnknownKey,
            &format!("no key {:?}", attacker.kid()),
        );

        let token = sign(json!({"alg": "EdDSA", "kid": ed().kid()}));
        let refusal = refused(&checker, &token).await;
        assert_says(&refusal, Reason::BadSignature, "signature does not verify");

        let token = sign(json!({"alg": "EdDSA"}));
        let refusal = refused(&checker, &token).await;
        assert_says(&refusal, Reason::UnknownKey, "the token has no kid");
    }
    let connected = lure.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(
        connected,
        Err(std::io::ErrorKind::WouldBlock),
        "nothing fetched"
    );
    let stats = key_cache(&checker).stats();
    assert_eq!((stats.succeeded, stats.failed), (0, 0), "no JWKS fetch");
}

#[tokio::test]
async fn key_offers_in_a_provider_signed_header_are_ignored_unless_malformed() {
    let checker = checker();
    let attacker = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
    let mut header = ed_header();
    for offer in key_offers(&attacker, "https://attacker.example") {
        header = with(&header, offer);
    }
    let verified = accepted(&checker, &ed_sign(&header, &claims("mallory"))).await;
    assert_eq!(verified.subject(), Some("mallory"));
    // jsonwebtoken reads these members, and refuses them ill-typed.
    for offer in [
        json!({"jwk": "not a key"}),
        json!({"x5c": "not a list"}),
        json!({"jku": 7}),
    ] {
        let token = ed_sign(&with(&ed_header(), offer.clone()), &claims("mallory"));
        let refusal = refused(&checker, &token).await;
        assert_says(&refusal, Reason::Malformed, "the token is malformed");
        // What jsonwebtoken said goes to the log only.
        assert!(refusal.detail.is_some(), "{offer}: {refusal}");
        assert_eq!(refusal.message, "the token is malformed", "{offer}");
    }
}

// Critical header extensions.

#[tokio::test]
async fn an_unknown_critical_extension_is_refused_by_name() {
    let checker = checker();
    let cases = [
        (
            json!({"crit": ["exp-ext"], "exp-ext": 1_700_000_000}),
            "\"exp-ext\"",
        ),
        // RFC 7797's unencoded payload, which changes what is signed.
        (json!({"crit": ["b64"], "b64": false}), "\"b64\""),
        // A registered name listed as critical.
        (json!({"crit": ["alg"]}), "\"alg\""),
        // Names among other things: the names are what is refused.
        (json!({"crit": [1, "b64"]}), "\"b64\""),
    ];
    for (crit, name) in cases {
        let token = ed_sign(&with(&ed_header(), crit.clone()), &claims("alice"));
        let refusal = refused(&checker, &token).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            &format!(
                "the token requires critical header extension {name}, which rlsgate does not support"
            ),
        );
    }
}

#[tokio::test]
async fn a_crit_that_is_not_a_list_of_names_is_refused_as_malformed() {
    let checker = checker();
    for crit in [
        json!([]),
        json!("exp-ext"),
        json!([1, 2]),
        json!(null),
        json!({}),
    ] {
        let token = ed_sign(&with(&ed_header(), json!({"crit": crit})), &claims("alice"));
        let refusal = refused(&checker, &token).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            "the token header's \"crit\" is malformed",
        );
    }
}

#[test]
fn a_long_critical_extension_name_is_cut_short() {
    let long = "e".repeat(3000);
    let refusal = refuse_critical_extensions(Some(&json!([long]))).unwrap_err();
    assert!(
        refusal.message.contains("critical header extension \"eee"),
        "{refusal}"
    );
    assert_short_echo(&refusal.message, &long);
    assert!(refuse_critical_extensions(None).is_ok());
}

// Time claims.

/// Claims whose `exp` and `nbf` are the raw JSON text given (or absent).
fn timed_claims(exp: Option<&str>, nbf: Option<&str>) -> String {
    let exp = exp.map_or_else(String::new, |exp| format!(r#","exp":{exp}"#));
    let nbf = nbf.map_or_else(String::new, |nbf| format!(r#","nbf":{nbf}"#));
    format!(r#"{{"iss":"{ISSUER}","sub":"alice","aud":"todo-app"{exp}{nbf}}}"#)
}

async fn refused_for_times(exp: Option<&str>, nbf: Option<&str>) -> Refusal {
    let token = ed_raw(&ed_header().to_string(), &timed_claims(exp, nbf));
    refused(&checker(), &token).await
}

#[tokio::test]
async fn a_token_without_exp_is_refused() {
    let refusal = refused_for_times(None, None).await;
    assert_says(
        &refusal,
        Reason::Malformed,
        "the token has no \"exp\" claim",
    );
}

#[tokio::test]
async fn time_claims_that_are_not_json_numbers_are_not_numeric_dates() {
    let future = (unix_now() + 3600).to_string();
    let kinds = [
        ("\"9999999999\"", "a string"),
        ("true", "a boolean"),
        ("null", "null"),
        ("[9999999999]", "an array"),
        ("{\"seconds\":9999999999}", "an object"),
    ];
    for (value, kind) in kinds {
        let expected =
            "claim is not a NumericDate: expected a JSON number of seconds since 1970, got";
        let refusal = refused_for_times(Some(value), None).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            &format!("\"exp\" {expected} {kind}"),
        );
        let refusal = refused_for_times(Some(&future), Some(value)).await;
        assert_says(
            &refusal,
            Reason::Malformed,
            &format!("\"nbf\" {expected} {kind}"),
        );
    }
}

#[tokio::test]
async fn time_claims_before_1970_or_after_the_year_9999_are_out_of_range() {
    let future = (unix_now() + 3600).to_string();
    let out_of_range = [
        "-1",
        "-1.5",
        "-0.5",
        "1e300",
        // u64::MAX, and one more (which JSON parsers read as a float).
        "18446744073709551615",
        "18446744073709551616",
        // The first second of the year 10000.
        "253402300800",
        "253402300799.5",
    ];
    for value in out_of_range {
        let expected = "out of range: it must lie between 1970 and the end of year 9999";
        let refusal = refused_for_times(Some(value), None).await;
        assert_says(&refusal, Reason::Malformed, "the token's \"exp\" claim ");
        assert!(refusal.message.contains(expected), "{value}: {refusal}");
        let refusal = refused_for_times(Some(&future), Some(value)).await;
        assert_says(&refusal, Reason::Malformed, "the token's \"nbf\" claim ");
        assert!(refusal.message.contains(expected), "{value}: {refusal}");
    }
    // The value is named as read.
    let refusal = refused_for_times(Some("253402300800"), None).await;
    assert_says(
        &refusal,
        Reason::Malformed,
        "\"exp\" claim 253402300800 is out of range",
    );
    // A long number is named only in part.
    let long = format!("1{}", "0".repeat(400));
    let refusal = refused_for_times(Some(&long), None).await;
    assert_short_echo(&refusal.message, &long);
}

#[tokio::test]
async fn the_last_second_of_the_year_9999_and_the_first_of_1970_are_accepted() {
    let token = ed_raw(
        &ed_header().to_string(),
        &timed_claims(Some("253402300799"), Some("0")),
    );
    let verified = accepted(&checker(), &token).await;
    assert_eq!(verified.expires_at, LATEST_NUMERIC_DATE);
    assert_eq!(format_time(LATEST_NUMERIC_DATE), "9999-12-31T23:59:59Z");
}

#[tokio::test]
async fn a_fraction_never_lengthens_validity() {
    let read = |exp: &str, nbf: &str| {
        let claims: Value = serde_json::from_str(&timed_claims(Some(exp), Some(nbf))).unwrap();
        Validity::read(claims.as_object().unwrap()).unwrap()
    };
    let validity = read("1000.9", "900.1");
    assert_eq!((validity.exp, validity.nbf), (1000, Some(901)));
    let validity = read("1.5e9", "0.0");
    assert_eq!((validity.exp, validity.nbf), (1_500_000_000, Some(0)));

    // Through the checker: the expiry is named and kept in whole seconds.
    let refusal = refused_for_times(Some("1.5e9"), None).await;
    assert_says(
        &refusal,
        Reason::Expired,
        "token expired at 2017-07-14T02:40:00Z",
    );
    let exp = unix_now() + 3600;
    let claims = timed_claims(
        Some(&format!("{exp}.75")),
        Some(&format!("{}.5", unix_now() - 10)),
    );
    let verified = accepted(&checker(), &ed_raw(&ed_header().to_string(), &claims)).await;
    assert_eq!(verified.expires_at, exp);
    assert_eq!(verified.claims["exp"].as_f64(), Some(exp as f64 + 0.75));
}

#[test]
fn exp_and_nbf_are_judged_with_the_leeway_to_the_second() {
    let leeway = Duration::from_secs(2);
    let expiring = Validity {
        exp: 1000,
        nbf: None,
    };
    assert!(expiring.check_at(1000, Duration::ZERO).is_ok());
    assert!(expiring.check_at(1002, leeway).is_ok());
    for (now, leeway) in [(1001, Duration::ZERO), (1003, leeway)] {
        let refusal = expiring.check_at(now, leeway).unwrap_err();
        assert_says(
            &refusal,
            Reason::Expired,
            "token expired at 1970-01-01T00:16:40Z",
        );
    }
    let early = Validity {
        exp: LATEST_NUMERIC_DATE,
        nbf: Some(2000),
    };
    assert!(early.check_at(2000, Duration::ZERO).is_ok());
    assert!(early.check_at(1998, leeway).is_ok());
    for (now, leeway) in [(1999, Duration::ZERO), (1997, leeway)] {
        let refusal = early.check_at(now, leeway).unwrap_err();
        assert_says(
            &refusal,
            Reason::Expired,
            "token is not valid before 1970-01-01T00:33:20Z",
        );
    }
    // The latest exp with the largest leeway does not overflow.
    let latest = Validity {
        exp: LATEST_NUMERIC_DATE,
        nbf: Some(0),
    };
    assert!(latest.check_at(u64::MAX, Duration::MAX).is_ok());
}

#[tokio::test]
async fn an_expired_or_not_yet_valid_token_is_refused_naming_the_time() {
    let checker = checker();
    let exp = unix_now() - 60;
    let mut expired = claims("alice");
    expired["exp"] = json!(exp);
    let refusal = refused(&checker, &ed().sign(&expired)).await;
    let expected = format!("token expired at {}", format_time(exp));
    assert_says(&refusal, Reason::Expired, &expected);

    let nbf = unix_now() + 600;
    let mut early = claims("alice");
    early["nbf"] = json!(nbf);
    let refusal = refused(&checker, &ed().sign(&early)).await;
    let expected = format!("token is not valid before {}", format_time(nbf));
    assert_says(&refusal, Reason::Expired, &expected);
}

// Issuer, audience and signature.

#[tokio::test]
async fn a_token_without_an_issuer_or_from_an_unconfigured_one_is_refused() {
    let checker = checker();
    for iss in [None, Some(json!(42)), Some(json!(null))] {
        let mut claims = claims("alice");
        let members = claims.as_object_mut().unwrap();
        match iss {
            Some(iss) => members.insert("iss".to_owned(), iss),
            None => members.remove("iss"),
        };
        let refusal = refused(&checker, &ed().sign(&claims)).await;
        assert_says(
            &refusal,
            Reason::UnknownIssuer,
            "the token has no \"iss\" claim, so no provider can verify it",
        );
    }
    let long = format!("https://{}.example", "evil".repeat(1000));
    for iss in [
        "https://evil.example.com",
        "https://id.example/",
        long.as_str(),
    ] {
        let mut claims = claims("alice");
        claims["iss"] = json!(iss);
        let refusal = refused(&checker, &ed().sign(&claims)).await;
        assert_says(&refusal, Reason::UnknownIssuer, "is not configured");
        assert_short_echo(&refusal.message, iss);
    }
    let mut claims = claims("alice");
    claims["iss"] = json!("https://evil.example.com");
    let refusal = refused(&checker, &ed().sign(&claims)).await;
    assert_says(
        &refusal,
        Reason::UnknownIssuer,
        "issuer \"https://evil.example.com\" is not configured",
    );
}

#[tokio::test]
async fn a_token_for_another_audience_or_none_is_refused_when_one_is_configured() {
    let checker = checker();
    let mut other = claims("alice");
    other["aud"] = json!("other-app");
    let refusal = refused(&checker, &ed().sign(&other)).await;
    assert_says(
        &refusal,
        Reason::Audience,
        "token audience \"other-app\" is not accepted by https://id.example (expected one of [\"todo-app\"])",
    );
    let mut none = claims("alice");
    none.as_object_mut().unwrap().remove("aud");
    let refusal = refused(&checker, &ed().sign(&none)).await;
    assert_says(&refusal, Reason::Audience, "the token has no \"aud\" claim");
    // One audience among several is enough.
    let mut several = claims("alice");
    several["aud"] = json!(["other-app", "todo-app"]);
    accepted(&checker, &ed().sign(&several)).await;

    // Without a configured audience, `aud` is not looked at.
    let open = checker_with("leeway = \"2s\"\n");
    accepted(&open, &ed().sign(&other)).await;
    accepted(&open, &ed().sign(&none)).await;
}

#[tokio::test]
async fn an_altered_or_spliced_signature_does_not_verify() {
    let checker = checker();
    for pair in pairs() {
        let token = pair.sign(&claims("alice"));
        let [header, payload, signature] = parts(&token);
        // The first character carries six full bits: the result is
        // still canonical base64url, and wrong.
        let mut altered = signature.as_bytes().to_vec();
        altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
        let altered = format!("{header}.{payload}.{}", String::from_utf8(altered).unwrap());
        // Bob's valid signature on alice's header and claims.
        let bob = pair.sign(&claims("bob"));
        let spliced = format!("{header}.{payload}.{}", parts(&bob)[2]);
        for forged in [altered, spliced, format!("{header}.{payload}.")] {
            let refusal = refused(&checker, &forged).await;
            assert_says(
                &refusal,
                Reason::BadSignature,
                "token signature does not verify with the key of https://id.example",
            );
        }
    }
    let stats = key_cache(&checker).stats();
    assert_eq!((stats.succeeded, stats.failed), (0, 0), "no JWKS fetch");
}

#[tokio::test]
async fn keys_that_cannot_be_fetched_refuse_with_a_connection_failure() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lines = format!("{PROVIDER}jwks_url = \"http://127.0.0.1:{port}/jwks.json\"\n");
    let checker = TokenChecker::new(&config(&lines), crate::auth::jwks::http_client());
    let refusal = refused(&checker, &ed().sign(&claims("alice"))).await;
    assert_eq!(refusal.sqlstate, sqlstate::CONNECTION_FAILURE, "{refusal}");
    assert_eq!(refusal.reason, Reason::Upstream, "{refusal}");
    assert!(
        refusal.message.starts_with(
            "cannot verify the token now: the signing keys of https://id.example cannot be fetched"
        ),
        "{refusal}"
    );
}

// The provider's claim rules, on every check.

#[tokio::test]
async fn max_token_age_needs_an_iat_neither_too_old_nor_in_the_future() {
    let checker = checker_with(&format!("{PROVIDER}max_token_age = \"10m\"\n"));
    accepted(&checker, &ed().sign(&claims("alice"))).await;
    let with_iat = |iat: Value| {
        let mut claims = claims("alice");
        claims["iat"] = iat;
        ed().sign(&claims)
    };
    let old = unix_now() - 3600;
    let refusal = refused(&checker, &with_iat(json!(old))).await;
    let expected = format!(
        "token was issued at {}, more than 10m ago (max_token_age of https://id.example)",
        format_time(old)
    );
    assert_says(&refusal, Reason::Expired, &expected);

    let future = unix_now() + 3600;
    let refusal = refused(&checker, &with_iat(json!(future))).await;
    let expected = format!(
        "token claims to be issued at {}, which is in the future",
        format_time(future)
    );
    assert_says(&refusal, Reason::Other, &expected);

    let refusal = refused(&checker, &with_iat(json!("yesterday"))).await;
    assert_says(
        &refusal,
        Reason::Other,
        "\"iat\" claim is not a NumericDate",
    );

    let mut without = claims("alice");
    without.as_object_mut().unwrap().remove("iat");
    let refusal = refused(&checker, &ed().sign(&without)).await;
    assert_says(
        &refusal,
        Reason::Other,
        "the token has no \"iat\" claim, which https://id.example requires (max_token_age)",
    );
}

#[tokio::test]
async fn required_claims_must_be_present_and_not_null_at_their_path() {
    let checker = checker_with(&format!(
        "{PROVIDER}required_claims = [\"tenant\", \"app.org\"]\n"
    ));
    let mut complete = claims("alice");
    complete["tenant"] = json!("acme");
    complete["app"] = json!({"org": 7});
    accepted(&checker, &ed().sign(&complete)).await;
    let cases = [
        ("tenant", Value::Null, "\"tenant\""),
        ("app", json!({"org": null}), "\"app.org\""),
        ("app", json!({"other": 1}), "\"app.org\""),
        ("app", json!("org"), "\"app.org\""),
    ];
    for (name, value, missing) in cases {
        let mut claims = complete.clone();
        claims[name] = value;
        let refusal = refused(&checker, &ed().sign(&claims)).await;
        let expected =
            format!("the token has no {missing} claim, which https://id.example requires");
        assert_says(&refusal, Reason::Other, &expected);
    }
}

#[tokio::test]
async fn the_role_claim_allows_only_the_roles_it_names() {
    let checker = checker_with(&format!("{PROVIDER}role_claim = \"app.roles\"\n"));
    let with_roles = |roles: Value| {
        let mut claims = claims("alice");
        claims["app"] = json!({"roles": roles});
        ed().sign(&claims)
    };
    for roles in [json!("authenticated"), json!(["reader", "authenticated"])] {
        accepted(&checker, &with_roles(roles)).await;
    }
    let long = "r".repeat(1000);
    let refused_roles = [
        (json!("reader"), "its \"app.roles\" claim is \"reader\""),
        (
            json!(["reader", 7]),
            "its \"app.roles\" claim is [\"reader\",7]",
        ),
        (
            json!({"authenticated": true}),
            "its \"app.roles\" claim is {\"authenticated\":true}",
        ),
        (json!(long), "its \"app.roles\" claim is \"rrr"),
    ];
    for (roles, expected) in refused_roles {
        let refusal = refused(&checker, &with_roles(roles)).await;
        assert_says(
            &refusal,
            Reason::Role,
            "token does not allow role \"authenticated\"",
        );
        assert!(refusal.message.contains(expected), "{refusal}");
        assert_short_echo(&refusal.message, &long);
    }
    let refusal = refused(&checker, &ed().sign(&claims("alice"))).await;
    assert_says(&refusal, Reason::Role, "its \"app.roles\" claim is absent");
}

#[test]
fn a_claim_path_tries_the_whole_name_first_then_splits_from_the_left() {
    let claims = json!({
        "https://app.example/roles": ["admin"],
        "a": {"b.c": 1, "b": {"c": 2}},
        "a.b": {"c": 3},
        "p.q": {"r": 4},
        "x": {"y": {"z": 5}},
        "s": "not an object",
    });
    let claims = claims.as_object().unwrap();
    let at = |path: &str| claim_at(claims, path).cloned();
    assert_eq!(at("https://app.example/roles"), Some(json!(["admin"])));
    assert_eq!(at("a.b"), Some(json!({"c": 3})));
    // Split at the first dot, then the rest whole before it is split.
    assert_eq!(at("a.b.c"), Some(json!(1)));
    // "p" is no claim, so the next dot splits.
    assert_eq!(at("p.q.r"), Some(json!(4)));
    assert_eq!(at("x.y.z"), Some(json!(5)));
    assert_eq!(at("x.y"), Some(json!({"z": 5})));
    for missing in ["x.z", "s.length", "nope", "x.y.z.w", ".", "a."] {
        assert_eq!(at(missing), None, "{missing}");
    }
}

#[tokio::test]
async fn a_cached_token_still_meets_the_role_rules_of_each_connection() {
    let checker = checker_with(&format!("{PROVIDER}role_claim = \"roles\"\n"));
    let mut claims = claims("alice");
    claims["roles"] = json!(["authenticated"]);
    let token = ed().sign(&claims);
    accepted(&checker, &token).await;
    accepted(&checker, &token).await;
    assert_eq!(checker.cache_counts(), (1, 1));
    let refusal = checker.check(&token, "admin").await.unwrap_err();
    assert_says(
        &refusal,
        Reason::Role,
        "token does not allow role \"admin\"",
    );
    assert_eq!(checker.cache_counts(), (2, 1));
}

#[test]
fn claims_of_an_issuer_no_longer_configured_are_refused() {
    let checker = checker();
    let verified = VerifiedToken {
        claims: json!({"iss": "https://gone.example", "sub": "alice"})
            .as_object()
            .unwrap()
            .clone(),
        expires_at: unix_now() + 60,
    };
    assert_eq!(checker.leeway(&verified), Duration::ZERO);
    let refusal = checker.apply_rules(verified, "authenticated").unwrap_err();
    assert_says(
        &refusal,
        Reason::UnknownIssuer,
        "the token's issuer is no longer configured",
    );
}

// What is shown of untrusted text and of tokens.

#[test]
fn untrusted_text_is_clipped_to_100_characters_even_when_they_are_not_ascii() {
    assert_eq!(clip("short"), "short");
    assert_eq!(clip(&"a".repeat(101)), "a".repeat(100));
    // Multi-byte characters are kept whole.
    assert_eq!(clip(&"é".repeat(150)), "é".repeat(100));
    assert_eq!(clip(&"🔑".repeat(150)).chars().count(), 100);
}

#[test]
fn a_fingerprint_names_a_token_without_revealing_it() {
    let token = ed().sign(&claims("alice"));
    let print = fingerprint(&token);
    assert_eq!(print.len(), 12);
    assert!(print.bytes().all(|b| b.is_ascii_hexdigit()), "{print}");
    assert_eq!(fingerprint(&token), print, "stable");
    assert_ne!(fingerprint(&ed().sign(&claims("bob"))), print);
    assert!(parts(&token).iter().all(|part| !part.contains(&print)));
}

// Size and reload.

#[tokio::test]
async fn a_token_as_long_as_the_default_byte_limit_is_verified_whole() {
    let limit = config(PROVIDER).listen.max_token_bytes;
    // Padded with a claim and, to reach every length, a header member.
    let token = (0..3)
        .flat_map(|a| (limit * 2 / 3..limit).map(move |b| (a, b)))
        .map(|(a, b)| {
            let header = with(&ed_header(), json!({"x": "h".repeat(a)}));
            let mut claims = claims("alice");
            claims["filler"] = json!("c".repeat(b));
            ed_sign(&header, &claims)
        })
        .find(|token| token.len() == limit)
        .expect("a token of exactly the limit");
    let verified = accepted(&checker(), &token).await;
    assert_eq!(verified.subject(), Some("alice"));
    // One byte short, the signature is cut and the token refused.
    let refusal = refused(&checker(), &token[..limit - 1]).await;
    assert_says(&refusal, Reason::Malformed, "not a JWT");
}

#[tokio::test]
async fn a_reload_keeps_the_fetched_keys_of_an_unchanged_provider_but_not_verified_tokens() {
    let before = checker();
    let token = ed().sign(&claims("alice"));
    accepted(&before, &token).await;
    let keys = |checker: &TokenChecker| checker.providers[ISSUER].keys.clone().unwrap();

    let same = TokenChecker::replacing(Some(&before), &config(PROVIDER), reqwest::Client::new());
    assert!(Arc::ptr_eq(&keys(&before), &keys(&same)));
    // Verified again with the kept keys, not served from a cache.
    accepted(&same, &token).await;
    assert_eq!(same.cache_counts(), (0, 1));

    let lines = format!("{PROVIDER}jwks_max_age = \"1h\"\n");
    let changed = TokenChecker::replacing(Some(&before), &config(&lines), reqwest::Client::new());
    assert!(!Arc::ptr_eq(&keys(&before), &keys(&changed)));
}
