//! Alarms for a login role changed from inside a session.
//!
//! Every Postgres role may `ALTER ROLE` itself, and through the proxy all
//! users of a role share one login role (`[[role]] upstream_user`). One
//! user's `ALTER ROLE … PASSWORD` therefore locks out everyone else, and no
//! privilege forbids it. The proxy cannot prevent that with a password
//! (a client certificate or peer authentication does), but it can say what
//! most likely happened: an alarm per kind and upstream user, logged once
//! with the fix, shown in `/readyz` and in `rlsgate_upstream_tampering`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::ops::metrics::Metrics;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::tamper=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::tamper";

/// What was probably changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Tampering {
    /// Postgres refused the configured `upstream_password`.
    PasswordRejected,
    /// The login role carries settings the proxy did not declare.
    UndeclaredSettings,
}

impl Tampering {
    /// The `kind` label and JSON value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Tampering::PasswordRejected => "password_rejected",
            Tampering::UndeclaredSettings => "undeclared_settings",
        }
    }

    /// What probably happened to `user`, and how to fix and prevent it.
    fn explanation(self, user: &str) -> String {
        let role = identifier(user);
        match self {
            Tampering::PasswordRejected => format!(
                "Postgres refused the configured upstream_password of login role {user:?}: its \
                 password was probably changed from inside a session (ALTER ROLE … PASSWORD), \
                 which every role may do to itself, so every new session of it fails. Fix: as a \
                 superuser, set the password back to the [[role]]'s upstream_password (ALTER \
                 ROLE {role} PASSWORD '…'), or set upstream_password to the new one and reload. \
                 Prevent it: log in with a client certificate ([upstream] tls_client_cert, \
                 pg_hba `hostssl … cert`) or by peer over a Unix socket (pg_hba `local … \
                 peer`), which no SQL can change"
            ),
            Tampering::UndeclaredSettings => format!(
                "login role {user:?} carries settings the proxy did not declare: they were \
                 probably set from inside a session (ALTER ROLE … SET), which every role may \
                 do to itself, and apply to every new session of it, so the proxy serves no new \
                 session of it. Fix: as a superuser, remove them (ALTER ROLE {role} RESET …, \
                 also IN DATABASE …), or declare them in the [[role]]'s upstream_settings"
            ),
        }
    }
}

/// `name` as SQL spells it: bare when it may be, else in double quotes.
fn identifier(name: &str) -> String {
    let bare = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

impl std::fmt::Display for Tampering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The raised alarms of one proxy; kept across reloads, like its metrics.
pub(crate) struct TamperWatch {
    /// The detail of each raised alarm, by kind and upstream user.
    raised: Mutex<BTreeMap<(Tampering, String), String>>,
    metrics: Arc<Metrics>,
}

impl TamperWatch {
    pub(crate) fn new(metrics: Arc<Metrics>) -> TamperWatch {
        TamperWatch {
            raised: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// Raised: logs a warning once per (kind, upstream user) until cleared, with the fix; sets the gauge.
    pub(crate) fn raise(&self, kind: Tampering, upstream_user: &str, detail: &str) {
        self.metrics.tampering_raised(kind.as_str(), upstream_user);
        let first = {
            let mut raised = self.raised.lock().expect("tamper lock");
            raised
                .insert((kind, upstream_user.to_owned()), detail.to_owned())
                .is_none()
        };
        if first {
            tracing::warn!(
                target: LOG_TARGET,
                kind = kind.as_str(),
                upstream_user,
                detail,
                "{}",
                kind.explanation(upstream_user)
            );
        }
    }

    /// The login works again: lowers the gauge and says so, if it was raised.
    pub(crate) fn clear(&self, kind: Tampering, upstream_user: &str) {
        let was_raised = {
            let mut raised = self.raised.lock().expect("tamper lock");
            // Cheap when nothing is raised, as on nearly every login.
            !raised.is_empty() && raised.remove(&(kind, upstream_user.to_owned())).is_some()
        };
        if was_raised {
            self.metrics.tampering_cleared(kind.as_str(), upstream_user);
            tracing::info!(
                target: LOG_TARGET,
                kind = kind.as_str(),
                upstream_user,
                "login role alarm cleared: Postgres accepts the proxy's login again"
            );
        }
    }

    /// The raised alarms: (kind, upstream user, detail), in that order.
    pub(crate) fn active(&self) -> Vec<(Tampering, String, String)> {
        let raised = self.raised.lock().expect("tamper lock");
        raised
            .iter()
            .map(|((kind, user), detail)| (*kind, user.clone(), detail.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(metrics: &Metrics, kind: &str, user: &str) -> Option<String> {
        let wanted = format!("rlsgate_upstream_tampering{{kind=\"{kind}\",user=\"{user}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&wanted).map(str::to_owned))
    }

    #[test]
    fn an_alarm_stays_raised_per_kind_and_user_until_cleared() {
        let metrics = Arc::new(Metrics::new());
        let watch = TamperWatch::new(Arc::clone(&metrics));
        assert!(watch.active().is_empty());
        watch.clear(Tampering::PasswordRejected, "authenticated");
        assert_eq!(gauge(&metrics, "password_rejected", "authenticated"), None);

        watch.raise(Tampering::PasswordRejected, "authenticated", "28P01 first");
        watch.raise(Tampering::PasswordRejected, "authenticated", "28P01 again");
        watch.raise(Tampering::UndeclaredSettings, "reporting", "search_path");
        assert_eq!(
            watch.active(),
            vec![
                (
                    Tampering::PasswordRejected,
                    "authenticated".to_owned(),
                    "28P01 again".to_owned()
                ),
                (
                    Tampering::UndeclaredSettings,
                    "reporting".to_owned(),
                    "search_path".to_owned()
                ),
            ]
        );
        assert_eq!(
            gauge(&metrics, "password_rejected", "authenticated").as_deref(),
            Some("1")
        );
        let text = metrics.render();
        assert!(
            text.contains("rlsgate_upstream_tampering_total{kind=\"password_rejected\"} 2"),
            "{text}"
        );

        // Another user's or kind's all-clear leaves the alarm alone.
        watch.clear(Tampering::PasswordRejected, "reporting");
        watch.clear(Tampering::UndeclaredSettings, "authenticated");
        assert_eq!(watch.active().len(), 2);
        watch.clear(Tampering::PasswordRejected, "authenticated");
        assert_eq!(watch.active().len(), 1);
        assert_eq!(
            gauge(&metrics, "password_rejected", "authenticated").as_deref(),
            Some("0")
        );
        assert_eq!(
            gauge(&metrics, "undeclared_settings", "reporting").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn the_explanation_says_what_happened_and_what_prevents_it() {
        let text = Tampering::PasswordRejected.explanation("authenticated");
        assert!(
            text.contains("probably changed from inside a session"),
            "{text}"
        );
        assert!(text.contains("ALTER ROLE authenticated PASSWORD"), "{text}");
        assert!(text.contains("tls_client_cert"), "{text}");
        assert!(text.contains("peer"), "{text}");
        let text = Tampering::PasswordRejected.explanation("App User");
        assert!(text.contains("ALTER ROLE \"App User\" PASSWORD"), "{text}");
    }
}
