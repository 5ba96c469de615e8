//! Attacks on the token check: forged algorithms, hostile key ids, keys
//! offered by the token itself, critical extensions, encrypted tokens,
//! sloppy base64, odd claims sets and time claims, oversized tokens and a
//! burst of forged signatures.
//!
//! Each attack must end in FATAL 28000 with a message a person can act on,
//! which never repeats more than a short piece of the attacker's text, and
//! the proxy must keep serving a valid token afterwards. tests/refusals.rs
//! covers the plain cases (expired, unknown issuer or kid, bad signature,
//! `alg: none`, HS256 keyed with the public key, not a JWT).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use crate::support::{Harness, WAIT, jwt_header, unix_now, user_id_of, wire};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey};
use rlsgate::dev::issuer::{DevIssuer, KeyKind, SigningKeyPair};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The longest piece of attacker text a refusal may repeat.
const ECHO_LIMIT: usize = 100;

/// The proxy still serves a valid token: alice connects and queries.
async fn still_serves_alice(h: &Harness) {
    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_json(value: &Value) -> String {
    b64(serde_json::to_vec(value).unwrap())
}

fn parts(token: &str) -> [&str; 3] {
    let parts: Vec<&str> = token.split('.').collect();
    parts.try_into().expect("a JWT has three parts")
}

/// `header.payload`, signed with `key` as `alg`.
fn sign_raw(key: &EncodingKey, alg: Algorithm, header: &str, payload: &str) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

fn sign(key: &EncodingKey, alg: Algorithm, header: &Value, claims: &Value) -> String {
    sign_raw(key, alg, &header.to_string(), &claims.to_string())
}

/// Claims that the harness's provider accepts, with `iss` set to `issuer`.
fn claims_for(issuer: &str, sub: &str) -> Value {
    json!({
        "iss": issuer,
        "sub": sub,
        "aud": "todo-app",
        "iat": unix_now(),
        "exp": unix_now() + 3600,
    })
}

/// `header` with the members of `extra` added or replaced.
fn with(header: &Value, extra: Value) -> Value {
    let mut header = header.clone();
    let members = header.as_object_mut().unwrap();
    for (name, value) in extra.as_object().unwrap() {
        members.insert(name.clone(), value.clone());
    }
    header
}

/// A token whose header is exactly `header` (as JSON text), with the claims
/// and signature of `valid`: for attacks refused before the signature is
/// checked.
fn with_header(valid: &str, header: &str) -> String {
    let [_, payload, signature] = parts(valid);
    format!("{}.{payload}.{signature}", b64(header))
}

/// Asserts that a refusal does not repeat a long run of `attacker` text.
fn assert_short_echo(message: &str, attacker: &str) {
    assert!(
        message.len() <= 300,
        "the message is {} bytes: {message}",
        message.len()
    );
    let chars: Vec<char> = attacker.chars().collect();
    for window in chars.windows(ECHO_LIMIT + 1) {
        let run: String = window.iter().collect();
        assert!(
            !message.contains(&run),
            "the message repeats more than {ECHO_LIMIT} characters of attacker text: {message}"
        );
    }
}

/// A second provider whose private key the tests hold, so they can sign any
/// header and any claims text: what a provider would have to issue for an
/// attack to need more than a forged signature. Its JWKS holds one key.
struct OwnProvider {
    issuer: DevIssuer,
    key: EncodingKey,
    kid: String,
}

impl OwnProvider {
    async fn start() -> OwnProvider {
        let pair = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
        let key = EncodingKey::from_ed_pem(pair.to_pem().as_bytes()).unwrap();
        let kid = pair.kid();
        let issuer = DevIssuer::start_with("127.0.0.1:0".parse().unwrap(), None, vec![pair])
            .await
            .expect("start the second token issuer");
        OwnProvider { issuer, key, kid }
    }

    /// Its `[[provider]]` block.
    fn toml(&self) -> String {
        format!(
            "[[provider]]\nissuer = \"{}\"\naudience = [\"todo-app\"]\nleeway = \"2s\"\n",
            self.issuer.issuer()
        )
    }

    fn header(&self) -> Value {
        json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid})
    }

    fn claims(&self, sub: &str) -> Value {
        claims_for(&self.issuer.issuer(), sub)
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        sign(&self.key, Algorithm::EdDSA, header, claims)
    }

    fn sign_raw(&self, header: &str, payload: &str) -> String {
        sign_raw(&self.key, Algorithm::EdDSA, header, payload)
    }
}

