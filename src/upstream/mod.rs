//! The upstream session, step by step: [`login`] connects to Postgres as
//! the role's configured user, with the client's harmless startup
//! parameters ([`options`]), and authenticates; [`inspect`] names the
//! backend (for the claims envelope) and refuses a login role whose
//! settings were changed behind the operator's back; [`claims`] binds the
//! envelope; [`retire`] ends the backend with its session. [`pool`] keeps
//! warm connections, [`tls`] makes them.

pub(crate) mod claims;
pub(crate) mod inspect;
pub(crate) mod login;
pub mod options;
pub(crate) mod pool;
pub(crate) mod prepared;
pub(crate) mod retire;
pub(crate) mod tls;
