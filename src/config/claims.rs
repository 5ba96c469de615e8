//! `[claims]`: the key that signs the envelope of verified claims, and how
//! long one envelope lives.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

use crate::auth::claims::SigningKey;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Base64 of at least 32 random bytes, shared with the database by `rlsgate init-db`.
    pub signing_key: SigningKey,
    /// The longest one envelope is valid; sessions that last longer get a
    /// fresh one between transactions (see `claims`).
    #[serde(default = "defaults::envelope_lifetime", with = "humantime_serde")]
    pub envelope_lifetime: Duration,
}

impl Claims {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.envelope_lifetime < Duration::from_secs(2) {
            bail!("[claims] envelope_lifetime must be at least 2s");
        }
        Ok(())
    }
}

mod defaults {
    use std::time::Duration;
    pub fn envelope_lifetime() -> Duration {
        crate::auth::claims::LIFETIME
    }
}
