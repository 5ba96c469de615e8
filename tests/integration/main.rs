//! The integration tests, one module per concern, in one binary: the crate
//! is linked once instead of once per file.

mod support;

mod algorithms;
mod attacks;
mod bench_script;
mod cancel;
mod check;
mod clients;
mod containers;
mod demo;
mod dev_tools;
mod docs;
mod forgery;
mod front_door;
mod hostile;
mod http;
mod jwks;
mod keys;
mod kubernetes;
mod observability;
mod ops_kit;
mod pooling;
mod protocol;
mod providers;
mod refusals;
mod relay_paths;
mod reload;
mod replicas;
mod serverless;
mod session_end;
mod startup_limits;
mod startup_options;
mod tls;
mod todos;
mod token_cache;
mod transaction_pooling;
mod upstream_auth;
mod upstream_tls;
