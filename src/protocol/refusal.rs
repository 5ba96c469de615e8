//! Refusals: what a client is told, kept apart from what the log records.

use std::borrow::Cow;
use std::fmt;

use bytes::BytesMut;

use crate::protocol::messages;

/// SQLSTATE codes the proxy itself sends.
pub(crate) mod sqlstate {
    pub(crate) const INVALID_AUTHORIZATION: &str = "28000";
    pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
    pub(crate) const CONNECTION_FAILURE: &str = "08006";
    pub(crate) const PROTOCOL_VIOLATION: &str = "08P01";
    pub(crate) const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
}

/// What kind of refusal, for metrics (`rlsgate_refusals_total{reason}`) and
/// logs: a short fixed name, never anything the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The token's `exp` (or `nbf`, `iat` under `max_token_age`) rules it out now.
    Expired,
    /// The signature does not verify, or the algorithm does not fit the key.
    BadSignature,
    /// No provider is configured for the token's `iss`.
    UnknownIssuer,
    /// The provider publishes no key for the token's `kid`.
    UnknownKey,
    /// The token's `aud` is not accepted.
    Audience,
    /// The role is not served, or the token does not allow it.
    Role,
    /// A token sent over plaintext where TLS is required.
    TlsRequired,
    /// Too many connections, overall or for the role.
    Limit,
    /// The database, or the provider's keys, cannot be reached or refused.
    Upstream,
    /// Not a JWT, or a startup or password message that breaks the protocol.
    Malformed,
    Other,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::UnknownKey => "unknown_key",
            Reason::Audience => "audience",
            Reason::Role => "role",
            Reason::TlsRequired => "tls_required",
            Reason::Limit => "limit",
            Reason::Upstream => "upstream",
            Reason::Malformed => "malformed",
            Reason::Other => "other",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client's session was refused or ended.
///
/// `message` goes to the client in a FATAL ErrorResponse and must never hold a
/// token, key or password; `detail` goes only to the log; `reason` sorts it
/// for metrics.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub sqlstate: Cow<'static, str>,
    pub message: String,
    pub(crate) detail: Option<String>,
    pub(crate) reason: Reason,
}

impl Refusal {
    pub(crate) fn new(sqlstate: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Refusal {
            sqlstate: sqlstate.into(),
            message: message.into(),
            detail: None,
            reason: Reason::Other,
        }
    }

    /// 28000: the client's credentials or identity are not acceptable.
    pub(crate) fn auth(message: impl Into<String>) -> Self {
        Self::new(sqlstate::INVALID_AUTHORIZATION, message)
    }

    /// 08006: the database cannot be reached or refused the proxy.
    pub(crate) fn database_unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            sqlstate::CONNECTION_FAILURE,
            "the database is unavailable; try again later",
        )
        .with_detail(detail)
        .because(Reason::Upstream)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::new(sqlstate::PROTOCOL_VIOLATION, message).because(Reason::Malformed)
    }

    /// Sets the kind of refusal (by default [`Reason::Other`]).
    pub(crate) fn because(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The FATAL ErrorResponse frame for the client.
    pub fn encode(&self, buf: &mut BytesMut) {
        messages::error_response(buf, "FATAL", &self.sqlstate, &self.message);
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.sqlstate, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}
