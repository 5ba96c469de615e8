//! `rlsgate demo`: the whole path on one machine, with nothing to configure.
//!
//! A throwaway PostgreSQL with the sample todo application, a token issuer
//! on loopback, and the proxy in front; everything is removed on exit,
//! including when startup fails halfway (each part cleans up on drop).

use std::net::SocketAddr;

use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};

use crate::auth::claims::SigningKey;
use crate::commands::init_db;
use crate::config::Config;
use crate::dev::issuer::{DevIssuer, KeyKind};
use crate::dev::postgres::TempPostgres;
use crate::dev::{SAMPLE_SCHEMA, sample_config};
use crate::session::listener::RunningProxy;

pub(crate) struct Options {
    /// The proxy's port on 127.0.0.1; 0 picks a free one.
    pub(crate) port: u16,
    /// The HTTP front door's port on 127.0.0.1; 0 picks a free one.
    pub(crate) http_port: u16,
    /// Print the connection details as JSON instead of prose.
    pub(crate) json: bool,
    /// Leave the database directory behind on exit.
    pub(crate) keep: bool,
}

const USERS: [&str; 2] = ["alice", "bob"];

pub(crate) async fn run(
    options: Options,
    shutdown: impl std::future::Future,
) -> anyhow::Result<()> {
    eprintln!("starting a throwaway PostgreSQL…");
    let pg = TempPostgres::start().await?;
    let key_base64 = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    install_sample(&pg, &key_base64).await?;

    let issuer = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let listen = SocketAddr::from(([127, 0, 0, 1], options.port));
    let mut config = sample_config(listen, pg.port(), &issuer.issuer(), &key_base64);
    config.push_str(&format!(
        "\n[http]\naddress = \"127.0.0.1:{}\"\n",
        options.http_port
    ));
    let config = Config::parse(&config)?;
    let proxy = RunningProxy::start(config).await?;

    let details = connection_details(&proxy, &issuer, &pg);
    if options.json {
        println!("{details}");
    } else {
        print_instructions(&details);
    }

    shutdown.await;
    eprintln!("stopping…");
    proxy.shutdown().await;
    issuer.shutdown().await;
    if options.keep {
        let dir = pg.stop_and_keep();
        eprintln!("kept the database directory {}", dir.display());
    }
    Ok(())
}

async fn install_sample(pg: &TempPostgres, key_base64: &str) -> anyhow::Result<()> {
    pg.connect("postgres")
        .await?
        .batch_execute("create database app")
        .await?;
    let app = pg.connect("app").await?;
    let key = SigningKey::from_base64(key_base64)?;
    init_db::install(&app, &[key.bytes().to_vec()]).await?;
    app.batch_execute(SAMPLE_SCHEMA)
        .await
        .context("create the sample schema")?;
    app.batch_execute(
        "insert into todos (user_id, title) values
           ('alice', 'water the plants'), ('alice', 'call mum'), ('bob', 'fix the bike')",
    )
    .await?;
    Ok(())
}

/// What a person or a script needs to connect: per user, a fresh token and
/// the ways to use it.
fn connection_details(proxy: &RunningProxy, issuer: &DevIssuer, pg: &TempPostgres) -> Value {
    let port = proxy.address.port();
    let http = proxy.http_address.map(|a| a.port()).unwrap_or_default();
    let sql_url = format!("http://127.0.0.1:{http}/sql");
    let users: serde_json::Map<String, Value> = USERS
        .iter()
        .map(|user| {
            let token = issuer.mint(KeyKind::Rs256, json!({"sub": user, "aud": "todo-app"}));
            let url =
                format!("postgresql://authenticated:{token}@127.0.0.1:{port}/app?sslmode=disable");
            let psql = format!("psql \"{url}\" -c 'select * from todos'");
            let curl = format!(
                "curl -s {sql_url} -H 'Neon-Connection-String: postgresql://authenticated@127.0.0.1/app' \
                 -H 'Authorization: Bearer {token}' -d '{{\"query\": \"select title from todos\"}}'"
            );
            (
                user.to_string(),
                json!({"token": token, "url": url, "psql": psql, "curl": curl}),
            )
        })
        .collect();
    json!({
        "host": "127.0.0.1",
        "port": port,
        "database": "app",
        "user": "authenticated",
        "http": {
            "sql": sql_url,
            "websocket": format!("ws://127.0.0.1:{http}/v2"),
        },
        "issuer": issuer.issuer(),
        "data_dir": pg.data_dir(),
        "users": users,
    })
}

fn print_instructions(details: &Value) {
    let port = &details["port"];
    println!("rlsgate is listening on 127.0.0.1:{port}, in front of a throwaway PostgreSQL.");
    println!(
        "Tokens come from a local issuer at {}; they are valid for one hour.",
        details["issuer"].as_str().unwrap_or_default()
    );
    println!();
    for user in USERS {
        println!("# {user} sees only {user}'s todos:");
        println!(
            "{}",
            details["users"][user]["psql"].as_str().unwrap_or_default()
        );
        println!();
    }
    println!("# An application connects the same way, with the user's JWT as the password:");
    println!("#   postgresql://authenticated:<JWT>@127.0.0.1:{port}/app");
    println!();
    println!("# Or over HTTP, as @neondatabase/serverless does, one token per request:");
    println!(
        "{}",
        details["users"]["alice"]["curl"]
            .as_str()
            .unwrap_or_default()
    );
    println!(
        "# (the driver: neonConfig.fetchEndpoint = '{}', WebSocket {})",
        details["http"]["sql"].as_str().unwrap_or_default(),
        details["http"]["websocket"].as_str().unwrap_or_default()
    );
    println!();
    println!("Press Ctrl-C to stop; everything the demo created is then removed.");
}
