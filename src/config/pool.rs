//! `[pool]`: whether upstream connections outlive their clients.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default)]
    pub mode: PoolMode,
    /// Idle connections kept per (database, upstream user).
    #[serde(default = "defaults::pool_size")]
    pub size: usize,
    /// An idle connection unused this long is closed.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection this old is closed rather than reused.
    #[serde(default = "defaults::pool_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::None,
            size: defaults::pool_size(),
            idle_timeout: defaults::pool_idle_timeout(),
            max_lifetime: defaults::pool_max_lifetime(),
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
}

impl Pool {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.mode == PoolMode::Session {
            if self.size == 0 {
                bail!("[pool] size must be at least 1 with mode = \"session\"");
            }
            if self.idle_timeout.is_zero() || self.max_lifetime.is_zero() {
                bail!("[pool] idle_timeout and max_lifetime must be longer than zero");
            }
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
}
