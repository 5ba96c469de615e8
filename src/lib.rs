//! rlsgate: a Postgres wire-protocol proxy that takes a JWT as the password and
//! binds its verified claims to the upstream session for Row-Level Security.
//!
//! One connection walks these modules in order: [`listener`] accepts it,
//! [`connection`] drives it through [`front_door`] (startup and password),
//! [`token_check`] (JWT against the provider's [`jwks`]), [`upstream`] (the
//! Postgres session over [`upstream_tls`], with the signed [`claims`] bound
//! to it, or a warm one from the [`pool`]) and [`relay`].
//!
//! Around that path: [`cancel`] requests, [`limit`]s on sessions and on
//! connections still starting up, the [`admin`] endpoints with their
//! [`metrics`] and [`tamper`] alarms, configuration [`reload`] on SIGHUP,
//! and the commands `init-db` ([`init_db`]) and `check` ([`check`]).

pub mod admin;
pub mod cancel;
pub mod check;
pub mod claims;
pub mod cli;
pub mod config;
pub mod connection;
pub mod demo;
pub mod dev;
pub mod error;
pub mod front_door;
pub mod init_db;
pub mod jwks;
pub mod limit;
pub mod listener;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod relay;
pub mod reload;
pub mod shutdown;
pub mod stream;
pub mod tamper;
pub mod tls;
pub mod token_cache;
pub mod token_check;
pub mod upstream;
pub mod upstream_tls;
