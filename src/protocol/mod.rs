//! The Postgres wire format, as far as the proxy speaks it itself.

pub mod refusal;