/// The harness, with `OwnProvider` as a second `[[provider]]`; `listen` is
/// `[listen]` lines for the proxy, or empty.
async fn start_with_own_provider(listen: &str) -> (Harness, OwnProvider) {
    let own = OwnProvider::start().await;
    let h = Harness::start_with(&format!("{listen}{}", own.toml())).await;
    (h, own)
}

/// A bare TCP listener that counts connections and answers each with an
/// HTTP 200 carrying `body`: where a token's `jku` or `x5u` points, serving
/// the attacker's keys.
struct Lure {
    base: String,
    connections: Arc<AtomicUsize>,
}

impl Lure {
    async fn start(body: String) -> Lure {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        Lure { base, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_in_any_case_and_a_missing_or_empty_alg_are_refused() {
    let h = Harness::start().await;
    let valid = h.token("alice");
    let kid = h.issuer.current_kid(KeyKind::Rs256);
    let [_, payload, signature] = parts(&valid);

    for none in ["None", "NONE", "nOnE"] {
        let header = json!({"alg": none, "typ": "JWT", "kid": kid}).to_string();
        // Without a signature, and with the signature of a valid token.
        for signature in ["", signature] {
            let token = format!("{}.{payload}.{signature}", b64(&header));
            let message = h.connect_refused("authenticated", &token).await;
            assert!(message.contains("unsigned tokens"), "{none}: {message}");
            assert!(
                message.contains(&format!("alg \"{none}\"")),
                "{none}: {message}"
            );
            assert!(message.contains("not accepted"), "{none}: {message}");
        }
    }

    let empty = with_header(&valid, &json!({"alg": "", "kid": kid}).to_string());
    let message = h.connect_refused("authenticated", &empty).await;
    assert!(message.contains("\"alg\" is empty"), "{message}");
    assert!(message.contains("no signature algorithm"), "{message}");

    let missing = with_header(&valid, &json!({"typ": "JWT", "kid": kid}).to_string());
    let message = h.connect_refused("authenticated", &missing).await;
    assert!(message.contains("no \"alg\""), "{message}");

    for alg in [json!(null), json!(256), json!(["RS256"])] {
        let token = with_header(&valid, &json!({"alg": alg, "kid": kid}).to_string());
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("\"alg\" is not a string"),
            "{alg}: {message}"
        );
    }

    // A long made-up algorithm is named, but only its beginning.
    let long = "X".repeat(5000);
    let token = with_header(&valid, &json!({"alg": long, "kid": kid}).to_string());
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("is not supported"), "{message}");
    assert_short_echo(&message, &long);
    let long_hs = format!("HS{long}");
    let token = with_header(&valid, &json!({"alg": long_hs, "kid": kid}).to_string());
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("symmetric algorithm"), "{message}");
    assert_short_echo(&message, &long_hs);

    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_kids_are_refused_without_lookup_storms_or_long_echoes() {
    let h = Harness::start().await;
    // The JWKS is fetched and cached.
    still_serves_alice(&h).await;
    let valid = h.token("alice");
    let fetches = h.issuer.jwks_fetches();

    // 10 KB of kid: refused before any lookup, and not repeated.
    let long_kid = "A".repeat(10 * 1024);
    let token = with_header(
        &valid,
        &json!({"alg": "RS256", "kid": long_kid}).to_string(),
    );
    assert!(token.len() < 16 * 1024, "within the default token limit");
    for _ in 0..5 {
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("kid is too long"), "{message}");
        assert!(message.contains("10240 bytes"), "{message}");
        assert_short_echo(&message, &long_kid);
    }

