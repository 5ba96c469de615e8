//! The Postgres wire format, as far as the proxy speaks it itself: every
//! message it writes ([`messages`]), how it reads one ([`frame`]), the
//! packets a client sends before authentication ([`startup`]), what an
//! ErrorResponse from Postgres says ([`server_error`]), and how a refusal
//! reaches the client ([`refusal`]).

pub(crate) mod frame;
pub(crate) mod messages;
pub mod refusal;
pub(crate) mod server_error;
pub mod startup;
