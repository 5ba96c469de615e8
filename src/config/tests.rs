//! Configuration files as users write them: what parses, what is refused and
//! with which words.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::providers::check_fetch_url;
use super::*;

#[test]
fn env_expansion_names_the_missing_variable_and_line() {
    let err = expand_env("a = 1\nb = \"${NOPE}\"\n", |_| None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 2: environment variable NOPE is not set"
    );
}

#[test]
fn env_expansion_skips_comment_lines() {
    let out = expand_env("# x = \"${NOPE}\"\ny = \"${A}\"\n", |n| {
        (n == "A").then(|| "v".to_owned())
    })
    .unwrap();
    assert_eq!(out, "# x = \"${NOPE}\"\ny = \"v\"\n");
}

#[test]
fn a_short_signing_key_is_refused_with_its_line() {
    let text = r#"
[listen]
address = "127.0.0.1:6432"
[upstream]
host = "127.0.0.1"
[[role]]
name = "anonymous"
token = "none"
[claims]
signing_key = "c2hvcnQ="
"#;
    let err = format!("{:#}", Config::parse(text).unwrap_err());
    assert!(err.contains("line 10"), "{err}");
    assert!(err.contains("at least 32 bytes"), "{err}");
}

#[test]
fn the_example_configuration_is_valid() {
    let text = include_str!("../../config/rlsgate.example.toml");
    let config = Config::parse_with_env(text, |name| match name {
        "RLSGATE_CLAIMS_KEY" => Some("cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=".into()),
        _ => Some(format!("value-of-{name}")),
    })
    .unwrap();
    assert_eq!(
        config.role("authenticated").unwrap().token,
        TokenPolicy::Required
    );
    assert!(!config.providers.is_empty());
    // Debug output (as in a log line) carries neither secrets nor keys.
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("value-of-AUTHENTICATED_PASSWORD"),
        "{shown}"
    );
    assert!(!shown.contains("cmxzZ2F0ZS1leGFtcGxl"), "{shown}");
}

#[test]
fn role_settings_default_to_none_and_must_be_name_value() {
    let text = |settings: &str| {
        format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"127.0.0.1\"\n\
             [[role]]\nname = \"anonymous\"\ntoken = \"none\"\n{settings}\n\
             [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
        )
    };
    let config = Config::parse(&text("")).unwrap();
    assert!(config.roles[0].upstream_settings.is_empty());
    let declared = r#"upstream_settings = ["statement_timeout=5s", "search_path=app, public"]"#;
    let config = Config::parse(&text(declared)).unwrap();
    assert_eq!(
        config.roles[0].upstream_settings,
        ["statement_timeout=5s", "search_path=app, public"]
    );
    for wrong in ["statement_timeout", "=5s", " statement_timeout=5s"] {
        let line = format!("upstream_settings = [{wrong:?}]");
        let err = format!("{:#}", Config::parse(&text(&line)).unwrap_err());
        assert!(err.contains("upstream_settings"), "{err}");
        assert!(err.contains(wrong), "{err}");
    }
}

#[test]
fn plain_http_keys_are_refused_off_loopback() {
    assert!(check_fetch_url("issuer", "http://127.0.0.1:8080", false).is_ok());
    assert!(check_fetch_url("issuer", "http://localhost:8080", false).is_ok());
    assert!(check_fetch_url("issuer", "https://example.com", false).is_ok());
    let err = check_fetch_url("issuer", "http://example.com", false).unwrap_err();
    assert!(err.to_string().contains("https"), "{err}");
    assert!(check_fetch_url("issuer", "http://issuer:8080", true).is_ok());
}

fn with_provider(lines: &str) -> anyhow::Result<Config> {
    Config::parse(&format!(
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
issuer = "https://id.example"
{lines}
"#
    ))
}

