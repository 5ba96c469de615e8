//! The one wall clock: the current time in Unix seconds, as tokens, envelopes
//! and the `auth` schema count it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since 1970. A clock set before 1970 reads as 0 rather than
/// failing: every caller compares it with times that come from elsewhere.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_the_system_time_in_whole_seconds() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let now = unix_now();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(before.as_secs() <= now && now <= after.as_secs());
    }
}