    // Key ids that are not strings.
    for kid in [
        json!(42),
        json!(null),
        json!({"path": "../../etc/passwd"}),
        json!(["kid"]),
    ] {
        let token = with_header(&valid, &json!({"alg": "RS256", "kid": kid}).to_string());
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("kid is not a string"), "{kid}: {message}");
    }
    assert_eq!(
        h.issuer.jwks_fetches(),
        fetches,
        "kids refused before lookup cause no fetch"
    );

    // Path traversal and SQL are only compared with the JWKS's kids, and
    // named in the refusal.
    for kid in [
        "../../etc/passwd",
        "' or 1=1--",
        "x\"; drop table todos; --",
    ] {
        let token = with_header(&valid, &json!({"alg": "RS256", "kid": kid}).to_string());
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("no key"), "{kid}: {message}");
        assert!(message.contains("in the JWKS"), "{kid}: {message}");
        assert!(
            message.contains(&format!("{kid:?}")),
            "names kid {kid}: {message}"
        );
    }
    // The longest kid looked up, and one byte more.
    let token = with_header(
        &valid,
        &json!({"alg": "RS256", "kid": "k".repeat(256)}).to_string(),
    );
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("no key"), "{message}");
    assert_short_echo(&message, &"k".repeat(256));
    let token = with_header(
        &valid,
        &json!({"alg": "RS256", "kid": "k".repeat(257)}).to_string(),
    );
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("kid is too long"), "{message}");

    // The table is untouched and the proxy serves.
    let admin = h.admin().await;
    admin
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap();
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_urls_and_keys_in_the_header_are_never_fetched_nor_trusted() {
    let (h, own) = start_with_own_provider("").await;
    still_serves_alice(&h).await;

    // The attacker's own keys: an Ed25519 key, and a P-256 key with a
    // self-signed certificate for x5c.
    let attacker = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
    let attacker_key = EncodingKey::from_ed_pem(attacker.to_pem().as_bytes()).unwrap();
    let attacker_jwks = json!({"keys": [attacker.public_jwk()]});
    let certified = rcgen::generate_simple_self_signed(vec!["attacker.example".into()]).unwrap();
    let x5c_key =
        EncodingKey::from_ec_pem(certified.signing_key.serialize_pem().as_bytes()).unwrap();
    let x5c = json!([STANDARD.encode(certified.cert.der())]);

    // A server that would hand out the attacker's JWKS to anyone who asks.
    let lure = Lure::start(attacker_jwks.to_string()).await;
    let jku = format!("{}/jwks.json", lure.base);
    let x5u = format!("{}/cert.pem", lure.base);

    let claims = claims_for(&h.issuer.issuer(), "alice");
    let offers = [
        ("jku", json!({"jku": jku})),
        ("x5u", json!({"x5u": x5u})),
        ("jwk", json!({"jwk": attacker.public_jwk()})),
    ];
    let provider_ed_kid = h.issuer.current_kid(KeyKind::EdDsa);
    for (name, offer) in &offers {
        // The attacker's kid is not in the provider's JWKS.
        let header = with(
            &json!({"alg": "EdDSA", "typ": "JWT", "kid": attacker.kid()}),
            offer.clone(),
        );
        let token = sign(&attacker_key, Algorithm::EdDSA, &header, &claims);
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("no key"), "{name}: {message}");
        assert!(message.contains(&attacker.kid()), "{name}: {message}");

        // The provider's kid: its key does not verify the attacker's signature.
        let header = with(
            &json!({"alg": "EdDSA", "typ": "JWT", "kid": provider_ed_kid}),
            offer.clone(),
        );
        let token = sign(&attacker_key, Algorithm::EdDSA, &header, &claims);
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("signature does not verify"),
            "{name}: {message}"
        );

        // No kid, against a JWKS of three keys: no key is chosen.
        let header = with(&json!({"alg": "EdDSA", "typ": "JWT"}), offer.clone());
        let token = sign(&attacker_key, Algorithm::EdDSA, &header, &claims);
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("no kid"), "{name}: {message}");

        // No kid, against a JWKS of one key: that key is chosen, and it does
        // not verify the attacker's signature.
        let token = sign(
            &attacker_key,
            Algorithm::EdDSA,
            &header,
            &own.claims("alice"),
        );
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("signature does not verify"),
            "{name}: {message}"
        );
    }

    // x5c: a certificate chain for the attacker's P-256 key.
    for kid in [Some(h.issuer.current_kid(KeyKind::Es256)), None] {
        let mut header = json!({"alg": "ES256", "typ": "JWT", "x5c": x5c});
        if let Some(kid) = &kid {
            header["kid"] = json!(kid);
        }
        let token = sign(&x5c_key, Algorithm::ES256, &header, &claims);
        let message = h.connect_refused("authenticated", &token).await;
        match kid {
            Some(_) => assert!(message.contains("signature does not verify"), "{message}"),
            None => assert!(message.contains("no kid"), "{message}"),
        }
    }

    // Signed by the provider, the same headers are merely ignored.
    let mut header = own.header();
    for (_, offer) in &offers {
        header = with(&header, offer.clone());
    }
    header["x5c"] = x5c.clone();
    let token = own.sign(&header, &own.claims("mallory"));
    let client = h
        .connect("authenticated", &token)
        .await
        .expect("a provider-signed token carrying jku, x5u, jwk and x5c is accepted");
    assert_eq!(user_id_of(&client).await.as_deref(), Some("mallory"));
    // Ignored, but not when they are not what they claim to be.
    for offer in [
        json!({"jwk": "not a key"}),
        json!({"x5c": "not a list"}),
        json!({"jku": 7}),
    ] {
        let token = own.sign(&with(&own.header(), offer.clone()), &own.claims("mallory"));
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("malformed"), "{offer}: {message}");
    }

    assert_eq!(lure.connections(), 0, "jku and x5u are never fetched");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_critical_header_extension_is_refused_by_name() {
    let (h, own) = start_with_own_provider("").await;
    let claims = own.claims("alice");

    // The provider's signature is valid: only `crit` refuses these.
    let header = with(
        &own.header(),
        json!({"crit": ["exp-ext"], "exp-ext": 1_700_000_000}),
    );
    let message = h
        .connect_refused("authenticated", &own.sign(&header, &claims))
        .await;
    assert!(message.contains("\"exp-ext\""), "{message}");
    assert!(message.contains("critical"), "{message}");
    assert!(message.contains("crit"), "{message}");
    assert!(message.contains("not support"), "{message}");

    // RFC 7797's unencoded payload, which changes what is signed.
    let header = with(&own.header(), json!({"crit": ["b64"], "b64": false}));
    let message = h
        .connect_refused("authenticated", &own.sign(&header, &claims))
        .await;
    assert!(message.contains("\"b64\""), "{message}");

    // A registered name listed as critical.
    let header = with(&own.header(), json!({"crit": ["alg"]}));
    let message = h
        .connect_refused("authenticated", &own.sign(&header, &claims))
        .await;
    assert!(message.contains("critical"), "{message}");

    // Malformed: empty, not a list, not names.
    for crit in [json!([]), json!("exp-ext"), json!([1, 2]), json!(null)] {
        let header = with(&own.header(), json!({"crit": crit}));
        let message = h
            .connect_refused("authenticated", &own.sign(&header, &claims))
            .await;
        assert!(
            message.contains("\"crit\" is malformed"),
            "{crit}: {message}"
        );
    }

    // A long extension name is cut short.
    let long = "e".repeat(3000);
    let header = with(&own.header(), json!({"crit": [long]}));
    let message = h
        .connect_refused("authenticated", &own.sign(&header, &claims))
        .await;
    assert_short_echo(&message, &long);

    // Without `crit`, the same provider's token is accepted.
    let client = h
        .connect("authenticated", &own.sign(&own.header(), &claims))
        .await
        .expect("the token without crit is accepted");
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_token_is_refused_as_jwe() {
    let h = Harness::start().await;
    let header = b64_json(&json!({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "k1"}));
    let random = |n: usize| b64((0..n).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    let jwe = format!(
        "{header}.{}.{}.{}.{}",
        random(256),
        random(12),
        random(200),
        random(16)
    );
    let message = h.connect_refused("authenticated", &jwe).await;
    assert!(
        message.contains("encrypted tokens (JWE) are not accepted"),
        "{message}"
    );
    // Direct encryption has an empty key part: still five parts.
    let dir = b64_json(&json!({"alg": "dir", "enc": "A128GCM"}));
    let jwe = format!("{dir}..{}.{}.{}", random(12), random(40), random(16));
    let message = h.connect_refused("authenticated", &jwe).await;
    assert!(message.contains("JWE"), "{message}");

    // Any other number of parts is not a JWT.
    let [header, payload, signature] = parts(&h.token("alice")).map(str::to_owned);
    for token in [
        format!("{header}.{payload}"),
        format!("{header}.{payload}.{signature}.{signature}"),
        format!("{header}.{payload}.{signature}.{signature}.{signature}.{signature}"),
    ] {
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("not a JWT"), "{message}");
    }
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_padding_or_foreign_characters_in_any_part_are_not_a_jwt() {
    let (h, own) = start_with_own_provider("").await;

    // Fillers so that no part's length is a multiple of four: each has a
    // padded spelling.
    let token = (0..3)
        .flat_map(|a| (0..3).map(move |b| (a, b)))
        .map(|(a, b)| {
            let header = with(&own.header(), json!({"x": "h".repeat(a)}));
            let mut claims = own.claims("alice");
            claims["x"] = json!("c".repeat(b));
            own.sign(&header, &claims)
        })
        .find(|token| parts(token).iter().all(|p| p.len() % 4 != 0))
        .unwrap();
    let client = h
        .connect("authenticated", &token)
        .await
        .expect("the token as signed is accepted");
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));

    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for i in 0..3 {
        let altered = |part: String| {
            let mut all = parts(&token).map(str::to_owned);
            all[i] = part;
            all.join(".")
        };
        let part = parts(&token)[i];
        let mut variants = vec![
            // `=` padding, as standard base64 would have it.
            format!("{part}{}", "=".repeat(4 - part.len() % 4)),
            format!("{part}="),
        ];
        for foreign in ['+', '/', '!', ' '] {
            let mut chars: Vec<char> = part.chars().collect();
            chars[1] = foreign;
            variants.push(chars.into_iter().collect());
        }
        // The same bytes with non-zero trailing bits in the last character.
        let mut bytes = part.as_bytes().to_vec();
        let last = bytes.last_mut().unwrap();
        let index = ALPHABET.iter().position(|c| c == last).unwrap();
        *last = ALPHABET[index | 1];
        variants.push(String::from_utf8(bytes).unwrap());

        for variant in variants {
            let message = h.connect_refused("authenticated", &altered(variant)).await;
            assert!(message.contains("not a JWT"), "part {i}: {message}");
            assert!(message.contains("without padding"), "part {i}: {message}");
        }
    }
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_sets_and_headers_that_are_not_json_objects_are_refused() {
    let (h, own) = start_with_own_provider("").await;

    // Signed by the provider: only the shape of the claims refuses them.
    for claims in [json!(["alice"]), json!("alice"), Value::Null, json!(42)] {
        let token = h.issuer.mint_exact(KeyKind::Rs256, claims.clone());
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("claims set is not a JSON object"),
            "{claims}: {message}"
        );
    }
    for header in ["[\"EdDSA\"]", "\"EdDSA\"", "null"] {
        let token = own.sign_raw(header, &own.claims("alice").to_string());
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("token header is not a JSON object"),
            "{header}: {message}"
        );
    }

    // Nesting deeper than the JSON parser follows, in either part.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let header = own.header().to_string();
    for token in [
        own.sign_raw(&header, &format!("{{\"deep\":{deep}}}")),
        own.sign_raw(&format!("{{\"deep\":{deep}}}"), "{}"),
    ] {
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("not a JWT"), "{message}");
    }

    // A member named twice has no single meaning, in claims or header.
    let valid_exp = unix_now() + 3600;
    let payload = format!(
        r#"{{"iss":"{}","sub":"alice","aud":"todo-app","exp":{},"exp":{valid_exp}}}"#,
        own.issuer.issuer(),
        unix_now() - 3600
    );
    let message = h
        .connect_refused("authenticated", &own.sign_raw(&header, &payload))
        .await;
    assert!(
        message.contains("\"exp\" appears twice in the token's claims set"),
        "{message}"
    );
    let payload = format!(
        r#"{{"iss":"{}","sub":"alice","sub":"bob","aud":"todo-app","exp":{valid_exp}}}"#,
        own.issuer.issuer()
    );
    let message = h
        .connect_refused("authenticated", &own.sign_raw(&header, &payload))
        .await;
    assert!(message.contains("\"sub\" appears twice"), "{message}");
    let twice = format!(r#"{{"alg":"none","alg":"EdDSA","kid":"{}"}}"#, own.kid);
    let message = h
        .connect_refused(
            "authenticated",
            &own.sign_raw(&twice, &own.claims("alice").to_string()),
        )
        .await;
    assert!(
        message.contains("\"alg\" appears twice in the token header"),
        "{message}"
    );
    still_serves_alice(&h).await;
}