#[test]
fn provider_key_cache_defaults() {
    let config = with_provider("").unwrap();
    let p = &config.providers[0];
    assert_eq!(p.jwks_min_age(), Duration::from_secs(300));
    assert_eq!(p.jwks_max_age, Duration::from_secs(86400));
    assert_eq!(p.jwks_max_stale, Duration::from_secs(86400));
    assert_eq!(p.fetch_timeout, Duration::from_secs(10));
    assert_eq!(p.refetch_cooldown, Duration::from_secs(30));
    // An unset lower bound follows a short upper bound down.
    let config = with_provider("jwks_max_age = \"1s\"").unwrap();
    assert_eq!(config.providers[0].jwks_min_age(), Duration::from_secs(1));
    let config = with_provider("jwks_min_age = \"1m\"\nfetch_timeout = \"2s\"").unwrap();
    assert_eq!(config.providers[0].jwks_min_age(), Duration::from_secs(60));
    assert_eq!(config.providers[0].fetch_timeout, Duration::from_secs(2));
}

#[test]
fn provider_key_cache_bounds_are_checked() {
    let err = |lines: &str| format!("{:#}", with_provider(lines).unwrap_err());
    let message = err("jwks_min_age = \"10m\"\njwks_max_age = \"5m\"");
    assert!(message.contains("jwks_min_age (10m)"), "{message}");
    assert!(message.contains("jwks_max_age (5m)"), "{message}");
    assert!(message.contains("https://id.example"), "{message}");
    let message = err("jwks_min_age = \"2days\"");
    assert!(message.contains("jwks_min_age"), "{message}");
    let message = err("fetch_timeout = \"0s\"");
    assert!(message.contains("fetch_timeout"), "{message}");
    let message = err("jwks_max_age = \"0s\"");
    assert!(message.contains("jwks_max_age"), "{message}");
    let message = err("jwks_max_stale = \"soon\"");
    assert!(message.contains("jwks_max_stale"), "{message}");
}

#[test]
fn provider_claim_rules_are_checked_by_name() {
    let err = |lines: &str| format!("{:#}", with_provider(lines).unwrap_err());
    let message = err("algorithms = [\"RS256\", \"HS256\"]");
    assert!(message.contains("https://id.example"), "{message}");
    assert!(message.contains("algorithms"), "{message}");
    assert!(message.contains("hs256_secret"), "{message}");
    let message = err("algorithms = [\"RS1\"]");
    assert!(message.contains("unknown algorithm \"RS1\""), "{message}");
    assert!(err("algorithms = []").contains("algorithms is empty"));
    assert!(err("max_token_age = \"0s\"").contains("max_token_age"));
    assert!(err("required_claims = [\"a..b\"]").contains("required_claims"));
    assert!(err("role_claim = \"\"").contains("role_claim"));
    let message = err("hs256_secret = \"short\"");
    assert!(message.contains("hs256_secret is 5 bytes"), "{message}");
    assert!(
        !format!(
            "{:?}",
            with_provider("hs256_secret = \"a-secret-of-at-least-thirty-two-bytes\"")
                .unwrap()
                .providers[0]
        )
        .contains("thirty-two")
    );
    let message =
        err("jwks_url = \"https://id.example/k\"\ndiscovery_url = \"https://id.example/d\"");
    assert!(message.contains("not both"), "{message}");
    assert!(err("discovery_url = \"http://id.example/d\"").contains("discovery_url"));

    let config =
        with_provider("algorithms = [\"ES256\", \"EdDSA\"]\nmax_token_age = \"1h\"").unwrap();
    let p = &config.providers[0];
    assert_eq!(p.algorithms(), [Algorithm::ES256, Algorithm::EdDSA]);
    assert_eq!(p.max_token_age, Some(Duration::from_secs(3600)));
    assert!(p.has_jwks());
    let config = with_provider("").unwrap();
    assert_eq!(config.providers[0].algorithms(), ASYMMETRIC_ALGORITHMS);
    let config = with_provider("hs256_secret = \"a-secret-of-at-least-thirty-two-bytes\"").unwrap();
    assert!(!config.providers[0].has_jwks());
}

