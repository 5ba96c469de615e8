//! `rlsgate demo`: the whole path on one machine, with nothing to configure.
//!
//! A throwaway PostgreSQL with the sample todo application, a token issuer
//! on loopback, and the proxy in front; everything is removed on exit,
//! including when startup fails halfway (each part cleans up on drop).

use std::net::SocketAddr;

use anyhow::Context;
use base64::Engine;
use serde_json::json;

use crate::claims::SigningKey;
use crate::config::Config;
use crate::dev::issuer::{DevIssuer, KeyKind};
use crate::dev::postgres::TempPostgres;
use crate::dev::{SAMPLE_SCHEMA, sample_config};
use crate::init_db;
use crate::listener::RunningProxy;

pub async fn run(port: u16, shutdown: impl std::future::Future) -> anyhow::Result<()> {
    eprintln!("starting a throwaway PostgreSQL…");
    let pg = TempPostgres::start().await?;
    let admin = pg.connect("postgres").await?;
    admin.batch_execute("create database app").await?;
    let app = pg.connect("app").await?;
    let key_bytes: [u8; 32] = rand::random();
    let key_base64 = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let key = SigningKey::from_base64(&key_base64).map_err(anyhow::Error::msg)?;
    init_db::install(&app, &[key.bytes().to_vec()]).await?;
    app.batch_execute(SAMPLE_SCHEMA)
        .await
        .context("create the sample schema")?;
    app.batch_execute(
        "insert into todos (user_id, title) values
           ('alice', 'water the plants'), ('alice', 'call mum'), ('bob', 'fix the bike')",
    )
    .await?;
    drop((admin, app));

    let issuer = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let config = Config::parse(&sample_config(
        listen,
        pg.port(),
        &issuer.issuer(),
        &key_base64,
    ))?;
    let proxy = RunningProxy::start(config).await?;

    let token = |sub: &str| issuer.mint(KeyKind::Rs256, json!({"sub": sub, "aud": "todo-app"}));
    let port = proxy.address.port();
    println!("rlsgate is listening on 127.0.0.1:{port}, in front of a throwaway PostgreSQL.");
    println!(
        "Tokens come from a local issuer at {}; they are valid for one hour.",
        issuer.issuer()
    );
    println!();
    for user in ["alice", "bob"] {
        println!("# {user} sees only {user}'s todos:");
        println!(
            "psql \"postgresql://authenticated:{}@127.0.0.1:{port}/app?sslmode=disable\" -c 'select * from todos'",
            token(user)
        );
        println!();
    }
    println!("# An application connects the same way, with the user's JWT as the password:");
    println!("#   postgresql://authenticated:<JWT>@127.0.0.1:{port}/app");
    println!();
    println!("Press Ctrl-C to stop; everything the demo created is then removed.");

    shutdown.await;
    eprintln!("stopping…");
    proxy.shutdown().await;
    issuer.shutdown().await;
    drop(pg);
    Ok(())
}
