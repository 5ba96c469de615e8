//! `[pool]`: whether upstream connections outlive their clients, and
//! whether a client holds one per session or per transaction.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default)]
    pub mode: PoolMode,
    /// Idle connections kept per (database, upstream user), over all the
    /// worker threads.
    #[serde(default = "defaults::pool_size")]
    pub size: usize,
    /// An idle connection unused this long is closed.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection this old is closed rather than reused.
    #[serde(default = "defaults::pool_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// How long a request (HTTP) or a transaction (`mode = "transaction"`)
    /// waits for one of the `size` connections it may use before it is
    /// refused with 53300.
    #[serde(default = "defaults::pool_wait_timeout", with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// With `mode = "transaction"`: how many of the clients' named
    /// statements each backend keeps prepared; the oldest is closed past it.
    #[serde(default = "defaults::max_prepared_statements")]
    pub max_prepared_statements: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::None,
            size: defaults::pool_size(),
            idle_timeout: defaults::pool_idle_timeout(),
            max_lifetime: defaults::pool_max_lifetime(),
            wait_timeout: defaults::pool_wait_timeout(),
            max_prepared_statements: defaults::max_prepared_statements(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// One upstream connection per client, closed when the client leaves.
    #[default]
    None,
    /// A client's upstream connection is reset and kept for the next client.
    Session,
    /// A client holds an upstream connection only while a transaction of
    /// its runs (see [`crate::session::transaction`]).
    Transaction,
}

impl Pool {
    /// `serving_http`: the HTTP front door pools whatever the mode.
    pub(super) fn validate(&self, serving_http: bool) -> anyhow::Result<()> {
        if self.mode != PoolMode::None || serving_http {
            if self.size == 0 {
                bail!(
                    "[pool] size must be at least 1 with mode = \"session\" or \"transaction\", \
                     or [http] address set"
                );
            }
            if self.idle_timeout.is_zero() || self.max_lifetime.is_zero() {
                bail!("[pool] idle_timeout and max_lifetime must be longer than zero");
            }
            if self.wait_timeout.is_zero() {
                bail!("[pool] wait_timeout must be longer than zero");
            }
        }
        if self.max_prepared_statements == 0 {
            bail!("[pool] max_prepared_statements must be at least 1");
        }
        Ok(())
    }
}

mod defaults {
    use std::time::Duration;
    pub fn pool_size() -> usize {
        20
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(10 * 60)
    }
    pub fn pool_max_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn pool_wait_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_prepared_statements() -> usize {
        500
    }
}