#[test]
fn pooling_is_off_unless_configured_and_its_bounds_are_checked() {
    let config = with_provider("").unwrap();
    assert_eq!(config.pool.mode, PoolMode::None);
    let config = with_provider(
        "[pool]\nmode = \"session\"\nsize = 5\nidle_timeout = \"30s\"\nmax_lifetime = \"2h\"",
    )
    .unwrap();
    assert_eq!(config.pool.mode, PoolMode::Session);
    assert_eq!(config.pool.size, 5);
    assert_eq!(config.pool.idle_timeout, Duration::from_secs(30));
    assert_eq!(config.pool.max_lifetime, Duration::from_secs(7200));
    let err = with_provider("[pool]\nmode = \"session\"\nsize = 0").unwrap_err();
    assert!(err.to_string().contains("[pool] size"), "{err:#}");
    let config = with_provider("[pool]\nmode = \"transaction\"").unwrap();
    assert_eq!(config.pool.mode, PoolMode::Transaction);
    assert_eq!(config.pool.max_prepared_statements, 500);
    let err = with_provider("[pool]\nmode = \"transaction\"\nsize = 0").unwrap_err();
    assert!(err.to_string().contains("[pool] size"), "{err:#}");
    let err = with_provider("[pool]\nmax_prepared_statements = 0").unwrap_err();
    assert!(
        err.to_string().contains("[pool] max_prepared_statements"),
        "{err:#}"
    );
}

#[test]
fn http_is_off_unless_an_address_is_set_and_its_limits_are_checked_by_name() {
    let config = with_provider("").unwrap();
    assert_eq!(config.http.address, None);
    assert_eq!(config.http.max_request_bytes, 10 << 20);
    assert_eq!(config.http.max_response_bytes, 10 << 20);
    assert_eq!(config.http.cors_origins, ["*"]);
    assert_eq!(config.pool.wait_timeout, Duration::from_secs(30));
    let config = with_provider(
        "[http]\naddress = \"127.0.0.1:4444\"\nmax_response_bytes = 1000\n\
         cors_origins = [\"https://app.example\", \"http://localhost:3000\"]\n\
         [pool]\nwait_timeout = \"2s\"",
    )
    .unwrap();
    assert_eq!(config.http.address, Some("127.0.0.1:4444".parse().unwrap()));
    assert_eq!(config.http.max_response_bytes, 1000);
    assert!(config.http.allows_origin("http://localhost:3000"));
    assert!(!config.http.allows_origin("https://evil.example"));
    assert_eq!(config.pool.wait_timeout, Duration::from_secs(2));
    for (lines, key) in [
        ("[http]\nmax_request_bytes = 0", "[http] max_request_bytes"),
        (
            "[http]\ncors_origins = [\"https://app.example/\"]",
            "[http] cors_origins",
        ),
        (
            "[http]\ncors_origins = [\"app.example\"]",
            "[http] cors_origins",
        ),
        (
            "[http]\naddress = \"127.0.0.1:0\"\n[pool]\nsize = 0",
            "[pool] size",
        ),
        (
            "[http]\naddress = \"127.0.0.1:0\"\n[pool]\nwait_timeout = \"0s\"",
            "[pool] wait_timeout",
        ),
        ("[http]\nport = 1", "port"),
    ] {
        let err = with_provider(lines).unwrap_err();
        assert!(format!("{err:#}").contains(key), "{lines}: {err:#}");
    }
}

