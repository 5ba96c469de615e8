//! `[[role]]`: the user names clients connect as, and what each needs.

use anyhow::bail;
use serde::Deserialize;

use super::Secret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// The user name clients connect as.
    pub name: String,
    pub token: TokenPolicy,
    /// The Postgres role the proxy logs in as; defaults to `name`.
    upstream_user: Option<String>,
    pub upstream_password: Option<Secret>,
    /// Sessions of this role at once (within `[listen] max_connections`).
    pub max_connections: Option<usize>,
    /// The settings `ALTER ROLE <upstream_user> [IN DATABASE …] SET` is expected to have, as
    /// `pg_db_role_setting.setconfig` lists them ("name=value"); any other is refused at login.
    #[serde(default)]
    pub upstream_settings: Vec<String>,
}

impl Role {
    pub fn upstream_user(&self) -> &str {
        self.upstream_user.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenPolicy {
    /// The password must be a valid token; its claims are bound to the session.
    Required,
    /// No password is asked; the session has no claims (`auth.session()` is NULL).
    None,
}

/// Entries of `upstream_settings` are compared with `setconfig` as text, so
/// one that could never match is a mistake to point out now.
pub(super) fn check_role_settings(role: &Role) -> anyhow::Result<()> {
    for setting in &role.upstream_settings {
        let name = setting.split_once('=').map_or("", |(name, _)| name);
        if name.is_empty() || name.trim() != name {
            bail!(
                "[[role]] {:?}: upstream_settings entry {setting:?} is not \"name=value\" \
                 (as pg_db_role_setting lists it, e.g. \"statement_timeout=5s\")",
                role.name
            );
        }
    }
    Ok(())
}
