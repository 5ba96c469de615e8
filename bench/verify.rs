//! Token verifications per second on one core, through `TokenChecker::check`
//! as a connection calls it: RS256, ES256 and EdDSA with the cache off, and
//! a cache hit. Keys come from a development issuer on loopback and are
//! fetched before timing, so only verification is measured.
//!
//! cargo bench --bench verify

use std::hint::black_box;
use std::time::{Duration, Instant};

use rlsgate::auth::token_check::TokenChecker;
use rlsgate::config::Config;
use rlsgate::dev::issuer::{DevIssuer, KeyKind};
use serde_json::json;

/// How long each case is timed.
const RUN: Duration = Duration::from_secs(3);

/// Checks between looks at the clock.
const BATCH: u32 = 64;

/// The `[[role]]` of the sample configuration that requires a token.
const ROLE: &str = "authenticated";

const SIGNING_KEY: &str = "cmxzZ2F0ZS1iZW5jaC1zaWduaW5nLWtleS0zMi1ieXRlcyE=";

fn main() {
    // One thread runs the issuer and every check: one core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the issuer");
    let uncached = checker(&issuer, 0);
    let cached = checker(&issuer, 10_000);
    let claims = json!({"sub": "bench-user", "aud": "todo-app", "email": "bench@example.com"});

    println!("{:<24} {:>14}", "case", "checks/s");
    for kind in KeyKind::ALL {
        let token = issuer.mint(kind, claims.clone());
        let rate = rate(&uncached, &token).await;
        println!(
            "{:<24} {:>14.0}",
            format!("{} (no cache)", kind.alg_name()),
            rate
        );
    }
    let token = issuer.mint(KeyKind::Rs256, claims);
    let rate = rate(&cached, &token).await;
    println!("{:<24} {:>14.0}", "cache hit (RS256)", rate);
}

fn checker(issuer: &DevIssuer, cache_entries: usize) -> TokenChecker {
    let toml = rlsgate::dev::sample_config(
        "127.0.0.1:0".parse().unwrap(),
        5432,
        &issuer.issuer(),
        SIGNING_KEY,
    )
    .replacen(
        "[listen]\n",
        &format!("[listen]\ntoken_cache_entries = {cache_entries}\n"),
        1,
    );
    let config = Config::parse(&toml).expect("bench configuration parses");
    TokenChecker::new(&config, rlsgate::auth::jwks::http_client())
}

/// Checks of `token` per second; the first check (which fetches the keys
/// or fills the cache) is not timed.
async fn rate(checker: &TokenChecker, token: &str) -> f64 {
    checker
        .check(token, ROLE)
        .await
        .expect("the token verifies");
    let start = Instant::now();
    let mut checks = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..BATCH {
            black_box(
                checker
                    .check(black_box(token), ROLE)
                    .await
                    .expect("verifies"),
            );
        }
        checks += u64::from(BATCH);
    }
    checks as f64 / start.elapsed().as_secs_f64()
}