#[test]
fn a_cluster_needs_a_peer_id_and_its_peers_are_checked_by_name() {
    let config = with_provider("").unwrap();
    assert_eq!(config.cluster.peer_id, None);
    assert_eq!(config.listen.shutdown_delay, Duration::ZERO);
    let config = with_provider(
        "[cluster]\npeer_id = 1\n\
         [[cluster.peer]]\nid = 0\naddress = \"rlsgate-0.peers:6432\"\n\
         [[cluster.peer]]\nid = 1\naddress = \"rlsgate-1.peers:6432\"",
    )
    .unwrap();
    assert_eq!(config.cluster.peer_id, Some(1));
    let others: Vec<u8> = config.cluster.others().map(|p| p.id).collect();
    assert_eq!(others, [0], "its own entry is skipped");
    for (lines, key) in [
        ("[cluster]\npeer_id = 128", "peer_id must be 0–127"),
        ("[cluster]\npeer_id = -1", "peer_id"),
        (
            "[[cluster.peer]]\nid = 0\naddress = \"a:1\"",
            "peer_id is not set",
        ),
        (
            "[cluster]\npeer_id = 0\n[[cluster.peer]]\nid = 1\naddress = \"a:1\"\n\
             [[cluster.peer]]\nid = 1\naddress = \"b:1\"",
            "id = 1 appears twice",
        ),
        (
            "[cluster]\npeer_id = 0\n[[cluster.peer]]\nid = 1\naddress = \"nohost\"",
            "host:port",
        ),
    ] {
        let err = with_provider(lines).unwrap_err();
        assert!(format!("{err:#}").contains(key), "{lines}: {err:#}");
    }
}

#[test]
fn an_issuer_need_not_be_a_url_when_keys_come_from_elsewhere() {
    let parse = |provider: &str| {
        Config::parse(&format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"h\"\n[[role]]\nname = \"a\"\ntoken = \"required\"\n[claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n[[provider]]\n{provider}\n"
        ))
    };
    assert!(parse("issuer = \"stytch.com/project-test-1\"\njwks_url = \"https://test.stytch.com/v1/sessions/jwks/project-test-1\"").is_ok());
    let err = format!(
        "{:#}",
        parse("issuer = \"stytch.com/project-test-1\"").unwrap_err()
    );
    assert!(
        err.contains("issuer = \"stytch.com/project-test-1\" is not a URL"),
        "{err}"
    );
    assert!(parse("issuer = \"\"\njwks_url = \"https://id.example/k\"").is_err());
}

fn with_listen(lines: &str) -> anyhow::Result<Config> {
    Config::parse(&format!(
        "[listen]\naddress = \"127.0.0.1:6432\"\n{lines}\n[upstream]\nhost = \"db.internal\"\n\
         [[role]]\nname = \"a\"\ntoken = \"none\"\n\
         [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
    ))
}

#[test]
fn startup_limits_have_defaults_and_are_checked_by_name() {
    let listen = with_listen("").unwrap().listen;
    assert_eq!(listen.max_startups, 256);
    assert_eq!(listen.max_startups_per_address, 64);
    assert_eq!(listen.auth_timeout, Duration::from_secs(10));
    let listen =
        with_listen("max_startups = 10\nmax_startups_per_address = 2\nauth_timeout = \"3s\"")
            .unwrap()
            .listen;
    assert_eq!(listen.max_startups, 10);
    assert_eq!(listen.max_startups_per_address, 2);
    assert_eq!(listen.auth_timeout, Duration::from_secs(3));
    let err = |lines: &str| format!("{:#}", with_listen(lines).unwrap_err());
    for key in [
        "max_startups",
        "max_startups_per_address",
        "max_connections",
    ] {
        let message = err(&format!("{key} = 0"));
        assert!(message.contains(&format!("[listen] {key}")), "{message}");
    }
    let message = err("auth_timeout = \"0s\"");
    assert!(message.contains("[listen] auth_timeout"), "{message}");
    let message = err("auth_timeout = \"soon\"");
    assert!(message.contains("auth_timeout"), "{message}");
    let message = err("max_startups = -1");
    assert!(message.contains("max_startups"), "{message}");
}

fn with_upstream(lines: &str) -> anyhow::Result<Config> {
    Config::parse(&format!(
        "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"db.internal\"\n{lines}\n\
         [[role]]\nname = \"a\"\ntoken = \"none\"\n\
         [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
    ))
}

