//! rlsgate: a Postgres wire-protocol proxy that takes a JWT as the password and
//! binds its verified claims to the upstream session for Row-Level Security.
//!
//! The folders follow one connection through the proxy:
//!
//! - [`session`]: the listener accepts it; the connection walks it through
//!   the front door (startup and password), the token check, the upstream
//!   session and the relay; cancel requests, limits and shutdown live here.
//! - [`protocol`]: the wire format — what the proxy writes itself and how a
//!   refusal reaches the client.
//! - [`auth`]: is the password a JWT a configured provider signed (its JWKS,
//!   a cache of verified tokens), and the signed envelope of its claims.
//! - [`http`]: the serverless driver's front door — `POST /sql` with a
//!   token per request over shared upstream connections, and the WebSocket
//!   tunnel into the same path as a TCP client.
//! - [`upstream`]: the Postgres side — log in, bind the claims, TLS, the pool.
//! - [`ops`]: for operators — admin endpoints, metrics, tampering alarms,
//!   configuration reload, `rlsgate check`.
//! - [`commands`]: the command line — `cli` parses and dispatches; `serve`,
//!   `init-db`, `demo` and the development tools (`keygen`, `token`,
//!   `issuer`) each have a file.
//! - [`dev`]: a throwaway PostgreSQL, signing keys and a token issuer, for
//!   `demo` and the tests.
//!
//! [`config`] is the TOML file, one file per section; [`clock`] is the one
//! place that reads the current Unix time.
//!
//! Items are `pub(crate)` unless the integration tests, the benchmark or the
//! fuzz targets use them; [`config`] and [`dev`] are public whole.

pub mod auth;
pub(crate) mod clock;
pub mod commands;
pub mod config;
pub mod dev;
pub(crate) mod http;
pub(crate) mod ops;
pub mod protocol;
pub mod session;
pub mod upstream;
