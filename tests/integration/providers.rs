//! Tokens shaped like each real provider's, with the `[[provider]]` block
//! that accepts them, and refused (SQLSTATE 28000, with a message that says
//! why) when a token breaks one of that block's rules.
//!
//! Each provider's keys are served by a `DevIssuer` on loopback (its
//! `jwks_url`), while the tokens carry the provider's real `iss`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::{Harness, unix_now, user_id_of};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rlsgate::dev::issuer::{DevIssuer, KeyKind, SigningKeyPair};
use serde_json::{Value, json};
use tokio_postgres::Client;

/// Serves signing keys of `kinds` on loopback.
async fn key_server(kinds: &[KeyKind]) -> DevIssuer {
    let kinds = kinds.to_vec();
    let pairs = tokio::task::spawn_blocking(move || {
        kinds
            .into_iter()
            .map(|kind| SigningKeyPair::generate(kind).unwrap())
            .collect()
    })
    .await
    .unwrap();
    DevIssuer::start_with("127.0.0.1:0".parse().unwrap(), None, pairs)
        .await
        .expect("start a key server")
}

/// A `[[provider]]` for `issuer` whose keys are at `keys`, plus `lines`.
fn provider(issuer: &str, keys: &DevIssuer, lines: &str) -> String {
    format!(
        "[[provider]]\nissuer = \"{issuer}\"\njwks_url = \"{}\"\nleeway = \"2s\"\n{lines}\n",
        keys.jwks_url()
    )
}

/// Connects as `authenticated`; the token must be accepted.
async fn accepted(h: &Harness, token: &str) -> Client {
    h.connect("authenticated", token)
        .await
        .unwrap_or_else(|e| panic!("the token must be accepted: {e}"))
}