#[test]
fn upstream_tls_defaults_to_prefer_like_libpq() {
    let config = with_upstream("").unwrap();
    assert_eq!(config.upstream.tls, UpstreamTlsMode::Prefer);
    assert_eq!(config.upstream.tls_ca_file, None);
    assert_eq!(config.upstream.tls_server_name, None);
    for (text, mode) in [
        ("disable", UpstreamTlsMode::Disable),
        ("require", UpstreamTlsMode::Require),
        ("verify-ca", UpstreamTlsMode::VerifyCa),
        ("verify-full", UpstreamTlsMode::VerifyFull),
    ] {
        let config = with_upstream(&format!("tls = \"{text}\"")).unwrap();
        assert_eq!(config.upstream.tls, mode);
        assert_eq!(mode.as_str(), text);
    }
    let config = with_upstream(
        "tls = \"verify-full\"\ntls_ca_file = \"/ca.pem\"\ntls_server_name = \"db.example.com\"",
    )
    .unwrap();
    assert_eq!(config.upstream.tls_ca_file, Some(PathBuf::from("/ca.pem")));
}

#[test]
fn upstream_tls_settings_are_checked_by_name() {
    let err = |lines: &str| format!("{:#}", with_upstream(lines).unwrap_err());
    let message = err("tls = \"verify\"");
    assert!(message.contains("tls"), "{message}");
    assert!(message.contains("verify-full"), "{message}");
    assert!(message.contains("line 5"), "{message}");
    let message = err("tls = \"require\"\ntls_ca_file = \"/ca.pem\"");
    assert!(message.contains("[upstream] tls_ca_file"), "{message}");
    assert!(message.contains("verify-ca"), "{message}");
    let message = err("tls_server_name = \"not a name\"");
    assert!(message.contains("[upstream] tls_server_name"), "{message}");
    let message = err("tls = \"disable\"\ntls_server_name = \"db.example.com\"");
    assert!(message.contains("tls_server_name"), "{message}");
    assert!(err("tls_sni = \"x\"").contains("tls_sni"));
}

