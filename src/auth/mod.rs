//! Whether a password is a token the proxy trusts, and the signed envelope
//! that carries its claims to Postgres.

pub mod claims;
pub mod jwks;
pub(crate) mod token_cache;
pub mod token_check;
