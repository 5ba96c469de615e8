//! `[http]`: the serverless driver's front door (HTTP `POST /sql` and the
//! WebSocket tunnel), off unless `address` is set.

use std::net::SocketAddr;

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Where HTTP and WebSocket clients connect; unset: not served. Port 0
    /// picks a free port. TLS (https, wss) with `[listen] tls_cert`/`tls_key`.
    pub address: Option<SocketAddr>,
    /// Largest request body; a larger one is answered 413.
    #[serde(default = "defaults::ten_mib")]
    pub max_request_bytes: usize,
    /// Largest response body; a larger one is answered 507.
    #[serde(default = "defaults::ten_mib")]
    pub max_response_bytes: usize,
    /// Origins browsers may call from (`Access-Control-Allow-Origin`); `"*"`
    /// allows any. Requests carry the user's token in a header, never a
    /// cookie, so another origin's page gains nothing it did not already have.
    #[serde(default = "defaults::any_origin")]
    pub cors_origins: Vec<String>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            address: None,
            max_request_bytes: defaults::ten_mib(),
            max_response_bytes: defaults::ten_mib(),
            cors_origins: defaults::any_origin(),
        }
    }
}

impl Http {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        for (key, value) in [
            ("max_request_bytes", self.max_request_bytes),
            ("max_response_bytes", self.max_response_bytes),
        ] {
            if value == 0 {
                bail!("[http] {key} must be at least 1");
            }
        }
        for origin in &self.cors_origins {
            let well_formed = origin == "*"
                || url::Url::parse(origin).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.path() == "/"
                        && !origin.ends_with('/')
                });
            if !well_formed {
                bail!(
                    "[http] cors_origins: {origin:?} is not an origin: write \"*\" or \
                     scheme://host[:port], as browsers send it (no path, no trailing slash)"
                );
            }
        }
        Ok(())
    }

    /// Whether a browser page from `origin` may read the answers.
    pub(crate) fn allows_origin(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o == origin)
    }
}

mod defaults {
    pub fn ten_mib() -> usize {
        10 << 20
    }
    pub fn any_origin() -> Vec<String> {
        vec!["*".to_owned()]
    }
}
