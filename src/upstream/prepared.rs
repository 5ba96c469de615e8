//! Named statements prepared on one pooled backend under the proxy's names
//! (transaction pooling): what a client's Bind may use there without a
//! Parse first.
//!
//! A statement's name on the backend is derived from its text and parameter
//! types alone ([`backend_name`]), so two clients preparing the same SQL
//! share one prepared statement per backend, whatever they call it, and a
//! client's own names never reach Postgres. Sharing is safe: a prepared
//! statement is a parse tree and a plan, and Row-Level Security is applied
//! when it runs, with the claims bound then; Postgres replans a cached
//! plan whose role or `search_path` has changed.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use aws_lc_rs::digest;

/// The prefix of every statement name the proxy prepares on a backend.
pub(crate) const PREFIX: &str = "rlsgate_";

/// The backend's name for a statement whose Parse body, after the client's
/// name, is `definition` (query text, NUL, parameter types): the prefix
/// and 128 bits of SHA-256, so that different statements never share one.
pub(crate) fn backend_name(definition: &[u8]) -> Arc<str> {
    let hash = digest::digest(&digest::SHA256, definition);
    let mut name = String::with_capacity(PREFIX.len() + 32);
    name.push_str(PREFIX);
    name.push_str(&hex::encode(&hash.as_ref()[..16]));
    name.into()
}

/// The statements prepared on one backend, oldest first.
#[derive(Default)]
pub(crate) struct Prepared {
    names: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

impl Prepared {
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Records a statement whose Parse is on its way: a second Parse of it
    /// would fail, so it counts as prepared until its Parse is known to
    /// have failed ([`Prepared::remove`]).
    pub(crate) fn insert(&mut self, name: Arc<str>) {
        if self.names.insert(Arc::clone(&name)) {
            self.order.push_back(name);
        }
    }

    /// Forgets a statement the backend did not prepare after all (its
    /// Parse failed, or was skipped after an error).
    pub(crate) fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    /// The oldest statement, forgotten, when preparing one more would keep
    /// more than `max`: the caller closes it on the backend first.
    pub(crate) fn evict(&mut self, max: usize) -> Option<Arc<str>> {
        if self.names.len() < max {
            return None;
        }
        while let Some(oldest) = self.order.pop_front() {
            if self.names.remove(&oldest) {
                return Some(oldest);
            }
        }
        None
    }

    /// Forgets everything: the backend's statements are gone (`DISCARD
    /// ALL`, `DEALLOCATE ALL`).
    pub(crate) fn clear(&mut self) {
        self.names.clear();
        self.order.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statements_name_depends_on_its_text_and_types_only() {
        let a = backend_name(b"select $1\0\x00\x01\x00\x00\x00\x17");
        let b = backend_name(b"select $1\0\x00\x01\x00\x00\x00\x19");
        assert_ne!(a, b, "the same text with other parameter types");
        assert_eq!(a, backend_name(b"select $1\0\x00\x01\x00\x00\x00\x17"));
        assert!(a.starts_with(PREFIX) && a.len() < 63, "{a}");
    }

    #[test]
    fn the_oldest_statement_goes_first_once_the_backend_holds_its_maximum() {
        let mut prepared = Prepared::default();
        for name in ["a", "b", "c"] {
            assert_eq!(prepared.evict(3), None);
            prepared.insert(name.into());
        }
        prepared.insert("b".into());
        assert_eq!(prepared.len(), 3, "inserting a known name adds nothing");
        assert_eq!(prepared.evict(3).as_deref(), Some("a"));
        assert!(!prepared.contains("a") && prepared.contains("c"));
        prepared.clear();
        assert_eq!(prepared.len(), 0);
    }
}
