//! A token issuer that serves a real OIDC discovery document and JWKS over
//! plain HTTP on loopback.
//!
//! The proxy must be exercised against the same HTTP exchanges it meets in
//! production (discovery, JWKS with Cache-Control, key rotation, outages, slow
//! answers), so the tests and `rlsgate demo` use this server rather than
//! in-process keys. [`DevIssuer::start`] generates its keys and persists
//! nothing; [`DevIssuer::start_with`] publishes given keys (e.g. loaded from
//! files by `rlsgate issuer`) under a given issuer URL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use super::keys::{KeyKind, SigningKeyPair};

/// Path of the discovery document, relative to the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the key set, relative to the issuer URL.
pub const JWKS_PATH: &str = "/jwks.json";
/// Lifetime added to minted tokens that carry no `exp`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// `max-age` sent with the JWKS unless changed with [`DevIssuer::set_jwks_max_age`].
pub const DEFAULT_JWKS_MAX_AGE: u64 = 300;

/// A running issuer. Clones share the same server and keys; the server stops
/// on [`DevIssuer::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct DevIssuer {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Dropping the sender (with the last handle) also stops the server.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// State the HTTP handler sees; it must not own the stop sender, or the
/// server would keep itself alive.
struct Shared {
    base: String,
    keys: Mutex<KeyStore>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    down: AtomicBool,
    delay: Mutex<Duration>,
    jwks_max_age: AtomicU64,
}

#[derive(Default)]
struct KeyStore {
    /// Every key this issuer holds, in the order added (the JWKS order).
    all: Vec<HeldKey>,
    current: HashMap<KeyKind, String>,
}

struct HeldKey {
    pair: SigningKeyPair,
    published: bool,
}

impl KeyStore {
    /// Adds a published key and makes it current for its kind.
    fn add(&mut self, pair: SigningKeyPair) -> String {
        let kid = pair.kid();
        self.current.insert(pair.kind(), kid.clone());
        self.all.push(HeldKey {
            pair,
            published: true,
        });
        kid
    }

    fn find(&self, kid: &str) -> Option<&HeldKey> {
        self.all.iter().find(|key| key.pair.kid() == kid)
    }
}