#[test]
fn upstream_client_certificates_come_in_pairs_and_need_tls_that_is_never_skipped() {
    let config = with_upstream("").unwrap();
    assert_eq!(config.upstream.tls_client_cert, None);
    assert_eq!(config.upstream.tls_client_key, None);
    let config = with_upstream(
        "tls = \"verify-full\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"",
    )
    .unwrap();
    assert_eq!(
        config.upstream.tls_client_cert,
        Some(PathBuf::from("/c.pem"))
    );
    assert_eq!(
        config.upstream.tls_client_key,
        Some(PathBuf::from("/k.pem"))
    );
    for mode in ["require", "verify-ca"] {
        with_upstream(&format!(
            "tls = \"{mode}\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\""
        ))
        .unwrap();
    }

    let err = |lines: &str| format!("{:#}", with_upstream(lines).unwrap_err());
    let message = err("tls = \"require\"\ntls_client_cert = \"/c.pem\"");
    assert!(
        message.contains("[upstream] tls_client_cert and tls_client_key"),
        "{message}"
    );
    let message = err("tls = \"require\"\ntls_client_key = \"/k.pem\"");
    assert!(message.contains("together"), "{message}");
    for mode in ["prefer", "disable"] {
        let message = err(&format!(
            "tls = \"{mode}\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\""
        ));
        assert!(message.contains("[upstream] tls_client_cert"), "{message}");
        assert!(message.contains(&format!("tls = \"{mode}\"")), "{message}");
        assert!(message.contains("verify-full"), "{message}");
    }
    // The default mode is prefer, which may skip TLS.
    let message = err("tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"");
    assert!(message.contains("tls = \"prefer\""), "{message}");
}

fn with_socket(lines: &str) -> anyhow::Result<Config> {
    Config::parse(&format!(
        "[listen]\naddress = \"127.0.0.1:6432\"\n\
         [upstream]\nhost = \"/var/run/postgresql\"\nport = 5433\n{lines}\n\
         [[role]]\nname = \"a\"\ntoken = \"none\"\n\
         [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
    ))
}

#[test]
fn a_socket_directory_host_has_no_tls_and_errors_name_both_keys() {
    let config = with_socket("").unwrap();
    assert!(config.upstream.is_socket());
    assert_eq!(config.upstream.tls, UpstreamTlsMode::Prefer);
    assert_eq!(
        config.upstream.address(),
        "/var/run/postgresql/.s.PGSQL.5433"
    );
    with_socket("tls = \"disable\"").unwrap();
    assert!(!with_upstream("").unwrap().upstream.is_socket());

    let err = |lines: &str| format!("{:#}", with_socket(lines).unwrap_err());
    for mode in ["require", "verify-ca", "verify-full"] {
        let message = err(&format!("tls = \"{mode}\""));
        assert!(
            message.contains("[upstream] host = \"/var/run/postgresql\""),
            "{message}"
        );
        assert!(
            message.contains(&format!("[upstream] tls = \"{mode}\"")),
            "{message}"
        );
    }
    let message = err("tls_server_name = \"db.example.com\"");
    assert!(message.contains("tls_server_name"), "{message}");
    assert!(message.contains("Unix socket"), "{message}");
    let message = err("tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"");
    assert!(message.contains("[upstream] tls_client_cert"), "{message}");
    assert!(message.contains("peer"), "{message}");
}

/// A small configuration with `lines` added to its `[listen]`.
fn with_listen_lines(lines: &str) -> anyhow::Result<Config> {
    Config::parse(&format!(
        "[listen]\naddress = \"127.0.0.1:6432\"\n{lines}\n[upstream]\nhost = \"h\"\n\
         [[role]]\nname = \"a\"\ntoken = \"none\"\n\
         [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
    ))
}

#[test]
fn workers_default_to_one_per_cpu_and_zero_means_the_shared_runtime() {
    let with_workers = with_listen_lines;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(with_workers("").unwrap().listen.worker_threads(), cpus);
    assert_eq!(
        with_workers("workers = 0").unwrap().listen.worker_threads(),
        0
    );
    assert_eq!(
        with_workers("workers = 3").unwrap().listen.worker_threads(),
        3
    );
    let err = with_workers("workers = 100000").unwrap_err();
    assert!(format!("{err:#}").contains("[listen] workers"), "{err:#}");
}

#[test]
fn io_uring_is_auto_unless_told_and_on_needs_worker_threads() {
    let with_listen = with_listen_lines;
    assert_eq!(with_listen("").unwrap().listen.io_uring, IoUring::Auto);
    assert_eq!(
        with_listen("io_uring = \"off\"").unwrap().listen.io_uring,
        IoUring::Off
    );
    assert_eq!(
        with_listen("io_uring = \"on\"\nworkers = 2")
            .unwrap()
            .listen
            .io_uring,
        IoUring::On
    );
    let err = with_listen("io_uring = \"on\"\nworkers = 0").unwrap_err();
    assert!(
        format!("{err:#}").contains("[listen] io_uring = \"on\" needs worker threads"),
        "{err:#}"
    );
    let err = with_listen("io_uring = \"yes\"").unwrap_err();
    assert!(format!("{err:#}").contains("io_uring"), "{err:#}");
}

#[test]
fn sessions_move_onto_io_uring_after_sixteen_answered_requests_unless_told() {
    let after = |lines| with_listen_lines(lines).map(|c| c.listen.io_uring_after);
    assert_eq!(after("").unwrap(), 16);
    assert_eq!(after("io_uring_after = 0").unwrap(), 0);
    let err = after("io_uring_after = -1").unwrap_err();
    assert!(format!("{err:#}").contains("io_uring_after"), "{err:#}");
}