/// `exp` and `nbf` as the raw JSON text `exp` and `nbf` (or absent).
fn timed_claims(own: &OwnProvider, exp: &str, nbf: Option<&str>) -> String {
    let nbf = nbf.map_or_else(String::new, |nbf| format!(r#","nbf":{nbf}"#));
    format!(
        r#"{{"iss":"{}","sub":"alice","aud":"todo-app","exp":{exp}{nbf}}}"#,
        own.issuer.issuer()
    )
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_must_be_numeric_dates_before_the_year_10000() {
    let (h, own) = start_with_own_provider("").await;
    let header = own.header().to_string();
    let future = unix_now() + 3600;

    // All signed by the provider: only the time claims refuse these.
    let not_numeric = [
        ("\"9999999999\"", "a string"),
        ("true", "a boolean"),
        ("null", "null"),
        ("{\"seconds\":9999999999}", "an object"),
    ];
    for (exp, kind) in not_numeric {
        let token = own.sign_raw(&header, &timed_claims(&own, exp, None));
        let message = h.connect_refused("authenticated", &token).await;
        assert!(
            message.contains("\"exp\" claim is not a NumericDate"),
            "exp {exp}: {message}"
        );
        assert!(message.contains(kind), "exp {exp}: {message}");
    }
    let out_of_range = [
        "-1",
        "-1.5",
        "1e300",
        // u64::MAX, and one more (which JSON parsers read as a float).
        "18446744073709551615",
        "18446744073709551616",
        // The first second of the year 10000.
        "253402300800",
    ];
    for exp in out_of_range {
        let token = own.sign_raw(&header, &timed_claims(&own, exp, None));
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("\"exp\" claim"), "exp {exp}: {message}");
        assert!(message.contains("out of range"), "exp {exp}: {message}");
        assert!(message.contains("year 9999"), "exp {exp}: {message}");
    }
    let nbfs = [
        ("\"0\"", "not a NumericDate"),
        ("false", "not a NumericDate"),
        ("-1", "out of range"),
        ("1e300", "out of range"),
        ("18446744073709551616", "out of range"),
    ];
    for (nbf, expected) in nbfs {
        let claims = timed_claims(&own, &future.to_string(), Some(nbf));
        let message = h
            .connect_refused("authenticated", &own.sign_raw(&header, &claims))
            .await;
        assert!(message.contains("\"nbf\" claim"), "nbf {nbf}: {message}");
        assert!(message.contains(expected), "nbf {nbf}: {message}");
    }

    // A fraction is allowed (RFC 7519 §2), and never lengthens validity:
    // the expiry is named in whole seconds, rounded down.
    let token = own.sign_raw(&header, &timed_claims(&own, "1.5e9", None));
    let message = h.connect_refused("authenticated", &token).await;
    assert!(
        message.contains("token expired at 2017-07-14T02:40:00Z"),
        "{message}"
    );
    let past = unix_now() - 60;
    let token = own.sign_raw(&header, &timed_claims(&own, &format!("{past}.9"), None));
    let message = h.connect_refused("authenticated", &token).await;
    assert!(
        message.contains(&format!("token expired at {}", rfc3339(past))),
        "{message}"
    );
    let nbf = unix_now() + 600;
    let claims = timed_claims(&own, &future.to_string(), Some(&format!("{}.1", nbf - 1)));
    let message = h
        .connect_refused("authenticated", &own.sign_raw(&header, &claims))
        .await;
    assert!(
        message.contains(&format!("token is not valid before {}", rfc3339(nbf))),
        "{message}"
    );

    // Accepted: a fractional exp and nbf, and the last second of year 9999,
    // whose session lives past login and a first query.
    let accepted = [
        timed_claims(
            &own,
            &format!("{future}.75"),
            Some(&format!("{}.5", unix_now() - 10)),
        ),
        timed_claims(&own, &format!("{:e}", future as f64), None),
        timed_claims(&own, "253402300799", Some("0")),
    ];
    for claims in accepted {
        let token = own.sign_raw(&header, &claims);
        let client = h
            .connect("authenticated", &token)
            .await
            .unwrap_or_else(|e| panic!("{claims} is accepted: {e}"));
        assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
        // The claims reach the database as the token states them.
        let exp: f64 = client
            .query_one("select (auth.session() ->> 'exp')::float8", &[])
            .await
            .unwrap()
            .get(0);
        let stated: Value = serde_json::from_str(&claims).unwrap();
        assert_eq!(Some(exp), stated["exp"].as_f64(), "{claims}");
        assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
    }
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_exactly_the_byte_limit_is_accepted_and_one_byte_more_is_not_read() {
    let (h, own) = start_with_own_provider("[listen]\nmax_token_bytes = 2048\n").await;

    // A valid token of exactly 2048 bytes, padded with a claim and, to reach
    // every length, a header member.
    let token = (0..3)
        .flat_map(|a| (0..2048).map(move |b| (a, b)))
        .map(|(a, b)| {
            let header = with(&own.header(), json!({"x": "h".repeat(a)}));
            let mut claims = own.claims("alice");
            claims["filler"] = json!("c".repeat(b));
            own.sign(&header, &claims)
        })
        .find(|token| token.len() == 2048)
        .expect("a token of 2048 bytes");
    let client = h
        .connect("authenticated", &token)
        .await
        .expect("a token of exactly the limit is accepted");
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));

    // One byte more, whether it would parse or not, is refused by its size.
    for over in [format!("{token}A"), "x".repeat(2049)] {
        let message = h.connect_refused("authenticated", &over).await;
        assert!(
            message.contains("2049 bytes, more than the 2048-byte token limit"),
            "{message}"
        );
    }

    // The refusal comes from the length alone: announce a 2049-byte
    // password, send none of it, and the answer comes anyway.
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    wire::send(&mut tcp, &wire::startup_message(wire::APP_STARTUP)).await;
    let (kind, body) = wire::read_message(&mut tcp).await.unwrap();
    assert_eq!((kind, body.as_slice()), (b'R', &3u32.to_be_bytes()[..]));
    let length = 4 + 2049 + 1u32;
    let mut announce = vec![b'p'];
    announce.extend_from_slice(&length.to_be_bytes());
    wire::send(&mut tcp, &announce).await;
    let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(&mut tcp))
        .await
        .expect("an answer without the password's body")
        .unwrap();
    assert_eq!(kind, b'E');
    let error = wire::error_response(&body);
    assert_eq!(
        (error.severity.as_str(), error.code.as_str()),
        ("FATAL", "28000")
    );
    assert!(error.message.contains("2048-byte token limit"), "{error:?}");

    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_forged_signatures_in_a_row_leave_the_proxy_serving() {
    let h = Harness::start().await;
    still_serves_alice(&h).await;
    let fetches = h.issuer.jwks_fetches();
    let tokens: Vec<String> = KeyKind::ALL
        .into_iter()
        .map(|kind| h.token_with(kind, json!({"sub": "alice", "aud": "todo-app"})))
        .collect();

    for i in 0..200 {
        let token = &tokens[i % tokens.len()];
        let [header, payload, signature] = parts(token);
        // One character among the first forty changed: each carries six full
        // bits, so the signature stays canonical base64url, and wrong.
        let mut forged = signature.as_bytes().to_vec();
        let at = i % 40;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = format!("{header}.{payload}.{}", String::from_utf8(forged).unwrap());
        let message = h.connect_refused("authenticated", &forged).await;
        assert!(
            message.contains("signature does not verify"),
            "attempt {i} ({:?}): {message}",
            jwt_header(token)["alg"]
        );
    }
    assert_eq!(
        h.issuer.jwks_fetches(),
        fetches,
        "forged signatures with known kids never refetch the JWKS"
    );
    still_serves_alice(&h).await;
    for token in &tokens {
        let client = h.connect("authenticated", token).await.unwrap();
        assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
    }
}