impl DevIssuer {
    /// Generates one key of each kind (all published) and serves on `addr`
    /// (use `127.0.0.1:0` in tests).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<DevIssuer> {
        // RSA generation takes a noticeable moment; keep it off the runtime threads.
        let keys = tokio::task::spawn_blocking(|| {
            KeyKind::ALL
                .into_iter()
                .map(SigningKeyPair::generate)
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .context("key generation task failed")??;
        Self::start_with(addr, None, keys).await
    }

    /// Publishes `keys` (in this order; the last of each kind is current for
    /// [`DevIssuer::mint`]) and serves on `addr`. The issuer URL is
    /// `issuer_url` exactly as given, or `http://<bound address>`: pass the
    /// URL clients and proxies reach this server at when that is not the
    /// bind address (e.g. `http://issuer:8080` in a compose network). It
    /// must have no path, because discovery is served at the root.
    pub async fn start_with(
        addr: SocketAddr,
        issuer_url: Option<String>,
        keys: Vec<SigningKeyPair>,
    ) -> anyhow::Result<DevIssuer> {
        anyhow::ensure!(!keys.is_empty(), "a token issuer needs at least one key");
        let mut store = KeyStore::default();
        for key in keys {
            anyhow::ensure!(
                store.find(&key.kid()).is_none(),
                "key {} is given twice",
                key.kid()
            );
            store.add(key);
        }
        if let Some(url) = &issuer_url {
            check_issuer_url(url)?;
        }

        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the token issuer"))?;
        let addr = listener.local_addr()?;

        let shared = Arc::new(Shared {
            base: issuer_url.unwrap_or_else(|| format!("http://{addr}")),
            keys: Mutex::new(store),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            jwks_max_age: AtomicU64::new(DEFAULT_JWKS_MAX_AGE),
        });

        let router = Router::new().fallback(respond).with_state(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    // Resolves on an explicit stop and when the sender is dropped.
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "token issuer stopped with an error");
            }
        });
        tracing::debug!(issuer = %shared.base, "token issuer listening");

        Ok(DevIssuer {
            handle: Arc::new(Handle {
                shared,
                addr,
                stop: Mutex::new(Some(stop_tx)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The issuer URL (without a trailing slash unless one was given to
    /// [`DevIssuer::start_with`]); also the `iss` of minted tokens.
    pub fn issuer(&self) -> String {
        self.shared().base.clone()
    }

    /// Where the key set is served.
    pub fn jwks_url(&self) -> String {
        self.shared().jwks_url()
    }

    /// Where the discovery document is served.
    pub fn discovery_url(&self) -> String {
        format!("{}{DISCOVERY_PATH}", self.shared().root())
    }

    /// The kids of the published keys, in JWKS order.
    pub fn published_kids(&self) -> Vec<String> {
        let store = self.shared().keys.lock().expect("issuer keys poisoned");
        store
            .all
            .iter()
            .filter(|key| key.published)
            .map(|key| key.pair.kid())
            .collect()
    }

    /// The address actually bound (the port is chosen by the OS for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.addr
    }

    /// Signs `claims` (a JSON object) with the current key of `kind`; the
    /// header carries its `kid` and `alg`. Adds `iss` (this issuer), `iat`
    /// (now) and `exp` (now + 1 h) unless `claims` already has them.
    ///
    /// Panics if `claims` is not an object: this is a test and demo tool.
    pub fn mint(&self, kind: KeyKind, claims: Value) -> String {
        let kid = self.current_kid(kind);
        self.mint_with_kid(&kid, claims)
    }

    /// Like [`DevIssuer::mint`] but with any key generated here, published or
    /// retired, chosen by `kid`. Panics on an unknown kid.
    pub fn mint_with_kid(&self, kid: &str, claims: Value) -> String {
        let claims = Value::Object(self.with_default_claims(claims));
        self.sign_with_kid(kid, &claims)
    }

    /// Signs `claims` exactly as given, without adding `iss`, `iat` or `exp`,
    /// so that tests can present tokens that lack a required claim.
    pub fn mint_exact(&self, kind: KeyKind, claims: Value) -> String {
        let kid = self.current_kid(kind);
        self.sign_with_kid(&kid, &claims)
    }

    /// Signs with a freshly generated key that is never published, so the
    /// verifier meets a `kid` absent from the JWKS even after refetching.
    pub fn mint_with_unpublished_key(&self, kind: KeyKind, claims: Value) -> String {
        let key = SigningKeyPair::generate(kind).expect("key generation failed");
        key.sign(&Value::Object(self.with_default_claims(claims)))
    }

    /// The `kid` that [`DevIssuer::mint`] uses for `kind`. Panics if this
    /// issuer holds no key of that kind.
    pub fn current_kid(&self, kind: KeyKind) -> String {
        let store = self.shared().keys.lock().expect("issuer keys poisoned");
        store
            .current
            .get(&kind)
            .unwrap_or_else(|| panic!("this issuer holds no {} key", kind.alg_name()))
            .clone()
    }

    /// Generates a new key of `kind`, publishes it and makes it current for
    /// [`DevIssuer::mint`]; earlier keys stay published. Returns the new kid.
    pub fn rotate(&self, kind: KeyKind) -> String {
        let key = SigningKeyPair::generate(kind).expect("key generation failed");
        let mut store = self.shared().keys.lock().expect("issuer keys poisoned");
        store.add(key)
    }

    /// Stops publishing the key with this kid. It can still sign via
    /// [`DevIssuer::mint_with_kid`], and stays current for `mint` if it was,
    /// which yields tokens whose key has left the JWKS. Unknown kids are ignored.
    pub fn retire(&self, kid: &str) {
        self.set_published(kid, false);
    }

    /// Publishes a retired key again.
    pub fn republish(&self, kid: &str) {
        self.set_published(kid, true);
    }

    fn set_published(&self, kid: &str, published: bool) {
        let mut store = self.shared().keys.lock().expect("issuer keys poisoned");
        if let Some(key) = store.all.iter_mut().find(|key| key.pair.kid() == kid) {
            key.published = published;
        }
    }

    /// The published key set, exactly as `/jwks.json` serves it.
    pub fn jwks(&self) -> Value {
        self.shared().jwks()
    }

    /// The discovery document, exactly as it is served.
    pub fn discovery_document(&self) -> Value {
        self.shared().discovery_document()
    }

    /// Requests received for `/jwks.json`, counted on arrival: requests
    /// answered 503 while down, or still waiting out the delay, count too,
    /// so a test can see every attempt the verifier made.
    pub fn jwks_fetches(&self) -> usize {
        self.shared().jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests received for the discovery document, counted like
    /// [`DevIssuer::jwks_fetches`].
    pub fn discovery_fetches(&self) -> usize {
        self.shared().discovery_fetches.load(Ordering::SeqCst)
    }

    /// While down, every path answers 503, as an unreachable provider behind a
    /// load balancer would.
    pub fn set_down(&self, down: bool) {
        self.shared().down.store(down, Ordering::SeqCst);
    }

    /// Waits this long before every response (also before a 503), to exercise
    /// the verifier's fetch timeouts. Zero turns it off.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared().delay.lock().expect("issuer delay poisoned") = delay;
    }

    /// The `max-age` of the JWKS `Cache-Control` header, to exercise the
    /// verifier's cache bounds.
    pub fn set_jwks_max_age(&self, seconds: u64) {
        self.shared().jwks_max_age.store(seconds, Ordering::SeqCst);
    }

    /// Stops accepting connections and waits (up to 5 s) for requests in
    /// flight to finish. Later calls return at once.
    pub async fn shutdown(&self) {
        if let Some(stop) = self
            .handle
            .stop
            .lock()
            .expect("issuer stop poisoned")
            .take()
        {
            let _ = stop.send(());
        }
        let task = self
            .handle
            .task
            .lock()
            .expect("issuer task poisoned")
            .take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    fn with_default_claims(&self, claims: Value) -> Map<String, Value> {
        let mut claims = match claims {
            Value::Object(map) => map,
            other => panic!("token claims must be a JSON object, got {other}"),
        };
        let now = crate::clock::unix_now();
        claims.entry("iss").or_insert_with(|| json!(self.issuer()));
        claims.entry("iat").or_insert_with(|| json!(now));
        claims
            .entry("exp")
            .or_insert_with(|| json!(now + DEFAULT_TOKEN_LIFETIME.as_secs()));
        claims
    }

    fn sign_with_kid(&self, kid: &str, claims: &Value) -> String {
        let store = self.shared().keys.lock().expect("issuer keys poisoned");
        let key = store
            .find(kid)
            .unwrap_or_else(|| panic!("this issuer holds no key with kid {kid}"));
        key.pair.sign(claims)
    }
}

impl Shared {
    /// The issuer URL without a trailing slash, to append paths to.
    fn root(&self) -> &str {
        self.base.trim_end_matches('/')
    }

    fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.root())
    }

    fn jwks(&self) -> Value {
        let store = self.keys.lock().expect("issuer keys poisoned");
        super::keys::jwks(
            store
                .all
                .iter()
                .filter(|key| key.published)
                .map(|key| &key.pair),
        )
    }

    fn discovery_document(&self) -> Value {
        let algorithms: Vec<&str> = {
            let store = self.keys.lock().expect("issuer keys poisoned");
            KeyKind::EVERY
                .into_iter()
                .filter(|kind| store.all.iter().any(|key| key.pair.kind() == *kind))
                .map(KeyKind::alg_name)
                .collect()
        };
        json!({
            "issuer": self.base,
            "jwks_uri": self.jwks_url(),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
        })
    }
}

/// Answers every request: one handler so that "down" and the delay apply to
/// all paths alike, including unknown ones.
async fn respond(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    let path = uri.path();
    match path {
        JWKS_PATH => {
            shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        }
        DISCOVERY_PATH => {
            shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    let delay = *shared.delay.lock().expect("issuer delay poisoned");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if shared.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "token issuer is down\n").into_response();
    }
    if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "GET")]).into_response();
    }
    match path {
        JWKS_PATH => {
            let max_age = shared.jwks_max_age.load(Ordering::SeqCst);
            let cache_control = HeaderValue::from_str(&format!("max-age={max_age}"))
                .expect("max-age is a valid header value");
            let mut response = axum::Json(shared.jwks()).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, cache_control);
            response
        }
        DISCOVERY_PATH => axum::Json(shared.discovery_document()).into_response(),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// An issuer URL this server can stand for: http(s), a host, and no path,