/// A claim of the session's verified claims, as text.
async fn session_claim(client: &Client, name: &str) -> Option<String> {
    client
        .query_one("select auth.session() ->> $1::text", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// Asserts that `token` is refused with a message holding every one of `parts`.
async fn refused(h: &Harness, token: &str, parts: &[&str]) {
    let message = h.connect_refused("authenticated", token).await;
    for part in parts {
        assert!(message.contains(part), "expected {part:?} in: {message}");
    }
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_session_tokens_have_azp_and_no_audience() {
    let keys = key_server(&[KeyKind::Rs256, KeyKind::Es256]).await;
    let iss = "https://my-app.clerk.accounts.dev";
    let h = Harness::start_with(&provider(
        iss,
        &keys,
        "algorithms = [\"RS256\"]\nrequired_claims = [\"sid\"]",
    ))
    .await;
    let claims = json!({
        "iss": iss, "sub": "user_2abc", "azp": "https://app.example.com",
        "sid": "sess_2xyz", "nbf": unix_now() - 5, "v": 2, "fva": [0, -1],
    });
    let client = accepted(&h, &keys.mint(KeyKind::Rs256, claims.clone())).await;
    assert_eq!(user_id_of(&client).await.as_deref(), Some("user_2abc"));
    assert_eq!(
        session_claim(&client, "sid").await.as_deref(),
        Some("sess_2xyz")
    );

    refused(
        &h,
        &keys.mint(KeyKind::Es256, claims.clone()),
        &["ES256", "not accepted by", iss],
    )
    .await;
    let mut no_sid = claims;
    no_sid.as_object_mut().unwrap().remove("sid");
    refused(
        &h,
        &keys.mint(KeyKind::Rs256, no_sid),
        &["no \"sid\" claim", iss],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_access_tokens_carry_an_audience_array_and_namespaced_roles() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let iss = "https://my-tenant.us.auth0.com/";
    let api = "https://api.example.com";
    let roles = "https://api.example.com/roles";
    let h = Harness::start_with(&provider(
        iss,
        &keys,
        &format!("audience = [\"{api}\"]\nrole_claim = \"{roles}\""),
    ))
    .await;
    let token = |aud: Value, held: Value| {
        keys.mint(
            KeyKind::Rs256,
            json!({
                "iss": iss, "sub": "auth0|64f1c2", "aud": aud, roles: held,
                "azp": "AbCdEfGh12345678", "scope": "openid profile email",
            }),
        )
    };
    let audience = json!([api, "https://my-tenant.us.auth0.com/userinfo"]);
    let client = accepted(&h, &token(audience.clone(), json!(["authenticated"]))).await;
    assert_eq!(user_id_of(&client).await.as_deref(), Some("auth0|64f1c2"));

    refused(
        &h,
        &token(
            json!([
                "https://other.example.com",
                "https://my-tenant.us.auth0.com/userinfo"
            ]),
            json!(["authenticated"]),
        ),
        &["audience", "is not accepted by"],
    )
    .await;
    refused(
        &h,
        &token(audience, json!(["editor"])),
        &["token does not allow role \"authenticated\"", roles],
    )
    .await;
    // The issuer's trailing slash is part of it.
    let without_slash = keys.mint(
        KeyKind::Rs256,
        json!({"iss": "https://my-tenant.us.auth0.com", "sub": "auth0|64f1c2", "aud": api}),
    );
    refused(&h, &without_slash, &["is not configured"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_tokens_are_es256_for_the_project() {
    let keys = key_server(&[KeyKind::Es256, KeyKind::Rs256]).await;
    let project = "6fbbf22e-7c3a-4f1c-9d7e-3e9b1c0a2f11";
    let iss = format!("https://api.stack-auth.com/api/v1/projects/{project}");
    let h = Harness::start_with(&provider(
        &iss,
        &keys,
        &format!("audience = [\"{project}\"]\nalgorithms = [\"ES256\"]"),
    ))
    .await;
    let token = |kind: KeyKind, aud: &str| {
        keys.mint(
            kind,
            json!({
                "iss": iss, "sub": "b3f1d2c4-0000-4000-8000-000000000001", "aud": aud,
                "project_id": project, "branch_id": "main", "refresh_token_id": "r1",
                "role": "authenticated", "name": "Alice", "email": "alice@example.com",
                "email_verified": true, "selected_team_id": null, "is_anonymous": false,
            }),
        )
    };
    let client = accepted(&h, &token(KeyKind::Es256, project)).await;
    assert_eq!(
        session_claim(&client, "project_id").await.as_deref(),
        Some(project)
    );

    refused(
        &h,
        &token(KeyKind::Es256, &format!("{project}:anon")),
        &["audience", ":anon"],
    )
    .await;
    refused(
        &h,
        &token(KeyKind::Rs256, project),
        &["RS256", "not accepted by"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stytch_session_jwts_have_an_issuer_that_is_not_a_url() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let project = "project-test-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
    let iss = format!("stytch.com/{project}");
    let h = Harness::start_with(&provider(
        &iss,
        &keys,
        &format!("audience = [\"{project}\"]\nmax_token_age = \"5m\""),
    ))
    .await;
    let token = |aud: &str, iat: u64| {
        keys.mint(
            KeyKind::Rs256,
            json!({
                "iss": iss, "sub": "user-test-16d9ba61-97a1-4ba4-9720-b03761dc50c6",
                "aud": [aud], "iat": iat, "nbf": iat, "exp": unix_now() + 300,
                "https://stytch.com/session": {
                    "id": "session-test-fe6c042b-6286-479f-8a4f-b046a6c46509",
                    "started_at": "2026-01-01T00:00:00Z",
                    "authentication_factors": [{"type": "magic_link", "delivery_method": "email"}],
                },
            }),
        )
    };
    let client = accepted(&h, &token(project, unix_now())).await;
    assert_eq!(
        user_id_of(&client).await.as_deref(),
        Some("user-test-16d9ba61-97a1-4ba4-9720-b03761dc50c6")
    );

    refused(&h, &token("project-test-other", unix_now()), &["audience"]).await;
    refused(
        &h,
        &token(project, unix_now() - 600),
        &["token was issued at", "more than 5m ago"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_ad_v2_access_tokens_are_for_the_apis_client_id() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let client_id = "11111111-2222-3333-4444-555555555555";
    let iss = format!("https://login.microsoftonline.com/{tenant}/v2.0");
    let h = Harness::start_with(&provider(
        &iss,
        &keys,
        &format!("audience = [\"{client_id}\"]\nrequired_claims = [\"oid\", \"tid\"]"),
    ))
    .await;
    let token = |iss: &str, aud: &str| {
        keys.mint(
            KeyKind::Rs256,
            json!({
                "iss": iss, "aud": aud, "ver": "2.0",
                "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
                "oid": "00000000-0000-0000-66f3-3332eca7ea81", "tid": tenant,
                "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "azpacr": "0",
                "scp": "access_as_user", "name": "Abe Lincoln",
                "preferred_username": "abeli@microsoft.com", "uti": "AbCd", "rh": "0.AAAA",
            }),
        )
    };
    let client = accepted(&h, &token(&iss, client_id)).await;
    assert_eq!(
        session_claim(&client, "oid").await.as_deref(),
        Some("00000000-0000-0000-66f3-3332eca7ea81")
    );

    // A token for Microsoft Graph is not for this API.
    refused(
        &h,
        &token(&iss, "00000003-0000-0000-c000-000000000000"),
        &["audience", client_id],
    )
    .await;
    // v1.0 tokens have another issuer.
    refused(
        &h,
        &token(&format!("https://sts.windows.net/{tenant}/"), client_id),
        &["is not configured"],
    )
    .await;
}

/// Serves `document` as JSON at `path` on loopback, counting requests.
async fn serve_json(path: &str, document: Value) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let router = axum::Router::new().route(
        path,
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let document = document.clone();
            async move { axum::Json(document) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_ad_b2c_discovery_is_found_under_the_policy_path() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let tenant = "775527ff-9a37-4307-8b3d-cc311f58d925";
    let client_id = "90c0fe63-bcf2-44d5-8fb7-b8bbc0b29dc6";
    let iss = format!("https://contoso.b2clogin.com/{tenant}/v2.0/");
    let (discovery_url, hits) = serve_json(
        "/contoso.onmicrosoft.com/b2c_1_signupsignin/v2.0/.well-known/openid-configuration",
        json!({
            "issuer": iss,
            "jwks_uri": keys.jwks_url(),
            "authorization_endpoint": "https://contoso.b2clogin.com/contoso.onmicrosoft.com/b2c_1_signupsignin/oauth2/v2.0/authorize",
            "id_token_signing_alg_values_supported": ["RS256"],
        }),
    )
    .await;
    let h = Harness::start_with(&format!(
        "[[provider]]\nissuer = \"{iss}\"\ndiscovery_url = \"{discovery_url}\"\naudience = [\"{client_id}\"]\n"
    ))
    .await;
    let token = |aud: &str| {
        keys.mint(
            KeyKind::Rs256,
            json!({
                "iss": iss, "aud": aud, "ver": "1.0",
                "sub": "0f4e1b7a-5c3d-4b2a-9e8f-7a6b5c4d3e2f",
                "tfp": "B2C_1_signupsignin", "nonce": "defaultNonce",
                "auth_time": unix_now(), "emails": ["alice@example.com"],
            }),
        )
    };
    let client = accepted(&h, &token(client_id)).await;
    assert_eq!(
        session_claim(&client, "tfp").await.as_deref(),
        Some("B2C_1_signupsignin")
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "discovery at the policy path"
    );

    refused(
        &h,
        &token("00000000-0000-0000-0000-000000000000"),
        &["audience", client_id],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_realm_roles_must_hold_the_connecting_role() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let iss = "https://keycloak.example.com/realms/acme";
    let h = Harness::start_with(&provider(
        iss,
        &keys,
        "audience = [\"todo-api\"]\nrole_claim = \"realm_access.roles\"",
    ))
    .await;
    let token = |realm_access: Value| {
        keys.mint(
            KeyKind::Rs256,
            json!({
                "iss": iss, "aud": ["todo-api", "account"], "typ": "Bearer",
                "sub": "f1d2c3b4-a5b6-4c7d-8e9f-001122334455", "azp": "todo-web",
                "session_state": "a1b2", "sid": "a1b2", "scope": "openid email profile",
                "realm_access": realm_access,
                "resource_access": {"account": {"roles": ["manage-account"]}},
                "preferred_username": "alice",
            }),
        )
    };
    let client = accepted(
        &h,
        &token(json!({"roles": ["offline_access", "authenticated", "uma_authorization"]})),
    )
    .await;
    assert_eq!(
        session_claim(&client, "preferred_username")
            .await
            .as_deref(),
        Some("alice")
    );

    refused(
        &h,
        &token(json!({"roles": ["offline_access", "uma_authorization"]})),
        &[
            "token does not allow role \"authenticated\"",
            "realm_access.roles",
        ],
    )
    .await;
    let no_roles = keys.mint(
        KeyKind::Rs256,
        json!({"iss": iss, "aud": "todo-api", "sub": "f1d2c3b4"}),
    );
    refused(
        &h,
        &no_roles,
        &["token does not allow role \"authenticated\"", "absent"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firebase_id_tokens_are_for_the_project_and_fresh() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let project = "my-project";
    let iss = format!("https://securetoken.google.com/{project}");
    let h = Harness::start_with(&provider(
        &iss,
        &keys,
        &format!("audience = [\"{project}\"]\nmax_token_age = \"1h\"\nalgorithms = [\"RS256\"]"),
    ))
    .await;
    let claims = |aud: &str, iat: u64| {
        json!({
            "iss": iss, "aud": aud, "iat": iat, "exp": unix_now() + 3600,
            "auth_time": iat, "sub": "kXq3Z9aTgHfR2bWnYc1LmPo4sUv2", "user_id": "kXq3Z9aTgHfR2bWnYc1LmPo4sUv2",
            "email": "alice@example.com", "email_verified": true,
            "firebase": {"identities": {"email": ["alice@example.com"]}, "sign_in_provider": "password"},
        })
    };
    let client = accepted(&h, &keys.mint(KeyKind::Rs256, claims(project, unix_now()))).await;
    assert_eq!(
        user_id_of(&client).await.as_deref(),
        Some("kXq3Z9aTgHfR2bWnYc1LmPo4sUv2")
    );

    refused(
        &h,
        &keys.mint(KeyKind::Rs256, claims("another-project", unix_now())),
        &["audience"],
    )
    .await;
    refused(
        &h,
        &keys.mint(KeyKind::Rs256, claims(project, unix_now() - 7200)),
        &["token was issued at", "more than 1h ago"],
    )
    .await;
    let mut no_iat = claims(project, 0);
    no_iat.as_object_mut().unwrap().remove("iat");
    refused(
        &h,
        &keys.mint_exact(KeyKind::Rs256, no_iat),
        &["no \"iat\" claim", "max_token_age"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cognito_access_tokens_have_client_id_and_token_use_instead_of_aud() {
    let keys = key_server(&[KeyKind::Rs256]).await;
    let iss = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123";
    let h = Harness::start_with(&provider(iss, &keys, "required_claims = [\"token_use\"]")).await;
    let mut claims = json!({
        "iss": iss, "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "client_id": "1example23456789", "token_use": "access",
        "scope": "aws.cognito.signin.user.admin", "auth_time": unix_now(),
        "jti": "aaaaaaaa-1111", "username": "alice", "cognito:groups": ["admins"],
        "origin_jti": "bbbbbbbb-2222", "event_id": "cccccccc-3333", "version": 2,
    });
    let client = accepted(&h, &keys.mint(KeyKind::Rs256, claims.clone())).await;
    assert_eq!(
        session_claim(&client, "token_use").await.as_deref(),
        Some("access")
    );

    claims.as_object_mut().unwrap().remove("token_use");
    refused(
        &h,
        &keys.mint(KeyKind::Rs256, claims),
        &["no \"token_use\" claim", iss],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_tokens_signed_with_keys_or_the_legacy_secret() {
    let keys = key_server(&[KeyKind::Es256]).await;
    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    // A project with signing keys that still accepts its legacy secret; one
    // on the legacy secret alone; one that never accepted it.
    let migrating = "https://abcdefghijklmnopqrst.supabase.co/auth/v1";
    let legacy = "https://legacylegacylegacyab.supabase.co/auth/v1";
    let keys_only = "https://keysonlykeysonlykeyso.supabase.co/auth/v1";
    let rules = "audience = [\"authenticated\"]\nrole_claim = \"role\"";
    let with_secret = format!("{rules}\nhs256_secret = \"{secret}\"");
    let h = Harness::start_with(&format!(
        "{}[[provider]]\nissuer = \"{legacy}\"\n{with_secret}\n{}",
        provider(migrating, &keys, &with_secret),
        provider(keys_only, &keys, rules),
    ))
    .await;
    let claims = |iss: &str, role: &str| {
        json!({
            "iss": iss, "aud": "authenticated", "role": role,
            "sub": "8ccaa7af-909f-44e7-84cb-67cdccb56be6", "email": "alice@example.com",
            "phone": "", "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {}, "aal": "aal1", "amr": [{"method": "password", "timestamp": 1}],
            "session_id": "3b2a1c0d-0000-4000-8000-000000000000", "is_anonymous": false,
            "iat": unix_now(), "exp": unix_now() + 3600,
        })
    };
    let client = accepted(
        &h,
        &keys.mint(KeyKind::Es256, claims(migrating, "authenticated")),
    )
    .await;
    assert_eq!(
        user_id_of(&client).await.as_deref(),
        Some("8ccaa7af-909f-44e7-84cb-67cdccb56be6")
    );
    accepted(&h, &hs256(secret, &claims(migrating, "authenticated"))).await;
    accepted(&h, &hs256(secret, &claims(legacy, "authenticated"))).await;

    refused(
        &h,
        &keys.mint(KeyKind::Es256, claims(migrating, "service_role")),
        &[
            "token does not allow role \"authenticated\"",
            "service_role",
        ],
    )
    .await;
    refused(
        &h,
        &hs256(
            "not-the-projects-secret-but-just-as-long-as-it",
            &claims(migrating, "authenticated"),
        ),
        &["signature does not verify", migrating],
    )
    .await;
    refused(
        &h,
        &hs256(secret, &claims(keys_only, "authenticated")),
        &["\"HS256\" is not accepted", "hs256_secret", keys_only],
    )
    .await;
    refused(
        &h,
        &keys.mint(KeyKind::Es256, claims(legacy, "authenticated")),
        &["accepts only HS256", legacy],
    )
    .await;
}