/// query or credentials, since discovery is served at the root.
fn check_issuer_url(text: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(text).with_context(|| format!("issuer URL {text:?} is not a URL"))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && url.host().is_some(),
        "issuer URL {text:?} must be http:// or https:// with a host"
    );
    anyhow::ensure!(
        url.path() == "/" && url.query().is_none() && url.fragment().is_none(),
        "issuer URL {text:?} must have no path or query: this issuer serves {DISCOVERY_PATH} at the root"
    );
    anyhow::ensure!(
        url.username().is_empty() && url.password().is_none(),
        "issuer URL {text:?} must not contain credentials"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("body is JSON")
        }
    }

    /// A deliberately minimal HTTP/1.1 client: one request per connection.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of headers");
        let head = std::str::from_utf8(&raw[..split]).expect("UTF-8 head");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .expect("status line")
            .split(' ')
            .nth(1)
            .expect("status code");
        let headers = lines
            .map(|line| {
                let (key, value) = line.split_once(':').expect("header line");
                (key.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        Reply {
            status: status.parse().expect("numeric status"),
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    async fn start() -> DevIssuer {
        DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .expect("issuer starts")
    }

    /// Verifies `token` against the JWKS served over HTTP, as the proxy would.
    async fn verify(issuer: &DevIssuer, token: &str) -> anyhow::Result<Value> {
        let reply = get(issuer.local_addr(), JWKS_PATH).await;
        assert_eq!(reply.status, 200);
        let set: JwkSet = serde_json::from_slice(&reply.body)?;
        let header = decode_header(token)?;
        let kid = header.kid.context("token has no kid")?;
        let jwk = set
            .find(&kid)
            .with_context(|| format!("kid {kid} not in JWKS"))?;
        let key = DecodingKey::from_jwk(jwk)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[issuer.issuer()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        Ok(decode::<Value>(token, &key, &validation)?.claims)
    }

    #[tokio::test]
    async fn minted_tokens_verify_against_served_jwks() {
        let issuer = start().await;
        for kind in KeyKind::ALL {
            let token = issuer.mint(kind, json!({ "sub": "alice", "role": "authenticated" }));
            let header = decode_header(&token).unwrap();
            assert_eq!(header.alg, kind.algorithm());
            assert_eq!(
                header.kid.as_deref(),
                Some(issuer.current_kid(kind).as_str())
            );
            let claims = verify(&issuer, &token)
                .await
                .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
            assert_eq!(claims["sub"], "alice");
            assert_eq!(claims["iss"], issuer.issuer());
            let iat = claims["iat"].as_u64().unwrap();
            assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
        }
        // Caller-supplied claims win over the defaults.
        let token = issuer.mint(
            KeyKind::Es256,
            json!({ "sub": "bob", "exp": 4_000_000_000u64 }),
        );
        let claims = verify(&issuer, &token).await.unwrap();
        assert_eq!(claims["exp"], 4_000_000_000u64);
        // mint_exact adds nothing.
        let token = issuer.mint_exact(KeyKind::EdDsa, json!({ "sub": "carol" }));
        let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
            .unwrap()
            .claims;
        assert_eq!(claims, json!({ "sub": "carol" }));
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn discovery_document_and_cache_control() {
        let issuer = start().await;
        assert!(!issuer.issuer().ends_with('/'));
        let reply = get(issuer.local_addr(), DISCOVERY_PATH).await;
        assert_eq!(reply.status, 200);
        let doc = reply.json();
        assert_eq!(doc["issuer"], issuer.issuer());
        assert_eq!(doc["jwks_uri"], issuer.jwks_url());
        assert_eq!(doc, issuer.discovery_document());

        let reply = get(issuer.local_addr(), JWKS_PATH).await;
        assert_eq!(reply.header("cache-control"), Some("max-age=300"));
        assert!(
            reply
                .header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        let jwks = reply.json();
        assert_eq!(jwks, issuer.jwks());
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        for key in keys {
            assert_eq!(key["use"], "sig");
            // The RFC 7638 thumbprint, base64url.
            assert_eq!(key["kid"].as_str().unwrap().len(), 43);
        }
        issuer.set_jwks_max_age(5);
        let reply = get(issuer.local_addr(), JWKS_PATH).await;
        assert_eq!(reply.header("cache-control"), Some("max-age=5"));
        assert_eq!(get(issuer.local_addr(), "/nope").await.status, 404);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn rotate_publishes_new_kid_and_retire_unpublishes() {
        let issuer = start().await;
        for kind in KeyKind::ALL {
            let old = issuer.current_kid(kind);
            let old_token = issuer.mint(kind, json!({ "sub": "alice" }));
            let new = issuer.rotate(kind);
            assert_ne!(old, new);
            assert_eq!(issuer.current_kid(kind), new);

            let token = issuer.mint(kind, json!({ "sub": "alice" }));
            assert_eq!(
                decode_header(&token).unwrap().kid.as_deref(),
                Some(new.as_str())
            );
            verify(&issuer, &token).await.unwrap();
            // The earlier key is still published.
            verify(&issuer, &old_token).await.unwrap();

            issuer.retire(&old);
            let error = verify(&issuer, &old_token).await.unwrap_err();
            assert!(error.to_string().contains("not in JWKS"), "{error:#}");
            // A retired key still signs on request.
            let retired = issuer.mint_with_kid(&old, json!({ "sub": "alice" }));
            assert_eq!(
                decode_header(&retired).unwrap().kid.as_deref(),
                Some(old.as_str())
            );
            issuer.republish(&old);
            verify(&issuer, &retired).await.unwrap();
            issuer.retire(&old);
        }
        assert_eq!(issuer.jwks()["keys"].as_array().unwrap().len(), 3);

        for kind in KeyKind::ALL {
            let token = issuer.mint_with_unpublished_key(kind, json!({ "sub": "mallory" }));
            let kid = decode_header(&token).unwrap().kid.unwrap();
            assert!(
                issuer.jwks()["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|k| k["kid"] != kid)
            );
            assert!(verify(&issuer, &token).await.is_err());
        }
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn down_answers_503_everywhere() {
        let issuer = start().await;
        issuer.set_down(true);
        for path in [JWKS_PATH, DISCOVERY_PATH, "/anything"] {
            assert_eq!(get(issuer.local_addr(), path).await.status, 503, "{path}");
        }
        issuer.set_down(false);
        assert_eq!(get(issuer.local_addr(), JWKS_PATH).await.status, 200);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn counts_fetches_including_failed_ones() {
        let issuer = start().await;
        assert_eq!(issuer.jwks_fetches(), 0);
        get(issuer.local_addr(), JWKS_PATH).await;
        get(issuer.local_addr(), JWKS_PATH).await;
        get(issuer.local_addr(), DISCOVERY_PATH).await;
        assert_eq!(issuer.jwks_fetches(), 2);
        assert_eq!(issuer.discovery_fetches(), 1);
        issuer.set_down(true);
        get(issuer.local_addr(), JWKS_PATH).await;
        assert_eq!(issuer.jwks_fetches(), 3);
        // Building the set locally is not a fetch.
        let _ = issuer.jwks();
        assert_eq!(issuer.jwks_fetches(), 3);
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn delay_holds_the_response() {
        let issuer = start().await;
        issuer.set_delay(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let reply = get(issuer.local_addr(), JWKS_PATH).await;
        assert_eq!(reply.status, 200);
        // Only a lower bound: a sleep never ends early.
        assert!(started.elapsed() >= Duration::from_millis(300));
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let issuer = start().await;
        let addr = issuer.local_addr();
        let clone = issuer.clone();
        issuer.shutdown().await;
        clone.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_serving() {
        let issuer = start().await;
        let addr = issuer.local_addr();
        drop(issuer);
        // The server notices the dropped handle asynchronously.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("issuer still accepting connections after its last handle was dropped");
    }

    #[tokio::test]
    async fn start_with_publishes_given_keys_under_the_given_issuer() {
        let ed = SigningKeyPair::generate(KeyKind::EdDsa).unwrap();
        let es = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let issuer = DevIssuer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            Some("http://issuer.test:8080".into()),
            vec![ed.clone(), es.clone()],
        )
        .await
        .unwrap();
        assert_eq!(issuer.issuer(), "http://issuer.test:8080");
        assert_eq!(issuer.jwks_url(), "http://issuer.test:8080/jwks.json");
        assert_eq!(issuer.published_kids(), vec![ed.kid(), es.kid()]);
        assert_eq!(issuer.current_kid(KeyKind::Es256), es.kid());

        let doc = get(issuer.local_addr(), DISCOVERY_PATH).await.json();
        assert_eq!(doc["issuer"], "http://issuer.test:8080");
        assert_eq!(doc["jwks_uri"], "http://issuer.test:8080/jwks.json");
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["ES256", "EdDSA"])
        );
        let served = get(issuer.local_addr(), JWKS_PATH).await.json();
        assert_eq!(served, super::super::keys::jwks([&ed, &es]));

        let token = issuer.mint(KeyKind::EdDsa, json!({ "sub": "alice" }));
        assert_eq!(decode_header(&token).unwrap().kid, Some(ed.kid()));
        let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
            .unwrap()
            .claims;
        assert_eq!(claims["iss"], "http://issuer.test:8080");
        issuer.shutdown().await;

        // A trailing slash stays in `iss` but not in the served URLs.
        let issuer = DevIssuer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            Some("https://issuer.test/".into()),
            vec![es],
        )
        .await
        .unwrap();
        assert_eq!(issuer.issuer(), "https://issuer.test/");
        assert_eq!(issuer.jwks_url(), "https://issuer.test/jwks.json");
        issuer.shutdown().await;
    }

    #[tokio::test]
    async fn start_with_refuses_what_it_cannot_serve() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let key = SigningKeyPair::generate(KeyKind::Es256).unwrap();
        let refusal = |result: anyhow::Result<DevIssuer>| match result {
            Ok(_) => panic!("start_with accepted what it must refuse"),
            Err(e) => format!("{e:#}"),
        };
        let message = refusal(DevIssuer::start_with(addr, None, vec![]).await);
        assert!(message.contains("at least one key"), "{message}");
        let message =
            refusal(DevIssuer::start_with(addr, None, vec![key.clone(), key.clone()]).await);
        assert!(message.contains("given twice"), "{message}");
        for (url, expected) in [
            ("issuer:8080", "http:// or https://"),
            ("ftp://issuer", "http:// or https://"),
            ("not a url", "not a URL"),
            ("http://issuer/realms/x", "no path"),
            ("http://issuer/?q=1", "no path"),
            ("http://user:pw@issuer", "credentials"),
        ] {
            let message =
                refusal(DevIssuer::start_with(addr, Some(url.into()), vec![key.clone()]).await);
            assert!(message.contains(expected), "{url}: {message}");
        }
    }
}
